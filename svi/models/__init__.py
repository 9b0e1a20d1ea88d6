"""Built-in models, written with the public :class:`svi.Model` API only."""

from svi.models.glm import LinearRegression, LogisticRegression, PoissonRegression, StudentTRegression
from svi.models.hierarchical import HierarchicalLinearRegression, HierarchicalLogisticRegression
from svi.models.mixture import GaussianMixture

__all__ = [
    "LinearRegression",
    "LogisticRegression",
    "PoissonRegression",
    "StudentTRegression",
    "HierarchicalLinearRegression",
    "HierarchicalLogisticRegression",
    "GaussianMixture",
]
