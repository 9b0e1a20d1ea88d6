"""One entry point from whatever the user passed as ``data`` to a data source."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from svi.data.columns import DataError
from svi.data.memory import InMemoryData
from svi.data.parquet import ParquetSource, is_parquet_input

__all__ = ["open_source"]


def open_source(data: Any, columns: Mapping[str, Any] | None, keys, integer_keys, dtype: torch.dtype, options):
    """An :class:`InMemoryData` for arrays and DataFrames; for Parquet, a :class:`ParquetSource`,
    or the whole data set in memory when it has at most ``options.in_memory_rows`` rows."""
    if not is_parquet_input(data):
        return InMemoryData(data, columns, keys=keys, integer_keys=integer_keys, dtype=dtype,
                            nan_policy=options.nan_policy)
    source = ParquetSource(data, columns, keys=keys, integer_keys=integer_keys, dtype=dtype,
                           nan_policy=options.nan_policy, row_filter=options.row_filter, scheduler=options.scheduler,
                           storage_options=options.storage_options, cache_dir=options.cache_dir)
    if source.num_rows > options.in_memory_rows:
        return source
    parts = list(source.chunks())
    source.close()
    if not parts:
        raise DataError("the Parquet data has no rows")
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    memory = InMemoryData(tensors, keys=list(tensors), integer_keys=integer_keys, dtype=dtype)
    memory.dropped_rows = source.dropped_rows
    memory.fingerprint = source.fingerprint  # identify the files, not a hash of their content
    return memory
