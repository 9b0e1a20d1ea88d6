"""Stan's step-size sequence, its eta search, and the optimiser factory."""

import copy
import math

import pytest
import torch

from svi.optim import EtaSearchError, StanStepSize, make_optimizer, make_scheduler, search_eta


def _stan_by_hand(x0, a, eta, steps, tau=1.0, alpha=0.1):
    """Stan's sequence on f(x) = a x^2 / 2, in plain floats."""
    x, s, xs = x0, None, []
    for k in range(1, steps + 1):
        g = a * x
        s = g * g if s is None else alpha * g * g + (1 - alpha) * s
        x = x - eta * k ** -0.5 / (tau + math.sqrt(s)) * g
        xs.append(x)
    return xs


def test_stan_sequence_matches_hand_computed_values_on_a_quadratic():
    x = torch.tensor([2.0, -1.0], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([3.0, 0.5], dtype=torch.float64)
    opt = StanStepSize([x], lr=0.5)
    got = []
    for _ in range(6):
        opt.zero_grad()
        (0.5 * a * x * x).sum().backward()
        opt.step()
        got.append(x.detach().clone())
    # first step by hand: g = 6, s = 36, rho = 0.5 / 7, x = 2 - 6 * 0.5 / 7 = 11/7
    assert got[0][0].item() == pytest.approx(11 / 7, abs=1e-15)
    for i, (ai, x0) in enumerate([(3.0, 2.0), (0.5, -1.0)]):
        expected = _stan_by_hand(x0, ai, 0.5, 6)
        assert [float(g[i]) for g in got] == pytest.approx(expected, abs=1e-14)


def test_stan_state_dict_resumes_exactly():
    def run(steps, resume_at=None):
        x = torch.tensor([2.0, -1.0], dtype=torch.float64, requires_grad=True)
        opt = StanStepSize([x], lr=0.5)
        for k in range(steps):
            if k == resume_at:
                state, value = copy.deepcopy(opt.state_dict()), x.detach().clone()
                x = value.clone().requires_grad_(True)
                opt = StanStepSize([x], lr=0.5)
                opt.load_state_dict(state)
            opt.zero_grad()
            (x**4).sum().backward()
            opt.step()
        return x.detach()

    assert torch.equal(run(8), run(8, resume_at=3))


def _fixture(values):
    calls = []

    def trial(eta):
        calls.append(eta)
        return values[eta]

    return trial, calls


def test_eta_search_stops_at_the_first_worse_eta_and_keeps_the_best():
    trial, calls = _fixture({100.0: -50.0, 10.0: -40.0, 1.0: -45.0, 0.1: -1.0, 0.01: -1.0})
    assert search_eta(trial, elbo_init=-100.0).eta == 10.0
    assert calls == [100.0, 10.0, 1.0]  # never tried 0.1 although it would have been better


def test_eta_search_passes_over_diverged_and_worse_than_initial_etas():
    trial, calls = _fixture({100.0: -math.inf, 10.0: -200.0, 1.0: -60.0, 0.1: -70.0, 0.01: 0.0})
    result = search_eta(trial, elbo_init=-100.0)
    assert result.eta == 1.0 and calls == [100.0, 10.0, 1.0, 0.1]
    assert result.tried[0] == (100.0, -math.inf)


def test_eta_search_takes_the_last_eta_when_each_improves():
    trial, calls = _fixture({100.0: -90.0, 10.0: -80.0, 1.0: -70.0, 0.1: -60.0, 0.01: -50.0})
    assert search_eta(trial, elbo_init=-100.0).eta == 0.01


def test_eta_search_fails_clearly_when_every_eta_fails():
    trial, _ = _fixture({100.0: math.nan, 10.0: -math.inf, 1.0: -300.0, 0.1: -200.0, 0.01: -150.0})
    with pytest.raises(EtaSearchError, match="All proposed step sizes failed.*initial ELBO -100"):
        search_eta(trial, elbo_init=-100.0)


def test_optimizer_factory_and_schedule():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("stan", p, lr=1.0), StanStepSize)
    assert isinstance(make_optimizer("Adam", p, lr=0.1), torch.optim.Adam)
    assert isinstance(make_optimizer("sgd", p, lr=0.1, momentum=0.9), torch.optim.SGD)
    with pytest.raises(ValueError, match="unknown optimizer 'adamax2'.*adam"):
        make_optimizer("adamax2", p)
    with pytest.raises(ValueError, match="unexpected keyword argument 'betaz'"):
        make_optimizer("adam", p, lr=0.1, betaz=1)
    opt = make_optimizer("stan", p, lr=1.0)
    sched = make_scheduler(opt, {"name": "ExponentialLR", "gamma": 0.5})
    sched.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.25
    with pytest.raises(ValueError, match="unknown lr_schedule name 'Nope'"):
        make_scheduler(opt, {"name": "Nope"})


def test_default_adam_is_fused_and_follows_the_per_tensor_update():
    torch.manual_seed(0)
    target = torch.randn(7, dtype=torch.float64)
    start = [torch.randn(7, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    paths = []
    for options in ({}, {"foreach": False}):
        params = [torch.nn.Parameter(s.clone()) for s in start]
        opt = make_optimizer("adam", params, lr=0.05, **options)
        assert opt.defaults["fused"] is (True if not options else None)
        for _ in range(50):
            opt.zero_grad()
            (((params[0] - target) ** 2).sum() + params[1].pow(4).sum()).backward()
            opt.step()
        paths.append(torch.cat([p.detach() for p in params]))
    torch.testing.assert_close(paths[0], paths[1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(paths[0][:7], start[0])  # it moved
