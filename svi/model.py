"""The user's contract: a model is a set of constrained parameters, a log prior
and a per-row log-likelihood, both vectorised over S particles.

Example:
    >>> class Logistic(svi.Model):
    ...     batch_keys = ("x", "y")
    ...     def __init__(self, n_features):
    ...         self.params = {"w": svi.Param((n_features,)), "b": svi.Param(())}
    ...     def log_prior(self, p):            # p["w"]: (S, D) -> (S,)
    ...         return Normal(0, 1).log_prob(p["w"]).sum(-1) + Normal(0, 5).log_prob(p["b"])
    ...     def log_likelihood(self, p, batch):  # -> (S, B)
    ...         logits = batch["x"] @ p["w"].T + p["b"]
    ...         return Bernoulli(logits=logits.T).log_prob(batch["y"])

The engine, never the model, scales the likelihood by N/B (DESIGN.md), so the
same ``log_likelihood`` serves the subsampled ELBO, PSIS diagnostics and
prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.distributions import constraints as _torch_constraints
from torch.distributions.constraints import Constraint

__all__ = ["Param", "Model", "ModelError", "check_model_outputs"]


class ModelError(ValueError):
    """A model broke its contract (shapes, keys, parameters)."""


@dataclass(frozen=True)
class Param:
    """One model parameter.

    Args:
        shape: shape of one draw of the parameter in constrained space; ``()`` for a scalar.
        constraint: a ``torch.distributions.constraints`` object (or one from ``svi.constraints``).
        init: optional initial value in constrained space (a number or array of ``shape``).
            Without it the engine starts from the unconstrained zero (Stan's ``init=0``).
        loc, scale: declare a group effect: the parameter is ``theta[g] ~ Normal(loc, scale)`` in
            the model's prior, with ``loc`` and ``scale`` the names of other (non-group) parameters
            or numbers, broadcast against ``shape`` from the right (``mu`` of shape ``()`` for
            intercepts of shape ``(G,)``; ``w`` and ``tau_w`` of shape ``(D,)`` for slopes of shape
            ``(G, D)``). The first axis indexes groups and each data row touches one group. The
            model writes the prior in this natural (centred) form and reads the natural values;
            svi chooses per element how far to centre the coordinates it optimises in (see
            :mod:`svi.centering`), so one model suits groups of 8 rows and of 8,000.
        centering: for a group effect: ``"auto"`` (chosen from the data after the warm start), or a
            fixed number in [0, 1] for every element (1 centred, 0 non-centred).
    """

    shape: tuple[int, ...] = ()
    constraint: Constraint = _torch_constraints.real
    init: Any = None
    loc: str | float | None = None
    scale: str | float | None = None
    centering: str | float = "auto"

    def __post_init__(self):
        shape = (self.shape,) if isinstance(self.shape, int) else tuple(self.shape)
        if any((not isinstance(d, int)) or d < 1 for d in shape):
            raise ModelError(f"Param shape must be a tuple of positive ints, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.constraint, Constraint):
            raise ModelError(
                f"Param constraint must be a torch.distributions constraint object, got {self.constraint!r}"
            )
        if (self.loc is None) != (self.scale is None):
            raise ModelError("a group effect Param needs both loc and scale (names of parameters or numbers)")
        if self.is_group_effect:
            if type(self.constraint) is not type(_torch_constraints.real):
                raise ModelError(f"a group effect Param is real-valued; got constraint {self.constraint!r}")
            if not shape:
                raise ModelError("a group effect Param needs a group axis first in its shape, e.g. (n_groups,)")
            for what, v in (("loc", self.loc), ("scale", self.scale)):
                if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                    raise ModelError(f"group effect {what} must be a parameter name or a number, got {v!r}")
            if not isinstance(self.scale, str) and not self.scale > 0:
                raise ModelError(f"group effect scale must be positive, got {self.scale!r}")
        c = self.centering
        if not (c == "auto" or (isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 <= c <= 1.0)):
            raise ModelError(f"Param centering must be 'auto' or a number in [0, 1], got {c!r}")

    @property
    def is_group_effect(self) -> bool:
        return self.loc is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Model:
    """Base class of every model.

    Subclasses set ``self.params`` (a dict of name -> :class:`Param`) in ``__init__``
    and implement :meth:`log_prior` and :meth:`log_likelihood`. ``batch_keys``
    names the data keys ``log_likelihood`` reads; ``None`` means "whatever the
    data provides". The constructor arguments are recorded automatically (no
    ``super().__init__()`` needed) so a saved posterior can rebuild the model.
    """

    params: dict[str, Param]
    batch_keys: tuple[str, ...] | None = None
    #: batch keys holding integer data (group ids, counts kept as integers)
    integer_keys: tuple[str, ...] = ()

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj._init_args = (args, dict(kwargs))
        return obj

    # --- the contract -----------------------------------------------------------------
    def log_prior(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Log prior density of constrained draws ``p[name]: (S, *shape)``; returns ``(S,)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement log_prior(p)")

    def log_likelihood(self, p: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Log-likelihood of each row of ``batch``, unscaled; returns ``(S, B)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement log_likelihood(p, batch)")

    def validate(self, batch: Mapping[str, torch.Tensor]) -> Mapping[str, tuple[torch.Tensor, str]]:
        """Say which data values this model cannot take (optional; the default checks nothing).

        The engine calls it on raw rows before any step sees them: once on in-memory data, and
        on every Parquet row group as it is read (after the NaN check, before standardisation),
        and stops with an error naming the file, row group, column, count and an example value.
        Keep it vectorised: one elementwise pass per key.

        Args:
            batch: ``{key: tensor}`` with rows first; integer keys are int64, the rest floating.
                A key may be absent (e.g. no ``y`` when predicting): check only keys present.

        Returns:
            ``{key: (invalid, rule)}``: ``invalid`` a bool tensor of ``batch[key]``'s shape (or
            ``(B,)`` for whole rows), True where a value is not allowed; ``rule`` a phrase saying
            what is allowed, e.g. ``"LogisticRegression: labels y must be 0 or 1"``.

        Example:
            >>> def validate(self, batch):
            ...     y = batch.get("y")
            ...     return {} if y is None else {"y": ((y != 0) & (y != 1), "labels y must be 0 or 1")}
        """
        return {}

    def initial_values(self, batch: Mapping[str, torch.Tensor],
                       generator: torch.Generator | None = None) -> Mapping[str, torch.Tensor]:
        """Starting values read off the data (optional; the default reads none).

        The engine calls it once, before the warm start, with a uniform sample of rows (the
        warm-start rows, else the evaluation rows), and starts from the returned constrained
        values instead of ``Param.init`` / the unconstrained zero. For models whose symmetric
        start is a saddle point (mixtures) or whose scale no fixed start suits.

        Returns:
            ``{name: value of the Param's shape}`` for any subset of the parameters.
        """
        return {}

    def relabel(self, p: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Put exchangeable parts of each draw ``p[name]: (S, *shape)`` in a canonical order
        (optional; the default is the identity). Applied to every posterior draw, so summaries
        of models with label switching (mixtures) are reported in one labelling; the log
        density must be invariant to it."""
        return p

    # --- helpers the engine uses --------------------------------------------------------
    @property
    def name(self) -> str:
        return type(self).__name__

    def spec(self) -> dict:
        """JSON-able description: class path, constructor args, parameter shapes and constraints."""
        args, kwargs = getattr(self, "_init_args", ((), {}))
        return {
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "args": [_jsonable(a) for a in args],
            "kwargs": {k: _jsonable(v) for k, v in kwargs.items()},
            "params": {
                n: {"shape": list(p.shape), "constraint": repr(p.constraint),
                    **({"group": {"loc": p.loc, "scale": p.scale, "centering": p.centering}}
                       if p.is_group_effect else {})}
                for n, p in self.get_params().items()
            },
            "batch_keys": list(self.batch_keys) if self.batch_keys is not None else None,
        }

    def get_params(self) -> dict[str, Param]:
        params = getattr(self, "params", None)
        if not isinstance(params, Mapping) or not params:
            raise ModelError(f"{self.name}: set self.params to a non-empty dict of name -> svi.Param in __init__")
        for n, p in params.items():
            if not isinstance(p, Param):
                raise ModelError(f"{self.name}: params[{n!r}] must be an svi.Param, got {type(p).__name__}")
        return dict(params)


def _jsonable(v):
    """A JSON-able copy of ``v``: containers recursed, arrays and tensors as lists, others as repr."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if hasattr(v, "tolist"):
        return v.tolist()
    return repr(v)


def check_model_outputs(model: Model, draws: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
    """Call the model once on ``S`` draws and ``B`` rows and check every shape.

    Raises:
        ModelError: naming the model, the method, and expected versus actual shape.
    """
    S = next(iter(draws.values())).shape[0]
    B = next(iter(batch.values())).shape[0] if batch else 0
    lp = model.log_prior(draws)
    if not isinstance(lp, torch.Tensor) or tuple(lp.shape) != (S,):
        raise ModelError(
            f"{model.name}.log_prior returned shape {_shape(lp)}; expected ({S},): one value per particle. "
            "Sum over each parameter's own dimensions, e.g. .sum(-1) for a vector."
        )
    ll = model.log_likelihood(draws, batch)
    if not isinstance(ll, torch.Tensor) or tuple(ll.shape) != (S, B):
        raise ModelError(
            f"{model.name}.log_likelihood returned shape {_shape(ll)}; expected ({S}, {B}) = "
            "(particles, rows): one unscaled log-density per particle and row."
        )
    for what, t in (("log_prior", lp), ("log_likelihood", ll)):
        if not torch.is_floating_point(t):
            raise ModelError(f"{model.name}.{what} returned dtype {t.dtype}; expected a floating-point tensor")


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else f"a {type(x).__name__}, not a tensor"
