"""NUTS reference posteriors for svi's built-in multilevel regressions (issue 12).

Makes synthetic multilevel data sets, each from a fixed seed, in the column layout svi's
``HierarchicalLinearRegression`` / ``HierarchicalLogisticRegression`` read (``x0..x{D-1}``,
``y``, integer ``g``), writes them as Parquet, samples the same model (same priors, the
models' default scales) with NumPyro's NUTS, and writes under ``tests/data/hierarchical/<name>/``:

- ``spec.json``: the exact data-generating spec (seed, features, group sizes, true values and a
  SHA-256 of the generated columns), enough to regenerate the data bit for bit with
  ``--make-only`` or :func:`make_data` (no Parquet is committed);
- ``ref_summary.json``: for every natural-scale scalar (``w[i]``, ``mu``, ``tau``, ``tau_w[i]``,
  ``sigma``, ``intercept[g]``, ``slope[g,i]``) the posterior mean, sd, split r-hat and bulk ESS,
  plus the run's diagnostics (divergences, worst r-hat, least ESS, wall time).

The regimes (issue 12): many groups with little data each, few groups with much data each, and
mixed group sizes; intercepts only and intercepts with slopes; logistic and linear.

The NUTS parametrisation is chosen per group by its row count (``NUTS_CENTRED_MIN_ROWS``):
groups with at least that many rows are sampled centred, the others non-centred. Both are exact
reparametrisations of one model; each suits different data (Papaspiliopoulos, Roberts, Sköld,
Statistical Science 2007), and NUTS needs the right one to sample without divergences.

The linear models' likelihood is evaluated from per-group sufficient statistics (n_g, X_g'X_g,
X_g'y_g, y_g'y_g with X_g = [1, x]): exactly the Gaussian likelihood of the rows, at a cost
independent of the row count, so NUTS on 200,000 rows takes seconds.

    python scripts/bench/hierarchical_refs.py [--sets a,b] [--data-dir data/hier_refs]
        [--out tests/data/hierarchical] [--make-only] [--chains 4 --warmup 1000 --draws 1000]

Needs the ``bench`` extra (numpyro, jax) except with ``--make-only``, which needs numpy and
pyarrow only. About a minute per set on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
REF_DIR = ROOT / "tests" / "data" / "hierarchical"

# the built-in models' default prior scales (svi/models/hierarchical.py); the references use them
PRIOR = {"prior_scale": 1.0, "intercept_scale": 10.0, "tau_scale": 1.0, "sigma_scale": 1.0}


@dataclass(frozen=True)
class RefSpec:
    """One synthetic multilevel data set.

    Attributes:
        name: folder name under ``tests/data/hierarchical``.
        model: ``linear`` or ``logistic``.
        n_features: D, columns ``x0 .. x{D-1}``.
        group_sizes: rows of each group, group id = position.
        varying_slopes: groups have their own slopes as well as intercepts.
        seed: seeds everything drawn (true values, features, outcomes, row order).
        tau: true sd of the group intercepts.
        tau_w: true sd of the group slopes (each feature).
        sigma: true noise sd (linear only).
    """

    name: str
    model: str
    n_features: int
    group_sizes: tuple[int, ...]
    varying_slopes: bool
    seed: int
    tau: float = 0.7
    tau_w: float = 0.3
    sigma: float = 0.8

    @property
    def n_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def rows(self) -> int:
        return int(sum(self.group_sizes))

    def to_json(self) -> dict:
        d = asdict(self)
        d["group_sizes"] = list(self.group_sizes)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RefSpec":
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{**{k: v for k, v in d.items() if k in keys}, "group_sizes": tuple(d["group_sizes"])})


def mixed_sizes(n_groups: int, low: int, high: int, seed: int) -> tuple[int, ...]:
    """Group sizes log-uniform on [low, high], with one group of exactly ``low`` and one of ``high``.

    Log-uniform, because the regime of interest spans two orders of magnitude: a uniform draw
    would leave almost no groups of a handful of rows.
    """
    rng = np.random.default_rng([seed, 11])
    sizes = np.rint(np.exp(rng.uniform(math.log(low), math.log(high), size=n_groups))).astype(int)
    sizes[0], sizes[-1] = low, high
    return tuple(int(s) for s in rng.permutation(sizes))


SPECS = {s.name: s for s in [
    # (a) many small groups: the likelihood barely informs each intercept; non-centred regime
    RefSpec("logistic_intercepts_1000x8", "logistic", 3, (8,) * 1000, False, seed=1201),
    # (b) few big groups with slopes: the data pin every group effect; centred regime
    RefSpec("linear_slopes_16x4000", "linear", 2, (4000,) * 16, True, seed=1202),
    # (c) mixed sizes 3..800 with slopes: no one parametrisation suits every group
    RefSpec("logistic_slopes_mixed100", "logistic", 2, mixed_sizes(100, 3, 800, seed=1203), True, seed=1203),
    # (d) conf/hierarchical.yaml's shape (50 groups x 4,000 rows, 4 features), linear
    RefSpec("linear_intercepts_50x4000", "linear", 4, (4000,) * 50, False, seed=1204),
]}

# groups with at least this many rows are sampled centred by NUTS, the rest non-centred
NUTS_CENTRED_MIN_ROWS = {
    "logistic_intercepts_1000x8": 10**9,
    "linear_slopes_16x4000": 0,
    "logistic_slopes_mixed100": 100,
    "linear_intercepts_50x4000": 0,
}


# --- data ----------------------------------------------------------------------------------------
def make_truth(spec: RefSpec) -> dict[str, np.ndarray]:
    """True natural-scale values: w, mu, tau, intercept (G,), and tau_w, slope (G, D), sigma."""
    rng = np.random.default_rng([spec.seed, 1])
    D, G = spec.n_features, spec.n_groups
    w = rng.normal(0.0, 0.5, size=D)
    mu = rng.normal(0.0, 0.5)
    intercept = mu + spec.tau * rng.normal(size=G)
    truth = {"w": w, "mu": np.asarray(mu), "tau": np.asarray(spec.tau), "intercept": intercept}
    if spec.varying_slopes:
        truth["tau_w"] = np.full(D, spec.tau_w)
        truth["slope"] = w + spec.tau_w * rng.normal(size=(G, D))
    if spec.model == "linear":
        truth["sigma"] = np.asarray(spec.sigma)
    return truth


def make_data(spec: RefSpec) -> dict[str, np.ndarray]:
    """The data set's columns ``x0..x{D-1}`` (float32), ``y`` (float32), ``g`` (int64), rows shuffled.

    Deterministic in ``spec`` (numpy's PCG64 streams); :func:`data_sha256` of the result is
    recorded in ``spec.json`` so a change of stream shows.
    """
    truth = make_truth(spec)
    rng = np.random.default_rng([spec.seed, 2])
    n, D = spec.rows, spec.n_features
    g = np.repeat(np.arange(spec.n_groups, dtype=np.int64), spec.group_sizes)
    x = rng.standard_normal((n, D), dtype=np.float32)
    # the outcome is drawn from the float32 features svi reads, in float64
    xd = x.astype(np.float64)
    slopes = truth["slope"][g] if spec.varying_slopes else truth["w"]
    eta = np.einsum("nd,nd->n", xd, np.broadcast_to(slopes, xd.shape)) + truth["intercept"][g]
    if spec.model == "linear":
        y = eta + spec.sigma * rng.standard_normal(n)
    else:
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(np.float64)
    # rows shuffled so that row groups (and any unshuffled read) mix the groups
    order = rng.permutation(n)
    cols = {f"x{j}": np.ascontiguousarray(x[order, j]) for j in range(D)}
    cols["y"] = y[order].astype(np.float32)
    cols["g"] = g[order]
    return cols


def data_sha256(cols: dict[str, np.ndarray]) -> str:
    """SHA-256 over the columns' names, dtypes and little-endian bytes, in column order."""
    h = hashlib.sha256()
    for name, v in cols.items():
        h.update(f"{name}:{v.dtype.str}:{v.shape}".encode())
        h.update(np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def write_parquet(cols: dict[str, np.ndarray], folder: Path, row_group_rows: int = 65_536) -> Path:
    """Write the columns as ``folder/part-0.parquet`` (replacing an older copy); returns the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    pq.write_table(pa.table(cols), folder / "part-0.parquet", row_group_size=row_group_rows)
    return folder


def load_spec(name: str, ref_dir: Path = REF_DIR) -> RefSpec:
    """The spec committed in ``ref_dir/<name>/spec.json`` (falls back to this script's own)."""
    f = ref_dir / name / "spec.json"
    return RefSpec.from_json(json.loads(f.read_text())["spec"]) if f.exists() else SPECS[name]


def regenerate(name: str, data_dir: Path, ref_dir: Path = REF_DIR) -> Path:
    """Rebuild a data set from its committed spec, check its checksum, write it as Parquet.

    Raises:
        RuntimeError: the regenerated columns differ from those the references were made from.
    """
    spec = load_spec(name, ref_dir)
    cols = make_data(spec)
    f = ref_dir / name / "spec.json"
    if f.exists():
        want = json.loads(f.read_text())["sha256"]
        got = data_sha256(cols)
        if got != want:
            raise RuntimeError(f"{name}: regenerated data has SHA-256 {got}, spec.json says {want} "
                               "(numpy's random streams changed?); the references no longer apply")
    return write_parquet(cols, data_dir / name)


# --- NUTS ----------------------------------------------------------------------------------------
def _group_stats(spec: RefSpec, cols: dict[str, np.ndarray]):
    """Per-group sufficient statistics of the linear model, X_g = [1, x]: (n, XtX, Xty, yty)."""
    D, G = spec.n_features, spec.n_groups
    x = np.stack([cols[f"x{j}"] for j in range(D)], 1).astype(np.float64)
    xa = np.concatenate([np.ones((len(x), 1)), x], 1)
    y, g = cols["y"].astype(np.float64), cols["g"]
    n = np.bincount(g, minlength=G).astype(np.float64)
    xtx = np.zeros((G, D + 1, D + 1))
    np.add.at(xtx, g, xa[:, :, None] * xa[:, None, :])
    xty = np.zeros((G, D + 1))
    np.add.at(xty, g, xa * y[:, None])
    yty = np.bincount(g, weights=y * y, minlength=G)
    return n, xtx, xty, yty


def numpyro_model(spec: RefSpec, cols: dict[str, np.ndarray], centred_min_rows: int):
    """The built-in model of ``spec`` in NumPyro, as a zero-argument model function.

    Same priors as svi's: w ~ N(0, 1), mu ~ N(0, 10), tau ~ HalfNormal(1), tau_w ~ HalfNormal(1)
    per feature, intercept_g ~ N(mu, tau), slope_g ~ N(w, tau_w), sigma ~ HalfNormal(1).
    Group g is sampled centred when it has at least ``centred_min_rows`` rows.
    """
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    D, G = spec.n_features, spec.n_groups
    sizes = np.asarray(spec.group_sizes)
    centred = jnp.asarray(sizes >= centred_min_rows)
    if spec.model == "linear":
        n, xtx, xty, yty = (jnp.asarray(a) for a in _group_stats(spec, cols))
    else:
        x = jnp.asarray(np.stack([cols[f"x{j}"] for j in range(D)], 1).astype(np.float64))
        y = jnp.asarray(cols["y"].astype(np.float64))
        g = jnp.asarray(cols["g"])

    def group_effect(site, loc, scale, shape, mask):
        # one latent per group: the effect itself where centred, its standardised value elsewhere
        raw = numpyro.sample(site, dist.Normal(jnp.where(mask, loc, 0.0), jnp.where(mask, scale, 1.0)).to_event(
            len(shape)))
        return jnp.where(mask, raw, loc + scale * raw)

    def model():
        w = numpyro.sample("w", dist.Normal(0.0, PRIOR["prior_scale"]).expand([D]).to_event(1))
        mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR["intercept_scale"]))
        tau = numpyro.sample("tau", dist.HalfNormal(PRIOR["tau_scale"]))
        intercept = numpyro.deterministic("intercept", group_effect("intercept_raw", mu, tau, (G,), centred))
        if spec.varying_slopes:
            tau_w = numpyro.sample("tau_w", dist.HalfNormal(PRIOR["tau_scale"]).expand([D]).to_event(1))
            slope = numpyro.deterministic("slope", group_effect("slope_raw", w, tau_w, (G, D), centred[:, None]))
        else:
            slope = jnp.broadcast_to(w, (G, D))
        if spec.model == "linear":
            sigma = numpyro.sample("sigma", dist.HalfNormal(PRIOR["sigma_scale"]))
            b = jnp.concatenate([intercept[:, None], slope], 1)  # (G, D + 1)
            sse = yty - 2 * (b * xty).sum(-1) + jnp.einsum("gi,gij,gj->g", b, xtx, b)
            numpyro.factor("y", (-0.5 * n * jnp.log(2 * jnp.pi * sigma**2) - sse / (2 * sigma**2)).sum())
        else:
            eta = (x * slope[g]).sum(-1) + intercept[g]
            numpyro.factor("y", (y * eta - jnp.logaddexp(0.0, eta)).sum())

    return model


def natural_draws(spec: RefSpec, samples: dict) -> dict[str, np.ndarray]:
    """{scalar name: (chains, draws)} for every natural-scale scalar, named as svi names elements."""
    out = {}
    for i in range(spec.n_features):
        out[f"w[{i}]"] = samples["w"][..., i]
    out["mu"], out["tau"] = samples["mu"], samples["tau"]
    if spec.varying_slopes:
        for i in range(spec.n_features):
            out[f"tau_w[{i}]"] = samples["tau_w"][..., i]
    if spec.model == "linear":
        out["sigma"] = samples["sigma"]
    for gi in range(spec.n_groups):
        out[f"intercept[{gi}]"] = samples["intercept"][..., gi]
    if spec.varying_slopes:
        for gi in range(spec.n_groups):
            for i in range(spec.n_features):
                out[f"slope[{gi},{i}]"] = samples["slope"][..., gi, i]
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def run_nuts(spec: RefSpec, cols, chains: int, warmup: int, draws: int, seed: int, target_accept: float):
    """Sample the posterior; returns (per-scalar summary, diagnostics)."""
    import jax
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import MCMC, NUTS

    centred_min_rows = NUTS_CENTRED_MIN_ROWS[spec.name]
    kernel = NUTS(numpyro_model(spec, cols, centred_min_rows), target_accept_prob=target_accept)
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=draws, num_chains=chains, chain_method="vectorized",
                progress_bar=False)
    t = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), extra_fields=("diverging", "num_steps"))
    # JAX dispatches asynchronously: the clock stops when the draws exist, not when run() returns
    samples = {k: np.asarray(v) for k, v in jax.block_until_ready(mcmc.get_samples(group_by_chain=True)).items()}
    seconds = time.perf_counter() - t
    extra = mcmc.get_extra_fields(group_by_chain=True)
    summary = {}
    for name, v in natural_draws(spec, samples).items():
        flat = v.reshape(-1)
        summary[name] = {"mean": float(flat.mean()), "sd": float(flat.std(ddof=1)),
                         "r_hat": float(split_gelman_rubin(v)), "ess": float(effective_sample_size(v))}
    sizes = np.asarray(spec.group_sizes)
    diagnostics = {
        "divergences": int(np.asarray(extra["diverging"]).sum()),
        "r_hat_max": max(s["r_hat"] for s in summary.values()),
        "ess_min": min(s["ess"] for s in summary.values()),
        "mean_leapfrog_steps": float(np.asarray(extra["num_steps"]).mean()),
        "wall_seconds": seconds,
        "parametrisation": f"groups with >= {centred_min_rows} rows centred, the rest non-centred "
                           f"({int((sizes >= centred_min_rows).sum())} of {spec.n_groups} centred)",
    }
    return summary, diagnostics


# --- output --------------------------------------------------------------------------------------
def _num(v: float, digits: int = 6):
    """v rounded to ``digits`` significant digits (a float, or an int when it is one)."""
    if isinstance(v, (int, np.integer)) or not math.isfinite(v):
        return v
    return float(f"{v:.{digits}g}")


def _dump(obj: dict, inner_key: str) -> str:
    """JSON with one line per top-level key and per entry of ``obj[inner_key]``, so files stay small and
    diffs of a regenerated file stay readable."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items() if k != inner_key]
    rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in obj[inner_key].items()]
    lines.append(f' "{inner_key}": {{\n' + ",\n".join(rows) + "\n }")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_spec(spec: RefSpec, cols, out: Path) -> None:
    truth = make_truth(spec)
    true_values = natural_draws(spec, {k: np.asarray(v) for k, v in truth.items()})
    obj = {
        "spec": spec.to_json(),
        "priors": PRIOR,
        "model": {"linear": "HierarchicalLinearRegression", "logistic": "HierarchicalLogisticRegression"}[spec.model]
                 + f"(n_features={spec.n_features}, n_groups={spec.n_groups}, varying_slopes={spec.varying_slopes})",
        "columns": {"x": "x*", "y": "y", "g": "g"},
        "rows": spec.rows,
        "generator": "scripts/bench/hierarchical_refs.py:make_data (numpy PCG64; x float32, y float32, g int64)",
        "sha256": data_sha256(cols),
        "truth": {k: _num(float(v), 10) for k, v in true_values.items()},
    }
    (out / "spec.json").write_text(_dump(obj, "truth"))


def write_summary(spec: RefSpec, summary, diagnostics, args, out: Path) -> None:
    import jax
    import numpyro

    obj = {
        "data_set": spec.name,
        "method": f"NumPyro {numpyro.__version__} NUTS (jax {jax.__version__}, float64), "
                  f"target_accept_prob={args.target_accept}, chain_method=vectorized",
        "chains": args.chains, "warmup": args.warmup, "draws_per_chain": args.draws, "seed": args.seed,
        "note": "mean and sd (n-1) pooled over chains; r_hat split-R-hat; ess bulk ESS (numpyro.diagnostics)",
        "diagnostics": {k: _num(v) if isinstance(v, float) else v for k, v in diagnostics.items()},
        "params": {k: {kk: _num(vv) for kk, vv in v.items()} for k, v in summary.items()},
    }
    (out / "ref_summary.json").write_text(_dump(obj, "params"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default=",".join(SPECS), help="comma-separated data set names")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "hier_refs",
                    help="Parquet goes to <data-dir>/<name>/")
    ap.add_argument("--out", type=Path, default=REF_DIR, help="spec.json and ref_summary.json go to <out>/<name>/")
    ap.add_argument("--make-only", action="store_true",
                    help="only regenerate the Parquet data from the committed spec.json (checked by SHA-256)")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-accept", type=float, default=0.9)
    args = ap.parse_args(argv)
    names = [s for s in args.sets.split(",") if s]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        ap.error(f"unknown data set {unknown[0]!r}; choose from {', '.join(SPECS)}")

    if args.make_only:
        for name in names:
            print(f"{name}: {regenerate(name, args.data_dir, args.out)}")
        return

    import jax

    jax.config.update("jax_enable_x64", True)  # references in float64: summaries to 6 digits
    print(f"{'data set':28s} {'rows':>7s} {'groups':>6s} {'div':>4s} {'r_hat max':>9s} {'ess min':>8s} "
          f"{'steps':>6s} {'wall s':>7s}")
    for name in names:
        spec = SPECS[name]
        cols = make_data(spec)
        write_parquet(cols, args.data_dir / name)
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        write_spec(spec, cols, out)
        summary, diag = run_nuts(spec, cols, args.chains, args.warmup, args.draws, args.seed, args.target_accept)
        write_summary(spec, summary, diag, args, out)
        flag = "" if diag["divergences"] == 0 and diag["r_hat_max"] < 1.01 else "  <- not clean"
        print(f"{name:28s} {spec.rows:7d} {spec.n_groups:6d} {diag['divergences']:4d} {diag['r_hat_max']:9.4f} "
              f"{diag['ess_min']:8.0f} {diag['mean_leapfrog_steps']:6.1f} {diag['wall_seconds']:7.1f}{flag}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
