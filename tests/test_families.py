"""Gaussian families: analytic entropy and log_prob against the Gaussian density written out
from the reparameterised draws, draws' moments, the affine frame."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from svi.families import FAMILIES, FullRank, LowRank, MeanField, Structured, make_family, resolve_family
from svi.transforms import GroupLayout


def _layout(K):
    """Coordinate 0 population-level, the rest groups of 2 (or of 1 when K - 1 is odd)."""
    d = 2 if (K - 1) % 2 == 0 else 1
    return GroupLayout(torch.tensor([0]), (torch.arange(1, K).reshape(-1, d),))


def _family(name, K=4, tril_frame=False):
    torch.manual_seed(3)
    fam = make_family(name, K, loc=torch.arange(K, dtype=torch.float64), scale=torch.linspace(0.5, 2.0, K),
                      dtype=torch.float64, layout=_layout(K))
    if tril_frame and fam.warm_start_shape == "tril":  # a frame with off-diagonal terms, as the warm start sets
        frame = torch.tril(0.4 * torch.randn(K, K, dtype=torch.float64), -1) + torch.diag(torch.linspace(0.5, 2.0, K))
        fam.set_frame(torch.arange(K, dtype=torch.float64), frame)
    with torch.no_grad():  # move off the frame's own Gaussian so every parameter matters
        for p in fam.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return fam


def _gaussian_of_the_draws(fam):
    """(mean, covariance) of q written out from the reparameterised draws z = forward(eps), which
    are affine in eps: mean = forward(0), J[:, j] = forward(e_j) - forward(0), covariance J J^T.
    This goes through the sampling path only, not through distribution(), log_prob() or entropy()."""
    with torch.no_grad():
        eps = torch.cat([torch.zeros(1, fam.noise_size()), torch.eye(fam.noise_size())]).double()
        z = fam(eps).numpy()
    jac = (z[1:] - z[0]).T  # (K, noise_size)
    return z[0], jac @ jac.T


@pytest.mark.parametrize("name", list(FAMILIES))
def test_entropy_and_log_prob_match_the_gaussian_formula(name):
    fam = _family(name, K=5, tril_frame=True)
    mean, cov = _gaussian_of_the_draws(fam)
    assert np.abs(cov - np.diag(np.diag(cov))).max() > 0.1 or name == "meanfield"  # the test has correlations
    assert np.linalg.eigvalsh(cov).min() > 1e-3
    rng = np.random.default_rng(0)
    z = mean + rng.normal(size=(20, fam.size)) @ np.linalg.cholesky(cov).T * 1.5  # in the bulk and the tails
    expected = multivariate_normal(mean, cov).logpdf(z)
    diff = z - mean  # and once more by hand: -(K log 2 pi + log det S + d' S^-1 d) / 2
    by_hand = -0.5 * (fam.size * math.log(2 * math.pi) + np.linalg.slogdet(cov)[1]
                      + np.einsum("si,ij,sj->s", diff, np.linalg.inv(cov), diff))
    np.testing.assert_allclose(expected, by_hand, rtol=1e-10)
    np.testing.assert_allclose(fam.log_prob(torch.from_numpy(z)).detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fam.log_prob(torch.from_numpy(z), detach=True).numpy(), expected, rtol=1e-10, atol=1e-10)
    entropy = 0.5 * (fam.size * math.log(2 * math.pi * math.e) + np.linalg.slogdet(cov)[1])
    assert abs(float(fam.entropy().detach()) - entropy) < 1e-10
    np.testing.assert_allclose(fam.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fam.stddev.numpy(), np.sqrt(np.diag(cov)), rtol=1e-12)
    np.testing.assert_allclose(fam.covariance().numpy(), cov, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_draws_have_the_family_moments(name):
    fam = _family(name)
    n = 200_000
    z = fam.rsample(n, torch.Generator().manual_seed(0)).detach()
    cov = fam.covariance()
    se_mean = cov.diagonal().sqrt() / math.sqrt(n)
    assert ((z.mean(0) - fam.mean).abs() < 4 * se_mean).all()
    emp = torch.cov(z.T)
    assert torch.linalg.matrix_norm(emp - cov) / torch.linalg.matrix_norm(cov) < 0.02


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rsample_is_differentiable_in_every_parameter(name):
    fam = _family(name)
    z = fam.rsample(3, torch.Generator().manual_seed(0))
    (z.sum() + fam.entropy()).backward()
    for pname, p in fam.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"{name}.{pname} gets no gradient"


def test_set_frame_reproduces_the_requested_gaussian():
    K = 3
    loc = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    tril = torch.tensor([[1.0, 0, 0], [0.5, 2.0, 0], [-0.3, 0.2, 0.7]], dtype=torch.float64)
    fr = FullRank(K, dtype=torch.float64)
    fr.set_frame(loc, tril)
    assert torch.allclose(fr.mean, loc) and torch.allclose(fr.covariance(), tril @ tril.T)
    mf = MeanField(K, dtype=torch.float64)
    mf.set_frame(loc, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(mf.stddev, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="diagonal frame"):
        mf.set_frame(loc, tril)
    lr = LowRank(K, dtype=torch.float64, num_factors=1)
    lr.set_frame(loc, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(lr.mean, loc)


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown family 'gaussian'; choose one of meanfield, fullrank, lowrank, "
                                         "structured or auto"):
        make_family("gaussian", 3)


def test_auto_is_structured_with_group_effects_and_meanfield_without():
    assert resolve_family("auto", _layout(5)) == "structured"
    assert resolve_family("auto", GroupLayout.ungrouped(5)) == "meanfield"
    assert resolve_family("fullrank", _layout(5)) == "fullrank"
    assert make_family("auto", 5, layout=_layout(5)).name == "structured"


def _multilevel_gaussian(P=2, G=4, d=2, seed=0):
    """A covariance whose precision couples groups only through the population coordinates (the
    Laplace approximation of a multilevel model), coordinates interleaved so the layout matters."""
    K = P + G * d
    rng = np.random.default_rng(seed)
    order = rng.permutation(K)
    glob, groups = torch.from_numpy(order[:P]), torch.from_numpy(order[P:]).reshape(G, d)
    prec = np.zeros((K, K))
    a = rng.normal(size=(K, K))
    dense = a @ a.T + K * np.eye(K)
    keep = np.zeros((K, K), dtype=bool)
    keep[np.ix_(order[:P], range(K))] = keep[np.ix_(range(K), order[:P])] = True
    for g in groups.numpy():
        keep[np.ix_(g, g)] = True
    prec[keep] = dense[keep]
    assert np.linalg.eigvalsh(prec).min() > 0
    return K, GroupLayout(glob, (groups,)), torch.from_numpy(prec)


def test_structured_holds_a_multilevel_laplace_approximation_exactly():
    K, layout, prec = _multilevel_gaussian()
    cov = torch.linalg.inv(prec)
    loc = torch.linspace(-1, 1, K, dtype=torch.float64)
    fam = Structured(K, dtype=torch.float64, layout=layout)
    fam.set_frame(loc, torch.linalg.cholesky(cov))
    torch.testing.assert_close(fam.covariance(), cov, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fam.mean, loc)
    torch.testing.assert_close(fam.log_prob(loc.unsqueeze(0)),
                               torch.distributions.MultivariateNormal(loc, cov).log_prob(loc.unsqueeze(0)))
    # a covariance outside the family: the population marginal and the regression are kept
    dense = cov + 0.02 * torch.ones(K, K, dtype=torch.float64)
    fam.set_frame(loc, torch.linalg.cholesky(dense))
    glob = layout.global_index
    got = fam.covariance()
    torch.testing.assert_close(got[glob][:, glob], dense[glob][:, glob], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[:, glob], dense[:, glob], rtol=1e-10, atol=1e-12)
    assert (got - dense).abs().max() > 1e-3  # and the rest is a projection, not a copy


def test_structured_draws_cost_the_population_columns_only():
    """Its factor has no entries between groups: a draw moves one group's coordinates only through
    its own noise and the population's."""
    K, layout, prec = _multilevel_gaussian(P=2, G=5, d=2)
    fam = Structured(K, dtype=torch.float64, layout=layout)
    fam.set_frame(torch.zeros(K, dtype=torch.float64), torch.linalg.cholesky(torch.linalg.inv(prec)))
    with torch.no_grad():
        for p in fam.parameters():
            p.add_(0.3 * torch.randn_like(p))
    base = fam(torch.zeros(1, K, dtype=torch.float64))
    (groups,) = layout.groups
    for j in range(2, K):  # noise of a group coordinate (layout order: population first)
        e = torch.zeros(1, K, dtype=torch.float64)
        e[0, j] = 1.0
        moved = torch.nonzero((fam(e) - base).abs()[0] > 0).flatten()
        block = groups[(j - 2) // 2]
        assert set(moved.tolist()) <= set(block.tolist()), (j, moved, block)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_moving_the_expansion_keeps_q_and_its_expectation_is_exact(name):
    """set_expansion changes what the quadratic control variate expands around, never q, and
    its closed-form expectation stays exact: E_q[g'(z - z0) - (z - z0)' H (z - z0) / 2] in z-space."""
    K = 5
    fam = _family(name, K, tril_frame=True)
    rng = torch.Generator().manual_seed(1)
    a = torch.randn(K, K, generator=rng, dtype=torch.float64)
    fam.set_frame(fam.mean, fam.stddev, a @ a.T + torch.eye(K, dtype=torch.float64), torch.randn(K, dtype=torch.float64))
    with torch.no_grad():
        for p in fam.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=rng, dtype=p.dtype))
    mean, cov = fam.mean.clone(), fam.covariance().clone()
    z0 = torch.randn(K, generator=rng, dtype=torch.float64)
    b = torch.randn(K, K, generator=rng, dtype=torch.float64)
    hess, grad = b @ b.T + torch.eye(K, dtype=torch.float64), torch.randn(K, generator=rng, dtype=torch.float64)
    reframed = fam.set_expansion(z0, hess, grad)
    assert reframed == (name == "fullrank")  # fullrank re-frames to keep its expectation O(K^2)
    torch.testing.assert_close(fam.mean, mean)
    torch.testing.assert_close(fam.covariance(), cov)
    torch.testing.assert_close(fam.expansion_point, z0 if name != "fullrank" else fam.frame_loc)
    d = mean - z0
    exact = grad @ d - 0.5 * (d @ hess @ d + torch.trace(hess @ cov))
    # quadratic() is that expansion in frame coordinates up to a constant; the constant is 0 here
    # because both are written around z0 with no constant term
    assert abs(float(fam.expected_quadratic().detach()) - float(exact)) < 1e-9
    _, u = fam(fam.draw_noise(400_000, torch.Generator().manual_seed(2)), return_frame=True)
    values = fam.quadratic(u).detach()
    assert abs(float(values.mean()) - float(exact)) < 6 * float(values.std()) / math.sqrt(400_000)


def test_a_structured_state_loads_only_into_the_same_layout():
    K, layout, prec = _multilevel_gaussian()
    fam = Structured(K, dtype=torch.float64, layout=layout)
    fam.set_frame(torch.zeros(K, dtype=torch.float64), torch.linalg.cholesky(torch.linalg.inv(prec)))
    again = Structured(K, dtype=torch.float64, layout=layout)
    again.load_state_dict(fam.state_dict())
    torch.testing.assert_close(again.covariance(), fam.covariance())
    other = Structured(K, dtype=torch.float64, layout=GroupLayout(torch.arange(4), (torch.arange(4, K).reshape(-1, 1),)))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(fam.state_dict())
    with pytest.raises(ValueError, match="each of the"):
        Structured(K, layout=GroupLayout(torch.arange(3), (torch.arange(2, K).reshape(-1, 1),)))


def test_a_saved_lowrank_posterior_keeps_its_number_of_factor_columns(tmp_path):
    import svi
    from svi.models import LinearRegression

    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 4))
    y = x @ [1.0, -0.5, 0.2, 0.0] + rng.normal(size=400)
    post = svi.fit(LinearRegression(4), {"x": x, "y": y}, family="lowrank", rank=3, max_steps=200, khat_rows=0,
                   progress=False)
    assert post.family.factor.shape[1] == 3
    post.save(tmp_path / "q")
    loaded = svi.load_posterior(tmp_path / "q", model=LinearRegression(4))
    assert loaded.family.num_factors == 3
    F, d = post.family.covariance_factors
    G, e = loaded.family.covariance_factors
    assert torch.equal(F, G) and torch.equal(d, e)
