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
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from svi import distributed as dist
from svi import progress
from svi.callbacks import Callback
from svi.checkpoint import (JOB_FILE, Checkpointer, atomic_write_text, check_compatible, find_resume, is_file, join)
from svi.data.columns import DataError
from svi.data.parquet import ParquetSource
from svi.data.source import open_source, raise_if_unknown, standardize
from svi.elbo import anchor_statistics
from svi.families import resolve_family
from svi.fitrecord import FitRecord
from svi.model import Model, ModelError, check_model_outputs
from svi.options import FREE_TO_CHANGE, SAFE_TO_CHANGE, FitOptions
from svi.posterior import Posterior, load_posterior
from svi.tracking import Tracker, fit_status_tags, log_fit_outputs, log_fit_start, tracker_for_fit
from svi.trainer import (FitContext, TrainState, build_family, correct_warm_start, default_callbacks, family_advice,
                         init_state, load_state_dict, newton_start_follows, search_stan_eta, state_dict, train)
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
    family: str = "auto",
    *,
    columns: Mapping[str, Any] | None = None,
    tracker: Tracker | None = None,
    job_yaml: str | None = None,
    record: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    **options: Any,
) -> Posterior:
    """Fit ``model`` to ``data`` by ADVI and return the posterior.

    Args:
        model: an :class:`svi.Model`.
        data: a dict of arrays/tensors, a pandas DataFrame, or a Parquet path/glob/folder (or a list).
        family: ``auto`` (the default: ``structured`` for a model with group effects, which keeps
            each group effect's correlation with its population parameters, else ``meanfield``),
            ``meanfield``, ``fullrank``, ``lowrank`` or ``structured``.
        columns: {batch key: column | [columns] | pattern} for DataFrame or Parquet data.
        tracker: where metrics go (default: MLflow when ``tracking=True``, else nowhere).
        job_yaml: the job's config as YAML (``svi fit`` / ``svi resume``), written as ``job.yaml``
            beside the checkpoints once a checkpoint found there has been checked compatible, so a
            refused resume leaves the folder as it was.
        record: more JSON-able fit information for ``post.info`` (``svi fit`` records the job and
            its truth; keys that are not :class:`svi.fitrecord.FitRecord` fields go to its ``extra``),
            in place before the posterior is saved or logged.
        callbacks: more :class:`svi.callbacks.Callback` objects, told after every step (with the
            step's ELBO estimate and the schedule's action) and once the returned q is final, after
            the tracker's and the console's own.
        **options: any field of :class:`svi.options.FitOptions`.
    """
    began = time.perf_counter()
    opts = FitOptions.from_dict({"family": family, **options})
    dtype = getattr(torch, opts.dtype)
    world = dist.setup(opts.device)
    clean = False
    try:
        device = resolve_device(opts.device, world.local_rank)
        space = ParamSpace(model.get_params(), model.name)
        source = open_source(data, columns, model.batch_keys, model.integer_keys, dtype, opts, validate=model.validate)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(_intra_op_threads(opts.threads, source))
        try:
            if opts.standardize:
                raise_if_unknown(opts.standardize, model.batch_keys, model.integer_keys)
                stats = standardize(source, opts.standardize, dtype)
                if hasattr(model, "use_data_stats"):
                    model.use_data_stats(stats)
            record = {"data_path": _data_path(data), **(record or {})}
            post = _fit(model, space, source, opts, dtype, device, tracker, world, columns, job_yaml, record, began,
                        callbacks)
            clean = True
            return post
        finally:
            torch.set_num_threads(threads_before)
            if hasattr(source, "close"):
                source.close()
    finally:
        dist.teardown(world, clean)


def _heldout_rows(model: Model, opts: FitOptions, columns, dtype, device) -> dict[str, torch.Tensor] | None:
    """The rows kept out of the fit (``options.heldout``), read with the fit's columns and checks:
    all of them, or a uniform sample of ``heldout_rows``."""
    if opts.heldout is None:
        return None
    if opts.standardize:
        raise DataError(f"heldout={opts.heldout!r} with standardize={opts.standardize}: held-out rows are not "
                        "standardised with the fit's statistics yet; standardise the columns in the data instead")
    source = open_source(opts.heldout, columns, model.batch_keys, model.integer_keys, dtype,
                         opts.replace(row_filter=None), validate=model.validate)
    try:
        return _to(source.sample(opts.heldout_rows, opts.seed + 31), device)
    finally:
        if hasattr(source, "close"):
            source.close()


def _resolved_columns(source) -> dict[str, list[str]] | None:
    """{batch key: the data columns it read}, patterns expanded: what the logged model's input
    signature is built from (``x*`` alone does not say which columns a request must carry)."""
    resolved = getattr(source, "resolved", None)
    if not isinstance(resolved, Mapping):
        return None
    return {k: list(v[0]) if isinstance(v, tuple) else list(v) for k, v in resolved.items()}


def _data_path(data) -> str | None:
    """Where a fit's data live, so ``svi diagnose`` and ``svi loo`` find them again (None in memory)."""
    if not isinstance(data, (str, os.PathLike)):
        return None
    text = os.fspath(data)
    return text if "://" in text else os.path.abspath(text)


def _intra_op_threads(requested: int | None, source) -> int:
    """torch's threads for the fit: as requested, else the current setting less one core for the
    reading threads while Parquet is streamed locally (see FitOptions.threads)."""
    if requested is not None:
        return requested
    current = torch.get_num_threads()
    streams_locally = isinstance(source, ParquetSource) and source.scheduler is None
    return max(1, current - 1) if streams_locally else current


def _fit(model, space, source, opts: FitOptions, dtype, device, tracker, world, columns=None,
         job_yaml=None, record=None, began: float | None = None, callbacks=()) -> Posterior:
    # An error that one rank finds before training stops every rank with the same message, instead
    # of leaving the others to die in their first collective (see dist.agreed).
    with dist.agreed(world):
        num_rows = source.num_rows
        check_model(model, space, {k: v[: min(3, num_rows)] for k, v in source.sample(3, opts.seed).items()}, dtype)
        batch = min(opts.batch_size or default_batch_size(num_rows), num_rows)
        fingerprints = fingerprint_of(model, source.fingerprint())
        resume = find_resume(opts.checkpoint_dir, opts.resume, clean=world.rank == 0)
        if resume is not None:
            check_compatible(resume, opts.as_dict(), FitOptions().as_dict(), SAFE_TO_CHANGE, fingerprints,
                             world.world_size, FREE_TO_CHANGE)
        done = _finished_posterior(model, opts, resume) if resume is not None else None
        # only now the samples: a refused or finished resume reads no rows (a resumed fit still
        # reads the warm-start rows: a re-expansion of the control variate forms its Hessian there)
        ctx = None if done is not None else FitContext(
            model=model, space=space, options=opts, num_rows=num_rows, dtype=dtype, device=device,
            eval_batch=_to(source.sample(opts.eval_rows, opts.seed + 11), device),
            warm_batch=source.sample(opts.warm_start_rows, opts.seed + 13) if opts.warm_start != "none" else None,
            heldout_batch=_heldout_rows(model, opts, columns, dtype, device) if world.rank == 0 else None,
            batch_rows=batch, rank=world.rank, world_size=world.world_size, world=world,
            started=began or time.perf_counter(), reanchor=lambda z, leave=False: anchor_statistics(
                model, space, z, _full_pass(source, opts, world, leave),
                reduce_sum=lambda t: dist.all_sum(t, world)),
        )
    if done is not None:  # a finished fit run again: nothing to do, no new steps, no new MLflow run
        return done
    with dist.agreed(world):  # a round of its own: a peer's failed check never leaves rank 0's new run open
        tracker = tracker or tracker_for_fit(opts, world.rank, resume)
    if job_yaml and opts.checkpoint_dir and world.rank == 0:  # only now: a refused resume writes nothing
        atomic_write_text(join(opts.checkpoint_dir, JOB_FILE), job_yaml)
    stream = _stream(source, batch, opts.seed, device, opts, world)
    try:
        state = _start_state(ctx, source, batch, stream, resume)
        if resume is None or getattr(tracker, "created", False):  # a new run: also on a resume into one
            log_fit_start(tracker, opts, model, space, fingerprints, num_rows, world.world_size,
                          resolve_family(opts.family, space.group_layout()))
        checkpoint = _checkpointer(opts, fingerprints, world, tracker, space)
        result = train(ctx, state, stream, checkpoint=checkpoint,
                       callbacks=default_callbacks(ctx, state, tracker) + list(callbacks))
        # the k-hat first: the record is complete once, before it is saved or logged
        khat = _end_of_fit_khat(Posterior(model, space, result.family), source, opts) if world.rank == 0 else {}
        info = FitRecord.from_dict({
            "steps": result.steps, "converged": result.converged, "reason": result.reason,
            "stop_reason": result.stop_reason,
            "warm_start": result.warm_start, "eta": result.eta, "nonfinite_steps": result.nonfinite_steps,
            "seconds": result.seconds, "num_rows": num_rows, "batch_size": batch,
            "dropped_rows": getattr(source, "dropped_rows", 0), "world_size": world.world_size,
            "fingerprints": fingerprints, "options": dataclasses.asdict(opts), "history": result.history,
            "heldout_lpd": result.heldout,
            "run_id": tracker.run_id, "columns": dict(columns) if columns else None,
            "resolved_columns": _resolved_columns(source), **(record or {}), **khat,
        })
        post = Posterior(model, space, result.family, info)
        if world.rank == 0:
            if opts.checkpoint_dir:  # what a finished job run again hands back (_finished_posterior)
                post.save(join(opts.checkpoint_dir, FINISHED_POSTERIOR))
            tracker.set_tags(fit_status_tags(post.info))
            log_fit_outputs(post, tracker, opts)
        tracker.finish("FINISHED")
        return post
    except BaseException:
        tracker.finish("FAILED" if world.rank == 0 else "FINISHED")
        raise


def _start_state(ctx: FitContext, source, batch: int, stream, resume) -> TrainState:
    """The state a fit starts from, fresh or resumed along one path: the family (from the warm
    start, or rebuilt from the checkpoint), then the state around it, then, on a resume, the
    checkpoint's state loaded into it."""
    world = ctx.world
    if resume is None:
        family, note, eta, anchor = _fresh_start(ctx, source, batch)
    else:
        saved = resume[1]
        first = saved["ranks"][0]["state"]
        family, note, eta, anchor = _family_like(saved, ctx), first["warm_start"], first["eta"], None
    state = init_state(ctx, family, note, eta, trainable=dist.wrap(family, world), anchor=anchor)
    if resume is not None:
        load_state_dict(state, resume[1]["ranks"][world.rank]["state"], stream)
        log.info("resumed from %s at step %d", resume[0], state.step)
    return state


def _fresh_start(ctx: FitContext, source, batch: int):
    """(family, warm-start note, Stan's eta or None, the data control variate's anchor or None)
    for a fit that starts anew: the warm start, Stan's eta search when ``lr="auto"``, and the
    control variate's full-data pass when batches subsample the data."""
    world, opts = ctx.world, ctx.options
    family, note, warm = build_family(ctx)
    log.info("%s", note)
    eta = None
    if opts.lr == "auto":
        eta = search_stan_eta(ctx, family, _stream(source, batch, opts.seed + 17, ctx.device, opts, world))
    anchor = None
    if warm and opts.control_variate and batch * world.world_size < ctx.num_rows:
        started = time.perf_counter()
        anchor = ctx.reanchor(family.frame_loc, leave=True)  # a phase of its own: its bar stays
        if newton_start_follows(ctx):  # the warm start saw a sample
            anchor = correct_warm_start(ctx, family, anchor)
        if not progress.shown(opts.progress, world.rank):
            log.info("full-data pass for the control variate: %s rows in %.1f s", f"{ctx.num_rows:,}",
                     time.perf_counter() - started)
    return family, note, eta, anchor


# --- pieces --------------------------------------------------------------------------------------
def check_model(model: Model, space: ParamSpace, rows: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Call the model once with two particles on a few rows, checking shapes and keys."""
    z = space.initial_point(torch.float64).to(dtype)
    z = torch.stack([z, z + 0.01]).requires_grad_(True)
    theta, _ = space.constrain(z)
    try:
        check_model_outputs(model, theta, rows)
    except KeyError as e:
        raise ModelError(
            f"{model.name}.log_likelihood read batch key {e.args[0]!r}, which the data does not provide; "
            f"the data has keys {sorted(rows)}. Declare batch_keys on the model and map the key to columns."
        ) from None
    if not model.log_likelihood(theta, rows).requires_grad:
        # ADVI follows the gradient of the likelihood: without one the fit would return the prior
        raise ModelError(f"{model.name}.log_likelihood has no gradient with respect to the parameters: compute it "
                         "with torch operations on the parameter tensors (no .item(), .detach(), .numpy() or "
                         "torch.no_grad())")


def _full_pass(source, opts: FitOptions, world, leave: bool):
    """This rank's share of the rows for the data control variate's statistics, with a bar of the
    rows done when bars are shown (the one at the start stays, the re-anchoring ones during the
    fit vanish when done)."""
    chunks = source.chunks(rank=world.rank, world_size=world.world_size)
    # with several ranks rank 0 passes over its share, whose size the sources do not say
    total = source.num_rows if world.world_size == 1 else None
    return progress.counted(chunks, opts.progress, world.rank, "full-data pass", total, leave)


def _stream(source, batch_size, seed, device, opts, world):
    kw = dict(rank=world.rank, world_size=world.world_size, device=device)
    if isinstance(source, ParquetSource):
        kw.update(shuffle_units=opts.shuffle_units, prefetch=opts.prefetch)
    return source.stream(batch_size, seed, **kw)


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


FINISHED_POSTERIOR = "posterior"  # beside the checkpoints: the posterior of the fit that wrote them


def _finished_posterior(model: Model, opts: FitOptions, resume) -> Posterior | None:
    """The saved posterior when the newest checkpoint is the last one of a finished fit that these
    options would not continue (more ``max_steps`` continue a fit that ran out of them); else None."""
    path, saved = resume
    reason, step = saved.get("finished"), int(saved["ranks"][0]["state"]["step"])
    if not reason or (reason == "max_steps" and step < opts.max_steps):
        return None
    folder = join(opts.checkpoint_dir, FINISHED_POSTERIOR)
    if not is_file(join(folder, "posterior.json")):  # written by an older svi: resume as before
        return None
    post = Posterior.load(folder, model=model) if isinstance(folder, Path) else load_posterior(folder, model=model)
    if post.info.steps != step or post.info.fingerprints != saved.get("fingerprints"):
        return None  # saved by another fit (killed between its last checkpoint and this file): not this one's
    log.info("%s holds a finished fit (step %d, %s): nothing to do. resume=false starts a new fit; a fit that ran "
             "out of max_steps continues with a larger max_steps", opts.checkpoint_dir, step,
             "converged" if reason == "converged" else f"stopped: {reason}")
    return post


def _family_like(saved: Mapping, ctx: FitContext):
    from svi.families import make_family

    st = saved["ranks"][0]["state"]["family"]
    ctx.space.load_state_dict(saved.get("space", {}))  # before the family: its z means these coordinates
    fam = make_family(ctx.options.family, ctx.space.size, dtype=ctx.dtype, num_factors=ctx.options.rank,
                      layout=ctx.space.group_layout())
    fam.load_state_dict(st)
    return fam.to(ctx.device)


def _checkpointer(opts: FitOptions, fingerprints, world, tracker, space: ParamSpace):
    """``checkpoint(state, stream, finished)`` for the trainer, or None without a checkpoint folder."""
    if not opts.checkpoint_dir:
        return None

    def header() -> dict:
        return {"options": opts.as_dict(), "fingerprints": fingerprints, "world_size": world.world_size,
                "run_id": tracker.run_id,
                # the store of run_id: a resume against another store can say where the run is
                "tracking_uri": getattr(tracker, "tracking_uri", None),
                "space": space.state_dict()}  # the group effects' centring: the family's coordinates

    def saved(path) -> None:
        tracker.commit()  # the metrics up to this checkpoint: a resume will not repeat them
        if isinstance(path, Path):  # a remote folder is its own durable copy: the run's tag names it
            tracker.log_artifact(str(path), "checkpoints")

    writer = Checkpointer(opts.checkpoint_dir, opts.keep_checkpoints, header, world, saved)
    return lambda state, stream, finished: writer.save(state.step, state_dict(state, stream), finished)


_KHAT_ROW_BUDGET = 50_000_000  # rows x parameters of the end-of-fit k-hat (~10 s on 2 cores)
_KHAT_MIN_ROWS = 2_000


def _end_of_fit_khat(post: Posterior, source, opts: FitOptions) -> dict[str, Any]:
    """PSIS k-hat of q on ``opts.khat_rows`` rows, warned about above 0.7: ``{"khat", "khat_rows"}``
    for the fit's record ({} when ``khat_rows`` is 0)."""
    if not opts.khat_rows:
        return {}
    from svi.diagnostics import psis_on_rows

    started = time.perf_counter()
    # 1,000 draws x rows x (work per row ~ parameters): bound it as the model grows
    rows = min(opts.khat_rows, max(_KHAT_MIN_ROWS, _KHAT_ROW_BUDGET // post.space.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning below, with advice, instead of the diagnostic's own
        result = psis_on_rows(post, source, rows, seed=opts.seed + 31, progress=opts.progress)
    khat = {"khat": result.khat, "khat_rows": min(rows, source.num_rows)}
    log.info("PSIS k-hat %.2f on %s rows in %.1f s", result.khat, f"{khat['khat_rows']:,}",
             time.perf_counter() - started)
    if result.khat > 0.7:
        advice = family_advice(post.model, post.space, post.family)
        warnings.warn(f"svi: PSIS k-hat = {result.khat:.2f} > 0.7: q is far from the posterior, do not trust its "
                      "draws" + (f". Try {advice}" if advice else "; the posterior is not close to a Gaussian in "
                                 "svi's coordinates: look for weakly identified parameters in the summary, or "
                                 "give them more informative priors"), RuntimeWarning, stacklevel=3)
    return khat
