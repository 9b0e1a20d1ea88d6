"""Gaussian families: analytic entropy and log_prob against the Gaussian density written out
from the reparameterised draws, draws' moments, the affine frame."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from svi.families import FAMILIES, FullRank, LowRank, MeanField, make_family


def _family(name, K=4, tril_frame=False):
    torch.manual_seed(3)
    fam = make_family(name, K, loc=torch.arange(K, dtype=torch.float64), scale=torch.linspace(0.5, 2.0, K),
                      dtype=torch.float64)
    if tril_frame and fam.frame_kind == "tril":  # a frame with off-diagonal terms, as the warm start sets
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
    lr = LowRank(K, dtype=torch.float64, rank=1)
    lr.set_frame(loc, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(lr.mean, loc)


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown family 'gaussian'; choose one of meanfield, fullrank, lowrank"):
        make_family("gaussian", 3)
