"""The subsampled ELBO: exact N/B scaling (ragged batches included), its parts, and
the sticking-the-landing gradient."""

import math

import pytest

import torch

from svi.elbo import elbo
from svi.families import make_family
from svi.model import Model, Param
from svi.models import LinearRegression, LogisticRegression
from svi.transforms import ParamSpace


def _data(N=23, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = (torch.rand(N, generator=g, dtype=torch.float64) < 0.5).double()
    return {"x": x, "y": y}


def _grad(model, space, fam, batch, N, eps):
    fam.zero_grad()
    elbo(model, space, fam, batch, N, eps=eps).value.backward()
    return torch.cat([p.grad.reshape(-1).clone() for p in fam.parameters()])


def test_minibatch_gradients_average_to_the_full_data_gradient():
    """For every batch size b (a full size and a ragged one), the average over the N cyclic
    batches of size b (each row in exactly b of them) of the (N/b)-scaled batch gradient
    equals the full-data gradient; so does the size-weighted sum over one epoch's batches."""
    N = 23
    data = _data(N)
    model = LogisticRegression(3)
    space = ParamSpace(model.params)
    for family in ("meanfield", "fullrank"):
        fam = make_family(family, space.size, loc=torch.linspace(-0.5, 0.5, space.size), scale=0.7,
                          dtype=torch.float64)
        eps = torch.randn(4, fam.noise_size(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        full = _grad(model, space, fam, data, N, eps)
        for b in (5, N % 5):  # 23 = 4 x 5 + 3: 3 is the ragged last batch's size
            grads = []
            for start in range(N):
                idx = torch.arange(start, start + b) % N
                grads.append(_grad(model, space, fam, {k: v[idx] for k, v in data.items()}, N, eps))
            assert torch.allclose(torch.stack(grads).mean(0), full, atol=1e-6, rtol=0), (family, b)
        epoch = sum(len(range(s, min(s + 5, N))) / N * _grad(model, space, fam, {k: v[s:s + 5] for k, v in data.items()}, N, eps)
                    for s in range(0, N, 5))
        assert torch.allclose(epoch, full, atol=1e-6, rtol=0)


def test_parts_add_up_and_only_the_likelihood_is_scaled():
    data = _data(10)
    model = LinearRegression(3, noise=None)
    space = ParamSpace(model.params)
    fam = make_family("meanfield", space.size, scale=0.3, dtype=torch.float64)
    eps = torch.randn(6, space.size, dtype=torch.float64)
    half = {k: v[:5] for k, v in data.items()}
    e1 = elbo(model, space, fam, half, 10, eps=eps)
    e2 = elbo(model, space, fam, half, 20, eps=eps)
    assert torch.allclose(e1.value, e1.raw) and e1.raw.equal(e1.log_prior + e1.log_likelihood + e1.log_det + e1.entropy)
    assert torch.allclose(e2.log_likelihood, 2 * e1.log_likelihood)
    for part in ("log_prior", "log_det", "entropy"):
        assert torch.equal(getattr(e1, part), getattr(e2, part))
    # by hand for particle-wise terms
    z = fam(eps)
    theta, log_det = space.constrain(z)
    ll = model.log_likelihood(theta, half).sum(-1) * 2.0
    assert torch.allclose(e1.log_likelihood, ll.mean())
    assert torch.allclose(e1.log_det, log_det.mean())
    assert torch.allclose(e1.log_det, z[:, -1].mean())  # sigma = exp(u): log|J| = u


class GaussianTarget(Model):
    """p(w) = N(m, C) with no data: q can equal it exactly."""

    batch_keys = ("y",)

    def __init__(self, mean, cov):
        self.mean, self.cov = torch.as_tensor(mean), torch.as_tensor(cov)
        self.params = {"w": Param((len(mean),))}

    def log_prior(self, p):
        return torch.distributions.MultivariateNormal(self.mean, self.cov).log_prob(p["w"])

    def log_likelihood(self, p, batch):
        return torch.zeros(p["w"].shape[0], batch["y"].shape[0], dtype=p["w"].dtype)


def test_sticking_the_landing_gradient_vanishes_at_the_exact_posterior():
    mean = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [-0.3, 0.2, 0.4]], dtype=torch.float64)
    model = GaussianTarget(mean, a @ a.T)
    space = ParamSpace(model.params)
    fam = make_family("fullrank", 3, dtype=torch.float64)
    fam.set_frame(mean, a)
    batch = {"y": torch.zeros(1, dtype=torch.float64)}
    eps = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fam.zero_grad()
    elbo(model, space, fam, batch, 1, eps=eps, stl=True).value.backward()
    stl = torch.cat([p.grad.reshape(-1) for p in fam.parameters()])
    assert stl.abs().max() < 1e-10
    fam.zero_grad()
    elbo(model, space, fam, batch, 1, eps=eps, stl=False).value.backward()
    plain = torch.cat([p.grad.reshape(-1) for p in fam.parameters()])
    assert plain.abs().max() > 1e-3  # the standard estimator is noisy even at the optimum
    # and both estimate the same thing: the STL value has the analytic entropy's expectation
    e = elbo(model, space, fam, batch, 1, num_particles=200_000, generator=torch.Generator().manual_seed(3), stl=True)
    assert math.isclose(float(e.entropy.detach()), float(fam.entropy().detach()), rel_tol=0, abs_tol=0.02)


def test_data_control_variate_is_unbiased_in_value_and_gradient_whatever_the_anchor():
    """Averaged over a partition of the rows into batches, the anchored estimate equals the
    full-data estimate with the same draws exactly, in value and in gradient, for an anchor far
    from q's mean (where the first-order term is large) as well as near it."""
    from svi.elbo import anchor_statistics

    N, B = 24, 6
    data = _data(N)
    model = LogisticRegression(3)
    space = ParamSpace(model.params)
    fam = make_family("meanfield", space.size, loc=torch.linspace(-0.5, 0.5, space.size), scale=0.3,
                      dtype=torch.float64)
    eps = torch.randn(3, fam.noise_size(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def value_and_grad(batch, anchor):
        fam.zero_grad()
        est = elbo(model, space, fam, batch, N, eps=eps, anchor=anchor)
        est.value.backward()
        return float(est.value), torch.cat([p.grad.reshape(-1).clone() for p in fam.parameters()])

    full_value, full_grad = value_and_grad(data, None)
    for z_hat in (torch.full((space.size,), 2.0, dtype=torch.float64), fam.mean.detach().clone()):
        anchor = anchor_statistics(model, space, z_hat, [data])
        parts = [value_and_grad({k: v[i : i + B] for k, v in data.items()}, anchor) for i in range(0, N, B)]
        assert sum(v for v, _ in parts) / len(parts) == pytest.approx(full_value, rel=1e-12, abs=1e-9)
        torch.testing.assert_close(sum(g for _, g in parts) / len(parts), full_grad, rtol=1e-10, atol=1e-10)
