"""Hierarchical (multilevel) regressions with varying intercepts, and optionally
varying slopes, by an integer group column.

Batch keys: ``x`` (B, D), ``y`` (B,), ``g`` (B,) integer group ids in [0, n_groups).

Non-centred (the default; suits groups with little data each):

    intercept_g = mu + tau * alpha_raw_g,           alpha_raw_g ~ N(0, 1)
    slope_g     = w + tau_w * w_raw_g  (varying),   w_raw_g ~ N(0, I)

Centred (``centered=True``; suits groups with much data each, where the data pin
every group effect and the non-centred posterior becomes a curved ridge):

    intercept_g = alpha_raw_g ~ N(mu, tau),         slope_g = w + w_raw_g, w_raw_g ~ N(0, tau_w)

Papaspiliopoulos, Roberts, Sköld, "A general framework for the parametrization of
hierarchical models", Statistical Science 2007, explain which suits which data.
The parameter names are the same in both forms.
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
    #: parameters a model does not have (``w_raw`` without varying slopes) are ignored
    dims = {"w": ("x",), "alpha_raw": ("g",), "tau_w": ("x",), "w_raw": ("g", "x")}

    def __init__(self, n_features: int, n_groups: int, varying_slopes: bool = False, prior_scale: float = 1.0,
                 intercept_scale: float = 10.0, tau_scale: float = 1.0, centered: bool = False):
        self.n_features, self.n_groups = int(n_features), int(n_groups)
        self.varying_slopes = bool(varying_slopes)
        self.centered = bool(centered)
        self.prior_scale, self.intercept_scale, self.tau_scale = prior_scale, intercept_scale, tau_scale
        self.params = {
            "w": Param((self.n_features,)),
            "mu": Param(()),
            "tau": Param((), constraints.positive),
            "alpha_raw": Param((self.n_groups,)),
        }
        if self.varying_slopes:
            self.params["tau_w"] = Param((self.n_features,), constraints.positive)
            self.params["w_raw"] = Param((self.n_groups, self.n_features))

    def _hier_prior(self, p):
        lp = (_lpdf.normal_prior(p["w"], self.prior_scale, 1) + _lpdf.normal_prior(p["mu"], self.intercept_scale, 0)
              + _lpdf.half_normal(p["tau"], self.tau_scale))
        if self.centered:
            lp = lp + _lpdf.normal(p["alpha_raw"], p["mu"].unsqueeze(-1), p["tau"].unsqueeze(-1)).sum(-1)
        else:
            lp = lp + _lpdf.normal_prior(p["alpha_raw"], 1.0, 1)
        if self.varying_slopes:
            lp = lp + _lpdf.half_normal(p["tau_w"], self.tau_scale).sum(-1)
            if self.centered:
                lp = lp + _lpdf.normal(p["w_raw"], 0.0, p["tau_w"].unsqueeze(1)).sum((-1, -2))
            else:
                lp = lp + _lpdf.normal_prior(p["w_raw"], 1.0, 2)
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
        if self.centered:
            eta = p["w"] @ x.T + p["alpha_raw"][:, g]
        else:
            eta = p["w"] @ x.T + p["mu"].unsqueeze(-1) + p["tau"].unsqueeze(-1) * p["alpha_raw"][:, g]
        if self.varying_slopes:
            w_raw = p["w_raw"][:, g, :]  # (S, B, D)
            slope_dev = w_raw if self.centered else p["tau_w"].unsqueeze(1) * w_raw
            eta = eta + (slope_dev * x).sum(-1)
        return eta

    def group_effects(self, p):
        """Group intercepts (S, G) (and slopes (S, G, D)) from a draw."""
        if self.centered:
            out = {"intercept": p["alpha_raw"]}
        else:
            out = {"intercept": p["mu"].unsqueeze(-1) + p["tau"].unsqueeze(-1) * p["alpha_raw"]}
        if self.varying_slopes:
            dev = p["w_raw"] if self.centered else p["tau_w"].unsqueeze(1) * p["w_raw"]
            out["slope"] = p["w"].unsqueeze(1) + dev
        return out


class HierarchicalLinearRegression(_Hierarchical):
    """y ~ Normal(eta, sigma), sigma ~ HalfNormal(sigma_scale)."""

    def __init__(self, n_features, n_groups, varying_slopes=False, prior_scale=1.0, intercept_scale=10.0,
                 tau_scale=1.0, sigma_scale: float = 1.0, centered: bool = False):
        super().__init__(n_features, n_groups, varying_slopes, prior_scale, intercept_scale, tau_scale, centered)
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
