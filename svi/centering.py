"""How far to centre each group effect, chosen from the data.

A group effect ``theta_g ~ Normal(loc, scale)`` (a :class:`svi.Param` with ``loc`` and ``scale``)
is fitted in the coordinates ``u_g`` of :meth:`svi.transforms.ParamSpace.constrain`,
``theta_g = loc + scale^(1 - lam_g) (u_g - lam_g loc)``: ``lam_g = 1`` is the centred form,
``lam_g = 0`` the non-centred one. Which suits a group depends on how much its data say
against the prior: for a Gaussian group effect with data information ``I_g`` (the negative
second derivative of the log-likelihood in ``theta_g``), the partially non-centred
parametrisation with

    lam_g = I_g scale^2 / (1 + I_g scale^2),

the share of ``theta_g``'s conditional posterior precision that comes from its data, makes
``u_g`` a posteriori independent of ``loc`` and ``scale`` (Papaspiliopoulos, Roberts, Sköld,
"A general framework for the parametrization of hierarchical models", Statistical Science
2007, section 3; the same weight is the optimum of Gorinova, Moore, Hoffman, "Automatic
Reparameterisation of Probabilistic Programs", ICML 2020, for the Gaussian case). Groups of 8
rows get ``lam`` near 0, groups of 8,000 near 1, and a mix gets each its own.

``I_g`` is exact per element because each data row touches one group: the likelihood's Hessian
in a group effect of shape ``(G, *rest)`` is block diagonal over groups, so one Hessian-vector
product per position of ``rest`` (all groups at once) reads its diagonal.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from svi.model import Model
from svi.transforms import ParamSpace

__all__ = ["data_information", "empirical_bayes_scale", "choose_centering", "describe"]


def data_information(model: Model, space: ParamSpace, batch: Mapping[str, torch.Tensor], num_rows: int,
                     z: torch.Tensor, name: str, chunk_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """What the data alone say about each element of group effect ``name``, from the point z.

    Args:
        model, space: the model and its space.
        batch: n rows (a uniform sample, or all rows); the likelihood is scaled by N/n.
        num_rows: N, the full data's rows.
        z: (K,) the point (float64).
        name: a group effect of ``space``.

    Returns:
        (gradient, information), each of the parameter's shape: the scaled log-likelihood's first
        derivative and minus the diagonal of its second derivative in each element (float64;
        the information clamped at 0: a likelihood that is not log-concave there says nothing
        in favour of centring).
    """
    block = next(b for b in space.blocks if b.name == name)
    n = next(iter(batch.values())).shape[0]
    with torch.no_grad():
        theta, _ = space.constrain(z.to(torch.float64).unsqueeze(0))
    theta = {k: v.detach() for k, v in theta.items()}
    rest = math.prod(block.shape[1:])
    info = torch.zeros((block.shape[0], rest), dtype=torch.float64)
    gradient = torch.zeros((block.shape[0], rest), dtype=torch.float64)
    with torch.enable_grad():
        for start in range(0, n, chunk_rows):
            rows = {k: (v[start : start + chunk_rows].double() if torch.is_floating_point(v)
                        else v[start : start + chunk_rows]) for k, v in batch.items()}
            x = theta[name].clone().requires_grad_(True)
            ll = model.log_likelihood({**theta, name: x}, rows).sum() * (num_rows / n)
            (grad,) = torch.autograd.grad(ll, x, create_graph=True)
            grad = grad.reshape(block.shape[0], rest)
            gradient += grad.detach()
            for j in range(rest):
                if not grad.requires_grad:  # the likelihood is linear (or constant) in this effect
                    break
                (hv,) = torch.autograd.grad(grad[:, j].sum(), x, retain_graph=True, allow_unused=True)
                if hv is not None:
                    info[:, j] -= hv.reshape(block.shape[0], rest)[:, j].detach()
    return gradient.reshape(block.shape), info.clamp_min(0.0).reshape(block.shape)


def empirical_bayes_scale(estimate: torch.Tensor, information: torch.Tensor, loc: torch.Tensor | None,
                          iterations: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Loc and scale of ``estimate_g ~ Normal(loc, sqrt(scale^2 + 1/I_g))`` by maximum marginal likelihood.

    The normal-normal empirical Bayes fixed point (Morris, "Parametric empirical Bayes
    inference", JASA 1983), per position of the trailing axes: the scale the groups' own
    estimates imply once their noise is taken out. Unlike the scale at the non-centred mode
    (inflated several-fold when groups are data-rich: there the prior on the raw effects pulls
    the scale up), it is what the centring weight needs.

    Args:
        estimate: (G, *rest) each group's data-only estimate.
        information: (G, *rest) its precision; groups with 0 carry no weight.
        loc: (*rest) a known loc (a number in the model), or ``None`` to estimate it.

    Returns:
        (loc, scale), each of shape ``rest``.
    """
    known = information > 0
    noise = torch.where(known, 1.0 / information.clamp_min(1e-300), torch.zeros_like(information))
    weight_on = known.to(information.dtype)
    count = weight_on.sum(0).clamp_min(1.0)
    m = (estimate * weight_on).sum(0) / count if loc is None else loc
    var = (((estimate - m) ** 2 - noise) * weight_on).sum(0).div(count).clamp_min(1e-8)
    for _ in range(iterations):
        w = weight_on / (var + noise)
        if loc is None:
            m = (w * estimate).sum(0) / w.sum(0).clamp_min(1e-300)
        new = ((w**2) * ((estimate - m) ** 2 - noise)).sum(0) / (w**2).sum(0).clamp_min(1e-300)
        new = new.clamp_min(1e-8)
        if bool(torch.allclose(new, var, rtol=1e-10, atol=0.0)):
            var = new
            break
        var = new
    return m, var.sqrt()


def choose_centering(model: Model, space: ParamSpace, batch: Mapping[str, torch.Tensor], num_rows: int,
                     z: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``lam = I s^2 / (1 + I s^2)`` for every ``"auto"`` group effect, from the point z (K,).

    ``I`` is each element's data information at z; ``s`` the scale the groups' data-only
    estimates imply (:func:`empirical_bayes_scale`; each estimate one Newton step on the
    likelihood from z), or the model's number where the scale is fixed.

    Returns:
        ({name: lam of the parameter's shape}, {scale parameter name: its estimate}); the space is
        not changed. The estimates (of the scale parameter's own shape) are a better start for
        the next warm start than z's scales.
    """
    with torch.no_grad():
        theta, _ = space.constrain(z.to(torch.float64).unsqueeze(0))
    lams, scales = {}, {}
    for name in space.auto_centering:
        block = next(b for b in space.blocks if b.name == name)
        gradient, info = data_information(model, space, batch, num_rows, z, name)
        loc, log_scale = space.loc_scale(block, theta, theta[name])
        estimate = theta[name][0] + torch.where(info > 0, gradient / info.clamp_min(1e-300), torch.zeros_like(info))
        if isinstance(block.scale, str):
            fixed_loc = None if isinstance(block.loc, str) else loc[0].expand(block.shape[1:])
            _, s = empirical_bayes_scale(estimate, info, fixed_loc)
            target = theta[block.scale].shape[1:]
            s = s if tuple(s.shape) == tuple(target) else s.pow(2).mean().sqrt().expand(target)
            scales[block.scale] = s
            s2 = s.pow(2).reshape((1,) * (len(block.shape) - s.dim()) + tuple(s.shape))
        else:
            s2 = torch.exp(2.0 * log_scale[0])
        ratio = info * s2.expand(block.shape)
        lams[name] = ratio / (1.0 + ratio)
    return lams, scales


def describe(centering: Mapping[str, torch.Tensor]) -> str:
    """One line for the log: how many elements of each group effect lean centred."""
    parts = []
    for name, lam in centering.items():
        parts.append(f"{name}: {int((lam > 0.5).sum())} of {lam.numel()} centred (median {float(lam.median()):.2f})")
    return "centring " + "; ".join(parts)
