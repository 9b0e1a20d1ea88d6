"""What the training loop reports, as callbacks: metrics to the tracker, a progress bar or log
lines to the console, and the held-out rows' predictive density.

The loop calls ``after_step(state, info, action)`` once the step and the schedule's action have
been applied, and ``finish(state, converged)`` once the returned q is final. A callback reads
the state; it never changes what the fit computes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from svi import progress
from svi.tracking import Tracker

__all__ = ["Callback", "TrackerMetrics", "ConsoleReport", "HeldoutScore", "step_metrics"]

log = logging.getLogger("svi")


class Callback:
    """A no-op base: override what you need."""

    def after_step(self, state: Any, info: Any, action: Any) -> None:
        pass

    def finish(self, state: Any, converged: bool) -> None:
        pass


def step_metrics(state: Any, info: Any, rows_per_s: float, all_identity: bool) -> dict[str, float]:
    """One step's metrics: the ELBO and its parts, the gradient norm, the step size, throughput."""
    e = info.elbo
    metrics = {
        "elbo": float(e.value), "log_prior": float(e.log_prior), "log_likelihood": float(e.log_likelihood),
        "log_det": float(e.log_det), "entropy": float(e.entropy), "grad_norm": float(info.grad_norm),
        "lr": float(state.optimizer.param_groups[0]["lr"]), "rows_per_s": rows_per_s,
        "nonfinite_steps": float(state.schedule.nonfinite_total),
    }
    if all_identity:  # no constrained parameter: log|det J| is 0, a chart of nothing
        del metrics["log_det"]
    return metrics


class _Throughput:
    """Rows per second since the last report."""

    def __init__(self):
        self.rows, self.since = 0, time.perf_counter()

    def add(self, rows: int) -> None:
        self.rows += rows

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.rows / max(now - self.since, 1e-9)
        self.rows, self.since = 0, now
        return rate


class TrackerMetrics(Callback):
    """Every ``log_every`` steps (and at ``max_steps``) the step's metrics; at each window's end
    its mean ELBO and the stopping rule's statistics."""

    def __init__(self, tracker: Tracker, log_every: int, max_steps: int, all_identity: bool):
        self.tracker, self.log_every, self.max_steps, self.all_identity = tracker, log_every, max_steps, all_identity
        self.throughput = _Throughput()

    def after_step(self, state, info, action) -> None:
        self.throughput.add(info.rows)
        if state.step % self.log_every == 0 or state.step == self.max_steps:
            self.tracker.log_metrics(step_metrics(state, info, self.throughput.take(), self.all_identity), state.step)
        if action.window_closed:
            self.tracker.log_metrics({"elbo_window_mean": action.elbo, **action.stats}, state.step)


class ConsoleReport(Callback):
    """A progress bar on rank 0 (or, without one, a log line every ``log_every`` steps) showing the
    ELBO, the step size, the stopping rule's last distance to its tolerance and throughput."""

    def __init__(self, setting: bool | str, rank: int, initial_step: int, log_every: int, max_steps: int,
                 tol_param: float):
        # no total: the stopping rule, not max_steps, decides when a fit ends, so a bar out of
        # max_steps would stall at a small fraction with a meaningless ETA
        self.bar = progress.bar(setting, rank, initial=initial_step, desc="fit", unit="step")
        self.lines = self.bar is None and rank == 0 and setting is not False
        self.announce = rank == 0 and setting is not False
        self.rank, self.log_every, self.max_steps, self.tol_param = rank, log_every, max_steps, tol_param
        self.throughput = _Throughput()
        self.stats: dict = {}  # the last distance stays on show until the next phase ends

    def after_step(self, state, info, action) -> None:
        self.throughput.add(info.rows)
        if action.window_closed and action.stats:
            self.stats = action.stats
        if state.step % self.log_every == 0 or state.step == self.max_steps:
            if self.bar is not None or self.lines:
                m = step_metrics(state, info, self.throughput.take(), True)
                if self.bar is not None:
                    self.bar.set_postfix_str(f"elbo {m['elbo']:.6g}  lr {m['lr']:.3g}  {self._distance()}"
                                             f"rows/s {m['rows_per_s']:.3g}")
                else:
                    log.info("step %d (max %d)  elbo %.6g  lr %.3g  %srows/s %.3g", state.step, self.max_steps,
                             m["elbo"], m["lr"], self._distance(), m["rows_per_s"])
        if self.bar is not None:
            self.bar.update(1)

    def _distance(self) -> str:
        moved, rescaled = self.stats.get("stop_mean_move_sd"), self.stats.get("stop_sd_change")
        if moved is None:
            return ""
        return f"means moved {moved:.2g} sd, sds {rescaled:.2g} (tol {self.tol_param:g})  "

    def finish(self, state, converged: bool) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.announce:
            log.info("%s at step %d", "converged" if converged else "stopped without converging", state.step)


class HeldoutScore(Callback):
    """The held-out rows' average log predictive density every ``every`` steps and for the
    returned q (which may be an average of the iterates: it replaces a score of the same step).

    Args:
        score: q's held-out log predictive density (a function of the family).
        started: when the fit began, for the (step, seconds, value) records.
    """

    def __init__(self, score: Callable[[Any], float], every: int, tracker: Tracker, started: float):
        self.score, self.every, self.tracker, self.started = score, every, tracker, started
        self.scores: list[tuple[int, float, float]] = []

    def _record(self, state) -> None:
        value = self.score(state.family)
        self.scores.append((state.step, time.perf_counter() - self.started, value))
        self.tracker.log_metrics({"heldout_lpd": value}, state.step)

    def after_step(self, state, info, action) -> None:
        if not action.stop and state.step % self.every == 0:
            self._record(state)

    def finish(self, state, converged: bool) -> None:
        if self.scores and self.scores[-1][0] == state.step:
            self.scores.pop()
        self._record(state)
