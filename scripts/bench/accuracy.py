"""Accuracy with default settings: svi's ``svi.fit`` against Pyro's and NumPyro's SVI with their
documented defaults, side by side in one run, on posteriors with exact or reference answers.

Cases: three linear models with known noise and flat priors (``uncentred``, ``interaction``,
``tight``; exact Gaussian posterior), a logistic regression on an uncentred predictor
(``logistic``; exact moments by quadrature), and three posteriordb posteriors (``diamonds``,
``gauss_mix``, ``radon``; long NUTS runs). The cases and their references are imported from
``tests/test_accuracy.py`` and ``tests/test_refdata.py``.

For every (case, engine, family) the table gives the worst |mean error| in reference posterior
sds, the worst sd ratio (fitted sd / reference sd, the one farthest from 1 on a log scale) and
the wall time of the fit. Means and sds come from 20,000 draws of the fitted approximation, in
constrained space. Meanfield sds are compared with the meanfield KL optimum where it is known
(the Gaussian and logistic cases) and with the NUTS sd otherwise.

svi runs ``svi.fit(model, data, family=...)`` with nothing else set. Pyro and NumPyro run
``AutoNormal`` (meanfield) or ``AutoMultivariateNormal`` (fullrank) with ``Trace_ELBO()`` (one
particle), Adam at lr = 0.01 and ``--steps`` full-batch steps; NumPyro through ``SVI.run``
(jit-compiled, no progress bar). Every fit runs in its own fresh subprocess, one after another,
so no two share the CPU.

    python scripts/bench/accuracy.py [--cases tight,radon] [--engines svi,pyro,numpyro] [--steps 10000]

Needs the ``bench`` extra (pyro-ppl, numpyro). The full run takes about 10-15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from svi.models import LinearRegression, LogisticRegression  # noqa: E402
from tests.test_accuracy import (gaussian_case, interaction_design, logistic_problem,  # noqa: E402
                                 logistic_references, tight_posterior, uncentred_predictor)
from tests.test_refdata import diamonds, gauss_mix, radon  # noqa: E402

ENGINES = ["svi", "pyro", "numpyro"]
FAMILIES = ["fullrank", "meanfield"]
DRAWS = 20_000


# --- cases ---------------------------------------------------------------------------------------
@dataclass
class Case:
    """One posterior: its data, the svi model, the same model for Pyro/NumPyro and the reference.

    ``reference()`` returns {name: (mean, sd, meanfield-optimum sd or None)}; ``svi_names`` and
    ``peer_names`` map the engines' element names ("w[0]") onto the reference names.
    """

    data: dict
    svi_model: object
    svi_names: dict
    peer_model: Callable
    reference: Callable[[], dict]
    ref_kind: str  # "exact" or "NUTS"
    peer_names: dict = field(default_factory=dict)  # empty: the peers' names are the reference names


def _identity(names):
    return {n: n for n in names}


def _linear_case(builder):
    x, y, noise = builder()
    names = [f"w[{i}]" for i in range(x.shape[1])] + ["b"]

    def reference():
        mean, cov, precision = gaussian_case(x, y, noise)
        return {n: (mean[i], math.sqrt(cov[i, i]), 1 / math.sqrt(precision[i, i])) for i, n in enumerate(names)}

    model = LinearRegression(x.shape[1], prior_scale=None, intercept_scale=None, noise=noise)  # flat priors
    return Case({"x": x, "y": y}, model, _identity(names), lambda B, x, y: _peer_linear(B, x, y, noise), reference,
                "exact")


def _logistic_case():
    height, y = logistic_problem()

    def reference():
        mean, cov, _, mf_sd = logistic_references(height, y)  # ordered (b, w)
        return {n: (mean[i], math.sqrt(cov[i, i]), mf_sd[i]) for i, n in enumerate(["b", "w"])}

    model = LogisticRegression(1, prior_scale=5.0, intercept_scale=5.0)
    return Case({"x": height[:, None], "y": y}, model, {"w[0]": "w", "b": "b"}, _peer_logistic, reference, "exact")


def _refdata_case(builder, peer_model, peer_names=None, peers_named_as_svi=False):
    model, data, ref, names = builder()

    def reference():
        return {r: (ref[r]["mean"], ref[r]["sd"], None) for r in names.values()}

    return Case(data, model, names, peer_model, reference, "NUTS", names if peers_named_as_svi else peer_names or {})


_MIX_NAMES = {"mu[0]": "mu[1]", "mu[1]": "mu[2]", "sigma[0]": "sigma[1]", "sigma[1]": "sigma[2]", "theta": "theta"}

CASES = {
    "uncentred": lambda: _linear_case(uncentred_predictor),
    "interaction": lambda: _linear_case(interaction_design),
    "tight": lambda: _linear_case(tight_posterior),
    "logistic": _logistic_case,
    "diamonds": lambda: _refdata_case(diamonds, _peer_diamonds, peers_named_as_svi=True),
    "gauss_mix": lambda: _refdata_case(gauss_mix, _peer_gauss_mix, _MIX_NAMES),
    "radon": lambda: _refdata_case(radon, _peer_radon),
}


# --- the same models for Pyro and NumPyro (B: a backend namespace, see _pyro / _numpyro) -----------
def _peer_linear(B, x, y, noise):
    w = B.sample("w", B.flat(B.constraints.real, (x.shape[1],)))
    b = B.sample("b", B.flat(B.constraints.real, ()))
    with B.plate("data", y.shape[0]):
        B.sample("y", B.dist.Normal(x @ w + b, noise), obs=y)


def _peer_logistic(B, x, y):
    b = B.sample("b", B.dist.Normal(0.0, 5.0))
    w = B.sample("w", B.dist.Normal(0.0, 5.0))
    with B.plate("data", y.shape[0]):
        B.sample("y", B.dist.Bernoulli(logits=b + w * x[:, 0]), obs=y)


def _peer_diamonds(B, x, y):
    b = B.sample("b", B.dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    intercept = B.sample("Intercept", B.dist.StudentT(3.0, 8.0, 10.0))
    sigma = B.sample("sigma", B.dist.FoldedDistribution(B.dist.StudentT(3.0, 0.0, 10.0)))  # half-t(3, 0, 10)
    with B.plate("data", y.shape[0]):
        B.sample("y", B.dist.Normal(intercept + x @ b, sigma), obs=y)


def _peer_gauss_mix(B, y):
    # Stan's `ordered[2] mu; mu ~ normal(0, 2)`: a flat density on the ordered vectors (the guide's
    # ordered bijection brings its own Jacobian) times the N(0, 2) density of the ordered values.
    mu = B.sample("mu", B.flat(B.constraints.ordered_vector, (2,)))
    B.factor("mu_prior", B.dist.Normal(0.0, 2.0).log_prob(mu).sum(-1))
    sigma = B.sample("sigma", B.dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = B.sample("theta", B.dist.Beta(5.0, 5.0))
    mix = B.dist.Categorical(probs=B.stack([theta, 1 - theta], -1))
    with B.plate("data", y.shape[0]):
        B.sample("y", B.dist.MixtureSameFamily(mix, B.dist.Normal(mu, sigma)), obs=y)


def _peer_radon(B, x, y):
    alpha = B.sample("alpha", B.dist.Normal(0.0, 10.0))
    beta = B.sample("beta", B.dist.Normal(0.0, 10.0))
    sigma_y = B.sample("sigma_y", B.dist.HalfNormal(1.0))
    with B.plate("data", y.shape[0]):
        B.sample("y", B.dist.Normal(alpha + beta * x[:, 0], sigma_y), obs=y)


# --- engines (run in the child process) ------------------------------------------------------------
def _flatten(draws, n):
    """{site: (n, ...) array} -> {"site" or "site[i]": (mean, sd)} over the draws."""
    import numpy as np

    out = {}
    for site, v in draws.items():
        v = np.asarray(v, dtype=np.float64)
        scalar = v.ndim == 1
        v = v.reshape(n, -1)
        m, s = v.mean(0), v.std(0, ddof=1)
        if scalar:
            out[site] = (m[0], s[0])
        else:
            out.update({f"{site}[{i}]": (m[i], s[i]) for i in range(v.shape[1])})
    return out


def run_svi(case, family, steps):
    import svi

    t = time.perf_counter()
    post = svi.fit(case.svi_model, case.data, family=family)
    seconds = time.perf_counter() - t
    s = post.summary(n=DRAWS)
    fit = {r: (s.loc[n, "mean"], s.loc[n, "sd"]) for n, r in case.svi_names.items()}
    return fit, seconds, post.info.steps


@dataclass
class _Backend:
    ppl: object
    dist: object
    constraints: object
    flat: Callable
    stack: Callable

    def sample(self, *a, **k):
        return self.ppl.sample(*a, **k)

    def factor(self, *a, **k):
        return self.ppl.factor(*a, **k)

    def plate(self, *a, **k):
        return self.ppl.plate(*a, **k)


def _pyro():
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.distributions import constraints
    from torch.distributions import biject_to

    def flat(support, shape):
        # Pyro's ImproperUniform cannot be sampled, which its autoguides' initialisation needs;
        # its docstring's stand-in is a masked proper distribution (log density 0 = flat).
        base = dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape))
        return dist.TransformedDistribution(base, [biject_to(support)]).mask(False)

    return _Backend(pyro, dist, constraints, flat, torch.stack)


def _numpyro():
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    return _Backend(numpyro, dist, constraints, lambda support, shape: dist.ImproperUniform(support, (), shape),
                    jnp.stack)


def run_pyro(case, family, steps):
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

    B = _pyro()
    data = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in case.data.items()}
    model = lambda **d: case.peer_model(B, **d)  # noqa: E731
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    t = time.perf_counter()
    guide = (AutoNormal if family == "meanfield" else AutoMultivariateNormal)(model)
    engine = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(steps):
        engine.step(**data)
    seconds = time.perf_counter() - t
    with torch.no_grad(), pyro.plate("draws", DRAWS, dim=-1):  # one vectorised pass of the guide
        draws = guide(**data)
    return _flatten(draws, DRAWS), seconds, steps


def run_numpyro(case, family, steps):
    import jax
    import jax.numpy as jnp
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

    B = _numpyro()
    data = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in case.data.items()}
    model = lambda **d: case.peer_model(B, **d)  # noqa: E731
    t = time.perf_counter()
    guide = (AutoNormal if family == "meanfield" else AutoMultivariateNormal)(model)
    engine = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    result = engine.run(jax.random.PRNGKey(0), steps, progress_bar=False, **data)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - t
    draws = guide.sample_posterior(jax.random.PRNGKey(1), result.params, sample_shape=(DRAWS,), **data)
    return _flatten(draws, DRAWS), seconds, steps


RUNNERS = {"svi": run_svi, "pyro": run_pyro, "numpyro": run_numpyro}


def child(case_name, engine, family, steps):
    case = CASES[case_name]()
    fit, seconds, n_steps = RUNNERS[engine](case, family, steps)
    if engine != "svi":  # svi's fit is already keyed by reference names
        names = case.peer_names or _identity(fit)
        fit = {names[n]: v for n, v in fit.items() if n in names}
    fit = {n: (float(m), float(s)) for n, (m, s) in fit.items()}
    return {"fit": fit, "seconds": seconds, "steps": n_steps}


# --- scoring and the table (parent process) -------------------------------------------------------
def score(fit, reference, family):
    """(worst |mean error| in reference sds, worst sd ratio, whether the sds met the meanfield optimum)."""
    use_mf = family == "meanfield" and all(mf_sd is not None for _, _, mf_sd in reference.values())
    errs, ratios = [], []
    for name, (mean, sd, mf_sd) in reference.items():
        m, s = fit.get(name, (math.nan, math.nan))
        errs.append(abs(m - mean) / sd)
        ratios.append(s / (mf_sd if use_mf else sd))
    worst_err = math.nan if any(math.isnan(e) for e in errs) else max(errs)
    worst_ratio = math.nan if not all(r > 0 for r in ratios) else max(ratios, key=lambda r: abs(math.log(r)))
    return worst_err, worst_ratio, use_mf


def _run_child(case, engine, family, steps):
    cmd = [sys.executable, __file__, "--steps", str(steps), "--child", case, engine, family]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {case:12s} {engine:8s} {family:9s} FAILED: {last}", file=sys.stderr)
        return {"error": last[:80]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {case:12s} {engine:8s} {family:9s} fit {res['seconds']:6.1f} s  (process {time.perf_counter() - t:5.1f} s)",
          file=sys.stderr)
    return res


def _row(case, family, engine, res, reference, ref_kind):
    if "error" in res:
        return f"| {case} | {family} | {engine} | failed: {res['error']} | | | | |"
    err, ratio, use_mf = score(res["fit"], reference, family)
    sd_ref = "MF optimum" if use_mf else ("NUTS sd*" if family == "meanfield" else f"{ref_kind} sd")
    return (f"| {case} | {family} | {engine} | {err:.3f} | {ratio:.3f} | {sd_ref} | {res['steps']} "
            f"| {res['seconds']:.1f} |")


FOOTNOTE = """
Mean error: |fitted mean - reference mean| / reference sd, worst over the parameters, for both
families; the references are exact for uncentred, interaction, tight and logistic and posteriordb
NUTS runs for diamonds, gauss_mix and radon. sd ratio: fitted sd / reference sd, the one farthest
from 1 on a log scale; "MF optimum" marks meanfield sds measured against the meanfield KL optimum,
"NUTS sd*" meanfield sds measured against the NUTS sd, which they are expected to undershoot where
the posterior is correlated. svi: `svi.fit(model, data, family=...)`, defaults only, steps to its
own convergence test. Pyro and NumPyro: AutoNormal (meanfield) or AutoMultivariateNormal (fullrank),
Trace_ELBO with 1 particle, Adam lr = 0.01, {steps} full-batch steps, float32, default
initialisation; NumPyro via jit-compiled SVI.run. Moments from {draws} draws of each fitted
approximation in constrained space; wall time is the fit alone (NumPyro's includes jit
compilation), every fit in its own fresh process, one at a time."""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of svi,pyro,numpyro")
    ap.add_argument("--steps", type=int, default=10_000, help="Pyro and NumPyro optimisation steps")
    ap.add_argument("--child", nargs=3, metavar=("CASE", "ENGINE", "FAMILY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return
    cases, engines = args.cases.split(","), args.engines.split(",")
    unknown = [c for c in cases if c not in CASES] + [e for e in engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown case or engine: {', '.join(unknown)}")
    rows = []
    for case in cases:
        built = CASES[case]()
        reference = built.reference()
        for family in FAMILIES:
            for engine in engines:
                res = _run_child(case, engine, family, args.steps)
                rows.append(_row(case, family, engine, res, reference, built.ref_kind))
    command = " ".join(["python scripts/bench/accuracy.py", *sys.argv[1:]])
    print(f"\n`{command}` ({os.cpu_count()} CPU cores)\n")
    print("| case | family | engine | worst mean error (ref sd) | worst sd ratio | sd reference | steps | wall (s) |")
    print("|---|---|---|---:|---:|---|---:|---:|")
    print("\n".join(rows))
    print(FOOTNOTE.format(steps=args.steps, draws=DRAWS))

if __name__ == "__main__":
    main()
