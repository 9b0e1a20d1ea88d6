"""Generalised linear models: linear (Gaussian), logistic, Poisson and robust Student-t regression.

Batch keys: ``x`` (B, D) design matrix, ``y`` (B,) outcome; Poisson regression
optionally reads ``exposure`` (B,) as a log offset. Coefficients ``w`` have
N(0, prior_scale) priors (``prior_scale=None``: flat), the intercept ``b`` has
N(0, intercept_scale) (``None``: flat).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Gamma

from svi import constraints
from svi.model import Model, Param
from svi.models import _lpdf

__all__ = ["LinearRegression", "LogisticRegression", "PoissonRegression", "StudentTRegression"]


def _binary_labels(model_name: str, batch) -> dict:
    """The :meth:`svi.Model.validate` check of Bernoulli labels: ``y`` must be 0 or 1."""
    y = batch.get("y")
    return {} if y is None else {"y": ((y != 0) & (y != 1), f"{model_name}: labels y must be 0 or 1")}


class _Regression(Model):
    batch_keys = ("x", "y")
    #: optional: which batch key indexes each axis of a parameter, so ArviZ export names the
    #: coefficients' dim ``x`` with the feature columns as coordinates (see Posterior.to_arviz)
    dims = {"w": ("x",)}

    def __init__(self, n_features: int, prior_scale: float | None = 1.0, intercept_scale: float | None = 10.0):
        self.n_features = int(n_features)
        self.prior_scale = prior_scale
        self.intercept_scale = intercept_scale
        self.params = {"w": Param((self.n_features,)), "b": Param(())}

    def _coef_prior(self, p):
        return _lpdf.normal_prior(p["w"], self.prior_scale, 1) + _lpdf.normal_prior(p["b"], self.intercept_scale, 0)

    @staticmethod
    def linear_predictor(p, x):
        """(S, B): x @ w + b for every particle, computed as w x^T + b, already (S, B): its
        backward is (S, B) @ (B, D), a product BLAS runs several times faster here than the
        (D, B) @ (B, S) that the transposed form's backward needs."""
        return torch.addmm(p["b"].unsqueeze(-1), p["w"], x.T)

    def log_prior(self, p):
        return self._coef_prior(p)


class LinearRegression(_Regression):
    """y ~ Normal(x w + b, sigma).

    Args:
        n_features: D.
        prior_scale, intercept_scale: prior sds of w and b (``None``: flat).
        noise: a known noise sd; when ``None`` sigma is a parameter with a HalfNormal(sigma_scale) prior.
        sigma_scale: prior scale of sigma.
    """

    def __init__(self, n_features, prior_scale=1.0, intercept_scale=10.0, noise: float | None = None,
                 sigma_scale: float = 1.0):
        super().__init__(n_features, prior_scale, intercept_scale)
        self.noise = noise
        self.sigma_scale = sigma_scale
        if noise is None:
            self.params["sigma"] = Param((), constraints.positive)

    def log_prior(self, p):
        lp = self._coef_prior(p)
        return lp if self.noise is not None else lp + _lpdf.half_normal(p["sigma"], self.sigma_scale)

    def log_likelihood(self, p, batch):
        sigma = self.noise if self.noise is not None else p["sigma"].unsqueeze(-1)
        return _lpdf.normal(batch["y"], self.linear_predictor(p, batch["x"]), sigma)

    def sample_obs(self, p, batch, generator=None):
        sigma = self.noise if self.noise is not None else p["sigma"].unsqueeze(-1)
        mean = self.linear_predictor(p, batch["x"])
        return mean + sigma * torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)


class LogisticRegression(_Regression):
    """y ~ Bernoulli(logit = x w + b), y in {0, 1}."""

    def __init__(self, n_features, prior_scale=1.0, intercept_scale=5.0):
        super().__init__(n_features, prior_scale, intercept_scale)

    def log_likelihood(self, p, batch):
        logits = self.linear_predictor(p, batch["x"])
        return batch["y"] * logits - F.softplus(logits, threshold=40.0)  # Bernoulli(logits): y eta - log(1 + e^eta)

    def validate(self, batch):
        # y eta - log(1 + e^eta) is finite for any y, so a label of -1 or 0.3 would fit silently
        return _binary_labels(self.name, batch)

    def sample_obs(self, p, batch, generator=None):
        probs = torch.sigmoid(self.linear_predictor(p, batch["x"]))
        return torch.bernoulli(probs, generator=generator)

    def predict_probability(self, p, batch):
        """P(y = 1 | theta) per particle and row, (S, B): the inverse logit of the linear predictor
        (what ``Posterior.predict(kind="probability")`` averages; no Bernoulli noise)."""
        return torch.sigmoid(self.linear_predictor(p, batch["x"]))


class PoissonRegression(_Regression):
    """y ~ Poisson(exp(x w + b + log exposure)); ``exposure`` is an optional batch key."""

    def __init__(self, n_features, prior_scale=1.0, intercept_scale=5.0, exposure: bool = False):
        super().__init__(n_features, prior_scale, intercept_scale)
        self.exposure = bool(exposure)
        self.batch_keys = ("x", "y", "exposure") if exposure else ("x", "y")

    def _log_rate(self, p, batch):
        eta = self.linear_predictor(p, batch["x"])
        return eta + batch["exposure"].log() if self.exposure else eta

    def log_likelihood(self, p, batch):
        y = batch["y"]
        log_rate = self._log_rate(p, batch)
        return y * log_rate - log_rate.exp() - torch.lgamma(y + 1)

    def validate(self, batch):
        checks = {}
        y, exposure = batch.get("y"), batch.get("exposure")
        if y is not None:  # the density above is finite for y = -0.5 and for many negative y
            checks["y"] = ((y < 0) | (y != torch.floor(y)), f"{self.name}: counts y must be integers >= 0")
        if self.exposure and exposure is not None:
            checks["exposure"] = (~(exposure > 0), f"{self.name}: exposure must be positive (its log is an offset)")
        return checks

    def sample_obs(self, p, batch, generator=None):
        return torch.poisson(self._log_rate(p, batch).exp(), generator=generator)


class StudentTRegression(_Regression):
    """Robust regression: y ~ StudentT(nu, x w + b, sigma), with nu > 1 learned under a
    Gamma(2, 0.1) prior (Juárez and Steel, JBES 2010) unless fixed by ``nu``."""

    def __init__(self, n_features, prior_scale=1.0, intercept_scale=10.0, sigma_scale: float = 1.0,
                 nu: float | None = None):
        super().__init__(n_features, prior_scale, intercept_scale)
        self.sigma_scale = sigma_scale
        self.nu = nu
        self.params["sigma"] = Param((), constraints.positive)
        if nu is None:
            self.params["nu"] = Param((), constraints.greater_than(1.0), init=5.0)

    def log_prior(self, p):
        lp = self._coef_prior(p) + _lpdf.half_normal(p["sigma"], self.sigma_scale)
        if self.nu is None:
            lp = lp + Gamma(2.0, 0.1, validate_args=False).log_prob(p["nu"])
        return lp

    def log_likelihood(self, p, batch):
        nu = self.nu if self.nu is not None else p["nu"].unsqueeze(-1)
        return _lpdf.student_t(batch["y"], nu, self.linear_predictor(p, batch["x"]), p["sigma"].unsqueeze(-1))

    def sample_obs(self, p, batch, generator=None):
        nu = self.nu if self.nu is not None else p["nu"].unsqueeze(-1)
        mean = self.linear_predictor(p, batch["x"])
        df = torch.as_tensor(nu, dtype=mean.dtype, device=mean.device).expand_as(mean)
        noise = torch.distributions.StudentT(df, validate_args=False).sample()
        return mean + p["sigma"].unsqueeze(-1) * noise
