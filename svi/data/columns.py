"""Mapping batch keys to columns.

A key takes one column (``"y"``: a (B,) tensor), a list of columns or a glob
pattern (``["x1", "x2"]`` or ``"x*"``: a (B, D) matrix). A list keeps its order;
a pattern expands in the order the columns appear in the data (the Parquet
schema, or the DataFrame), so the matrix layout is stable across files.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["DataError", "resolve_columns", "is_pattern", "check_values"]


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


def check_values(validate: Callable[[Mapping[str, torch.Tensor]], Mapping[str, Any]] | None,
                 batch: Mapping[str, torch.Tensor], where: str,
                 columns: Mapping[str, Sequence[str]] | None = None) -> None:
    """Run a model's ``validate`` hook (see :meth:`svi.Model.validate`) on raw rows; raise on the
    first key holding values the model does not allow.

    Args:
        validate: the hook, ``batch -> {key: (invalid mask, rule)}``; ``None`` checks nothing.
        batch: ``{key: tensor}`` as read, before standardisation.
        where: where the rows come from, e.g. ``"file a.parquet, row group 3"`` or ``"the DataFrame"``.
        columns: ``{key: [column names]}`` for data with named columns; other keys are named as keys.

    Raises:
        DataError: naming ``where``, the column (or key), how many values break the rule, one of
            them, and the rule.
        ModelError: the hook returned something other than masks of the batch's shapes.
    """
    if validate is None:
        return
    checks = validate(batch)
    for key, item in (checks or {}).items():
        if key not in batch:  # a hook may describe keys this batch lacks (e.g. y when predicting)
            continue
        value = batch[key]
        invalid, rule = _mask_and_rule(validate, key, item, value)
        if not bool(invalid.any()):
            continue
        names = list(columns[key]) if columns and key in columns else None
        if invalid.dim() == 2:  # elementwise over a matrix key: name the first column at fault
            per_column = invalid.sum(0)
            j = int(torch.nonzero(per_column)[0])
            count, row = int(per_column[j]), int(torch.nonzero(invalid[:, j])[0])
            example = _format(value[row, j])
            subject = (f"column {names[j]!r} (batch key {key!r})" if names else f"key {key!r} (column {j})")
            others = int(invalid.sum()) - count
            also = f" (and {others} more in other columns of batch key {key!r})" if others else ""
            what = "values"
        else:
            count, row = int(invalid.sum()), int(torch.nonzero(invalid)[0])
            if value.dim() == 1:
                example = _format(value[row])
                what = "values"
            else:
                example = "row [" + ", ".join(_format(v) for v in value[row]) + "]"
                what = "rows"
            if names and len(names) == 1:
                subject = f"column {names[0]!r}" + (f" (batch key {key!r})" if names[0] != key else "")
            elif names:
                subject = f"columns {names} (batch key {key!r})"
            else:
                subject = f"key {key!r}"
            also = ""
        noun = what if count != 1 else what[:-1]
        raise DataError(f"{where}: {subject} has {count} {noun} the model does not allow{also} (e.g. {example}): "
                        f"{rule}. Correct or remove those rows before fitting")


def _mask_and_rule(validate, key, item, value: torch.Tensor) -> tuple[torch.Tensor, str]:
    from svi.model import ModelError  # the model's own error: the hook, not the data, is at fault

    owner = getattr(validate, "__self__", None)
    name = f"{type(owner).__name__}.validate" if owner is not None else getattr(validate, "__qualname__", "validate")
    try:
        invalid, rule = item
    except (TypeError, ValueError):
        raise ModelError(f"{name} returned {type(item).__name__} for key {key!r}; expected a pair "
                         "(bool mask of invalid values, rule)") from None
    invalid = torch.as_tensor(invalid)
    if invalid.dtype != torch.bool or tuple(invalid.shape) not in (tuple(value.shape), tuple(value.shape[:1])):
        rows = f" (or {tuple(value.shape[:1])} for whole rows)" if value.dim() > 1 else ""
        raise ModelError(f"{name} returned for key {key!r} a {invalid.dtype} mask of shape {tuple(invalid.shape)}; "
                         f"expected a bool mask of shape {tuple(value.shape)}{rows}")
    return invalid, str(rule)


def _format(v: torch.Tensor) -> str:
    v = v.item()
    return str(v) if isinstance(v, int) else f"{v:.6g}"
