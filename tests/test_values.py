"""Values a model cannot take stop a fit with an error naming where they are (issue 13, item 5),
and the caches beside the data are keyed by file identity and checked before use (item 6).

Real Parquet files written with pyarrow, real fits, a real ``svi fit`` process."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.distributions import Exponential

import svi
from svi.data import DataError
from svi.data.jobs import data_stats
from svi.data.parquet import ParquetSource

pytestmark = pytest.mark.filterwarnings("ignore:svi. reached max_steps:RuntimeWarning")  # short fits on purpose
FAST = dict(max_steps=30, warm_start="none", tracking=False, batch_size=64)


def _write(path, columns: dict, row_groups: list[int], **kw):
    table = pa.table(columns)
    with pq.ParquetWriter(path, table.schema, **kw) as w:
        start = 0
        for n in row_groups:
            w.write_table(table.slice(start, n))
            start += n
    assert start == table.num_rows


def _logistic_rows(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    y = (rng.random(n) < 1 / (1 + np.exp(-x[:, 0]))).astype(np.float64)
    return x, y


# --- item 5: values outside the model's domain --------------------------------------------------
@pytest.mark.parametrize("bad", [-1.0, 2.0, 0.3])
@pytest.mark.parametrize("in_memory_rows", [1_000_000, 0], ids=["read-into-memory", "streamed"])
def test_logistic_labels_outside_0_1_are_rejected_in_parquet(tmp_path, bad, in_memory_rows):
    x, y = _logistic_rows()
    y[[130, 140, 170]] = bad  # three bad labels, all in row group 2 (rows 100-174)
    _write(tmp_path / "part-0.parquet", {"x0": x[:, 0], "x1": x[:, 1], "y": y}, [50, 50, 75, 25])
    with pytest.raises(DataError) as err:
        svi.fit(svi.models.LogisticRegression(2), str(tmp_path / "part-0.parquet"), columns={"x": "x*", "y": "y"},
                in_memory_rows=in_memory_rows, cache_dir=str(tmp_path / "cache"), **FAST)
    msg = str(err.value)
    assert "part-0.parquet, row group 2: column 'y' has 3 values" in msg, msg
    assert f"(e.g. {bad:g})" in msg and "labels y must be 0 or 1" in msg, msg


def test_a_stream_stops_before_yielding_a_row_of_a_bad_row_group(tmp_path):
    x, y = _logistic_rows(400)
    y[333] = -1.0  # row group 6 of 8
    _write(tmp_path / "s.parquet", {"x0": x[:, 0], "y": y}, [50] * 8)
    src = ParquetSource(str(tmp_path / "s.parquet"), {"x": ["x0"], "y": "y"},
                        validate=svi.models.LogisticRegression(1).validate)
    stream = src.stream(batch_size=20, seed=0, shuffle_units=1, prefetch=1)
    seen = []
    with pytest.raises(DataError, match=r"s\.parquet, row group 6: column 'y' has 1 value the model does not allow"):
        for _ in range(src.num_rows // 20):
            seen.append(next(stream)["y"])
    assert len(seen) < 20 and all(((b == 0) | (b == 1)).all() for b in seen)
    src.close()


@pytest.mark.parametrize("bad", [-1.0, 2.0, 0.3])
def test_logistic_labels_outside_0_1_are_rejected_in_memory(bad):
    x, y = _logistic_rows()
    y[[5, 6]] = bad
    model = svi.models.LogisticRegression(2)
    with pytest.raises(DataError, match=rf"the in-memory data: key 'y' has 2 values .*\(e\.g\. {bad:g}\).*0 or 1"):
        svi.fit(model, {"x": x, "y": y}, **FAST)
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "label": y})
    with pytest.raises(DataError, match=r"the DataFrame: column 'label' \(batch key 'y'\) has 2 values"):
        svi.fit(model, frame, columns={"x": ["a", "b"], "y": "label"}, **FAST)


def test_valid_labels_of_any_numeric_type_still_fit(tmp_path):
    x, y = _logistic_rows()
    _write(tmp_path / "a.parquet", {"x0": x[:, 0], "x1": x[:, 1], "y": y.astype(bool)}, [100, 100])
    post = svi.fit(svi.models.LogisticRegression(2), str(tmp_path / "a.parquet"), columns={"x": "x*", "y": "y"},
                   cache_dir=str(tmp_path / "cache"), **FAST)
    assert post.info.num_rows == 200
    post = svi.fit(svi.models.LogisticRegression(2), {"x": x, "y": y.astype(np.int64)}, **FAST)
    assert post.info.num_rows == 200


def test_poisson_counts_must_be_non_negative_integers(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 1))
    y = rng.poisson(2.0, size=120)
    y[[10, 90, 91]] = -2
    _write(tmp_path / "p.parquet", {"x": x[:, 0], "y": y}, [60, 60])
    model = svi.models.PoissonRegression(1)
    with pytest.raises(DataError, match=r"p\.parquet, row group 0: column 'y' has 1 value .*\(e\.g\. -2\).*"
                                        r"counts y must be integers >= 0"):
        svi.fit(model, str(tmp_path / "p.parquet"), columns={"x": ["x"], "y": "y"}, cache_dir=str(tmp_path / "c"),
                **FAST)
    frac = np.abs(y).astype(np.float64)
    frac[7] = 1.5
    with pytest.raises(DataError, match=r"key 'y' has 1 value .*\(e\.g\. 1\.5\)"):
        svi.fit(model, {"x": x, "y": frac}, **FAST)
    exposed = svi.models.PoissonRegression(1, exposure=True)
    with pytest.raises(DataError, match=r"key 'exposure' has 2 values .*exposure must be positive"):
        svi.fit(exposed, {"x": x, "y": np.abs(y), "exposure": np.r_[0.0, -1.0, np.ones(118)]}, **FAST)


@pytest.mark.parametrize("bad", [-1, 4])
def test_hierarchical_group_ids_outside_0_to_n_groups_are_rejected(tmp_path, bad):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(160, 1))
    g = rng.integers(0, 4, size=160)
    g[[120, 150]] = bad
    y = x[:, 0] + g + rng.normal(size=160)
    _write(tmp_path / "h.parquet", {"x": x[:, 0], "y": y, "g": g}, [80, 80])
    model = svi.models.HierarchicalLinearRegression(1, n_groups=4)
    with pytest.raises(DataError, match=rf"h\.parquet, row group 1: column 'g' has 2 values .*\(e\.g\. {bad}\).*"
                                        r"group ids g must be integers from 0 to 3 \(n_groups=4\)"):
        svi.fit(model, str(tmp_path / "h.parquet"), columns={"x": ["x"], "y": "y", "g": "g"},
                cache_dir=str(tmp_path / "c"), **FAST)
    with pytest.raises(DataError, match=r"the in-memory data: key 'g' has 2 values"):
        svi.fit(model, {"x": x, "y": y, "g": g}, **FAST)
    ok = np.where((g < 0) | (g >= 4), 0, g)
    logistic = svi.models.HierarchicalLogisticRegression(1, n_groups=4)
    with pytest.raises(DataError, match=r"key 'y' has \d+ values .*labels y must be 0 or 1"):
        svi.fit(logistic, {"x": x, "y": y, "g": ok}, **FAST)


class PositiveDurations(svi.Model):
    """y ~ Exponential(rate), with covariates that must lie in [0, 1]: a user model's own checks."""

    batch_keys = ("x", "y")

    def __init__(self):
        self.params = {"rate": svi.Param((), svi.constraints.positive)}

    def log_prior(self, p):
        return -p["rate"]

    def log_likelihood(self, p, batch):
        return Exponential(p["rate"].unsqueeze(-1), validate_args=False).log_prob(batch["y"])

    def validate(self, batch):
        out = {}
        if "y" in batch:
            out["y"] = (~(batch["y"] > 0), "durations y must be positive")
        if "x" in batch:
            out["x"] = ((batch["x"] < 0) | (batch["x"] > 1), "shares x must lie in [0, 1]")
        return out


class BrokenHook(PositiveDurations):
    def validate(self, batch):
        return {"y": ((batch["y"] <= 0).float(), "durations y must be positive")}  # a float mask, not a bool one


def test_a_user_model_declares_its_own_checks(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.random((100, 3))
    y = rng.exponential(2.0, size=100)
    x[[40, 41], 2] = 1.5
    x[60, 0] = -0.1
    _write(tmp_path / "u.parquet", {"s0": x[:, 0], "s1": x[:, 1], "s2": x[:, 2], "y": y}, [50, 50])
    with pytest.raises(DataError, match=r"u\.parquet, row group 0: column 's2' \(batch key 'x'\) has 2 values .*"
                                        r"\(e\.g\. 1\.5\): shares x must lie in \[0, 1\]"):
        svi.fit(PositiveDurations(), str(tmp_path / "u.parquet"), columns={"x": "s*", "y": "y"},
                cache_dir=str(tmp_path / "c"), **FAST)
    y[3] = 0.0
    with pytest.raises(DataError, match=r"key 'y' has 1 value .*\(e\.g\. 0\): durations y must be positive"):
        svi.fit(PositiveDurations(), {"x": x.clip(0, 1), "y": y}, **FAST)
    post = svi.fit(PositiveDurations(), {"x": x.clip(0, 1), "y": np.abs(y) + 0.1}, **FAST)
    assert post.info.num_rows == 100
    with pytest.raises(svi.ModelError, match=r"BrokenHook\.validate returned for key 'y' a torch\.float\d+ mask"):
        svi.fit(BrokenHook(), {"x": x.clip(0, 1), "y": np.abs(y) + 0.1}, **FAST)


def test_svi_fit_on_bad_labels_exits_with_one_line(tmp_path):
    x, y = _logistic_rows(120)
    y[[3, 4, 5, 6]] = -1.0
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data" / "part-0.parquet", {"x0": x[:, 0], "x1": x[:, 1], "y": y}, [60, 60])
    job = tmp_path / "job.yaml"
    job.write_text(f"""name: bad-labels
model: {{target: "svi.models:LogisticRegression", args: {{n_features: 2}}}}
data: {{path: {tmp_path / 'data'}, columns: {{x: "x*", y: y}}, cache_dir: {tmp_path / 'cache'}}}
fit: {{max_steps: 20, warm_start: none}}
tracking: {{enabled: false}}
""")
    proc = subprocess.run([sys.executable, "-m", "svi", "fit", str(job)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("svi fit: error: file ") and "row group 0: column 'y' has 4 values" in lines[0]


# --- item 6: caches keyed by file identity and checked before use ---------------------------------
PLAIN = dict(compression="none", use_dictionary=False)  # fixed-width pages: a rewrite keeps the file size


def _filtered(tmp_path):
    """A file whose filter y >= 40 keeps 60 of 100 rows: 0 in row group 0, 60 in row group 1."""
    x = np.random.default_rng(4).normal(size=100)
    _write(tmp_path / "a.parquet", {"x": x, "y": np.arange(100.0)}, [30, 70], **PLAIN)
    return dict(columns={"x": ["x"], "y": "y"}, row_filter=[("y", ">=", 40)], cache_dir=str(tmp_path / "cache"))


def test_a_tampered_counts_cache_is_detected_and_recomputed(tmp_path, caplog):
    kw = _filtered(tmp_path)
    src = ParquetSource(str(tmp_path / "a.parquet"), keys=("x", "y"), **kw)
    assert src.num_rows == 60
    cache = src.cache_file("counts")
    record = json.loads(cache.read_text())
    assert record["value"] == [0, 60]
    record["value"] = [0, 30]  # halved: still within the row group's 70 rows
    cache.write_text(json.dumps(record))
    model = svi.models.LinearRegression(1)
    with caplog.at_level(logging.WARNING, logger="svi"):
        post = svi.fit(model, str(tmp_path / "a.parquet"), **kw, **FAST)
    assert post.info.num_rows == 60
    assert any(str(cache) in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records), caplog.text
    assert json.loads(cache.read_text())["value"] == [0, 60]  # rewritten

    record = json.loads(cache.read_text())
    record["value"] = [0, 99]  # more rows than row group 1 holds, with a checksum to match
    from svi.data.parquet import store_cache

    store_cache(cache, record["key"], record["value"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="svi"):
        again = ParquetSource(str(tmp_path / "a.parquet"), keys=("x", "y"), **kw)
    assert again.num_rows == 60 and "which holds 70 rows" in caplog.text
    cache.write_text("[0, 30]")  # the old format: a bare list
    assert ParquetSource(str(tmp_path / "a.parquet"), keys=("x", "y"), **kw).num_rows == 60


def test_a_cache_of_a_file_rewritten_in_place_is_not_used(tmp_path, caplog):
    kw = _filtered(tmp_path)
    path = tmp_path / "a.parquet"
    first = ParquetSource(str(path), keys=("x", "y"), **kw)
    assert first.num_rows == 60
    old_cache, old_key = first.cache_file("counts"), first.cache_key("counts")
    before = os.stat(path)
    # same path, same size, same modification time, different values: y >= 40 now keeps 90 rows
    x = np.random.default_rng(5).normal(size=100)
    _write(path, {"x": x, "y": np.arange(100.0) + 30}, [30, 70], **PLAIN)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns
    post = svi.fit(svi.models.LinearRegression(1), str(path), **kw, **FAST)
    assert post.info.num_rows == 90
    second = ParquetSource(str(path), keys=("x", "y"), **kw)
    assert second.cache_key("counts") != old_key and second.cache_file("counts") != old_cache
    # the old record copied under the new name is refused: its key names the old footer
    second.cache_file("counts").write_text(old_cache.read_text())
    with caplog.at_level(logging.WARNING, logger="svi"):
        assert ParquetSource(str(path), keys=("x", "y"), **kw).num_rows == 90
    assert "written for other files or settings" in caplog.text


def test_a_tampered_statistics_cache_is_detected_and_recomputed(tmp_path, caplog):
    rng = np.random.default_rng(6)
    x = rng.normal(3.0, 2.0, size=200)
    g = rng.integers(0, 3, size=200)
    _write(tmp_path / "s.parquet", {"x": x, "g": g}, [100, 100])
    src = ParquetSource(str(tmp_path / "s.parquet"), {"x": "x", "g": "g"}, integer_keys=("g",),
                        cache_dir=tmp_path / "cache")
    stats = data_stats(src)
    cache = src.cache_file("stats")
    from svi.data.parquet import store_cache

    record = json.loads(cache.read_text())
    record["value"]["columns"]["x"]["n"] = 100  # plausible-looking, checksummed, but not the row count
    record["value"]["columns"]["x"]["mean"] = 0.0
    store_cache(cache, record["key"], record["value"])
    with caplog.at_level(logging.WARNING, logger="svi"):
        again = data_stats(src)
    assert again == stats and abs(again["columns"]["x"]["mean"] - x.mean()) < 1e-12
    assert "counts 100 values and 0 NaN in column 'x' of 200 rows" in caplog.text
    src.close()
