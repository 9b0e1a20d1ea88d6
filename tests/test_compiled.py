"""The compiled step (functional, optionally compiled by torch.compile) computes exactly what the module step
computes with loss.backward() and optimizer.step()."""

import copy

import numpy as np
import pytest
import torch

from svi.data.memory import InMemoryData
from svi.compiled import CompiledStep
from svi.elbo import anchor_statistics
from svi.models import LogisticRegression
from svi.options import FitOptions
from svi.trainer import FitContext, build_family, init_state, step
from svi.transforms import ParamSpace


def _setup(family, optimizer, dtype, **opts):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4)) + 1.0
    y = (rng.random(500) < 0.4).astype(float)
    model = LogisticRegression(4)
    space = ParamSpace(model.params)
    data = InMemoryData({"x": x, "y": y}, keys=model.batch_keys, dtype=dtype)
    options = FitOptions(family=family, optimizer=optimizer, lr=0.05, batch_size=64, **opts)
    ctx = FitContext(model=model, space=space, options=options, num_rows=500, dtype=dtype,
                     device=torch.device("cpu"), eval_batch=data.sample(100, 0), warm_batch=data.sample(500, 1))
    fam, _, _ = build_family(ctx)
    anchor = anchor_statistics(model, space, fam.frame_loc, data.chunks())
    return ctx, data, fam, anchor


def _run(ctx, data, fam, anchor, path: str, steps=25):
    fam = copy.deepcopy(fam)
    state = init_state(ctx, fam, anchor=anchor)
    state.objective.cv_weights = (0.7, 0.9)  # any weights: both paths must use them alike
    if path != "module":
        state.compiled = CompiledStep(state.objective, fam, state.optimizer, compile=path == "compiled")
    stream = data.stream(64, seed=3)
    values = []
    for _ in range(steps):
        state, info = step(ctx, state, next(stream))
        values.append(float(info.elbo.value))
    return state, values


@pytest.mark.parametrize("family", ["meanfield", "fullrank", "lowrank"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd", "stan"])
def test_functional_step_equals_the_module_step(family, optimizer):
    ctx, data, fam, anchor = _setup(family, optimizer, torch.float64)
    a, va = _run(ctx, data, fam, anchor, "module")
    b, vb = _run(ctx, data, fam, anchor, "eager")
    assert np.allclose(va, vb, rtol=1e-12, atol=1e-9)
    for p, q in zip(a.family.parameters(), b.family.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-12)
    for s, t in zip(a.averager.window_sum, b.averager.window_sum):
        assert torch.allclose(s, t, rtol=1e-12, atol=1e-12)
    assert a.averager.window_count == b.averager.window_count == 25
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.allclose(torch.as_tensor(sa[i][k]).double(), torch.as_tensor(sb[i][k]).double(), rtol=1e-12)


def test_compiled_step_matches_the_module_step():
    ctx, data, fam, anchor = _setup("meanfield", "adam", torch.float32)
    a, va = _run(ctx, data, fam, anchor, "module", steps=10)
    b, vb = _run(ctx, data, fam, anchor, "compiled", steps=10)
    assert np.allclose(va, vb, rtol=1e-5)
    for p, q in zip(a.family.parameters(), b.family.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)


def test_functional_step_leaves_everything_untouched_on_a_non_finite_step():
    ctx, data, fam, anchor = _setup("meanfield", "adam", torch.float64)
    state = init_state(ctx, copy.deepcopy(fam))
    state.compiled = CompiledStep(state.objective, state.family, state.optimizer, compile=False)
    batch = next(data.stream(64, seed=0))
    before = [p.detach().clone() for p in state.family.parameters()]
    bad = dict(batch, y=batch["y"] * float("nan"))
    state, info = step(ctx, state, bad)
    assert not info.ok
    assert all(torch.equal(p, q) for p, q in zip(before, state.family.parameters()))
    assert all(float(s.abs().sum()) == 0 for s in state.averager.window_sum) and state.averager.window_count == 0
    assert all(float(st["step"]) == 0 for st in state.optimizer.state.values())


@pytest.mark.slow  # ~27 s of compilation on a fresh machine
def test_compiled_step_with_group_effects_matches_the_module_step():
    """The centring chosen after the warm start is read inside the compiled graph: the trace must
    neither keep a tensor of its own (it did: 'Cannot access storage of TensorWrapper') nor differ."""
    from svi.models import HierarchicalLinearRegression

    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(6), [3, 3, 3, 200, 200, 200])
    x = rng.normal(size=(len(g), 2))
    y = x @ [0.5, -0.2] + rng.normal(size=6)[g] * 0.7 + 0.8 * rng.normal(size=len(g))
    model = HierarchicalLinearRegression(2, 6)
    space = ParamSpace(model.params)
    data = InMemoryData({"x": x, "y": y, "g": g}, keys=model.batch_keys, dtype=torch.float32, integer_keys=("g",))
    ctx = FitContext(model=model, space=space, options=FitOptions(lr=0.05, batch_size=64), num_rows=len(g),
                     dtype=torch.float32, device=torch.device("cpu"), eval_batch=data.sample(100, 0),
                     warm_batch=data.sample(len(g), 1))
    fam, note, _ = build_family(ctx)
    lam = space.centering["alpha"]
    assert float(lam[:3].max()) < 0.9 < float(lam[3:].min()), note  # chosen per group
    anchor = anchor_statistics(model, space, fam.frame_loc, data.chunks())
    a, va = _run(ctx, data, fam, anchor, "module", steps=10)
    b, vb = _run(ctx, data, fam, anchor, "compiled", steps=10)
    assert np.allclose(va, vb, rtol=1e-5)
    for p, q in zip(a.family.parameters(), b.family.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)
