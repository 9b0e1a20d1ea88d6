"""Synthetic data with known true parameters for every built-in model.

``make_truth`` draws the parameters once from a seed; ``make_rows`` draws rows given
them, chunk by chunk (so a pipeline can write data sets far larger than memory).
Column layout: features ``x0 .. x{D-1}``, outcome ``y``, group id ``g``, exposure
``exposure``, histogram bins ``h0 .. h{D-1}``; ``batch_columns`` gives the matching
``columns=`` mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SyntheticSpec", "MODELS", "make_truth", "make_rows", "batch_columns", "build_model", "as_batch"]

MODELS = ("linear", "logistic", "poisson", "student_t", "hierarchical_linear", "hierarchical_logistic", "mixture",
          "histogram_mixture")

#: pixels behind each histogram row of ``histogram_mixture``
HISTOGRAM_PIXELS = 4096


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.

    Attributes:
        model: one of :data:`MODELS`.
        n_features: D (ignored by ``mixture``; the bins of ``histogram_mixture``).
        n_groups: groups of the hierarchical models.
        n_components: mixture components (``mixture``, ``histogram_mixture``).
        varying_slopes: hierarchical models with group slopes.
    """

    model: str = "logistic"
    n_features: int = 10
    n_groups: int = 20
    n_components: int = 3
    varying_slopes: bool = False

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown synthetic model {self.model!r}; choose one of {', '.join(MODELS)}")


def make_truth(spec: SyntheticSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """True parameter values, named as the built-in model's parameters."""
    rng = np.random.default_rng([seed, 7])
    D = spec.n_features
    w = rng.normal(0.0, 0.5, size=D)
    if spec.model == "histogram_mixture":
        return _histogram_truth(rng, spec.n_components, D)
    if spec.model == "mixture":
        K = spec.n_components
        loc = np.sort(rng.normal(0.0, 3.0, size=K)) + np.arange(K) * 2.0
        return {"loc": loc, "scale": rng.uniform(0.5, 1.5, size=K), "weights": rng.dirichlet(np.full(K, 5.0))}
    truth = {"w": w, "b": np.asarray(rng.normal(0.0, 0.5))}
    if spec.model in ("linear", "student_t"):
        truth["sigma"] = np.asarray(rng.uniform(0.5, 1.5))
    if spec.model == "student_t":
        truth["nu"] = np.asarray(4.0)
    if spec.model.startswith("hierarchical"):
        G = spec.n_groups
        mu, tau, z = truth["b"], np.asarray(0.7), rng.normal(size=G)
        truth = {"w": w, "mu": mu, "tau": tau, "alpha": mu + tau * z}
        if spec.varying_slopes:
            truth["tau_w"] = np.full(D, 0.3)
            truth["beta"] = w + truth["tau_w"] * rng.normal(size=(G, D))
        if spec.model == "hierarchical_linear":
            truth["sigma"] = np.asarray(0.8)
    return truth


def make_rows(spec: SyntheticSpec, truth: dict[str, np.ndarray], n: int, rng: np.random.Generator,
              dtype=np.float32) -> dict[str, np.ndarray]:
    """n rows as {column: array}: x0..x{D-1} (float), y, and g / exposure where the model has them."""
    if spec.model == "histogram_mixture":
        comp = rng.choice(len(truth["weights"]), size=n, p=truth["weights"])
        bins = truth["loc"].shape[1]
        counts = rng.poisson(truth["loc"][comp] * (HISTOGRAM_PIXELS / bins))
        return {f"h{j}": col for j, col in enumerate((counts * (bins / HISTOGRAM_PIXELS)).astype(dtype).T)}
    if spec.model == "mixture":
        comp = rng.choice(len(truth["weights"]), size=n, p=truth["weights"])
        y = rng.normal(truth["loc"][comp], truth["scale"][comp])
        return {"y": y.astype(dtype)}
    D = spec.n_features
    x = rng.standard_normal((n, D), dtype=np.float32 if dtype == np.float32 else np.float64)
    cols: dict[str, np.ndarray] = {f"x{j}": x[:, j] for j in range(D)}
    if spec.model.startswith("hierarchical"):
        g = rng.integers(0, spec.n_groups, size=n)
        if spec.varying_slopes:
            eta = truth["alpha"][g] + np.einsum("nd,nd->n", x, truth["beta"][g])
        else:
            eta = x @ truth["w"] + truth["alpha"][g]
        cols["g"] = g.astype(np.int64)
    else:
        eta = x @ truth["w"] + truth["b"]
    if spec.model in ("linear", "hierarchical_linear"):
        y = eta + truth["sigma"] * rng.standard_normal(n)
    elif spec.model in ("logistic", "hierarchical_logistic"):
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(np.float64)
    elif spec.model == "poisson":
        exposure = rng.uniform(0.5, 2.0, size=n)
        y = rng.poisson(np.exp(np.clip(eta, None, 20.0)) * exposure).astype(np.float64)
        cols["exposure"] = exposure.astype(dtype)
    else:  # student_t
        y = eta + truth["sigma"] * rng.standard_t(truth["nu"], size=n)
    cols["y"] = y.astype(dtype)
    return cols


def batch_columns(spec: SyntheticSpec) -> dict[str, object]:
    """The ``columns=`` mapping from the built-in model's batch keys to these columns."""
    if spec.model == "mixture":
        return {"y": "y"}
    if spec.model == "histogram_mixture":
        return {"y": "h*"}
    cols: dict[str, object] = {"x": "x*", "y": "y"}
    if spec.model.startswith("hierarchical"):
        cols["g"] = "g"
    if spec.model == "poisson":
        cols["exposure"] = "exposure"
    return cols


def build_model(spec: SyntheticSpec):
    """The built-in model that generated this data set."""
    from svi import models

    if spec.model == "linear":
        return models.LinearRegression(spec.n_features)
    if spec.model == "logistic":
        return models.LogisticRegression(spec.n_features)
    if spec.model == "poisson":
        return models.PoissonRegression(spec.n_features, exposure=True)
    if spec.model == "student_t":
        return models.StudentTRegression(spec.n_features)
    if spec.model == "hierarchical_linear":
        return models.HierarchicalLinearRegression(spec.n_features, spec.n_groups, spec.varying_slopes)
    if spec.model == "hierarchical_logistic":
        return models.HierarchicalLogisticRegression(spec.n_features, spec.n_groups, spec.varying_slopes)
    if spec.model == "histogram_mixture":
        return models.GaussianMixture(spec.n_components, n_features=spec.n_features)
    return models.GaussianMixture(spec.n_components)


def as_batch(spec: SyntheticSpec, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows as the model's batch keys (for in-memory fits): x stacked into a matrix."""
    if spec.model == "mixture":
        return {"y": cols["y"]}
    if spec.model == "histogram_mixture":
        return {"y": np.stack([cols[f"h{j}"] for j in range(spec.n_features)], axis=1)}
    out = {"x": np.stack([cols[f"x{j}"] for j in range(spec.n_features)], axis=1), "y": cols["y"]}
    for key in ("g", "exposure"):
        if key in cols:
            out[key] = cols[key]
    return out


def _histogram_truth(rng: np.random.Generator, K: int, D: int) -> dict[str, np.ndarray]:
    """Clusters of colour-histogram-like rows, the shape of the ADVI paper's image data (Kucukelbir
    et al., JMLR 2017, section 4.3): each cluster a bin profile drawn from Dirichlet(2), each row
    ``HISTOGRAM_PIXELS`` pixels binned by Poisson counts, scaled so a bin's mean is about 1.

    ``loc`` and ``scale`` are each cluster's exact mean and sd per bin, which a Gaussian mixture
    fitted to many rows recovers; ``weights`` are drawn from Dirichlet(5), so no cluster is tiny."""
    profile = rng.dirichlet(np.full(D, 2.0), size=K) * D  # (K, D), rows average 1 per bin
    return {"loc": profile, "scale": np.sqrt(profile * D / HISTOGRAM_PIXELS),
            "weights": rng.dirichlet(np.full(K, 5.0))}
