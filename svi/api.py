"""``svi.fit``: data and a model in, a :class:`~svi.posterior.Posterior` out."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import torch

from svi.data.parquet import ParquetSource
from svi.data.source import open_source, raise_if_unknown, standardize
from svi.elbo import anchor_statistics
from svi.model import Model, ModelError, check_model_outputs
from svi.options import FitOptions
from svi.posterior import Posterior
from svi.tracking import Tracker
from svi.trainer import FitContext, build_family, init_state, search_stan_eta, train
from svi.transforms import ParamSpace

__all__ = ["fit", "resolve_device", "default_batch_size"]

log = logging.getLogger("svi")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} asked for CUDA, but torch.cuda.is_available() is False on this machine")
    return dev


def default_batch_size(num_rows: int) -> int:
    """All rows up to 10,000 (no subsampling noise), else 1,024 rows a step."""
    return num_rows if num_rows <= 10_000 else 1024


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
        data: a dict of arrays/tensors, a pandas DataFrame, or a Parquet path/glob.
        family: ``meanfield``, ``fullrank`` or ``lowrank``.
        columns: {batch key: column | [columns] | pattern} for DataFrame or Parquet data.
        tracker: where metrics go (default: nowhere).
        **options: any field of :class:`svi.options.FitOptions`.
    """
    opts = FitOptions.from_dict({"family": family, **options})
    dtype = getattr(torch, opts.dtype)
    device = resolve_device(opts.device)
    space = ParamSpace(model.get_params(), model.name)
    source = open_source(data, columns, model.batch_keys, model.integer_keys, dtype, opts)
    try:
        if opts.standardize:
            raise_if_unknown(opts.standardize, model.batch_keys, model.integer_keys)
            stats = standardize(source, opts.standardize, dtype)
            if hasattr(model, "use_data_stats"):
                model.use_data_stats(stats)
        return _fit(model, space, source, opts, dtype, device, tracker)
    finally:
        if hasattr(source, "close"):
            source.close()


def _fit(model, space, source, opts, dtype, device, tracker) -> Posterior:
    num_rows = source.num_rows
    check_model(model, space, {k: v[: min(3, num_rows)] for k, v in source.sample(3, opts.seed).items()}, dtype)
    batch = min(opts.batch_size or default_batch_size(num_rows), num_rows)
    ctx = FitContext(
        model=model, space=space, options=opts, num_rows=num_rows, dtype=dtype, device=device,
        eval_batch=_to(source.sample(opts.eval_rows, opts.seed + 11), device),
        warm_batch=source.sample(opts.warm_start_rows, opts.seed + 13) if opts.warm_start != "none" else None,
    )
    fam, note, warm = build_family(ctx)
    log.info("%s", note)
    eta = None
    if opts.lr == "auto":
        eta = search_stan_eta(ctx, fam, _stream(source, batch, opts.seed + 17, device, opts))
    anchor = None
    if warm and opts.control_variate and batch < num_rows:
        anchor = anchor_statistics(model, space, fam.frame_loc, source.chunks())
    state = init_state(ctx, fam, note, eta, warm_started=warm, anchor=anchor)
    result = train(ctx, state, _stream(source, batch, opts.seed, device, opts), tracker)
    info = {
        "steps": result.steps, "converged": result.converged, "reason": result.reason,
        "warm_start": result.warm_start, "eta": result.eta, "nonfinite_steps": result.nonfinite_steps,
        "seconds": result.seconds, "num_rows": num_rows, "batch_size": batch, "dropped_rows": source.dropped_rows,
        "options": dataclasses.asdict(opts), "history": result.history,
    }
    return Posterior(model, space, result.family, info)


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


def _stream(source, batch_size, seed, device, opts):
    if isinstance(source, ParquetSource):
        return source.stream(batch_size, seed, device=device, shuffle_units=opts.shuffle_units, prefetch=opts.prefetch)
    return source.stream(batch_size, seed, device=device)


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
