"""The ADVI paper's Gaussian mixture experiment at its scale: held-out log predictive density
against wall time for svi, NumPyro's SVI and scikit-learn's variational EM.

Kucukelbir, Tran, Ranganath, Gelman, Blei, "Automatic differentiation variational inference",
JMLR 2017, section 4.3 (figure 9): a K = 30 component diagonal Gaussian mixture on
colour-histogram rows (D = 200 bins, 250,000 images), scored on 10,000 held-out rows. Here the
rows are ``histogram_mixture`` synthetic data (``svi.synthetic``: Poisson-binned cluster
profiles, the shape of the paper's image histograms), written once to Parquet with
``svi.data.jobs.write_synthetic`` into ``--data`` (training rows) and ``<data>-heldout``, and
reused while ``<data>.truth.json`` matches the requested sizes.

The model, the same for every method that states one: loc_kd ~ N(0, 5), scale_kd ~
HalfNormal(2), weights ~ Dirichlet(1, ..., 1), y_i ~ sum_k weights_k prod_d N(y_id | loc_kd,
scale_kd), the assignment marginalised (``svi.models.GaussianMixture(K, n_features=D)``).

Methods (``--only``, comma list):

* ``svi``: ``svi.fit`` with its defaults, the training rows streamed from Parquet
  (``in_memory_rows=0``), held-out lpd every ``--heldout-every`` steps (``post.info.heldout_lpd``),
  stopped by its own convergence rule (no budget).
* ``numpyro_documented``: the model in NumPyro (``MixtureSameFamily`` of ``Normal(...).to_event(1)``,
  which marginalises the assignment with logsumexp), the rows in memory as one array read with
  pyarrow, ``plate("data", N, subsample_size=1024)`` + ``numpyro.subsample``, ``AutoNormal`` with
  its default init (``init_to_uniform``), ``numpyro.optim.Adam(1e-3)`` as NumPyro's example
  scripts, ``Trace_ELBO()``, the update jit-compiled (``jax.jit(svi.update)``), run for ``--budget`` s
  (checked every 25 steps).
* ``numpyro_tuned``: the same, started with ``init_to_value`` at svi's data start
  (``GaussianMixture.initial_values`` on a uniform sample of 20,000 training rows: k-means++ and
  Lloyd centres, per-cluster sds and shares), one run per ``--lrs`` learning rate; the row of the
  table is the rate with the best final held-out lpd (the others are in its note and the JSON).
* ``sklearn``: ``BayesianGaussianMixture(n_components=K, covariance_type="diag",
  init_params="kmeans", random_state=0, warm_start=True, max_iter=--sk-iter)`` with a finite
  Dirichlet(1) weight prior (``weight_concentration_prior_type="dirichlet_distribution"``,
  ``weight_concentration_prior=1``; sklearn's default is a Dirichlet process); its mean and
  precision priors are sklearn's data-dependent conjugate ones, not the model's. ``fit`` is called
  again and again on the in-memory rows (float64) to trace the curve, until ``converged_`` or the
  budget. Its held-out score is ``score_samples(heldout).mean()``: the plug-in density at the
  variational parameters, not a predictive density averaged over draws.

Held-out lpd (the paper's measure): mean over rows of log (1/32) sum_s p(y_i | theta_s) with 32
draws of q. svi scores with ``svi.elbo.log_predictive_density``; NumPyro's runs with one jitted
float32 scorer of guide draws (a fixed key, so the curve moves only when q does), which also
re-scores svi's returned posterior as a cross-check. A reference line gives the plug-in lpd of the
true parameters.

Timing: every method runs in a fresh subprocess, one after another; its clock starts after the
imports and includes reading the data and the initialisation (k-means, svi's warm start, jit
compilation). The held-out scoring is not counted: NumPyro's and sklearn's clocks pause around it;
svi's curve times (seconds since ``svi.fit`` was called) include it, so the median cost of one of
its evaluations, timed after the fit, is subtracted i times from its i-th point (the raw times
are kept in the JSON). The held-out rows are read before a peer's clock starts (svi reads its own
inside ``svi.fit``). "seconds to within 1% of final" is the first curve time from which every later
point satisfies |lpd_t - lpd_final| <= 0.01 |lpd_final|. Peak RSS is the process's peak resident
memory (``ru_maxrss``) less its resident memory when the clock started.

    python scripts/bench/mixture_scale.py [--rows 250000] [--features 200] [--components 30]
        [--heldout 10000] [--budget 300] [--data data/bench/histograms] [--only svi,sklearn]
        [--lrs 1e-2,3e-3,1e-3] [--heldout-every 250] [--sk-iter 10] [--threads N]
        [--out data/bench/mixture_scale.json]

``--threads 1`` is for a shared machine: it sets OMP/OpenBLAS/MKL threads and XLA's intra-op
threads in the children. On 2 busy cores the libraries' default two threads spin: one
sklearn EM iteration on 20,000 x 20 rows took 1-2 s instead of 0.01-0.04 s. Final numbers
are for a quiet machine with the libraries' defaults.

A quick end-to-end check (about 4 minutes):

    python scripts/bench/mixture_scale.py --rows 20000 --features 20 --components 5 --heldout 2000 \\
        --budget 30 --data data/bench/histograms_small --out data/bench/mixture_scale_small.json --threads 1

Needs the ``bench`` extra (numpyro, jax), scikit-learn and pyarrow. At the default sizes the
training rows take 200 MB as float32 (NumPyro) and 400 MB as float64 (sklearn); the full run is
about 5 x ``--budget`` plus svi's own fit time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # run as a file from anywhere: svi is the repository's package
    sys.path.insert(0, str(ROOT))
METHODS = ("svi", "numpyro_documented", "numpyro_tuned", "sklearn")
BATCH = 1024  # NumPyro's rows per step (svi's default batch at N > 10,000 is the same)
DRAWS = 32  # draws of q per held-out evaluation (svi's heldout_draws default)
DOC_LR = 1e-3  # NumPyro's example scripts' Adam step size
INIT_ROWS = 20_000  # rows GaussianMixture.initial_values reads
SEED = 0


# --- data -----------------------------------------------------------------------------------
def ensure_data(args) -> dict:
    """The cached data set's truth file (written with write_synthetic if missing); fails if it
    was written for other sizes."""
    from svi.data.jobs import heldout_folder, truth_file, write_synthetic

    folder = Path(args.data)
    tf = truth_file(folder)
    want = {"rows": args.rows, "n_features": args.features, "n_components": args.components,
            "heldout": args.heldout}
    if not tf.is_file():
        print(f"writing {args.rows:,} training rows to {folder} and {args.heldout:,} held-out rows to "
              f"{heldout_folder(folder)} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        write_synthetic(folder, "histogram_mixture", rows=args.rows, features=args.features,
                        components=args.components, files=8, heldout=args.heldout, seed=SEED)
        print(f"  written in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    meta = json.loads(tf.read_text())
    have = {"rows": meta["rows"], "n_features": meta["spec"]["n_features"],
            "n_components": meta["spec"]["n_components"], "heldout": (meta.get("heldout") or {}).get("rows", 0)}
    if meta["spec"]["model"] != "histogram_mixture" or have != want:
        raise SystemExit(f"{tf} describes {meta['spec']['model']} data with {have}, not the requested {want}: "
                         "give another --data folder (or delete this one and its -heldout and .truth.json)")
    if meta["columns"] != {"y": "h*"}:
        raise SystemExit(f"{tf}: unexpected columns mapping {meta['columns']}")
    return meta


def load_rows(folder, D: int, dtype=np.float32) -> np.ndarray:
    """All rows of a histogram_mixture Parquet folder as an (N, D) array (columns h0 .. h{D-1})."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(folder), columns=[f"h{j}" for j in range(D)])
    out = np.empty((table.num_rows, D), dtype=dtype)
    for j in range(D):
        out[:, j] = table.column(j).to_numpy()
    return out


# --- clocks and memory ------------------------------------------------------------------------
class Clock:
    """Wall seconds since start, less the time spent inside ``paused()``."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.excluded = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0 - self.excluded

    @contextlib.contextmanager
    def paused(self):
        s = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - s


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- the common held-out scorer (JAX, float32) -------------------------------------------------
def make_scorer(heldout: np.ndarray):
    """draws {loc (S,K,D), scale (S,K,D), weights (S,K)} -> mean_i log (1/S) sum_s p(y_i | theta_s)."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import logsumexp

    y = jnp.asarray(heldout, dtype=jnp.float32)
    D = y.shape[1]

    @jax.jit
    def per_draw(args):
        loc, scale, weights = args
        z = (y[:, None, :] - loc) / scale  # (rows, K, D), fused into the sum
        comp = (jnp.log(weights) - 0.5 * jnp.sum(z * z, -1) - jnp.sum(jnp.log(scale), -1)
                - 0.5 * D * math.log(2 * math.pi))
        return logsumexp(comp, -1)  # (rows,)

    @jax.jit
    def all_draws(loc, scale, weights):
        return jax.lax.map(per_draw, (loc, scale, weights))  # one draw at a time: (S, rows)

    def score(draws) -> float:
        ll = np.asarray(all_draws(*(jnp.asarray(np.asarray(draws[k]), dtype=jnp.float32)
                                    for k in ("loc", "scale", "weights"))), dtype=np.float64)
        S = ll.shape[0]
        m = ll.max(0)
        return float(np.mean(m + np.log(np.exp(ll - m).sum(0)) - math.log(S)))

    return score


def truth_lpd(truth: dict, heldout: np.ndarray, chunk: int = 1000) -> float:
    """Plug-in held-out lpd at the true parameters (numpy, float64)."""
    loc, scale, w = (np.asarray(truth[k], dtype=np.float64) for k in ("loc", "scale", "weights"))
    D = loc.shape[1]
    total = 0.0
    for s in range(0, len(heldout), chunk):
        y = heldout[s:s + chunk].astype(np.float64)
        comp = (np.log(w) - 0.5 * (((y[:, None, :] - loc) / scale) ** 2).sum(-1) - np.log(scale).sum(-1)
                - 0.5 * D * math.log(2 * math.pi))
        m = comp.max(-1)
        total += float((m + np.log(np.exp(comp - m[:, None]).sum(-1))).sum())
    return total / len(heldout)


# --- the methods (each in its own subprocess) ------------------------------------------------
def run_svi(args, folder: Path, held: Path) -> dict:
    import torch

    import svi
    from svi.elbo import log_predictive_density
    from svi.models import GaussianMixture

    base_rss = rss_mb()
    t0 = time.perf_counter()
    model = GaussianMixture(args.components, n_features=args.features)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = svi.fit(model, str(folder), columns={"y": "h*"}, heldout=str(held), heldout_rows=args.heldout,
                       heldout_every=args.heldout_every, in_memory_rows=0, tracking=False, progress=False)
    total_raw = time.perf_counter() - t0
    peak = peak_rss_mb()
    raw = [tuple(map(float, p)) for p in post.info.heldout_lpd]  # (step, seconds since svi.fit, lpd)
    if not raw:
        raise RuntimeError("svi.fit returned no held-out curve (post.info.heldout_lpd is empty)")

    # the cost of one of svi's held-out evaluations, as the fit ran them (its threads, its dtype, its draws)
    yh = torch.from_numpy(load_rows(held, args.features))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))  # what svi.fit sets while it streams local Parquet
    costs = []
    for _ in range(3):
        t = time.perf_counter()
        svi_final = log_predictive_density(model, post.space, post.family, {"y": yh}, post.info.options
                                           ["heldout_draws"], torch.Generator().manual_seed(SEED + 29))
        costs.append(time.perf_counter() - t)
    torch.set_num_threads(threads)
    cost = float(np.median(costs))
    curve = [(t - (i + 1) * cost, lpd, step) for i, (step, t, lpd) in enumerate(raw)]

    # cross-check: the returned posterior scored by the peers' scorer
    draws = {k: v.numpy() for k, v in post.sample(DRAWS, seed=SEED + 1).items()}
    cross = make_scorer(yh.numpy())(draws)
    info = post.info
    notes = [f"{info.steps} steps, {'converged' if info.converged else 'NOT converged: ' + info.stop_reason}",
             f"batch {info.batch_size}, streamed", f"warm start: {info.warm_start}",
             f"{total_raw - raw[-1][1]:.1f} s after the last curve point (end-of-fit PSIS k-hat)"]
    notes += [f"warning: {w.message}"[:200] for w in caught if issubclass(w.category, RuntimeWarning)]
    return {"curve": curve, "raw_curve": [(t, lpd, step) for step, t, lpd in raw],
            "total_s": total_raw - len(raw) * cost,
            "total_raw_s": total_raw, "eval_cost_s": cost, "peak_rss_mb": peak - base_rss,
            "final_rescored_svi": svi_final, "final_rescored_jax": cross, "note": "; ".join(notes)}


def run_numpyro(args, folder: Path, held: Path, tuned: bool, lr: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import torch
    from numpyro.infer import SVI, Trace_ELBO, init_to_value
    from numpyro.infer.autoguide import AutoNormal

    from svi.models import GaussianMixture

    K = args.components
    score = make_scorer(load_rows(held, args.features))  # evaluation set-up: before the clock
    base_rss = rss_mb()
    clock = Clock()
    rows = load_rows(folder, args.features)
    N, D = rows.shape

    def model(y):
        loc = numpyro.sample("loc", dist.Normal(0.0, 5.0).expand([K, D]).to_event(2))
        scale = numpyro.sample("scale", dist.HalfNormal(2.0).expand([K, D]).to_event(2))
        weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(K)))
        with numpyro.plate("data", y.shape[0], subsample_size=min(BATCH, y.shape[0])):
            batch = numpyro.subsample(y, event_dim=1)
            mix = dist.MixtureSameFamily(dist.Categorical(probs=weights), dist.Normal(loc, scale).to_event(1))
            numpyro.sample("y", mix, obs=batch)

    init_note = "AutoNormal default init (init_to_uniform)"
    if tuned:
        pick = np.random.default_rng(SEED).choice(N, size=min(INIT_ROWS, N), replace=False)
        start = GaussianMixture(K, n_features=D).initial_values({"y": torch.from_numpy(rows[pick])},
                                                                torch.Generator().manual_seed(SEED))
        guide = AutoNormal(model, init_loc_fn=init_to_value(values={k: jnp.asarray(v.numpy(), dtype=jnp.float32)
                                                                     for k, v in start.items()}))
        init_note = f"init_to_value at GaussianMixture.initial_values ({len(pick):,} rows)"
    else:
        guide = AutoNormal(model)
    engine = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO())
    y = jnp.asarray(rows)
    del rows
    state = engine.init(jax.random.PRNGKey(SEED), y)
    jax.block_until_ready(state)
    t_init = clock.now()
    update = jax.jit(engine.update)
    eval_key = jax.random.PRNGKey(SEED + 1)
    curve, step, loss = [], 0, float("nan")

    def record():
        jax.block_until_ready(state)
        t = clock.now()
        with clock.paused():
            draws = guide.sample_posterior(eval_key, engine.get_params(state), sample_shape=(DRAWS,))
            curve.append((t, score(draws), step))
        return t

    t = record()  # the start, after init
    t_compile = None
    while t < args.budget and math.isfinite(curve[-1][1]):
        for i in range(1, args.heldout_every + 1):
            state, loss = update(state, y)
            step += 1
            if t_compile is None:  # the first call compiles
                jax.block_until_ready(state)
                t_compile = clock.now() - t
            if i % 25 == 0 and i < args.heldout_every:  # stop within 25 steps of the budget, not a whole interval
                jax.block_until_ready(state)
                if clock.now() >= args.budget:
                    break
        t = record()
    peak = peak_rss_mb()
    loss = float(loss)
    note = [f"{step} steps of {min(BATCH, N)} rows, Adam lr={lr:g}", init_note,
            f"data + init {t_init:.1f} s, first jitted step (compiles) {t_compile or 0:.1f} s",
            f"final loss {loss:.6g}"]
    if not math.isfinite(curve[-1][1]):
        note.append("DIVERGED (non-finite held-out lpd)")
    return {"curve": curve, "total_s": clock.now(), "peak_rss_mb": peak - base_rss, "lr": lr, "note": "; ".join(note)}


def run_sklearn(args, folder: Path, held: Path) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import BayesianGaussianMixture

    Xh = load_rows(held, args.features, np.float64)
    base_rss = rss_mb()
    clock = Clock()
    X = load_rows(folder, args.features, np.float64)
    bgm = BayesianGaussianMixture(n_components=args.components, covariance_type="diag", init_params="kmeans",
                                  random_state=SEED, warm_start=True, max_iter=args.sk_iter,
                                  weight_concentration_prior_type="dirichlet_distribution",
                                  weight_concentration_prior=1.0)
    curve, iters, t = [], 0, 0.0
    while t < args.budget:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # each short call "fails" to converge
            bgm.fit(X)
        iters += bgm.n_iter_
        t = clock.now()
        with clock.paused():
            curve.append((t, float(bgm.score_samples(Xh).mean()), iters))
        if bgm.converged_:
            break
    peak = peak_rss_mb()
    note = (f"{iters} EM iterations, {'converged' if bgm.converged_ else 'NOT converged (budget)'}; plug-in density "
            f"at the variational parameters; all {len(X):,} rows in memory (float64)")
    return {"curve": curve, "total_s": clock.now(), "peak_rss_mb": peak - base_rss, "note": note}


def child(args) -> None:
    from svi.data.jobs import heldout_folder

    folder = Path(args.data)
    held = heldout_folder(folder)
    if args.child == "svi":
        out = run_svi(args, folder, held)
    elif args.child == "sklearn":
        out = run_sklearn(args, folder, held)
    else:
        out = run_numpyro(args, folder, held, args.child == "numpyro_tuned", args.lr)
    Path(args.result).write_text(json.dumps(out))


# --- the parent: runs the children, prints the table -------------------------------------------
def summarise(curve) -> dict:
    """final lpd and the first time from which the curve stays within 1% of it."""
    times = [float(p[0]) for p in curve]
    lpd = [float(p[1]) for p in curve]
    final = lpd[-1]
    if not math.isfinite(final):
        return {"final": final, "within_1pct_s": float("nan")}
    within = None
    for t, v in zip(reversed(times), reversed(lpd)):
        if abs(v - final) <= 0.01 * abs(final):
            within = t
        else:
            break
    return {"final": final, "within_1pct_s": within}


def spawn(args, method: str, lr: float | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--result", str(result),
               "--rows", str(args.rows), "--features", str(args.features), "--components", str(args.components),
               "--heldout", str(args.heldout), "--budget", str(args.budget), "--data", str(args.data),
               "--heldout-every", str(args.heldout_every), "--sk-iter", str(args.sk_iter)]
        if lr is not None:
            cmd += ["--lr", repr(lr)]
        label = method + (f" lr={lr:g}" if lr is not None else "")
        print(f"[{time.strftime('%H:%M:%S')}] {label} ...", file=sys.stderr, flush=True)
        env = dict(os.environ)
        if args.threads:  # every library's intra-op pool: BLAS/OpenMP (numpy, sklearn, torch) and XLA's
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(args.threads)
            multi = str(args.threads > 1).lower()
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={multi}"
                                f" intra_op_parallelism_threads={args.threads}").strip()
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"{label} failed (exit status {proc.returncode}); its traceback is above")
        out = json.loads(result.read_text())
    print(f"[{time.strftime('%H:%M:%S')}] {label} done in {time.perf_counter() - t:.0f} s", file=sys.stderr,
          flush=True)
    return out


def run_method(args, method: str, lrs: list[float]) -> dict:
    """One method's result with its summary; numpyro_tuned: the best run of the lr grid."""
    if method != "numpyro_tuned":
        r = spawn(args, method, DOC_LR if method == "numpyro_documented" else None)
        r.update(summarise(r["curve"]))
        return r
    runs = {lr: spawn(args, method, lr) for lr in lrs}
    for r in runs.values():
        r.update(summarise(r["curve"]))
    best = max(runs, key=lambda lr: runs[lr]["final"] if math.isfinite(runs[lr]["final"]) else -math.inf)
    r = dict(runs[best])
    others = ", ".join(f"lr={lr:g}: {runs[lr]['final']:.4g}" for lr in lrs if lr != best)
    r["note"] = f"best of the lr grid (final lpd {others}); " + r["note"]
    r["grid"] = {repr(lr): runs[lr] for lr in lrs}
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=250_000, help="training rows")
    ap.add_argument("--features", type=int, default=200, help="D, histogram bins")
    ap.add_argument("--components", type=int, default=30, help="K, mixture components")
    ap.add_argument("--heldout", type=int, default=10_000, help="held-out rows")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds per NumPyro run and for sklearn")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "bench" / "histograms",
                    help="cached Parquet folder (written if its .truth.json is missing)")
    ap.add_argument("--only", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    ap.add_argument("--lrs", default="1e-2,3e-3,1e-3", help="learning rates of numpyro_tuned")
    ap.add_argument("--heldout-every", type=int, default=250, help="steps between held-out evaluations (svi, NumPyro)")
    ap.add_argument("--sk-iter", type=int, default=10, help="EM iterations per sklearn fit call (one curve point)")
    ap.add_argument("--threads", type=int, help="intra-op threads of every library in the children (default: theirs)")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "bench" / "mixture_scale.json", help="curves (JSON)")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--lr", type=float, default=DOC_LR, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    methods = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        ap.error(f"--only: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    for name in ("rows", "features", "components", "heldout", "heldout_every", "sk_iter", "budget"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.components < 2 or args.rows < args.components:
        ap.error("a mixture needs --components >= 2 and at least that many --rows")
    if "numpyro_tuned" in methods and not lrs:
        ap.error("--lrs is empty")
    meta = ensure_data(args)
    from svi.data.jobs import heldout_folder

    ref = truth_lpd(meta["truth"], load_rows(heldout_folder(args.data), args.features))

    results: dict[str, dict] = {}
    failed: list[str] = []
    started = time.perf_counter()
    for method in METHODS:
        if method not in methods:
            continue
        try:
            results[method] = run_method(args, method, lrs)
        except RuntimeError as e:  # the child printed its traceback; the other methods still run
            failed.append(method)
            results[method] = {"failed": str(e)}

    def fmt(x, spec):
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

    labels = {"svi": "svi defaults (streamed)", "numpyro_documented": f"numpyro documented (lr={DOC_LR:g})",
              "sklearn": "sklearn BayesianGaussianMixture"}
    print(f"\nK={args.components}, D={args.features}, {args.rows:,} training rows, {args.heldout:,} held-out rows, "
          f"budget {args.budget:g} s per run; held-out lpd per row ({DRAWS} draws of q; sklearn plug-in)\n")
    head = "| method | final held-out lpd | seconds to within 1% of final | total seconds | peak RSS (MB) | note |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for method, r in results.items():
        if "failed" in r:
            print(f"| {method} | FAILED | | | | {r['failed']} |")
            continue
        label = labels.get(method) or f"numpyro tuned (lr={r['lr']:g})"
        note = r["note"].replace("|", "/")
        print(f"| {label} | {fmt(r['final'], '.4f')} | {fmt(r['within_1pct_s'], '.1f')} | {fmt(r['total_s'], '.1f')} "
              f"| {fmt(r['peak_rss_mb'], '.0f')} | {note} |")
    print(f"\nReference: plug-in held-out lpd at the true parameters {ref:.4f}.")
    if "curve" in results.get("svi", {}):
        s = results["svi"]
        print(f"svi: held-out evaluations cost {s['eval_cost_s']:.2f} s each and are subtracted from its times "
              f"(raw total {s['total_raw_s']:.1f} s); its returned posterior rescored: "
              f"{s['final_rescored_svi']:.4f} (svi's scorer), {s['final_rescored_jax']:.4f} (the peers' scorer, "
              f"other draws).")
    print(f"Total wall {time.perf_counter() - started:.0f} s.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": {"rows": args.rows, "features": args.features, "components": args.components,
                          "heldout": args.heldout, "budget_s": args.budget, "heldout_every": args.heldout_every,
                          "sk_iter": args.sk_iter, "lrs": lrs, "threads": args.threads, "batch": BATCH, "draws": DRAWS,
                          "data": str(args.data)},
               "truth_lpd": ref,
               "curve_columns": ["seconds", "heldout_lpd", "step (sklearn: EM iterations)"],
               "methods": results}
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"Curves written to {args.out}.")
    if failed:
        print(f"FAILED: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
