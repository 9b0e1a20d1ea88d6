"""The ``svi`` command: fit, resume, summary, sample, diagnose, data make | convert | stats.

    svi fit conf/quickstart.yaml family=fullrank
    svi resume runs/quickstart/checkpoints        (or an fsspec URL, or an MLflow run id)
    svi summary runs/quickstart/posterior
    svi sample runs:/<run_id>/posterior -n 1000 -o draws.parquet
    svi diagnose runs/quickstart/posterior
    svi sync runs/quickstart/checkpoints          (after a tracking outage)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]


def launch_rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 talks to the user. Read here
    rather than from svi.distributed, which imports torch: ``svi --version`` and ``--help`` stay
    instant."""
    return int(os.environ.get("RANK", "0"))


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s svi %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("svi")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if launch_rank() == 0 else logging.WARNING)
    logger.propagate = False
    # MLflow's artifact download bars would interleave with svi's own lines
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _print_fit_report(post, cfg) -> None:
    import numpy as np
    import pandas as pd

    if launch_rank() != 0:  # under torchrun every rank holds the posterior; one report is enough
        return
    table = post.summary(n=cfg.output.summary_draws if cfg is not None else 4000)
    truth = post.info.truth
    if truth:
        from svi.transforms import element_names

        if post.model is not None:  # the truth in the labelling the posterior's draws are reported in
            import torch

            as_draw = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)).unsqueeze(0) for k, v in truth.items()}
            truth = {k: v[0].numpy() for k, v in post.model.relabel(as_draw).items()}
        values = {}
        for name, value in truth.items():
            arr = np.asarray(value)
            values.update(zip(element_names(name, arr.shape), arr.reshape(-1).tolist()))
        table["true"] = pd.Series(values)
        table["z"] = (table["mean"] - table["true"]) / table["sd"]
    shown, folded = _fold_group_effects(table, post.space)
    with pd.option_context("display.max_rows", 60, "display.width", 120, "display.float_format", "{:.4g}".format):
        print(shown)
    for line in folded:
        print(line)
    info = post.info
    print(f"\n{info.steps} steps, {'converged' if info.converged else 'NOT converged'}: {info.reason}")
    if info.khat is not None:
        khat = info.khat
        verdict = "good" if khat < 0.5 else "fair" if khat <= 0.7 else "POOR: q is far from the posterior"
        print(f"PSIS k-hat {khat:.2f} on {info.khat_rows or 0:,} rows ({verdict})")
    print(f"{info.num_rows:,} rows, batch {info.batch_size}, {info.seconds:.1f} s of optimisation")
    if info.run_id:
        uri = info.options.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        print(f"MLflow run {info.run_id}; open the UI with:  mlflow ui --backend-store-uri {uri}")
    if cfg is not None and cfg.output.posterior:
        print(f"posterior saved in {cfg.output.posterior}  (svi summary | sample | diagnose {cfg.output.posterior})")


def _fold_group_effects(table, space, head: int = 5, most: int = 60):
    """The table to print: every population-level row, and of a group effect with many elements
    only the first ``head`` and its worst |z| when the truth is known, so the hyper-parameters are
    never lost in pandas' "..." between a thousand group rows. Returns (table, one line per
    folded group effect)."""
    if len(table) <= most:
        return table, []
    keep, lines = [], []
    for b in space.blocks:
        rows = [r for r in table.index if r == b.name or r.startswith(b.name + "[")]
        if not b.is_group_effect or len(rows) <= head:
            keep += rows
            continue
        keep += rows[:head]
        line = f"{b.name}: {len(rows) - head:,} more rows in the saved summary.csv"
        if "z" in table.columns:
            z = table.loc[rows, "z"].abs()
            line += (f"; |z| against the truth: max {z.max():.2f} ({z.idxmax()}), {float((z > 3).mean()):.1%} "
                     f"beyond 3, {float((z < 2).mean()):.1%} within 2")
        lines.append(line)
    return table.loc[keep], lines


def cmd_fit(args) -> int:
    from svi.config import fit_config, load_config

    cfg = load_config(args.config, args.overrides)
    post = fit_config(None, cfg=cfg)
    _print_fit_report(post, cfg)
    return 0


def cmd_resume(args) -> int:
    from svi.config import JOB_FILE, ConfigError, fit_config, load_config

    from svi.checkpoint import is_file, join, read_text
    from svi.imports import UntrustedModelError, is_trusted

    target = Path(args.target)
    url = "://" in args.target  # a checkpoint folder given as an fsspec URL: the user's own, like a local one
    remote = not url and not target.is_dir()
    folder = _checkpoint_folder_of_run(args.target, args.tracking_uri) if remote else args.target if url else target
    job = join(folder, JOB_FILE)
    if not is_file(job):
        raise ConfigError(f"{job} does not exist; resume a checkpoint folder written by `svi fit`")
    overrides = [*args.overrides, f"checkpoint.dir={folder}", "resume=true"]
    if isinstance(job, Path):
        cfg = load_config(job, overrides)
    else:  # the config loader reads local files
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / JOB_FILE).write_text(read_text(job))
            cfg = load_config(Path(tmp) / JOB_FILE, overrides)
    model_target = cfg.model.target
    module = model_target.partition(":")[0]
    if remote and not is_trusted(module, args.trust):
        # job.yaml came from the tracking server (or a folder its run names): code it names is not ours to run
        raise UntrustedModelError(
            f"run {args.target}'s job.yaml names the model {model_target!r}; svi does not import code named by a "
            f"tracking server on its own. If you trust it, rerun with --trust {module}")
    print(f"resuming {folder}: model {model_target} from {job}", flush=True)
    post = fit_config(None, cfg=cfg)
    _print_fit_report(post, cfg)
    return 0


def _checkpoint_folder_of_run(run_id: str, tracking_uri: str | None) -> Path | str:
    """The run's checkpoint folder (local, or the fsspec URL it was given as), or its checkpoints
    downloaded from MLflow."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # MLflow raises its own exceptions for an unknown run
        raise SystemExit(f"svi resume: {run_id!r} is neither a checkpoint folder nor a run in {uri}: {e}")
    local = run.data.tags.get("svi.checkpoint_dir")
    if local and "://" in local:  # a remote folder keeps its checkpoints there, not in the run's artifacts
        return local
    if local and Path(local).is_dir():
        return Path(local)
    dst = Path("runs") / f"resume-{run_id}"
    mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints", dst_path=str(dst),
                                        tracking_uri=uri)
    mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="job.yaml", dst_path=str(dst / "checkpoints"),
                                        tracking_uri=uri)
    return dst / "checkpoints"


def cmd_summary(args) -> int:
    import pandas as pd

    from svi.posterior import load_posterior

    post = load_posterior(args.uri, tracking_uri=args.tracking_uri, trust=args.trust)
    with pd.option_context("display.max_rows", 200, "display.width", 120, "display.float_format", "{:.4g}".format):
        print(post.summary(n=args.draws, seed=args.seed))
    return 0


def cmd_sample(args) -> int:
    import pandas as pd

    from svi.posterior import load_posterior
    from svi.transforms import element_names

    post = load_posterior(args.uri, tracking_uri=args.tracking_uri, trust=args.trust)
    draws = post.sample(args.n, seed=args.seed)
    cols = {}
    for name, t in draws.items():
        flat = t.reshape(args.n, -1).double().numpy()
        for j, col in enumerate(element_names(name, tuple(t.shape[1:]))):
            cols[col] = flat[:, j]
    df = pd.DataFrame(cols)
    out = Path(args.output)
    if out.suffix == ".csv":
        df.to_csv(out, index=False)
    else:
        df.to_parquet(out, index=False)
    print(f"wrote {args.n} draws of {len(cols)} values to {out}")
    return 0


def cmd_diagnose(args) -> int:
    from svi.diagnostics import diagnose

    result = diagnose(args.uri, data=args.data, columns=json.loads(args.columns) if args.columns else None,
                      num_draws=args.draws, seed=args.seed, tracking_uri=args.tracking_uri, trust=args.trust)
    print(result.report())
    return 0


def cmd_loo(args) -> int:
    import arviz as az

    from svi.posterior import load_posterior

    post = load_posterior(args.uri, tracking_uri=args.tracking_uri, trust=args.trust)
    data = args.data if args.data is not None else post.info.data_path
    if data is None:
        raise SystemExit(f"svi loo: {args.uri} does not record the data it was fitted to; pass --data PATH")
    idata = post.to_arviz(n=args.draws, seed=args.seed, data=data, rows=args.rows,
                          columns=json.loads(args.columns) if args.columns else None,
                          chains=4 if args.draws % 4 == 0 else 1)
    result = az.loo(idata, pointwise=True)
    print(result)
    attrs = idata.log_likelihood.attrs
    total, used = int(attrs["num_rows"]), int(attrs["rows_used"])
    if used < total:
        # elpd is a sum over rows: scale the sample's mean up, and add the error of having sampled
        # (simple random sampling; Magnusson, Andersen, Jonasson, Vehtari, ICML 2019)
        import numpy as np

        pointwise = np.asarray(result.loo_i).reshape(-1)
        var = float(pointwise.var(ddof=1))
        full = total * float(pointwise.mean())
        se = float(np.sqrt(total * var))
        se_sub = float(total * np.sqrt((1 - used / total) * var / used))
        print(f"\nComputed on a uniform sample of {used:,} of {total:,} rows (--rows); the numbers above sum over "
              f"the sample.\nFull-data estimate: elpd_loo {full:.2f}, SE {se:.2f}, plus {se_sub:.2f} from sampling "
              f"rows (Magnusson et al. 2019)")
    return 0


def cmd_sync(args) -> int:
    from svi.tracking import sync

    for run_id, sent, status in sync(args.folder, args.tracking_uri):
        print(f"run {run_id}: sent {sent} tracking operations" + (f"; status {status}" if status else ""))
    return 0


def cmd_data(args) -> int:
    from svi.data import jobs

    if args.data_cmd == "make":
        meta = jobs.write_synthetic(args.out, args.model, args.rows, args.features, args.files, args.row_group_size,
                                    args.seed, args.groups, args.components, args.varying_slopes,
                                    heldout=args.heldout)
        print(f"wrote {meta['rows']:,} rows in {args.files} files to {args.out}; columns {meta['columns']}")
    elif args.data_cmd == "convert":
        rows = jobs.csv_to_parquet(args.src, args.out, args.blocksize, args.row_group_size, args.scheduler)
        print(f"wrote {rows:,} rows to {args.out}")
    else:
        from svi.data.parquet import ParquetSource

        src = ParquetSource(args.data, json.loads(args.columns), integer_keys=args.integer, scheduler=args.scheduler)
        try:
            print(json.dumps(jobs.data_stats(src), indent=1))
        finally:
            src.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from svi.synthetic import MODELS

    ap = argparse.ArgumentParser(prog="svi", description="Distributed ADVI on PyTorch: fit, resume, inspect posteriors.")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    ap.add_argument("--version", action="version", version=f"svi {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="run a job config", description="Run a job: make data if asked, fit, save.")
    p.add_argument("config", help="YAML job config, e.g. conf/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. fit.family=fullrank or family=fullrank")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("resume", help="resume a fit from its checkpoints",
                       description="Resume from a checkpoint folder or an MLflow run id; the same run continues.")
    p.add_argument("target", help="checkpoint folder (holding job.yaml; a path or an fsspec URL) or MLflow run id")
    p.add_argument("overrides", nargs="*", help="key=value overrides (only keys safe to change, with force_resume=true)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store holding the run (default MLFLOW_TRACKING_URI)")
    p.add_argument("--trust", action="append", default=[], metavar="MODULE",
                   help="import the model class that a run's job.yaml names from this module (repeatable)")
    p.set_defaults(func=cmd_resume)

    for name, helptext in (("summary", "print a posterior summary"), ("sample", "write posterior draws"),
                           ("diagnose", "PSIS k-hat diagnostic on the full data")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("uri", help="posterior folder, runs:/<run_id>/posterior or models:/<name>/<version>")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--tracking-uri", default=None, help="MLflow store for runs:/ and models:/ URIs")
        p.add_argument("--trust", action="append", default=[], metavar="MODULE",
                       help="import the model class the posterior names from this module (repeatable); svi.models "
                            "is always trusted, other model code is never imported from a file on its own")
        if name == "summary":
            p.add_argument("--draws", type=int, default=4000)
            p.set_defaults(func=cmd_summary)
        elif name == "sample":
            p.add_argument("-n", type=int, default=1000, help="number of draws")
            p.add_argument("-o", "--output", required=True, help="output file (.parquet or .csv)")
            p.set_defaults(func=cmd_sample)
        else:
            p.add_argument("--data", default=None, help="data to diagnose on (default: the data it was fitted to)")
            p.add_argument("--columns", default=None, help="JSON mapping of batch keys to columns")
            p.add_argument("--draws", type=int, default=1000)
            p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("loo", help="PSIS-LOO cross-validation (ArviZ) on the data",
                       description="Leave-one-out cross-validation by Pareto-smoothed importance sampling (ArviZ's "
                                   "az.loo): elpd_loo, its SE, p_loo and the Pareto k summary, on the data the "
                                   "posterior was fitted to or --data; data sets larger than --rows use a uniform "
                                   "sample of rows.")
    p.add_argument("uri", help="posterior folder, runs:/<run_id>/posterior or models:/<name>/<version>")
    p.add_argument("--data", default=None, help="data to score (default: the data it was fitted to)")
    p.add_argument("--columns", default=None, help="JSON mapping of batch keys to columns")
    p.add_argument("--rows", type=int, default=None,
                   help="use at most this many rows (default 10,000): a uniform sample of larger data")
    p.add_argument("--draws", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri", default=None, help="MLflow store for runs:/ and models:/ URIs")
    p.add_argument("--trust", action="append", default=[], metavar="MODULE",
                   help="import the model class the posterior names from this module (repeatable); svi.models "
                        "is always trusted, other model code is never imported from a file on its own")
    p.set_defaults(func=cmd_loo)

    p = sub.add_parser("sync", help="send what a lost tracking server did not get",
                       description="Replay the unsent-mlflow-*.jsonl files of a checkpoint folder into their MLflow "
                                   "runs (metrics, artifacts, tags, the final status), then remove them.")
    p.add_argument("folder", help="folder holding unsent-mlflow-*.jsonl (the fit's checkpoint folder)")
    p.add_argument("--tracking-uri", default=None, help="send to this store instead of the one the file names")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("data", help="data jobs: make | convert | stats", description="Data jobs.")
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="JOB")
    m = dsub.add_parser("make", help="write a synthetic Parquet data set with known truth")
    m.add_argument("out")
    m.add_argument("--model", default="logistic", choices=MODELS)
    m.add_argument("--rows", type=int, default=1_000_000)
    m.add_argument("--features", type=int, default=10)
    m.add_argument("--files", type=int, default=8)
    m.add_argument("--row-group-size", type=int, default=65_536)
    m.add_argument("--groups", type=int, default=20)
    m.add_argument("--components", type=int, default=3)
    m.add_argument("--varying-slopes", action="store_true")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--heldout", type=int, default=0, help="rows written to <out>-heldout from the same truth")
    c = dsub.add_parser("convert", help="convert CSV to Parquet with Dask")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--blocksize", default="64MB")
    c.add_argument("--row-group-size", type=int, default=65_536)
    c.add_argument("--scheduler", default=None)
    s = dsub.add_parser("stats", help="full-data column statistics with Dask")
    s.add_argument("data")
    s.add_argument("--columns", required=True, help='JSON mapping, e.g. {"x": "x*", "y": "y"}')
    s.add_argument("--integer", nargs="*", default=[])
    s.add_argument("--scheduler", default=None)
    p.set_defaults(func=cmd_data)
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("svi")  # without importing torch: --version and --help stay instant
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown"


def _record(fn):
    """torchrun's error recorder: a failing rank's traceback becomes the job's reported root cause."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover - torch builds without distributed
        return fn
    return record(fn)


@_record
def main(argv=None) -> int:
    from svi.checkpoint import CheckpointError
    from svi.config import ConfigError
    from svi.data.columns import DataError
    from svi.imports import UntrustedModelError
    from svi.model import ModelError
    from svi.options import OptionsError
    from svi.posterior import PosteriorFormatError
    from svi.tracking import TrackingError

    args = build_parser().parse_args(argv)
    _setup_logging()
    _quiet_warnings()
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, OptionsError, CheckpointError, PosteriorFormatError,
            TrackingError, UntrustedModelError) as e:
        if args.debug:
            raise
        print(f"svi {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a missing file: the system's words and the path
        if args.debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"svi {args.cmd}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"svi {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything else: one line; the traceback with --debug
        if args.debug:
            raise
        print(f"svi {args.cmd}: error: {type(e).__name__}: {e} (rerun with `svi --debug ...` for the traceback)",
              file=sys.stderr)
        return 1


def _quiet_warnings() -> None:
    """Warnings as one line each (``svi: warning: ...``), not Python's source-line format."""
    import warnings

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"svi: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = one_line
    if launch_rank() != 0:  # every decision is all-reduced, so rank 0 warns for all of them
        warnings.simplefilter("ignore")


if __name__ == "__main__":
    sys.exit(main())
