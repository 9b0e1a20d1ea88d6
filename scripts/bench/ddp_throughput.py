"""Data-parallel throughput: rows per second of a mean-field logistic fit (D = 50, B = 4096 per
process, in memory) with 1 and 2 processes under torchrun (gloo), and the cost of the gradient
all-reduce as a fraction of a step, side by side in one run.

    python scripts/bench/ddp_throughput.py [--steps 400] [--rounds 3]

Each world size runs in its own torchrun launch, one after the other, and the pair of launches
runs ``--rounds`` times, interleaved; the table gives the median over the rounds (this machine's
speed drifts by tens of percent over minutes, which a ratio of two single launches carries).
The all-reduce cost is the
time of one all-reduce of a gradient-sized buffer (what DDP sends each step) divided by the
measured step time of the 2-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

D, B, N = 50, 4096, 400_000
ROOT = Path(__file__).resolve().parents[2]


def worker(steps: int, out: str) -> None:
    import numpy as np
    import torch

    from svi import distributed as dist
    from svi.data.memory import InMemoryData
    from svi.models import LogisticRegression
    from svi.options import FitOptions
    from svi.trainer import FitContext, build_family, init_state, step
    from svi.transforms import ParamSpace

    world = dist.setup("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.world_size))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (rng.random(N) < 1 / (1 + np.exp(-(x @ (0.3 * rng.normal(size=D)))))).astype(np.float32)
    model = LogisticRegression(D)
    data = InMemoryData({"x": x, "y": y}, keys=model.batch_keys)
    opts = FitOptions(family="meanfield", batch_size=B, optimizer="adam", lr=0.01, warm_start="none",
                      control_variate=False, antithetic=False)
    ctx = FitContext(model=model, space=ParamSpace(model.params), options=opts, num_rows=N, dtype=torch.float32,
                     device=torch.device("cpu"), eval_batch=data.sample(256, 0), rank=world.rank,
                     world_size=world.world_size, world=world)
    fam, _, _ = build_family(ctx)
    state = init_state(ctx, fam, trainable=dist.wrap(fam, world))
    stream = data.stream(B, 0, rank=world.rank, world_size=world.world_size)
    for _ in range(50):
        step(ctx, state, next(stream))
    dist.barrier(world)
    t = time.perf_counter()
    for _ in range(steps):
        step(ctx, state, next(stream))
    dist.barrier(world)
    step_s = (time.perf_counter() - t) / steps
    grad = torch.zeros(sum(p.numel() for p in fam.parameters()))
    reduce_s = 0.0
    if world.world_size > 1:
        import torch.distributed as td

        t = time.perf_counter()
        for _ in range(200):
            td.all_reduce(grad)
        reduce_s = (time.perf_counter() - t) / 200
    if world.rank == 0:
        Path(out).write_text(json.dumps({"world": world.world_size, "step_s": step_s, "allreduce_s": reduce_s,
                                         "rows_per_s": world.world_size * B / step_s}))
    dist.teardown(world)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.worker)
        return
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for n in (1, 2):
            out = Path(f"/tmp/svi-ddp-bench-{n}.json")
            run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  str(n), __file__, "--steps", str(args.steps), "--worker", str(out)],
                                 env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"},
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(run.stderr[-3000:])
            runs[n].append(json.loads(out.read_text()))
            print(f"  {n} process(es): {1e3 * runs[n][-1]['step_s']:.2f} ms/step", file=sys.stderr)
    results = {n: {key: statistics.median(r[key] for r in rs) for key in ("step_s", "allreduce_s")}
               for n, rs in runs.items()}
    for n, r in results.items():
        r["rows_per_s"] = n * B / r["step_s"]
    one, two = results[1], results[2]
    print(f"\nmean-field logistic, D={D}, B={B} per process, in memory, gloo on {os.cpu_count()} CPU cores; "
          f"median of {args.rounds} interleaved rounds")
    print("| processes | ms/step | rows/s | speed-up | all-reduce, share of a step |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| 1 | {1e3 * one['step_s']:.2f} | {one['rows_per_s']:,.0f} | 1.00x | - |")
    print(f"| 2 | {1e3 * two['step_s']:.2f} | {two['rows_per_s']:,.0f} | {two['rows_per_s'] / one['rows_per_s']:.2f}x "
          f"| {two['allreduce_s'] / two['step_s']:.1%} ({1e6 * two['allreduce_s']:.0f} us) |")


if __name__ == "__main__":
    main()
