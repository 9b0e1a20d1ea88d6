"""What the fit does after each step: one interface over both stopping rules.

A schedule sees every step's result (``observe(info) -> Action``) and decides everything the
loop does beyond the step itself: when a window of steps ends, whether the step size decays,
whether the fit switches to the sticking-the-landing gradient, the control variates' weights,
when to return to the last good state after non-finite steps, and when to stop, keeping
"stop" apart from "converged" (a rule that gives up stops without converging). The loop
applies the action; the schedule owns its state (windows, rule, iterate averages, non-finite
counts, the ELBO history) and round-trips it through ``state_dict``.

Two schedules, chosen by ``convergence`` in the options:

- :class:`PosteriorSchedule`: windows that grow as the step size decays, a stall test on their
  mean ELBO, Polyak-Ruppert averages per phase and a stopping rule in posterior units
  (:class:`svi.convergence.PosteriorConvergence`; Dhaka et al., NeurIPS 2020; Welandawe et al.,
  JMLR 2024).
- :class:`StanSchedule`: Stan's relative ELBO tolerance every ``eval_elbo`` steps
  (:class:`svi.convergence.StanConvergence`; Kucukelbir et al., JMLR 2017, section 3.3).
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from svi.convergence import Decision, IterateAverager, PosteriorConvergence, StanConvergence
from svi.options import FitOptions

__all__ = ["Action", "Schedule", "PosteriorSchedule", "StanSchedule", "make_schedule", "control_variate_weights"]


@dataclass(frozen=True)
class Action:
    """What the loop does after a step. The default is to go on."""

    restore: bool = False  # too many non-finite steps in a row: back to the last good state, half the step size
    give_up: bool = False  # ... and no restores are left: the fit fails
    window_closed: bool = False  # a window of steps ended here
    clean: bool = False  # ... without a non-finite step: the state is a good one to return to
    decay: float = 1.0  # multiply the step size by this
    stl: bool = False  # switch to the sticking-the-landing gradient from here on
    cv_weights: tuple[float, float] | None = None  # the control variates' new weights
    stop: bool = False  # end the fit here
    converged: bool = False  # ... and the rule was met ("stop" alone: it gave up)
    diverging: bool = False  # Stan's rule: the relative ELBO change is large
    reason: str = ""
    stats: dict = field(default_factory=dict)  # the rule's statistics at this window, logged as metrics
    elbo: float | None = None  # the window's ELBO (its mean, or Stan's evaluation)

    @property
    def stop_reason(self) -> str:
        """``converged`` or ``max_decays`` for a stop; "" otherwise."""
        return "converged" if self.converged else ("max_decays" if self.stop else "")


GO_ON = Action()


def control_variate_weights(samples: torch.Tensor) -> tuple[float, float]:
    """Weights of the two control variates that minimise the variance of the ELBO estimate,
    from one window of (raw estimate, cv_quadratic, cv_data): c = -Cov(h)^-1 Cov(h, f), each
    clipped to [0, 1]. A zero-mean term keeps the estimator unbiased for any weight, and for a
    Gaussian posterior the weight is exactly 1; where the warm start's expansion fits poorly the
    weight falls and the control variate cannot add variance."""
    if len(samples) < 8:
        return (1.0, 1.0)
    f, h = samples[:, 0], samples[:, 1:]
    weights = [0.0, 0.0]
    live = [j for j in range(2) if float(h[:, j].var()) > 0]
    if not live:
        return (1.0, 1.0)
    hc = h[:, live] - h[:, live].mean(0)
    fc = f - f.mean()
    sol = torch.linalg.lstsq(hc, -fc.unsqueeze(-1)).solution.squeeze(-1)
    for j, c in zip(live, sol.tolist()):
        weights[j] = min(max(c, 0.0), 1.0) if math.isfinite(c) else 0.0
    return (weights[0], weights[1])


class Schedule:
    """The part both rules share: windows of per-step ELBO estimates, the control variates'
    weights re-estimated per window, and the guard against runs of non-finite steps.

    Args:
        options: the fit's options (window, patience, restores).
        reduce: the mean over ranks, so every rank decides alike from the same numbers.
    """

    def __init__(self, options: FitOptions, reduce: Callable[[torch.Tensor], torch.Tensor]):
        self.options = options
        self.reduce = reduce
        self.window_elbos: list[torch.Tensor] = []  # this window's per-step ELBO estimates (NaN: not applied)
        self.window_cv: list[torch.Tensor] = []  # this window's (raw ELBO, cv_quadratic, cv_data)
        self.history: list[tuple[int, float]] = []  # (step, ELBO) at each window's end
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.restores = 0
        self.window_nonfinite = 0
        self.window_end = 0

    def start(self, step: int) -> None:
        """Place the current window's end (a resumed fit may be inside one)."""
        self.window_end = step + self.window_length() - len(self.window_elbos)

    def window_length(self) -> int:
        raise NotImplementedError

    def observe(self, info: Any, step: int) -> Action:
        """Record one step (``info``: a :class:`svi.trainer.StepInfo`); what to do now."""
        restore = give_up = False
        if info.ok:
            e = info.elbo
            self.window_elbos.append(e.value)
            self.window_cv.append(torch.stack([e.raw, e.cv_quadratic, e.cv_data]))
            self.nonfinite_run = 0
        else:
            self.window_elbos.append(torch.tensor(math.nan))
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            self.window_nonfinite += 1
            if self.nonfinite_run >= self.options.nonfinite_patience:
                # skipped until here: the next step draws new noise and a new batch
                give_up = self.restores >= self.options.max_nonfinite_restores
                restore = not give_up
        if give_up:
            return Action(give_up=True)
        if restore:
            self.restores += 1
            self.nonfinite_run = 0
        if step < self.window_end:
            return Action(restore=True) if restore else GO_ON
        values = self.reduce(torch.stack(self.window_elbos).double()).tolist()
        self.window_elbos = []
        weights = None
        if self.window_cv:
            weights = control_variate_weights(self.reduce(torch.stack(self.window_cv).double()))
            self.window_cv = []
        clean, self.window_nonfinite = self.window_nonfinite == 0, 0
        action = self._close_window(values, step)
        self.window_end = step + self.window_length()
        return dataclasses.replace(action, restore=restore, window_closed=True, clean=clean, cv_weights=weights)

    def _close_window(self, values: list[float], step: int) -> Action:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"window_elbos": [float(v) for v in self.window_elbos],
                "window_cv": [t.tolist() for t in self.window_cv],
                "history": [[int(s), float(v)] for s, v in self.history],
                "nonfinite": {"total": self.nonfinite_total, "run": self.nonfinite_run, "restores": self.restores,
                              "window": self.window_nonfinite}}

    def load_state_dict(self, saved: dict, dtype: torch.dtype = torch.float32) -> None:
        self.window_elbos = [torch.tensor(v, dtype=dtype) for v in saved["window_elbos"]]
        self.window_cv = [torch.tensor(v, dtype=dtype) for v in saved["window_cv"]]
        self.history = [(int(s), float(v)) for s, v in saved["history"]]
        n = saved["nonfinite"]
        self.nonfinite_total, self.nonfinite_run, self.restores, self.window_nonfinite = (
            int(n["total"]), int(n["run"]), int(n["restores"]), int(n["window"]))


class PosteriorSchedule(Schedule):
    """Stall-triggered step decay with iterate averaging and a stopping rule in posterior units.

    A window whose mean ELBO shows no significant gain over the last marks a stall: the family
    continues from its phase average, which is compared with the previous phase's; the fit has
    converged when they agree within ``tol_param``, else the step size decays by ``lr_decay``
    and a new phase begins. Windows grow by 1/lr_decay per decay, so each spans as many
    relaxation times (about 1/lr steps) as the first.

    Args:
        family: q; its mean and sd are read, and its parameters set to the phase average at a stall.
        averager: the family's Polyak-Ruppert sums (``None``: no averaging).
    """

    def __init__(self, options: FitOptions, reduce, family, averager: IterateAverager | None):
        super().__init__(options, reduce)
        self.rule = PosteriorConvergence(options.tol_param, options.max_decays)
        self.family = family
        self.averager = averager

    def window_length(self) -> int:
        o = self.options
        return int(round(o.window * (1.0 / o.lr_decay) ** self.rule.decays))

    def _close_window(self, values: list[float], step: int) -> Action:
        o = self.options
        finite = [e for e in values if math.isfinite(e)]
        mean = sum(finite) / len(finite) if finite else math.nan
        self.history.append((step, mean))
        keep = self.rule.windows_in_phase >= 1  # the first window of a phase is burn-in
        stalled = self.rule.window_stalled(values)
        if self.averager is not None:
            self.averager.close_window(keep)
        if not stalled:
            return Action(elbo=mean)
        if self.averager is not None and self.averager.phase_count:
            self.averager.load_phase_average()  # the family continues from the average
        decision: Decision = self.rule.phase_end(self.family.mean, self.family.stddev)
        stl = False
        if decision.decay:
            # Near the optimum STL lowers the variance; with the quadratic control variate the
            # analytic entropy is already exact and STL would add the score term's noise back.
            stl = o.stl == "auto" and not (o.control_variate and self.family.has_quadratic)
            if self.averager is not None:
                self.averager.new_phase()
        return Action(decay=o.lr_decay if decision.decay else 1.0, stl=stl, stop=decision.stop,
                      converged=decision.converged, reason=decision.reason, stats=decision.stats, elbo=mean)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rule": self.rule.state_dict(),
                "averager": self.averager.state_dict() if self.averager is not None else None}

    def load_state_dict(self, saved: dict, dtype: torch.dtype = torch.float32) -> None:
        super().load_state_dict(saved, dtype)
        self.rule.load_state_dict(saved["rule"])
        if self.averager is not None and saved["averager"] is not None:
            self.averager.load_state_dict(saved["averager"])


class StanSchedule(Schedule):
    """Stan's rule: every ``eval_elbo`` steps the ELBO is evaluated with ``elbo_samples`` draws
    on the fixed evaluation batch, and the fit stops when the relative change's mean or median
    falls below ``tol_rel_obj``.

    Args:
        evaluate: the ELBO evaluation (a collective: every rank calls it).
    """

    def __init__(self, options: FitOptions, reduce, evaluate: Callable[[], float]):
        super().__init__(options, reduce)
        self.rule = StanConvergence(options.tol_rel_obj, options.eval_elbo, options.max_steps)
        self.evaluate = evaluate
        self.averager = None

    def window_length(self) -> int:
        return self.options.eval_elbo

    def _close_window(self, values: list[float], step: int) -> Action:
        value = self.evaluate()
        self.history.append((step, value))
        d = self.rule.update(value)
        return Action(stop=d.stop, converged=d.converged, diverging=d.diverging, reason=d.reason, elbo=value)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rule": self.rule.state_dict(), "averager": None}

    def load_state_dict(self, saved: dict, dtype: torch.dtype = torch.float32) -> None:
        super().load_state_dict(saved, dtype)
        self.rule.load_state_dict(saved["rule"])


def make_schedule(options: FitOptions, family, reduce, evaluate: Callable[[], float]) -> Schedule:
    """The schedule ``options.convergence`` names, with the iterate averager it uses."""
    if options.convergence == "stan":
        return StanSchedule(options, reduce, evaluate)
    averager = IterateAverager(list(family.parameters())) if options.averaging else None
    return PosteriorSchedule(options, reduce, family, averager)
