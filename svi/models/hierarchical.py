"""Hierarchical (multilevel) regressions with varying intercepts, and optionally
varying slopes, by an integer group column.

Batch keys: ``x`` (B, D), ``y`` (B,), ``g`` (B,) integer group ids in [0, n_groups).

    alpha_g ~ Normal(mu, tau)           (group intercepts, natural scale)
    beta_g  ~ Normal(w, tau_w)          (group slopes, with ``varying_slopes``)
    eta     = alpha_g + x . beta_g      (x . w without varying slopes)

``alpha`` and ``beta`` are declared as group effects (``svi.Param(loc=..., scale=...)``),
the same declaration a user's model makes: svi chooses per group how far to centre them
from the data (:mod:`svi.centering`), so groups of 8 rows and of 8,000 are fitted in the
coordinates that suit them. ``centering=1`` (centred) or ``0`` (non-centred) fixes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from svi import constraints
from svi.model import Model, Param
from svi.models import _lpdf
from svi.models.glm import _binary_labels

__all__ = ["HierarchicalLinearRegression", "HierarchicalLogisticRegression"]


class _Hierarchical(Model):
    batch_keys = ("x", "y", "g")
    integer_keys = ("g",)
    #: optional: which batch key indexes each axis of a parameter (group ids ``g``, feature
    #: columns ``x``), so ArviZ export gets named dims and coordinates (see Posterior.to_arviz);
    #: parameters a model does not have (``beta`` without varying slopes) are ignored
    dims = {"w": ("x",), "alpha": ("g",), "tau_w": ("x",), "beta": ("g", "x")}

    def __init__(self, n_features: int, n_groups: int, varying_slopes: bool = False, prior_scale: float = 1.0,
                 intercept_scale: float = 10.0, tau_scale: float = 1.0, centering: str | float = "auto"):
        self.n_features, self.n_groups = int(n_features), int(n_groups)
        self.varying_slopes = bool(varying_slopes)
        self.prior_scale, self.intercept_scale, self.tau_scale = prior_scale, intercept_scale, tau_scale
        self.params = {
            "w": Param((self.n_features,)),
            "mu": Param(()),
            "tau": Param((), constraints.positive),
            "alpha": Param((self.n_groups,), loc="mu", scale="tau", centering=centering),
        }
        if self.varying_slopes:
            self.params["tau_w"] = Param((self.n_features,), constraints.positive)
            self.params["beta"] = Param((self.n_groups, self.n_features), loc="w", scale="tau_w", centering=centering)

    def _hier_prior(self, p):
        lp = (_lpdf.normal_prior(p["w"], self.prior_scale, 1) + _lpdf.normal_prior(p["mu"], self.intercept_scale, 0)
              + _lpdf.half_normal(p["tau"], self.tau_scale))
        lp = lp + _lpdf.normal(p["alpha"], p["mu"].unsqueeze(-1), p["tau"].unsqueeze(-1)).sum(-1)
        if self.varying_slopes:
            lp = lp + _lpdf.half_normal(p["tau_w"], self.tau_scale).sum(-1)
            lp = lp + _lpdf.normal(p["beta"], p["w"].unsqueeze(1), p["tau_w"].unsqueeze(1)).sum((-1, -2))
        return lp

    def log_prior(self, p):
        return self._hier_prior(p)

    def validate(self, batch):
        # torch indexing would read a negative id as a group counted from the end, silently
        g = batch.get("g")
        if g is None:
            return {}
        rule = f"{self.name}: group ids g must be integers from 0 to {self.n_groups - 1} (n_groups={self.n_groups})"
        return {"g": ((g < 0) | (g >= self.n_groups), rule)}

    def linear_predictor(self, p, batch):
        """(S, B) linear predictor with each row's group effects."""
        x, g = batch["x"], batch["g"]
        if self.varying_slopes:
            return p["alpha"][:, g] + (p["beta"][:, g, :] * x).sum(-1)
        return p["w"] @ x.T + p["alpha"][:, g]

    def group_effects(self, p):
        """Group intercepts (S, G) (and slopes (S, G, D)) from a draw."""
        out = {"intercept": p["alpha"]}
        if self.varying_slopes:
            out["slope"] = p["beta"]
        return out


class HierarchicalLinearRegression(_Hierarchical):
    """y ~ Normal(eta, sigma), sigma ~ HalfNormal(sigma_scale)."""

    def __init__(self, n_features, n_groups, varying_slopes=False, prior_scale=1.0, intercept_scale=10.0,
                 tau_scale=1.0, sigma_scale: float = 1.0, centering: str | float = "auto"):
        super().__init__(n_features, n_groups, varying_slopes, prior_scale, intercept_scale, tau_scale, centering)
        self.sigma_scale = sigma_scale
        self.params["sigma"] = Param((), constraints.positive)

    def log_prior(self, p):
        return self._hier_prior(p) + _lpdf.half_normal(p["sigma"], self.sigma_scale)

    def log_likelihood(self, p, batch):
        return _lpdf.normal(batch["y"], self.linear_predictor(p, batch), p["sigma"].unsqueeze(-1))

    def sample_obs(self, p, batch, generator=None):
        mean = self.linear_predictor(p, batch)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + p["sigma"].unsqueeze(-1) * noise


class HierarchicalLogisticRegression(_Hierarchical):
    """y ~ Bernoulli(logit = eta)."""

    def log_likelihood(self, p, batch):
        logits = self.linear_predictor(p, batch)
        return batch["y"] * logits - F.softplus(logits, threshold=40.0)

    def validate(self, batch):
        return {**super().validate(batch), **_binary_labels(self.name, batch)}

    def sample_obs(self, p, batch, generator=None):
        return torch.bernoulli(torch.sigmoid(self.linear_predictor(p, batch)), generator=generator)

    def predict_probability(self, p, batch):
        """P(y = 1 | theta) per particle and row, (S, B), with each row's group effects."""
        return torch.sigmoid(self.linear_predictor(p, batch))
