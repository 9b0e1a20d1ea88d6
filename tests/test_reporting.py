"""Honest reporting: a fit that stopped without converging, or whose PSIS k-hat is high, is never
shown as a plain success (MLflow tags and description, the CLI summary), and the end-of-fit
k-hat on a sample of rows agrees with the full-data one."""

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import svi
from svi.data.memory import InMemoryData
from svi.diagnostics import psis, psis_on_rows


def _logistic(n=200_000, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w - 0.3)))).astype(float)
    return {"x": x, "y": y}


@pytest.fixture(scope="module")
def logistic_fit():
    data = _logistic(n=100_000)
    post = svi.fit(svi.models.LogisticRegression(5), data, family="meanfield", batch_size=4096, khat_rows=0)
    return post, InMemoryData(data, integer_keys=(), dtype=torch.float32)


def _naive_khat(post, source, rows, seed):
    """k-hat with the sample's likelihood simply scaled by N/n: the estimator not to use."""
    import arviz as az

    z = post.sample_unconstrained(2000, seed=seed).double()
    post64 = svi.Posterior(post.model, post.space, post.family.double(), post.info)
    theta, log_det = post64.space.constrain(z)
    sample = {k: v.double() if torch.is_floating_point(v) else v for k, v in source.sample(rows, seed + 29).items()}
    with torch.no_grad():
        ll = post.model.log_likelihood(theta, sample).sum(-1) * (source.num_rows / rows)
        log_ratio = (ll + post.model.log_prior(theta) + log_det - post64.family.log_prob(z)).numpy()
    return float(az.psislw(log_ratio.copy())[1])


def test_khat_on_a_sample_of_rows_agrees_with_the_full_data_khat(logistic_fit):
    post, source = logistic_fit
    seeds = range(2)  # the same draws in both: only the log density differs
    exact = np.array([psis(post, source.chunks(), num_draws=2000, seed=s).khat for s in seeds])
    sampled = np.array([psis_on_rows(post, source, rows=10_000, num_draws=2000, seed=s).khat for s in seeds])
    assert np.all(np.abs(sampled - exact) < 0.1), (sampled, exact)  # the tail fit moves a little
    # plain N/n scaling of the same samples puts the log density several sds off: a far worse k-hat
    naive = np.array([_naive_khat(post, source, 10_000, s) for s in seeds])
    assert np.all(naive > exact + 0.3), (naive, exact)
    whole = psis_on_rows(post, source, rows=10**9, num_draws=2000, seed=1).khat  # all rows: the exact k-hat
    assert whole == pytest.approx(psis(post, source.chunks(), num_draws=2000, seed=1).khat, abs=1e-9)


def _tags(uri, run_id):
    return MlflowClient(uri).get_run(run_id).data.tags


def test_an_unconverged_fit_is_tagged_and_described_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3))
    data = {"x": x, "y": x @ np.array([1.0, -1.0, 0.5]) + rng.normal(size=4000)}
    with pytest.warns(RuntimeWarning, match="NOT converged"):
        bad = svi.fit(svi.models.LinearRegression(3), data, batch_size=64, max_decays=0, warm_start="none",
                      tracking=True)
    good = svi.fit(svi.models.LinearRegression(3), data, tracking=True)
    uri = "sqlite:///mlflow.db"
    tags = _tags(uri, bad.info.run_id)
    assert tags["svi.status"].startswith("NOT converged") and tags["svi.converged"] == "false"
    assert tags["svi.stop_reason"] == "max_decays" and "gave up" in tags["mlflow.note.content"]
    assert float(tags["svi.khat"]) == pytest.approx(bad.info.khat, abs=1e-3)
    tags = _tags(uri, good.info.run_id)
    assert good.info.converged and tags["svi.status"] == "converged" and tags["svi.converged"] == "true"
    assert tags["svi.stop_reason"] == "converged" and float(tags["svi.khat"]) < 0.5
    assert "khat" in good.summary(n=200).columns  # and the summary table shows it


def test_a_high_khat_is_warned_about_and_tagged(tmp_path, monkeypatch):
    # a fixed-noise linear model with tightly correlated predictors: mean-field cannot fit it, k-hat says so
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3000, 1))
    x = np.hstack([z + 0.01 * rng.normal(size=(3000, 1)) for _ in range(4)])
    data = {"x": x, "y": x.sum(1) + rng.normal(size=3000)}
    with pytest.warns(RuntimeWarning, match=r"PSIS k-hat = .* > 0.7.*family=fullrank") as caught:
        post = svi.fit(svi.models.LinearRegression(4, noise=1.0), data, family="meanfield", tracking=True)
    assert post.info.khat > 0.7
    # a flat regression has no group effects to declare: the advice does not speak of them
    assert not any("multilevel" in str(w.message) for w in caught if "k-hat" in str(w.message))
    assert _tags("sqlite:///mlflow.db", post.info.run_id)["svi.status"].endswith("k-hat high")


def test_a_logged_posterior_records_its_data_so_diagnose_by_run_uri_works(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 2))
    pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "y": x @ [1.0, -1.0] + rng.normal(size=3000)}).to_parquet("d.parquet")
    post = svi.fit(svi.models.LinearRegression(2), "d.parquet", columns={"x": "x*", "y": "y"}, tracking=True,
                   khat_rows=0)
    uri = f"runs:/{post.info.run_id}/posterior"
    from svi.diagnostics import diagnose

    result = diagnose(uri, tracking_uri="sqlite:///mlflow.db", num_draws=500)
    assert result.posterior.info.data_path == str(tmp_path / "d.parquet") and result.khat < 0.7


def test_the_advice_for_a_poor_fit_fits_the_family_and_the_model():
    """fullrank is suggested unless q is fullrank; declaring group effects only to a model that reads
    group ids (an integer key) and declares none; a fullrank flat model gets neither."""
    import torch

    from svi.families import make_family
    from svi.trainer import family_advice
    from svi.transforms import ParamSpace

    class UndeclaredGroups(svi.models.LinearRegression):
        batch_keys = ("x", "y", "g")
        integer_keys = ("g",)

    flat = svi.models.LinearRegression(2)
    flat_space = ParamSpace(flat.params)
    for name, expected in [("meanfield", "family=fullrank"), ("fullrank", "")]:
        family = make_family(name, flat_space.size, dtype=torch.float64)
        assert family_advice(flat, flat_space, family) == expected
    grouped = UndeclaredGroups(2)
    advice = family_advice(grouped, ParamSpace(grouped.params), make_family("fullrank", 4, dtype=torch.float64))
    assert advice.startswith("a multilevel model fits best with its group effects declared")
    declared = svi.models.HierarchicalLinearRegression(2, 3)
    space = ParamSpace(declared.params)
    assert family_advice(declared, space, make_family("meanfield", space.size, dtype=torch.float64)) == "family=fullrank"
    wide = svi.models.LinearRegression(2500)  # fullrank's factor would hold 3 million numbers
    wide_space = ParamSpace(wide.params)
    assert family_advice(wide, wide_space, make_family("meanfield", wide_space.size, dtype=torch.float64)).startswith(
        "family=lowrank")
