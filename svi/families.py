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

__all__ = ["Family", "MeanField", "FullRank", "LowRank", "make_family", "FAMILIES"]

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
        device = self.frame_loc.device
        if precision is None or gradient is None:
            self.frame_gradient = torch.zeros(0, dtype=dtype, device=device)
        else:
            c = scale.to(torch.float64)
            g = torch.as_tensor(gradient).to(torch.float64)
            self.frame_gradient = (c * g if c.dim() == 1 else c.T @ g).to(dtype).to(device)
        if precision is None:
            self.frame_precision = torch.zeros(0, dtype=dtype, device=device)
        else:
            h = torch.as_tensor(precision).to(torch.float64)
            c = scale.to(torch.float64)
            h_u = c.unsqueeze(-1) * h * c if c.dim() == 1 else c.T @ h @ c
            if self.frame_kind == "tril" and torch.allclose(h_u, torch.eye(self.size, dtype=h_u.dtype), atol=1e-6):
                h_u = torch.ones(self.size, dtype=h_u.dtype)  # the Cholesky frame whitens H exactly
            self.frame_precision = h_u.to(dtype).to(self.frame_loc.device)
        self.reset_parameters()

    @property
    def has_quadratic(self) -> bool:
        return self.frame_precision.numel() > 0

    def quadratic(self, u: torch.Tensor) -> torch.Tensor:
        """g_u^T u - u^T H_u u / 2 for frame coordinates u (S, K): the second-order Taylor
        expansion of the log density at frame_loc, up to a constant; the control variate's integrand."""
        h = self.frame_precision
        quad = -0.5 * (u * u * h).sum(-1) if h.dim() == 1 else -0.5 * ((u @ h) * u).sum(-1)
        return quad + u @ self.frame_gradient if self.frame_gradient.numel() else quad

    def expected_quadratic(self) -> torch.Tensor:
        """E_q of :meth:`quadratic` in closed form: g_u^T m - (m^T H_u m + tr(H_u Sigma_u)) / 2."""
        raise NotImplementedError

    def _mean_quadratic(self, m: torch.Tensor) -> torch.Tensor:
        h = self.frame_precision
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
        for name in ("frame_precision", "frame_gradient"):
            key = prefix + name
            if key in state_dict:  # its shape says what is stored: (0,) none, (K,) or (K, K)
                setattr(self, name, torch.empty_like(state_dict[key], device=self.frame_loc.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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

    scale = stddev


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

    scale = scale_tril

    @property
    def stddev(self):
        return self.scale_tril.pow(2).sum(-1).sqrt()


class LowRank(Family):
    """Low-rank plus diagonal Gaussian, q = N(mu, F F^T + diag(d^2)) (Ong, Nott, Smith,
    "Gaussian variational approximation with a factor covariance structure", JCGS 2018).

    Args:
        rank: r, the number of factor columns.
    """

    name = "lowrank"

    def __init__(self, size, loc=None, scale=0.1, dtype=torch.float32, rank: int = 2):
        super().__init__(size, loc, scale, dtype)
        if rank < 1:
            raise ValueError(f"lowrank rank must be at least 1, got {rank}")
        self.rank = int(rank)
        self.loc = nn.Parameter(torch.zeros(size, dtype=dtype))
        self.factor = nn.Parameter(torch.zeros(size, self.rank, dtype=dtype))
        self.log_diag = nn.Parameter(torch.zeros(size, dtype=dtype))

    def reset_parameters(self):
        with torch.no_grad():
            self.loc.zero_()
            # A zero factor is a saddle of the ELBO in F (its gradient vanishes there);
            # a small deterministic start breaks the symmetry.
            self.factor.copy_(_small_factor(self.size, self.rank, self.factor.dtype))
            self.log_diag.zero_()

    def noise_size(self):
        return self.rank + self.size

    def forward(self, eps, return_frame: bool = False):
        e_factor, e_diag = eps[:, : self.rank], eps[:, self.rank :]
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
        capacitance = torch.eye(self.rank, dtype=d_inv_f.dtype, device=d_inv_f.device) + d_inv_f.T @ d_inv_f
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
    def scale(self):
        """(factor, diagonal sd) of the covariance in z-space."""
        s = self.frame_scale
        return self.factor.detach() * s.unsqueeze(-1), self.log_diag.detach().exp() * s


def _small_factor(size: int, rank: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 1e-2 * torch.randn(size, rank, generator=g, dtype=torch.float64).to(dtype)


FAMILIES = {"meanfield": MeanField, "fullrank": FullRank, "lowrank": LowRank}


def make_family(name: str, size: int, loc=None, scale=0.1, dtype=torch.float32, rank: int = 2) -> Family:
    """Build a family by name: ``meanfield``, ``fullrank`` or ``lowrank``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}")
    if name == "lowrank":
        fam = LowRank(size, loc, scale, dtype, rank=min(rank, size))
        fam.reset_parameters()
        return fam
    return FAMILIES[name](size, loc, scale, dtype)
