"""Constraints a `Param` may carry.

Re-exports `torch.distributions.constraints` and adds the ones models need that
torch lacks. Bijections for them are registered into torch's own `biject_to`
registry by :mod:`svi.transforms`, so user code and the engine see one registry.
"""

from __future__ import annotations

import torch
from torch.distributions.constraints import *  # noqa: F401,F403 (re-export is the point)
from torch.distributions.constraints import Constraint

__all__ = [name for name in dir(torch.distributions.constraints) if not name.startswith("_")]
__all__ += ["ordered_vector", "OrderedVector"]


class OrderedVector(Constraint):
    """Real vectors with strictly increasing entries (Stan's ``ordered[K]``)."""

    is_discrete = False
    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        if value.shape[-1] < 2:
            return torch.isfinite(value).all(-1)
        increasing = (value[..., 1:] > value[..., :-1]).all(-1)
        return increasing & torch.isfinite(value).all(-1)

    def __repr__(self) -> str:
        return "OrderedVector()"


ordered_vector = OrderedVector()
