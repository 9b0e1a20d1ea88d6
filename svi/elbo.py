"""The subsampled ELBO estimator.

For a minibatch B of the N rows and S reparameterised draws z_s ~ q:

    ELBO ~= mean_s[ log p(theta_s) + (N/|B|) sum_{i in B} log p(x_i | theta_s) + log|det J(z_s)| ] + H[q]

(Kucukelbir et al., JMLR 2017, eqs. 5-8; Hoffman, Blei, Wang, Paisley, "Stochastic
variational inference", JMLR 2013, for the N/|B| scaling). The scaling uses the
rows actually in the batch, so a ragged last batch stays unbiased. The prior,
the Jacobian and the entropy are never scaled.

Antithetic pairs (eps, -eps) are a classical variance reduction (Hammersley and
Morton 1956; for reparameterisation gradients, Ren et al., "Adaptive antithetic
sampling for variance reduction", ICML 2019).

The quadratic control variate follows Miller, Foti, D'Amour, Adams, "Reducing
reparameterization gradient variance" (NeurIPS 2017): a Taylor expansion of the
log density, here the warm start's Laplace approximation, whose expectation under
q is known in closed form.

With ``stl=True`` the entropy term is replaced by -mean_s log q(z_s) with q's
parameters detached: the "sticking the landing" gradient (Roeder, Wu, Duvenaud,
NeurIPS 2017), unbiased, and of zero variance when q equals the posterior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from svi.families import Family
from svi.model import Model, ModelError
from svi.transforms import ParamSpace

__all__ = ["ElboEstimate", "ElboLoss", "Objective", "DataAnchor", "elbo", "log_joint", "batch_size", "anchor_statistics",
           "log_predictive_density"]


@dataclass(frozen=True)
class ElboEstimate:
    """An ELBO estimate and its parts, each a scalar tensor averaged over particles.

    ``value = log_prior + log_likelihood + log_det + entropy + w_q * cv_quadratic + w_d * cv_data``
    with the control-variate weights passed to :func:`elbo`.

    Attributes:
        value: the estimate; differentiable in the family's parameters.
        log_prior: mean_s log p(theta_s).
        log_likelihood: mean_s (N/B) sum_i log p(x_i | theta_s).
        log_det: mean_s log|det J(z_s)|.
        entropy: H[q] (analytic), or -mean_s log q(z_s) under STL.
        cv_quadratic: the quadratic control variate E_q[g] - mean_s g(u_s), unweighted (0 when off).
        cv_data: the data control variate (full-data minus batch Taylor terms at the anchor),
            unweighted (0 when off).
    """

    value: torch.Tensor
    log_prior: torch.Tensor
    log_likelihood: torch.Tensor
    log_det: torch.Tensor
    entropy: torch.Tensor
    cv_quadratic: torch.Tensor
    cv_data: torch.Tensor

    def detach(self) -> "ElboEstimate":
        return ElboEstimate(*(t.detach() for t in (self.value, self.log_prior, self.log_likelihood, self.log_det,
                                                    self.entropy, self.cv_quadratic, self.cv_data)))

    @property
    def raw(self) -> torch.Tensor:
        """The estimate without control variates."""
        return self.log_prior + self.log_likelihood + self.log_det + self.entropy


@dataclass(frozen=True)
class DataAnchor:
    """Full-data likelihood statistics at a fixed point z_hat, for the data control variate.

    Attributes:
        z: (K,) the anchor z_hat (the warm start's centre).
        value: sum over all N rows of log p(x_i | z_hat).
        grad: (K,) its gradient in z.
    """

    z: torch.Tensor
    value: torch.Tensor
    grad: torch.Tensor


def anchor_statistics(model: Model, space: ParamSpace, z: torch.Tensor, chunks, reduce_sum=None) -> DataAnchor:
    """One pass over the data (an iterable of row chunks) summing the log-likelihood and its
    gradient at z, in float64. With several ranks each passes over its share of the chunks and
    ``reduce_sum`` adds the (K + 1) sums over ranks."""
    z64 = z.detach().to(torch.float64).clone().requires_grad_(True)
    value = torch.zeros((), dtype=torch.float64)
    grad = torch.zeros_like(z64)
    for chunk in chunks:
        chunk = {k: (v.to(torch.float64) if torch.is_floating_point(v) else v) for k, v in chunk.items()}
        theta, _ = space.constrain(z64.unsqueeze(0))
        total = model.log_likelihood(theta, chunk).sum()
        (g,) = torch.autograd.grad(total, z64)
        value += total.detach()
        grad += g
    if reduce_sum is not None:
        both = reduce_sum(torch.cat([value.reshape(1), grad]))
        value, grad = both[0], both[1:]
    return DataAnchor(z.detach().clone(), value, grad)


def batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    return next(iter(batch.values())).shape[0]


def log_joint(
    model: Model, space: ParamSpace, z: torch.Tensor, batch: Mapping[str, torch.Tensor], scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unconstrained log density parts at z (S, K): (log prior, scale * sum of log-lik over rows, log|det J|),
    each of shape (S,)."""
    theta, log_det = space.constrain(z)
    lp = _checked(model, "log_prior", model.log_prior(theta), (z.shape[0],))
    ll = _checked(model, "log_likelihood", model.log_likelihood(theta, batch), (z.shape[0], batch_size(batch)))
    return lp, ll.sum(-1) * scale, log_det


def _checked(model: Model, method: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``value`` when it has ``shape``. Checked on every call, not only the first: a model whose
    output shape changes with the batch (a ragged last batch, a broadcast) would otherwise be
    summed silently into a wrong ELBO. A shape comparison costs nothing beside the step."""
    if tuple(value.shape) != shape:
        raise ModelError(f"{model.name}.{method} returned shape {tuple(value.shape)} on a batch of "
                         f"{shape[-1] if len(shape) > 1 else '?'} rows; expected {shape} "
                         f"({'particles, rows' if len(shape) > 1 else 'particles'})")
    return value


@torch.no_grad()
def log_predictive_density(model: Model, space: ParamSpace, family: Family, batch: Mapping[str, torch.Tensor],
                           num_draws: int, generator: torch.Generator | None = None, chunk_rows: int = 4096) -> float:
    """Average log predictive density of rows: mean_i log (1/S) sum_s p(y_i | theta_s), theta_s ~ q.

    The held-out measure the ADVI paper plots against time (Kucukelbir, Tran, Ranganath, Gelman,
    Blei, "Automatic differentiation variational inference", JMLR 2017, section 4); with rows the
    fit never saw, it scores the approximation as a predictive model, where the ELBO only scores
    it against the training data. Rows are scored in chunks so memory is ``S x chunk_rows``.
    """
    z = family.rsample(num_draws, generator)
    theta, _ = space.constrain(z)
    rows = next(iter(batch.values())).shape[0]
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    for start in range(0, rows, chunk_rows):
        part = {k: v[start : start + chunk_rows] for k, v in batch.items()}
        ll = model.log_likelihood(theta, part).double()  # (S, rows)
        total += (torch.logsumexp(ll, 0) - math.log(num_draws)).sum()
    return float(total) / rows


def elbo(
    model: Model,
    space: ParamSpace,
    family: Family,
    batch: Mapping[str, torch.Tensor],
    num_rows: int,
    num_particles: int = 1,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
    stl: bool = False,
    antithetic: bool = False,
    control_variate: bool = False,
    anchor: DataAnchor | None = None,
    cv_weights: tuple[float, float] = (1.0, 1.0),
) -> ElboEstimate:
    """Estimate the ELBO on one minibatch.

    Args:
        model: the model.
        space: its flattened unconstrained space.
        family: q(z); may be wrapped in ``DistributedDataParallel`` (called for the draws).
        batch: {key: tensor with B rows}.
        num_rows: N, the number of rows in the full data set.
        num_particles: S, draws of z used in one vectorised pass.
        generator: source of the standard-normal noise.
        eps: the noise itself (S, noise_size), overriding ``num_particles``/``generator``
            (``antithetic`` still pairs it with -eps).
        stl: use the sticking-the-landing gradient.
        antithetic: pair every draw eps with -eps (2S particles). For a Gaussian posterior the
            gradient of the mean is linear in eps, so the pairs cancel its noise exactly.
        control_variate: subtract the family's quadratic g(u) = -u^T H_u u / 2 (the warm start's
            Gaussian approximation in frame coordinates) from every draw and add back its exact
            expectation: unbiased, and of near-zero variance for a near-Gaussian posterior.
        anchor: full-data statistics at z_hat for the data control variate: the batch's
            scaled log-likelihood at z_hat and its first-order Taylor term are swapped for their
            full-data values, so the subsampling noise shrinks with the distance from z_hat
            (a fixed-anchor SVRG: Johnson and Zhang, NeurIPS 2013; Baker, Fearnhead, Fox, Nemeth,
            "Control variates for stochastic gradient MCMC", Statistics and Computing 2019).
        cv_weights: (quadratic, data) weights of the two control variates; any weight keeps the
            estimator unbiased (the trainer re-estimates them to minimise its variance).
    """
    base = getattr(family, "module", family)  # unwrap DistributedDataParallel
    if eps is None:
        eps = base.draw_noise(num_particles, generator)
    if antithetic:
        eps = torch.cat([eps, -eps])
    use_cv = control_variate and base.has_quadratic
    z, u = family(eps, return_frame=True) if use_cv else (family(eps), None)
    scale = num_rows / batch_size(batch)
    zero = z.new_zeros(())
    if anchor is None or scale == 1.0:
        lp, ll, ld = log_joint(model, space, z, batch, scale)
        cv_data = zero
    else:
        lp, ll, ld, cv_data = _anchored_log_joint(model, space, z, batch, scale, anchor)
    if stl:
        entropy = -base.log_prob(z, detach=True).mean()
    else:
        entropy = base.entropy()
    cv_quad = base.expected_quadratic() - base.quadratic(u).mean() if use_cv else zero
    lp, ll, ld = lp.mean(), ll.mean(), ld.mean()
    value = lp + ll + ld + entropy + cv_weights[0] * cv_quad + cv_weights[1] * cv_data
    return ElboEstimate(value, lp, ll, ld, entropy, cv_quad, cv_data)


def _anchored_log_joint(model, space, z, batch, scale, anchor: DataAnchor):
    """log_joint plus the data control variate, evaluating the anchor as one extra particle.

    The extra particle sits at z_hat but carries the mean of the particles' gradient paths
    (value z_hat, derivative mean_s dz_s), so its scaled batch log-likelihood contributes
    -g_B^T mean_s dz_s to the gradient, where g_B is the batch gradient at z_hat.

    Returns:
        (log prior (S,), scaled batch log-lik (S,), log|det J| (S,), control variate (scalar)).
    """
    S = z.shape[0]
    z_hat = anchor.z.to(z.dtype)
    path = (z - z.detach()).mean(0, keepdim=True)
    theta, log_det = space.constrain(torch.cat([z, z_hat + path]))
    lp = _checked(model, "log_prior", model.log_prior(theta), (S + 1,))[:S]
    rows = _checked(model, "log_likelihood", model.log_likelihood(theta, batch), (S + 1, batch_size(batch)))
    ll = rows[:S].sum(-1) * scale
    batch_at_anchor = rows[S].sum() * scale
    # The first-order term enters the gradient only (value 0, derivative the full-data gradient):
    # its value grad^T (z - z_hat) has no batch counterpart in the value (the batch's first-order
    # term comes in through the path particle's derivative), so counting it would shift the
    # reported ELBO by that amount, which changes whenever the anchor moves.
    linear = (z - z_hat).mean(0) @ anchor.grad.to(z.dtype)
    full_at_anchor = anchor.value.to(z.dtype) + (linear - linear.detach())
    return lp, ll, log_det[:S], full_at_anchor - batch_at_anchor


class ElboLoss(torch.nn.Module):
    """The ELBO estimator as a module over the family's parameters (Pyro's design: the loss is
    a plain ``nn.Module``), so ``torch.func.functional_call`` can differentiate it functionally.

    Args:
        model, space, family, num_rows: as for :func:`elbo`.
    """

    def __init__(self, model: Model, space: ParamSpace, family: Family, num_rows: int):
        super().__init__()
        self.model, self.space, self.num_rows = model, space, num_rows
        self.family = family

    def forward(self, batch, eps, stl=False, antithetic=False, control_variate=False, anchor=None,
                cv_weights=(1.0, 1.0)) -> ElboEstimate:
        return elbo(self.model, self.space, self.family, batch, self.num_rows, eps=eps, stl=stl, antithetic=antithetic,
                    control_variate=control_variate, anchor=anchor, cv_weights=cv_weights)


@dataclass
class Objective:
    """The fit's ELBO estimator, configured once (as Pyro's ELBO objects are): the model, the
    particles and the variance reductions the options chose. What the schedule changes during
    the fit (the switch to STL, the control variates' weights) and the data control variate's
    anchor are its state, saved with a checkpoint.

    Attributes:
        model, space, num_rows, num_particles, antithetic, control_variate: as for :func:`elbo`.
        stl: the sticking-the-landing gradient (the schedule may switch it on).
        cv_weights: (quadratic, data) control-variate weights, re-estimated every window.
        anchor: the data control variate's full-data statistics (``None``: off).
    """

    model: Model
    space: ParamSpace
    num_rows: int
    num_particles: int = 1
    antithetic: bool = False
    control_variate: bool = False
    stl: bool = False
    cv_weights: tuple = (1.0, 1.0)
    anchor: DataAnchor | None = field(default=None)

    def __call__(self, family: Family, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                 eps: torch.Tensor | None = None) -> ElboEstimate:
        return elbo(self.model, self.space, family, batch, self.num_rows, self.num_particles, generator, eps=eps,
                    stl=self.stl, antithetic=self.antithetic, control_variate=self.control_variate,
                    anchor=self.anchor, cv_weights=self.cv_weights)

    def loss_module(self, family: Family) -> "ElboLoss":
        """The estimator as a module over ``family``'s parameters (for ``torch.func``)."""
        return ElboLoss(self.model, self.space, family, self.num_rows)

    def state_dict(self) -> dict[str, Any]:
        a = self.anchor
        return {"stl": self.stl, "cv_weights": list(self.cv_weights),
                "anchor": None if a is None else {"z": a.z, "value": a.value, "grad": a.grad}}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.stl = bool(saved["stl"])
        self.cv_weights = tuple(saved["cv_weights"])
        a = saved["anchor"]
        self.anchor = None if a is None else DataAnchor(a["z"], a["value"], a["grad"])
