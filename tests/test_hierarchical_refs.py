"""Multilevel regressions against NUTS (issue 12's acceptance): svi's built-in hierarchical models,
fitted with their defaults, against the NumPyro NUTS references committed under
tests/data/hierarchical (made by scripts/bench/hierarchical_refs.py), and a user-written
eight-schools model against posteriordb's reference.

Bounds: every natural-scale scalar (w, mu, tau, tau_w, sigma, every group's intercept and slope)
has its mean within 0.2 reference sd and its sd within 25 % of the reference's. The warm start
alone misses the mean bound on these sets (0.30 to 0.36 sd, measured with the benchmark's
``warm_only`` configurations), so a fit whose optimiser did nothing fails here.

The comparison is the benchmark's own (scripts/bench/hierarchical_accuracy.py), so the README's
table and these tests cannot drift apart. The slower sets are marked ``slow``:
``pytest -m slow tests/test_hierarchical_refs.py`` runs them.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.distributions import Cauchy

import svi
from svi.models import _lpdf
from tests.conftest import posteriordb

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench"
MEAN_TOL, SD_TOL = 0.2, 0.25


def _module(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _module("hierarchical_accuracy")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hier_refs")


FAST = {("logistic_slopes_mixed100", "meanfield")}  # the default suite's one; the rest: -m slow
# a Gaussian with a diagonal covariance cannot hold tau's correlation with 1,000 weakly identified
# intercepts: its KL optimum has tau's sd 0.69 of NUTS's (README, "Multilevel regressions")
MEANFIELD_SD_GAP = {("logistic_intercepts_1000x8", "meanfield"): "tau"}
SETS = ["linear_intercepts_50x4000", "linear_slopes_16x4000", "logistic_intercepts_1000x8", "logistic_slopes_mixed100"]
# fullrank stops (converged by its rule) with tau 0.32 reference sd low on 1,000 groups of 8 rows
# (README, "Multilevel regressions"): an open gap, kept visible
KNOWN_MISS = {("logistic_intercepts_1000x8", "fullrank"): "tau's mean 0.32 reference sd low at the stopping rule"}


def _marks(s, c):
    marks = [] if (s, c) in FAST else [pytest.mark.slow]
    if (s, c) in KNOWN_MISS:
        marks.append(pytest.mark.xfail(reason=KNOWN_MISS[(s, c)], strict=True))
    return marks


CASES = [pytest.param(s, c, marks=_marks(s, c), id=f"{s}-{c}") for s in SETS for c in ("meanfield", "fullrank")]


@pytest.mark.parametrize("name,config", CASES)
def test_defaults_match_nuts(bench, data_dir, name, config):
    refs = bench._refs_module()
    r = bench.run(name, config, refs, data_dir)
    assert r["converged"], r["reason"]
    assert r["worst_z"] < MEAN_TOL, f"{r['worst_z_name']}: mean off by {r['worst_z']:.3f} reference sd"
    gap = MEANFIELD_SD_GAP.get((name, config))
    ratios = {k: v["ratio"] for k, v in r["kinds"].items()}
    for kind, (ratio, where) in ratios.items():
        if kind == gap:
            assert 0.6 < ratio < 1.0, f"{where}: sd ratio {ratio:.3f}"
            continue
        assert abs(ratio - 1) < SD_TOL, f"{where}: sd ratio {ratio:.3f}"


class EightSchools(svi.Model):
    """posteriordb eight_schools_noncentered, written as a user would: the school effects are a
    declared group effect (natural scale, centred prior); svi picks their centring."""

    batch_keys = ("y", "sigma", "g")
    integer_keys = ("g",)

    def __init__(self, n_schools: int):
        self.params = {"mu": svi.Param(()), "tau": svi.Param((), svi.constraints.positive),
                       "theta": svi.Param((n_schools,), loc="mu", scale="tau")}

    def log_prior(self, p):
        half_cauchy = Cauchy(0.0, 5.0).log_prob(p["tau"]) + np.log(2.0)
        effects = _lpdf.normal(p["theta"], p["mu"].unsqueeze(-1), p["tau"].unsqueeze(-1)).sum(-1)
        return _lpdf.normal(p["mu"], 0.0, 5.0) + half_cauchy + effects

    def log_likelihood(self, p, batch):
        return _lpdf.normal(batch["y"], p["theta"][:, batch["g"]], batch["sigma"])


@pytest.mark.parametrize("family", ["meanfield", pytest.param("fullrank", marks=pytest.mark.slow)])
def test_a_user_written_group_effect_matches_eight_schools(family):
    data, ref = posteriordb("eight_schools-eight_schools_noncentered")
    J = int(data["J"])
    rows = {"y": np.asarray(data["y"], float), "sigma": np.asarray(data["sigma"], float), "g": np.arange(J)}
    post = svi.fit(EightSchools(J), rows, family=family, seed=0, tracking=False, progress=False)
    assert post.info["converged"], post.info["reason"]
    s = post.summary(n=20_000, seed=1)
    names = {"mu": "mu", "tau": "tau", **{f"theta[{j}]": f"theta[{j + 1}]" for j in range(J)}}
    err = {n: abs(s.loc[n, "mean"] - ref[r]["mean"]) / ref[r]["sd"] for n, r in names.items()}
    ratio = {n: s.loc[n, "sd"] / ref[r]["sd"] for n, r in names.items()}
    # tau's posterior is a half-Cauchy-tailed funnel: a Gaussian in log tau, fitted by KL(q || p),
    # sits inside it (mean 0.2 sd low, sd 0.65-0.76 of NUTS's); the school effects and mu are held
    # to the bounds
    assert err["tau"] < 0.3 and 0.6 < ratio["tau"] < 1.0, (err["tau"], ratio["tau"])
    worst = max((n for n in names if n != "tau"), key=err.get)
    assert err[worst] < MEAN_TOL, f"{worst}: mean off by {err[worst]:.3f} reference sd"
    worst = max((n for n in names if n != "tau"), key=lambda n: abs(ratio[n] - 1))
    assert abs(ratio[worst] - 1) < SD_TOL, f"{worst}: sd ratio {ratio[worst]:.3f}"
