"""The fit's record (``post.info``): frozen, complete before it is saved or logged, round-tripped
through posterior.json, older files still read, and diagnose makes a new record, not an edit."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import svi
from svi.families import make_family
from svi.fitrecord import FitRecord
from svi.posterior import Posterior
from svi.transforms import ParamSpace


def _full_record() -> FitRecord:
    """Every field set to something other than its default (JSON-shaped, so a round trip is exact)."""
    return FitRecord(
        steps=123, converged=True, reason="relative ELBO change below 0.01", stop_reason="converged",
        warm_start="L-BFGS 7 iterations", eta=0.1, nonfinite_steps=2, seconds=3.5, num_rows=200, batch_size=50,
        dropped_rows=4, world_size=2, fingerprints={"model": "abc", "data": "def"},
        options={"seed": 3, "tracking_uri": "sqlite:///x.db"}, history=[[100, -1.5], [123, -1.25]],
        heldout_lpd=[[100, 0.5, -2.0]], run_id="0123abcd", columns={"x": "x*", "y": "y"},
        resolved_columns={"x": ["x0", "x1"], "y": "y"}, data_path="/data/d.parquet", job={"name": "j"},
        truth={"w": [1.0, -1.0]}, khat=0.42, khat_rows=150, extra={"note": "kept"})


def _tiny_post(info=None) -> Posterior:
    model = svi.models.LinearRegression(2)
    space = ParamSpace(model.get_params(), model.name)
    return Posterior(model, space, make_family("meanfield", space.size), info)


def test_the_record_is_frozen():
    rec = _full_record()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.khat = 0.1
    with pytest.raises(TypeError, match=r"replace\(khat="):
        rec["khat"] = 0.1  # the dict-style write of older code: a clear error, not a silent edit
    with pytest.raises(TypeError, match="replace"):
        del rec["steps"]
    assert rec.khat == 0.42 and rec["khat"] == 0.42
    new = rec.replace(khat=0.9)
    assert new.khat == 0.9 and rec.khat == 0.42 and new.steps == rec.steps


def test_save_load_round_trips_every_field(tmp_path):
    rec = _full_record()
    defaults = FitRecord()
    unset = [f.name for f in dataclasses.fields(rec) if getattr(rec, f.name) == getattr(defaults, f.name)]
    assert unset == []  # the test covers every field
    loaded = Posterior.load(_tiny_post(rec).save(tmp_path / "p")).info
    assert isinstance(loaded, FitRecord)
    assert loaded == rec
    saved = json.loads((tmp_path / "p" / "posterior.json").read_text())["info"]
    assert saved["steps"] == 123 and saved["note"] == "kept" and "extra" not in saved  # the same flat keys as before


def test_an_old_info_without_some_keys_still_loads_and_unknown_keys_are_kept(tmp_path):
    folder = _tiny_post().save(tmp_path / "old")
    meta = json.loads((folder / "posterior.json").read_text())
    # what an earlier svi wrote: no k-hat, held-out curve or resolved columns, and a key this one does not know
    meta["info"] = {"steps": 40, "converged": False, "reason": "max_steps reached", "stop_reason": "max_steps",
                    "num_rows": 10, "batch_size": 10, "options": {"seed": 0}, "history": [[40, -3.0]],
                    "run_id": None, "legacy_flag": 7}
    (folder / "posterior.json").write_text(json.dumps(meta))
    info = Posterior.load(folder).info
    assert info.steps == 40 and info.stop_reason == "max_steps" and info.history == [[40, -3.0]]
    assert info.khat is None and info.khat_rows is None and info.heldout_lpd == [] and info.resolved_columns is None
    assert info.extra == {"legacy_flag": 7}
    assert info["steps"] == 40 and info.get("khat") is None and info.get("legacy_flag") == 7  # read-only dict view
    again = json.loads((Posterior.load(folder).save(tmp_path / "again") / "posterior.json").read_text())["info"]
    assert again["legacy_flag"] == 7


@pytest.fixture(scope="module")
def logged_fit(tmp_path_factory):
    """A tracked fit of Parquet data into a real sqlite MLflow store, with the end-of-fit k-hat on."""
    import os

    folder = tmp_path_factory.mktemp("logged")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 2))
    pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "y": x @ [1.0, -1.0] + rng.normal(size=3000)}).to_parquet(
        folder / "d.parquet")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        post = svi.fit(svi.models.LinearRegression(2), str(folder / "d.parquet"), columns={"x": "x*", "y": "y"},
                       tracking=True, tracking_uri=uri, khat_rows=2000, max_steps=2000)
    finally:
        os.chdir(cwd)
    return post, uri, folder


def test_the_logged_posterior_already_holds_the_end_of_fit_khat(logged_fit, tmp_path):
    post, uri, _ = logged_fit
    assert post.info.khat is not None and post.info.khat_rows == 2000
    local = MlflowClient(uri).download_artifacts(post.info.run_id, "posterior", str(tmp_path))
    (meta,) = Path(local).rglob("posterior.json")
    logged = json.loads(meta.read_text())["info"]
    assert logged["khat"] == pytest.approx(post.info.khat) and logged["khat_rows"] == 2000
    assert svi.load_posterior(f"runs:/{post.info.run_id}/posterior", tracking_uri=uri).info.khat == \
        pytest.approx(post.info.khat)


def test_diagnose_makes_a_new_record_and_leaves_the_old_one(logged_fit):
    from svi.diagnostics import diagnose

    post, _, _ = logged_fit
    before = post.info
    snapshot = before.to_dict()
    copy = Posterior(post.model, post.space, post.family, before, post.model_spec)
    result = diagnose(copy, num_draws=300, seed=1, log_to_run=False)
    assert copy.info is not before and copy.info.khat == result.khat and copy.info.khat_rows == 3000
    assert result.posterior.info.khat == result.khat
    assert before.to_dict() == snapshot and before.khat != result.khat and post.info is before
    assert copy.info.replace(khat=before.khat, khat_rows=before.khat_rows) == before  # nothing else changed


def test_cli_diagnose_of_a_run_uri(logged_fit):
    from svi.diagnostics import diagnose

    post, uri, folder = logged_fit
    run_uri = f"runs:/{post.info.run_id}/posterior"
    proc = subprocess.run([sys.executable, "-m", "svi", "diagnose", run_uri, "--tracking-uri", uri, "--draws", "400",
                           "--seed", "2"], cwd=folder, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    shown = float(re.search(r"PSIS k-hat = (-?[\d.]+)", proc.stdout).group(1))
    expected = diagnose(run_uri, tracking_uri=uri, num_draws=400, seed=2, log_to_run=False).khat
    assert shown == pytest.approx(expected, abs=1e-3) and shown < 0.7
    history = MlflowClient(uri).get_metric_history(post.info.run_id, "psis_khat")  # logged to the fit's run
    assert history and history[-1].value == pytest.approx(shown, abs=1e-3)
