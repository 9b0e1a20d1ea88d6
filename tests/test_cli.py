"""The command line and the job configs, as a user drives them: real processes, a kill -9,
resume, summary, sample, diagnose; every example config; bad configs."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import svi
from svi.checkpoint import list_checkpoints
from svi.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SVI = [sys.executable, "-m", "svi"]


def _run(args, cwd, **kw):
    return subprocess.run(SVI + args, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)


def test_fit_kill_resume_summary_sample_diagnose(tmp_path):
    common = [f"data.path={tmp_path}/data", "data.make.rows=60000", "data.make.files=3", "data.make.row_group_size=5000",
              f"checkpoint.dir={tmp_path}/ck", "checkpoint.every=40", f"output.posterior={tmp_path}/post",
              "batch_size=512", "tol_param=0.01"]
    proc = subprocess.Popen(SVI + ["fit", str(ROOT / "conf/quickstart.yaml"), *common], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(list_checkpoints(tmp_path / "ck")) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "post").exists()

    resumed = _run(["resume", str(tmp_path / "ck")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "converged" in resumed.stdout
    assert "true" in resumed.stdout and (tmp_path / "post" / "posterior.json").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # the resume continued the same run
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "elbo")]
    assert steps == sorted(set(steps)) and steps[0] == 100 and all(b - a == 100 for a, b in zip(steps, steps[1:]))

    summary = _run(["summary", str(tmp_path / "post")], tmp_path)
    assert summary.returncode == 0 and "w[9]" in summary.stdout and "q95" in summary.stdout
    sample = _run(["sample", str(tmp_path / "post"), "-n", "250", "-o", str(tmp_path / "draws.parquet")], tmp_path)
    assert sample.returncode == 0, sample.stderr
    draws = pd.read_parquet(tmp_path / "draws.parquet")
    assert draws.shape == (250, 11) and list(draws.columns[:2]) == ["w[0]", "w[1]"]
    diag = _run(["diagnose", str(tmp_path / "post")], tmp_path)
    assert diag.returncode == 0, diag.stderr
    assert "PSIS k-hat" in diag.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "conf").glob("*.yaml")))
def test_every_example_config_runs_to_a_posterior(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    post = svi.fit_config(ROOT / "conf" / config, [
        f"data.path={tmp_path}/data", "data.make.rows=20000", "data.make.files=2", "data.make.row_group_size=4000",
        f"checkpoint.dir={tmp_path}/ck", f"output.posterior={tmp_path}/post", "max_steps=3000"])
    assert (tmp_path / "post" / "posterior.json").is_file()
    assert post.summary().shape[0] >= 2
    assert list_checkpoints(tmp_path / "ck")


def test_bad_configs_name_the_key_or_path(tmp_path):
    conf = ROOT / "conf" / "quickstart.yaml"
    cases = [
        (["fit.famly=fullrank"], r"unknown config key 'fit.famly'"),
        (["famly=fullrank"], r"unknown key 'famly' in override 'famly=fullrank'"),
        (["fit.max_steps=lots"], r"config key fit.max_steps='lots' is not allowed: a positive integer"),
        (["fit.family=gaussian"], r"config key fit.family='gaussian' is not allowed: one of meanfield"),
        (["tracking.enabeld=false"], r"unknown config key 'tracking.enabeld'.*keys of 'tracking' are"),
        (["checkpoint.every=often"], r"config key 'checkpoint.every'"),
        (["fit.checkpoint_dir=x"], r"config key 'fit.checkpoint_dir' belongs in another section: checkpoint.dir"),
        (["nonsense"], r"override 'nonsense' is not key=value"),
    ]
    for overrides, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            load_config(conf, overrides)
    with pytest.raises(ConfigError, match=r"config file .*nowhere.yaml does not exist"):
        load_config(tmp_path / "nowhere.yaml")
    missing = _run(["fit", str(conf), f"data.path={tmp_path}/no-such-data", "data.make=null"], tmp_path)
    assert missing.returncode == 2 and f"no Parquet file matches '{tmp_path}/no-such-data'" in missing.stderr
    bad_model = _run(["fit", str(conf), "model.target=svi.models:NoSuchModel"], tmp_path)
    assert bad_model.returncode == 2 and "cannot import 'svi.models:NoSuchModel'" in bad_model.stderr
    bad_args = _run(["fit", str(conf), "model.args.n_featurez=3"], tmp_path)
    assert bad_args.returncode == 2 and "config key 'model.args'" in bad_args.stderr
    helped = _run(["fit", "--help"], tmp_path)
    assert helped.returncode == 0 and "overrides" in helped.stdout
