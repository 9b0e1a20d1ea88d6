"""Constrained parameters <-> one unconstrained vector z of size K.

Every constraint maps to R^n through a bijection (Kucukelbir et al., "Automatic
Differentiation Variational Inference", JMLR 2017, section 2.3) looked up in svi's
own registry, :data:`biject_to`: a ``torch.distributions`` ``ConstraintRegistry`` (as
torch's docstring suggests for libraries) holding what torch lacks or svi maps
otherwise (ordered vectors, ``lower_cholesky``, ``positive_definite``, a plain exp for
``positive``) and falling back to ``torch.distributions.biject_to`` for the rest.
Importing svi changes nothing in torch's registry, so other libraries in the process
keep torch's bijections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.distributions import biject_to as torch_biject_to
from torch.distributions import constraints
from torch.distributions.constraint_registry import ConstraintRegistry
from torch.distributions.transforms import (
    AffineTransform,
    ComposeTransform,
    ExpTransform,
    Transform,
)

from svi import constraints as svi_constraints
from svi.model import ModelError, Param

__all__ = [
    "biject_to",
    "OrderedTransform",
    "LowerCholeskyFillTransform",
    "CholeskyOuterTransform",
    "ParamSpace",
    "ParamBlock",
    "GroupLayout",
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


# --- svi's registry ---------------------------------------------------------------------------
class _Registry(ConstraintRegistry):
    """A registry that answers for the constraints registered in it and asks torch's for the rest
    (so a user's registration into either one is found)."""

    def __call__(self, constraint):
        if type(constraint) in self._registry:
            return super().__call__(constraint)
        return torch_biject_to(constraint)


#: constraint -> bijection from unconstrained space, for every parameter svi fits
biject_to = _Registry()


@biject_to.register(svi_constraints.OrderedVector)
def _ordered(constraint):
    return OrderedTransform()


@biject_to.register(type(constraints.lower_cholesky))
def _lower_cholesky(constraint):
    return LowerCholeskyFillTransform()


@biject_to.register(type(constraints.positive_definite))
def _positive_definite(constraint):
    return ComposeTransform([LowerCholeskyFillTransform(), CholeskyOuterTransform()])


@biject_to.register(type(constraints.positive))
def _greater_than(constraint):
    # torch composes exp with an affine shift even for a zero lower bound; the plain
    # exp is the same bijection with one op fewer on every step.
    if isinstance(constraint.lower_bound, (int, float)) and constraint.lower_bound == 0:
        return ExpTransform()
    return torch_biject_to(constraint)


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
    loc: str | float | None = None  # a group effect's location and scale (a parameter's name or a number)
    scale: str | float | None = None

    @property
    def is_group_effect(self) -> bool:
        return self.loc is not None


@dataclass(frozen=True)
class GroupLayout:
    """Which coordinates of z are population-level and which belong to each group.

    Attributes:
        global_index: (P,) the coordinates of parameters that are not group effects.
        groups: one (G, d) index tensor per group axis: row g lists group g's coordinates
            (its elements of every group effect whose first axis has length G).
    """

    global_index: torch.Tensor
    groups: tuple[torch.Tensor, ...]

    @classmethod
    def ungrouped(cls, size: int) -> "GroupLayout":
        """Every coordinate population-level (a model without group effects)."""
        return cls(torch.arange(size), ())


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
                    "or register one with svi.transforms.biject_to.register (or torch.distributions.biject_to.register)."
                ) from None
            ushape = tuple(t.inverse_shape(p.shape))
            size = math.prod(ushape)
            group = p.is_group_effect
            blocks.append(ParamBlock(name, p.shape, ushape, offset, size, t, _is_identity(t) and not group,
                                     p.constraint, p.loc if group else None, p.scale if group else None))
            offset += size
        self.blocks: tuple[ParamBlock, ...] = tuple(blocks)
        self.size: int = offset
        self.names: tuple[str, ...] = tuple(b.name for b in blocks)
        self._params = dict(params)
        self._check_group_effects(model_name)
        #: per group effect, how far each element is centred (1 centred, 0 non-centred); "auto"
        #: ones start non-centred until :mod:`svi.centering` chooses from the data
        self.centering: dict[str, torch.Tensor] = {
            b.name: torch.full(b.shape, 0.0 if params[b.name].centering == "auto" else float(params[b.name].centering),
                               dtype=torch.float64)
            for b in self.blocks if b.is_group_effect}
        self.auto_centering: tuple[str, ...] = tuple(
            b.name for b in self.blocks if b.is_group_effect and params[b.name].centering == "auto")
        self._cast: dict = {}

    def _check_group_effects(self, model_name: str) -> None:
        by_name = {b.name: b for b in self.blocks}
        for b in self.blocks:
            if not b.is_group_effect:
                continue
            for what, ref in (("loc", b.loc), ("scale", b.scale)):
                if not isinstance(ref, str):
                    continue
                other = by_name.get(ref)
                if other is None or other.is_group_effect:
                    raise ModelError(f"{model_name}: group effect {b.name!r} has {what}={ref!r}, which is not one of "
                                     f"its other, non-group-effect parameters {[n for n in by_name if n != b.name]}")
                tail = b.shape[len(b.shape) - len(other.shape):] if len(other.shape) <= len(b.shape) else None
                if tail is None or any(o not in (1, d) for o, d in zip(other.shape, tail)):
                    raise ModelError(f"{model_name}: group effect {b.name!r} of shape {b.shape} cannot take {what} "
                                     f"{ref!r} of shape {other.shape}: it broadcasts from the right, e.g. () or "
                                     f"{b.shape[1:]}")
                if what == "scale" and not isinstance(other.constraint, type(constraints.positive)):
                    raise ModelError(f"{model_name}: group effect {b.name!r} has scale={ref!r}, which must be a "
                                     "positive parameter (constraint positive)")

    # --- group effects: partial centring ---------------------------------------------------
    def _lam(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The centring of ``name`` in ``like``'s dtype and device (cached: the step calls this every time)."""
        key = (name, like.dtype, like.device)
        lam = self._cast.get(key)
        if lam is None:  # set_centering empties the cache
            lam = self.centering[name].to(dtype=like.dtype, device=like.device)
            if not torch.compiler.is_compiling():  # a tensor made while tracing must not outlive the trace
                self._cast[key] = lam
        return lam

    def set_centering(self, name: str, value) -> None:
        """Fix how far group effect ``name`` is centred, per element (values in [0, 1])."""
        value = torch.as_tensor(value, dtype=torch.float64).expand(self.centering[name].shape).clone()
        if not bool(((value >= 0) & (value <= 1)).all()):
            raise ValueError(f"centring of {name!r} must lie in [0, 1]")
        self.centering[name] = value
        self._cast = {k: v for k, v in self._cast.items() if k[0] != name}

    def loc_scale(self, b: ParamBlock, theta: Mapping[str, torch.Tensor], like: torch.Tensor):
        """A group effect's loc and log scale, shaped (S, *block shape) for broadcasting."""
        S = like.shape[0]

        def value(ref):
            if not isinstance(ref, str):
                return torch.as_tensor(float(ref), dtype=like.dtype, device=like.device)
            v = theta[ref]
            return v.reshape((S,) + (1,) * (len(b.shape) - (v.dim() - 1)) + tuple(v.shape[1:]))

        loc = value(b.loc)
        scale = value(b.scale)
        return loc, scale.log()

    def _constrain_group(self, b: ParamBlock, u: torch.Tensor, theta) -> tuple[torch.Tensor, torch.Tensor]:
        # theta = loc + scale^(1-lam) (u - lam loc): lam = 1 is the centred form (u is theta), lam = 0
        # the non-centred one (u ~ N(0, 1) a priori); log|dtheta/du| = (1 - lam) log scale per element
        # (Gorinova, Moore, Hoffman, "Automatic Reparameterisation of Probabilistic Programs", ICML 2020).
        lam = self._lam(b.name, u)
        loc, log_scale = self.loc_scale(b, theta, u)
        power = (1.0 - lam) * log_scale
        x = loc + power.exp() * (u - lam * loc)
        return x, power.expand(x.shape).reshape(u.shape[0], -1).sum(-1)

    def _unconstrain_group(self, b: ParamBlock, x: torch.Tensor, theta) -> torch.Tensor:
        lam = self._lam(b.name, x)
        loc, log_scale = self.loc_scale(b, theta, x)
        return lam * loc + (x - loc) * ((lam - 1.0) * log_scale).exp()

    def group_layout(self) -> GroupLayout:
        """Population and group coordinates (:class:`GroupLayout`) for families that model the
        dependence of a multilevel posterior. Group effects whose first axes have the same length
        are taken to index the same groups (an intercept ``(G,)`` and slopes ``(G, D)``), so one
        group's elements form one block; for effects of other groups that share a length this only
        joins blocks, which loses nothing."""
        by_length: dict[int, list[torch.Tensor]] = {}
        rest = []
        for b in self.blocks:
            if not b.is_group_effect:
                rest.append(torch.arange(b.offset, b.offset + b.size))
                continue
            G = b.shape[0]
            by_length.setdefault(G, []).append(torch.arange(b.offset, b.offset + b.size).reshape(G, b.size // G))
        glob = torch.cat(rest) if rest else torch.zeros(0, dtype=torch.long)
        return GroupLayout(glob, tuple(torch.cat(parts, dim=1) for parts in by_length.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The chosen centrings (what a resume and a saved posterior need besides the family)."""
        return {name: lam.clone() for name, lam in self.centering.items()}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        for name in self.centering:
            if name not in saved:
                raise ModelError(f"no centring saved for group effect {name!r}")
            value = torch.as_tensor(saved[name], dtype=torch.float64)
            if tuple(value.shape) != tuple(self.centering[name].shape):
                raise ModelError(f"saved centring of {name!r} has shape {tuple(value.shape)}; expected "
                                 f"{tuple(self.centering[name].shape)}")
            self.set_centering(name, value)

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
        """Map z (S, K) to constrained draws {name: (S, *shape)} and log|det J| of shape (S,).

        Group effects come after the parameters their loc and scale name, whatever the order.
        """
        S = z.shape[0]
        theta = {}
        log_det = None
        for group_pass in (False, True) if self.centering else (False,):  # flat models: one pass
            for b in self.blocks:
                if b.is_group_effect != group_pass:
                    continue
                u = z[:, b.offset : b.offset + b.size]
                if b.unconstrained_shape != (b.size,):
                    u = u.reshape((S,) + b.unconstrained_shape)
                if b.identity:  # real-valued: the unconstrained block is the parameter
                    theta[b.name] = u
                    continue
                if group_pass:
                    x, ld = self._constrain_group(b, u, theta)
                else:
                    x = b.transform(u)
                    ld = b.transform.log_abs_det_jacobian(u, x).reshape(S, -1).sum(-1)
                theta[b.name] = x
                log_det = ld if log_det is None else log_det + ld
        if log_det is None:
            log_det = z.new_zeros(S)
        if self.centering:
            theta = {name: theta[name] for name in self.names}
        return theta, log_det

    def unconstrain(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Constrained draws {name: (S, *shape)} -> z (S, K)."""
        parts = []
        for b in self.blocks:
            x = torch.as_tensor(theta[b.name])
            S = x.shape[0]
            u = self._unconstrain_group(b, x, theta) if b.is_group_effect else b.transform.inv(x)
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
            if b.is_group_effect:  # its z depends on the loc and scale at this start
                theta, _ = self.constrain(z.unsqueeze(0))
                x = self._unconstrain_group(b, x.to(dtype), theta)
            else:
                x = b.transform.inv(x)
            z[b.offset : b.offset + b.size] = x.reshape(b.size)
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
            if b.is_group_effect:
                out[b.name]["group"] = {"loc": b.loc, "scale": b.scale,
                                        "centering": self.centering[b.name].reshape(-1).tolist()}
        return out

    def load_centering(self, spec: Mapping[str, Mapping]) -> None:
        """Set the group effects' centrings recorded in :meth:`spec`.

        Raises:
            ModelError: a group effect without its centring, or one of another shape.
        """
        for name, lam in self.centering.items():
            group = spec.get(name, {}).get("group") if isinstance(spec.get(name), Mapping) else None
            values = group.get("centering") if isinstance(group, Mapping) else None
            if not isinstance(values, list) or len(values) != lam.numel():
                raise ModelError(f"parameter {name!r}: its recorded centring is missing or has the wrong length")
            try:  # a file's numbers: in [0, 1] or refused, never a silently different transform
                self.set_centering(name, torch.tensor(values, dtype=torch.float64).reshape(lam.shape))
            except (TypeError, ValueError) as e:
                raise ModelError(f"parameter {name!r}: recorded centring is not numbers in [0, 1] ({e})") from None

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
                group = entry.get("group") or {}
                params[name] = Param(tuple(entry["shape"]), constraint, loc=group.get("loc"),
                                     scale=group.get("scale"), centering=0.0 if group else "auto")
            except (KeyError, TypeError, AttributeError, svi_constraints.ConstraintSpecError) as e:
                raise ModelError(f"parameter {name!r}: {e}") from None
        space = cls(params, model_name)
        space.load_centering(spec)
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
