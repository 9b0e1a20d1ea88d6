"""Microseconds per optimisation step: mean-field logistic regression, D = 50, S = 1, data in
memory, B = 256 and 4096, side by side in one run against Pyro's SVI (AutoDiagonalNormal,
Trace_ELBO, a plate given explicit subsample indices) and NumPyro's SVI (jit-compiled update).

Every (engine, B) pair runs in its own fresh subprocess, one after another, so no two share
the CPU; each reports the median of 5 repeats of ``--steps`` steps after a warm-up. The whole
list of engines runs ``--rounds`` times, interleaved, and the table gives each pair's median
over the rounds: this machine's speed drifts by tens of percent over minutes, and a ratio of
two numbers taken minutes apart would carry that drift.

    python scripts/bench/step_overhead.py [--steps 2000] [--rounds 3] [--json out.json]

Needs the ``bench`` extra (pyro-ppl, numpyro). svi runs its engine step
(``svi.trainer.step``) with the same estimator as the peers (S = 1, no antithetic pair, no
control variates), eagerly and with ``compile=true``; "svi defaults" adds svi's default
variance reduction (an antithetic pair and both control variates), eager (what a fit runs by
default) and compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

D, N = 50, 100_000
ENGINES = ["svi eager", "svi compiled", "svi defaults (eager)", "svi defaults (compiled)", "pyro", "numpyro"]


def _data(B):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    w = rng.normal(size=D).astype(np.float32) * 0.3
    y = (rng.random(N) < 1 / (1 + np.exp(-(x @ w)))).astype(np.float32)
    return x, y


def _time(step, steps):
    for _ in range(200):
        step()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        runs.append((time.perf_counter() - t) / steps * 1e6)
    return statistics.median(runs)


def run_svi(B, steps, compiled, defaults):
    import torch

    from svi.data.memory import InMemoryData
    from svi.models import LogisticRegression
    from svi.options import FitOptions
    from svi.trainer import FitContext, build_family, init_state, step
    from svi.transforms import ParamSpace

    x, y = _data(B)
    model = LogisticRegression(D)
    extra = {} if defaults else dict(antithetic=False, control_variate=False, warm_start="none")
    opts = FitOptions(family="meanfield", batch_size=B, optimizer="adam", lr=0.01, compile=compiled, **extra)
    data = InMemoryData({"x": x, "y": y}, keys=model.batch_keys)
    ctx = FitContext(model=model, space=ParamSpace(model.params), options=opts, num_rows=N, dtype=torch.float32,
                     device=torch.device("cpu"), eval_batch=data.sample(256, 0), warm_batch=data.sample(20_000, 1))
    fam, _, _ = build_family(ctx)
    anchor = None
    if defaults:
        from svi.elbo import anchor_statistics

        anchor = anchor_statistics(model, ctx.space, fam.frame_loc, data.chunks())
    state = init_state(ctx, fam, anchor=anchor)
    stream = data.stream(B, seed=0)
    batches = [next(stream) for _ in range(N // B)]  # whole batches only: one compiled shape
    it = iter(range(10**9))

    def one():
        step(ctx, state, batches[next(it) % len(batches)])

    return _time(one, steps)


def run_pyro(B, steps):
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoDiagonalNormal
    from pyro.optim import Adam

    x, y = _data(B)
    x, y = torch.from_numpy(x), torch.from_numpy(y)

    def model(xb, yb, idx):
        w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("y", dist.Bernoulli(logits=xb @ w + b), obs=yb)

    guide = AutoDiagonalNormal(model)
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    perm = torch.randperm(N)
    batches = [perm[i:i + B] for i in range(0, N - B + 1, B)]
    it = iter(range(10**9))

    def one():
        idx = batches[next(it) % len(batches)]
        svi.step(x[idx], y[idx], idx)

    return _time(one, steps)


def run_numpyro(B, steps):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoDiagonalNormal

    x, y = _data(B)

    def model(xb, yb):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 5.0))
        with numpyro.plate("data", N, subsample_size=xb.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=xb @ w + b), obs=yb)

    guide = AutoDiagonalNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    batches = [(jnp.asarray(x[i:i + B]), jnp.asarray(y[i:i + B])) for i in range(0, N - B + 1, B)]
    state = svi.init(jax.random.PRNGKey(0), *batches[0])
    update = jax.jit(svi.update)
    box = [state]
    it = iter(range(10**9))

    def one():
        box[0], loss = update(box[0], *batches[next(it) % len(batches)])
        loss.block_until_ready()

    return _time(one, steps)


def child(engine, B, steps):
    if engine == "pyro":
        return run_pyro(B, steps)
    if engine == "numpyro":
        return run_numpyro(B, steps)
    return run_svi(B, steps, compiled=engine.endswith("compiled)") or engine == "svi compiled",
                   defaults=engine.startswith("svi defaults"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps)))
        return
    runs: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for B in (256, 4096):
            for engine in ENGINES:
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", engine, str(B)],
                                     capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{engine} at B={B} failed")
                runs.setdefault((engine, B), []).append(float(out.stdout.strip().splitlines()[-1]))
                print(f"  round {r + 1} {engine:22s} B={B:5d}: {runs[(engine, B)][-1]:8.1f} us/step", file=sys.stderr)
    results = {key: statistics.median(v) for key, v in runs.items()}
    print(f"\nmean-field logistic regression, D={D}, S=1, in memory; torch threads {os.cpu_count()}; "
          f"median of {args.rounds} interleaved rounds")
    print("| engine | B = 256 (us/step) | vs svi compiled | B = 4096 (us/step) | vs svi compiled |")
    print("|---|---:|---:|---:|---:|")
    for engine in ENGINES:
        a, b = results[(engine, 256)], results[(engine, 4096)]
        ra, rb = a / results[("svi compiled", 256)], b / results[("svi compiled", 4096)]
        print(f"| {engine} | {a:.0f} | {ra:.2f}x | {b:.0f} | {rb:.2f}x |")
    for B in (256, 4096):
        print(f"svi defaults (compiled) / NumPyro at B = {B}: "
              f"{results[('svi defaults (compiled)', B)] / results[('numpyro', B)]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{e}|{B}": v for (e, B), v in runs.items()}, f, indent=1)


if __name__ == "__main__":
    main()
