"""What users of ArviZ and MLflow expect (issue 14): ``to_arviz`` with named dims and the
log_likelihood, posterior_predictive and observed_data groups that ``az.loo``, ``az.waic``,
``az.compare`` and ``az.plot_ppc`` read; ``svi loo``; MLflow models with an input signature,
pinned requirements and ``kind="mean" | "draws" | "probability"``."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch

import svi
from svi.imports import UntrustedModelError
from svi.posterior import Posterior, save_mlflow_model

ROOT = Path(__file__).resolve().parents[1]
FIT = {"max_steps": 1000, "khat_rows": 0}


def _frame(n=400, seed=0, groups=6):
    """Three features a, b, c; a Gaussian outcome y, a Bernoulli outcome yb and group ids school."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    g = rng.integers(0, groups, n)
    eta = x @ np.array([1.0, -0.7, 0.4]) + 0.3
    logit = eta + rng.normal(scale=0.8, size=groups)[g]
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "school": g,
                         "y": eta + 0.5 * rng.normal(size=n),
                         "yb": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)})


def _fit(model, frame, columns, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # short fits: "NOT converged" is expected
        return svi.fit(model, frame, family="meanfield", columns=columns, **{**FIT, **options})


@pytest.fixture(scope="module")
def frame():
    return _frame()


@pytest.fixture(scope="module")
def linear(frame):
    return _fit(svi.models.LinearRegression(3), frame, {"x": ["a", "b", "c"], "y": "y"})


@pytest.fixture(scope="module")
def logistic(frame):
    return _fit(svi.models.LogisticRegression(3), frame, {"x": ["a", "b", "c"], "y": "yb"})


@pytest.fixture(scope="module")
def hierarchical(frame):
    model = svi.models.HierarchicalLogisticRegression(3, 6, varying_slopes=True)
    return _fit(model, frame, {"x": ["a", "b", "c"], "y": "yb", "g": "school"}, max_steps=500)


def _arviz_warnings(caplog, fn):
    """Run fn; return (its result, ArviZ's logged warnings and Python warnings as text)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="arviz"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]


# --- ArviZ ------------------------------------------------------------------------------------------
def test_posterior_dims_are_named_from_the_column_mapping_and_group_ids(hierarchical, caplog):
    idata = hierarchical.to_arviz(n=400, seed=0)
    post = idata.posterior
    assert set(idata.groups()) == {"posterior"}
    assert post["w"].dims == ("chain", "draw", "x") and list(post["x"].values) == ["a", "b", "c"]
    assert post["alpha"].dims == ("chain", "draw", "school") and list(post["school"].values) == list(range(6))
    assert post["beta"].dims == ("chain", "draw", "school", "x")
    assert post["tau_w"].dims == ("chain", "draw", "x")
    assert post["mu"].dims == ("chain", "draw") and post.sizes["chain"] * post.sizes["draw"] == 400
    # the draws are those of post.sample, laid out chain by chain
    draws = hierarchical.sample(400, seed=0)
    assert np.array_equal(post["beta"].values.reshape(400, 6, 3), draws["beta"].double().numpy())
    table, noise = _arviz_warnings(caplog, lambda: az.summary(idata))
    assert not noise, noise  # no "Shape validation failed" (R-hat on one chain) nor any other warning
    assert "w[a]" in table.index and "alpha[3]" in table.index and "beta[2, c]" in table.index
    ours = hierarchical.summary(n=400, seed=0)
    assert np.isclose(table.loc["w[b]", "mean"], ours.loc["w[1]", "mean"], atol=1e-3)


def test_without_model_code_only_the_posterior_group_with_default_dims(linear, frame):
    bare = Posterior(None, linear.space, linear.family, linear.info, linear.model_spec)
    idata = bare.to_arviz(n=100, chains=1)
    assert set(idata.groups()) == {"posterior"} and idata.posterior.sizes["chain"] == 1
    assert idata.posterior["w"].dims == ("chain", "draw", "w_dim_0")
    with pytest.raises(UntrustedModelError, match="log_likelihood.*needs the model's code"):
        bare.to_arviz(n=100, data=frame)
    with pytest.raises(ValueError, match="multiple of chains"):
        linear.to_arviz(n=101)


def test_log_likelihood_is_per_row_and_per_draw(linear, frame):
    idata = linear.to_arviz(n=800, seed=3, data=frame)
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data"} <= set(idata.groups())
    ll = idata.log_likelihood["y"]
    assert ll.dims == ("chain", "draw", "row") and ll.shape == (4, 200, len(frame))
    assert np.array_equal(idata.observed_data["y"].values, frame["y"].to_numpy())
    assert list(idata.observed_data["row"].values) == list(range(len(frame)))
    # recomputed by hand from the posterior group's draws: the groups line up draw by draw
    p = idata.posterior
    mean = np.einsum("cdk,nk->cdn", p["w"].values, frame[["a", "b", "c"]].to_numpy()) + p["b"].values[..., None]
    sigma = p["sigma"].values[..., None]
    want = -0.5 * ((frame["y"].to_numpy() - mean) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
    assert np.allclose(ll.values, want, atol=1e-4)
    pp = idata.posterior_predictive["y"].values
    assert pp.shape == (4, 200, len(frame))
    z = (pp - mean) / sigma  # simulated outcomes are the model's: standard normal residuals
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02


def test_loo_waic_compare_and_plot_ppc_work(linear, frame, caplog):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = linear.to_arviz(n=1000, data=frame)
    one = _fit(svi.models.LinearRegression(1), frame, {"x": ["a"], "y": "y"}).to_arviz(n=1000, data=frame)
    loo, noise = _arviz_warnings(caplog, lambda: az.loo(full, pointwise=True))
    assert not noise, noise
    assert loo.n_data_points == len(frame) and (loo.pareto_k.values < 0.7).all()
    assert 3 < loo.p_loo < 8  # five parameters (w: 3, b, sigma) with a vague prior
    lppd = np.log(np.exp(full.log_likelihood["y"].values.reshape(1000, -1)).mean(0)).sum()
    assert loo.elpd_loo < lppd and lppd - loo.elpd_loo == pytest.approx(loo.p_loo, rel=1e-6)
    waic = az.waic(full)
    assert abs(waic.elpd_waic - loo.elpd_loo) < 1.0
    table = az.compare({"three features": full, "one feature": one})
    assert list(table.index) == ["three features", "one feature"] and table.loc["one feature", "elpd_diff"] > 20
    axes = az.plot_ppc(full, num_pp_samples=50, random_seed=0)
    assert len(np.atleast_1d(axes)) == 1
    plt.close("all")


def test_rows_are_a_fixed_uniform_sample_the_same_from_parquet(linear, tmp_path):
    big = _frame(n=3000, seed=5)
    path = tmp_path / "big.parquet"
    big.to_parquet(path, row_group_size=700)  # several row groups: the sample spans them
    a = linear.to_arviz(n=200, data=big, rows=500)
    b = linear.to_arviz(n=200, seed=9, data=str(path), rows=500, chains=1)
    rows = a.log_likelihood["row"].values
    assert len(rows) == 500 and np.all(np.diff(rows) > 0) and rows[-1] < 3000 and rows[0] >= 0
    assert np.array_equal(rows, b.log_likelihood["row"].values)  # any seed, any source: the same rows
    assert rows.min() < 300 and rows.max() > 2700 and 1200 < np.median(rows) < 1800  # spread, not the head
    assert np.array_equal(a.observed_data["y"].values, big["y"].to_numpy()[rows])
    assert np.array_equal(b.observed_data["y"].values, big["y"].to_numpy()[rows])
    assert a.log_likelihood.attrs["num_rows"] == 3000 and a.log_likelihood.attrs["rows_used"] == 500
    assert b.log_likelihood["y"].shape == (1, 200, 500)
    small = linear.to_arviz(n=200, data=big.iloc[:50])
    assert small.log_likelihood.attrs["rows_used"] == 50  # all rows when they fit under the cap
    assert az.loo(b).n_data_points == 500


def test_hierarchical_logistic_loo_and_ppc(hierarchical, frame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idata = hierarchical.to_arviz(n=800, data=frame)
    assert set(np.unique(idata.posterior_predictive["y"].values)) <= {0.0, 1.0}
    assert np.array_equal(idata.observed_data["y"].values, frame["yb"].to_numpy())
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo) and loo.elpd_loo > len(frame) * np.log(0.5)  # better than a coin
    az.plot_ppc(idata, num_pp_samples=30, random_seed=0)
    plt.close("all")


# --- MLflow -----------------------------------------------------------------------------------------
def test_mlflow_model_has_a_signature_pinned_requirements_and_kind_param(hierarchical, frame, tmp_path):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    folder = save_mlflow_model(hierarchical, tmp_path / "model")
    loaded = mlflow.pyfunc.load_model(str(folder))
    inputs = loaded.metadata.get_input_schema()
    assert inputs.input_names() == ["a", "b", "c", "school"]  # the outcome yb is not an input
    assert [t.name for t in inputs.input_types()] == ["double", "double", "double", "long"]
    params = {p.name: p.default for p in loaded.metadata.get_params_schema().params}
    assert params == {"draws": 1000, "seed": 0, "kind": "mean"}
    reqs = (folder / "requirements.txt").read_text().split()
    assert f"svi=={svi.__version__}" in reqs and f"torch=={torch.__version__.split('+')[0]}" in reqs
    rows = frame.drop(columns=["y", "yb"]).iloc[:20]
    with pytest.raises(MlflowException, match=r"missing inputs \['b'\]"):
        loaded.predict(rows.drop(columns="b"))
    prob = loaded.predict(rows, params={"kind": "probability", "draws": 500, "seed": 1})
    assert list(prob.columns) == ["probability", "sd", "q5", "q50", "q95"] and len(prob) == 20
    pd.testing.assert_frame_equal(prob, hierarchical.predict(rows, n=500, seed=1, kind="probability"))
    draws = hierarchical.sample(500, seed=1)  # P(y=1) by hand, with each row's group effects
    x, g = torch.tensor(rows[["a", "b", "c"]].to_numpy(), dtype=torch.float32), torch.tensor(rows["school"].to_numpy())
    eta = draws["alpha"][:, g] + (draws["beta"][:, g, :] * x).sum(-1)
    assert np.allclose(prob["probability"], torch.sigmoid(eta).mean(0).numpy(), atol=1e-5)
    mean = loaded.predict(rows, params={"draws": 4000})
    assert list(mean.columns) == ["mean", "sd", "q5", "q50", "q95"]
    assert np.allclose(mean["mean"], prob["probability"], atol=0.05)  # 0/1 draws average to P(y=1)


def test_mlflow_draws_and_probability_of_plain_models(logistic, linear, frame, tmp_path):
    import mlflow.pyfunc

    rows = frame[["a", "b", "c"]].iloc[:7]
    loaded = mlflow.pyfunc.load_model(str(save_mlflow_model(logistic, tmp_path / "logistic")))
    out = loaded.predict(rows, params={"kind": "draws", "draws": 64, "seed": 2})
    assert out.shape == (7, 64) and list(out.columns[:2]) == ["draw_0", "draw_1"]
    assert set(np.unique(out.to_numpy())) <= {0.0, 1.0}
    pd.testing.assert_frame_equal(out, logistic.predict(rows, n=64, seed=2, kind="draws"))
    p = logistic.predict(rows, n=300, kind="probability")
    draws = logistic.sample(300, seed=0)
    want = torch.sigmoid(draws["w"] @ torch.tensor(rows.to_numpy(), dtype=torch.float32).T + draws["b"][:, None])
    assert np.allclose(p["probability"], want.mean(0).numpy(), atol=1e-5)
    with pytest.raises(TypeError, match="predict_probability.*LinearRegression does not have"):
        linear.predict(rows, kind="probability")
    with pytest.raises(ValueError, match="kind must be one of"):
        linear.predict(rows, kind="median")


def test_patterns_expand_from_the_data_path_or_fall_back_with_a_warning(frame, tmp_path):
    import mlflow.pyfunc

    wide = frame.rename(columns={"a": "x_a", "b": "x_b", "c": "x_c"})
    path = tmp_path / "wide.parquet"
    wide.to_parquet(path)
    post = _fit(svi.models.LinearRegression(3), wide, {"x": "x_*", "y": "y"})
    with pytest.warns(UserWarning, match=r"no input signature: key 'x' maps to the pattern 'x_\*'"):
        folder = save_mlflow_model(post, tmp_path / "unnamed")
    assert mlflow.pyfunc.load_model(str(folder)).metadata.get_input_schema() is None
    post.info = post.info.replace(data_path=str(path))  # what a config fit records: the pattern expands against its schema
    folder = save_mlflow_model(post, tmp_path / "named")
    assert mlflow.pyfunc.load_model(str(folder)).metadata.get_input_schema().input_names() == ["x_a", "x_b", "x_c"]
    idata = post.to_arviz(n=100, data=True, rows=50)  # data=True: the recorded data set
    assert list(idata.posterior["x"].values) == ["x_a", "x_b", "x_c"]
    assert idata.log_likelihood.attrs["num_rows"] == len(frame)
    # a fit on a dict of arrays names its columns at save time, and the served model reads them
    plain = _fit(svi.models.LinearRegression(3), {"x": frame[["a", "b", "c"]].to_numpy(), "y": frame["y"].to_numpy()},
                 None)
    with pytest.warns(UserWarning, match="fit mapped no columns"):
        save_mlflow_model(plain, tmp_path / "dict")
    folder = save_mlflow_model(plain, tmp_path / "dict-named", columns={"x": ["a", "b", "c"]})
    loaded = mlflow.pyfunc.load_model(str(folder))
    assert loaded.metadata.get_input_schema().input_names() == ["a", "b", "c"]
    got = loaded.predict(frame[["a", "b", "c"]].iloc[:5], params={"draws": 200})
    want = plain.predict({"x": frame[["a", "b", "c"]].to_numpy()[:5]}, n=200)
    pd.testing.assert_frame_equal(got, want)


# --- svi loo ----------------------------------------------------------------------------------------
def test_svi_loo_prints_elpd_and_pareto_k_and_says_when_rows_were_sampled(linear, tmp_path):
    big = _frame(n=1200, seed=7)
    path = tmp_path / "data.parquet"
    big.to_parquet(path, row_group_size=400)
    folder = linear.save(tmp_path / "post")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "svi", "loo", str(folder), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600, env=env)

    res = run("--data", str(path), "--draws", "400", "--rows", "300")
    assert res.returncode == 0, res.stderr
    for text in ("elpd_loo", "p_loo", "Pareto k", "uniform sample of 300 of 1,200 rows", "Full-data estimate"):
        assert text in res.stdout, res.stdout
    want = az.loo(linear.to_arviz(n=400, data=str(path), rows=300))
    assert f"{want.elpd_loo:.2f}" in res.stdout  # the same rows and draws as the API
    res = run("--data", str(path), "--draws", "400")
    assert res.returncode == 0 and "uniform sample" not in res.stdout, res.stderr
    res = run("--draws", "400")  # fitted in memory: no data set recorded
    assert res.returncode != 0 and "pass --data" in res.stderr and "Traceback" not in res.stderr


def test_a_tracked_parquet_fit_registers_a_logged_model_with_named_inputs(frame, tmp_path, monkeypatch):
    import mlflow.artifacts
    import mlflow.models
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from svi.tracking import apply_op

    monkeypatch.chdir(tmp_path)
    frame.rename(columns={"a": "x0", "b": "x1", "c": "x2"}).to_parquet(tmp_path / "d.parquet")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # get_model_info reads MLflow's own default store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        post = svi.fit(svi.models.LinearRegression(3), str(tmp_path / "d.parquet"), columns={"x": "x*", "y": "y"},
                       max_steps=300, khat_rows=0, tracking=True, tracking_uri=uri, register_model="lin",
                       checkpoint_dir="ck", checkpoint_every=1000)
    client = MlflowClient(uri)
    run = client.get_run(post.info.run_id)
    version = client.get_model_version("lin", "1")
    # MLflow 3's registry reads the signature from the logged model a version points to; in a store
    # opened in this process the version's source is that logged model's storage location (see
    # svi.tracking._log_and_register)
    (model_id,) = [m.model_id for m in run.outputs.model_outputs]  # the run page lists it
    logged = client.get_logged_model(model_id)
    assert version.source == logged.artifact_location
    assert (logged.source_run_id, logged.experiment_id) == (run.info.run_id, run.info.experiment_id)
    assert str(logged.status) == "READY"
    for uri_of_model in ("models:/lin/1", f"models:/{model_id}"):
        info = mlflow.models.get_model_info(uri_of_model)
        assert info.signature.inputs.input_names() == ["x0", "x1", "x2"]  # "x*" expanded; y left out
        assert info.model_id == model_id and info.run_id == run.info.run_id
    assert {"posterior"} <= {a.path for a in client.list_artifacts(run.info.run_id)}  # runs:/<id>/posterior stays
    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/lin/1", tracking_uri=uri,
                                                dst_path=str(tmp_path / "registered"))
    loaded = mlflow.pyfunc.load_model(local)
    assert loaded.metadata.get_input_schema().input_names() == ["x0", "x1", "x2"]
    assert f"svi=={svi.__version__}" in (Path(local) / "requirements.txt").read_text().split()
    out = loaded.predict(pd.DataFrame({"x0": [0.1], "x1": [0.2], "x2": [0.3]}), params={"draws": 100})
    assert list(out.columns) == ["mean", "sd", "q5", "q50", "q95"] and len(out) == 1
    again = svi.load_posterior("models:/lin/1", tracking_uri=uri)  # from the files alone: no pickled code
    assert torch.equal(again.family.mean, post.family.mean)
    # a retry after a lost answer (the op keeps its model id) makes no second version
    apply_op(client, run.info.run_id, {"op": "register", "name": "lin", "path": str(tmp_path / "ck" / "outputs" /
                                                                                    "posterior"),
                                       "model_id": model_id})
    assert [str(v.version) for v in client.search_model_versions("name='lin'")] == ["1"]
