"""MLflow tracking, read back through MlflowClient from a real sqlite store and from a real
``mlflow server`` on 127.0.0.1: metrics, params, artifacts, the posterior; an unreachable
server at start and a server lost mid-run."""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import svi
from svi.checkpoint import list_checkpoints
from svi.tracking import TrackingError, read_spool
from tests.mlflow_server import MlflowServer, free_port


def _data(n=2000):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2))
    return {"x": x, "y": x @ [1.0, -1.0] + 0.5 + 0.3 * rng.normal(size=n)}


def _check_run(client, run_id, post, min_steps):
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["options.family"] == "fullrank" and run.data.params["num_rows"] == "2000"
    assert "host" in run.data.tags
    steps = [m.step for m in client.get_metric_history(run_id, "elbo")]
    assert steps == list(range(100, 100 * len(steps) + 1, 100)) and steps[-1] >= min_steps
    assert {"grad_norm", "lr", "rows_per_s", "log_likelihood"} <= set(run.data.metrics)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"posterior", "summary.csv", "elbo.png", "config.json", "checkpoints"} <= top
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} >= {"checkpoints/ckpt-000000200.pt"}


def test_fit_logged_to_a_sqlite_store_reads_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    post = svi.fit(svi.models.LinearRegression(2), _data(), family="fullrank", tracking=True,
                   checkpoint_dir="ck", checkpoint_every=200, register_model="linreg", run_name="sqlite-test")
    client = MlflowClient("sqlite:///mlflow.db")  # the embedded default, in the working folder
    _check_run(client, post.info.run_id, post, post.info.steps // 100 * 100)
    assert client.get_run(post.info.run_id).info.run_name == "sqlite-test"
    uri = "sqlite:///mlflow.db"
    for source in (f"runs:/{post.info.run_id}/posterior", "models:/linreg/1"):
        loaded = svi.load_posterior(source, tracking_uri=uri)
        assert all(torch.equal(a, b) for a, b in zip(loaded.sample(100, seed=3).values(),
                                                     post.sample(100, seed=3).values()))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


def test_fit_logged_to_a_real_mlflow_server(server, tmp_path):
    post = svi.fit(svi.models.LinearRegression(2), _data(), family="fullrank", tracking=True,
                   tracking_uri=server.uri, experiment="server-test", checkpoint_dir=str(tmp_path / "ck"),
                   checkpoint_every=200)
    client = MlflowClient(server.uri)
    _check_run(client, post.info.run_id, post, post.info.steps // 100 * 100)
    loaded = svi.load_posterior(f"runs:/{post.info.run_id}/posterior", tracking_uri=server.uri)
    assert torch.equal(loaded.family.mean, post.family.mean)


def test_an_unreachable_server_at_start_fails_before_training(tmp_path):
    port = free_port()  # nothing listens there
    with pytest.raises(TrackingError, match=rf"cannot use the MLflow tracking store at 'http://127.0.0.1:{port}'"):
        svi.fit(svi.models.LinearRegression(2), _data(), tracking=True, tracking_uri=f"http://127.0.0.1:{port}",
                checkpoint_dir=str(tmp_path / "ck"))
    assert not list_checkpoints(tmp_path / "ck")  # no step was taken


class ServerKiller(svi.models.LinearRegression):
    """A linear model that stops the tracking server after some likelihood calls and (optionally)
    starts it again later: a server lost in the middle of a fit."""

    def __init__(self, server, stop_at, start_at=None):
        super().__init__(2)
        self.server, self.stop_at, self.start_at, self.calls = server, stop_at, start_at, 0

    def log_likelihood(self, p, batch):
        self.calls += 1
        if self.calls == self.stop_at:
            self.server.stop()
        if self.start_at is not None and self.calls == self.start_at:
            self.server.start()
        return super().log_likelihood(p, batch)


def _losing_fit(model, server, folder, wait=30.0):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = svi.fit(model, _data(), family="fullrank", tracking=True, tracking_uri=server.uri,
                       checkpoint_dir=str(folder), checkpoint_every=100, warm_start="none", max_steps=1200,
                       tol_param=1e-9, tracking_wait=wait)
    return post, [str(w.message) for w in caught]


def _complete_run(client, run_id, post, uri):
    """Every metric, every output artifact, the true status: the run as if the server never left."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "elbo")]
    assert steps == list(range(100, 1201, 100))
    assert {"posterior", "summary.csv", "elbo.png", "config.json", "checkpoints"} <= {a.path for a in
                                                                                      client.list_artifacts(run_id)}
    loaded = svi.load_posterior(f"runs:/{run_id}/posterior", tracking_uri=uri)
    assert torch.equal(loaded.family.mean, post.family.mean)
    assert "lost" in run.data.tags["svi.tracking_gaps"]


def test_a_server_lost_mid_run_then_back_gets_everything(server, tmp_path):
    # killed (kill -9) a third of the way in, back later: the outputs logged at the end wait on disk
    post, messages = _losing_fit(ServerKiller(server, stop_at=350, start_at=700), server, tmp_path / "ck")
    assert any("did not accept" in m for m in messages)
    assert post.info.steps == 1200
    assert list_checkpoints(tmp_path / "ck")[-1].name == "ckpt-000001200.pt"  # checkpoints stayed local
    _complete_run(MlflowClient(server.uri), post.info.run_id, post, server.uri)
    assert not list((tmp_path / "ck").glob("unsent-mlflow-*.jsonl"))


@pytest.mark.slow  # ~35 s: waits out the sender's give-up time; the lost-then-back case stays in the suite
def test_a_server_that_never_comes_back_is_synced_later(server, tmp_path):
    post, messages = _losing_fit(ServerKiller(server, stop_at=350), server, tmp_path / "ck", wait=3.0)
    assert post.info.steps == 1200 and list_checkpoints(tmp_path / "ck")
    spool = list((tmp_path / "ck").glob("unsent-mlflow-*.jsonl"))
    assert len(spool) == 1 and any("stayed unreachable" in m and "svi sync" in m for m in messages)
    header, ops = read_spool(spool[0])
    assert header["run_id"] == post.info.run_id and ops[-1] == {"op": "status", "status": "FINISHED"}
    unsent = {step for op in ops if op["op"] == "metrics" for key, _, _, step in op["metrics"] if key == "elbo"}
    assert unsent >= {400, 800, 1200}
    assert {"posterior", "summary.csv"} <= {Path(op["path"]).name for op in ops if op["op"] == "artifact"}
    assert MlflowClient(server.uri if server.proc else "sqlite:///" + str(server.folder / "store.db")).get_run(
        post.info.run_id).info.status == "RUNNING"  # not a false "finished" while the outputs are missing
    res = subprocess.run([sys.executable, "-m", "svi", "sync", str(tmp_path / "ck")], capture_output=True, text=True)
    assert res.returncode == 2 and "run svi sync again" in res.stderr and spool[0].is_file()  # still down
    server.start()
    res = subprocess.run([sys.executable, "-m", "svi", "sync", str(tmp_path / "ck")], capture_output=True, text=True)
    assert res.returncode == 0 and "status FINISHED" in res.stdout, res.stderr
    assert not spool[0].exists()
    _complete_run(MlflowClient(server.uri), post.info.run_id, post, server.uri)


def test_a_resumed_run_sends_what_an_outage_spooled(tmp_path):
    from svi.tracking import MLflowTracker, write_spool

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = MLflowTracker(uri, "spool", finish_wait=5)
    (tmp_path / "out.txt").write_text("kept on disk while the server was away")
    ops = [{"op": "metrics", "metrics": [["elbo", -5.0, 1, 100], ["elbo", -4.0, 2, 200]]},
           {"op": "artifact", "path": str(tmp_path / "out.txt"), "artifact_path": None},
           {"op": "status", "status": "FINISHED"}]
    write_spool(tmp_path / f"unsent-mlflow-{first.run_id}.jsonl", first.run_id, uri, ops)
    again = MLflowTracker(uri, "spool", run_id=first.run_id, spool_dir=tmp_path, finish_wait=5)
    assert again.adopt_spool() == 2  # the recorded status is dropped: the run goes on
    assert not list(tmp_path.glob("unsent-mlflow-*.jsonl"))
    again.log_metrics({"elbo": -3.0}, 300)
    again.finish("FINISHED")
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "elbo")] == [100, 200, 300]
    assert [a.path for a in client.list_artifacts(first.run_id)] == ["out.txt"]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_registration_does_not_depend_on_mlflows_default_store(tmp_path, monkeypatch):
    """MLflow's sqlite registry looks a "models:/<id>" source up in the process-wide default store;
    svi registers into its own store whatever that default is (here another sqlite file)."""
    import mlflow
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/someone-elses.db")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 2))
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": x @ [1.0, -1.0] + 0.3 * rng.normal(size=500)})
    store = f"sqlite:///{tmp_path}/svi.db"
    post = svi.fit(svi.models.LinearRegression(2), frame, columns={"x": ["a", "b"], "y": "y"}, tracking=True,
                   tracking_uri=store, register_model="m", max_steps=300, progress=False)
    client = MlflowClient(store)
    assert client.get_run(post.info.run_id).info.status == "FINISHED"
    assert client.get_model_version("m", "1").run_id == post.info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    inputs = mlflow.models.get_model_info("models:/m/1").signature.inputs.input_names()
    assert inputs == ["a", "b"]
