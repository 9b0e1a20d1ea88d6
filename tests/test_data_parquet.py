"""Parquet streaming: exactly-once epochs across ranks, exact resume, clear errors, filters,
statistics, a real Dask cluster, and a streaming fit that matches the in-memory one."""

import json
import math
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import svi
from svi.data import DataError
from svi.data.jobs import csv_to_parquet, data_stats, write_synthetic
from svi.data.parquet import ParquetSource


def _write(path, columns: dict, row_groups: list[int]):
    table = pa.table(columns)
    with pq.ParquetWriter(path, table.schema) as w:
        start = 0
        for n in row_groups:
            w.write_table(table.slice(start, n))
            start += n
    assert start == table.num_rows


@pytest.fixture
def ragged(tmp_path):
    """Three files, row groups of unequal sizes, an id per row."""
    sizes = [[7, 3, 11], [5], [13, 2, 1]]
    start = 0
    for i, groups in enumerate(sizes):
        n = sum(groups)
        ids = np.arange(start, start + n)
        _write(tmp_path / f"part-{i}.parquet", {"id": ids, "v": ids.astype(np.float64) / 10}, groups)
        start += n
    return tmp_path, start


def _source(folder, **kw):
    return ParquetSource(str(folder), {"id": "id", "v": "v"}, integer_keys=("id",), cache_dir=folder / ".cache", **kw)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_row_once_per_epoch_across_ranks(ragged, world_size):
    folder, total = ragged
    src = _source(folder)
    seen_epochs = []
    for epoch in range(2):
        ids, steps = [], set()
        for rank in range(world_size):
            stream = src.stream(batch_size=4, seed=11, rank=rank, world_size=world_size)
            stream.load_state_dict({"epoch": epoch, "batch": 0, "world_size": world_size,
                                    "full_batches": world_size == 1})
            n = stream.steps_per_epoch
            steps.add(n)
            for _ in range(n):
                b = next(stream)
                assert b["id"].dtype == torch.int64 and b["v"].dtype == torch.float32
                assert torch.allclose(b["v"], b["id"].float() / 10)
                ids += b["id"].tolist()
        assert len(steps) == 1  # every rank takes the same number of steps
        assert sorted(ids) == list(range(total))
        seen_epochs.append(ids)
    assert seen_epochs[0] != seen_epochs[1]  # a new shuffle each epoch
    src.close()


def test_one_process_cuts_full_batches_and_the_rest_last(ragged):
    """One process streams batches of batch_size rows and a last one with the rest (the shape the
    compiled step is built for: with nearly equal batches of 41 rows into 4 steps no batch had
    it); a stream resumed from a checkpoint that predates this keeps its nearly equal batches."""
    folder, total = ragged  # 42 rows
    src = _source(folder)
    stream = src.stream(batch_size=11, seed=3)
    sizes = [len(next(stream)["id"]) for _ in range(2 * stream.steps_per_epoch)]
    assert sizes == [11, 11, 11, 9] * 2
    old = src.stream(batch_size=11, seed=3)
    old.load_state_dict({"epoch": 0, "batch": 1, "seed": 3, "rank": 0, "world_size": 1})  # no "full_batches"
    assert [len(next(old)["id"]) for _ in range(3)] == [11, 10, 10]  # 42 rows in 4: 11, 11, 10, 10
    src.close()


def test_batches_mix_row_groups(ragged):
    folder, _ = ragged
    src = _source(folder)
    stream = src.stream(batch_size=8, seed=0, shuffle_units=3)
    unit_of = {}
    for u in src.units:
        table = pq.ParquetFile(src.files[u.file]).read_row_group(u.row_group, columns=["id"])
        unit_of.update({int(i): (u.file, u.row_group) for i in table.column("id").to_numpy()})
    mixed = [len({unit_of[int(i)] for i in next(stream)["id"]}) > 1 for _ in range(stream.steps_per_epoch)]
    assert sum(mixed) >= len(mixed) // 2
    src.close()


def test_rows_within_a_row_group_come_in_a_fresh_random_order_each_epoch(tmp_path):
    ids = np.arange(200)
    _write(tmp_path / "one.parquet", {"id": ids, "v": ids / 10}, [200])  # one row group: no interleaving
    src = _source(tmp_path)
    stream = src.stream(batch_size=50, seed=3, shuffle_units=1)
    epochs = [torch.cat([next(stream)["id"] for _ in range(stream.steps_per_epoch)]).tolist() for _ in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(200))
        assert order != list(range(200))
        # a uniform permutation has about 200/2 ascents out of 199; file order would have 199
        assert 70 < sum(a < b for a, b in zip(order, order[1:])) < 130
    assert epochs[0] != epochs[1]
    src.close()


def test_resume_mid_epoch_yields_the_same_batches(ragged):
    folder, _ = ragged
    src = _source(folder)
    straight = src.stream(batch_size=3, seed=5, rank=1, world_size=2)
    expected = [next(straight)["id"].tolist() for _ in range(25)]  # crosses an epoch boundary
    first = src.stream(batch_size=3, seed=5, rank=1, world_size=2)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive serialisation
    resumed = src.stream(batch_size=3, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert [next(resumed)["id"].tolist() for _ in range(18)] == expected[7:]
    with pytest.raises(DataError, match="saved with 2 ranks; this run has 3"):
        src.stream(batch_size=3, seed=5, rank=0, world_size=3).load_state_dict(state)
    src.close()


def test_errors_name_the_file_and_the_column(tmp_path):
    good = {"x": np.arange(5.0), "y": np.arange(5.0)}
    _write(tmp_path / "a.parquet", good, [5])
    _write(tmp_path / "b.parquet", {"x": np.arange(5.0)}, [5])
    with pytest.raises(DataError, match=r"b\.parquet has no column 'y' \(batch key 'y'\)"):
        ParquetSource(str(tmp_path), {"x": "x", "y": "y"})
    os.remove(tmp_path / "b.parquet")
    _write(tmp_path / "c.parquet", {"x": np.arange(5.0), "y": np.array(list("abcde"))}, [5])
    with pytest.raises(DataError, match=r"c\.parquet: column 'y' \(batch key 'y'\) has type string, not a number"):
        ParquetSource(str(tmp_path), {"x": "x", "y": "y"})
    os.remove(tmp_path / "c.parquet")
    _write(tmp_path / "d.parquet", {"x": np.arange(5.0), "y": pa.array([1.0, None, 2.0, None, 3.0])}, [5])
    with pytest.raises(DataError, match=r"d\.parquet: column 'y' has 2 null values.*nan_policy='drop'"):
        ParquetSource(str(tmp_path), {"x": "x", "y": "y"})
    os.remove(tmp_path / "d.parquet")
    _write(tmp_path / "e.parquet", {"x": np.array([1.0, np.nan, 2.0, np.nan, np.nan]), "y": np.arange(5.0)}, [5])
    src = ParquetSource(str(tmp_path), {"x": "x", "y": "y"})
    with pytest.raises(DataError, match=r"e\.parquet: column 'x' has 3 NaN, infinite or null values"):
        list(src.chunks())
    src.close()
    os.remove(tmp_path / "e.parquet")
    _write(tmp_path / "f.parquet", {"x": np.zeros(0), "y": np.zeros(0)}, [0])
    with pytest.raises(DataError, match=r"f\.parquet has no rows"):
        ParquetSource(str(tmp_path), {"x": "x", "y": "y"})
    os.remove(tmp_path / "f.parquet")
    with pytest.raises(DataError, match="no Parquet file matches"):
        ParquetSource(str(tmp_path / "nothing-*.parquet"), {"x": "x"})


def test_a_file_that_vanishes_mid_run_is_named(tmp_path):
    for i in range(3):
        _write(tmp_path / f"p{i}.parquet", {"x": np.arange(10.0), "y": np.arange(10.0)}, [5, 5])
    src = ParquetSource(str(tmp_path), {"x": "x", "y": "y"})
    stream = src.stream(batch_size=4, seed=0, shuffle_units=1, prefetch=1)
    next(stream)
    for i in range(3):
        os.remove(tmp_path / f"p{i}.parquet")
    with pytest.raises(DataError, match=r"p\d\.parquet vanished during the run"):
        for _ in range(20):
            next(stream)
    src.close()


def test_row_filter_and_nan_drop_count_rows_once_and_cache_them(tmp_path):
    x = np.arange(100.0)
    x[[3, 50]] = np.nan
    _write(tmp_path / "a.parquet", {"x": x, "y": np.arange(100.0)}, [30, 70])
    cache = tmp_path / "cache"
    src = ParquetSource(str(tmp_path / "a.parquet"), {"x": "x", "y": "y"}, nan_policy="drop",
                        row_filter=[("y", ">=", 40)], cache_dir=cache)
    assert src.num_rows == 59 and src.dropped_rows == 41  # y >= 40 keeps 60, one of them has NaN x
    assert len(list(cache.glob("counts-*.json"))) == 1
    rows = torch.cat([c["y"] for c in src.chunks()])
    assert rows.min() >= 40 and len(rows) == 59 and 50.0 not in rows.tolist()
    again = ParquetSource(str(tmp_path / "a.parquet"), {"x": "x", "y": "y"}, nan_policy="drop",
                          row_filter=[("y", ">=", 40)], cache_dir=cache)
    assert again.num_rows == 59


def test_full_data_statistics_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 2))
    g = rng.integers(0, 4, size=1000)
    _write(tmp_path / "a.parquet", {"x0": x[:600, 0], "x1": x[:600, 1], "g": g[:600]}, [100, 500])
    _write(tmp_path / "b.parquet", {"x0": x[600:, 0], "x1": x[600:, 1], "g": g[600:]}, [400])
    src = ParquetSource(str(tmp_path), {"x": "x*", "g": "g"}, integer_keys=("g",), cache_dir=tmp_path / "c")
    stats = data_stats(src)
    for j in range(2):
        c = stats["columns"][f"x{j}"]
        assert c["n"] == 1000 and c["nan"] == 0
        assert math.isclose(c["mean"], x[:, j].mean(), rel_tol=1e-12)
        assert math.isclose(c["sd"], x[:, j].std(ddof=1), rel_tol=1e-10)
        assert c["min"] == x[:, j].min() and c["max"] == x[:, j].max()
    ids, counts = np.unique(g, return_counts=True)
    assert stats["groups"]["g"] == {str(i): int(k) for i, k in zip(ids, counts)}
    assert data_stats(src) == stats and list((tmp_path / "c").glob("stats-*.json"))


def test_csv_to_parquet_round_trip(tmp_path):
    df = pd.DataFrame({"a": np.arange(1000), "b": np.linspace(0, 1, 1000)})
    df.iloc[:500].to_csv(tmp_path / "one.csv", index=False)
    df.iloc[500:].to_csv(tmp_path / "two.csv", index=False)
    rows = csv_to_parquet(str(tmp_path / "*.csv"), tmp_path / "out", row_group_size=128)
    assert rows == 1000
    back = pd.read_parquet(tmp_path / "out").sort_values("a").reset_index(drop=True)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


def test_reads_through_a_real_dask_cluster_match_local_reads(ragged):
    from distributed import LocalCluster

    folder, total = ragged
    local = _source(folder)
    stream_l = local.stream(4, seed=2)
    expected = [next(stream_l) for _ in range(12)]  # one epoch of the 42 rows (11 batches) and one more batch
    first_epoch = torch.cat([b["id"] for b in expected[:11]])
    assert sorted(first_epoch.tolist()) == list(range(total)) and len(expected[11]["id"]) == 4
    assert all(torch.equal(b["v"], (b["id"].double() / 10).to(b["v"].dtype)) for b in expected)  # each row's own v
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = _source(folder, scheduler=cluster.scheduler_address)
        stream_r = remote.stream(4, seed=2)
        got = [next(stream_r) for _ in range(12)]
        remote.close()
    local.close()
    for a, b in zip(expected, got):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["v"], b["v"]), (a["id"], b["id"])


def test_streaming_fit_recovers_the_truth_and_matches_the_in_memory_fit(tmp_path):
    meta = write_synthetic(tmp_path / "data", "logistic", rows=120_000, features=4, files=3, row_group_size=8192,
                           seed=3, workers=1)
    columns = meta["columns"]
    model = svi.models.LogisticRegression(4)
    streamed = svi.fit(model, str(tmp_path / "data"), family="fullrank", columns=columns, batch_size=2048,
                       in_memory_rows=0, cache_dir=str(tmp_path / "cache"))
    table = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "data").glob("*.parquet"))])
    x = np.stack([table.column(f"x{j}").to_numpy() for j in range(4)], 1)
    memory = svi.fit(model, {"x": x, "y": table.column("y").to_numpy()}, family="fullrank", batch_size=2048)
    assert streamed.info.converged and memory.info.converged
    sd = memory.family.stddev.double()
    diff = (streamed.family.mean.double() - memory.family.mean.double()).abs() / sd
    assert diff.max() < 0.1, diff
    truth = np.r_[meta["truth"]["w"], meta["truth"]["b"]]
    z = (streamed.family.mean.double().numpy() - truth) / streamed.family.stddev.double().numpy()
    assert np.abs(z).max() < 3, z
    assert streamed.info.num_rows == 120_000


def test_standardize_uses_full_data_statistics(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(50.0, 10.0, size=(4000, 2))
    y = (rng.random(4000) < 1 / (1 + np.exp(-(x[:, 0] - 50) / 10))).astype(float)
    _write(tmp_path / "a.parquet", {"x0": x[:, 0], "x1": x[:, 1], "y": y}, [1000] * 4)
    model = svi.models.LogisticRegression(2)
    streamed = svi.fit(model, str(tmp_path / "a.parquet"), columns={"x": "x*", "y": "y"}, standardize=["x"],
                       in_memory_rows=0, batch_size=500, cache_dir=str(tmp_path / "c"))
    xs = (x - x.mean(0)) / x.std(0, ddof=1)
    memory = svi.fit(model, {"x": xs, "y": y}, batch_size=500)
    diff = (streamed.family.mean.double() - memory.family.mean.double()).abs() / memory.family.stddev.double()
    assert diff.max() < 0.1, diff
    with pytest.raises(DataError, match="standardize names key 'z'"):
        svi.fit(model, str(tmp_path / "a.parquet"), columns={"x": "x*", "y": "y"}, standardize=["z"])


class ThreadsSeen(svi.Model):
    """A Gaussian mean that records torch's intra-op thread count at every likelihood call."""

    batch_keys = ("v",)

    def __init__(self):
        self.params = {"m": svi.Param(())}
        self.seen = set()

    def log_prior(self, p):
        return -0.5 * p["m"] ** 2

    def log_likelihood(self, p, batch):
        self.seen.add(torch.get_num_threads())
        return -0.5 * (batch["v"] - p["m"].unsqueeze(-1)) ** 2


def test_streaming_leaves_a_core_to_the_readers_and_restores_torch_threads(ragged):
    folder, _ = ragged
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fits = {}
        for name, kw in {"streamed": dict(in_memory_rows=0), "in memory": {},
                         "streamed, threads=2": dict(in_memory_rows=0, threads=2)}.items():
            model = ThreadsSeen()
            svi.fit(model, str(folder), columns={"v": "v"}, batch_size=4, max_steps=30, warm_start="none",
                    cache_dir=str(folder / ".cache"), **kw)
            fits[name] = model.seen
            assert torch.get_num_threads() == 2  # the caller's setting is back
        assert fits == {"streamed": {1}, "in memory": {2}, "streamed, threads=2": {2}}
        with pytest.raises(svi.options.OptionsError, match="option threads=0 is not allowed: a positive integer"):
            svi.fit(ThreadsSeen(), str(folder), columns={"v": "v"}, threads=0)
    finally:
        torch.set_num_threads(before)
