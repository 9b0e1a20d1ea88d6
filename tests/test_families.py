"""Gaussian families: analytic entropy and log_prob against torch.distributions, draws'
moments, the affine frame."""

import math

import pytest
import torch

from svi.families import FAMILIES, FullRank, LowRank, MeanField, make_family


def _family(name, K=4):
    torch.manual_seed(3)
    fam = make_family(name, K, loc=torch.arange(K, dtype=torch.float64), scale=torch.linspace(0.5, 2.0, K),
                      dtype=torch.float64)
    with torch.no_grad():  # move off the frame's own Gaussian so every parameter matters
        for p in fam.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return fam


@pytest.mark.parametrize("name", list(FAMILIES))
def test_entropy_and_log_prob_match_torch_distributions(name):
    fam = _family(name)
    dist = fam.distribution()
    assert torch.allclose(fam.entropy(), dist.entropy(), rtol=1e-12, atol=1e-12)
    z = torch.randn(7, fam.size, dtype=torch.float64)
    assert torch.allclose(fam.log_prob(z), dist.log_prob(z), rtol=1e-10, atol=1e-10)
    assert torch.allclose(fam.mean, dist.mean)
    assert torch.allclose(fam.stddev, dist.variance.sqrt())


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
