"""Files never run code, user errors are one line: crafted posterior and job files whose payload
would create a file (it must not appear), resume refusals that leave the folder as it was,
and the errors a careless user causes (broken YAML, a model module that raises or exits, a full
disk, a model whose shape goes wrong late or whose likelihood has no gradient)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import svi
from svi.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from svi.imports import UntrustedModelError
from svi.model import ModelError
from svi.posterior import PosteriorFormatError, load_posterior, save_mlflow_model

ROOT = Path(__file__).resolve().parents[1]
SVI = [sys.executable, "-m", "svi"]

USER_MODEL = '''
import os
import torch
from torch.distributions import Normal
import svi

if os.environ.get("USERMOD_MARKER"):  # proves whether this module was imported, and by whom
    open(os.environ["USERMOD_MARKER"], "a").write("imported\\n")


class Line(svi.Model):
    batch_keys = ("x", "y")

    def __init__(self, n_features=2):
        self.params = {"w": svi.Param((n_features,)), "b": svi.Param(()),
                       "sigma": svi.Param((), svi.constraints.positive)}

    def log_prior(self, p):
        return Normal(0, 1).log_prob(p["w"]).sum(-1) + Normal(0, 5).log_prob(p["b"]) + Normal(0, 1).log_prob(p["sigma"])

    def log_likelihood(self, p, batch):
        mu = p["w"] @ batch["x"].T + p["b"][:, None]
        return Normal(mu, p["sigma"][:, None]).log_prob(batch["y"])

    def sample_obs(self, p, batch, generator=None):
        mu = p["w"] @ batch["x"].T + p["b"][:, None]
        return mu + p["sigma"][:, None] * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
'''


def _run(args, cwd, env=None):
    return subprocess.run(SVI + args, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _line_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    return {"x": x, "y": x @ np.array([1.0, -0.5]) + 0.2 + 0.3 * rng.normal(size=n)}


@pytest.fixture()
def usermod(tmp_path, monkeypatch):
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "usermod.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    sys.modules.pop("usermod", None)
    yield folder
    sys.modules.pop("usermod", None)


@pytest.fixture(scope="module")
def builtin_post():
    data = _line_data()
    model = svi.models.LinearRegression(2)
    return svi.fit(model, data, family="meanfield", max_steps=300), data


def _craft(folder: Path, cls: str, args) -> None:
    meta_file = folder / "posterior.json"
    meta = json.loads(meta_file.read_text())
    meta["model"]["class"], meta["model"]["args"], meta["model"]["kwargs"] = cls, args, {}
    meta_file.write_text(json.dumps(meta))


def test_a_posterior_file_naming_os_system_runs_nothing(builtin_post, tmp_path):
    post, data = builtin_post
    marker = tmp_path / "pwned"
    folder = post.save(tmp_path / "post")
    _craft(folder, "os:system", [f"touch {marker}"])
    loaded = load_posterior(folder)
    assert loaded.model is None and not marker.exists()
    a, b = post.sample(200, seed=3), loaded.sample(200, seed=3)  # the file alone describes q exactly
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(loaded.summary(n=500).index) == list(post.summary(n=500).index)
    assert set(loaded.to_arviz(n=100).posterior.data_vars) == {"w", "b", "sigma"}
    with pytest.raises(UntrustedModelError, match="prediction needs the model's code.*--trust os"):
        loaded.predict({"x": data["x"][:5]})
    # trusting the module does not help a file that names something other than a model class
    with pytest.raises(PosteriorFormatError, match="not an svi.Model class"):
        load_posterior(folder, trust=["os"])
    _craft(folder, "svi.models.glm:torch.save", [{"a": 1}, str(marker)])  # a function inside a trusted module
    with pytest.raises(PosteriorFormatError, match="not an svi.Model class"):
        load_posterior(folder)
    _craft(folder, "os:system", [f"touch {marker}"])
    for cmd in (["summary", str(folder)], ["sample", str(folder), "-n", "10", "-o", str(tmp_path / "d.parquet")]):
        res = _run(cmd, tmp_path)
        assert res.returncode == 0, res.stderr
    res = _run(["diagnose", str(folder), "--data", str(tmp_path / "none.parquet")], tmp_path)
    assert res.returncode == 2 and "needs the model's code" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()


def test_the_pyfunc_loader_imports_no_code_named_in_the_file(builtin_post, tmp_path):
    import mlflow.pyfunc

    post, data = builtin_post
    marker = tmp_path / "pwned"
    folder = save_mlflow_model(post, tmp_path / "model")
    _craft(folder / "artifacts" / "posterior", "os:system", [f"touch {marker}"])
    loaded = mlflow.pyfunc.load_model(str(folder))
    frame = pd.DataFrame(data["x"][:5], columns=["x0", "x1"])
    with pytest.raises(UntrustedModelError, match="SVI_TRUSTED_MODULES"):
        loaded.predict({"x": data["x"][:5]})
    assert not marker.exists() and len(frame) == 5


def test_a_user_model_is_imported_only_when_trusted(usermod, tmp_path, monkeypatch):
    import usermod as um

    data = _line_data()
    post = svi.fit(um.Line(2), data, family="meanfield", max_steps=300)
    folder = post.save(tmp_path / "post")
    marker = tmp_path / "imported"
    monkeypatch.setenv("USERMOD_MARKER", str(marker))
    sys.modules.pop("usermod", None)
    plain = load_posterior(folder)
    assert plain.model is None and not marker.exists()
    with pytest.raises(UntrustedModelError, match="--trust usermod"):
        plain.predict({"x": data["x"][:4]})
    trusted = load_posterior(folder, trust=["usermod"])
    assert marker.read_text() == "imported\n"
    want = post.predict({"x": data["x"][:4]}, n=300, seed=1)
    pd.testing.assert_frame_equal(trusted.predict({"x": data["x"][:4]}, n=300, seed=1), want)
    given = load_posterior(folder, model=um.Line(2))  # or the caller hands the model over
    pd.testing.assert_frame_equal(given.predict({"x": data["x"][:4]}, n=300, seed=1), want)
    with pytest.raises(PosteriorFormatError, match="does not match the parameters"):
        load_posterior(folder, model=um.Line(3))


def test_format_1_files_load_without_code(builtin_post, tmp_path):
    post, _ = builtin_post
    folder = post.save(tmp_path / "post")
    meta = json.loads((folder / "posterior.json").read_text())
    meta["format_version"] = 1  # what svi wrote before: constraints as their repr
    for name, block in zip(meta["space"], post.space.blocks):
        meta["space"][name]["constraint"] = repr(block.constraint)
    meta["model"]["class"] = "somewhere.unknown:Model"
    (folder / "posterior.json").write_text(json.dumps(meta))
    loaded = load_posterior(folder)
    a, b = post.sample(100, seed=1), loaded.sample(100, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta["space"]["sigma"]["constraint"] = "__import__('os').system('true')"
    (folder / "posterior.json").write_text(json.dumps(meta))
    with pytest.raises(PosteriorFormatError, match="vocabulary"):
        load_posterior(folder)


def _job(tmp_path: Path, extra=()) -> list[str]:
    return [str(ROOT / "conf/quickstart.yaml"), f"data.path={tmp_path}/data", "data.make.rows=20000",
            "data.make.files=2", "data.make.row_group_size=5000", "data.make.features=3", "model.args.n_features=3",
            f"checkpoint.dir={tmp_path}/ck", "checkpoint.every=50", f"output.posterior={tmp_path}/post",
            "batch_size=512", "max_steps=100", "warm_start_rows=2000", *extra]


def test_a_refused_resume_leaves_the_folder_as_it_was(tmp_path):
    fit = _run(["fit", *_job(tmp_path, ["tracking.enabled=false"])], tmp_path)
    assert fit.returncode == 0, fit.stderr
    job = tmp_path / "ck" / "job.yaml"
    before = job.read_bytes()
    refused = _run(["resume", str(tmp_path / "ck"), "lr=0.05"], tmp_path)
    assert refused.returncode == 2 and "cannot resume" in refused.stderr and "lr" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert job.read_bytes() == before
    again = _run(["resume", str(tmp_path / "ck")], tmp_path)  # the folder still resumes as it is
    assert again.returncode == 0, again.stderr
    assert f"resuming {tmp_path / 'ck'}: model svi.models:LogisticRegression from" in again.stdout


def test_resume_by_run_id_imports_no_code_the_server_names(usermod, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = _job(tmp_path, ["model.target=usermod:Line", "model.args={n_features: 3}", "data.columns={x: 'x*', y: y}",
                           "data.make.model=linear", f"tracking.uri={uri}"])
    fit = _run(["fit", *args], tmp_path)
    assert fit.returncode == 0, fit.stderr
    from mlflow.tracking import MlflowClient

    run_id = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("quickstart").experiment_id])[0].info.run_id
    marker = tmp_path / "imported"
    env = {"USERMOD_MARKER": str(marker)}
    refused = _run(["resume", run_id, "--tracking-uri", uri], tmp_path, env)
    assert refused.returncode == 2 and "--trust usermod" in refused.stderr, refused.stderr
    assert not marker.exists()
    trusted = _run(["resume", run_id, "--tracking-uri", uri, "--trust", "usermod"], tmp_path, env)
    assert trusted.returncode == 0, trusted.stderr
    assert marker.read_text() == "imported\n"


@pytest.mark.parametrize("case", ["yaml", "raises", "exits"])
def test_user_errors_are_one_line(case, usermod, tmp_path):
    config = tmp_path / "job.yaml"
    if case == "yaml":
        config.write_text("name: x\nmodel:\n  target: [unclosed\n")
        want = "is not valid YAML at line"
    else:
        body = "raise RuntimeError('boom at import')" if case == "raises" else "import sys; sys.exit(0)"
        (usermod / f"bad_{case}.py").write_text(body + "\n")
        config.write_text(f"name: x\nmodel: {{target: 'bad_{case}:M'}}\ndata: {{path: {tmp_path}/none}}\n"
                          "tracking: {enabled: false}\n")
        want = "boom at import" if case == "raises" else "called sys.exit(0)"
    res = _run(["fit", str(config)], tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert want in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_a_full_disk_while_checkpointing_is_a_clear_error_and_keeps_the_old_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.arange(5.0)})
    code = textwrap.dedent(f"""
        import resource, signal, torch
        from svi.checkpoint import CheckpointError, save_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG, as a full disk fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            save_checkpoint({str(tmp_path)!r}, 2, {{"x": torch.zeros(1_000_000)}})
        except CheckpointError as e:
            print(e)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "cannot write checkpoint" in res.stdout and "earlier checkpoints" in res.stdout, res.stderr
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "ckpt-000000001.pt" and torch.equal(state["x"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt"]  # no temporary left


def test_stale_temporaries_of_killed_writers_are_removed_at_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".ckpt-000000100.pt.{pid}.1234.tmp"
    live = tmp_path / f".job.yaml.{os.getpid()}.1.tmp"
    stale.write_bytes(b"torn")
    live.write_bytes(b"being written")
    svi.fit(svi.models.LinearRegression(2), _line_data(), max_steps=20, checkpoint_dir=str(tmp_path),
            checkpoint_every=10)
    assert not stale.exists() and live.exists()


class _LateShape(svi.Model):
    batch_keys = ("x", "y")

    def __init__(self):
        self.params = {"w": svi.Param((2,))}
        self.calls = 0

    def log_prior(self, p):
        return -0.5 * (p["w"] ** 2).sum(-1)

    def log_likelihood(self, p, batch):
        self.calls += 1
        ll = -0.5 * (batch["y"] - p["w"] @ batch["x"].T) ** 2
        return ll if self.calls < 50 else ll.sum(-1, keepdim=True)  # (S, 1): broadcasts silently


class _NoGradient(_LateShape):
    def log_likelihood(self, p, batch):
        w = p["w"].detach()
        return -0.5 * (batch["y"] - w @ batch["x"].T) ** 2


def test_a_shape_that_goes_wrong_late_and_a_likelihood_without_gradient_are_errors():
    data = _line_data(2000)
    with pytest.raises(ModelError, match=r"_LateShape.log_likelihood returned shape \(\d+, 1\)"):
        svi.fit(_LateShape(), data, batch_size=100, max_steps=500, warm_start="none")
    with pytest.raises(ModelError, match="no gradient"):
        svi.fit(_NoGradient(), data, batch_size=100, max_steps=50)


def test_a_spool_file_cannot_make_svi_upload_a_file_it_did_not_write(tmp_path):
    from svi.tracking import write_spool

    secret = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    secret.write_text("a key")
    folder = tmp_path / "ck"
    write_spool(folder / "unsent-mlflow-abc.jsonl", "abc", f"sqlite:///{tmp_path}/m.db",
                [{"op": "artifact", "path": str(secret), "artifact_path": None}])
    res = _run(["sync", str(folder)], tmp_path)
    assert res.returncode == 2 and "was not written by svi" in res.stderr and str(secret) in res.stderr
    assert not (tmp_path / "m.db").exists()  # refused before any store was opened


def test_a_spooled_registration_cannot_upload_a_folder_svi_did_not_write(tmp_path):
    from svi.tracking import TrackingError, read_spool, write_spool

    elsewhere = tmp_path.parent / f"{tmp_path.name}-home"
    elsewhere.mkdir()
    spool = tmp_path / "ck" / "unsent-mlflow-abc.jsonl"
    mine = {"op": "register", "name": "m", "path": str(tmp_path / "ck" / "outputs" / "posterior")}
    write_spool(spool, "abc", f"sqlite:///{tmp_path}/m.db", [mine])
    assert read_spool(spool)[1] == [mine]  # the outputs beside the spool are svi's
    write_spool(spool, "abc", f"sqlite:///{tmp_path}/m.db", [{**mine, "path": str(elsewhere)}])
    with pytest.raises(TrackingError, match="asks to upload .*home.*was not written by svi"):
        read_spool(spool)


def test_posterior_tensors_that_are_not_a_gaussian_are_refused(tmp_path):
    """A posterior file's tensors are data: a NaN, a frame factor that is not lower-triangular, or a
    control-variate buffer of a shape no fit writes would make draws or densities lie; each is
    refused with the tensor named."""
    from safetensors.torch import load_file, save_file

    from svi.families import Structured
    from svi.posterior import Posterior
    from svi.transforms import ParamSpace

    model = svi.models.HierarchicalLinearRegression(2, 3)
    space = ParamSpace(model.get_params(), model.name)
    fam = Structured(space.size, dtype=torch.float64, layout=space.group_layout())
    a = torch.randn(space.size, space.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fam.set_frame(torch.zeros(space.size, dtype=torch.float64), torch.linalg.cholesky(a @ a.T + torch.eye(space.size)))
    folder = Posterior(model, space, fam, {}).save(tmp_path / "post")
    assert load_posterior(folder).family.covariance().shape == (space.size, space.size)  # the file as written loads
    tensor_file = next(Path(folder).glob("*.safetensors"))
    good = load_file(str(tensor_file))
    for key, change, message in [
        ("loc", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "loc is not finite"),
        ("frame_population", lambda t: t + torch.triu(torch.ones_like(t), 1), "frame_population has entries above"),
        ("frame_group_0", lambda t: -t, "frame_group_0 has a diagonal entry that is not positive"),
        ("frame_expansion", lambda t: torch.zeros(3, dtype=t.dtype), "frame_expansion has shape"),
    ]:
        save_file({**good, key: change(good[key]).contiguous()}, str(tensor_file))
        with pytest.raises(PosteriorFormatError, match=message):
            load_posterior(folder)
