"""The schedule (observe(step) -> action) over both stopping rules, the callbacks the loop
reports through, and checkpoints of the component layout, older ones included."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import svi
from svi.checkpoint import PAYLOAD_FORMAT, latest_checkpoint
from svi.elbo import ElboEstimate
from svi.families import make_family
from svi.models import LogisticRegression
from svi.options import FitOptions
from svi.schedule import PosteriorSchedule, StanSchedule, make_schedule
from svi.trainer import StepInfo

DATA = Path(__file__).parent / "data" / "checkpoint_format1"


def _info(value: float, ok: bool = True) -> StepInfo:
    v = torch.tensor(value)
    return StepInfo(ElboEstimate(v, v, v * 0, v * 0, v * 0, v * 0, v * 0), torch.tensor(1.0), ok, 10)


def _posterior_schedule(**opts):
    options = FitOptions(window=10, **opts)
    family = make_family("meanfield", 3, loc=torch.zeros(3), scale=1.0)
    return make_schedule(options, family, lambda t: t, lambda: 0.0), family


def _run(schedule, values, start=0):
    """Feed one ELBO a step from step ``start + 1``; the actions, and the step of the first stop."""
    schedule.start(start)
    actions = []
    for i, v in enumerate(values, start=start + 1):
        a = schedule.observe(_info(v, math.isfinite(v)), i)
        actions.append(a)
        if a.stop:
            return actions, i
    return actions, None


def test_a_flat_elbo_decays_then_converges_and_rising_windows_do_not_stall():
    schedule, _ = _posterior_schedule()
    assert isinstance(schedule, PosteriorSchedule)
    rng = np.random.default_rng(0)
    rising = [float(v) for v in np.arange(40) * 10.0 + rng.normal(size=40)]
    actions, stop = _run(schedule, rising)
    assert stop is None and not any(a.decay != 1.0 for a in actions)
    assert [i + 1 for i, a in enumerate(actions) if a.window_closed] == [10, 20, 30, 40]
    # q itself never moves here, so the first stall after one decay finds the phases equal
    flat = [float(v) for v in 400.0 + rng.normal(size=400)]
    actions, stop = _run(schedule, flat, start=40)
    decays = [a for a in actions if a.decay != 1.0]
    assert len(decays) == 1 and decays[0].decay == 0.5 and decays[0].window_closed
    assert stop is not None and actions[-1].converged and actions[-1].stop_reason == "converged"
    assert "posterior stable" in actions[-1].reason
    # windows grew by 1 / lr_decay after the decay: 20 steps, not 10
    closes = [i for i, a in enumerate(actions, start=41) if a.window_closed]
    assert closes[-1] - closes[-2] == 20


def test_giving_up_stops_without_converging():
    schedule, family = _posterior_schedule(max_decays=0)
    rng = np.random.default_rng(1)
    steps = 0
    for i in range(1, 200):
        if i % 10 == 0:  # q keeps moving between phases: never stable
            with torch.no_grad():
                family.loc += 1.0
        a = schedule.observe(_info(float(rng.normal())), i)
        steps = i
        if a.stop:
            break
    assert a.stop and not a.converged and a.stop_reason == "max_decays", a
    assert "gave up" in a.reason and steps < 199


def test_runs_of_non_finite_steps_restore_then_give_up():
    schedule, _ = _posterior_schedule(nonfinite_patience=3, max_nonfinite_restores=2)
    actions, _ = _run(schedule, [1.0, math.nan, math.nan, math.nan, 2.0, math.nan, math.nan, math.nan, 1.0])
    assert [i + 1 for i, a in enumerate(actions) if a.restore] == [4, 8]
    assert not any(a.give_up for a in actions)
    assert schedule.nonfinite_total == 6 and schedule.restores == 2
    assert actions[-1].window_closed is False
    a = None
    for i in range(10, 13):
        a = schedule.observe(_info(math.nan, False), i)
    assert a.give_up  # no restores left
    # a window with a non-finite step is not a state to return to; a clean one is
    schedule, _ = _posterior_schedule(nonfinite_patience=3)
    actions, _ = _run(schedule, [1.0] * 4 + [math.nan] + [1.0] * 15)
    closed = [a for a in actions if a.window_closed]
    assert [a.clean for a in closed] == [False, True]


def test_control_variate_weights_come_with_each_window():
    schedule, _ = _posterior_schedule()
    actions, _ = _run(schedule, [float(v) for v in range(10)])
    assert actions[-1].cv_weights is not None and all(a.cv_weights is None for a in actions[:-1])


def test_the_schedule_resumed_mid_window_acts_as_the_uninterrupted_one():
    rng = np.random.default_rng(2)
    values = [float(v) for v in np.concatenate([np.arange(30) * 5.0, 150 + rng.normal(size=300)])]
    whole, _ = _posterior_schedule()
    expected, stop = _run(whole, values)
    first, _ = _posterior_schedule()
    _run(first, values[:47])
    saved = json.loads(json.dumps(first.state_dict(), default=lambda t: t.tolist()))
    second, _ = _posterior_schedule()
    second.load_state_dict({**saved, "rule": first.rule.state_dict(), "averager": first.averager.state_dict()})
    rest, stop2 = _run(second, values[47:], start=47)
    assert stop2 == stop
    assert [(a.window_closed, a.decay, a.stop, a.converged) for a in rest] == \
        [(a.window_closed, a.decay, a.stop, a.converged) for a in expected[47:]]


def test_stans_schedule_evaluates_every_eval_elbo_steps_and_stops_on_its_tolerance():
    values = iter([-1000.0, -500.0, -499.0, -498.9, -498.89])
    options = FitOptions(convergence="stan", eval_elbo=5, max_steps=1000, tol_rel_obj=0.01, averaging=False)
    schedule = make_schedule(options, None, lambda t: t, lambda: next(values))
    assert isinstance(schedule, StanSchedule) and schedule.averager is None
    actions, stop = _run(schedule, [0.0] * 100)
    assert stop == 25 and actions[-1].converged and "median" in actions[-1].reason
    assert [h[0] for h in schedule.history] == [5, 10, 15, 20, 25]


def _logistic(seed=7, rows=3000):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    y = (rng.random(rows) < 1 / (1 + np.exp(-(x @ [0.8, -0.5, 0.3])))).astype(float)
    return {"x": x, "y": y}


FORMAT_1_OPTIONS = dict(family="meanfield", batch_size=128, max_steps=400, tol_param=1e-6, window=64,
                        checkpoint_every=100, keep_checkpoints=10, khat_rows=0, progress=False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # max_steps is reached by design
def test_a_format_1_checkpoint_resumes_to_the_uninterrupted_fit(tmp_path):
    """A fit checkpointed by the svi before the component layout resumes, and ends where that
    svi's uninterrupted fit ended (and where today's fresh fit ends, to 0.05 sd). It recorded ``compile: false``, the
    default then; today's ``auto`` differs only in speed, so it resumes without ``force_resume``."""
    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(DATA / "ckpt-000000300.pt", folder)
    resumed = svi.fit(LogisticRegression(3), _logistic(), checkpoint_dir=str(folder), resume=True,
                      **FORMAT_1_OPTIONS)
    expected = json.loads((DATA / "uninterrupted.json").read_text())
    assert resumed.info.steps == 400
    assert np.allclose(resumed.family.mean.numpy(), expected["mean"], rtol=0, atol=1e-6)
    assert np.allclose(resumed.family.stddev.numpy(), expected["stddev"], rtol=0, atol=1e-6)
    _, saved = latest_checkpoint(folder)  # the checkpoints written after the resume are today's format
    assert saved["format"] == PAYLOAD_FORMAT and "schedule" in saved["ranks"][0]["state"]
    # today's fresh fit starts from today's warm start (whitened L-BFGS: a point 1e-4 away), so it
    # ends at the same optimum, not on the same trajectory
    fresh = svi.fit(LogisticRegression(3), _logistic(), **FORMAT_1_OPTIONS)
    assert bool(((fresh.family.mean - resumed.family.mean).abs() < 0.05 * resumed.family.stddev).all())


def test_a_users_callback_sees_every_step_each_window_and_the_end():
    class Recorder(svi.Callback):
        def __init__(self):
            self.steps, self.windows, self.finished = [], [], []

        def after_step(self, state, info, action):
            self.steps.append((state.step, float(info.elbo.value)))
            if action.window_closed:
                self.windows.append((state.step, action.elbo))

        def finish(self, state, converged):
            self.finished.append((state.step, converged))

    rec = Recorder()
    post = svi.fit(LogisticRegression(3), _logistic(rows=2000), family="meanfield", batch_size=128, khat_rows=0,
                   progress=False, callbacks=[rec])
    steps = post.info.steps
    assert [s for s, _ in rec.steps] == list(range(1, steps + 1))
    assert rec.windows == [tuple(h) for h in post.info.history]
    assert rec.finished == [(steps, post.info.converged)] and post.info.converged


def test_a_format_1_checkpoint_missing_its_parts_is_refused_by_name():
    from svi.checkpoint import CheckpointError, upgrade_payload

    with pytest.raises(CheckpointError, match="format 1 but its training state is incomplete"):
        upgrade_payload({"format": 1, "ranks": [{"rank": 0, "state": {"step": 3}}]}, "ckpt-000000003.pt")
