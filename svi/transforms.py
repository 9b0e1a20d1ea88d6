"""Constrained parameters <-> one unconstrained vector z of size K.

Every constraint maps to R^n through ``torch.distributions.biject_to``
(Kucukelbir et al., "Automatic Differentiation Variational Inference", JMLR 2017,
section 2.3). Bijections torch lacks are registered here into torch's own
registry: ordered vectors, ``lower_cholesky`` and ``positive_definite``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import (
    AffineTransform,
    ComposeTransform,
    ExpTransform,
    Transform,
)

from svi import constraints as svi_constraints
from svi.model import ModelError, Param

__all__ = [
    "OrderedTransform",
    "LowerCholeskyFillTransform",
    "CholeskyOuterTransform",
    "ParamSpace",
    "ParamBlock",
    "element_names",
]


class OrderedTransform(Transform):
    """R^D -> increasing vectors: y_1 = x_1, y_k = y_{k-1} + exp(x_k) (Stan reference manual, "Ordered vector").

    log|det J| = sum_{k>=2} x_k.
    """

    domain = constraints.real_vector
    codomain = svi_constraints.ordered_vector
    bijective = True

    def __eq__(self, other):
        return isinstance(other, OrderedTransform)

    def _call(self, x):
        head = x[..., :1]
        return torch.cat([head, head + torch.cumsum(torch.exp(x[..., 1:]), dim=-1)], dim=-1)

    def _inverse(self, y):
        return torch.cat([y[..., :1], torch.log(y[..., 1:] - y[..., :-1])], dim=-1)

    def log_abs_det_jacobian(self, x, y):
        return x[..., 1:].sum(-1)


def _tril_size_to_dim(n: int) -> int:
    d = int(round((math.sqrt(8 * n + 1) - 1) / 2))
    if d * (d + 1) // 2 != n:
        raise ValueError(f"{n} is not a triangular number, so it cannot fill a lower-triangular matrix")
    return d


class LowerCholeskyFillTransform(Transform):
    """R^{D(D+1)/2} -> lower-triangular D x D with positive diagonal.

    Fills the lower triangle row by row (``torch.tril_indices`` order) and takes
    exp of the diagonal (Stan reference manual, "Cholesky factors of covariance
    matrices"); log|det J| = sum of the raw diagonal entries.
    """

    domain = constraints.real_vector
    codomain = constraints.lower_cholesky
    bijective = True

    def __eq__(self, other):
        return isinstance(other, LowerCholeskyFillTransform)

    def _call(self, x):
        d = _tril_size_to_dim(x.shape[-1])
        rows, cols = torch.tril_indices(d, d, device=x.device)
        raw = x.new_zeros(x.shape[:-1] + (d, d))
        raw[..., rows, cols] = x
        diag = torch.diagonal(raw, dim1=-2, dim2=-1)
        return raw - torch.diag_embed(diag) + torch.diag_embed(diag.exp())

    def _inverse(self, y):
        d = y.shape[-1]
        rows, cols = torch.tril_indices(d, d, device=y.device)
        raw = torch.tril(y) - torch.diag_embed(torch.diagonal(y, dim1=-2, dim2=-1))
        raw = raw + torch.diag_embed(torch.diagonal(y, dim1=-2, dim2=-1).log())
        return raw[..., rows, cols]

    def log_abs_det_jacobian(self, x, y):
        return torch.diagonal(y, dim1=-2, dim2=-1).log().sum(-1)

    def forward_shape(self, shape):
        return shape[:-1] + (_tril_size_to_dim(shape[-1]),) * 2

    def inverse_shape(self, shape):
        d = shape[-1]
        return shape[:-2] + (d * (d + 1) // 2,)


class CholeskyOuterTransform(Transform):
    """Lower Cholesky factor L -> positive-definite L L^T.

    log|det J| = D log 2 + sum_k (D - k + 1) log L_kk, with respect to the lower
    triangle of the output (Stan reference manual, "Covariance matrices").
    """

    domain = constraints.lower_cholesky
    codomain = constraints.positive_definite
    bijective = True

    def __eq__(self, other):
        return isinstance(other, CholeskyOuterTransform)

    def _call(self, x):
        return x @ x.transpose(-1, -2)

    def _inverse(self, y):
        return torch.linalg.cholesky(y)

    def log_abs_det_jacobian(self, x, y):
        d = x.shape[-1]
        powers = torch.arange(d, 0, -1, dtype=x.dtype, device=x.device)
        return d * math.log(2.0) + (powers * torch.diagonal(x, dim1=-2, dim2=-1).log()).sum(-1)


# --- registrations into torch's registry ---------------------------------------------------
@biject_to.register(svi_constraints.OrderedVector)
def _ordered(constraint):
    return OrderedTransform()


@biject_to.register(type(constraints.lower_cholesky))
def _lower_cholesky(constraint):
    return LowerCholeskyFillTransform()


@biject_to.register(type(constraints.positive_definite))
def _positive_definite(constraint):
    return ComposeTransform([LowerCholeskyFillTransform(), CholeskyOuterTransform()])


_torch_greater_than = biject_to._registry[type(constraints.positive)]


@biject_to.register(type(constraints.positive))
def _greater_than(constraint):
    # torch composes exp with an affine shift even for a zero lower bound; the plain
    # exp is the same bijection with one op fewer on every step.
    if isinstance(constraint.lower_bound, (int, float)) and constraint.lower_bound == 0:
        return ExpTransform()
    return _torch_greater_than(constraint)


# --- the flat unconstrained space --------------------------------------------------------
def _is_identity(t: Transform) -> bool:
    if isinstance(t, ComposeTransform):
        return all(_is_identity(p) for p in t.parts)
    if type(t).__name__ == "IndependentTransform":
        return _is_identity(t.base_transform)
    if isinstance(t, AffineTransform):
        return isinstance(t.loc, (int, float)) and isinstance(t.scale, (int, float)) and t.loc == 0 and t.scale == 1
    return False


@dataclass(frozen=True)
class ParamBlock:
    """Where one parameter lives in z and how it maps to constrained space."""

    name: str
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]
    offset: int
    size: int
    transform: Transform
    identity: bool
    constraint: constraints.Constraint


class ParamSpace:
    """The model's parameters flattened into one unconstrained vector z of size K.

    Args:
        params: name -> :class:`~svi.model.Param`, in the model's order.
        model_name: used in error messages.

    Raises:
        ModelError: when a constraint has no registered bijection.
    """

    def __init__(self, params: Mapping[str, Param], model_name: str = "model"):
        blocks = []
        offset = 0
        for name, p in params.items():
            try:
                t = biject_to(p.constraint)
            except NotImplementedError:
                raise ModelError(
                    f"{model_name}: parameter {name!r} has constraint {p.constraint!r}, which has no bijection "
                    "to unconstrained space. Use one of real, positive, greater_than, less_than, interval, "
                    "unit_interval, simplex, ordered_vector, corr_cholesky, lower_cholesky, positive_definite, "
                    "or register one with torch.distributions.biject_to.register."
                ) from None
            ushape = tuple(t.inverse_shape(p.shape))
            size = math.prod(ushape)
            blocks.append(ParamBlock(name, p.shape, ushape, offset, size, t, _is_identity(t), p.constraint))
            offset += size
        self.blocks: tuple[ParamBlock, ...] = tuple(blocks)
        self.size: int = offset
        self.names: tuple[str, ...] = tuple(b.name for b in blocks)
        self._params = dict(params)

    def __len__(self) -> int:
        return self.size

    def unflatten(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split z of shape (S, K) into unconstrained blocks of shape (S, *unconstrained_shape)."""
        S = z.shape[0]
        return {b.name: z[:, b.offset : b.offset + b.size].reshape((S,) + b.unconstrained_shape) for b in self.blocks}

    def flatten(self, u: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unflatten`: blocks (S, *unconstrained_shape) -> z (S, K)."""
        S = next(iter(u.values())).shape[0]
        return torch.cat([u[b.name].reshape(S, b.size) for b in self.blocks], dim=1)

    def constrain(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Map z (S, K) to constrained draws {name: (S, *shape)} and log|det J| of shape (S,)."""
        S = z.shape[0]
        theta = {}
        log_det = None
        for b in self.blocks:
            u = z[:, b.offset : b.offset + b.size]
            if b.unconstrained_shape != (b.size,):
                u = u.reshape((S,) + b.unconstrained_shape)
            if b.identity:  # real-valued: the unconstrained block is the parameter
                theta[b.name] = u
                continue
            x = b.transform(u)
            theta[b.name] = x
            ld = b.transform.log_abs_det_jacobian(u, x).reshape(S, -1).sum(-1)
            log_det = ld if log_det is None else log_det + ld
        if log_det is None:
            log_det = z.new_zeros(S)
        return theta, log_det

    def unconstrain(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Constrained draws {name: (S, *shape)} -> z (S, K)."""
        parts = []
        for b in self.blocks:
            x = torch.as_tensor(theta[b.name])
            S = x.shape[0]
            u = b.transform.inv(x)
            parts.append(u.reshape(S, b.size))
        return torch.cat(parts, dim=1)

    def initial_point(self, dtype=torch.float64, default: float = 0.0) -> torch.Tensor:
        """The unconstrained start: ``Param.init`` where given, else ``default`` (Stan's init=0)."""
        z = torch.full((self.size,), float(default), dtype=dtype)
        for b in self.blocks:
            init = self._params[b.name].init
            if init is None:
                continue
            x = torch.as_tensor(init, dtype=dtype).expand(b.shape).unsqueeze(0)
            if not bool(b.constraint.check(x).all()):
                raise ModelError(f"Param {b.name!r}: init {init!r} violates its constraint {b.constraint!r}")
            z[b.offset : b.offset + b.size] = b.transform.inv(x).reshape(b.size)
        return z

    def unconstrained_names(self) -> list[str]:
        """One name per coordinate of z, e.g. ``w[3]``, ``sigma__u`` for a transformed scalar."""
        out = []
        for b in self.blocks:
            stem = b.name if b.identity else f"{b.name}__u"
            out += element_names(stem, b.unconstrained_shape)
        return out

    def constrained_names(self) -> list[str]:
        """One name per scalar element of the constrained parameters, e.g. ``w[3]``, ``L[1,0]``."""
        out = []
        for b in self.blocks:
            out += element_names(b.name, b.shape)
        return out

    def spec(self) -> dict:
        """Names, shapes and constraints as plain data (constraints from ``svi.constraints.to_spec``;
        one outside that vocabulary is kept as ``{"name": "unknown", "repr": ...}``)."""
        out = {}
        for b in self.blocks:
            try:
                constraint = svi_constraints.to_spec(b.constraint)
            except svi_constraints.ConstraintSpecError:
                constraint = {"name": "unknown", "repr": repr(b.constraint)}
            out[b.name] = {"shape": list(b.shape), "unconstrained_shape": list(b.unconstrained_shape),
                           "constraint": constraint}
        return out

    @classmethod
    def from_spec(cls, spec: Mapping[str, Mapping], model_name: str = "model") -> "ParamSpace":
        """Rebuild a space from :meth:`spec` with no model code: every constraint from the vocabulary.
        A format-1 spec (constraints as their ``repr``) is read too.

        Raises:
            ModelError: a malformed entry or a constraint outside the vocabulary.
        """
        params = {}
        for name, entry in spec.items():
            try:
                c = entry["constraint"]
                constraint = svi_constraints.from_repr(c) if isinstance(c, str) else svi_constraints.from_spec(c)
                params[name] = Param(tuple(entry["shape"]), constraint)
            except (KeyError, TypeError, svi_constraints.ConstraintSpecError) as e:
                raise ModelError(f"parameter {name!r}: {e}") from None
        space = cls(params, model_name)
        for b in space.blocks:
            if list(b.unconstrained_shape) != list(spec[b.name].get("unconstrained_shape", b.unconstrained_shape)):
                raise ModelError(f"parameter {b.name!r}: unconstrained shape {spec[b.name]['unconstrained_shape']} "
                                 f"does not match its constraint's {list(b.unconstrained_shape)}")
        return space


def element_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """Scalar element names, zero-based like the tensors: ``w[0]``, ``L[1,0]``; a scalar keeps its name."""
    if shape == ():
        return [name]
    idx = torch.cartesian_prod(*[torch.arange(d) for d in shape]) if len(shape) > 1 else torch.arange(shape[0])[:, None]
    return [f"{name}[{','.join(str(int(i)) for i in row)}]" for row in idx.reshape(-1, len(shape))]
