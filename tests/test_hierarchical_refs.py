"""Multilevel regressions against NUTS (issue 12's acceptance): svi's built-in hierarchical models,
fitted with their defaults (the structured family) and with fullrank, against the NumPyro NUTS references committed under
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


FAST = {("linear_slopes_16x4000", "defaults")}  # the default suite's one (~10 s); the rest: -m slow
SETS = ["linear_intercepts_50x4000", "linear_slopes_16x4000", "logistic_intercepts_1000x8", "logistic_slopes_mixed100"]
# issue 12's acceptance: the default family (structured, for models with group effects) and fullrank
# On the data-rich 50 x 4,000 set the warm start alone lands within the bounds (0.14-0.15 sd), so
# the set is also fitted from a warm start on 2,000 rows, ~20 sds off (see the do-nothing test)
FAR = [("linear_intercepts_50x4000", "defaults_far"), ("linear_intercepts_50x4000", "fullrank_far")]
CASES = [pytest.param(s, c, marks=[] if (s, c) in FAST else [pytest.mark.slow], id=f"{s}-{c}")
         for s, c in [(s, c) for s in SETS for c in ("defaults", "fullrank")] + FAR]


@pytest.mark.parametrize("name,config", CASES)
def test_defaults_match_nuts(bench, data_dir, name, config):
    refs = bench._refs_module()
    r = bench.run(name, config, refs, data_dir)
    assert r["converged"], r["reason"]
    assert r["worst_z"] < MEAN_TOL, f"{r['worst_z_name']}: mean off by {r['worst_z']:.3f} reference sd"
    for kind, v in r["kinds"].items():
        ratio, where = v["ratio"]
        assert abs(ratio - 1) < SD_TOL, f"{where}: sd ratio {ratio:.3f}"


@pytest.mark.parametrize("config", ["warm_only_far", pytest.param("warm_only_fullrank_far", marks=pytest.mark.slow)])
def test_the_far_start_alone_fails_the_bounds(bench, data_dir, config):
    r = bench.run("linear_intercepts_50x4000", config, bench._refs_module(), data_dir)
    assert r["worst_z"] > 10 * MEAN_TOL, r["worst_z"]


@pytest.mark.slow
def test_meanfield_cannot_hold_tau_on_data_poor_groups(bench, data_dir):
    """Why the default for group effects is not mean-field: on 1,000 groups of 8 rows its tau sd is
    a third short of NUTS's (a diagonal Gaussian drops tau's correlation with the intercepts),
    where the structured default is within the bound (test above)."""
    r = bench.run("logistic_intercepts_1000x8", "meanfield", bench._refs_module(), data_dir)
    assert r["kinds"]["tau"]["ratio"][0] < 1 - SD_TOL


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


@pytest.mark.parametrize("family", ["auto", pytest.param("fullrank", marks=pytest.mark.slow)])
def test_a_user_written_group_effect_matches_eight_schools(family):
    data, ref = posteriordb("eight_schools-eight_schools_noncentered")
    J = int(data["J"])
    rows = {"y": np.asarray(data["y"], float), "sigma": np.asarray(data["sigma"], float), "g": np.arange(J)}
    post = svi.fit(EightSchools(J), rows, family=family, seed=0, tracking=False, progress=False)
    assert post.info.converged, post.info.reason
    s = post.summary(n=20_000, seed=1)
    names = {"mu": "mu", "tau": "tau", **{f"theta[{j}]": f"theta[{j + 1}]" for j in range(J)}}
    err = {n: abs(s.loc[n, "mean"] - ref[r]["mean"]) / ref[r]["sd"] for n, r in names.items()}
    ratio = {n: s.loc[n, "sd"] / ref[r]["sd"] for n, r in names.items()}
    # tau included: a family that keeps tau's correlation with the school effects reaches the bounds
    # (measured 0.18 sd / 0.77 structured, 0.16 / 0.82 fullrank; mean-field 0.23 / 0.64)
    worst = max(names, key=err.get)
    assert err[worst] < MEAN_TOL, f"{worst}: mean off by {err[worst]:.3f} reference sd"
    worst = max(names, key=lambda n: abs(ratio[n] - 1))
    assert abs(ratio[worst] - 1) < SD_TOL, f"{worst}: sd ratio {ratio[worst]:.3f}"
