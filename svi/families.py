"""Gaussian variational families over the unconstrained vector z (K entries).

Each family is an ``nn.Module`` whose trainable parameters live in a fixed
affine *frame* z = a + C u: ``a`` and ``C`` are buffers (identity by default; the
warm start sets them from a Laplace approximation, see :mod:`svi.warmstart`),
and the family is a Gaussian over u. Meanfield and lowrank only accept a
diagonal C, which keeps them the same family in z (a diagonal rescaling of a
mean-field Gaussian is mean-field); fullrank accepts a lower-triangular C.

Reparameterisation (Kingma and Welling 2014; Kucukelbir et al. 2017, eq. 6):
z = a + C (m + L eps), eps ~ N(0, I).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal

__all__ = ["Family", "MeanField", "FullRank", "LowRank", "Structured", "make_family", "resolve_family",
           "FAMILIES", "AUTO"]

_HALF_LOG_2PI_E = 0.5 * (1.0 + math.log(2.0 * math.pi))


class Family(nn.Module):
    """Base class: a Gaussian q(z) in a fixed affine frame.

    Args:
        size: K, the number of unconstrained coordinates.
        loc: initial mean of q in z-space (defaults to zeros).
        scale: initial marginal sd of q in z-space (a float or a (K,) tensor).
        dtype: floating dtype of the parameters.
    """

    name = "family"
    frame_kind = "diag"  # or "tril"
    #: the shape of Gaussian the warm start forms for this family: "diag" (the precision's
    #: diagonal) or "tril" (the full covariance's Cholesky factor, which set_frame may project)
    warm_start_shape = "diag"

    def __init__(self, size: int, loc=None, scale=0.1, dtype=torch.float32):
        super().__init__()
        self.size = int(size)
        loc = torch.zeros(size, dtype=dtype) if loc is None else torch.as_tensor(loc, dtype=dtype).clone()
        scale = torch.as_tensor(scale, dtype=dtype).expand(size).clone()
        if not bool((scale > 0).all()):
            raise ValueError(f"initial scale must be positive, got {scale}")
        # The frame holds the initial mean and scale; trainable parameters start at m=0, L=I.
        self.register_buffer("frame_loc", loc)
        self.register_buffer("frame_scale", scale if self.frame_kind == "diag" else torch.diag(scale))
        # Precision of the warm start's Gaussian in frame coordinates u, for the quadratic control
        # variate: shape (0,) when there is none, (K,) when diagonal, (K, K) otherwise.
        self.register_buffer("frame_precision", torch.zeros(0, dtype=dtype))
        # Gradient of the log density at frame_loc in frame coordinates (the expansion point need
        # not be a mode): shape (0,) or (K,).
        self.register_buffer("frame_gradient", torch.zeros(0, dtype=dtype))
        # Where that expansion is, in frame coordinates: (0,) at the frame's centre (u = 0), else
        # (K,) once the fit moved it to where q went (Family.set_expansion).
        self.register_buffer("frame_expansion", torch.zeros(0, dtype=dtype))

    # --- frame -----------------------------------------------------------------------
    def set_frame(self, loc: torch.Tensor, scale: torch.Tensor, precision: torch.Tensor | None = None,
                  gradient: torch.Tensor | None = None) -> None:
        """Re-anchor the family at ``loc`` with frame ``scale`` (K,) or lower-triangular (K, K)
        and reset the trainable parameters to the frame's own Gaussian.

        Args:
            loc: (K,) centre.
            scale: (K,) or lower-triangular (K, K).
            precision: optional z-space Hessian H of the negative log density at ``loc``;
                stored in frame coordinates (C^T H C) for :meth:`quadratic`.
            gradient: optional z-space gradient of the log density at ``loc`` (zero at a mode).
        """
        dtype = self.frame_loc.dtype
        loc = torch.as_tensor(loc).to(dtype)
        scale = torch.as_tensor(scale).to(dtype)
        if scale.dim() == 2 and self.frame_kind == "diag":
            raise ValueError(f"{self.name} takes a diagonal frame; got a ({scale.shape[0]}, {scale.shape[1]}) matrix")
        if scale.dim() == 1 and self.frame_kind == "tril":
            scale = torch.diag(scale)
        self.frame_loc.copy_(loc)
        self.frame_scale.copy_(scale)
        self._store_expansion(None, precision, gradient)
        self.reset_parameters()

    def shift_frame(self, delta_u: torch.Tensor) -> None:
        """Move the frame's centre to a + C delta_u (frame coordinates), keeping C and the quadratic
        control variate's curvature, with its expansion at the new centre and a zero gradient there
        (where a Newton step with that curvature puts it). q moves with the frame, its shape kept."""
        dtype, device = self.frame_loc.dtype, self.frame_loc.device
        self.frame_loc.copy_(self._to_z(delta_u.to(dtype=dtype, device=device)))
        self.frame_gradient = torch.zeros(0, dtype=dtype, device=device)
        self.frame_expansion = torch.zeros(0, dtype=dtype, device=device)

    def newton_step(self, gradient: torch.Tensor) -> torch.Tensor | None:
        """H_u^-1 C^T g: the Newton step in frame coordinates for the log density's gradient ``g``
        (K,) in z-space under the quadratic control variate's curvature H_u, or ``None`` without one."""
        h = self.frame_precision.to(torch.float64)
        if h.numel() == 0:
            return None
        c, g = self.frame_scale.to(torch.float64), gradient.to(torch.float64).to(h.device)
        g_u = c * g if c.dim() == 1 else c.T @ g
        return g_u / h if h.dim() == 1 else torch.linalg.solve(h, g_u)

    def set_expansion(self, z: torch.Tensor, precision: torch.Tensor, gradient: torch.Tensor | None = None) -> bool:
        """Move the quadratic control variate's Taylor expansion to the point ``z`` (K,) of z-space,
        with the negative log density's Hessian ``precision`` there and the log density's
        ``gradient``. q stays as it is.

        Returns:
            Whether the trainable parameters changed meaning (a new frame), so that optimiser
            state and iterate averages of the old ones no longer apply. Here the frame stays: False.
        """
        self._store_expansion(torch.as_tensor(z), precision, gradient)
        return False

    def _store_expansion(self, z, precision, gradient) -> None:
        """The expansion in frame coordinates: u0 = C^-1 (z - a) ((0,) for the frame's centre),
        H_u = C^T H C and g_u = C^T g ((0,) for none)."""
        dtype, device = self.frame_loc.dtype, self.frame_loc.device
        c = self.frame_scale.to(torch.float64)
        none = torch.zeros(0, dtype=dtype, device=device)
        if z is None:
            self.frame_expansion = none
        else:
            dz = z.to(torch.float64).to(device) - self.frame_loc.to(torch.float64)
            u0 = dz / c if c.dim() == 1 else torch.linalg.solve_triangular(c, dz.unsqueeze(-1), upper=False).squeeze(-1)
            self.frame_expansion = u0.to(dtype)
        if precision is None or gradient is None:
            self.frame_gradient = none
        else:
            g = torch.as_tensor(gradient).to(torch.float64).to(device)
            self.frame_gradient = (c * g if c.dim() == 1 else c.T @ g).to(dtype)
        if precision is None:
            self.frame_precision = none
        else:
            h = torch.as_tensor(precision).to(torch.float64).to(device)
            h_u = c.unsqueeze(-1) * h * c if c.dim() == 1 else c.T @ h @ c
            if self.frame_kind == "tril" and torch.allclose(h_u, torch.eye(self.size, dtype=h_u.dtype, device=device),
                                                            atol=1e-6):
                h_u = torch.ones(self.size, dtype=h_u.dtype, device=device)  # the Cholesky frame whitens H exactly
            self.frame_precision = h_u.to(dtype)

    @property
    def expansion_point(self) -> torch.Tensor:
        """Where the quadratic control variate expands the log density, in z-space (K,)."""
        u0 = self.frame_expansion
        return self.frame_loc if u0.numel() == 0 else self._to_z(u0)

    @property
    def has_quadratic(self) -> bool:
        return self.frame_precision.numel() > 0

    def quadratic(self, u: torch.Tensor) -> torch.Tensor:
        """g_u^T v - v^T H_u v / 2 with v = u - u0 for frame coordinates u (S, K): the second-order
        Taylor expansion of the log density at the expansion point u0 (the frame's centre unless
        :meth:`set_expansion` moved it), up to a constant; the control variate's integrand."""
        h = self.frame_precision
        if self.frame_expansion.numel():
            u = u - self.frame_expansion
        quad = -0.5 * (u * u * h).sum(-1) if h.dim() == 1 else -0.5 * ((u @ h) * u).sum(-1)
        return quad + u @ self.frame_gradient if self.frame_gradient.numel() else quad

    def expected_quadratic(self) -> torch.Tensor:
        """E_q of :meth:`quadratic` in closed form: g_u^T d - (d^T H_u d + tr(H_u Sigma_u)) / 2
        for d = m - u0."""
        raise NotImplementedError

    def _mean_quadratic(self, m: torch.Tensor) -> torch.Tensor:
        h = self.frame_precision
        if self.frame_expansion.numel():
            m = m - self.frame_expansion
        quad = -0.5 * ((m * m * h).sum() if h.dim() == 1 else m @ h @ m)
        return quad + m @ self.frame_gradient if self.frame_gradient.numel() else quad

    def _precision_diag(self) -> torch.Tensor:
        h = self.frame_precision
        return h if h.dim() == 1 else torch.diagonal(h)

    def _to_z(self, u: torch.Tensor) -> torch.Tensor:
        if self.frame_kind == "diag":
            return self.frame_loc + u * self.frame_scale
        return self.frame_loc + u @ self.frame_scale.T

    def _frame_log_det(self) -> torch.Tensor:
        d = self.frame_scale if self.frame_kind == "diag" else torch.diagonal(self.frame_scale)
        return d.log().sum()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("frame_precision", "frame_gradient", "frame_expansion"):
            key = prefix + name
            if key in state_dict:  # its shape says what is stored: (0,) none, (K,) or (K, K)
                setattr(self, name, torch.empty_like(state_dict[key], device=self.frame_loc.device))
        if prefix + "frame_loc" in state_dict and prefix + "frame_expansion" not in state_dict:
            # written before expansions could move: at the frame's centre
            state_dict[prefix + "frame_expansion"] = torch.zeros(0, dtype=self.frame_loc.dtype)
            self.frame_expansion = torch.zeros(0, dtype=self.frame_loc.dtype, device=self.frame_loc.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, then the loaded values are checked (a posterior file or a
        checkpoint is data): every tensor finite, the frame's factors triangular with a positive
        diagonal, the control variate's buffers of a shape it can use.

        Raises:
            RuntimeError: naming what is wrong; the caller reports the file.
        """
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        problem = self._loaded_problem()
        if problem:
            raise RuntimeError(f"{self.name} family: {problem}")
        return out

    def _loaded_problem(self) -> str | None:
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
                return f"{name} is not finite"
        K = self.size
        shapes = {"frame_precision": [(0,), (K,), (K, K)], "frame_gradient": [(0,), (K,)],
                  "frame_expansion": [(0,), (K,)]}
        for name, allowed in shapes.items():
            if tuple(getattr(self, name).shape) not in allowed:
                return f"{name} has shape {tuple(getattr(self, name).shape)}; expected one of {allowed}"
        return _triangular_problem("frame_scale", self.frame_scale)

    # --- interface -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        raise NotImplementedError

    def noise_size(self) -> int:
        """Number of standard-normal draws one particle needs."""
        return self.size

    def draw_noise(self, num_particles: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(
            (num_particles, self.noise_size()), generator=generator, dtype=self.frame_loc.dtype,
            device=self.frame_loc.device,
        )

    def forward(self, eps: torch.Tensor, return_frame: bool = False) -> torch.Tensor:
        """Reparameterised draws z (S, K) from standard-normal noise eps (S, noise_size); with
        ``return_frame`` also the frame coordinates u, as (z, u)."""
        raise NotImplementedError

    def rsample(self, num_particles: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        return self(self.draw_noise(num_particles, generator))

    def entropy(self) -> torch.Tensor:
        """Analytic entropy H[q] in z-space, differentiable in the parameters."""
        raise NotImplementedError

    def distribution(self, detach: bool = False) -> torch.distributions.Distribution:
        """q(z) as a ``torch.distributions`` object (detached parameters for sticking the landing)."""
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor, detach: bool = False) -> torch.Tensor:
        """log q(z) for z of shape (S, K); ``detach`` stops gradients to the parameters (STL)."""
        return self.distribution(detach).log_prob(z)

    @property
    def mean(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def stddev(self) -> torch.Tensor:
        """Marginal sd of each coordinate of z, shape (K,)."""
        raise NotImplementedError

    def covariance(self) -> torch.Tensor:
        return self.distribution(detach=True).covariance_matrix

    def extra_repr(self) -> str:
        return f"K={self.size}"


def _triangular_problem(name: str, factor: torch.Tensor) -> str | None:
    """What keeps ``factor`` (a vector of sds, or (..., d, d) lower-triangular factors) from being a
    Gaussian's scale: an entry above the diagonal, or a diagonal entry that is not positive."""
    diag = factor if factor.dim() == 1 else torch.diagonal(factor, dim1=-2, dim2=-1)
    if not bool((diag > 0).all()):
        return f"{name} has a diagonal entry that is not positive"
    if factor.dim() > 1 and bool((torch.triu(factor, 1) != 0).any()):
        return f"{name} has entries above the diagonal (it must be lower-triangular)"
    return None


class MeanField(Family):
    """Diagonal Gaussian, parameters (m, omega = log sigma) as in Stan's ``meanfield``."""

    name = "meanfield"

    def __init__(self, size, loc=None, scale=0.1, dtype=torch.float32):
        super().__init__(size, loc, scale, dtype)
        self.loc = nn.Parameter(torch.zeros(size, dtype=dtype))
        self.log_scale = nn.Parameter(torch.zeros(size, dtype=dtype))

    def reset_parameters(self):
        with torch.no_grad():
            self.loc.zero_()
            self.log_scale.zero_()

    def forward(self, eps, return_frame: bool = False):
        u = self.loc + self.log_scale.exp() * eps
        z = self.frame_loc + u * self.frame_scale
        return (z, u) if return_frame else z

    def entropy(self):
        return self.log_scale.sum() + self.frame_scale.log().sum() + self.size * _HALF_LOG_2PI_E

    def expected_quadratic(self):
        return self._mean_quadratic(self.loc) - 0.5 * (self._precision_diag() * (2 * self.log_scale).exp()).sum()

    def _mean_sd(self, detach):
        loc, log_scale = (self.loc.detach(), self.log_scale.detach()) if detach else (self.loc, self.log_scale)
        return self.frame_loc + loc * self.frame_scale, log_scale.exp() * self.frame_scale

    def distribution(self, detach=False):
        mean, sd = self._mean_sd(detach)
        return Independent(Normal(mean, sd, validate_args=False), 1, validate_args=False)

    def log_prob(self, z, detach=False):
        mean, sd = self._mean_sd(detach)
        return (-0.5 * ((z - mean) / sd) ** 2 - sd.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def covariance(self):
        return torch.diag(self.stddev**2)

    @property
    def mean(self):
        return self._mean_sd(True)[0]

    @property
    def stddev(self):
        return self._mean_sd(True)[1]



class FullRank(Family):
    """Full-covariance Gaussian, q = N(mu, L L^T), L lower-triangular with positive
    diagonal (Stan's ``fullrank``); the diagonal is stored as its log, the entries below it
    divided by ``off_diagonal_scale`` = 1/sqrt(K).

    Why the 1/sqrt(K): Adam moves every coordinate by about lr a step whatever its gradient's
    size, so K^2/2 raw entries of a row each moving by lr would move the row of L by lr sqrt(K)
    (K = 306: 1.7 frame sds at lr 0.1), and the first steps from the warm start's Gaussian threw
    the fit far off. Scaled so, a step moves each row of L by about lr, as it moves the mean.
    """

    name = "fullrank"
    frame_kind = "tril"
    warm_start_shape = "tril"

    def __init__(self, size, loc=None, scale=0.1, dtype=torch.float32):
        super().__init__(size, loc, scale, dtype)
        self.loc = nn.Parameter(torch.zeros(size, dtype=dtype))
        self.scale_raw = nn.Parameter(torch.zeros(size, size, dtype=dtype))
        self.register_buffer("_strict_lower", torch.tril(torch.ones(size, size, dtype=dtype), -1))
        # in the state dict, so a posterior keeps its meaning; files from before it read as 1
        self.register_buffer("off_diagonal_scale", torch.tensor(1.0 / math.sqrt(max(size, 1)), dtype=dtype))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "off_diagonal_scale"
        if key not in state_dict and prefix + "scale_raw" in state_dict:  # written before the scaling existed
            state_dict = {**state_dict, key: torch.tensor(1.0, dtype=self.off_diagonal_scale.dtype)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def reset_parameters(self):
        with torch.no_grad():
            self.loc.zero_()
            self.scale_raw.zero_()

    @torch.no_grad()
    def set_expansion(self, z, precision, gradient=None) -> bool:
        """Re-frame at ``z`` with the Cholesky factor C of ``precision``'s inverse, keeping q: the
        trainable factor becomes C^-1 L_q. A frame that whitens the expansion keeps the control
        variate's exact expectation at O(K^2) a step (tr(H_u L L^T) with H_u = I); a dense H_u
        costs O(K^3), which at K = 1,000 outweighed the likelihood on 8,000 rows.

        Raises:
            ValueError: ``precision`` is not positive definite (there is no such frame).
        """
        h = torch.as_tensor(precision).to(torch.float64).to(self.frame_loc.device)
        chol_prec, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0:
            raise ValueError("fullrank: the expansion's curvature is not positive definite")
        cov = torch.cholesky_inverse(chol_prec)
        frame, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.T))
        if int(info) != 0:
            raise ValueError("fullrank: the expansion's covariance is not positive definite")
        mean, tril = (t.to(torch.float64) for t in self._mean_tril(detach=True))
        inner = torch.linalg.solve_triangular(frame, tril, upper=False)  # lower-triangular, positive diagonal
        dtype = self.frame_loc.dtype
        self.frame_loc.copy_(torch.as_tensor(z).to(mean))
        self.frame_scale.copy_(frame.to(dtype))
        self._store_expansion(None, h, gradient)
        self.loc.copy_(torch.linalg.solve_triangular(frame, (mean - self.frame_loc.double()).unsqueeze(-1),
                                                     upper=False).squeeze(-1).to(dtype))
        diag = torch.diagonal(inner)
        raw = (inner - torch.diag_embed(diag)) / float(self.off_diagonal_scale) + torch.diag_embed(diag.log())
        self.scale_raw.copy_(torch.tril(raw).to(dtype))
        return True

    def _inner_tril(self, raw):
        return raw * (self._strict_lower * self.off_diagonal_scale) + torch.diag_embed(torch.diagonal(raw).exp())

    def forward(self, eps, return_frame: bool = False):
        u = self.loc + eps @ self._inner_tril(self.scale_raw).T
        z = self.frame_loc + u @ self.frame_scale.T
        return (z, u) if return_frame else z

    def entropy(self):
        return torch.diagonal(self.scale_raw).sum() + self._frame_log_det() + self.size * _HALF_LOG_2PI_E

    def expected_quadratic(self):
        tril, h = self._inner_tril(self.scale_raw), self.frame_precision
        trace = (h.unsqueeze(-1) * tril * tril).sum() if h.dim() == 1 else ((h @ tril) * tril).sum()
        return self._mean_quadratic(self.loc) - 0.5 * trace

    def _mean_tril(self, detach):
        loc, raw = (self.loc.detach(), self.scale_raw.detach()) if detach else (self.loc, self.scale_raw)
        return self.frame_loc + self.frame_scale @ loc, self.frame_scale @ self._inner_tril(raw)

    def distribution(self, detach=False):
        mean, tril = self._mean_tril(detach)
        return MultivariateNormal(mean, scale_tril=tril, validate_args=False)

    @property
    def mean(self):
        return self._mean_tril(True)[0]

    @property
    def scale_tril(self):
        return self._mean_tril(True)[1]


    @property
    def stddev(self):
        return self.scale_tril.pow(2).sum(-1).sqrt()


class LowRank(Family):
    """Low-rank plus diagonal Gaussian, q = N(mu, F F^T + diag(d^2)) (Ong, Nott, Smith,
    "Gaussian variational approximation with a factor covariance structure", JCGS 2018).

    Args:
        num_factors: r, the number of factor columns (the option ``rank``, Pyro's name for it).
    """

    name = "lowrank"

    def __init__(self, size, loc=None, scale=0.1, dtype=torch.float32, num_factors: int = 2):
        super().__init__(size, loc, scale, dtype)
        if num_factors < 1:
            raise ValueError(f"lowrank needs at least 1 factor column (option rank), got {num_factors}")
        self.num_factors = int(num_factors)
        self.loc = nn.Parameter(torch.zeros(size, dtype=dtype))
        self.factor = nn.Parameter(torch.zeros(size, self.num_factors, dtype=dtype))
        self.log_diag = nn.Parameter(torch.zeros(size, dtype=dtype))

    def reset_parameters(self):
        with torch.no_grad():
            self.loc.zero_()
            # A zero factor is a saddle of the ELBO in F (its gradient vanishes there);
            # a small deterministic start breaks the symmetry.
            self.factor.copy_(_small_factor(self.size, self.num_factors, self.factor.dtype))
            self.log_diag.zero_()

    def noise_size(self):
        return self.num_factors + self.size

    def forward(self, eps, return_frame: bool = False):
        e_factor, e_diag = eps[:, : self.num_factors], eps[:, self.num_factors :]
        u = self.loc + e_factor @ self.factor.T + e_diag * self.log_diag.exp()
        z = self.frame_loc + u * self.frame_scale
        return (z, u) if return_frame else z

    def expected_quadratic(self):
        h, f = self.frame_precision, self.factor
        trace_f = (h.unsqueeze(-1) * f * f).sum() if h.dim() == 1 else ((h @ f) * f).sum()
        trace_d = (self._precision_diag() * (2 * self.log_diag).exp()).sum()
        return self._mean_quadratic(self.loc) - 0.5 * (trace_f + trace_d)

    def entropy(self):
        # 0.5 log det(F F^T + D^2) by the matrix determinant lemma.
        d_inv_f = self.factor / self.log_diag.exp().unsqueeze(-1)
        capacitance = torch.eye(self.num_factors, dtype=d_inv_f.dtype, device=d_inv_f.device) + d_inv_f.T @ d_inv_f
        half_log_det = self.log_diag.sum() + torch.linalg.cholesky(capacitance).diagonal().log().sum()
        return half_log_det + self.frame_scale.log().sum() + self.size * _HALF_LOG_2PI_E

    def distribution(self, detach=False):
        loc, factor, log_diag = (self.loc, self.factor, self.log_diag)
        if detach:
            loc, factor, log_diag = loc.detach(), factor.detach(), log_diag.detach()
        s = self.frame_scale
        return LowRankMultivariateNormal(
            self.frame_loc + loc * s, factor * s.unsqueeze(-1), (log_diag.exp() * s) ** 2, validate_args=False
        )

    @property
    def mean(self):
        return self.frame_loc + self.loc.detach() * self.frame_scale

    @property
    def stddev(self):
        var = self.factor.detach().pow(2).sum(-1) + self.log_diag.detach().exp() ** 2
        return var.sqrt() * self.frame_scale

    @property
    def covariance_factors(self):
        """(F, d): the covariance in z-space is F F^T + diag(d^2)."""
        s = self.frame_scale
        return self.factor.detach() * s.unsqueeze(-1), self.log_diag.detach().exp() * s


class Structured(Family):
    """Gaussian with the dependence of a multilevel posterior: the population-level coordinates
    with a full covariance, each group's coordinates with a full covariance of their own, and a
    linear regression of every group coordinate on the population ones.

    With the P population coordinates first (``layout.global_index``), then each group's block
    (``layout.groups``), q = N(mu, L L^T) with the lower-triangular

        L = [[L_p, 0], [B, L_g]],   L_g block diagonal over groups,

    so given the population coordinates the groups are independent, as in the posterior of a
    multilevel model (each data row touches one group; groups interact only through the
    population parameters), while every group effect keeps its correlation with the means and
    scales it is drawn from, which mean-field drops (the funnel between tau and the effects). It
    is the covariance form of the sparse-precision Gaussian of Tan and Nott, "Gaussian
    variational approximation with sparse precision matrices", Statistics and Computing 2018,
    and the branched family of Agrawal and Domke, "Amortized variational inference for simple
    hierarchical models", NeurIPS 2021. A draw costs O(K P) (fullrank: O(K^2)).

    The frame is z = a + c * (C u): c the warm start's marginal sds and C a factor of the same
    structure, the projection of the warm start's Laplace correlation on the family (the
    population marginal and the regression exactly, each group block from the conditional
    covariance: exact when the Laplace precision is block diagonal over groups, as a multilevel
    model's is). The trainable factor starts at the identity, so SGD runs where the Laplace
    approximation is N(0, I), as for :class:`FullRank`; products of such factors keep the
    structure. Entries below the diagonal are stored divided by ``off_diagonal_scale`` =
    1/sqrt(P + d) for blocks of d coordinates, the size of a row (see :class:`FullRank`).

    Args:
        layout: which coordinates are population-level and which form each group
            (:meth:`svi.transforms.ParamSpace.group_layout`); without one every coordinate is
            population-level and the family is a full-rank Gaussian.
    """

    name = "structured"
    frame_kind = "diag"
    warm_start_shape = "tril"

    def __init__(self, size, loc=None, scale=0.1, dtype=torch.float32, layout=None):
        super().__init__(size, loc, scale, dtype)
        glob = torch.arange(size) if layout is None else torch.as_tensor(layout.global_index, dtype=torch.long)
        groups = () if layout is None else tuple(torch.as_tensor(g, dtype=torch.long) for g in layout.groups)
        perm = torch.cat([glob.reshape(-1)] + [g.reshape(-1) for g in groups])
        if perm.numel() != size or not torch.equal(perm.sort().values, torch.arange(size)):
            raise ValueError(f"structured family: the layout's coordinates are not each of the {size} exactly once")
        self.num_population = P = int(glob.numel())
        self.group_shapes = tuple((int(g.shape[0]), int(g.shape[1])) for g in groups)
        widest = max((d for _, d in self.group_shapes), default=0)
        # not in the state dict: the layout comes from the parameter space, never from a file
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inv_perm", torch.argsort(perm), persistent=False)
        self.register_buffer("group_index", torch.cat([g.reshape(-1) for g in groups]) if groups
                             else torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("off_diagonal_scale", torch.tensor(1.0 / math.sqrt(max(P + widest, 1)), dtype=dtype))
        K_g = size - P
        self.loc = nn.Parameter(torch.zeros(size, dtype=dtype))
        self.population_raw = nn.Parameter(torch.zeros(P, P, dtype=dtype))
        # without groups there is nothing to regress (and no empty parameter an optimiser would skip)
        self.regression_raw = nn.Parameter(torch.zeros(K_g, P, dtype=dtype)) if K_g else None
        self.group_raw = nn.ParameterList([nn.Parameter(torch.zeros(G, d, d, dtype=dtype)) for G, d in self.group_shapes])
        self.register_buffer("_lower_population", torch.tril(torch.ones(P, P, dtype=dtype), -1), persistent=False)
        for k, (G, d) in enumerate(self.group_shapes):
            self.register_buffer(f"_lower_group_{k}", torch.tril(torch.ones(d, d, dtype=dtype), -1), persistent=False)
        # the frame's factor C, as plain lower-triangular values (the identity until set_frame)
        self.register_buffer("frame_population", torch.eye(P, dtype=dtype))
        self.register_buffer("frame_regression", torch.zeros(K_g, P, dtype=dtype))
        for k, (G, d) in enumerate(self.group_shapes):
            self.register_buffer(f"frame_group_{k}", torch.eye(d, dtype=dtype).expand(G, d, d).clone())

    def reset_parameters(self):
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    def _loaded_problem(self) -> str | None:
        C_p, _, C_g = self._frame_factors()
        return super()._loaded_problem() or _triangular_problem("frame_population", C_p) or next(
            (p for k, C in enumerate(C_g) if (p := _triangular_problem(f"frame_group_{k}", C))), None)

    def _tril(self, raw, mask):
        # a mask product, not torch.tril: tril's kernel goes parallel even on 4 x 4 blocks, and with
        # the other core busy its thread hand-off cost 13 ms a call (measured), the whole step 8x
        diag = torch.diagonal(raw, dim1=-2, dim2=-1)
        return raw * (mask * self.off_diagonal_scale) + torch.diag_embed(diag.exp())

    def _frame_factors(self):
        return (self.frame_population, self.frame_regression if self.regression_raw is not None else None,
                [getattr(self, f"frame_group_{k}") for k in range(len(self.group_shapes))])

    def _inner_factors(self, detach: bool = False):
        """The trainable factor (L_p, B, [L_g]) in the frame's coordinates."""
        raws = [self.population_raw, self.regression_raw, *self.group_raw]
        if detach:
            raws = [None if r is None else r.detach() for r in raws]
        B = None if raws[1] is None else raws[1] * self.off_diagonal_scale
        return self._tril(raws[0], self._lower_population), B, [self._tril(r, m) for r, m in zip(
            raws[2:], self._lower_groups())]

    def _lower_groups(self):
        return [getattr(self, f"_lower_group_{k}") for k in range(len(self.group_shapes))]

    def _factors(self, detach: bool = False):
        """q's factor of u = C (m + L eps): (M_p (P, P), M_B (K - P, P), [M_g (G, d, d)]) with M = C L,
        whose product keeps the structure: M_p = C_p L_p, M_B = C_B L_p + C_g L_B, M_g = C_g L_g."""
        C_p, C_B, C_g = self._frame_factors()
        L_p, L_B, L_g = self._inner_factors(detach)
        M_p = C_p @ L_p
        if L_B is None:
            return M_p, None, []
        own = [(C @ B.reshape(G, d, -1)).reshape(G * d, -1)
               for C, B, (G, d) in zip(C_g, self._split_rows(L_B), self.group_shapes)]
        return M_p, C_B @ L_p + torch.cat(own), [C @ L for C, L in zip(C_g, L_g)]

    def _split_rows(self, rows):
        """Rows of a (K - P, ...) matrix in layout order, one chunk per group axis."""
        return torch.split(rows, [G * d for G, d in self.group_shapes])

    def _split_groups(self, x):
        """The group part (S, K - P) of a vector in layout order as [(S, G, d)] per group axis."""
        return [part.reshape(x.shape[0], G, d) for part, (G, d) in
                zip(torch.split(x, [G * d for G, d in self.group_shapes], dim=1), self.group_shapes)]

    def _matvec(self, factors, e):
        """L e for a structured factor L and vectors e (S, K) in layout order."""
        L_p, B, L_g = factors
        e_p = e[:, : self.num_population]
        out = e_p @ L_p.T
        if not L_g:
            return out
        own = [(L @ x.unsqueeze(-1)).squeeze(-1).flatten(1) for L, x in zip(L_g, self._split_groups(
            e[:, self.num_population :]))]
        return torch.cat([out, torch.cat(own, 1) + e_p @ B.T], 1)

    def _solve(self, factors, r):
        """L^-1 r for vectors r (S, K) in layout order."""
        L_p, B, L_g = factors
        P = self.num_population
        e_p = torch.linalg.solve_triangular(L_p, r[:, :P].T, upper=False).T
        if not L_g:
            return e_p
        rest = r[:, P:] - e_p @ B.T
        own = [torch.linalg.solve_triangular(L, x.permute(1, 2, 0), upper=False).permute(2, 0, 1).flatten(1)
               for L, x in zip(L_g, self._split_groups(rest))]
        return torch.cat([e_p] + own, 1)

    @staticmethod
    def _log_diag(factors):
        L_p, _, L_g = factors
        total = torch.diagonal(L_p).log().sum()
        for L in L_g:
            total = total + torch.diagonal(L, dim1=-2, dim2=-1).log().sum()
        return total

    def forward(self, eps, return_frame: bool = False):
        # the noise is exchangeable: read it in layout order; u is in the frame's scaled coordinates
        # c^-1 (z - a), so the quadratic control variate's expansion lives where it does for meanfield
        u = self._matvec(self._factors(), eps)[:, self.inv_perm] + self._frame_shift()
        z = self.frame_loc + u * self.frame_scale
        return (z, u) if return_frame else z

    def _frame_shift(self, detach: bool = False):
        """q's mean in scaled coordinates: C m."""
        loc = self.loc.detach() if detach else self.loc
        return self._matvec(self._frame_factors(), loc[self.perm].unsqueeze(0))[0][self.inv_perm]

    def entropy(self):
        log_diag = torch.diagonal(self.population_raw).sum()
        for raw in self.group_raw:
            log_diag = log_diag + torch.diagonal(raw, dim1=-2, dim2=-1).sum()
        return (log_diag + self._log_diag(self._frame_factors()) + self.frame_scale.log().sum()
                + self.size * _HALF_LOG_2PI_E)

    def log_prob(self, z, detach=False):
        factors = self._factors(detach)
        r = ((z - self.frame_loc) / self.frame_scale - self._frame_shift(detach))[:, self.perm]
        e = self._solve(factors, r)
        return (-0.5 * e.pow(2).sum(-1) - self._log_diag(factors) - self.frame_scale.log().sum()
                - 0.5 * self.size * math.log(2 * math.pi))

    def _variance_u(self, factors):
        """Marginal variances in the scaled coordinates (K,), differentiable in the factors."""
        L_p, B, L_g = factors
        var = [L_p.pow(2).sum(-1)]
        if L_g:
            var.append(B.pow(2).sum(-1) + torch.cat([L.pow(2).sum(-1).reshape(-1) for L in L_g]))
        return torch.cat(var)[self.inv_perm]

    def expected_quadratic(self):
        h = self.frame_precision
        factors = self._factors()
        if h.dim() == 1:
            trace = (h * self._variance_u(factors)).sum()
        else:
            L_p, B, L_g = factors
            shared = (L_p if B is None else torch.cat([L_p, B]))[self.inv_perm]  # the P columns every row shares
            trace = ((h @ shared) * shared).sum()
            for L, idx in zip(L_g, self._group_indices()):
                block = h[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (G, d, d): H's block of each group
                trace = trace + ((block @ L) * L).sum()
        return self._mean_quadratic(self._frame_shift()) - 0.5 * trace

    def _group_indices(self):
        return [part.reshape(G, d) for part, (G, d) in
                zip(torch.split(self.group_index, [G * d for G, d in self.group_shapes]), self.group_shapes)]

    def _dense_tril(self, detach=True):
        """q's factor (K, K) in layout order (lower-triangular there), in scaled coordinates."""
        L_p, B, L_g = self._factors(detach)
        P = self.num_population
        out = torch.zeros(self.size, self.size, dtype=L_p.dtype, device=L_p.device)
        out[:P, :P] = L_p
        if L_g:
            out[P:, :P] = B
            out[P:, P:] = torch.block_diag(*[blk for L in L_g for blk in L.unbind(0)])
        return out

    def covariance(self):
        L = self._dense_tril()
        cov = (L @ L.T)[self.inv_perm][:, self.inv_perm]
        return cov * self.frame_scale.unsqueeze(-1) * self.frame_scale

    def distribution(self, detach=False):
        if not detach:
            raise NotImplementedError("structured: distribution() is for reading q; draws and log_prob are differentiable")
        return MultivariateNormal(self.mean, covariance_matrix=self.covariance(), validate_args=False)

    def set_frame(self, loc, scale, precision=None, gradient=None):
        """As :meth:`Family.set_frame`; a (K, K) lower-triangular ``scale`` (the warm start's
        Laplace covariance) gives the frame c = its marginal sds and C = the projection of its
        correlation on the family."""
        scale = torch.as_tensor(scale)
        self._set_frame_factor(None)
        if scale.dim() == 1:
            return super().set_frame(loc, scale, precision, gradient)
        cov = scale.to(torch.float64) @ scale.to(torch.float64).T
        sd = cov.diagonal().clamp_min(1e-300).sqrt()
        self._set_frame_factor(self._project(cov / sd.unsqueeze(-1) / sd))
        super().set_frame(loc, sd, precision, gradient)

    @torch.no_grad()
    def _set_frame_factor(self, factors) -> None:
        C_p, C_B, C_g = self._frame_factors()
        if factors is None:  # the identity
            C_p.copy_(torch.eye(C_p.shape[0], dtype=C_p.dtype, device=C_p.device))
            if C_B is not None:
                C_B.zero_()
            for C in C_g:
                C.copy_(torch.eye(C.shape[-1], dtype=C.dtype, device=C.device).expand_as(C))
            return
        L_p, B, L_g = factors
        C_p.copy_(L_p)
        if C_B is not None:
            C_B.copy_(B)
        for C, L in zip(C_g, L_g):
            C.copy_(L)

    def _project(self, corr: torch.Tensor):
        """The structured factor closest to a covariance ``corr`` (K, K) in scaled coordinates:
        (L_p, B, [L_g]), or ``None`` when its population block is not positive definite."""
        R = corr[self.perm][:, self.perm]
        P = self.num_population
        L_p, info = torch.linalg.cholesky_ex(R[:P, :P])
        if int(info) != 0:
            return None
        B = torch.linalg.solve_triangular(L_p, R[P:, :P].T, upper=False).T  # B L_p^T = Sigma_gp
        L_g, start = [], 0
        for (G, d), Bk in zip(self.group_shapes, self._split_rows(B)):
            idx = (start + torch.arange(G * d, device=R.device)).reshape(G, d)
            Bk = Bk.reshape(G, d, P)
            cond = R[P:, P:][idx.unsqueeze(-1), idx.unsqueeze(-2)] - Bk @ Bk.transpose(-1, -2)
            L, info = torch.linalg.cholesky_ex(cond)
            bad = info != 0  # a block the projection left not positive definite: its conditional sds alone
            if bool(bad.any()):
                L[bad] = torch.diag_embed(torch.diagonal(cond[bad], dim1=-2, dim2=-1).clamp_min(1e-12).sqrt())
            L_g.append(L)
            start += G * d
        return L_p, B, L_g

    @property
    def mean(self):
        return self.frame_loc + self._frame_shift(detach=True) * self.frame_scale

    @property
    def stddev(self):
        return self._variance_u(self._factors(detach=True)).sqrt() * self.frame_scale

    @property
    def scale_tril(self):
        """The Cholesky factor L (K, K) of the covariance in z-space, in layout order (see ``perm``)."""
        return self._dense_tril() * self.frame_scale[self.perm].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"K={self.size}, population={self.num_population}, groups={list(self.group_shapes)}"


def _small_factor(size: int, rank: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 1e-2 * torch.randn(size, rank, generator=g, dtype=torch.float64).to(dtype)


FAMILIES = {"meanfield": MeanField, "fullrank": FullRank, "lowrank": LowRank, "structured": Structured}
#: the default: ``structured`` for a model with group effects, ``meanfield`` for one without
AUTO = "auto"


def resolve_family(name: str, layout=None) -> str:
    """The family ``name`` stands for: ``auto`` is ``structured`` when the layout has groups
    (mean-field would drop every group effect's correlation with its scale), else ``meanfield``."""
    if name == AUTO:
        return "structured" if layout is not None and len(layout.groups) else "meanfield"
    return name


def make_family(name: str, size: int, loc=None, scale=0.1, dtype=torch.float32, num_factors: int = 2,
                layout=None) -> Family:
    """Build a family by name: ``meanfield``, ``fullrank``, ``lowrank``, ``structured`` or ``auto``
    (:func:`resolve_family`).

    Args:
        layout: the space's :class:`svi.transforms.GroupLayout`, for ``structured`` and ``auto``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    name = resolve_family(name, layout)
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)} or {AUTO}")
    if name == "structured":
        return Structured(size, loc, scale, dtype, layout=layout)

    if name == "lowrank":
        fam = LowRank(size, loc, scale, dtype, num_factors=min(num_factors, size))
        fam.reset_parameters()
        return fam
    return FAMILIES[name](size, loc, scale, dtype)
