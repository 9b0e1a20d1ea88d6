"""Posteriors: round trips, summaries against the family's moments, ArviZ, PSIS k-hat with
known answers, prediction through the pyfunc flavour, clear errors."""

import json
import math
import warnings

import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch

import svi
from svi.diagnostics import diagnose
from svi.posterior import PosteriorFormatError, load_posterior, save_mlflow_model
from tests.test_accuracy import uncentred_predictor
from tests.test_fit import conjugate_problem


@pytest.fixture(scope="module")
def fitted():
    model, data, mean, cov, _ = conjugate_problem()
    return svi.fit(model, data, family="fullrank"), data


def test_folder_round_trip_and_mlflow_model_folder(fitted, tmp_path):
    post, _ = fitted
    for folder in (post.save(tmp_path / "plain"), save_mlflow_model(post, tmp_path / "mlflow")):
        loaded = load_posterior(folder)
        a, b = post.sample(300, seed=5), loaded.sample(300, seed=5)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "mlflow" / "MLmodel").is_file()
    assert not list((tmp_path / "mlflow").rglob("*.pkl"))  # the pyfunc flavour pickles no code


def test_summary_matches_the_family_moments(fitted):
    post, _ = fitted
    n = 20_000
    s = post.summary(n=n, seed=2)
    names = ["w[0]", "w[1]", "w[2]", "b"]  # real-valued: z-space is the parameter space
    mean, sd = post.family.mean.double().numpy(), post.family.stddev.double().numpy()
    assert np.all(np.abs(s.loc[names, "mean"].to_numpy() - mean) < 4 * sd / math.sqrt(n))
    assert np.all(np.abs(s.loc[names, "sd"].to_numpy() / sd - 1) < 4 / math.sqrt(2 * n))
    z = 1.6448536269514722
    assert np.all(np.abs(s.loc[names, "q95"].to_numpy() - (mean + z * sd)) < 6 * sd / math.sqrt(n) * 1.6)
    m = post.mean(n=n, seed=2)
    assert torch.allclose(m["w"], torch.tensor(s.loc[names[:3], "mean"].to_numpy()), atol=1e-12)
    q = post.quantiles([0.5], n=n, seed=2)
    assert torch.allclose(q["b"][0].double(), torch.tensor(s.loc["b", "q50"], dtype=torch.float64), atol=1e-3 * sd[3])


def test_arviz_summary_agrees(fitted):
    post, _ = fitted
    idata = post.to_arviz(n=4000, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        az_table = az.summary(idata, kind="stats", round_to="none")
    ours = post.summary(n=4000, seed=0)
    for name in ours.index:
        az_name = name  # ArviZ names vector elements as svi does: w[0]
        assert math.isclose(az_table.loc[az_name, "mean"], ours.loc[name, "mean"], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(az_table.loc[az_name, "sd"], ours.loc[name, "sd"], rel_tol=1e-6)


def test_khat_is_small_for_fullrank_on_the_conjugate_model(fitted):
    post, data = fitted
    result = diagnose(post, data=data, num_draws=2000, log_to_run=False)
    assert result.khat < 0.5, result.report()
    assert "khat" in post.summary().columns
    draws = result.resample(500)
    assert draws["w"].shape == (500, 3)


def test_khat_is_large_for_meanfield_on_a_strongly_correlated_posterior():
    x, y, noise = uncentred_predictor()  # posterior correlation about -0.999
    model = svi.models.LinearRegression(1, prior_scale=None, intercept_scale=None, noise=noise)
    post = svi.fit(model, {"x": x, "y": y}, family="meanfield")
    with pytest.warns(RuntimeWarning, match="k-hat"):
        result = diagnose(post, data={"x": x, "y": y}, num_draws=2000, log_to_run=False)
    assert result.khat > 0.7, result.report()


def test_pyfunc_predict_matches_posterior_predict(tmp_path):
    import mlflow.pyfunc

    model, data, *_ = conjugate_problem()
    frame = pd.DataFrame({"x0": data["x"][:, 0], "x1": data["x"][:, 1], "x2": data["x"][:, 2], "y": data["y"]})
    post = svi.fit(model, frame, family="fullrank", columns={"x": "x*", "y": "y"})
    folder = save_mlflow_model(post, tmp_path / "model")
    new_rows = frame.drop(columns="y").iloc[:50]  # prediction needs no outcome column
    got = mlflow.pyfunc.load_model(str(folder)).predict(new_rows, params={"draws": 500, "seed": 1})
    want = post.predict(new_rows, n=500, seed=1)
    assert list(got.columns) == ["mean", "sd", "q5", "q50", "q95"] and len(got) == 50
    pd.testing.assert_frame_equal(got, want)
    w, b = post.mean(n=4000)["w"].numpy(), float(post.mean(n=4000)["b"])
    assert np.allclose(got["mean"], new_rows.to_numpy() @ w + b, atol=0.1)  # around the regression line
    assert np.all(got["q5"] < got["mean"]) and np.all(got["mean"] < got["q95"])


def test_bad_files_and_uris_are_clear_errors(fitted, tmp_path):
    post, _ = fitted
    folder = post.save(tmp_path / "p")
    meta = json.loads((folder / "posterior.json").read_text())
    meta["format_version"] = 99
    (folder / "posterior.json").write_text(json.dumps(meta))
    with pytest.raises(PosteriorFormatError, match="format_version 99; this svi reads versions 1 and 2"):
        load_posterior(folder)
    (folder / "posterior.json").write_text("{ not json")
    with pytest.raises(PosteriorFormatError, match="posterior.json is damaged"):
        load_posterior(folder)
    with pytest.raises(PosteriorFormatError, match="does not exist"):
        load_posterior(tmp_path / "missing")
    with pytest.raises(PosteriorFormatError, match="unknown posterior URI 's3x://bucket/p'"):
        load_posterior("s3x://bucket/p")
    with pytest.raises(PosteriorFormatError, match="cannot fetch runs:/0123456789abcdef/posterior"):
        load_posterior("runs:/0123456789abcdef/posterior", tracking_uri=f"sqlite:///{tmp_path / 'empty.db'}")
