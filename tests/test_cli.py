"""The command line and the job configs, as a user drives them: real processes, a kill -9,
resume, summary, sample, diagnose; every example config; bad configs."""

import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import svi
from svi.checkpoint import list_checkpoints
from svi.config import ConfigError, load_config
from svi.options import FitOptions, OptionsError

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


#: the two slowest configs (16-20 s each) run with -m slow, to keep the default suite under ten
#: minutes; by default the streamed mixture with held-out scoring is fitted in test_mixture.py and
#: the group effects' centring in test_hierarchical_refs.py
_SLOW_CONFIGS = {"histograms.yaml", "hierarchical_sparse.yaml"}


@pytest.mark.parametrize("config", [pytest.param(name, marks=pytest.mark.slow) if name in _SLOW_CONFIGS else name
                                    for name in sorted(p.name for p in (ROOT / "conf").glob("*.yaml"))])
def test_every_example_config_runs_to_a_posterior(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    smaller = {  # the paper-scale mixture at a test's scale: fewer bins and clusters
        "histograms.yaml": ["model.args.n_features=20", "data.make.features=20", "model.args.n_components=5",
                            "data.make.components=5", "data.make.heldout=2000"],
    }
    post = svi.fit_config(ROOT / "conf" / config, [
        f"data.path={tmp_path}/data", "data.make.rows=20000", "data.make.files=2", "data.make.row_group_size=4000",
        f"checkpoint.dir={tmp_path}/ck", f"output.posterior={tmp_path}/post", "max_steps=1000",
        *smaller.get(config, [])])
    assert (tmp_path / "post" / "posterior.json").is_file()
    assert post.summary().shape[0] >= 2
    assert list_checkpoints(tmp_path / "ck")
    if config == "histograms.yaml":  # held out rows written beside the data and scored during the fit
        assert (tmp_path / "data-heldout").is_dir() and post.info.heldout_lpd


def test_bad_configs_name_the_key_or_path(tmp_path):
    conf = ROOT / "conf" / "quickstart.yaml"
    cases = [
        (["fit.famly=fullrank"], r"unknown config key 'fit.famly'; did you mean 'family'\?$"),
        (["famly=fullrank"], r"unknown key 'famly' in override 'famly=fullrank'; did you mean 'family'\?$"),
        (["zzz=1"], r"unknown key 'zzz' in override 'zzz=1'; top-level keys and fit options are .*max_steps"),
        (["tracking_uri=x"], r"override 'tracking_uri=x': tracking_uri is set as tracking.uri in a job config"),
        (["fit.max_steps=lots"], r"config key fit.max_steps='lots' is not allowed: a positive integer"),
        (["fit.family=gaussian"], r"config key fit.family='gaussian' is not allowed: one of auto, meanfield"),
        (["tracking.enabeld=false"], r"unknown config key 'tracking.enabeld': did you mean 'enabled'\?"),
        (["tracking.zzz=1"], r"unknown config key 'tracking.zzz': keys of 'tracking' are .*experiment"),
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
    version = _run(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"svi {svi.__version__}"
    with pytest.raises(OptionsError, match=r"unknown option 'max_step'; did you mean 'max_steps'"):
        FitOptions.from_dict({"max_step": 3})


def test_a_finished_job_run_again_does_nothing(tmp_path):
    job = [str(ROOT / "conf/quickstart.yaml"), f"data.path={tmp_path}/data", "data.make.rows=20000",
           "data.make.files=2", "data.make.row_group_size=5000", f"checkpoint.dir={tmp_path}/ck",
           f"output.posterior={tmp_path}/post", "batch_size=512", "tracking.experiment=rerun"]
    first = _run(["fit", *job], tmp_path)
    assert first.returncode == 0 and "converged" in first.stdout, first.stderr
    assert not list((tmp_path / "data").glob("*.json"))  # data folders hold data only
    assert pd.read_parquet(tmp_path / "data").shape[0] == 20000 and (tmp_path / "data.truth.json").is_file()
    checkpoints = [p.name for p in list_checkpoints(tmp_path / "ck")]
    again = _run(["fit", *job], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "holds a finished fit" in again.stdout and "nothing to do" in again.stdout
    assert [p.name for p in list_checkpoints(tmp_path / "ck")] == checkpoints  # not one more step
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rerun").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "quickstart"  # the same run, named after the job
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "elbo")]
    assert steps == sorted(set(steps))  # and not extended
    smoothed = client.get_metric_history(runs[0].info.run_id, "elbo_window_mean")
    assert len(smoothed) >= 2 and "stop_mean_move_sd" in runs[0].data.metrics
    same = pd.read_csv(tmp_path / "ck" / "outputs" / "summary.csv", index_col=0)
    assert len(f"{same.iloc[0]['sd']}".replace("0.", "").lstrip("0")) <= 7  # rounded, not 17 digits
    fresh = _run(["fit", *job, "resume=false"], tmp_path)  # resume=false: a new fit in a new run
    assert fresh.returncode == 0 and "holds a finished fit" not in fresh.stdout, fresh.stderr
    assert len(client.search_runs([client.get_experiment_by_name("rerun").experiment_id])) == 2


@pytest.mark.slow
@pytest.mark.parametrize("config", ["hierarchical.yaml", "hierarchical_sparse.yaml"])
def test_the_shipped_hierarchical_configs_converge_and_cover_the_truth(config, tmp_path, monkeypatch):
    # the configs as shipped (data size included): every hyper-parameter and group effect within 3 sd
    import numpy as np

    monkeypatch.chdir(tmp_path)
    post = svi.fit_config(ROOT / "conf" / config, [f"data.path={tmp_path}/data", f"checkpoint.dir={tmp_path}/ck",
                                                   f"output.posterior={tmp_path}/post", "tracking.enabled=false"])
    assert post.info.converged, post.info.reason
    table = post.summary(n=4000)
    for name, value in post.info.truth.items():
        arr = np.asarray(value, dtype=float).reshape(-1)
        rows = [name] if arr.size == 1 and name in table.index else [f"{name}[{i}]" for i in range(arr.size)]
        z = np.abs(table.loc[rows, "mean"].to_numpy() - arr) / table.loc[rows, "sd"].to_numpy()
        if arr.size <= 100:
            assert np.all(z < 3), (name, z[z >= 3])
        else:  # 1,000 group effects: a calibrated posterior puts ~0.27 % of them beyond 3 sd
            assert np.mean(z > 3) < 0.01 and z.max() < 4.5 and np.mean(z < 2) > 0.9, (name, np.sort(z)[-5:])


def test_resume_a_checkpoint_folder_given_as_an_fsspec_url(tmp_path, monkeypatch, capsys):
    import fsspec

    from svi.cli import build_parser

    monkeypatch.chdir(tmp_path)
    url = f"memory://svi-tests/{tmp_path.name}/ck"
    job = [f"data.path={tmp_path}/data", "data.make.rows=4000", "data.make.files=2", "data.make.row_group_size=1000",
           f"checkpoint.dir={url}", "checkpoint.every=100", f"output.posterior={tmp_path}/post", "max_steps=200",
           "tracking.enabled=false"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # 200 steps: "NOT converged" is expected
            svi.fit_config(ROOT / "conf" / "quickstart.yaml", job)
            assert fsspec.filesystem("memory").isfile(url.removeprefix("memory://") + "/job.yaml")
            args = build_parser().parse_args(["resume", url, "max_steps=300", "force_resume=true"])
            assert args.func(args) == 0
        out = capsys.readouterr().out
        assert f"resuming {url}: model svi.models:LogisticRegression from {url}/job.yaml" in out
        assert [str(p).rsplit("/", 1)[-1] for p in list_checkpoints(url)][-1] == "ckpt-000000300.pt"
        assert svi.load_posterior(tmp_path / "post").info.steps == 300
    finally:
        fsspec.filesystem("memory").rm(f"/svi-tests/{tmp_path.name}", recursive=True)
