"""``svi.fit``: data and a model in, a :class:`~svi.posterior.Posterior` out.

The steps of a fit, in order: open the data, check the model on a few rows, find a
checkpoint to resume from (or warm-start), open the tracker, train with periodic
checkpoints, and hand back (and log) the posterior.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from svi import distributed as dist
from svi.checkpoint import CheckpointError, atomic_write_text, latest_checkpoint, save_checkpoint
from svi.data.parquet import ParquetSource
from svi.data.source import open_source, raise_if_unknown, standardize
from svi.elbo import anchor_statistics
from svi.model import Model, ModelError, check_model_outputs
from svi.options import SAFE_TO_CHANGE, FitOptions
from svi.posterior import Posterior
from svi.tracking import MLflowTracker, NullTracker, Tracker
from svi.trainer import (FitContext, build_family, init_state, load_state_dict, search_stan_eta, state_dict, train)
from svi.transforms import ParamSpace

__all__ = ["fit", "resolve_device", "default_batch_size", "fingerprint_of"]

log = logging.getLogger("svi")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} asked for CUDA, but torch.cuda.is_available() is False on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)  # one GPU per local rank
    return dev


def default_batch_size(num_rows: int) -> int:
    """All rows up to 10,000 (no subsampling noise), else 1,024 rows a step."""
    return num_rows if num_rows <= 10_000 else 1024


def fingerprint_of(model: Model, data_fingerprint: str) -> dict[str, str]:
    spec = json.dumps(model.spec(), sort_keys=True, default=str)
    return {"model": hashlib.sha256(spec.encode()).hexdigest()[:16], "data": data_fingerprint}


def fit(
    model: Model,
    data: Any,
    family: str = "meanfield",
    *,
    columns: Mapping[str, Any] | None = None,
    tracker: Tracker | None = None,
    **options: Any,
) -> Posterior:
    """Fit ``model`` to ``data`` by ADVI and return the posterior.

    Args:
        model: an :class:`svi.Model`.
        data: a dict of arrays/tensors, a pandas DataFrame, or a Parquet path/glob/folder (or a list).
        family: ``meanfield``, ``fullrank`` or ``lowrank``.
        columns: {batch key: column | [columns] | pattern} for DataFrame or Parquet data.
        tracker: where metrics go (default: MLflow when ``tracking=True``, else nowhere).
        **options: any field of :class:`svi.options.FitOptions`.
    """
    opts = FitOptions.from_dict({"family": family, **options})
    dtype = getattr(torch, opts.dtype)
    world = dist.setup(opts.device)
    clean = False
    try:
        device = resolve_device(opts.device, world.local_rank)
        space = ParamSpace(model.get_params(), model.name)
        source = open_source(data, columns, model.batch_keys, model.integer_keys, dtype, opts)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(_intra_op_threads(opts.threads, source))
        try:
            if opts.standardize:
                raise_if_unknown(opts.standardize, model.batch_keys, model.integer_keys)
                stats = standardize(source, opts.standardize, dtype)
                if hasattr(model, "use_data_stats"):
                    model.use_data_stats(stats)
            post = _fit(model, space, source, opts, dtype, device, tracker, world, columns)
            clean = True
            return post
        finally:
            torch.set_num_threads(threads_before)
            if hasattr(source, "close"):
                source.close()
    finally:
        dist.teardown(world, clean)


def _intra_op_threads(requested: int | None, source) -> int:
    """torch's threads for the fit: as requested, else the current setting less one core for the
    reading threads while Parquet is streamed locally (see FitOptions.threads)."""
    if requested is not None:
        return requested
    current = torch.get_num_threads()
    streams_locally = isinstance(source, ParquetSource) and source.scheduler is None
    return max(1, current - 1) if streams_locally else current


def _fit(model, space, source, opts: FitOptions, dtype, device, tracker, world, columns=None) -> Posterior:
    num_rows = source.num_rows
    check_model(model, space, {k: v[: min(3, num_rows)] for k, v in source.sample(3, opts.seed).items()}, dtype)
    batch = min(opts.batch_size or default_batch_size(num_rows), num_rows)
    fingerprints = fingerprint_of(model, source.fingerprint())
    ctx = FitContext(
        model=model, space=space, options=opts, num_rows=num_rows, dtype=dtype, device=device,
        eval_batch=_to(source.sample(opts.eval_rows, opts.seed + 11), device),
        warm_batch=source.sample(opts.warm_start_rows, opts.seed + 13) if opts.warm_start != "none" else None,
        rank=world.rank, world_size=world.world_size, world=world,
    )
    resume = _find_checkpoint(opts, world)
    if resume is not None:
        _check_compatible(resume[1], opts, fingerprints, world.world_size, resume[0])
    tracker = tracker or _make_tracker(opts, world, resume)
    stream = _stream(source, batch, opts.seed, device, opts, world)
    try:
        if resume is None:
            fam, note, warm = build_family(ctx)
            log.info("%s", note)
            eta = None
            if opts.lr == "auto":
                eta = search_stan_eta(ctx, fam, _stream(source, batch, opts.seed + 17, device, opts, world))
            anchor = None
            if warm and opts.control_variate and batch * world.world_size < num_rows:
                anchor = anchor_statistics(model, space, fam.frame_loc,
                                           source.chunks(rank=world.rank, world_size=world.world_size),
                                           reduce_sum=lambda t: dist.all_mean(t, world) * world.world_size)
            state = init_state(ctx, fam, note, eta, trainable=dist.wrap(fam, world), anchor=anchor)
        else:
            path, saved = resume
            fam = _family_like(saved, ctx)
            state = init_state(ctx, fam, saved["ranks"][0]["state"]["warm_start"], saved["ranks"][0]["state"]["eta"],
                               trainable=dist.wrap(fam, world))
            load_state_dict(state, saved["ranks"][world.rank]["state"], stream)
            log.info("resumed from %s at step %d", path, state.step)
        if resume is None:
            tracker.log_params(_run_params(opts, model, space, fingerprints, num_rows, world))
            tracker.set_tags({"svi.checkpoint_dir": os.path.abspath(opts.checkpoint_dir) if opts.checkpoint_dir else ""})
            job = Path(opts.checkpoint_dir or ".") / "job.yaml"
            if opts.checkpoint_dir and job.is_file():  # lets `svi resume <run id>` rebuild the job elsewhere
                tracker.log_artifact(str(job))
        checkpoint = _checkpointer(opts, fingerprints, world, tracker)
        result = train(ctx, state, stream, tracker, checkpoint)
        info = {
            "steps": result.steps, "converged": result.converged, "reason": result.reason,
            "warm_start": result.warm_start, "eta": result.eta, "nonfinite_steps": result.nonfinite_steps,
            "seconds": result.seconds, "num_rows": num_rows, "batch_size": batch,
            "dropped_rows": getattr(source, "dropped_rows", 0), "world_size": world.world_size,
            "fingerprints": fingerprints, "options": dataclasses.asdict(opts), "history": result.history,
            "run_id": tracker.run_id, "columns": dict(columns) if columns else None,
        }
        post = Posterior(model, space, result.family, info)
        if world.rank == 0:
            _log_outputs(post, tracker, opts)
        tracker.finish("FINISHED")
        return post
    except BaseException:
        tracker.finish("FAILED" if world.rank == 0 else "FINISHED")
        raise


# --- pieces --------------------------------------------------------------------------------------
def check_model(model: Model, space: ParamSpace, rows: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Call the model once with two particles on a few rows, checking shapes and keys."""
    z = space.initial_point(torch.float64).to(dtype)
    z = torch.stack([z, z + 0.01])
    theta, _ = space.constrain(z)
    try:
        check_model_outputs(model, theta, rows)
    except KeyError as e:
        raise ModelError(
            f"{model.name}.log_likelihood read batch key {e.args[0]!r}, which the data does not provide; "
            f"the data has keys {sorted(rows)}. Declare batch_keys on the model and map the key to columns."
        ) from None


def _stream(source, batch_size, seed, device, opts, world):
    kw = dict(rank=world.rank, world_size=world.world_size, device=device)
    if isinstance(source, ParquetSource):
        kw.update(shuffle_units=opts.shuffle_units, prefetch=opts.prefetch)
    return source.stream(batch_size, seed, **kw)


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _find_checkpoint(opts: FitOptions, world):
    if opts.resume is False:
        return None
    found = latest_checkpoint(opts.checkpoint_dir)
    if found is None and opts.resume is True:
        raise CheckpointError(f"resume=true but {opts.checkpoint_dir} holds no checkpoint; use resume=auto to start "
                              "fresh when there is none")
    return found


def _check_compatible(saved: Mapping, opts: FitOptions, fingerprints: Mapping, world_size: int, path) -> None:
    """Refuse a checkpoint from another model, data set, world size or option set."""
    problems = []
    for what in ("model", "data"):
        if saved["fingerprints"][what] != fingerprints[what]:
            problems.append(f"the {what} differs (fingerprint {saved['fingerprints'][what]} vs {fingerprints[what]})")
    if saved["world_size"] != world_size:
        problems.append(f"world size {saved['world_size']} vs {world_size}: resume with the same number of processes")
    old, new = saved["options"], dataclasses.asdict(opts)
    how_to_resume = {"resume", "force_resume", "checkpoint_dir"}  # these always differ on a resume
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in how_to_resume)
    unsafe = [k for k in differing if k not in SAFE_TO_CHANGE]
    if unsafe:
        problems.append("options differ: " + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in unsafe))
    elif differing and not opts.force_resume:
        problems.append("options differ: " + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing)
                        + " (safe to change: pass force_resume=true to accept)")
    if problems:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems))


def _family_like(saved: Mapping, ctx: FitContext):
    from svi.families import make_family

    st = saved["ranks"][0]["state"]["family"]
    fam = make_family(ctx.options.family, ctx.space.size, dtype=ctx.dtype, rank=ctx.options.rank)
    fam.load_state_dict(st)
    return fam.to(ctx.device)


def _checkpointer(opts: FitOptions, fingerprints, world, tracker):
    if not opts.checkpoint_dir:
        return None

    def checkpoint(state, stream, final: bool) -> None:
        mine = {"rank": world.rank, "state": state_dict(state, stream)}
        ranks = dist.gather_object(mine, world)  # rank 0 gets every rank's cursor and RNG state
        if world.rank == 0:
            payload = {"format": 1, "options": dataclasses.asdict(opts), "fingerprints": fingerprints,
                       "world_size": world.world_size, "run_id": tracker.run_id,
                       "ranks": sorted(ranks, key=lambda r: r["rank"])}
            path = save_checkpoint(opts.checkpoint_dir, state.step, payload, keep=opts.keep_checkpoints)
            tracker.commit()  # the metrics up to this checkpoint: a resume will not repeat them
            tracker.log_artifact(str(path), "checkpoints")
        dist.barrier(world)  # no rank runs past a checkpoint before it is on disk

    return checkpoint


RUN_ID_FILE = "mlflow_run_id"


def _make_tracker(opts: FitOptions, world, resume) -> Tracker:
    """MLflow on rank 0. A fit that resumes (or restarts under torchrun before its first
    checkpoint) continues the run recorded beside its checkpoints."""
    if not opts.tracking or world.rank != 0:
        return NullTracker()
    run_id = resume[1].get("run_id") if resume is not None else None
    marker = Path(opts.checkpoint_dir) / RUN_ID_FILE if opts.checkpoint_dir else None
    if run_id is None and marker is not None and opts.resume is not False and marker.is_file():
        run_id = marker.read_text().strip() or None
    tracker = MLflowTracker(opts.tracking_uri, opts.experiment, opts.run_name, run_id=run_id,
                            system_metrics=opts.system_metrics, spool_dir=opts.checkpoint_dir,
                            hold_metrics=bool(opts.checkpoint_dir))
    if marker is not None:
        atomic_write_text(marker, tracker.run_id)
    return tracker


def _run_params(opts, model, space, fingerprints, num_rows, world) -> dict:
    import dask

    import svi

    return {
        "options": dataclasses.asdict(opts),
        "model": {"class": model.spec()["class"], "params": {b.name: f"{list(b.shape)} {b.constraint!r}"
                                                             for b in space.blocks}},
        "fingerprint": fingerprints, "num_rows": num_rows, "world_size": world.world_size, "family": opts.family,
        "versions": {"svi": svi.__version__, "torch": torch.__version__, "dask": dask.__version__},
    }


def _log_outputs(post: Posterior, tracker: Tracker, opts: FitOptions) -> None:
    """Posterior, summary table, ELBO plot and config as run artifacts; the posterior registered
    in the model registry when asked."""
    if isinstance(tracker, NullTracker):
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from svi.posterior import save_mlflow_model

        save_mlflow_model(post, tmp / "posterior")
        tracker.log_artifact(str(tmp / "posterior"), "posterior")
        post.summary().to_csv(tmp / "summary.csv")
        tracker.log_artifact(str(tmp / "summary.csv"))
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(opts), indent=1, default=str))
        tracker.log_artifact(str(tmp / "config.json"))
        if post.info["history"]:
            _elbo_plot(post.info["history"], tmp / "elbo.png")
            tracker.log_artifact(str(tmp / "elbo.png"))
    if opts.register_model and isinstance(tracker, MLflowTracker):
        from svi.posterior import register_posterior

        register_posterior(tracker, opts.register_model)


def _elbo_plot(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO (window mean)")
    ax.set_title("svi fit")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
