"""Constraints a `Param` may carry.

Re-exports `torch.distributions.constraints` and adds the ones models need that
torch lacks. Bijections for them live in svi's own registry, `svi.transforms.biject_to`,
which falls back to torch's `biject_to` for the rest; torch's registry is left as it is.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.distributions.constraints import *  # noqa: F401,F403 (re-export is the point)
from torch.distributions.constraints import Constraint

__all__ = [name for name in dir(torch.distributions.constraints) if not name.startswith("_")]
__all__ += ["ordered_vector", "OrderedVector", "ConstraintSpecError", "to_spec", "from_spec", "from_repr"]


class OrderedVector(Constraint):
    """Real vectors with strictly increasing entries (Stan's ``ordered[K]``)."""

    is_discrete = False
    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        if value.shape[-1] < 2:
            return torch.isfinite(value).all(-1)
        increasing = (value[..., 1:] > value[..., :-1]).all(-1)
        return increasing & torch.isfinite(value).all(-1)

    def __repr__(self) -> str:
        return "OrderedVector()"


ordered_vector = OrderedVector()


# --- a fixed vocabulary, so saved posteriors describe constraints as data -------------------
# Each entry: name -> (constraint type, argument names). A posterior file names a constraint
# and its numeric arguments from this table; loading builds it from the table alone, so a file
# can never name code to run (README, "Threat model").
_VOCABULARY: dict[str, tuple[type, tuple[str, ...]]] = {
    "real": (type(torch.distributions.constraints.real), ()),
    "greater_than": (type(torch.distributions.constraints.positive), ("lower_bound",)),
    "greater_than_eq": (type(torch.distributions.constraints.nonnegative), ("lower_bound",)),
    "less_than": (type(torch.distributions.constraints.less_than(0.0)), ("upper_bound",)),
    "interval": (type(torch.distributions.constraints.unit_interval), ("lower_bound", "upper_bound")),
    "half_open_interval": (type(torch.distributions.constraints.half_open_interval(0.0, 1.0)),
                           ("lower_bound", "upper_bound")),
    "simplex": (type(torch.distributions.constraints.simplex), ()),
    "ordered_vector": (OrderedVector, ()),
    "corr_cholesky": (type(torch.distributions.constraints.corr_cholesky), ()),
    "lower_cholesky": (type(torch.distributions.constraints.lower_cholesky), ()),
    "positive_definite": (type(torch.distributions.constraints.positive_definite), ()),
}
_BY_TYPE = {cls: name for name, (cls, _) in _VOCABULARY.items()}


class ConstraintSpecError(ValueError):
    """A constraint outside the vocabulary, or a saved description that names none of it."""


def to_spec(constraint: Constraint) -> dict:
    """A JSON-able description of ``constraint`` from the fixed vocabulary.

    Example: ``to_spec(positive) == {"name": "greater_than", "lower_bound": 0.0}``;
    ``to_spec(real_vector) == {"name": "independent", "base": {"name": "real"}, "reinterpreted_batch_ndims": 1}``.

    Raises:
        ConstraintSpecError: for a constraint type outside the vocabulary (a user's own class).
    """
    if isinstance(constraint, torch.distributions.constraints.independent):
        return {"name": "independent", "base": to_spec(constraint.base_constraint),
                "reinterpreted_batch_ndims": int(constraint.reinterpreted_batch_ndims)}
    name = _BY_TYPE.get(type(constraint))
    if name is None:
        raise ConstraintSpecError(
            f"constraint {constraint!r} is not in svi's vocabulary ({', '.join(sorted(_VOCABULARY))}, independent), "
            "so a saved posterior cannot describe it without code")
    spec: dict = {"name": name}
    for arg in _VOCABULARY[name][1]:
        value = getattr(constraint, arg)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ConstraintSpecError(f"constraint {constraint!r}: a tensor {arg} cannot be saved; use a number")
            value = value.item()
        spec[arg] = float(value)
    return spec


def from_spec(spec: Any) -> Constraint:
    """Build the constraint that :func:`to_spec` described; only names of the vocabulary are accepted.

    Raises:
        ConstraintSpecError: an unknown name, a missing or non-numeric argument.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConstraintSpecError(f"a constraint must be described as {{'name': ...}}, got {spec!r}")
    name = spec["name"]
    if name == "independent":
        ndims = spec.get("reinterpreted_batch_ndims")
        if not isinstance(ndims, int) or isinstance(ndims, bool) or ndims < 0:
            raise ConstraintSpecError(f"constraint {spec!r}: reinterpreted_batch_ndims must be a non-negative int")
        return torch.distributions.constraints.independent(from_spec(spec.get("base")), ndims)
    if name not in _VOCABULARY:
        raise ConstraintSpecError(f"unknown constraint {name!r}; svi knows {', '.join(sorted(_VOCABULARY))}, independent")
    cls, args = _VOCABULARY[name]
    values = []
    for arg in args:
        value = spec.get(arg)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConstraintSpecError(f"constraint {name!r}: argument {arg!r} must be a number, got {value!r}")
        values.append(float(value))
    extra = set(spec) - {"name", *args}
    if extra:
        raise ConstraintSpecError(f"constraint {name!r} takes no argument {sorted(extra)[0]!r}")
    return cls(*values)


_REPR = re.compile(r"^(\w+)\((.*)\)$")
_REPR_NAMES = {"Real": "real", "GreaterThan": "greater_than", "GreaterThanEq": "greater_than_eq",
               "LessThan": "less_than", "Interval": "interval", "HalfOpenInterval": "half_open_interval",
               "Simplex": "simplex", "OrderedVector": "ordered_vector", "CorrCholesky": "corr_cholesky",
               "LowerCholesky": "lower_cholesky", "PositiveDefinite": "positive_definite"}


def from_repr(text: str) -> Constraint:
    """Parse the ``repr`` that posterior files of format 1 stored (``GreaterThan(lower_bound=0.0)``,
    ``IndependentConstraint(Real(), 1)``) into the vocabulary, without evaluating anything."""
    m = _REPR.match(text.strip())
    if m is None:
        raise ConstraintSpecError(f"cannot read constraint {text!r}")
    head, body = m.groups()
    if head == "IndependentConstraint":
        base, _, ndims = body.rpartition(",")
        if not ndims.strip().isdigit():
            raise ConstraintSpecError(f"cannot read constraint {text!r}")
        return torch.distributions.constraints.independent(from_repr(base), int(ndims))
    if head not in _REPR_NAMES:
        raise ConstraintSpecError(f"constraint {text!r} is not in svi's vocabulary")
    spec: dict = {"name": _REPR_NAMES[head]}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, value = part.partition("=")
        try:
            spec[key.strip()] = float(value)
        except ValueError:
            raise ConstraintSpecError(f"cannot read constraint {text!r}") from None
        if not eq:
            raise ConstraintSpecError(f"cannot read constraint {text!r}")
    return from_spec(spec)
