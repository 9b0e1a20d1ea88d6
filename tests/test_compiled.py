"""The compiled step (functional, optionally compiled by torch.compile) computes exactly what the module step
computes with loss.backward() and optimizer.step()."""

import copy
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import svi
from svi.data.memory import InMemoryData
from svi.compiled import CompiledStep, compile_problem
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


# --- compile: auto (the default) -------------------------------------------------------------
def _logistic_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 3)) + 1.0
    y = (rng.random(3000) < 1 / (1 + np.exp(-(x @ [1.0, -1.0, 0.5] - 0.5)))).astype(float)
    return {"x": x, "y": y}


def _fit(data, max_steps, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "reached max_steps" is expected here
        # 3000 rows in batches of 256: every pass ends with a ragged batch of 184 rows
        return svi.fit(LogisticRegression(3), data, family="meanfield", batch_size=256, max_steps=max_steps,
                       tol_param=1e-6, **kw)


def test_a_streamed_fit_runs_the_compiled_step_on_its_full_batches(tmp_path, caplog):
    """Parquet streamed by one process comes in full batches (and a last one with the rest), so
    the compiled step runs on them: with nearly equal batches of 250 rows (3000 rows in 12) no batch
    had the fit's 256 rows, and a streamed fit never ran compiled."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = _logistic_rows()
    table = pa.table({"x0": data["x"][:, 0], "x1": data["x"][:, 1], "x2": data["x"][:, 2], "y": data["y"]})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=500)
    files = dict(data=str(tmp_path / "rows.parquet"), columns={"x": ["x0", "x1", "x2"], "y": "y"}, in_memory_rows=0,
                 cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="svi"):
        streamed = _fit(files.pop("data"), 250, compile="auto", compile_after=100, **files)
    assert caplog.text.count("compiling the step") == 1, caplog.text
    eager = _fit(str(tmp_path / "rows.parquet"), 250, compile=False, **files)
    before = [h for h in eager.info.history if h[0] <= 100]
    assert before and streamed.info.history[:len(before)] == before  # the module step up to step 100
    assert not torch.equal(streamed.family.mean, eager.family.mean)  # and the compiled one from there


def test_auto_compiles_from_compile_after_and_a_resume_takes_the_same_steps(tmp_path, caplog):
    """``compile: auto`` runs the module step up to ``compile_after`` and the compiled one from there
    (the ragged batches excepted); the switch is at a step, not a time, so a fit resumed before it
    takes exactly the steps of the uninterrupted fit."""
    data, auto = _logistic_rows(), dict(compile="auto", compile_after=300)
    with caplog.at_level(logging.INFO, logger="svi"):
        straight = _fit(data, 650, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=100, **auto)
    assert caplog.text.count("compiling the step") == 1, caplog.text  # one graph: the ragged batches run eagerly
    eager = _fit(data, 650, compile=False)
    before = [h for h in eager.info.history if h[0] <= 300]
    assert len(before) >= 2 and straight.info.history[:len(before)] == before  # the module step until then
    assert not all(torch.equal(p, q) for p, q in zip(straight.family.parameters(), eager.family.parameters()))

    _fit(data, 250, checkpoint_dir=str(tmp_path / "b"), checkpoint_every=100, **auto)
    resumed = _fit(data, 650, checkpoint_dir=str(tmp_path / "b"), checkpoint_every=100, resume=True,
                   force_resume=True, **auto)
    assert resumed.info.steps == straight.info.steps == 650
    for p, q in zip(straight.family.parameters(), resumed.family.parameters()):
        assert torch.equal(p, q)
    assert straight.info.history == resumed.info.history


def test_a_compiler_that_fails_leaves_the_fit_as_if_it_had_not_compiled(tmp_path):
    """A C++ compiler that fails (here ``CXX=/bin/false``, with an empty graph cache so inductor must
    call it) costs one warning line: the fit goes on with the module step, on the same noise."""
    script = textwrap.dedent("""
        import warnings, numpy as np, torch, svi
        from svi.models import LogisticRegression
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2000, 3))
        data = {"x": x, "y": (rng.random(2000) < 1 / (1 + np.exp(-x @ [1.0, -1.0, 0.5]))).astype(float)}
        warnings.simplefilter("ignore", RuntimeWarning)
        fits = [svi.fit(LogisticRegression(3), data, family="meanfield", batch_size=256, max_steps=300,
                        tol_param=1e-6, compile=c) for c in (True, False)]
        same = all(torch.equal(p, q) for p, q in zip(fits[0].family.parameters(), fits[1].family.parameters()))
        print("SAME", same, fits[0].info.steps)
    """)
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "SAME True 300" in run.stdout, run.stdout + run.stderr[-3000:]
    assert run.stderr.count("torch.compile failed") == 1, run.stderr[-3000:]


def test_compile_problem_names_what_is_missing(monkeypatch):
    assert compile_problem.__wrapped__("cpu") is None  # this machine has g++ (CI installs it)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in compile_problem.__wrapped__("cpu")
