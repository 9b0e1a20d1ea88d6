"""The training loop.

``train`` is one flat loop: a step (``step(ctx, state, batch) -> (state, info)``), the
schedule's verdict on it (``state.schedule.observe(info) -> Action``, svi.schedule), the action
applied (:func:`apply`), the callbacks told (svi.callbacks), and a checkpoint when one is due.
Set-up (warm start, eta search) lives in its own functions. The state is a set of components,
each owning its ``state_dict`` (the family, the optimiser, the objective, the schedule, the
noise, the data stream), which a checkpoint saves one entry each.
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from svi import distributed as dist
from svi import progress
from svi.callbacks import Callback, ConsoleReport, HeldoutScore, TrackerMetrics
from svi.centering import choose_centering, describe as describe_centering
from svi.compiled import CompiledStep, compile_problem
from svi.convergence import IterateAverager
from svi.elbo import DataAnchor, ElboEstimate, Objective, batch_size, elbo, log_predictive_density
from svi.families import Family, FullRank, LowRank, make_family
from svi.model import Model, ModelError
from svi.optim import StanStepSize, functional_kind, make_optimizer, make_scheduler, search_eta
from svi.options import FitOptions
from svi.schedule import GO_ON, Action, Schedule, make_schedule
from svi.tracking import NullTracker, Tracker
from svi.transforms import ParamSpace
from svi.warmstart import curvature, find_mode, laplace_warm_start, warm_start_rows

__all__ = ["FitContext", "TrainState", "StepInfo", "TrainResult", "NonFiniteError", "init_state", "step", "train",
           "apply", "default_callbacks", "evaluate_elbo", "state_dict", "load_state_dict"]

log = logging.getLogger("svi")


class NonFiniteError(FloatingPointError):
    """The ELBO or its gradient stayed non-finite after every restore."""


@dataclass
class FitContext:
    """What does not change during a fit."""

    model: Model
    space: ParamSpace
    options: FitOptions
    num_rows: int
    dtype: torch.dtype
    device: torch.device
    eval_batch: Mapping[str, torch.Tensor]
    warm_batch: Mapping[str, torch.Tensor] | None = None
    heldout_batch: Mapping[str, torch.Tensor] | None = None  # rows kept out of the fit (options.heldout)
    started: float = field(default_factory=time.perf_counter)  # when the fit began (before the warm start)
    # one pass over the data for the data control variate's statistics at z (svi.elbo.anchor_statistics);
    # reanchor(z, leave=True) keeps the pass's progress bar on screen when it is done
    reanchor: Callable[..., DataAnchor] | None = None
    batch_rows: int | None = None  # rows of a full batch (a pass's last batch may have fewer)
    rank: int = 0
    world_size: int = 1
    world: Any = None  # svi.distributed.World; collectives run through it

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, so every rank makes the same decision from the same numbers."""
        return dist.all_mean(t, self.world)


@dataclass
class TrainState:
    """Everything that changes during a fit, as components that each own their state_dict."""

    family: Family
    trainable: torch.nn.Module  # the family, or the family wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any  # a torch.optim.lr_scheduler, or None
    generator: torch.Generator  # the draws' noise
    objective: Objective  # the ELBO estimator, with its STL switch, control-variate weights and anchor
    schedule: Schedule  # windows, stopping rule, iterate averages, non-finite guard, ELBO history
    compiled: CompiledStep | None = None  # the compiled single-process step (options.compile), from its start step
    step: int = 0
    last_good: dict | None = None  # family and optimizer at the last window without a non-finite step
    warm_start: str = ""
    eta: float | None = None

    @property
    def averager(self) -> IterateAverager | None:
        """The schedule's Polyak-Ruppert sums (None under Stan's rule or without averaging)."""
        return self.schedule.averager


@dataclass(frozen=True)
class StepInfo:
    elbo: ElboEstimate  # detached
    grad_norm: torch.Tensor
    ok: bool
    rows: int


@dataclass(frozen=True)
class TrainResult:
    family: Family
    steps: int
    converged: bool
    reason: str
    stop_reason: str  # "converged", "max_decays" or "max_steps"
    history: list
    warm_start: str
    eta: float | None
    nonfinite_steps: int
    seconds: float
    heldout: list = field(default_factory=list)  # (step, seconds since the fit began, heldout_lpd)


# --- set-up -------------------------------------------------------------------------------
def build_family(ctx: FitContext) -> tuple[Family, str, bool]:
    """The family at its starting point: the warm start's Gaussian, or Param.init / ``init`` with ``init_scale``.

    Returns:
        (family, a note for the log, whether the warm start set the frame).
    """
    o = ctx.options
    start = _start_from_data(ctx, ctx.space.initial_point(torch.float64, default=o.init))
    layout = ctx.space.group_layout()
    family = make_family(o.family, ctx.space.size, loc=start, scale=o.init_scale, dtype=ctx.dtype, num_factors=o.rank,
                         layout=layout)
    note, warm = "no warm start", False
    if o.warm_start == "laplace" and ctx.warm_batch is not None:
        rows = warm_start_rows(ctx.space.size, next(iter(ctx.warm_batch.values())).shape[0])
        bar = progress.bar(o.progress, ctx.rank, desc="warm start", unit="it",
                           postfix=f"L-BFGS on {rows:,} of {ctx.num_rows:,} rows")
        if bar is None and ctx.rank == 0:  # a phase of its own (seconds on a large sample): say so before it
            log.info("warm start: L-BFGS towards the mode on %s of %s rows, then %s ...", f"{rows:,}",
                     f"{ctx.num_rows:,}", "Newton steps on all of them" if newton_start_follows(ctx)
                     else "the best Gaussian on its path")

        def on_iteration(log_density: float) -> None:  # every L-BFGS iteration, the group effects' rounds included
            bar.update(1)
            bar.set_postfix_str(f"L-BFGS on {rows:,} of {ctx.num_rows:,} rows  log density {log_density:.6g}",
                                refresh=False)

        hook = on_iteration if bar is not None else None
        try:
            if ctx.space.auto_centering:
                start, centring = _centre_group_effects(ctx, start, on_iteration=hook)
                note = centring + "; "
            ws = _warm_start(ctx, start, family.warm_start_shape, hook)
        finally:
            if bar is not None:
                bar.close()
        if ws is None:
            note = "warm start found no usable Gaussian (curvature not positive definite); started from init"
            warnings.warn(note, RuntimeWarning, stacklevel=3)
        else:
            family.set_frame(ws.loc, ws.scale, ws.precision if o.control_variate else None, ws.gradient)
            note, warm = "warm start: " + (note if ctx.space.auto_centering else "") + ws.note, True
    elif ctx.space.auto_centering:  # no warm start: centre from the data at the initial point
        _, centring = _centre_group_effects(ctx, start, search=False)
        family = make_family(o.family, ctx.space.size, loc=ctx.space.initial_point(torch.float64, default=o.init),
                             scale=o.init_scale, dtype=ctx.dtype, num_factors=o.rank, layout=layout)
        note = f"no warm start; {centring}"
    return family.to(ctx.device), note, warm


def _start_from_data(ctx: FitContext, start: torch.Tensor) -> torch.Tensor:
    """``start`` with the values the model reads off a sample of rows (``Model.initial_values``).
    Ranks may read different rows; DDP broadcasts rank 0's family when it wraps it."""
    if type(ctx.model).initial_values is Model.initial_values:  # the model reads nothing off the data
        return start
    rows = ctx.warm_batch if ctx.warm_batch is not None else ctx.eval_batch
    rows = {k: v.cpu() for k, v in rows.items()}
    values = ctx.model.initial_values(rows, torch.Generator().manual_seed(ctx.options.seed))
    if not values:
        return start
    params = ctx.model.get_params()
    theta, _ = ctx.space.constrain(start.unsqueeze(0))
    for name, value in values.items():
        if name not in params:
            raise ModelError(f"{ctx.model.name}.initial_values returned {name!r}, which is not a parameter; "
                             f"parameters are {', '.join(params)}")
        x = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        if tuple(x.shape) != params[name].shape or not bool(params[name].constraint.check(x.unsqueeze(0)).all()):
            raise ModelError(f"{ctx.model.name}.initial_values: {name!r} has shape {tuple(x.shape)} or values "
                             f"outside {params[name].constraint!r}; expected shape {params[name].shape} inside it")
        theta[name] = x.unsqueeze(0)
    z = ctx.space.unconstrain(theta)[0]
    if not bool(torch.isfinite(z).all()):
        raise ModelError(f"{ctx.model.name}.initial_values gave values on the edge of a constraint "
                         "(unconstrained value not finite); move them inside")
    return z


def _warm_start(ctx: FitContext, start: torch.Tensor, frame: str, on_iteration=None):
    o = ctx.options
    # the Newton start moves the point on to the full data's mode: the sample's mode need not be polished
    settle = NEWTON_SETTLE if newton_start_follows(ctx) else None
    return laplace_warm_start(ctx.model, ctx.space, ctx.warm_batch, ctx.num_rows, start, frame=frame,
                              num_draws=o.warm_start_draws, seed=o.seed, on_iteration=on_iteration, settle=settle)


def _centre_group_effects(ctx: FitContext, start: torch.Tensor, search: bool = True, rounds: int = 2,
                          on_iteration=None):
    """Choose the "auto" group effects' centring from the data; returns (the point in the chosen
    coordinates to warm-start from, a line for the log).

    Each round finds the mode by L-BFGS (no Gaussians: only the point is needed), reads each
    group's data information and the groups' empirical-Bayes scale there (svi.centering), sets
    the centring and carries the point, with that scale, to the new coordinates. The first round
    runs non-centred: its mode is bounded whatever the groups, where the centred density is not
    as the scale goes to 0; the second reads the information at the better mode. A round whose
    mode search ends outside the support keeps the last one. Without ``search`` the centring is
    read at ``start`` (no warm start). ``on_iteration`` is L-BFGS's progress hook (see
    :func:`svi.warmstart.find_mode`).
    """
    space = ctx.space
    rows = ctx.warm_batch if ctx.warm_batch is not None else ctx.eval_batch
    point = start
    for _ in range(rounds if search else 1):
        if search:
            found, _ = find_mode(ctx.model, space, rows, ctx.num_rows, point, on_iteration=on_iteration)
            if not bool(torch.isfinite(found).all()):
                break
            point = found
        theta, _ = space.constrain(point.unsqueeze(0))
        chosen, scales = choose_centering(ctx.model, space, rows, ctx.num_rows, point)
        log.debug("centring round: scales at the point %s, implied by the groups' data %s; %s",
                  {k: theta[k].reshape(-1)[:4].tolist() for k in scales},
                  {k: v.reshape(-1)[:4].tolist() for k, v in scales.items()}, describe_centering(chosen))
        for name, lam in chosen.items():  # every rank the same centring, whatever its rows
            space.set_centering(name, ctx.all_mean(lam))
        theta = {**theta, **{k: ctx.all_mean(v).to(theta[k]).unsqueeze(0) for k, v in scales.items()}}
        point = space.unconstrain(theta)[0]
    return point, describe_centering(space.centering)


def init_state(ctx: FitContext, family: Family, warm_note: str = "", eta: float | None = None,
               trainable: torch.nn.Module | None = None, anchor: DataAnchor | None = None) -> TrainState:
    o = ctx.options
    lr = eta if eta is not None else o.lr
    optimizer = make_optimizer(o.optimizer, family.parameters(), lr=lr, **o.optimizer_options)
    generator = torch.Generator(device=ctx.device).manual_seed(_noise_seed(o.seed, ctx.rank))
    objective = Objective(ctx.model, ctx.space, ctx.num_rows, o.num_particles, o.antithetic, o.control_variate,
                          stl=o.stl is True, anchor=anchor)
    schedule = make_schedule(o, family, ctx.all_mean, lambda: evaluate_elbo(ctx, family, o.elbo_samples, generator))
    compiled = _compiled_step(ctx, objective, family, optimizer, distributed=trainable is not None)
    return TrainState(
        family=family, trainable=trainable if trainable is not None else family, optimizer=optimizer,
        lr_scheduler=make_scheduler(optimizer, o.lr_schedule), generator=generator, objective=objective,
        schedule=schedule, compiled=compiled, warm_start=warm_note, eta=eta,
    )


def _compiled_step(ctx: FitContext, objective: Objective, family: Family, optimizer: torch.optim.Optimizer,
                   distributed: bool) -> CompiledStep | None:
    """The compiled step ``options.compile`` asks for, or ``None`` (the module step throughout).
    ``auto`` compiles only where it can and says why not at debug level; ``true`` warns."""
    o = ctx.options
    if o.compile is False:
        return None
    problem = ("it needs one process" if distributed else
               "it needs an optimiser with a functional form (adam, sgd, stan without extras)"
               if functional_kind(optimizer) is None else compile_problem(ctx.device.type))
    if problem:
        if o.compile is True:
            warnings.warn(f"svi: compile=true but {problem}; running the uncompiled step", RuntimeWarning, stacklevel=3)
        else:
            log.debug("svi: the step is not compiled: %s", problem)
        return None
    return CompiledStep(objective, family, optimizer, compile=True, start=0 if o.compile is True else o.compile_after,
                        rows=ctx.batch_rows)


def _noise_seed(seed: int, rank: int) -> int:
    # Ranks draw independent noise: averaging W independent draws lowers the variance of
    # the averaged gradient, which shared draws would not.
    return (seed * 7919 + rank * 104729 + 1) % (2**63 - 1)


@torch.no_grad()
def evaluate_elbo(ctx: FitContext, family: Family, num_draws: int, generator: torch.Generator,
                  chunk: int = 50) -> float:
    """The ELBO with ``num_draws`` draws on the fixed evaluation batch (Stan's ``calc_ELBO``)."""
    total, done = 0.0, 0
    while done < num_draws:
        s = min(chunk, num_draws - done)
        est = elbo(ctx.model, ctx.space, family, ctx.eval_batch, ctx.num_rows, num_particles=s, generator=generator)
        total += float(est.value - est.entropy) * s
        done += s
    value = torch.tensor(total / num_draws + float(family.entropy()), dtype=torch.float64)
    return float(ctx.all_mean(value))


def search_stan_eta(ctx: FitContext, family: Family, stream: Iterator) -> float:
    """Stan's eta adaptation: ``adapt_iter`` steps per candidate from the same start."""
    o = ctx.options
    start = copy.deepcopy(family.state_dict())
    gen = torch.Generator(device=ctx.device).manual_seed(_noise_seed(o.seed + 1, ctx.rank))
    elbo_init = evaluate_elbo(ctx, family, o.elbo_samples, gen)

    def trial(eta: float) -> float:
        family.load_state_dict(start)
        opt = StanStepSize(family.parameters(), lr=eta)
        diverged = False
        for _ in range(o.adapt_iter):
            est = elbo(ctx.model, ctx.space, family, next(stream), ctx.num_rows, o.num_particles, gen)
            opt.zero_grad(set_to_none=True)
            (-est.value).backward()
            if not _finite(est.value, family):
                diverged = True
                break
            opt.step()
        value = evaluate_elbo(ctx, family, o.elbo_samples, gen)  # a collective: every rank calls it
        flag = torch.tensor(-math.inf if diverged or not math.isfinite(value) else 0.0, dtype=torch.float64)
        flag = dist.all_min(flag, ctx.world)  # one rank's divergence fails the eta everywhere
        return value if float(flag) == 0.0 else -math.inf

    result = search_eta(trial, elbo_init)
    family.load_state_dict(start)
    log.info("eta search: %s -> eta = %g", result.tried, result.eta)
    return result.eta


def _finite(value: torch.Tensor, family: Family) -> bool:
    grads = [p.grad for p in family.parameters() if p.grad is not None]
    return bool(torch.isfinite(value + torch.stack(torch._foreach_norm(grads)).sum()))


# --- one step ---------------------------------------------------------------------------------
def step(ctx: FitContext, state: TrainState, batch: Mapping[str, torch.Tensor]) -> tuple[TrainState, StepInfo]:
    """One stochastic-gradient step on the negative ELBO; a non-finite step changes nothing.
    Applied steps are added to the iterate average."""
    averager = state.averager
    result = None
    if state.compiled is not None and state.compiled.takes(state.step, batch_size(batch)):
        noise_state = state.generator.get_state()
        eps = state.family.draw_noise(ctx.options.num_particles, state.generator)
        sums = averager.sums_for_compiled_step() if averager is not None else []
        result = state.compiled(batch, eps, sums)
        if result is None:  # it failed to compile and changed nothing: the module step draws the same noise
            state.generator.set_state(noise_state)
    if result is not None:
        est, grad_norm, ok = result
        if ok and averager is not None:
            averager.count_added()
    else:
        est = state.objective(state.trainable, batch, state.generator)
        state.optimizer.zero_grad(set_to_none=True)
        (-est.value).backward()
        grads = [p.grad for p in state.family.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        finite = torch.isfinite(est.value.detach() + grad_norm).to(torch.float64)
        finite = dist.all_min(finite, ctx.world)  # one rank's NaN stops the step on every rank
        ok = bool(finite)  # the step's one host sync: the guard needs it
        if ok:
            state.optimizer.step()
            if averager is not None:
                averager.add()
        est = est.detach()
    if ok and state.lr_scheduler is not None:
        state.lr_scheduler.step()
    state.step += 1
    return state, StepInfo(est, grad_norm.detach(), ok, batch_size(batch))


# --- the loop ---------------------------------------------------------------------------------
def train(ctx: FitContext, state: TrainState, stream: Iterator, tracker: Tracker | None = None,
          checkpoint: Callable[[TrainState, Any, str | None], None] | None = None,
          callbacks: list[Callback] | None = None) -> TrainResult:
    """Run steps until the schedule says stop or ``max_steps`` is reached.

    Args:
        tracker: where the default callbacks send metrics (ignored when ``callbacks`` are given).
        checkpoint: called as ``checkpoint(state, stream, None)`` every ``checkpoint_every`` steps
            and as ``checkpoint(state, stream, stop_reason)`` once at the end, so the last
            checkpoint says whether (and why) the fit finished.
        callbacks: what reports the fit (default: :func:`default_callbacks`).
    """
    o = ctx.options
    callbacks = default_callbacks(ctx, state, tracker or NullTracker()) if callbacks is None else callbacks
    started = time.perf_counter()
    state.last_good = state.last_good or _snapshot(state)
    state.schedule.start(state.step)
    action = GO_ON
    while state.step < o.max_steps:
        state, info = step(ctx, state, next(stream))
        action = state.schedule.observe(info, state.step)
        apply(ctx, state, action)
        for callback in callbacks:
            callback.after_step(state, info, action)
        if action.stop:
            break
        if checkpoint is not None and state.step % o.checkpoint_every == 0:
            checkpoint(state, stream, None)
    stop_reason = action.stop_reason or "max_steps"
    reason = action.reason if action.stop else f"reached max_steps={o.max_steps} before the convergence rule was met"
    if checkpoint is not None:  # before the average below: a resume continues the trajectory itself
        checkpoint(state, stream, stop_reason)
    if not action.converged:
        warnings.warn(f"svi: NOT converged: {reason}; the result may not be the optimum. "
                      f"{_what_to_try(stop_reason, ctx.model, ctx.space, state.family)}", RuntimeWarning, stacklevel=2)
        if state.averager is not None and state.averager.phase_count:
            state.averager.load_phase_average()
    for callback in callbacks:
        callback.finish(state, action.converged)
    heldout = next((c.scores for c in callbacks if isinstance(c, HeldoutScore)), [])
    return TrainResult(state.family, state.step, action.converged, reason, stop_reason, state.schedule.history,
                       state.warm_start, state.eta, state.schedule.nonfinite_total, time.perf_counter() - started,
                       heldout)


def default_callbacks(ctx: FitContext, state: TrainState, tracker: Tracker) -> list[Callback]:
    """Metrics to ``tracker``, the console's bar or lines, and held-out scoring on rank 0."""
    o = ctx.options
    callbacks = [TrackerMetrics(tracker, o.log_every, o.max_steps, all(b.identity for b in ctx.space.blocks)),
                 ConsoleReport(o.progress, ctx.rank, state.step, o.log_every, o.max_steps, o.tol_param)]
    if ctx.heldout_batch is not None and ctx.rank == 0:
        callbacks.append(HeldoutScore(lambda family: heldout_lpd(ctx, family), o.heldout_every, tracker,
                                      ctx.started))
    return callbacks


def apply(ctx: FitContext, state: TrainState, action: Action) -> None:
    """Carry out the schedule's action: a restore after non-finite steps, and at a window's end
    the new good state, the step-size decay, the STL switch, the control variates' weights, and
    moving the control variates' expansion points to where q now is."""
    o = ctx.options
    if action.give_up or action.restore:
        blocks = _nonfinite_blocks(ctx, state)
        if action.give_up:
            s = state.schedule
            raise NonFiniteError(
                f"the ELBO or its gradient stayed non-finite for {s.nonfinite_run} steps after "
                f"{s.restores} restores (each halving the step size); non-finite in: {blocks}. "
                "Check the priors and the constraints of these parameters, the data, or lower lr.")
        _restore(state, state.last_good)
        _scale_lr(state, 0.5)
        warnings.warn(f"svi: {o.nonfinite_patience} non-finite steps in a row (in {blocks}); restored the last good "
                      "state and halved the step size", RuntimeWarning, stacklevel=3)
    if not action.window_closed:
        return
    if action.clean:
        state.last_good = _snapshot(state)
    if action.decay != 1.0:
        _scale_lr(state, action.decay)
    if action.stl:
        state.objective.stl = True
    if action.cv_weights is not None:
        state.objective.cv_weights = action.cv_weights
    if action.diverging:
        warnings.warn("svi: the relative ELBO change is large: the fit may be diverging; inspect the ELBO",
                      RuntimeWarning, stacklevel=3)
    _move_anchor(ctx, state)
    _move_expansion(ctx, state)


def _scale_lr(state: TrainState, factor: float) -> None:
    for group in state.optimizer.param_groups:
        group["lr"] *= factor


def heldout_lpd(ctx: FitContext, family: Family) -> float:
    """The held-out rows' average log predictive density under q (svi.elbo.log_predictive_density),
    with the same draws every time (a fixed seed), so the curve moves only when q does."""
    o = ctx.options
    generator = torch.Generator(device=ctx.device).manual_seed(o.seed + 29)
    return log_predictive_density(ctx.model, ctx.space, family, ctx.heldout_batch, o.heldout_draws, generator)


def _what_to_try(stop_reason: str, model: Model, space: ParamSpace, family: Family) -> str:
    """The advice that goes with a fit that stopped without converging."""
    first = ("raise max_steps (a resume continues from here)" if stop_reason == "max_steps"
             else "raise max_decays, or a smaller lr")
    rest = family_advice(model, space, family)
    return f"Try: {first}" + (f", or {rest}" if rest else "")


#: above this many parameters a poor fit is pointed at the lowrank family rather than fullrank
FULLRANK_ADVICE_MAX = 2000


def family_advice(model: Model, space: ParamSpace, family: Family) -> str:
    """What else to try when q fits badly, for the family and model at hand ("" when nothing is left
    to suggest): the fullrank family unless q already is one (lowrank above FULLRANK_ADVICE_MAX
    parameters), and for a model that reads group ids
    (an integer batch key) without declaring group effects, to declare them. A fullrank fit of a
    model with nothing to declare gets no advice of these two kinds."""
    parts = []
    if space.size > FULLRANK_ADVICE_MAX:  # a K x K factor: K^2 / 2 numbers and O(K^2) work a draw
        if not isinstance(family, (FullRank, LowRank)):
            parts.append(f"family=lowrank (fullrank's factor is too large for {space.size:,} parameters)")
    elif not isinstance(family, FullRank):
        parts.append("family=fullrank")
    if model.integer_keys and not space.centering:
        parts.append("a multilevel model fits best with its group effects declared as such "
                     "(svi.Param(loc=..., scale=...)), so svi chooses their centring from the data")
    return "; ".join(parts)


#: q's mean this far from the data control variate's anchor (root mean square, in q's sds) moves it
REANCHOR_DISTANCE = 1.0


def _move_anchor(ctx: FitContext, state: TrainState) -> None:
    """Re-anchor the data control variate at q's mean when q has moved away from the anchor.

    Its subsampling noise grows with the distance from the anchor: about c d / sqrt(B) in
    posterior units for a mean d posterior sds away, c the spread of the rows' curvatures,
    against sqrt(N / B) with no anchor. The warm start's anchor is found on a sample of rows and
    can be many sds from the full-data optimum (sqrt(N / n) for n warm-start rows). Checked at
    the end of every window: while q travels, a pass over the data every window keeps the noise
    low enough for the stall test to see the ELBO still rising (instead of decaying the step
    size on noise), and near the optimum the anchor stays put. Every rank decides alike: q is
    the same on all of them."""
    anchor = state.objective.anchor
    if anchor is None or ctx.reanchor is None:
        return
    mean, sd = state.family.mean.detach(), state.family.stddev.detach()
    distance = float(((mean - anchor.z.to(mean)) / sd).pow(2).mean().sqrt())
    if not distance > REANCHOR_DISTANCE:
        return
    started = time.perf_counter()
    state.objective.anchor = ctx.reanchor(mean)
    if ctx.rank == 0:
        log.info("data control variate moved to q's mean (%.3g sd from its anchor) in %.1f s", distance,
                 time.perf_counter() - started)


#: at most this many Newton steps from the warm start (each costs a pass over the data), fewer once
#: a step moves less than NEWTON_SMALL_STEP frame sds (rms)
NEWTON_STEPS, NEWTON_SMALL_STEP = 3, 0.1
#: the warm start's L-BFGS stops once 5 iterations gained less than this (nats) when Newton steps
#: follow: on a 200,000-row sample of a 1,000,000-row logistic regression, 0.06 sds (whitened, rms)
#: from its mode at iteration 55 of 93, where the full data's mode is 2 sds away
NEWTON_SETTLE = 0.01


def newton_start_follows(ctx: FitContext) -> bool:
    """Whether :func:`correct_warm_start` will run after the warm start: options ``newton_start``
    and ``control_variate``, the warm start on a sample of the rows, batches that subsample the data
    (so there is a full-data pass to take the gradient from), and no group effects."""
    o = ctx.options
    return bool(o.newton_start and o.control_variate and o.warm_start != "none" and ctx.warm_batch is not None
                and ctx.reanchor is not None and not ctx.space.auto_centering
                and batch_size(ctx.warm_batch) < ctx.num_rows
                and (ctx.batch_rows or ctx.num_rows) * ctx.world_size < ctx.num_rows)


def correct_warm_start(ctx: FitContext, family: Family, anchor: DataAnchor) -> DataAnchor:
    """Newton steps from the warm start on the full data's gradient, which the data control
    variate's pass has just summed: the warm start found its mode on a sample of n rows, which
    lies about sqrt(N / n - 1) posterior sds from the full data's (2 sds for 200,000 of 1,000,000
    rows), and a mean-field q, whose diagonal frame leaves the posterior's correlations in its
    coordinates, then spent 7,400 steps crossing that distance where fullrank, whose frame
    whitens them, spent 1,800 (logistic, 1,000,000 rows, 20 correlated predictors; 800 each
    after these steps). A step uses the warm start's curvature (the quadratic control variate's); it is kept only if a
    pass at the new point finds the full data's log density higher there, and the last pass is
    the data control variate's anchor from then on. Models with group effects keep their warm start: it
    chose its point by the ELBO, away from the joint mode, which a Newton step heads for. The
    sample's curvature is not the full data's (1/20 of 40,000 rows: 5.9 sds off before, 0.3 after
    one step), so steps repeat while they move q by more than a tenth of a frame sd. Runs where
    :func:`newton_start_follows` says so."""
    z0 = anchor.z.to(torch.float64)

    def prior_part(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().clone().requires_grad_(True)
        theta, log_det = ctx.space.constrain(z.unsqueeze(0))
        value = (ctx.model.log_prior(theta) + log_det).sum()
        if not value.requires_grad:  # flat priors, identity transforms
            return value.detach(), torch.zeros_like(z)
        (g,) = torch.autograd.grad(value, z)
        return value.detach(), g

    value = anchor.value + prior_part(z0)[0]
    started, moved = time.perf_counter(), []
    for _ in range(NEWTON_STEPS):
        # the pass's sums are over every rank's rows: every rank takes the same step
        step_u = family.newton_step(anchor.grad.to(torch.float64) + prior_part(anchor.z.to(torch.float64))[1])
        if step_u is None or not bool(torch.isfinite(step_u).all()):
            break
        trial = copy.deepcopy(family)
        trial.shift_frame(step_u)
        candidate = ctx.reanchor(trial.frame_loc.detach())
        candidate_value = candidate.value + prior_part(trial.frame_loc.detach().to(torch.float64))[0]
        if not bool(candidate_value > value):  # NaN too: the point before is kept
            break
        family.shift_frame(step_u)
        anchor, value = candidate, candidate_value
        moved.append(float(step_u.pow(2).mean().sqrt()))
        if moved[-1] < NEWTON_SMALL_STEP:  # a Gaussian's mode: another step would not move it
            break
    if moved and ctx.rank == 0:
        log.info("warm start moved to the full data's mode by %d Newton step(s) of %s frame sds (rms) in %.1f s",
                 len(moved), ", ".join(f"{d:.3g}" for d in moved), time.perf_counter() - started)
    return anchor


#: q's mean this far from the quadratic control variate's expansion (in q's sds, worst coordinate) re-expands it
EXPANSION_DISTANCE = 2.0


def _move_expansion(ctx: FitContext, state: TrainState) -> None:
    """Re-expand the quadratic control variate at q's mean when q has moved away from its expansion.

    The control variate cancels the gradient noise that the expansion's quadratic explains, so
    its worth falls with the distance between the expansion point and where q is: a warm start at
    a poor point (the joint mode of a multilevel model with data-poor groups put tau at 2.9
    against a posterior mean of 0.69) leaves q's mean and covariance to be found under nearly
    the plain estimator's noise. Measured on that set: fullrank from the right point with the
    old expansion drifted to 0.31 reference sd off in 15,200 steps; with the expansion there it
    converged within 0.18 in 900. Checked at the end of every window, like the data control
    variate's anchor; the Hessian is formed on the warm start's rows or the evaluation rows,
    whichever are more (only up to the warm start's ``hessian_max_dim``), averaged over ranks so
    every rank expands alike."""
    family = state.family
    if not (ctx.options.control_variate and family.has_quadratic):
        return
    mean, sd = family.mean.detach(), family.stddev.detach()
    # the worst coordinate, not the rms: tau alone moving 40 sds among 1,000 intercepts leaves the
    # rms under 1 sd, and the expansion is then wrong in the coordinate that matters most
    distance = float(((mean - family.expansion_point) / sd).abs().max())
    if not distance > EXPANSION_DISTANCE:
        return
    started = time.perf_counter()
    rows = max((b for b in (ctx.warm_batch, ctx.eval_batch) if b is not None), key=batch_size)
    found = curvature(ctx.model, ctx.space, rows, ctx.num_rows, mean, seed=ctx.options.seed)
    if found is None:
        return
    hess, gradient = (ctx.all_mean(t) for t in found)
    if not bool(torch.isfinite(hess).all()):
        return
    try:
        reframed = family.set_expansion(mean, hess, gradient)
    except ValueError as e:  # no frame for this curvature: keep the old expansion
        log.debug("no re-expansion: %s", e)
        return
    if reframed:  # the trainable parameters mean something new: Adam's moments and the sums of old ones do not apply
        state.optimizer.state = collections.defaultdict(dict)
        if state.averager is not None:
            state.averager.new_phase()
        state.last_good = _snapshot(state)
    if state.compiled is not None:  # the compiled graphs read the old buffers' shapes
        state.compiled.reset()
    if ctx.rank == 0:
        log.info("step %d: quadratic control variate re-expanded at q's mean (%.3g sd from its expansion in the "
                 "worst coordinate) in %.1f s", state.step, distance,
                 time.perf_counter() - started)


@torch.no_grad()
def _nonfinite_blocks(ctx: FitContext, state: TrainState) -> str:
    """Name the parameter blocks whose draws, gradients or densities went non-finite."""
    names = set()
    coord_block = []
    for b in ctx.space.blocks:
        coord_block += [b.name] * b.size
    for p in state.family.parameters():
        if p.grad is None:
            continue
        bad = ~torch.isfinite(p.grad)
        if p.dim() >= 1 and p.shape[0] == ctx.space.size:
            rows = bad.reshape(p.shape[0], -1).any(-1) | ~torch.isfinite(p).reshape(p.shape[0], -1).any(-1)
            names.update(coord_block[i] for i in torch.nonzero(rows).flatten().tolist())
    z = state.family.rsample(8, state.generator)
    theta, log_det = ctx.space.constrain(z)
    names.update(n for n, t in theta.items() if not bool(torch.isfinite(t).all()))
    if not names:
        lp = ctx.model.log_prior(theta)
        if not bool(torch.isfinite(lp).all()):
            names.add("log_prior")
        if not bool(torch.isfinite(log_det).all()):
            names.add("log|det J|")
    return ", ".join(sorted(names)) or "the log-likelihood"


def _snapshot(state: TrainState) -> dict:
    return {"family": copy.deepcopy(state.family.state_dict()), "optimizer": copy.deepcopy(state.optimizer.state_dict())}


def _restore(state: TrainState, snap: dict) -> None:
    lrs = [g["lr"] for g in state.optimizer.param_groups]
    state.family.load_state_dict(snap["family"])
    state.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
    for g, lr in zip(state.optimizer.param_groups, lrs):
        g["lr"] = lr


# --- the whole state, for checkpoints -------------------------------------------------------------
def state_dict(state: TrainState, stream) -> dict:
    """Everything a resume needs, one entry per component, as plain tensors and Python values
    (``weights_only``-safe)."""
    return {
        "step": state.step,
        "family": state.family.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.lr_scheduler.state_dict() if state.lr_scheduler is not None else None,
        "objective": state.objective.state_dict(),
        "schedule": state.schedule.state_dict(),
        "generator": state.generator.get_state(),
        "last_good": state.last_good,
        "warm_start": state.warm_start,
        "eta": state.eta,
        "stream": stream.state_dict(),
        "global_rng": _global_rng_state(),
    }


def load_state_dict(state: TrainState, saved: Mapping, stream) -> TrainState:
    """Restore ``saved`` (from :func:`state_dict`) into a freshly built state and stream."""
    state.step = int(saved["step"])
    state.family.load_state_dict(saved["family"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.lr_scheduler is not None and saved["lr_scheduler"] is not None:
        state.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    state.objective.load_state_dict(saved["objective"])
    state.schedule.load_state_dict(saved["schedule"], state.family.frame_loc.dtype)
    state.generator.set_state(saved["generator"])
    state.last_good = saved["last_good"]
    state.warm_start, state.eta = saved["warm_start"], saved["eta"]
    stream.load_state_dict(saved["stream"])
    _set_global_rng_state(saved["global_rng"])
    return state


def _global_rng_state() -> dict:
    import random

    import numpy as np

    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")),
                                                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": random.getstate()}


def _set_global_rng_state(saved: Mapping) -> None:
    import random

    import numpy as np

    torch.set_rng_state(saved["torch"])
    n = saved["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype("uint32"), n[2], n[3], n[4]))
    random.setstate(tuple(saved["python"]) if not isinstance(saved["python"], tuple) else saved["python"])
