"""One entry point from whatever the user passed as ``data`` to a data source."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from svi.data.columns import DataError
from svi.data.memory import InMemoryData
from svi.data.parquet import ParquetSource, is_parquet_input

__all__ = ["open_source", "standardize"]


def open_source(data: Any, columns: Mapping[str, Any] | None, keys, integer_keys, dtype: torch.dtype, options,
                validate=None):
    """An :class:`InMemoryData` for arrays and DataFrames; for Parquet, a :class:`ParquetSource`,
    or the whole data set in memory when it has at most ``options.in_memory_rows`` rows.

    ``validate`` is the model's value check (:meth:`svi.Model.validate`): run on all rows of
    in-memory data at once, and on every Parquet row group as it is read."""
    if not is_parquet_input(data):
        return InMemoryData(data, columns, keys=keys, integer_keys=integer_keys, dtype=dtype,
                            nan_policy=options.nan_policy, validate=validate)
    if options.standardize:
        raise_if_unknown(options.standardize, keys, integer_keys)
    source = ParquetSource(data, columns, keys=keys, integer_keys=integer_keys, dtype=dtype,
                           nan_policy=options.nan_policy, row_filter=options.row_filter, scheduler=options.scheduler,
                           storage_options=options.storage_options, cache_dir=options.cache_dir, validate=validate)
    if source.num_rows > options.in_memory_rows:
        return source
    parts = list(source.chunks())
    source.close()
    if not parts:
        raise DataError("the Parquet data has no rows")
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    memory = InMemoryData(tensors, keys=list(tensors), integer_keys=integer_keys, dtype=dtype)  # validated as read
    memory.dropped_rows = source.dropped_rows
    memory.resolved = source.resolved
    memory.fingerprint = source.fingerprint  # identify the files, not a hash of their content
    return memory


def raise_if_unknown(standardize, keys, integer_keys) -> None:
    for key in standardize:
        if keys is not None and key not in keys:
            raise DataError(f"standardize names key {key!r}, which the model does not read; it reads {list(keys)}")
        if key in integer_keys:
            raise DataError(f"standardize names key {key!r}, which holds integer ids; standardise float keys only")


def standardize(source, keys, dtype) -> dict:
    """Centre and scale the given keys by full-data column means and sds (one Dask pass for
    Parquet, cached), so that batches arrive standardised; returns the statistics used.

    Models may read the statistics through an optional ``use_data_stats(stats)`` method.
    """
    from svi.data.jobs import data_stats

    if isinstance(source, ParquetSource):
        stats = data_stats(source)
        by_key = {}
        for key in keys:
            cols, _ = source.resolved[key]
            mean = torch.tensor([stats["columns"][c]["mean"] for c in cols], dtype=dtype)
            sd = torch.tensor([stats["columns"][c]["sd"] or 1.0 for c in cols], dtype=dtype)
            by_key[key] = (mean, sd) if source.resolved[key][1] else (mean[0], sd[0])
        source.standardizers = by_key
        return stats
    stats = {"columns": {}}
    for key in keys:
        t = source.tensors[key].double()
        mean, sd = t.mean(0), t.std(0)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        source.tensors[key] = ((t - mean) / sd).to(source.tensors[key].dtype)
        stats["columns"][key] = {"mean": mean.tolist(), "sd": sd.tolist()}
    return stats
