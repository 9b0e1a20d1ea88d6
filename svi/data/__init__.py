"""Data sources: in-memory arrays and (see :mod:`svi.data.parquet`) Parquet files streamed with Dask."""

from svi.data.columns import DataError, resolve_columns
from svi.data.memory import InMemoryData

__all__ = ["DataError", "InMemoryData", "resolve_columns"]
