"""Finite Gaussian mixture in one dimension with ordered component means (which
removes label switching) and simplex weights.

Batch key: ``y`` (B,).
"""

from __future__ import annotations

import torch
from torch.distributions import Dirichlet

from svi import constraints
from svi.model import Model, Param
from svi.models import _lpdf

__all__ = ["GaussianMixture"]


class GaussianMixture(Model):
    """y ~ sum_k weights_k Normal(loc_k, scale_k).

    Args:
        n_components: K >= 2.
        loc_scale: loc_k ~ N(0, loc_scale).
        scale_scale: scale_k ~ HalfNormal(scale_scale).
        concentration: weights ~ Dirichlet(concentration, ..., concentration).
    """

    batch_keys = ("y",)

    def __init__(self, n_components: int = 2, loc_scale: float = 5.0, scale_scale: float = 2.0,
                 concentration: float = 1.0):
        if n_components < 2:
            raise ValueError(f"a mixture needs at least 2 components, got {n_components}")
        self.n_components = int(n_components)
        self.loc_scale, self.scale_scale, self.concentration = loc_scale, scale_scale, concentration
        K = self.n_components
        # Start the means spread apart: the ordered transform's zero is a point where they nearly coincide.
        spread = [(k - (K - 1) / 2) * loc_scale / K for k in range(K)]
        self.params = {
            "loc": Param((K,), constraints.ordered_vector, init=spread),
            "scale": Param((K,), constraints.positive),
            "weights": Param((K,), constraints.simplex),
        }

    def log_prior(self, p):
        conc = torch.full((self.n_components,), float(self.concentration), dtype=p["weights"].dtype,
                          device=p["weights"].device)
        return (_lpdf.normal_prior(p["loc"], self.loc_scale, 1) + _lpdf.half_normal(p["scale"], self.scale_scale).sum(-1)
                + Dirichlet(conc, validate_args=False).log_prob(p["weights"]))

    def component_log_density(self, p, y):
        """(S, B, K): log weights_k + log Normal(y | loc_k, scale_k)."""
        return p["weights"].log().unsqueeze(1) + _lpdf.normal(y[None, :, None], p["loc"].unsqueeze(1),
                                                              p["scale"].unsqueeze(1))

    def log_likelihood(self, p, batch):
        return torch.logsumexp(self.component_log_density(p, batch["y"]), dim=-1)

    def sample_obs(self, p, batch, generator=None):
        S, B = p["loc"].shape[0], batch["y"].shape[0]
        comp = torch.multinomial(p["weights"], B, replacement=True, generator=generator)  # (S, B)
        loc, scale = p["loc"].gather(1, comp), p["scale"].gather(1, comp)
        return loc + scale * torch.randn((S, B), generator=generator, dtype=loc.dtype, device=loc.device)
