"""Mapping batch keys to columns.

A key takes one column (``"y"``: a (B,) tensor), a list of columns or a glob
pattern (``["x1", "x2"]`` or ``"x*"``: a (B, D) matrix). A list keeps its order;
a pattern expands in the order the columns appear in the data (the Parquet
schema, or the DataFrame), so the matrix layout is stable across files.
"""

from __future__ import annotations

import fnmatch
from typing import Mapping, Sequence

__all__ = ["DataError", "resolve_columns", "is_pattern"]


class DataError(ValueError):
    """Bad input data: names the file, the column or key, and says what to do."""


def is_pattern(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def resolve_columns(
    mapping: Mapping[str, str | Sequence[str]], available: Sequence[str], where: str = "the data"
) -> dict[str, tuple[list[str], bool]]:
    """Resolve ``{key: column | [columns] | pattern}`` against the available column names.

    Returns:
        ``{key: (columns, is_matrix)}``; ``is_matrix`` is False for a key given one plain column name.

    Raises:
        DataError: naming the key, the missing column or pattern, and ``where``.
    """
    available = list(available)
    present = set(available)
    out = {}
    for key, spec in mapping.items():
        if isinstance(spec, str):
            if is_pattern(spec):
                cols = [c for c in available if fnmatch.fnmatchcase(c, spec)]
                if not cols:
                    raise DataError(f"key {key!r}: pattern {spec!r} matches no column of {where}; columns are {available}")
                out[key] = (cols, True)
                continue
            cols, matrix = [spec], False
        else:
            cols, matrix = list(spec), True
            if not cols:
                raise DataError(f"key {key!r}: an empty column list")
        missing = [c for c in cols if c not in present]
        if missing:
            raise DataError(
                f"key {key!r}: column {missing[0]!r} is missing from {where}; columns are {available}. "
                "Fix the columns mapping or the data."
            )
        out[key] = (cols, matrix)
    return out
