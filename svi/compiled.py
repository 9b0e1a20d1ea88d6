"""The single-process step as one function of tensors: gradient by ``torch.func``, the
optimiser's update written out-of-place (:mod:`svi.optim`), the non-finite guard as a
``torch.where``, and the iterate sums for averaging, all optionally compiled by
``torch.compile`` into one graph. It computes exactly what :func:`svi.trainer.step` computes
with ``loss.backward()`` and ``optimizer.step()`` (tests/test_compiled.py checks it step by
step), with a fraction of the per-step dispatch cost.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from typing import Mapping

import torch
from torch.func import functional_call, grad

from svi.elbo import ElboEstimate, Objective
from svi.families import Family
from svi.optim import FUNCTIONAL_UPDATES, functional_kind, optimizer_state

__all__ = ["CompiledStep", "compile_problem"]

log = logging.getLogger("svi")


@functools.cache
def compile_problem(device_type: str) -> str | None:
    """Why ``torch.compile``'s inductor backend cannot compile for ``device_type`` here, or
    ``None`` when it can: the CPU backend writes C++ and needs a compiler on the PATH (``CXX``, or
    one of those inductor looks for); CUDA needs Triton. Looked up once per process."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "CUDA compilation needs Triton (pip install triton)"
    if device_type != "cpu":
        return f"no inductor backend for {device_type!r} is checked by svi"
    from torch._inductor import config

    cxx = config.cpp.cxx
    candidates = [os.environ.get("CXX")] + list(cxx if isinstance(cxx, (tuple, list)) else [cxx]) + ["g++", "clang++"]
    if any(c and shutil.which(c) for c in candidates):
        return None
    return "no C++ compiler on the PATH (install g++ or clang++, or set CXX)"


class CompiledStep:
    """One optimisation step of ``family`` under ``optimizer`` as a single function call.

    Args:
        objective: the fit's ELBO estimator; its settings (STL, the control variates and their
            weights, the anchor) are read at every call.
        family: q, whose parameters ``optimizer`` updates.
        optimizer: an optimiser :func:`svi.optim.functional_kind` can reproduce (Adam, SGD, Stan's).
        compile: compile the step with ``torch.compile`` (else the same function runs eagerly).
        start: the first step (of the fit's count) the trainer runs through this step.
        rows: the fit's batch size: the only batch size the trainer sends here (a ragged batch runs
            the module step, so no graph is compiled for a shape that comes once a pass).
    """

    def __init__(self, objective: Objective, family: Family, optimizer: torch.optim.Optimizer, compile: bool = True,
                 start: int = 0, rows: int | None = None):
        self.kind = functional_kind(optimizer)
        if self.kind is None:
            raise ValueError(f"no functional form of {type(optimizer).__name__} with these options")
        self.objective = objective
        loss = objective.loss_module(family)
        self.loss = loss
        self.optimizer = optimizer
        self.names = [n for n, _ in loss.named_parameters()]  # "family.loc", ...: keys of functional_call
        self.params = [p for _, p in loss.named_parameters()]
        self.groups = self._groups()
        self._cv_weights: tuple | None = None  # (weights, as a tensor): rebuilt only when they change
        self._lr = [torch.tensor(float(g["lr"]), dtype=torch.float64) for g in self.groups]
        self.update = FUNCTIONAL_UPDATES[self.kind]
        self.compiled = compile
        self.start = start
        self.rows = rows
        self.failed = False  # torch.compile raised: the trainer runs the module step from then on
        self._fns: dict[tuple, object] = {}
        self._state_cache: tuple | None = None

    def _groups(self) -> list[dict]:
        """Each parameter's group, looked up anew: loading the optimiser's state (a resume, a restore)
        replaces its list of group dicts, and a step that read the old ones would miss a decayed
        step size."""
        self._param_groups = self.optimizer.param_groups
        group_of = {id(p): g for g in self._param_groups for p in g["params"]}
        return [group_of[id(p)] for p in self.params]

    def reset(self) -> None:
        """Forget the compiled graphs (after the family's buffers changed shape)."""
        self._fns = {}

    def _function(self, stl: bool, antithetic: bool, control_variate: bool, anchored: bool):
        """The step with its Python flags baked in: one compiled graph per combination, so the
        compiled graphs need guards on tensors only (dynamo's other guards cost more per call
        than the whole step on small models)."""
        key = (stl, antithetic, control_variate, anchored)
        if key not in self._fns:
            def fn(params, state, batch, eps, lrs, cv_weights, sums, anchor):
                return self._step(params, state, batch, eps, lrs, cv_weights, sums, anchor, *key[:3])

            if self.compiled:
                fn = torch.compile(fn, fullgraph=True, dynamic=False,
                                   options={"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe, "cpp_wrapper": True})
            self._fns[key] = fn
        return self._fns[key]

    def _step(self, params, state, batch, eps, lrs, cv_weights, sums, anchor, stl: bool, antithetic: bool,
              control_variate: bool):
        def objective(values):
            est = functional_call(self.loss, dict(zip(self.names, values)), (batch, eps),
                                  dict(stl=stl, antithetic=antithetic, control_variate=control_variate,
                                       anchor=anchor, cv_weights=cv_weights))
            parts = torch.stack([est.value, est.log_prior, est.log_likelihood, est.log_det, est.entropy,
                                 est.cv_quadratic, est.cv_data])
            return -est.value, parts.detach()

        grads, parts = grad(objective, has_aux=True)([p.detach() for p in params])
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        ok = torch.isfinite(parts[0]) & torch.isfinite(grad_norm)
        with torch.no_grad():
            new_params, new_state = [], {k: [] for k in state}
            for i, (p, g) in enumerate(zip(params, grads)):
                group = dict(self.groups[i], lr=lrs[i])
                one_state = {k: [v[i]] for k, v in state.items()}
                (np_,), ns = self.update([p.detach()], [g], one_state, group)
                new_params.append(np_)
                for k in new_state:
                    new_state[k].append(ns[k][0])
            for p, v in zip(params, new_params):
                p.copy_(torch.where(ok, v, p))
            for key, values in new_state.items():
                for t, v in zip(state[key], values):
                    t.copy_(torch.where(ok, v, t))
            for s, p in zip(sums, params):
                s.add_(torch.where(ok, p, torch.zeros_like(p)))
        return parts, grad_norm.detach(), ok

    def takes(self, step: int, rows: int) -> bool:
        """Whether the trainer's step number ``step`` on a batch of ``rows`` rows runs here."""
        return not self.failed and step >= self.start and (self.rows is None or rows == self.rows)

    def __call__(self, batch: Mapping[str, torch.Tensor], eps: torch.Tensor,
                 sums: list[torch.Tensor]) -> tuple[ElboEstimate, torch.Tensor, bool] | None:
        """One step on the noise ``eps``, adding the new parameters to ``sums`` when applied;
        returns (detached estimate, gradient norm, whether the step was applied), or ``None``,
        having changed nothing, when the graph failed to compile."""
        o = self.objective
        stl, antithetic, control_variate, anchor = o.stl, o.antithetic, o.control_variate, o.anchor
        if self._cv_weights is None or self._cv_weights[0] != o.cv_weights:  # re-estimated once a window
            self._cv_weights = (o.cv_weights, torch.tensor(o.cv_weights, dtype=eps.dtype))
        cv_weights = self._cv_weights[1]
        if self.optimizer.param_groups is not self._param_groups:
            self.groups = self._groups()
        lrs = tuple(g["lr"] for g in self.groups)
        if self._state_cache is None or self._state_cache[0] != lrs or self._state_cache[1] is not self.optimizer.state:
            # step-size decays change the group's float (the graph reads a tensor); a restore
            # replaces the optimiser's state tensors
            for t, lr in zip(self._lr, lrs):
                t.fill_(lr)
            self._state_cache = (lrs, self.optimizer.state, optimizer_state(self.optimizer, self.kind, self.params))
        key = (stl, antithetic, control_variate, anchor is not None)
        fresh = key not in self._fns
        if fresh and self.compiled:
            log.info("svi: compiling the step (once for these settings; torch caches the graph on disk)")
        fn = self._function(*key)
        try:
            parts, grad_norm, ok = fn(self.params, self._state_cache[2], batch, eps, self._lr, cv_weights, sums, anchor)
        except Exception as e:  # inductor's failures have no common class; the graph runs before any write
            if not (fresh and self.compiled):
                raise
            log.warning("svi: torch.compile failed (%s: %s); the fit goes on with the uncompiled step",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            self.failed = True
            return None
        return ElboEstimate(*parts.unbind()), grad_norm, bool(ok)
