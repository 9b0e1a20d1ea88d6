"""Data-parallel fits with real processes: torchrun, gloo, DDP, c10d rendezvous across two
"nodes" on 127.0.0.1, a real Dask scheduler and workers, a rank killed and restarted, a rank
that raises."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from svi.checkpoint import list_checkpoints
from svi.elbo import elbo
from svi.optim import make_optimizer
from svi.trainer import _noise_seed
from tests.ddp_reference import setup_problem
from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _torchrun(args, cwd, timeout=420, **kw):
    return subprocess.run(TORCHRUN + args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.parametrize("family", ["meanfield", "fullrank"])
def test_two_ranks_equal_one_process_averaging_both_estimators(tmp_path, family):
    steps = 9  # more than one epoch (7 steps), ragged last batch included
    out = tmp_path / "ddp.npy"
    run = _torchrun(["--standalone", "--nproc-per-node", "2", str(ROOT / "tests/ddp_worker.py"), str(out), family,
                     str(steps)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    # one process: the mean of the two ranks' estimators, on their batches, with their draws
    ctx, data, fam = setup_problem(family)
    o = ctx.options
    opt = make_optimizer("adam", fam.parameters(), lr=o.lr)
    streams = [data.stream(o.batch_size, o.seed, rank=r, world_size=2) for r in range(2)]
    gens = [torch.Generator().manual_seed(_noise_seed(o.seed, r)) for r in range(2)]
    for _ in range(steps):
        loss = 0.0
        for r in range(2):
            est = elbo(ctx.model, ctx.space, fam, next(streams[r]), ctx.num_rows, o.num_particles, gens[r],
                       antithetic=True)
            loss = loss - est.value / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    reference = torch.cat([p.detach().reshape(-1) for p in fam.parameters()]).numpy()
    assert np.allclose(np.load(out), reference, rtol=0, atol=1e-8)


def _conf_args(tmp_path, extra=()):
    return [str(ROOT / "conf/quickstart.yaml"), f"data.path={tmp_path}/data", "data.make.rows=40000",
            "data.make.files=4", "data.make.row_group_size=2500", f"checkpoint.dir={tmp_path}/ck",
            f"output.posterior={tmp_path}/post", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "batch_size=1024",
            *extra]


def _make_data(tmp_path):
    import svi.data.jobs as jobs

    jobs.write_synthetic(tmp_path / "data", "logistic", rows=40000, features=10, files=4, row_group_size=2500,
                         workers=1)


def test_two_nodes_with_c10d_rendezvous_complete_a_fit(tmp_path):
    _make_data(tmp_path)
    port = free_port()
    cmd = TORCHRUN + ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "svi-test", "-m", "svi", "fit",
                      *_conf_args(tmp_path)]
    nodes = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=420)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs[0][-3000:] + outs[1][-3000:]
    assert (tmp_path / "post" / "posterior.json").is_file()
    from svi.posterior import load_posterior

    info = load_posterior(tmp_path / "post").info
    assert info.world_size == 2 and info.num_rows == 40000
    # the fit report is printed once, by rank 0, and describes the posterior that was saved
    reports = [o for o in outs if re.search(r"^\d+ steps, (NOT )?converged: ", o, re.MULTILINE)]
    assert len(reports) == 1, outs[0][-3000:] + outs[1][-3000:]
    steps_line = f"\n{info.steps} steps, {'converged' if info.converged else 'NOT converged'}: {info.reason}\n"
    assert steps_line in reports[0], reports[0][-3000:]
    assert f"\n40,000 rows, batch {info.batch_size}, " in reports[0], reports[0][-3000:]


def test_a_real_dask_cluster_serves_the_reads_of_a_two_rank_fit(tmp_path):
    _make_data(tmp_path)
    port = free_port()
    bin_dir = Path(sys.executable).parent
    scheduler = subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", ":0"], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    workers = [subprocess.Popen([str(bin_dir / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                 "--dashboard-address", ":0", "--no-nanny"], cwd=tmp_path, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        run = _torchrun(["--standalone", "--nproc-per-node", "2", "-m", "svi", "fit",
                         *_conf_args(tmp_path, [f"data.scheduler=tcp://127.0.0.1:{port}"])], tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            seconds = client.run_on_scheduler(
                lambda dask_scheduler: {name: p.all_durations.get("compute", 0.0)
                                        for name, p in dask_scheduler.task_prefixes.items()})
        assert seconds.get("read_unit", 0.0) > 0, seconds  # the row groups were read on the workers
    finally:
        for p in workers + [scheduler]:
            p.kill()
            p.wait()


@pytest.mark.slow  # ~45 s: the elastic restart waits out torchrun's monitor interval and a new rendezvous
def test_kill_one_rank_under_max_restarts_resumes_to_the_same_posterior(tmp_path):
    _make_data(tmp_path)
    args = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "svi", "fit"]
    straight = _torchrun(["--standalone", "--nproc-per-node", "2", "-m", "svi", "fit",
                          *_conf_args(tmp_path / "straight", ["checkpoint.every=25", f"data.path={tmp_path}/data"])],
                         tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    agent = subprocess.Popen(TORCHRUN + args + _conf_args(tmp_path, ["checkpoint.every=25"]), cwd=tmp_path, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(list_checkpoints(tmp_path / "ck")) < 2 and time.time() < deadline and agent.poll() is None:
        time.sleep(0.05)
    assert agent.poll() is None, agent.stdout.read()[-3000:]
    workers = [p for p in psutil.Process(agent.pid).children() if p.environ().get("LOCAL_RANK") == "1"]
    assert len(workers) == 1, [p.cmdline() for p in psutil.Process(agent.pid).children(recursive=True)]
    workers[0].send_signal(signal.SIGKILL)  # rank 1 dies; torchrun restarts the group
    out = agent.communicate(timeout=420)[0]
    assert agent.returncode == 0, out[-3000:]
    from svi.posterior import load_posterior

    a, b = load_posterior(tmp_path / "post"), load_posterior(tmp_path / "straight" / "post")
    assert torch.allclose(a.family.mean, b.family.mean, atol=1e-6) and torch.allclose(a.family.stddev,
                                                                                    b.family.stddev, atol=1e-6)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "elbo")]
    assert steps == list(range(100, 100 * len(steps) + 1, 100))  # one continuous curve, no step twice


def test_a_rank_that_raises_brings_the_job_down_with_its_message(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _make_data(tmp_path)
    bad = tmp_path / "data" / "part-00003.parquet"
    table = pq.read_table(bad)
    x3 = table.column("x3").to_numpy().copy()
    x3[7000] = np.nan  # NaN is not a null: only the rank that reads this row group finds it
    pq.write_table(table.set_column(table.schema.get_field_index("x3"), "x3", pa.array(x3)), bad,
                   row_group_size=2500)
    started = time.time()
    run = _torchrun(["--standalone", "--nproc-per-node", "2", "-m", "svi", "fit", *_conf_args(tmp_path)], tmp_path,
                    timeout=300)
    assert run.returncode != 0
    assert "part-00003.parquet: column 'x3' has 1 NaN" in run.stdout + run.stderr
    assert time.time() - started < 240  # the job came down; nobody waited out a collective timeout
