"""MLflow tracking, read back through MlflowClient from a real sqlite store and from a real
``mlflow server`` on 127.0.0.1: metrics, params, artifacts, the posterior; an unreachable
server at start and a server lost mid-run."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

import svi
from svi.checkpoint import list_checkpoints
from svi.tracking import TrackingError
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
    _check_run(client, post.info["run_id"], post, post.info["steps"] // 100 * 100)
    assert client.get_run(post.info["run_id"]).info.run_name == "sqlite-test"
    uri = "sqlite:///mlflow.db"
    for source in (f"runs:/{post.info['run_id']}/posterior", "models:/linreg/1"):
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
    _check_run(client, post.info["run_id"], post, post.info["steps"] // 100 * 100)
    loaded = svi.load_posterior(f"runs:/{post.info['run_id']}/posterior", tracking_uri=server.uri)
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


def _losing_fit(model, server, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = svi.fit(model, _data(), family="fullrank", tracking=True, tracking_uri=server.uri,
                       checkpoint_dir=str(folder), checkpoint_every=100, warm_start="none", max_steps=1200,
                       tol_param=1e-9)
    return post, [str(w.message) for w in caught]


def test_a_server_lost_mid_run_then_back_gets_every_metric(server, tmp_path):
    post, messages = _losing_fit(ServerKiller(server, stop_at=350, start_at=700), server, tmp_path / "ck")
    assert any("did not accept" in m for m in messages)
    assert post.info["steps"] == 1200
    assert list_checkpoints(tmp_path / "ck")[-1].name == "ckpt-000001200.pt"  # checkpoints stayed local
    client = MlflowClient(server.uri)
    steps = [m.step for m in client.get_metric_history(post.info["run_id"], "elbo")]
    assert steps == list(range(100, 1201, 100))  # the buffered metrics arrived when the server came back
    assert "lost" in client.get_run(post.info["run_id"]).data.tags["svi.tracking_gaps"]


def test_a_server_that_never_comes_back_leaves_the_metrics_on_disk(server, tmp_path):
    # the module's server: this test runs last and leaves it stopped
    post, messages = _losing_fit(ServerKiller(server, stop_at=350), server, tmp_path / "ck")
    assert post.info["steps"] == 1200 and list_checkpoints(tmp_path / "ck")
    spool = list((tmp_path / "ck").glob("unsent-mlflow-*.jsonl"))
    assert len(spool) == 1 and any("stayed unreachable" in m for m in messages)
    unsent = pd.read_json(spool[0], lines=True)
    assert set(unsent.dropna(subset=["key"]).query("key == 'elbo'")["step"]) >= {400, 800, 1200}
