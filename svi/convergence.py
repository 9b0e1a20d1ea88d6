"""When to stop, and when to shrink the step size.

Two rules, chosen by ``convergence`` in the options:

``stan``: Stan's relative-ELBO tolerance (Kucukelbir et al., JMLR 2017, section
3.3; Stan's ``advi::run``). Every ``eval_elbo`` steps the ELBO is estimated with
``elbo_samples`` draws on a fixed evaluation batch; the relative change
|(ELBO_t - ELBO_{t-1}) / ELBO_t| goes into a circular buffer of
max(0.1 max_steps / eval_elbo, 2) entries; stop when its mean or its median falls
below ``tol_rel_obj``.

``posterior`` (the default): stall-triggered step decay with Polyak-Ruppert
iterate averaging and a stopping rule in posterior units, after Dhaka et al.,
"Robust, accurate stochastic optimization for variational inference" (NeurIPS
2020) and Welandawe et al., "Robust, automated, and accurate black-box variational
inference" (JMLR 2024). Steps are grouped in windows. A window whose mean ELBO
estimate is not above the previous window's by more than their combined standard
error marks a stall: the iterate average of the current phase is compared with
the previous phase's, and if the means moved less than ``tol_param`` of q's sd
and the sds less than a relative ``tol_param``, the fit has converged; otherwise
the step size is multiplied by ``lr_decay`` and a new phase starts. Averaging
(Polyak and Juditsky, SIAM J. Control Optim. 1992) removes the jitter any
positive step size leaves.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median

import torch

__all__ = ["StanConvergence", "PosteriorConvergence", "Decision", "IterateAverager"]


@dataclass(frozen=True)
class Decision:
    """What a convergence rule decided at an evaluation point.

    ``stop`` ends the fit; ``converged`` says whether the rule was met when it did. A rule that
    gives up (``max_decays``) stops without converging, and the fit reports it as such.
    """

    converged: bool = False
    decay: bool = False
    reason: str = ""
    diverging: bool = False
    stop: bool = False
    stats: dict = field(default_factory=dict)  # the rule's statistics, logged as metrics

    def __post_init__(self):
        if self.converged:
            object.__setattr__(self, "stop", True)


class StanConvergence:
    """Stan's relative tolerance on the ELBO (mean or median of a circular buffer).

    Args:
        tol_rel_obj: the tolerance (Stan's default 0.01).
        eval_elbo: steps between evaluations (Stan's default 100).
        max_steps: sizes the buffer as max(0.1 max_steps / eval_elbo, 2).
    """

    def __init__(self, tol_rel_obj: float = 0.01, eval_elbo: int = 100, max_steps: int = 10000):
        self.tol_rel_obj = float(tol_rel_obj)
        self.eval_elbo = int(eval_elbo)
        self.size = max(int(0.1 * max_steps / eval_elbo), 2)
        self.buffer: deque[float] = deque(maxlen=self.size)
        # Stan starts from ELBO 0, so its first relative change is 1.
        self.previous = 0.0
        self.evaluations = 0

    def update(self, elbo: float) -> Decision:
        self.evaluations += 1
        prev, self.previous = self.previous, float(elbo)
        rel = abs((elbo - prev) / elbo) if elbo != 0 else math.inf
        self.buffer.append(rel)
        mean_rel, median_rel = sum(self.buffer) / len(self.buffer), median(self.buffer)
        if mean_rel < self.tol_rel_obj:
            return Decision(converged=True, reason=f"mean relative ELBO change {mean_rel:.3g} < tol_rel_obj")
        if median_rel < self.tol_rel_obj:
            return Decision(converged=True, reason=f"median relative ELBO change {median_rel:.3g} < tol_rel_obj")
        # Stan: after 10 evaluations, a mean or median above 0.5 "MAY BE DIVERGING"
        diverging = self.evaluations > 10 and (mean_rel > 0.5 or median_rel > 0.5)
        return Decision(diverging=diverging, reason="may be diverging" if diverging else "")

    def state_dict(self) -> dict:
        return {"buffer": list(self.buffer), "previous": self.previous, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = deque(state["buffer"], maxlen=self.size)
        self.previous = state["previous"]
        self.evaluations = int(state["evaluations"])


class IterateAverager:
    """Sums of the family's parameters over the current window and phase (Polyak-Ruppert)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.window_sum = [torch.zeros_like(p) for p in params]
        self.window_count = 0
        self.phase_sum = [torch.zeros_like(p) for p in params]
        self.phase_count = 0

    @torch.no_grad()
    def add(self) -> None:
        torch._foreach_add_(self.window_sum, [p.detach() for p in self.params])
        self.window_count += 1

    @torch.no_grad()
    def close_window(self, keep: bool) -> None:
        """End a window; ``keep`` adds it to the phase average (the first window after a
        decay is burn-in and is dropped)."""
        if keep and self.window_count:
            torch._foreach_add_(self.phase_sum, self.window_sum)
            self.phase_count += self.window_count
        for t in self.window_sum:
            t.zero_()
        self.window_count = 0

    def last_window_average(self) -> list[torch.Tensor]:
        return [s / max(self.window_count, 1) for s in self.window_sum]

    def phase_average(self) -> list[torch.Tensor]:
        return [s / self.phase_count for s in self.phase_sum]

    @torch.no_grad()
    def load_phase_average(self) -> None:
        """Set the parameters to this phase's average."""
        for p, v in zip(self.params, self.phase_average()):
            p.copy_(v)

    def sums_for_compiled_step(self) -> list[torch.Tensor]:
        """The window's sums, for a compiled step that adds each applied step's parameters inside
        its graph; it reports each such step with :meth:`count_added`."""
        return self.window_sum

    def count_added(self) -> None:
        self.window_count += 1

    def new_phase(self) -> None:
        for t in self.phase_sum:
            t.zero_()
        self.phase_count = 0

    def state_dict(self) -> dict:
        return {
            "window_sum": [t.clone() for t in self.window_sum],
            "window_count": self.window_count,
            "phase_sum": [t.clone() for t in self.phase_sum],
            "phase_count": self.phase_count,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for t, s in zip(self.window_sum, state["window_sum"]):
            t.copy_(s)
        for t, s in zip(self.phase_sum, state["phase_sum"]):
            t.copy_(s)
        self.window_count = int(state["window_count"])
        self.phase_count = int(state["phase_count"])


def worst_allowed(num_coordinates: int) -> float:
    """The single-coordinate bound of the posterior rule, in units of ``tol_param``."""
    return max(4.0, math.sqrt(2.0 * math.log(max(num_coordinates, 1))) + 1.0)


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


class PosteriorConvergence:
    """Stall detection on window-mean ELBO estimates and a stopping rule in posterior units.

    Args:
        tol_param: converged when, between the averages of two consecutive phases, the means
            moved by less than ``tol_param`` of q's sd and the sds changed by less than a relative
            ``tol_param``, both as root mean squares over the coordinates, and no single
            coordinate moved by more than ``max(4, sqrt(2 ln K) + 1) x tol_param`` (K coordinates:
            the largest of K averaging errors whose root mean square is ``tol_param`` is about
            ``sqrt(2 ln K) x tol_param``, so a fixed 4 would never be met by models of many
            thousands of parameters whose every coordinate is within tolerance).
        max_decays: stop after this many step-size decays even if not yet within tolerance.
        min_windows: a phase lasts at least this many windows before it may stall.
    """

    def __init__(self, tol_param: float = 0.05, max_decays: int = 10, min_windows: int = 2):
        self.tol_param = float(tol_param)
        self.max_decays = int(max_decays)
        self.min_windows = int(min_windows)
        self.prev_window: tuple[float, float] | None = None  # (mean, standard error)
        self.windows_in_phase = 0
        self.decays = 0
        self.prev_phase: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, sd) in z-space

    def window_stalled(self, elbos: list[float]) -> bool:
        """Record one window of per-step ELBO estimates; True when it shows no significant gain."""
        finite = [e for e in elbos if math.isfinite(e)]
        n = len(finite)
        mean = sum(finite) / n if n else -math.inf
        var = sum((e - mean) ** 2 for e in finite) / (n - 1) if n > 1 else math.inf
        se = math.sqrt(var / n) if n > 1 else math.inf
        prev, self.prev_window = self.prev_window, (mean, se)
        self.windows_in_phase += 1
        if prev is None or self.windows_in_phase < self.min_windows:
            return False
        gain, noise = mean - prev[0], math.sqrt(se**2 + prev[1] ** 2)
        return not gain > noise

    def phase_end(self, mean: torch.Tensor, sd: torch.Tensor) -> Decision:
        """Called at a stall with the phase's averaged q (z-space mean and marginal sd)."""
        prev, self.prev_phase = self.prev_phase, (mean.detach().clone(), sd.detach().clone())
        self.windows_in_phase = 0
        if prev is not None:
            move = (mean - prev[0]).abs() / sd
            rescale = (sd.log() - prev[1].log()).abs()
            moved, rescaled = _rms(move), _rms(rescale)
            worst = max(move.max().item(), rescale.max().item())
            detail = f"means moved {moved:.3g} sd, sds changed {rescaled:.3g} (rms), worst {worst:.3g}"
            stats = {"stop_mean_move_sd": moved, "stop_sd_change": rescaled, "stop_worst_change": worst,
                     "stop_tolerance": self.tol_param, "stop_decays": float(self.decays)}
            if moved < self.tol_param and rescaled < self.tol_param and worst < worst_allowed(mean.numel()) * self.tol_param:
                return Decision(converged=True, reason=f"posterior stable: {detail}", stats=stats)
            detail = "stall: " + detail
        else:
            detail, stats = "stall", {}
        if self.decays >= self.max_decays:
            # giving up is not converging: the posterior was still moving when the decays ran out
            return Decision(stop=True, reason=f"gave up after {self.decays} step-size decays (max_decays) before "
                                              f"the posterior was stable; last {detail}", stats=stats)
        self.decays += 1
        return Decision(decay=True, reason=detail, stats=stats)

    def state_dict(self) -> dict:
        return {
            "prev_window": list(self.prev_window) if self.prev_window else None,
            "windows_in_phase": self.windows_in_phase,
            "decays": self.decays,
            "prev_phase": list(self.prev_phase) if self.prev_phase else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.prev_window = tuple(state["prev_window"]) if state["prev_window"] else None
        self.windows_in_phase = int(state["windows_in_phase"])
        self.decays = int(state["decays"])
        self.prev_phase = tuple(state["prev_phase"]) if state["prev_phase"] else None
