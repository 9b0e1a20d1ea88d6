"""Optimisers: Stan's adaptive step-size sequence, its eta search, and a factory
for any ``torch.optim`` optimiser with an optional learning-rate schedule.

Stan's sequence (Kucukelbir et al., JMLR 2017, eqs. 10-11; Stan's ``advi.hpp``):

    s_1 = g_1^2,   s_k = alpha g_k^2 + (1 - alpha) s_{k-1}
    rho_k = eta * k^(-1/2) / (tau + sqrt(s_k))          (elementwise, tau = 1, alpha = 0.1)

eta is the optimiser's ``lr``, so torch's learning-rate schedulers compose with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch.optim import Optimizer

__all__ = [
    "StanStepSize",
    "EtaSearchError",
    "EtaSearchResult",
    "search_eta",
    "STAN_ETAS",
    "make_optimizer",
    "make_scheduler",
]

STAN_ETAS: tuple[float, ...] = (100.0, 10.0, 1.0, 0.1, 0.01)


class StanStepSize(Optimizer):
    """Stan's ADVI step-size sequence as a ``torch.optim.Optimizer`` (minimising the loss -ELBO).

    Args:
        params: parameters or parameter groups.
        lr: eta, the scale of the sequence (Stan searches 100, 10, 1, 0.1, 0.01).
        tau: the 1 in 1 + sqrt(s_k), which bounds the step when gradients are tiny.
        alpha: weight of the newest squared gradient in s_k.

    All state (the iteration count k and s_k per parameter) lives in ``state_dict()``.
    """

    def __init__(self, params, lr: float = 1.0, tau: float = 1.0, alpha: float = 0.1):
        if lr <= 0:
            raise ValueError(f"StanStepSize lr (eta) must be positive, got {lr}")
        if not 0 < alpha <= 1:
            raise ValueError(f"StanStepSize alpha must lie in (0, 1], got {alpha}")
        super().__init__(params, dict(lr=lr, tau=tau, alpha=alpha))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            state = optimizer_state(self, "stan", params)
            new_params, new_state = stan_update(params, [p.grad for p in params], state, group)
            for p, v in zip(params, new_params):
                p.copy_(v)
            for key, values in new_state.items():
                for t, v in zip(state[key], values):
                    t.copy_(v)
        return loss


# --- functional updates: one source for the optimiser classes and the compiled step -------------
def optimizer_state(optimizer: Optimizer, kind: str, params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The optimiser's per-parameter state tensors as lists, created as torch creates them when
    missing, so a functional update can read and write them in place."""
    out: dict[str, list[torch.Tensor]] = {}
    for p in params:
        st = optimizer.state[p]
        if not st:
            if kind == "stan":
                st["step"] = torch.zeros((), dtype=torch.float64)
                st["sq_grad"] = torch.zeros_like(p)
            elif kind == "adam":
                st["step"] = torch.tensor(0.0, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif kind == "sgd":
                st.setdefault("momentum_buffer", None)
                continue
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                out.setdefault(key, []).append(value)
    return out


def stan_update(params, grads, state, group):
    """Stan's step: s = g^2 on the first step, else alpha g^2 + (1 - alpha) s; p -= eta k^-1/2 g / (tau + sqrt(s))."""
    lr, tau, alpha = group["lr"], group["tau"], group["alpha"]
    new_p, new_step, new_sq = [], [], []
    for p, g, k, s in zip(params, grads, state["step"], state["sq_grad"]):
        k1 = k + 1
        s1 = torch.where(k == 0, g * g, (1 - alpha) * s + alpha * (g * g))
        rate = lr * k1.to(torch.float64).rsqrt()
        new_p.append(p - (rate * g / (s1.sqrt() + tau)).to(p.dtype))
        new_step.append(k1)
        new_sq.append(s1)
    return new_p, {"step": new_step, "sq_grad": new_sq}


def adam_update(params, grads, state, group):
    """torch.optim.Adam's step (no weight decay, amsgrad or maximize), written out-of-place."""
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    new_p, new_step, new_m, new_v = [], [], [], []
    for p, g, k, m, v in zip(params, grads, state["step"], state["exp_avg"], state["exp_avg_sq"]):
        k1 = k + 1
        m1 = m.lerp(g, 1 - beta1)
        v1 = v * beta2 + (1 - beta2) * (g * g)
        k64 = k1.to(torch.float64)
        bias1 = 1 - beta1**k64
        bias2_sqrt = (1 - beta2**k64).sqrt()
        denom = v1.sqrt() / bias2_sqrt.to(p.dtype) + eps
        new_p.append(p - (lr / bias1).to(p.dtype) * m1 / denom)
        new_step.append(k1)
        new_m.append(m1)
        new_v.append(v1)
    return new_p, {"step": new_step, "exp_avg": new_m, "exp_avg_sq": new_v}


def sgd_update(params, grads, state, group):
    """Plain SGD (no momentum, dampening, weight decay or nesterov)."""
    return [p - group["lr"] * g for p, g in zip(params, grads)], {}


FUNCTIONAL_UPDATES = {"stan": stan_update, "adam": adam_update, "sgd": sgd_update}


def functional_kind(optimizer: Optimizer) -> str | None:
    """The functional update that reproduces this optimiser exactly, or None."""
    if isinstance(optimizer, StanStepSize):
        return "stan"
    for group in optimizer.param_groups:
        if group.get("weight_decay", 0) or group.get("maximize", False):
            return None
    if type(optimizer) is torch.optim.Adam and not any(g["amsgrad"] for g in optimizer.param_groups):
        return "adam"
    if type(optimizer) is torch.optim.SGD and not any(g["momentum"] or g["nesterov"] for g in optimizer.param_groups):
        return "sgd"
    return None


class EtaSearchError(RuntimeError):
    """Every candidate eta failed (Stan: "All proposed step-sizes failed")."""


@dataclass(frozen=True)
class EtaSearchResult:
    eta: float
    elbo_init: float
    tried: tuple[tuple[float, float], ...]  # (eta, ELBO after adapt_iter steps)


def search_eta(
    trial: Callable[[float], float], elbo_init: float, etas: Sequence[float] = STAN_ETAS
) -> EtaSearchResult:
    """Stan's eta adaptation (``advi::adapt_eta``).

    Each ``trial(eta)`` runs ``adapt_iter`` steps from the same start and returns
    the ELBO reached (-inf when it diverged). The search stops at the first eta
    whose ELBO is worse than the best so far, provided the best beat the initial
    ELBO; the last eta is accepted only if it beats the initial ELBO.

    Raises:
        EtaSearchError: when no eta improves on the initial ELBO.
    """
    best_elbo, best_eta = -math.inf, None
    tried = []
    for i, eta in enumerate(etas):
        value = float(trial(eta))
        if not math.isfinite(value):
            value = -math.inf
        tried.append((eta, value))
        if value < best_elbo and best_elbo > elbo_init:
            break
        last = i == len(etas) - 1
        if not last:
            best_elbo, best_eta = value, eta
        elif value > elbo_init:
            best_elbo, best_eta = value, eta
        else:
            raise EtaSearchError(
                "All proposed step sizes failed (eta = "
                + ", ".join(f"{e:g}: ELBO {v:.6g}" for e, v in tried)
                + f"; initial ELBO {elbo_init:.6g}). The model may be severely ill-conditioned or misspecified: "
                "check the priors and the data, start nearer the posterior (Param.init), or set eta by hand."
            )
    return EtaSearchResult(float(best_eta), float(elbo_init), tuple(tried))


_ALIASES = {"stan": StanStepSize}


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float | None = None, **kwargs: Any) -> Optimizer:
    """An optimiser by name: ``stan`` or any class in ``torch.optim`` (case-insensitive: ``adam``, ``SGD``, ...).
    Adam and AdamW use torch's fused implementation unless ``fused``, ``foreach`` or
    ``differentiable`` is given.

    Raises:
        ValueError: for an unknown name or options the optimiser does not take.
    """
    cls = _ALIASES.get(name.lower())
    if cls is None:
        known = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}
        cls = known.get(name.lower())
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
            names = sorted(n for n, c in known.items() if isinstance(c, type) and issubclass(c, Optimizer) and n != "optimizer")
            raise ValueError(f"unknown optimizer {name!r}; choose 'stan' or one of torch.optim: {', '.join(names)}")
    if lr is not None:
        kwargs["lr"] = lr
    if cls in (torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach", "differentiable"} & set(kwargs):
        kwargs["fused"] = True  # one kernel for the whole update: half the cost of the per-tensor loop on CPU
    try:
        return cls(params, **kwargs)
    except TypeError as e:
        raise ValueError(f"optimizer {name!r} rejected options {sorted(kwargs)}: {e}") from None


def make_scheduler(optimizer: Optimizer, spec: Mapping[str, Any] | None):
    """Optional per-step learning-rate schedule from ``torch.optim.lr_scheduler``.

    ``spec`` is ``{"name": "ExponentialLR", "gamma": 0.999}`` or similar (any class in
    ``torch.optim.lr_scheduler`` taking the optimiser first); ``None`` means none.
    """
    if not spec:
        return None
    spec = dict(spec)
    name = spec.pop("name", None)
    cls = getattr(torch.optim.lr_scheduler, str(name), None)
    if not isinstance(cls, type):
        raise ValueError(f"unknown lr_schedule name {name!r}; use a class of torch.optim.lr_scheduler, e.g. ExponentialLR")
    try:
        return cls(optimizer, **spec)
    except TypeError as e:
        raise ValueError(f"lr_schedule {name!r} rejected options {sorted(spec)}: {e}") from None
