"""Log densities the built-in models share, written with torch ops so they broadcast
over (S, B) without building distribution objects on every step."""

from __future__ import annotations

import math

import torch
from torch.distributions import Normal, StudentT

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_2 = math.log(2.0)


def normal(x: torch.Tensor, loc, scale) -> torch.Tensor:
    """log N(x | loc, scale), elementwise."""
    if isinstance(scale, (int, float)):
        return -0.5 * ((x - loc) / scale) ** 2 - (math.log(scale) + _HALF_LOG_2PI)
    return -0.5 * ((x - loc) / scale) ** 2 - scale.log() - _HALF_LOG_2PI


def half_normal(x: torch.Tensor, scale: float) -> torch.Tensor:
    """log HalfNormal(x | scale) for x > 0."""
    return normal(x, 0.0, scale) + _LOG_2


def student_t(x: torch.Tensor, df, loc, scale) -> torch.Tensor:
    """log StudentT(x | df, loc, scale), elementwise (torch's own density)."""
    return StudentT(df, loc, scale, validate_args=False).log_prob(x)


def half_student_t(x: torch.Tensor, df: float, scale: float) -> torch.Tensor:
    return student_t(x, df, 0.0, scale) + _LOG_2


def normal_prior(x: torch.Tensor, scale: float | None, event_dims: int) -> torch.Tensor:
    """Sum of log N(0, scale) over the last ``event_dims`` dims; ``scale=None`` is a flat prior (0)."""
    if scale is None:
        return x.new_zeros(x.shape[: x.dim() - event_dims])
    lp = normal(x, 0.0, scale)
    return lp.sum(tuple(range(-event_dims, 0))) if event_dims else lp


__all__ = ["normal", "half_normal", "student_t", "half_student_t", "normal_prior", "Normal"]
