"""Checkpoints: resume equals no resume, crashes never leave a torn checkpoint, damaged
files are refused whole, incompatible resumes are refused with the differences listed."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import svi
from svi.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from svi.data.jobs import write_synthetic

ROOT = Path(__file__).resolve().parents[1]


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 3))
    y = (rng.random(3000) < 1 / (1 + np.exp(-(x @ [1.0, -1.0, 0.5])))).astype(float)
    return {"x": x, "y": y}


def _fit(data, folder, max_steps, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "reached max_steps" is expected here
        kw = {"family": "fullrank", **kw}
        return svi.fit(svi.models.LogisticRegression(3), data, batch_size=256, max_steps=max_steps,
                       tol_param=1e-6, checkpoint_dir=str(folder), checkpoint_every=100, **kw)


def _same(a, b):
    for p, q in zip(a.family.parameters(), b.family.parameters()):
        assert torch.equal(p, q)
    assert a.info.history == b.info.history


@pytest.mark.parametrize("source", ["memory", "parquet"])
def test_resume_equals_no_resume(tmp_path, source):
    if source == "memory":
        data, extra = _data(), {}
    else:
        meta = write_synthetic(tmp_path / "pq", "logistic", rows=3000, features=3, files=2, row_group_size=500,
                               workers=1)
        data, extra = str(tmp_path / "pq"), dict(columns=meta["columns"], in_memory_rows=0,
                                                 cache_dir=str(tmp_path / "cache"))
    straight = _fit(data, tmp_path / "a", 650, **extra)
    _fit(data, tmp_path / "b", 250, **extra)  # "stops" at step 250 (not a window or checkpoint boundary)
    assert [p.name for p in list_checkpoints(tmp_path / "b")][-1] == "ckpt-000000250.pt"
    resumed = _fit(data, tmp_path / "b", 650, resume=True, force_resume=True, **extra)
    assert resumed.info.steps == straight.info.steps == 650
    _same(straight, resumed)


@pytest.mark.parametrize("family", ["fullrank", pytest.param("structured", marks=pytest.mark.slow)])
def test_resume_equals_no_resume_across_a_reexpansion(tmp_path, caplog, family):
    """From a warm start on 40 rows q travels, and the quadratic control variate is re-expanded
    (fullrank re-frames and resets Adam): a resume before and after that still matches."""
    data, kw = _data(), dict(warm_start_rows=40, family=family, newton_start=False)
    with caplog.at_level("INFO", logger="svi"):
        straight = _fit(data, tmp_path / "a", 300, **kw)
    assert any("step 100: quadratic control variate re-expanded" in r.getMessage() for r in caplog.records)
    for stop in (50, 150):  # a checkpoint before the re-expansion, and one after it
        _fit(data, tmp_path / f"b{stop}", stop, **kw)
        resumed = _fit(data, tmp_path / f"b{stop}", 300, resume=True, force_resume=True, **kw)
        _same(straight, resumed)


def test_a_crash_between_write_and_rename_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 100, {"x": torch.ones(3)})

    def crash(tmp):
        assert tmp.exists() and tmp.stat().st_size > 0
        raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 200, {"x": torch.zeros(3)}, before_replace=crash)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000100.pt"]  # no torn file, no stray temp file
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "ckpt-000000100.pt" and torch.equal(state["x"], torch.ones(3))


def test_damaged_checkpoints_are_refused_whole(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.arange(5.0)})
    good = save_checkpoint(tmp_path, 2, {"x": torch.arange(5.0) * 2})
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt-000000002\.pt is damaged \(checksum mismatch"):
        load_checkpoint(good)
    with pytest.warns(RuntimeWarning, match=r"skipping a damaged checkpoint.*ckpt-000000002\.pt.*resuming from "
                                             r"ckpt-000000001\.pt"):
        path, state = latest_checkpoint(tmp_path)  # the damaged newest one is skipped, loudly
    assert path.name == "ckpt-000000001.pt" and torch.equal(state["x"], torch.arange(5.0))
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF
    good.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(good)
    (tmp_path / "ckpt-000000001.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no valid checkpoint.*bad header"):
        latest_checkpoint(tmp_path)


def test_keeps_the_last_k(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, {"s": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000040.pt", "ckpt-000000050.pt"]


def test_incompatible_resumes_are_refused_with_the_differences(tmp_path):
    data = _data()
    _fit(data, tmp_path, 200)
    with pytest.raises(CheckpointError, match=r"options differ: family: 'fullrank' -> 'meanfield'"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            svi.fit(svi.models.LogisticRegression(3), data, family="meanfield", batch_size=256, max_steps=200,
                    tol_param=1e-6, checkpoint_dir=str(tmp_path), resume=True)
    other = {"x": data["x"][:2000], "y": data["y"][:2000]}
    with pytest.raises(CheckpointError, match="the data differs"):
        _fit(other, tmp_path, 200, resume=True)
    with pytest.raises(CheckpointError, match=r"max_steps: 200 -> 400 \(safe to change: pass force_resume=true") as e:
        _fit(data, tmp_path, 400, resume=True, compile=True)
    assert "compile" not in str(e.value)
    # options that change only the speed are not compared: the resume finds the fit finished
    assert _fit(data, tmp_path, 200, resume=True, compile=True, compile_after=7, threads=1, prefetch=2,
                newton_start=False).info.steps == 200
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        _fit(data, tmp_path / "empty", 200, resume=True)
    before = load_checkpoint(list_checkpoints(tmp_path)[-1])
    (list_checkpoints(tmp_path)[-1]).write_bytes(b"SVICKPT1" + b"0" * 70)
    # the damaged newest checkpoint is skipped and the previous one resumes
    resumed = _fit(data, tmp_path, 200, resume=True)
    assert resumed.info.steps == 200 and before["ranks"][0]["state"]["step"] == 200


def test_kill_minus_nine_mid_fit_then_resume_matches_an_uninterrupted_fit(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent(f"""
        import sys, numpy as np, svi, warnings
        warnings.simplefilter("ignore")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(20000, 5)); y = (rng.random(20000) < 1 / (1 + np.exp(-(x @ np.ones(5))))).astype(float)
        post = svi.fit(svi.models.LogisticRegression(5), {{"x": x, "y": y}}, family="fullrank", batch_size=1024,
                       max_steps=1500, tol_param=1e-6, checkpoint_dir=sys.argv[1], checkpoint_every=50,
                       resume="auto", warm_start="none", control_variate=False)
        np.save(sys.argv[2], np.concatenate([p.detach().numpy().ravel() for p in post.family.parameters()]))
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck"), str(tmp_path / "a.npy")], env=env)
    deadline = time.time() + 120
    while len(list_checkpoints(tmp_path / "ck")) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the fit ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    path, state = latest_checkpoint(tmp_path / "ck")  # whatever moment the kill hit, one verifies
    killed_at = state["ranks"][0]["state"]["step"]
    assert 0 < killed_at < 1500
    subprocess.run([sys.executable, str(script), str(tmp_path / "ck"), str(tmp_path / "a.npy")], env=env, check=True)
    subprocess.run([sys.executable, str(script), str(tmp_path / "ck2"), str(tmp_path / "b.npy")], env=env, check=True)
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


# --- checkpoint folders as fsspec URLs ------------------------------------------------------------
@pytest.fixture
def memory_url(tmp_path):
    """A folder of fsspec's in-process memory file system, removed afterwards (the store is global)."""
    import fsspec

    url = f"memory://svi-tests/{tmp_path.name}/ck"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/svi-tests/{tmp_path.name}"):
        fs.rm(f"/svi-tests/{tmp_path.name}", recursive=True)


def test_a_remote_folder_resumes_to_the_parameters_of_a_straight_run(tmp_path, memory_url, monkeypatch):
    import fsspec
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the embedded MLflow store, and the spool of a remote folder, land here
    data = _data()
    straight = _fit(data, tmp_path / "a", 650)
    first = _fit(data, memory_url, 250, tracking=True)
    assert list_checkpoints(memory_url)[-1] == f"{memory_url}/ckpt-000000250.pt"
    fs = fsspec.filesystem("memory")
    root = memory_url.removeprefix("memory://")
    assert fs.cat_file(f"{root}/mlflow_run_id").decode() == first.info.run_id  # beside the checkpoints
    resumed = _fit(data, memory_url, 650, resume=True, force_resume=True, tracking=True)
    assert resumed.info.steps == straight.info.steps == 650
    _same(straight, resumed)
    assert resumed.info.run_id == first.info.run_id  # the run goes on, found through the remote marker
    assert [_name(p) for p in list_checkpoints(memory_url)] == ["ckpt-000000500.pt", "ckpt-000000600.pt",
                                                                "ckpt-000000650.pt"]  # keep_checkpoints=3
    assert not any(".tmp" in p for p in fs.ls(root, detail=False))
    run = MlflowClient("sqlite:///mlflow.db").get_run(first.info.run_id)
    assert run.data.tags["svi.checkpoint_dir"] == memory_url  # where the checkpoints are, as given
    # the finished fit's posterior is beside its checkpoints: running the job again trains nothing
    assert fs.isfile(f"{root}/posterior/posterior.json")
    written = fs.modified(f"{root}/ckpt-000000650.pt")
    again = _fit(data, memory_url, 650, resume=True, force_resume=True)
    assert fs.modified(f"{root}/ckpt-000000650.pt") == written  # no step, no new checkpoint
    assert all(torch.equal(p, q) for p, q in zip(again.family.parameters(), resumed.family.parameters()))
    assert again.info.steps == 650 and [tuple(h) for h in again.info.history] == resumed.info.history
    assert [_name(p) for p in list_checkpoints(memory_url)][-1] == "ckpt-000000650.pt"


def _name(path) -> str:
    return str(path).rsplit("/", 1)[-1]


def test_remote_checkpoints_are_atomic_kept_last_k_and_verified(memory_url, monkeypatch):
    import fsspec

    from svi.checkpoint import remove_stale_temporaries

    fs, root = fsspec.filesystem("memory"), memory_url.removeprefix("memory://")
    for step in range(1, 6):
        save_checkpoint(memory_url, step * 10, {"s": torch.tensor(step)}, keep=2)
    assert list_checkpoints(memory_url) == [f"{memory_url}/ckpt-000000040.pt", f"{memory_url}/ckpt-000000050.pt"]

    def crash(tmp):
        assert fs.size(tmp.removeprefix("memory://")) > 0 and not fs.exists(f"{root}/ckpt-000000060.pt")
        raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(memory_url, 60, {"s": torch.tensor(6)}, keep=2, before_replace=crash)
    assert sorted(map(_name, fs.ls(root, detail=False))) == ["ckpt-000000040.pt", "ckpt-000000050.pt"]
    path, state = latest_checkpoint(memory_url)
    assert path == f"{memory_url}/ckpt-000000050.pt" and int(state["s"]) == 5
    raw = fs.cat_file(f"{root}/ckpt-000000050.pt")
    fs.pipe_file(f"{root}/ckpt-000000050.pt", raw[: len(raw) // 2])  # a torn upload under the final name
    with pytest.warns(RuntimeWarning, match=r"ckpt-000000050\.pt is damaged.*resuming from ckpt-000000040\.pt"):
        path, state = latest_checkpoint(memory_url)
    assert int(state["s"]) == 4
    # temporaries of killed writers: this machine's by their process, another machine's by their age
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from svi.checkpoint import _host_tag

    mine = f"{root}/.ckpt-000000070.pt.{_host_tag()}-{int(dead.stdout)}.1.tmp"
    live = f"{root}/.ckpt-000000070.pt.{_host_tag()}-{os.getpid()}.1.tmp"
    other = f"{root}/.ckpt-000000070.pt.othernode-{os.getpid()}.1.tmp"
    for p in (mine, live, other):
        fs.pipe_file(p, b"partial")
    assert remove_stale_temporaries(memory_url) == [f"{memory_url}/{_name(mine)}"]
    monkeypatch.setattr("svi.checkpoint.REMOTE_STALE_SECONDS", 0.0)
    assert remove_stale_temporaries(memory_url) == [f"{memory_url}/{_name(other)}"]
    assert fs.exists(live)


def test_file_urls_take_the_local_path_and_unknown_protocols_name_the_option(tmp_path):
    path = save_checkpoint(f"file://{tmp_path}/ck", 10, {"x": torch.ones(2)})
    assert path == tmp_path / "ck" / "ckpt-000000010.pt"  # os.replace and fsync, as for a folder
    assert latest_checkpoint(f"file://{tmp_path}/ck")[0] == path
    with pytest.raises(svi.options.OptionsError, match=r"option checkpoint_dir='nosuch://bucket/ck' is not "
                                                       r"allowed: unknown protocol 'nosuch'"):
        _fit(_data(), "nosuch://bucket/ck", 10)
    with pytest.raises(CheckpointError, match=r"cannot use 'nosuch://x' as a checkpoint folder: unknown protocol"):
        save_checkpoint("nosuch://x", 1, {})
