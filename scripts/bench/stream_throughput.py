"""Streaming throughput and memory: a mean-field logistic fit (D = 50, B = 4096) streaming a
Parquet data set, against a bare pyarrow scan of the same files into a numpy matrix, side by
side in one run; and whole-process peak RSS fitting 1x and 10x the rows (same row groups).

    python scripts/bench/stream_throughput.py [--rows 4000000] [--folder /tmp/svi-bench] [--steps 1500]

Each measurement runs in its own fresh subprocess, one after another. The fit's rows/s is the
median over its logged windows of ``log_every`` steps (the figure MLflow shows as ``rows_per_s``):
the warm start, the full-data pass for the control variate and the windows that compile the
step are not steady state. The fit runs twice: with the defaults for ``compile_after + --steps``
steps, whose windows before ``compile_after`` run the uncompiled step and those after it the
compiled one (``compile: auto``), reported apart; and with ``compile: true`` for ``--steps``.
The scan reads every row group of every file once. Each throughput figure is the median of
``--repeats`` runs (the scan's rate moves by a third between runs here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

D, B, ROW_GROUP = 50, 4096, 65_536


def make(folder: Path, rows: int) -> Path:
    from svi.data.jobs import truth_file, write_synthetic

    out = folder / f"logistic-{rows}"
    if not truth_file(out).is_file():
        write_synthetic(out, "logistic", rows=rows, features=D, files=max(4, rows // 500_000),
                        row_group_size=ROW_GROUP, seed=0)
    return out


def scan(path: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet"))
    cols = [f"x{j}" for j in range(D)] + ["y"]
    t, rows = time.perf_counter(), 0
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(g, columns=cols)
            x = np.stack([table.column(c).to_numpy() for c in cols[:-1]], axis=1)
            rows += len(x)
    return {"rows_per_s": rows / (time.perf_counter() - t), "peak_rss_mb": _peak_mb()}


def fit(path: Path, steps: int, kind: str) -> dict:
    """``kind``: ``fit`` (the defaults past ``compile_after``), ``compiled`` (``compile: true``) or
    ``short`` (the defaults for ``steps`` steps, for memory)."""
    import numpy as np

    import svi
    from svi.options import FitOptions
    from svi.tracking import NullTracker

    class RowsPerSecond(NullTracker):
        def __init__(self):
            self.values = []

        def log_metrics(self, metrics, step):
            if "rows_per_s" in metrics:  # the per-window calls carry the stopping rule's statistics instead
                self.values.append((step, metrics["rows_per_s"]))

    from svi.data.jobs import truth_file

    meta = json.loads(truth_file(path).read_text())
    tracker = RowsPerSecond()
    switch = FitOptions().compile_after
    # the defaults run past the step where compile: auto compiles; compile: true from the first step
    compiled = kind == "compiled"
    extra = dict(compile=True, max_steps=steps) if compiled else dict(max_steps=switch + steps if kind == "fit" else steps)
    post = svi.fit(svi.models.LogisticRegression(D), str(path), columns=meta["columns"], family="meanfield",
                   batch_size=B, in_memory_rows=0, tol_param=1e-9, progress=False,
                   cache_dir=str(path / ".cache"), log_every=100, tracker=tracker, **extra)
    before = [v for s, v in tracker.values if s <= switch] if not compiled else []
    # the window holding the compilation is not steady state
    after = [v for s, v in tracker.values if s > switch + 100] if kind == "fit" else [v for _, v in tracker.values]
    return {"rows_per_s": float(np.median(after)), "uncompiled_rows_per_s": float(np.median(before)) if before else None,
            "steps": post.info.steps, "peak_rss_mb": _peak_mb()}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(kind: str, path: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, path, "--steps", str(steps)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--memory-rows", type=int, default=2_000_000, help="1x of the memory comparison (10x too)")
    ap.add_argument("--folder", default="/tmp/svi-bench")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each throughput measurement (median)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, path = args.child
        print(json.dumps(scan(Path(path)) if kind == "scan" else fit(Path(path), args.steps, kind)))
        return
    folder = Path(args.folder)
    big = make(folder, args.rows)
    print(f"throughput on {args.rows:,} rows x {D} features", file=sys.stderr)
    runs = {kind: [_child(kind, str(big), args.steps) for _ in range(args.repeats)] for kind in ("scan", "fit", "compiled")}
    s, f, c = ({"rows_per_s": statistics.median(r["rows_per_s"] for r in runs[kind])} for kind in ("scan", "fit", "compiled"))
    early = statistics.median(r["uncompiled_rows_per_s"] for r in runs["fit"])
    small, large = make(folder, args.memory_rows), make(folder, 10 * args.memory_rows)
    m1 = _child("short", str(small), 300)
    m10 = _child("short", str(large), 300)
    print(f"\nmean-field logistic, D={D}, B={B}, row groups of {ROW_GROUP:,} rows, {os.cpu_count()} cores")
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| bare pyarrow scan into numpy, rows/s | {s['rows_per_s']:,.0f} |")
    print(f"| svi fit streaming the same files (defaults, steps up to compile_after: uncompiled), rows/s | {early:,.0f} |")
    print(f"| ratio / scan | {early / s['rows_per_s']:.2f} |")
    print(f"| svi fit streaming the same files (defaults, after compile_after: compiled), rows/s | {f['rows_per_s']:,.0f} |")
    print(f"| ratio fit / scan (target >= 0.9) | {f['rows_per_s'] / s['rows_per_s']:.2f} |")
    print(f"| svi fit streaming the same files (`compile: true`), rows/s | {c['rows_per_s']:,.0f} |")
    print(f"| ratio compiled fit / scan (target >= 0.9) | {c['rows_per_s'] / s['rows_per_s']:.2f} |")
    print(f"| peak RSS fitting {args.memory_rows:,} rows | {m1['peak_rss_mb']:,.0f} MB |")
    print(f"| peak RSS fitting {10 * args.memory_rows:,} rows | {m10['peak_rss_mb']:,.0f} MB |")
    print(f"| ratio 10x / 1x (target within 1.25) | {m10['peak_rss_mb'] / m1['peak_rss_mb']:.2f} |")


if __name__ == "__main__":
    main()
