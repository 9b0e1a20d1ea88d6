"""Data jobs: synthetic data sets with known truth, CSV to Parquet, full-data statistics.

The runnable scripts in ``pipelines/`` and ``svi data make | convert | stats`` call these.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from svi.data.columns import DataError

__all__ = ["write_synthetic", "heldout_folder", "truth_file", "csv_to_parquet", "data_stats", "merge_moments"]


def _write_file(args) -> int:
    spec_dict, truth, path, rows, row_group_size, seed = args
    from svi.synthetic import SyntheticSpec, make_rows

    spec = SyntheticSpec(**spec_dict)
    rng = np.random.default_rng(seed)
    tmp = f"{path}.{os.getpid()}.tmp"
    writer = None
    try:
        for start in range(0, rows, row_group_size):
            n = min(row_group_size, rows - start)
            cols = make_rows(spec, {k: np.asarray(v) for k, v in truth.items()}, n, rng)
            table = pa.table(cols)
            if writer is None:
                # Plain encoding: synthetic floats rarely repeat, and dictionary pages of counts-like
                # columns (histogram bins) decode at half the speed.
                writer = pq.ParquetWriter(tmp, table.schema, compression="none", use_dictionary=False)
            writer.write_table(table, row_group_size=row_group_size)
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)  # a half-written file never looks like part of the data set
    return rows


def write_synthetic(out: str | os.PathLike, model: str = "logistic", rows: int = 1_000_000, features: int = 10,
                    files: int = 8, row_group_size: int = 65_536, seed: int = 0, groups: int = 20,
                    components: int = 3, varying_slopes: bool = False,
                    workers: int | None = None, heldout: int = 0) -> dict[str, Any]:
    """Write a partitioned Parquet data set drawn from a built-in model with known parameters.

    Files ``part-00000.parquet`` ... go into folder ``out``, which holds data only (so
    ``pandas.read_parquet(out)`` reads it); ``<out>.truth.json`` beside it holds the parameters,
    the spec and the columns mapping (:func:`truth_file`). Files are written in parallel processes.
    With ``heldout`` rows, a second folder ``<out>-heldout`` (:func:`heldout_folder`) gets that many
    more rows from the same truth and a noise stream of their own, for the fit's ``heldout`` option.

    Returns:
        The contents of the truth file.
    """
    from svi.synthetic import SyntheticSpec, batch_columns, make_truth

    if rows < files:
        raise DataError(f"rows={rows} cannot fill files={files}: each file needs at least one row")
    spec = SyntheticSpec(model, features, groups, components, varying_slopes)
    truth = {k: np.asarray(v).tolist() for k, v in make_truth(spec, seed).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_file = [rows // files + (1 if i < rows % files else 0) for i in range(files)]
    jobs = [(spec.__dict__, truth, str(out / f"part-{i:05d}.parquet"), n, row_group_size, [seed, i])
            for i, n in enumerate(per_file)]
    if heldout:
        held = heldout_folder(out)
        held.mkdir(parents=True, exist_ok=True)
        jobs.append((spec.__dict__, truth, str(held / "part-00000.parquet"), heldout, row_group_size,
                     [seed, _HELDOUT_STREAM]))
    workers = workers or min(files, os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_file, jobs))
    else:
        for job in jobs:
            _write_file(job)
    meta = {"spec": spec.__dict__, "truth": truth, "columns": batch_columns(spec), "rows": rows, "files": files,
            "row_group_size": row_group_size, "seed": seed}
    if heldout:
        meta["heldout"] = {"path": str(heldout_folder(out)), "rows": heldout}
    from svi.checkpoint import atomic_write_text

    atomic_write_text(truth_file(out), json.dumps(meta, indent=1))  # last: marks the data set complete
    return meta


#: the held-out rows' noise stream: no file index of the training rows reaches it
_HELDOUT_STREAM = 2**31 - 1


def heldout_folder(data_folder: str | os.PathLike) -> Path:
    """Where :func:`write_synthetic` puts held-out rows: ``data/gmm-heldout`` beside ``data/gmm``."""
    folder = Path(data_folder)
    return folder.with_name(folder.name + "-heldout")


def truth_file(data_folder: str | os.PathLike) -> Path:
    """Where :func:`write_synthetic` keeps a data set's truth: ``data/quickstart.truth.json`` beside
    ``data/quickstart``, not inside it, where it would break readers of the folder's Parquet files."""
    folder = Path(data_folder)
    return folder.with_name(folder.name + ".truth.json")


def csv_to_parquet(src: str | Sequence[str], out: str | os.PathLike, blocksize: str = "64MB",
                   row_group_size: int = 65_536, scheduler: str | None = None, **read_csv_kwargs) -> int:
    """Convert CSV files to a Parquet folder with Dask (one part per CSV block).

    Returns:
        The number of rows written.
    """
    import dask.dataframe as dd

    try:
        df = dd.read_csv(src, blocksize=blocksize, **read_csv_kwargs)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read CSV {src!r}: {e}") from None
    client = None
    if scheduler:
        from distributed import Client

        client = Client(scheduler, set_as_default=False)
    try:
        kwargs = dict(write_index=False, row_group_size=row_group_size)
        if client is not None:
            df.to_parquet(os.fspath(out), compute_kwargs={"scheduler": client}, **kwargs)
        else:
            df.to_parquet(os.fspath(out), **kwargs)
    finally:
        if client is not None:
            client.close()
    return _count_rows(out)


def _count_rows(folder) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(Path(folder).glob("*.parquet")))


# --- full-data statistics ---------------------------------------------------------------------
def _unit_moments(source, unit) -> dict:
    """Per column: count, mean, M2 (sum of squared deviations), min, max; per integer key: value counts."""
    arrays = source.read(unit)
    out: dict[str, Any] = {}
    for key, (cols, _) in source.resolved.items():
        a = arrays[key].reshape(len(arrays[key]), -1)
        for j, c in enumerate(cols):
            v = a[:, j].astype(np.float64)
            finite = np.isfinite(v)
            x = v[finite]
            n = int(x.size)
            mean = float(x.mean()) if n else 0.0
            out[c] = {"n": n, "mean": mean, "m2": float(((x - mean) ** 2).sum()) if n else 0.0,
                      "min": float(x.min()) if n else math.inf, "max": float(x.max()) if n else -math.inf,
                      "nan": int((~finite).sum())}
        if key in source.integer_keys:
            ids, counts = np.unique(arrays[key], return_counts=True)
            out[f"__groups__{key}"] = {str(int(i)): int(k) for i, k in zip(ids, counts)}
    return out


def merge_moments(a: Mapping, b: Mapping) -> dict:
    """Combine two partial moment summaries (Chan, Golub, LeVeque, "Algorithms for computing
    the sample variance", The American Statistician 1983)."""
    n = a["n"] + b["n"]
    if n == 0:
        return dict(a, nan=a["nan"] + b["nan"])
    delta = b["mean"] - a["mean"]
    return {"n": n, "mean": a["mean"] + delta * b["n"] / n, "m2": a["m2"] + b["m2"] + delta**2 * a["n"] * b["n"] / n,
            "min": min(a["min"], b["min"]), "max": max(a["max"], b["max"]), "nan": a["nan"] + b["nan"]}


def data_stats(source, use_cache: bool = True) -> dict[str, Any]:
    """Full-data statistics of every mapped column in one pass with Dask, cached under the files'
    identity (see :meth:`ParquetSource.cache_key`) and checked against the row count before use:
    per column n, mean, sd, min, max, null/NaN count; per integer key, counts per id.

    Args:
        source: a :class:`svi.data.parquet.ParquetSource`.
    """
    import dask

    from svi.data.parquet import load_cache, store_cache

    key = source.cache_key("stats")
    cache = source.cache_file("stats", key)
    if use_cache:
        stats = load_cache(cache, key, lambda s: _implausible_stats(s, source))
        if stats is not None:
            return stats
    parts = source._compute([dask.delayed(_unit_moments)(source, u) for u in source.units])
    columns: dict[str, dict] = {}
    groups: dict[str, dict[str, int]] = {}
    for part in parts:
        for name, value in part.items():
            if name.startswith("__groups__"):
                g = groups.setdefault(name[len("__groups__"):], {})
                for k, v in value.items():
                    g[k] = g.get(k, 0) + v
            else:
                columns[name] = merge_moments(columns[name], value) if name in columns else dict(value)
    for c in columns.values():
        c["sd"] = math.sqrt(c["m2"] / (c["n"] - 1)) if c["n"] > 1 else 0.0
        del c["m2"]
    stats = {"fingerprint": source.fingerprint(), "num_rows": source.num_rows, "columns": columns,
             "groups": {k: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for k, v in groups.items()}}
    store_cache(cache, key, stats)
    return stats


def _implausible_stats(stats, source) -> str | None:
    """What is wrong with cached statistics given the source's row count and columns, or None."""
    if not isinstance(stats, dict) or not isinstance(stats.get("columns"), dict):
        return "it holds no column statistics"
    if stats.get("num_rows") != source.num_rows:
        return f"it describes {stats.get('num_rows')!r} rows; the data have {source.num_rows}"
    for key, (cols, _) in source.resolved.items():
        for c in cols:
            col = stats["columns"].get(c)
            if not isinstance(col, dict):
                return f"it has no statistics of column {c!r}"
            n, nan, sd = col.get("n"), col.get("nan"), col.get("sd")
            if type(n) is not int or type(nan) is not int or n < 0 or nan < 0 or n + nan != source.num_rows:
                return f"it counts {n!r} values and {nan!r} NaN in column {c!r} of {source.num_rows} rows"
            if not isinstance(sd, (int, float)) or not sd >= 0:
                return f"it gives column {c!r} the sd {sd!r}"
        if key in source.integer_keys:
            groups = stats.get("groups", {}).get(key)
            if not isinstance(groups, dict) or sum(v for v in groups.values() if type(v) is int) != source.num_rows:
                return f"its group counts of key {key!r} do not add up to {source.num_rows} rows"
    return None
