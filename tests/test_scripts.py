"""Launchers and URLs as a cluster user meets them: the Dask cluster script started for real from
the Python that has svi, the SLURM scripts parsed by bash, posteriors saved to and loaded from
fsspec URLs."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import svi
from svi.posterior import PosteriorFormatError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["slurm.sbatch", "slurm_gpu.sbatch", "dask_cluster.sh", "launch_local.sh",
                                    "mlflow_ui.sh", "setup.sh"])
def test_launchers_parse(script):
    res = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_the_dask_cluster_script_serves_workers(tmp_path):
    from distributed import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHON": sys.executable, "DASK_HOST": "127.0.0.1", "DASK_PORT": str(port),
           "DASK_THREADS": "1", "PATH": "/usr/bin:/bin"}  # no venv on PATH: the script must find Python itself
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "dask_cluster.sh"), "2"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_posteriors_round_trip_through_fsspec_urls(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 2))
    post = svi.fit(svi.models.LinearRegression(2), {"x": x, "y": x @ [1.0, 2.0] + rng.normal(size=500)},
                   max_steps=200, khat_rows=0)
    for url in ("memory://svi-test/post", f"file://{tmp_path}/post"):
        assert post.save(url) == url
        loaded = svi.load_posterior(url)
        a, b = post.sample(100, seed=2), loaded.sample(100, seed=2)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PosteriorFormatError, match="cannot fetch memory://svi-test/nothing"):
        svi.load_posterior("memory://svi-test/nothing")
