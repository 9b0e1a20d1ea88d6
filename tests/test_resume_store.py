"""Resuming a checkpoint whose MLflow run is not in the current store (issue 18): a new store
(another MLFLOW_TRACKING_URI, a deleted mlflow.db) continues in a new run tagged with the old
one, or refuses with ``missing_run="error"``; under torchrun an error that rank 0 alone finds
before training stops both ranks with the same one line. Real sqlite stores, real processes."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import svi
from svi import distributed as dist
from svi.tracking import RUN_ID_FILE
from svi.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from svi.data.jobs import write_synthetic
from svi.tracking import RunNotFoundError, TrackingError
from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("MLFLOW_TRACKING_URI", None)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
MISSING = "is not in the tracking store"


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 3))
    y = (rng.random(3000) < 1 / (1 + np.exp(-(x @ [1.0, -1.0, 0.5])))).astype(float)
    return {"x": x, "y": y}


def _fit(folder, max_steps, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "reached max_steps" is expected here
        return svi.fit(svi.models.LogisticRegression(3), _data(), family="fullrank", batch_size=256,
                       max_steps=max_steps, tol_param=1e-6, checkpoint_dir=str(folder), checkpoint_every=100, **kw)


class _Lines(logging.Handler):
    """The svi logger's records, whatever handlers or propagation other tests left on it."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        self._logger = logging.getLogger("svi")
        self._level = self._logger.level
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_a_new_store_continues_in_a_new_run_from_the_checkpoint_step(tmp_path, monkeypatch):
    store_a, store_b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    straight = _fit(tmp_path / "straight", 450)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_a)  # as a user would: the store comes from the environment
    first = _fit(tmp_path / "ck", 250, tracking=True)
    old_run = first.info.run_id
    assert load_checkpoint(list_checkpoints(tmp_path / "ck")[-1])["tracking_uri"] == store_a

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_b)
    with _Lines() as log:
        resumed = _fit(tmp_path / "ck", 450, tracking=True, resume="auto", force_resume=True)
    said = [line for line in log.lines if MISSING in line]
    assert len(said) == 1 and old_run in said[0] and "ckpt-000000250.pt" in said[0] and "step 250" in said[0]

    new_run = resumed.info.run_id
    assert new_run != old_run
    b = MlflowClient(store_b)
    run = b.get_run(new_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["svi.resumed_from_run"] == old_run
    assert run.data.tags["svi.resumed_from_store"] == store_a
    assert run.data.tags["svi.resumed_from_step"] == "250"
    assert run.data.params["options.family"] == "fullrank"  # a complete run, not only metrics
    assert len(b.search_runs([run.info.experiment_id])) == 1
    steps = [m.step for m in b.get_metric_history(new_run, "elbo")]
    assert steps and min(steps) > 250 and steps == sorted(set(steps))  # the history starts at the checkpoint
    a_steps = [m.step for m in MlflowClient(store_a).get_metric_history(old_run, "elbo")]
    assert a_steps and max(a_steps) <= 250  # the old run is left as it was

    assert (tmp_path / "ck" / RUN_ID_FILE).read_text().strip() == new_run
    last = load_checkpoint(list_checkpoints(tmp_path / "ck")[-1])
    assert last["run_id"] == new_run and last["tracking_uri"] == store_b
    assert resumed.info.steps == straight.info.steps == 450
    for p, q in zip(straight.family.parameters(), resumed.family.parameters()):
        assert torch.equal(p, q)  # the new run changes where metrics go, not the trajectory


def test_missing_run_error_refuses_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/a.db")
    old_run = _fit(tmp_path / "ck", 200, tracking=True).info.run_id
    before = _snapshot(tmp_path / "ck")

    store_b = f"sqlite:///{tmp_path}/b.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_b)
    with pytest.raises(RunNotFoundError) as caught:
        # more steps: the same 200 would find the fit finished and do nothing, with no run to look for
        _fit(tmp_path / "ck", 300, tracking=True, resume=True, missing_run="error", force_resume=True)
    message = str(caught.value)
    assert f"MLflow run {old_run} is not in the tracking store {store_b!r}" in message
    assert "missing_run='new'" in message and "a.db" in message and "ckpt-000000200.pt" in message
    assert "Start the server" not in message  # the store answered: neither the server nor the URI is to blame
    assert _snapshot(tmp_path / "ck") == before
    b = MlflowClient(store_b)
    assert not b.search_runs([e.experiment_id for e in b.search_experiments()])


def test_a_deleted_run_and_a_checkpoint_without_its_store_continue_in_a_new_run(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    old_run = _fit(tmp_path / "ck", 200, tracking=True).info.run_id
    path, payload = latest_checkpoint(tmp_path / "ck")
    del payload["tracking_uri"]  # a checkpoint written before the store was recorded
    path.unlink()
    save_checkpoint(tmp_path / "ck", 200, payload)
    client = MlflowClient(store)
    client.delete_run(old_run)
    resumed = _fit(tmp_path / "ck", 300, tracking=True, resume=True, force_resume=True)
    tags = client.get_run(resumed.info.run_id).data.tags
    assert tags["svi.resumed_from_run"] == old_run and tags["svi.resumed_from_store"] == "unknown"
    assert min(m.step for m in client.get_metric_history(resumed.info.run_id, "elbo")) > 200


# --- the command line and two ranks -----------------------------------------------------------------
def _job(tmp_path, *extra):
    return [str(ROOT / "conf/quickstart.yaml"), f"data.path={tmp_path}/data", "data.make.rows=4000",
            "data.make.files=2", "data.make.row_group_size=1000", f"checkpoint.dir={tmp_path}/ck",
            f"output.posterior={tmp_path}/post", "batch_size=1000", "max_steps=200", "checkpoint.every=100", *extra]


def _make_data(tmp_path):
    write_synthetic(tmp_path / "data", "logistic", rows=4000, features=10, files=2, row_group_size=1000, workers=1)


def test_the_cli_refusal_is_one_line_with_exit_code_2(tmp_path, monkeypatch):
    _make_data(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/a.db")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        old_run = svi.fit_config(_job(tmp_path)[0], _job(tmp_path)[1:]).info.run_id
    before = _snapshot(tmp_path / "ck")
    store_b = f"sqlite:///{tmp_path}/b.db"
    more = ("max_steps=300", "fit.force_resume=true")  # continue the finished 200-step fit
    run = subprocess.run([sys.executable, "-m", "svi", "fit", *_job(tmp_path, "tracking.missing_run=error", *more)],
                         cwd=tmp_path, env={**ENV, "MLFLOW_TRACKING_URI": store_b}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("svi fit: error:")]
    assert len(errors) == 1 and errors[0] == run.stderr.strip().splitlines()[-1]
    assert f"MLflow run {old_run} {MISSING} {store_b!r}" in errors[0] and "tracking.missing_run=new" in errors[0]
    assert "Traceback" not in run.stderr + run.stdout
    assert _snapshot(tmp_path / "ck") == before


def test_agreement_rebuilds_a_peers_error_by_type_and_message():
    # the rank-0 error of this issue comes back as itself, so the CLI prints it the same way on every rank
    err = dist._rebuild(("svi.tracking", "RunNotFoundError", "MLflow run x is not in the tracking store"), 0)
    assert type(err) is RunNotFoundError and isinstance(err, TrackingError)
    assert str(err) == "MLflow run x is not in the tracking store"
    assert type(dist._rebuild(("builtins", "ValueError", "bad"), 1)) is ValueError

    class Local(Exception):
        pass

    # a type this rank cannot name (local, never imported here, or wanting other arguments): nothing is imported
    for outcome in [(__name__, Local.__qualname__, "boom"), ("not_imported_anywhere", "Boom", "boom"),
                    ("builtins", "UnicodeDecodeError", "boom")]:
        err = dist._rebuild(outcome, 1)
        assert type(err) is dist.PeerError and str(err) == f"rank 1 failed before training: {outcome[1]}: boom"
    assert "not_imported_anywhere" not in sys.modules

    with pytest.raises(KeyError):  # a world of one: the block's own error, untouched
        with dist.agreed(dist.World()):
            raise KeyError("k")


def _torchrun(tmp_path, name, args, store):
    logs = tmp_path / f"logs-{name}"
    run = subprocess.run(TORCHRUN + ["--standalone", "--nproc-per-node", "2", "--log-dir", str(logs), "--redirects",
                                     "3", "-m", "svi", "fit", *args], cwd=tmp_path,
                         env={**ENV, "MLFLOW_TRACKING_URI": store}, capture_output=True, text=True, timeout=300)
    ranks = []
    for r in range(2):
        (folder,) = logs.glob(f"*/attempt_0/{r}")
        ranks.append((folder / "stdout.log").read_text() + (folder / "stderr.log").read_text())
    return run, ranks


def _one_agreed_line(run, ranks):
    assert run.returncode != 0
    assert "exitcode  : 2" in run.stdout + run.stderr  # the root cause torchrun reports: svi's error exit
    lines = [out.strip().splitlines() for out in ranks]
    assert all(len(out) == 1 for out in lines), ranks  # one line on each rank, no traceback
    assert lines[0] == lines[1] and lines[0][0].startswith("svi fit: error: ")
    for out in ranks:
        assert "Traceback" not in out and "Connection closed" not in out
    return lines[0][0]


def test_two_ranks_agree_on_a_store_only_rank_0_could_not_reach(tmp_path):
    _make_data(tmp_path)
    port = free_port()  # nothing listens there
    run, ranks = _torchrun(tmp_path, "unreachable", _job(tmp_path), f"http://127.0.0.1:{port}")
    line = _one_agreed_line(run, ranks)
    assert f"cannot use the MLflow tracking store at 'http://127.0.0.1:{port}'" in line
    assert not list_checkpoints(tmp_path / "ck")


@pytest.mark.slow
def test_two_ranks_resuming_into_a_new_store_refuse_then_continue(tmp_path):
    _make_data(tmp_path)
    store_a, store_b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    first, _ = _torchrun(tmp_path, "a", _job(tmp_path), store_a)
    assert first.returncode == 0, first.stderr[-3000:]
    old_run = (tmp_path / "ck" / RUN_ID_FILE).read_text().strip()
    MlflowClient(store_b).search_experiments()  # store B exists, so its creation adds no log lines below
    before = _snapshot(tmp_path / "ck")

    run, ranks = _torchrun(tmp_path, "refuse", _job(tmp_path, "tracking.missing_run=error"), store_b)
    line = _one_agreed_line(run, ranks)
    assert f"MLflow run {old_run} {MISSING} {store_b!r}" in line and "tracking.missing_run=new" in line
    assert _snapshot(tmp_path / "ck") == before

    run, ranks = _torchrun(tmp_path, "new", _job(tmp_path, "max_steps=300", "fit.force_resume=true"), store_b)
    assert run.returncode == 0, run.stderr[-3000:] + ranks[0][-3000:] + ranks[1][-3000:]
    assert sum(MISSING in line for line in ranks[0].splitlines()) == 1 and MISSING not in ranks[1]
    b = MlflowClient(store_b)
    (new,) = b.search_runs([b.get_experiment_by_name("quickstart").experiment_id])
    assert new.data.tags["svi.resumed_from_run"] == old_run and new.data.tags["svi.resumed_from_store"] == store_a
    assert min(m.step for m in b.get_metric_history(new.info.run_id, "elbo")) > 200


def test_under_torchrun_only_rank_0_talks_to_the_user(tmp_path):
    _make_data(tmp_path)
    run, ranks = _torchrun(tmp_path, "talk", _job(tmp_path), f"sqlite:///{tmp_path}/a.db")
    assert run.returncode == 0, run.stderr[-3000:] + ranks[0][-3000:] + ranks[1][-3000:]
    for said in ("warm start", "q95", "posterior saved", "steps, "):
        assert said in ranks[0] and said not in ranks[1], (said, ranks[1][-2000:])
