"""How far Pyro's and NumPyro's SVI are from the NUTS references of the multilevel regressions (issue 12).

The baselines for ``scripts/bench/hierarchical_accuracy.py``: the same four synthetic data sets
(``tests/data/hierarchical/<name>``, Parquet regenerated from ``spec.json`` into
``data/hier_refs/<name>`` if absent), the same model and priors as the NUTS references
(``scripts/bench/hierarchical_refs.py``): w ~ N(0, 1) per feature, mu ~ N(0, 10), tau ~ HalfNormal(1),
intercept_g ~ N(mu, tau); with varying slopes tau_w ~ HalfNormal(1) per feature and
slope_g ~ N(w, tau_w); sigma ~ HalfNormal(1) and a Normal likelihood for the linear sets, a
Bernoulli-logit one for the logistic sets. The same scoring: ``compare()`` from
hierarchical_accuracy.py over 4,000 draws of every natural-scale scalar (``w[i]``, ``mu``, ``tau``,
``tau_w[i]``, ``sigma``, ``intercept[g]``, ``slope[g,i]``).

The model is written once, as accuracy.py writes its peer models, against its backend namespaces
(``_pyro()`` / ``_numpyro()``: ``sample``, ``plate``, ``dist``), in the libraries' own idiom: a
``plate`` over the groups holds the group intercepts (and the slopes, a length-D event each), a
``plate`` over the rows holds the likelihood, and every step sees all rows (no subsampling, as the
libraries' examples do at these sizes).

Configurations (``--configs``): ``{pyro,numpyro}_{autonormal,automvn}[_locscale]``.
``autonormal`` is ``AutoNormal``, ``automvn`` ``AutoMultivariateNormal``, each with its library's
default initialisation. ``_locscale`` wraps the model in the library's ``reparam`` handler
(``pyro.poutine.reparam`` / ``numpyro.handlers.reparam``) with ``LocScaleReparam(centered=None)``
on the sites ``intercept`` and ``slope``: a learnable partial centring, a ``param``
``<site>_centered`` in [0, 1] of the site's *event* shape. Inside the groups plate that is one
centring shared by all intercepts and one per feature shared by all groups' slopes (not one per
group), which is what the libraries do for a site declared in a plate.

Conventions of ``scripts/bench/accuracy.py`` (Pyro and NumPyro "as their docs show"):
``Trace_ELBO()`` (one particle), Adam with lr = 0.01, 10,000 full-batch steps (its ``--steps``
default; ``--steps`` here too); Pyro with ``SVI.step`` in a Python loop, NumPyro with the
jit-compiled ``SVI.run`` (no progress bar). Here in float64 (``torch.set_default_dtype(torch.float64)``,
``jax_enable_x64``), seeded with 0 (``pyro.set_rng_seed(0)``, ``jax.random.PRNGKey(0)``). Draws:
4,000 from the fitted guide (Pyro: ``Predictive(..., parallel=True)``; NumPyro: the vectorised
``guide.sample_posterior``, as accuracy.py, then ``Predictive`` with those ``posterior_samples``),
mapped through the model to the natural-scale sites (``return_sites``; under ``_locscale`` the
reparametrised ``intercept`` / ``slope`` sites are the natural-scale values), with the likelihood
switched off so the draws need no (draws x rows) arrays. Wall seconds time the fit
alone: guide construction and all steps; NumPyro's includes jit compilation and
``block_until_ready``. Fits run one after another in this one process; a fit that raises gives a
``failed: ...`` row.

    python scripts/bench/hierarchical_baselines.py [--sets a,b] [--configs pyro_autonormal,...]
        [--steps 10000] [--torch-threads 1] [--verbose] [--data-dir data/hier_refs]

``--verbose`` prints the learned centrings of the ``_locscale`` fits. ``--torch-threads 1`` is for
a shared machine: on 2 busy cores torch's default two intra-op threads made a Pyro step 5x slower
(spinning), one thread did not (the numbers do not change; only the wall time does).

Needs the ``bench`` extra (pyro-ppl, numpyro, jax) and pyarrow. On 2 shared cores with
``--torch-threads 1``, a Pyro fit takes about 2-7 minutes, a NumPyro fit 10-60 seconds (AutoMultivariateNormal
on the 1,005 latents of logistic_intercepts_1000x8: about 4 minutes).

Docs: Pyro's SVI tutorial and autoguides (https://pyro.ai/examples/svi_part_i.html,
https://docs.pyro.ai/en/stable/infer.autoguide.html), Pyro reparametrisers
(https://docs.pyro.ai/en/stable/infer.reparam.html, ``LocScaleReparam``); NumPyro SVI and autoguides
(https://num.pyro.ai/en/stable/svi.html, https://num.pyro.ai/en/stable/autoguide.html), NumPyro
reparametrisers and handlers (https://num.pyro.ai/en/stable/reparam.html,
https://num.pyro.ai/en/stable/handlers.html#reparam) and its "Bad posterior geometry" tutorial
(https://num.pyro.ai/en/stable/tutorials/bad_posterior_geometry.html).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS, LR = 10_000, 0.01  # accuracy.py's --steps default and its Adam learning rate
SEED = 0
LIBS = ("pyro", "numpyro")
GUIDES = ("autonormal", "automvn")
CONFIGS = [f"{lib}_{guide}{rep}" for lib in LIBS for guide in GUIDES for rep in ("", "_locscale")]


def _load(name: str, file: str):
    """A script under scripts/bench as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


hacc = _load("hierarchical_accuracy", "hierarchical_accuracy.py")
acc = _load("bench_accuracy", "accuracy.py")
DRAWS = hacc.DRAWS


def load_data(spec, folder: Path) -> dict[str, np.ndarray]:
    """x (N, D), y (N,) as float64 and g (N,) as int64 from the set's Parquet folder."""
    import pyarrow.parquet as pq

    t = pq.read_table(folder)
    x = np.stack([t.column(f"x{j}").to_numpy() for j in range(spec.n_features)], 1).astype(np.float64)
    return {"x": x, "y": t.column("y").to_numpy().astype(np.float64), "g": t.column("g").to_numpy().astype(np.int64)}


def model(B, x, y, g, n_groups, slopes, linear, likelihood=True, subsample_size=None):
    """The references' model; ``likelihood=False`` stops before the rows (for posterior draws).

    ``subsample_size``: rows per step through the rows plate's subsampling (the plate scales the
    batch's log likelihood by N / subsample_size); ``None`` is every row, as the fits here use."""
    D = x.shape[1]
    w = B.sample("w", B.dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    mu = B.sample("mu", B.dist.Normal(0.0, 10.0))
    tau = B.sample("tau", B.dist.HalfNormal(1.0))
    if slopes:
        tau_w = B.sample("tau_w", B.dist.HalfNormal(1.0).expand([D]).to_event(1))
    with B.plate("groups", n_groups):
        intercept = B.sample("intercept", B.dist.Normal(mu, tau))
        if slopes:
            slope = B.sample("slope", B.dist.Normal(w, tau_w).to_event(1))
    if linear:
        sigma = B.sample("sigma", B.dist.HalfNormal(1.0))
    if not likelihood:
        return
    with B.plate("rows", y.shape[0], subsample_size=subsample_size) as idx:
        if subsample_size is not None:  # without subsampling idx is every row: no copy of the arrays
            x, y, g = x[idx], y[idx], g[idx]
        eta = intercept[g] + ((x * slope[g]).sum(-1) if slopes else x @ w)
        B.sample("y", B.dist.Normal(eta, sigma) if linear else B.dist.Bernoulli(logits=eta), obs=y)


def site_shapes(spec) -> dict[str, tuple]:
    """Natural-scale sites and their shapes per draw."""
    D, G = spec.n_features, spec.n_groups
    shapes = {"w": (D,), "mu": (), "tau": ()}
    if spec.varying_slopes:
        shapes["tau_w"] = (D,)
    if spec.model == "linear":
        shapes["sigma"] = ()
    shapes["intercept"] = (G,)
    if spec.varying_slopes:
        shapes["slope"] = (G, D)
    return shapes


def named_draws(samples: dict, shapes: dict) -> dict[str, np.ndarray]:
    """{site: array} -> {"w[0]", "slope[3,1]", ...: (DRAWS,) float64}, named as ref_summary.json."""
    out = {}
    for site, shape in shapes.items():
        v = np.asarray(samples[site], dtype=np.float64).reshape(DRAWS, *shape)  # drops Predictive's singleton dims
        for idx in np.ndindex(*shape):
            out[f"{site}[{','.join(map(str, idx))}]" if idx else site] = v[(slice(None), *idx)]
    return out


def fit_pyro(guide_name, locscale, spec, data, steps, threads=None):
    import pyro
    import torch
    from pyro.infer import SVI, Predictive, Trace_ELBO
    from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
    from pyro.infer.reparam import LocScaleReparam

    torch.set_default_dtype(torch.float64)
    if threads:
        torch.set_num_threads(threads)
    B = acc._pyro()
    args = {"x": torch.as_tensor(data["x"]), "y": torch.as_tensor(data["y"]), "g": torch.as_tensor(data["g"]),
            "n_groups": spec.n_groups, "slopes": spec.varying_slopes, "linear": spec.model == "linear"}
    fn = lambda **kw: model(B, **kw)  # noqa: E731
    if locscale:
        fn = pyro.poutine.reparam(fn, config={s: LocScaleReparam(centered=None) for s in ("intercept", "slope")})
    pyro.set_rng_seed(SEED)
    pyro.clear_param_store()
    t = time.perf_counter()
    guide = (AutoNormal if guide_name == "autonormal" else AutoMultivariateNormal)(fn)
    engine = SVI(fn, guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())
    for _ in range(steps):
        engine.step(**args)
    seconds = time.perf_counter() - t
    shapes = site_shapes(spec)
    with torch.no_grad():
        pred = Predictive(fn, guide=guide, num_samples=DRAWS, parallel=True, return_sites=list(shapes))
        samples = pred(**{**args, "likelihood": False})
    store = pyro.get_param_store()
    centred = {k: store[k].detach().numpy() for k in store.keys() if k.endswith("_centered")}
    return named_draws({k: v.numpy() for k, v in samples.items()}, shapes), seconds, centred


def fit_numpyro(guide_name, locscale, spec, data, steps, threads=None):
    import jax
    import jax.numpy as jnp
    import numpyro
    from numpyro.infer import SVI, Predictive, Trace_ELBO
    from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
    from numpyro.infer.reparam import LocScaleReparam

    B = acc._numpyro()
    args = {"x": jnp.asarray(data["x"]), "y": jnp.asarray(data["y"]), "g": jnp.asarray(data["g"]),
            "n_groups": spec.n_groups, "slopes": spec.varying_slopes, "linear": spec.model == "linear"}
    fn = lambda **kw: model(B, **kw)  # noqa: E731
    if locscale:
        fn = numpyro.handlers.reparam(fn, config={s: LocScaleReparam(centered=None) for s in ("intercept", "slope")})
    key_fit, key_draw = jax.random.split(jax.random.PRNGKey(SEED))
    t = time.perf_counter()
    guide = (AutoNormal if guide_name == "autonormal" else AutoMultivariateNormal)(fn)
    engine = SVI(fn, guide, numpyro.optim.Adam(LR), Trace_ELBO())
    result = engine.run(key_fit, steps, progress_bar=False, **args)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - t
    shapes = site_shapes(spec)
    # the guide's draws in one vectorised call (as accuracy.py), then the model maps them to the natural scale
    latent = guide.sample_posterior(key_draw, result.params, sample_shape=(DRAWS,), **args)
    pred = Predictive(fn, posterior_samples=latent, params=result.params, return_sites=list(shapes), parallel=True)
    samples = pred(key_draw, **{**args, "likelihood": False})
    centred = {k: np.asarray(v) for k, v in result.params.items() if k.endswith("_centered")}
    return named_draws(samples, shapes), seconds, centred


def run(name: str, config: str, refs, data_dir: Path, ref_dir: Path, steps: int, threads=None) -> dict:
    """One fit of one configuration on one reference set: compare()'s result, seconds, learned centrings."""
    spec = refs.load_spec(name, ref_dir)
    folder = data_dir / name
    if not any(folder.glob("*.parquet")):
        refs.regenerate(name, data_dir, ref_dir)
    ref = json.loads((ref_dir / name / "ref_summary.json").read_text())["params"]
    lib, guide_name, *rest = config.split("_")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        draws, seconds, centred = (fit_pyro if lib == "pyro" else fit_numpyro)(guide_name, bool(rest), spec,
                                                                     load_data(spec, folder), steps, threads)
    return {**hacc.compare(draws, ref), "seconds": seconds, "centred": centred}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="", help="comma-separated reference sets (default: all under tests/data)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=STEPS, help="Adam steps per fit (accuracy.py's default)")
    ap.add_argument("--torch-threads", type=int, help="torch.set_num_threads for the Pyro fits (default: torch's)")
    ap.add_argument("--verbose", action="store_true", help="print the learned centrings of the _locscale fits")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "hier_refs")
    ap.add_argument("--refs", type=Path, default=hacc.REF_DIR, help="folder of reference sets")
    args = ap.parse_args(argv)
    import jax
    import torch

    torch_default = torch.get_num_threads()
    jax.config.update("jax_enable_x64", True)
    refs = hacc._refs_module()
    names, configs = hacc.selection(ap, args, CONFIGS)

    head = "| data set | config | worst mean err (ref sd) | at | worst sd ratio | at | misses mean/sd of n | wall s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1), flush=True)
    t0 = time.perf_counter()
    for name in names:
        for config in configs:
            try:
                r = run(name, config, refs, args.data_dir, args.refs, args.steps, args.torch_threads)
            except Exception as e:  # a library's failure is a row of the table, not the end of it
                msg = " ".join(f"{type(e).__name__}: {e}".split())[:120].replace("|", "/")
                print(f"| {name} | {config} | failed: {msg} | | | | | |", flush=True)
                continue
            print(f"| {name} | {config} | {r['worst_z']:.3f} | {r['worst_z_name']} | {r['worst_ratio']:.3f} "
                  f"| {r['worst_ratio_name']} | {r['mean_miss']}/{r['sd_miss']} of {r['n']} | {r['seconds']:.1f} |",
                  flush=True)
            if args.verbose and r["centred"]:
                print("    learned centring: " + "; ".join(f"{k} {np.round(v, 3).tolist()}"
                                                           for k, v in r["centred"].items()), flush=True)
    threads = f"torch threads {args.torch_threads or torch_default}"
    print(f"\nTrace_ELBO, Adam lr={LR}, {args.steps} full-batch steps, float64, seed {SEED}, {DRAWS} draws, {threads}; "
          f"bounds: mean within {hacc.MEAN_TOL} ref sd, sd within {hacc.SD_TOL:.0%}; "
          f"total wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
