"""D-dimensional Gaussian mixtures: exact densities, recovery against the maximum-likelihood
answer (EM), held-out log predictive density logged during a streamed fit, and bad input."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.distributions import LKJCholesky, MultivariateNormal, Normal

import svi
from svi.data.columns import DataError
from svi.data.jobs import heldout_folder, write_synthetic
from svi.elbo import log_predictive_density
from svi.model import ModelError
from svi.models import GaussianMixture
from svi.models.mixture import split_merge


def _draws(model: GaussianMixture, S: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    space = svi.transforms.ParamSpace(model.get_params())
    z = torch.randn(S, space.size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta, _ = space.constrain(z)
    return theta


def test_diagonal_density_is_the_sum_of_normals_and_weights():
    model = GaussianMixture(4, n_features=5)
    p = _draws(model)
    y = torch.randn(7, 5, dtype=torch.float64) * 2
    got = model.log_likelihood(p, {"y": y})
    comp = Normal(p["loc"][:, None], p["scale"][:, None]).log_prob(y[None, :, None]).sum(-1)  # (S, B, K)
    want = torch.logsumexp(comp + p["weights"].log()[:, None], -1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_full_covariance_density_is_the_multivariate_normal():
    model = GaussianMixture(3, n_features=4, covariance="full")
    p = _draws(model, seed=1)
    y = torch.randn(6, 4, dtype=torch.float64)
    tril = p["scale"].unsqueeze(-1) * p["corr"]
    comp = MultivariateNormal(p["loc"][:, None], scale_tril=tril[:, None]).log_prob(y[None, :, None])
    want = torch.logsumexp(comp + p["weights"].log()[:, None], -1)
    torch.testing.assert_close(model.log_likelihood(p, {"y": y}), want, rtol=1e-10, atol=1e-10)
    sims = model.sample_obs(p, {"y": y}, torch.Generator().manual_seed(0))
    assert sims.shape == (3, 6, 4)


def test_lkj_prior_matches_torch_up_to_its_constant():
    """The prior's LKJ term differs from torch's normalised LKJCholesky(eta=2) by one constant."""
    model = GaussianMixture(2, n_features=3, covariance="full")
    a, b = _draws(model, seed=2), _draws(model, seed=3)
    lkj = LKJCholesky(3, 2.0)

    def rest(p):  # the prior without its LKJ part
        m = GaussianMixture(2, n_features=3)
        return m.log_prior({k: v for k, v in p.items() if k != "corr"})

    diff_a = model.log_prior(a) - rest(a) - lkj.log_prob(a["corr"]).sum(-1)
    diff_b = model.log_prior(b) - rest(b) - lkj.log_prob(b["corr"]).sum(-1)
    torch.testing.assert_close(diff_a, torch.full_like(diff_a, float(diff_a[0])))
    torch.testing.assert_close(diff_a, diff_b)


def test_responsibilities_relabel_and_simulation_shapes():
    model = GaussianMixture(3, n_features=2)
    p = _draws(model, S=4)
    y = torch.randn(9, 2, dtype=torch.float64)
    r = model.component_probabilities(p, {"y": y})
    assert r.shape == (4, 9, 3)
    torch.testing.assert_close(r.sum(-1), torch.ones(4, 9, dtype=torch.float64))
    q = model.relabel(p)
    assert bool((q["loc"][..., 0].diff(dim=-1) > 0).all())
    # the same components, reordered together: the density is unchanged
    torch.testing.assert_close(model.log_likelihood(q, {"y": y}), model.log_likelihood(p, {"y": y}))
    assert model.sample_obs(p, {"y": y}).shape == (4, 9, 2)


def test_split_merge_repairs_two_centres_on_one_cluster_and_one_on_two():
    """k-means's local optimum that no gradient step leaves: split-and-merge finds every cluster."""
    g = torch.Generator().manual_seed(0)
    truth = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]], dtype=torch.float64)
    y = torch.cat([c + torch.randn(500, 2, generator=g, dtype=torch.float64) for c in truth])
    # two centres in the first cluster, one between the last two
    start = torch.tensor([[-0.5, 0.0], [0.5, 0.0], [20.0, 0.0], [10.0, 20.0]], dtype=torch.float64)
    labels = torch.cdist(y, start).argmin(-1)
    before = float((y - start[labels]).pow(2).sum())
    centres, labels, moves = split_merge(y, start, labels)
    assert moves >= 1
    assert torch.cdist(truth, centres).min(-1).values.max() < 0.2  # one centre on every cluster
    assert float((y - centres[labels]).pow(2).sum()) < 0.1 * before
    # a partition that is already right is left alone
    again, _, moves = split_merge(y, centres, labels)
    assert moves == 0 and torch.equal(again, centres)


def test_bad_declarations_and_rows_are_refused():
    with pytest.raises(ModelError, match="n_features"):
        GaussianMixture(3, n_features=0)
    with pytest.raises(ModelError, match="covariance"):
        GaussianMixture(3, n_features=2, covariance="spherical")
    with pytest.raises(ModelError, match="at least 2 components"):
        GaussianMixture(1, n_features=2)
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="y needs 3 columns"):
        svi.fit(GaussianMixture(2, n_features=3), {"y": rng.normal(size=(50, 2))}, max_steps=5)


def _overlapping_clusters(n: int, seed: int = 0):
    """Three overlapping 4-d clusters: k-means' hard assignments are biased for these, EM is not."""
    rng = np.random.default_rng(seed)
    loc = np.array([[0.0, 0.0, 1.0, -1.0], [1.6, 0.5, 0.0, 0.0], [-0.5, 2.0, 0.5, 1.0]])
    scale = np.array([[1.0, 0.7, 0.8, 1.2], [0.6, 1.0, 0.9, 0.7], [0.9, 0.8, 1.1, 1.0]])
    weights = np.array([0.5, 0.3, 0.2])
    comp = rng.choice(3, size=n, p=weights)
    return loc[comp] + scale[comp] * rng.standard_normal((n, 4))


def _max_error_in_sds(post, reference):
    """Worst |posterior mean - reference| in posterior sds over loc, scale and weights, after
    matching components by their means."""
    mean, sd = post.mean(4000), post.sd(4000)
    cost = ((mean["loc"].numpy()[:, None] - reference["loc"][None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    worst = 0.0
    for name in ("loc", "scale", "weights"):
        err = np.abs(mean[name].numpy()[rows] - reference[name][cols]) / sd[name].numpy()[rows]
        worst = max(worst, float(err.max()))
    return worst


def test_fit_recovers_the_maximum_likelihood_mixture_and_the_start_alone_does_not():
    """With 10,000 rows the posterior mean is the maximum-likelihood mixture to a fraction of a
    posterior sd; EM (scikit-learn, converged tightly) gives that answer independently. The fit
    starts from k-means centres, which are biased for overlapping clusters: a fit that takes no
    steps misses by several sds."""
    from sklearn.mixture import GaussianMixture as EM
    from threadpoolctl import threadpool_limits

    y = _overlapping_clusters(10_000)
    with threadpool_limits(1):  # BLAS threads spin for seconds an iteration when the other core is busy
        em = EM(3, covariance_type="diag", tol=1e-10, max_iter=5000, n_init=3, random_state=0).fit(y)
    reference = {"loc": em.means_, "scale": np.sqrt(em.covariances_), "weights": em.weights_}
    post = svi.fit(GaussianMixture(3, n_features=4), {"y": y.astype(np.float32)}, khat_rows=0)
    assert post.info.converged
    assert _max_error_in_sds(post, reference) < 0.3
    idle = svi.fit(GaussianMixture(3, n_features=4), {"y": y.astype(np.float32)}, warm_start="none",
                   max_steps=1, lr=1e-12, init_scale=1e-3, khat_rows=0)
    assert _max_error_in_sds(idle, reference) > 3.0


def test_streamed_fit_logs_heldout_lpd_and_recovers_the_histogram_clusters(tmp_path):
    """The paper's experiment in small: histogram rows from Parquet, held-out rows scored during
    the fit into a real MLflow store; the returned q's score is the last point of the curve,
    and the clusters' means and weights are those the data were made from."""
    data = tmp_path / "hist"
    meta = write_synthetic(data, "histogram_mixture", rows=20_000, features=8, files=2, components=4,
                           row_group_size=5_000, heldout=2_000, seed=1)
    assert heldout_folder(data).is_dir() and meta["heldout"]["rows"] == 2_000
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = GaussianMixture(4, n_features=8)
    post = svi.fit(model, str(data), columns=meta["columns"], heldout=str(heldout_folder(data)), heldout_every=200,
                   in_memory_rows=0, tracking=True, tracking_uri=uri, experiment="gmm", khat_rows=0)
    curve = post.info.heldout_lpd
    steps = [s for s, _, _ in curve]
    assert steps[:-1] == list(range(200, 200 * len(steps[:-1]) + 1, 200)) and steps[-1] == post.info.steps
    history = mlflow.MlflowClient(uri).get_metric_history(post.info.run_id, "heldout_lpd")
    assert [m.step for m in history] == steps
    assert [m.value for m in history] == pytest.approx([v for _, _, v in curve])
    # the last value scores the returned q: recomputed independently from the posterior's draws
    from svi.data.source import open_source

    rows = open_source(str(heldout_folder(data)), meta["columns"], model.batch_keys, (), torch.float32,
                       svi.FitOptions()).tensors
    theta = post.sample(32, seed=5)
    ll = model.log_likelihood(theta, rows).double()
    again = float((torch.logsumexp(ll, 0) - math.log(32)).mean())
    assert curve[-1][2] == pytest.approx(again, abs=0.05)
    assert curve[-1][2] == pytest.approx(
        log_predictive_density(model, post.space, post.family, rows, 32,
                               torch.Generator().manual_seed(post.info.options["seed"] + 29)), rel=1e-6)
    truth = meta["truth"]
    mean = post.mean(1000)
    cost = ((mean["loc"].numpy()[:, None] - np.array(truth["loc"])[None]) ** 2).sum(-1)
    r, c = linear_sum_assignment(cost)
    assert np.abs(mean["loc"].numpy()[r] - np.array(truth["loc"])[c]).max() < 0.05
    assert np.abs(mean["weights"].numpy()[r] - np.array(truth["weights"])[c]).max() < 0.02
    # the posterior's draws come in one labelling: ordered by the first coordinate of the means
    assert bool((post.sample(50)["loc"][..., 0].diff(dim=-1) > 0).all())
    comps = post.predict(str(heldout_folder(data)), n=50, kind="components")
    assert comps.shape == (2_000, 4) and np.allclose(comps.sum(1), 1.0)
    sims = post.predict({"y": rows["y"][:10].numpy()}, n=50)
    assert list(sims.columns[:2]) == ["mean_0", "sd_0"] and sims.shape == (10, 5 * 8)
