"""Stan's relative-tolerance rule and the posterior-units rule."""

import numpy as np
import pytest
import torch

import svi
from svi.convergence import IterateAverager, PosteriorConvergence, StanConvergence


def test_stan_rule_buffer_mean_and_median():
    rule = StanConvergence(tol_rel_obj=0.01, eval_elbo=100, max_steps=10_000)
    assert rule.size == 10
    assert not rule.update(-1000.0).converged  # Stan compares the first ELBO with 0: change 1
    assert not rule.update(-500.0).converged  # buffer [1, 1]
    assert not rule.update(-499.0).converged  # [1, 1, 0.002]: mean 0.67, median 1
    assert not rule.update(-498.9).converged  # [..., 0.0002]: median (1 + 0.002) / 2
    d = rule.update(-498.89)  # [1, 1, 0.002, 0.0002, 0.00002]: median 0.002 < 0.01
    assert d.converged and "median" in d.reason
    small = StanConvergence(0.01, 100, 100)
    assert small.size == 2  # never fewer than two entries
    small.update(-100.0)
    assert not small.update(-100.5).converged  # [1, 0.005]
    d = small.update(-100.5)  # [0.005, 0]: mean 0.0025
    assert d.converged and "mean" in d.reason


def test_stan_rule_flags_divergence_and_round_trips_state():
    rule = StanConvergence(0.01, 10, 10_000)
    values = [(-1) ** i * 100.0 for i in range(13)]
    flags = [rule.update(v).diverging for v in values]
    assert flags == [False] * 10 + [True] * 3  # only after 10 evaluations, as Stan
    clone = StanConvergence(0.01, 10, 10_000)
    clone.load_state_dict(rule.state_dict())
    assert clone.update(-1.0) == rule.update(-1.0)


def test_posterior_rule_stalls_only_without_significant_gain():
    rule = PosteriorConvergence(tol_param=0.02)
    g = torch.Generator().manual_seed(0)
    noise = lambda: (torch.randn(100, generator=g) * 5).tolist()
    assert not rule.window_stalled([v - 100 for v in noise()])
    assert not rule.window_stalled([v - 50 for v in noise()])  # a 50-unit gain is 70 standard errors
    assert rule.window_stalled([v - 50 for v in noise()])  # flat: a stall


def test_posterior_rule_converges_when_the_phase_average_stops_moving():
    rule = PosteriorConvergence(tol_param=0.05, max_decays=5)
    sd = torch.ones(4)
    d = rule.phase_end(torch.zeros(4), sd)
    assert d.decay and not d.converged
    d = rule.phase_end(torch.tensor([0.0, 0.15, 0.0, 0.0]), sd)  # rms 0.075 sd: not yet
    assert d.decay and rule.decays == 2 and "stall" in d.reason
    d = rule.phase_end(torch.tensor([0.0, 0.15, 0.0, 0.0]), sd)
    d = rule.phase_end(torch.tensor([0.0, 0.0, 0.0, 0.0]), sd)  # rms 0.075 again, one coordinate 0.15
    assert not d.converged
    d = rule.phase_end(torch.tensor([0.02, 0.0, 0.03, 0.0]), sd * 1.02)  # rms 0.018 sd and 2 %: done
    assert d.converged and not d.decay
    lone = PosteriorConvergence(tol_param=0.05)
    lone.phase_end(torch.zeros(100), torch.ones(100))
    one_far = torch.zeros(100)
    one_far[7] = 0.3  # rms 0.03, but one coordinate moved 0.3 sd > 4 x tol
    assert not lone.phase_end(one_far, torch.ones(100)).converged
    # Many coordinates: averaging noise of rms 0.04 sd reaches about sqrt(2 ln K) x 0.04 in its
    # largest coordinate; with K = 20,000 a worst move of 0.22 sd is that noise, not a drift.
    many = PosteriorConvergence(tol_param=0.05)
    many.phase_end(torch.zeros(20_000), torch.ones(20_000))
    noise = torch.full((20_000,), 0.04)
    noise[3] = 0.22
    assert many.phase_end(noise, torch.ones(20_000)).converged
    few = PosteriorConvergence(tol_param=0.05)
    few.phase_end(torch.zeros(100), torch.ones(100))
    assert not few.phase_end(noise[:100], torch.ones(100)).converged  # 0.22 > 4 x tol among 100
    capped = PosteriorConvergence(tol_param=1e-9, max_decays=1)
    capped.phase_end(torch.zeros(1), torch.ones(1))
    gave_up = capped.phase_end(torch.ones(1), torch.ones(1))
    assert gave_up.stop and not gave_up.converged and "gave up after 1 step-size decays" in gave_up.reason


def test_a_fit_that_runs_out_of_decays_is_reported_unconverged():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3))
    data = {"x": x, "y": x @ np.array([1.0, -1.0, 0.5]) + rng.normal(size=4000)}
    with pytest.warns(RuntimeWarning, match="NOT converged: gave up after 0 step-size decays.*Try: raise max_decays"):
        post = svi.fit(svi.models.LinearRegression(3), data, batch_size=64, max_decays=0, warm_start="none")
    assert not post.info.converged and post.info.stop_reason == "max_decays"
    assert post.info.steps < 10_000  # it stopped: stopping and converging are two different things


def test_iterate_averager_drops_burn_in_windows():
    p = torch.zeros(2)
    avg = IterateAverager([p])
    for v in (1.0, 3.0):
        p.fill_(v)
        avg.add()
    avg.close_window(keep=False)
    for v in (5.0, 7.0):
        p.fill_(v)
        avg.add()
    avg.close_window(keep=True)
    assert torch.equal(avg.phase_average()[0], torch.full((2,), 6.0))
    state = avg.state_dict()
    other = IterateAverager([torch.zeros(2)])
    other.load_state_dict(state)
    assert torch.equal(other.phase_average()[0], avg.phase_average()[0])
