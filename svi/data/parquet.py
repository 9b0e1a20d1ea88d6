"""Parquet data sets of any size, read through Dask and streamed in shuffled minibatches.

The unit of reading is one row group of one file. Each epoch the units are shuffled
(seeded by run seed and epoch) and dealt to the W ranks so that their row counts are as
equal as possible; every rank then cuts its rows into the same number of batches, so
all ranks take the same number of steps (no DDP hang at an epoch's end), every row is
used exactly once per epoch, and each batch's N/|B| scaling stays exact. One process
cuts full batches and a last one with the rest (as the in-memory stream does), so every
batch but one has the shape the compiled step is built for; several ranks cut nearly
equal batches. A shuffle
buffer mixes the rows of ``shuffle_units`` consecutive units, so a minibatch is not one
row group. Reads are Dask tasks: on local threads by default, on a ``distributed``
cluster when a scheduler address is given; ``prefetch`` units are read ahead while
the optimiser runs.

The stream's cursor is (epoch, batch within the epoch); every shuffle is seeded from
(seed, epoch, rank, window), so a resumed stream re-reads at most one buffer window
and yields exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from svi.data.columns import DataError, check_values, resolve_columns

__all__ = ["ParquetSource", "ParquetStream", "Unit", "plan_epoch", "is_parquet_input", "list_parquet_files",
           "load_cache", "store_cache"]

log = logging.getLogger("svi")


@dataclass(frozen=True)
class Unit:
    """One row group of one file."""

    file: int
    row_group: int
    rows: int


def is_parquet_input(data: Any) -> bool:
    """A path, a glob, a folder or a list of those (str or os.PathLike) is Parquet input."""
    if isinstance(data, (str, os.PathLike)):
        return True
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(d, (str, os.PathLike)) for d in data)


def list_parquet_files(data: str | os.PathLike | Sequence[str | os.PathLike], storage_options: Mapping | None = None):
    """Expand a folder, glob or list into a sorted list of files on one fsspec filesystem.

    Returns:
        (filesystem, [paths]).

    Raises:
        DataError: when nothing matches.
    """
    import fsspec

    specs = [os.fspath(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    fs = None
    files: list[str] = []
    for spec in specs:
        fs_i, _, paths = fsspec.get_fs_token_paths(spec, storage_options=dict(storage_options or {}))
        fs = fs or fs_i
        paths = [p for p in paths if fs_i.exists(p)]
        for p in paths:
            if fs_i.isdir(p):
                found = sorted(f for f in fs_i.find(p) if f.endswith((".parquet", ".parq", ".pq")))
                files += found
            else:
                files.append(p)
        if not paths:
            raise DataError(f"no Parquet file matches {spec!r}; check the path or glob")
    files = sorted(dict.fromkeys(files))
    if not files:
        raise DataError(f"no Parquet files found in {specs}; a folder must hold *.parquet files")
    return fs, files


def plan_epoch(units: Sequence[Unit], seed: int, epoch: int, world_size: int, batch_size: int):
    """Shuffle the units for this epoch and deal them to ranks, balancing row counts.

    Returns:
        (per-rank lists of unit indices, steps in this epoch): every rank splits its rows into
        ``steps`` nearly equal batches.
    """
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(units))
    shares: list[list[int]] = [[] for _ in range(world_size)]
    rows = [0] * world_size
    for u in order:  # greedy: the next unit goes to the rank with the fewest rows so far
        r = min(range(world_size), key=lambda k: (rows[k], k))
        shares[r].append(int(u))
        rows[r] += units[u].rows
    if min(rows) == 0:
        raise DataError(
            f"{len(units)} row groups cannot feed {world_size} ranks: every rank needs rows each epoch; "
            "write smaller row groups or use fewer ranks"
        )
    steps = max(1, math.ceil(max(rows) / batch_size))
    if min(rows) < steps:
        steps = min(rows)  # never an empty batch
    return shares, steps


def _batch_sizes(rows: int, steps: int, batch_size: int | None = None) -> list[int]:
    """``rows`` cut into ``steps`` batches: of ``batch_size`` rows and a last one with the rest
    (``rows`` must then need exactly ``steps`` of them), else nearly equal."""
    if batch_size is not None:
        assert steps == math.ceil(rows / batch_size), (rows, steps, batch_size)
        return [batch_size] * (steps - 1) + [rows - batch_size * (steps - 1)]
    base, extra = divmod(rows, steps)
    return [base + (1 if j < extra else 0) for j in range(steps)]


class ParquetSource:
    """A Parquet data set: files, schema check, row counts, reads.

    Args:
        data: a path, glob or folder (local or any fsspec URL), or a list of them.
        columns: {batch key: column | [columns] | pattern}; by default each key in ``keys``
            names its own column.
        keys: the batch keys the model needs.
        integer_keys: keys kept as int64 (group ids, counts).
        dtype: floating dtype of the other keys.
        nan_policy: ``"error"`` (default: an error naming file, column and count) or ``"drop"``.
        row_filter: optional filter in pyarrow's DNF form, e.g. ``[("age", ">", 18)]``.
        scheduler: a Dask ``distributed`` scheduler address; ``None`` reads on local threads.
        storage_options: passed to fsspec.
        cache_dir: where counts after a filter and full-data statistics are cached, keyed by
            each file's identity (path, size, modification time, a hash of its Parquet footer)
            and checked against the metadata before use.
        validate: the model's value check (:meth:`svi.Model.validate`), run on every row group
            as it is read; ``None`` checks nothing.
    """

    def __init__(self, data, columns: Mapping[str, Any] | None = None, keys: Sequence[str] | None = None,
                 integer_keys: Sequence[str] = (), dtype: torch.dtype = torch.float32, nan_policy: str = "error",
                 row_filter: Sequence | None = None, scheduler: str | None = None,
                 storage_options: Mapping | None = None, cache_dir: str | os.PathLike | None = None,
                 validate=None):
        if nan_policy not in ("error", "drop"):
            raise DataError(f"nan_policy must be 'error' or 'drop', got {nan_policy!r}")
        self.fs, self.files = list_parquet_files(data, storage_options)
        self.integer_keys = tuple(integer_keys)
        self.dtype = dtype
        self.nan_policy = nan_policy
        self.row_filter = [tuple(f) for f in row_filter] if row_filter else None
        self.scheduler = scheduler
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "svi")
        self.validate = validate
        self._client = None
        self._footers: dict[str, str] = {}
        metas = [self._metadata(f) for f in self.files]
        first_schema = metas[0].schema.to_arrow_schema()
        mapping = dict(columns) if columns else {k: k for k in (keys or [])}
        if not mapping:
            raise DataError("give columns= (batch key -> column) or a model with batch_keys for Parquet data")
        if keys is not None:
            missing = [k for k in keys if k not in mapping]
            if missing:
                raise DataError(f"the model needs batch key {missing[0]!r} but columns= does not map it; "
                                f"columns= maps {sorted(mapping)}")
        self.resolved = resolve_columns(mapping, first_schema.names, f"file {self.files[0]}")
        self.read_columns = list(dict.fromkeys(c for cols, _ in self.resolved.values() for c in cols))
        self._check_schema(metas)
        self.units = [Unit(i, g, m.row_group(g).num_rows) for i, m in enumerate(metas) for g in range(m.num_row_groups)]
        self.dropped_rows = 0
        if self.row_filter or nan_policy == "drop":
            counts = self._counts_after_filter()
            self.dropped_rows = sum(u.rows for u in self.units) - sum(counts)
            self.units = [Unit(u.file, u.row_group, c) for u, c in zip(self.units, counts)]
        self.units = [u for u in self.units if u.rows > 0]
        self.num_rows = sum(u.rows for u in self.units)
        if self.num_rows == 0:
            raise DataError(f"no rows left in {len(self.files)} Parquet file(s) after the filter / NaN drop")

    # --- metadata and checks ------------------------------------------------------------------
    def _metadata(self, path: str) -> pq.FileMetaData:
        try:
            with self.fs.open(path, "rb") as f:
                self._footers[path] = _footer_hash(f)  # same handle: no second open per file
                f.seek(0)
                return pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"file {path} is not a readable Parquet file: {e}") from None

    def _check_schema(self, metas: list[pq.FileMetaData]) -> None:
        """Every mapped column in every file, numeric, without nulls (unless dropped); no empty file."""
        for path, meta in zip(self.files, metas):
            schema = meta.schema.to_arrow_schema()
            if meta.num_rows == 0:
                raise DataError(f"file {path} has no rows; remove it from the data set")
            for key, (cols, _) in self.resolved.items():
                for c in cols:
                    idx = schema.get_field_index(c)
                    if idx < 0:
                        raise DataError(f"file {path} has no column {c!r} (batch key {key!r}); its columns are "
                                        f"{schema.names}. Fix the columns mapping or the file.")
                    t = schema.field(idx).type
                    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
                        raise DataError(f"file {path}: column {c!r} (batch key {key!r}) has type {t}, not a number; "
                                        "convert it (e.g. to integer codes) before fitting")
                    if self.nan_policy == "error":
                        nulls = _null_count(meta, c)
                        if nulls:
                            raise DataError(f"file {path}: column {c!r} has {nulls} null values; clean the data or "
                                            "pass nan_policy='drop' to drop those rows")

    def fingerprint(self) -> str:
        """Hash of the files (path, size, modification time), the columns, the filter and the NaN policy."""
        h = hashlib.sha256()
        for f in self.files:
            info = self.fs.info(f)
            h.update(f"{f}|{info.get('size')}|{info.get('mtime', info.get('LastModified', ''))}".encode())
        h.update(json.dumps([self.read_columns, self.row_filter, self.nan_policy], default=str).encode())
        return h.hexdigest()[:16]

    def cache_key(self, kind: str) -> dict:
        """What a cached result of ``kind`` (``"counts"``, ``"stats"``) depends on: each file's
        identity (path, size, modification time, SHA-256 of its Parquet footer, which holds the
        row-group layout and column statistics) and the reading settings. A file rewritten in
        place, even to the same size and modification time, gets a new key."""
        files = []
        for f in self.files:
            info = self.fs.info(f)
            if _is_local(self.fs):
                mtime: Any = os.stat(f).st_mtime_ns
            else:
                mtime = str(info.get("mtime", info.get("LastModified", info.get("ETag", ""))))
            files.append([f, info.get("size"), mtime, self._footers.get(f) or self._footer_of(f)])
        key = {"kind": kind, "version": 2, "files": files, "columns": self.read_columns,
               "resolved": {k: cols for k, (cols, _) in self.resolved.items()},
               "integer_keys": list(self.integer_keys), "row_filter": self.row_filter, "nan_policy": self.nan_policy}
        return json.loads(json.dumps(key, default=str))  # as it reads back from JSON, to compare equal

    def cache_file(self, kind: str, key: Mapping | None = None) -> Path:
        """The cache file of ``kind`` for this data set and these settings."""
        key = key if key is not None else self.cache_key(kind)
        return self.cache_dir / f"{kind}-{_digest(key)[:20]}.json"

    def _footer_of(self, path: str) -> str:
        with self.fs.open(path, "rb") as f:
            return _footer_hash(f)

    def _counts_after_filter(self) -> list[int]:
        """Rows per unit after the filter and NaN drop: counted once with Dask, then cached; a
        cache that fails its checks is ignored with a warning and rewritten."""
        key = self.cache_key("counts")
        cache = self.cache_file("counts", key)

        def plausible(counts) -> str | None:
            if not isinstance(counts, list) or len(counts) != len(self.units):
                return f"it holds {_length(counts)} counts for {len(self.units)} row groups"
            for u, c in zip(self.units, counts):
                if type(c) is not int or not 0 <= c <= u.rows:  # bool is not a count either
                    return (f"it counts {c!r} rows in row group {u.row_group} of {self.files[u.file]}, "
                            f"which holds {u.rows} rows")
            return None

        counts = load_cache(cache, key, plausible)
        if counts is not None:
            return counts
        import dask

        tasks = [dask.delayed(_count_unit)(self.files[u.file], u.row_group, self.read_columns, self.row_filter,
                                          self.nan_policy, self.fs) for u in self.units]
        counts = [int(c) for c in self._compute(tasks)]
        store_cache(cache, key, counts)
        return counts

    # --- reading ------------------------------------------------------------------------------
    def client(self):
        """The ``distributed.Client`` when a scheduler address was given, else None."""
        if self.scheduler and self._client is None:
            from distributed import Client

            self._client = Client(self.scheduler, set_as_default=False)
        return self._client

    def _compute(self, tasks):
        import dask

        client = self.client()
        if client is not None:
            return client.compute(tasks, sync=True)
        return dask.compute(*tasks, scheduler="threads")

    def submit(self, unit: Unit, shuffle_seed=None) -> Future:
        """Start reading one unit (rows permuted when ``shuffle_seed`` is given); the future's result
        is {key: numpy array}."""
        args = (self.files[unit.file], unit.row_group, self.read_columns, self.row_filter, self.nan_policy,
                self.fs, self.resolved, self.integer_keys, shuffle_seed, self.validate)
        client = self.client()
        if client is not None:
            return client.submit(_read_unit, *args, pure=False)
        if not hasattr(self, "_pool"):
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="svi-read")
        import dask

        return self._pool.submit(lambda: dask.delayed(_read_unit)(*args).compute(scheduler="sync"))

    def read(self, unit: Unit) -> dict[str, np.ndarray]:
        return self.submit(unit).result()

    def to_tensors(self, arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {k: torch.from_numpy(v) if k in self.integer_keys else torch.from_numpy(v).to(self.dtype)
               for k, v in arrays.items()}
        for key, (shift, scale) in getattr(self, "standardizers", {}).items():
            out[key] = (out[key] - shift) / scale
        return out

    def sample(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        """About n rows drawn uniformly: whole random row groups until n rows, then a uniform subset."""
        rng = np.random.default_rng([seed, 0x5A])
        order = rng.permutation(len(self.units))
        picked, rows = [], 0
        for u in order:
            picked.append(self.units[u])
            rows += self.units[u].rows
            if rows >= n:
                break
        parts = [f.result() for f in [self.submit(u) for u in picked]]
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        total = len(next(iter(merged.values())))
        if total > n:
            keep = np.sort(rng.choice(total, size=n, replace=False))
            merged = {k: v[keep] for k, v in merged.items()}
        return self.to_tensors(merged)

    def chunks(self, rows: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Every row once, a unit at a time, in file order (for full-data passes); with several
        ranks, this rank's share of the units."""
        pending: deque[Future] = deque()
        for u in self.units[rank::world_size]:
            pending.append(self.submit(u))
            if len(pending) >= 4:
                yield self.to_tensors(pending.popleft().result())
        while pending:
            yield self.to_tensors(pending.popleft().result())

    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, device="cpu",
               shuffle_units: int = 4, prefetch: int = 4) -> "ParquetStream":
        return ParquetStream(self, batch_size, seed, rank, world_size, device, shuffle_units, prefetch)

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
            self._client = None


def _footer_hash(f) -> str:
    """SHA-256 of a Parquet file's footer (its Thrift metadata), read from the end of file ``f``."""
    length = f.seek(0, os.SEEK_END)
    if length < 12:  # "PAR1" + footer length + "PAR1" at the least
        raise pa.ArrowInvalid(f"a Parquet file has at least 12 bytes; this one has {length}")
    f.seek(length - 8)
    tail = f.read(8)
    size = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or size > length - 12:
        raise pa.ArrowInvalid("no Parquet footer (the file does not end in a footer length and PAR1)")
    f.seek(length - 8 - size)
    return hashlib.sha256(f.read(size)).hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _length(x) -> str:
    return str(len(x)) if isinstance(x, list) else f"a {type(x).__name__}, not a list of"


def load_cache(path: Path, key: Mapping, plausible) -> Any | None:
    """The value cached in ``path`` when the file was written for ``key``, is intact (its
    checksum matches) and ``plausible(value)`` finds nothing wrong (it returns None or says what
    is wrong); else None, with a warning naming the file when one was there but failed."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problem = f"it cannot be read ({e})"
    else:
        if not isinstance(record, dict) or record.get("key") != key:
            problem = "it was written for other files or settings"
        elif record.get("sha256") != _digest({"key": key, "value": record.get("value")}):
            problem = "its contents do not match its checksum (edited or damaged)"
        else:
            problem = plausible(record["value"])
    if problem is None:
        return record["value"]
    log.warning("ignoring the cache %s: %s; recomputing it", path, problem)
    return None


def store_cache(path: Path, key: Mapping, value) -> None:
    """Write ``value`` with its key and a checksum, atomically (a reader sees one whole version)."""
    from svi.checkpoint import atomic_write_text

    value = json.loads(json.dumps(value))  # checksum the value exactly as it will read back
    atomic_write_text(path, json.dumps({"key": key, "value": value,
                                        "sha256": _digest({"key": key, "value": value})}))


def _null_count(meta: pq.FileMetaData, column: str) -> int:
    total = 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for j in range(rg.num_columns):
            col = rg.column(j)
            if col.path_in_schema == column and col.statistics is not None and col.statistics.has_null_count:
                total += col.statistics.null_count
    return total


def _read_table(path, row_group, columns, row_filter, fs) -> pa.Table:
    wanted = list(columns) + _filter_columns(row_filter, columns)
    try:
        if _is_local(fs):  # Arrow's own file reader: no reads through a Python file object (not
            # memory-mapped: a file truncated while mapped would kill the process with SIGBUS)
            table = pq.ParquetFile(path).read_row_group(row_group, columns=wanted)
        else:
            with fs.open(path, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(row_group, columns=wanted)
    except FileNotFoundError:
        raise DataError(f"file {path} vanished during the run; restore it (or restart the fit without it)") from None
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"file {path}, row group {row_group}: cannot read it ({e})") from None
    if row_filter:
        table = table.filter(pq.filters_to_expression(row_filter))
    return table


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _filter_columns(row_filter, columns) -> list[str]:
    if not row_filter:
        return []
    return [c for c in dict.fromkeys(f[0] for f in row_filter) if c not in columns]


def _bad_values(table: pa.Table, columns, path: str) -> None:
    """Raise naming the file, column and count of NaN, infinite or null values (nan_policy="error")."""
    for c in columns:
        arr = table.column(c)
        n_bad = arr.null_count
        if pa.types.is_floating(arr.type):
            n_bad += int((~np.isfinite(arr.to_numpy(zero_copy_only=False))).sum()) - arr.null_count
        if n_bad:
            raise DataError(f"file {path}: column {c!r} has {n_bad} NaN, infinite or null values in this row "
                            "group; clean the data or pass nan_policy='drop' to drop those rows")


def _drop_mask(table: pa.Table, columns) -> np.ndarray | None:
    keep = None
    for c in columns:
        arr = table.column(c)
        bad = np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
        if pa.types.is_floating(arr.type):
            bad = bad | ~np.isfinite(arr.to_numpy(zero_copy_only=False))
        if bad.any():
            keep = ~bad if keep is None else keep & ~bad
    return keep


def _count_unit(path, row_group, columns, row_filter, nan_policy, fs) -> int:
    table = _read_table(path, row_group, columns, row_filter, fs)
    keep = _drop_mask(table, columns) if nan_policy == "drop" else None
    return table.num_rows if keep is None else int(keep.sum())


def _read_unit(path, row_group, columns, row_filter, nan_policy, fs, resolved, integer_keys,
               shuffle_seed=None, validate=None) -> dict[str, np.ndarray]:
    """Read one row group into {batch key: array}: one column as a vector, several stacked into
    a row-major matrix in the mapping's order; values checked by the model's ``validate`` hook;
    rows permuted when ``shuffle_seed`` is given (all in the reading thread or Dask worker, off
    the training loop)."""
    table = _read_table(path, row_group, columns, row_filter, fs)
    keep = None
    if nan_policy == "drop":
        keep = _drop_mask(table, columns)
    elif any(table.column(c).null_count for c in columns):
        _bad_values(table, columns, path)
    out = {}
    for key, (cols, matrix) in resolved.items():
        arrays = [table.column(c).to_numpy(zero_copy_only=False) for c in cols]
        if key in integer_keys:
            for c, a in zip(cols, arrays):
                if a.dtype.kind == "f" and not np.all(a == np.round(a)):
                    raise DataError(f"file {path}: column {c!r} (batch key {key!r}) must hold integers")
            arrays = [a.astype(np.int64, copy=False) for a in arrays]
        else:
            arrays = [a if a.dtype.kind == "f" else a.astype(np.float32) for a in arrays]
        value = np.stack(arrays, axis=1) if matrix else np.array(arrays[0])
        if keep is None and nan_policy == "error" and value.dtype.kind == "f" and not np.isfinite(value).all():
            _bad_values(table, cols, path)  # one vectorised check; name the column only when it fails
        out[key] = value[keep] if keep is not None else value
    if validate is not None:  # a whole row group is checked before any of its rows reaches a batch
        check_values(validate, {k: torch.from_numpy(v) for k, v in out.items()}, f"file {path}, row group {row_group}",
                     {k: cols for k, (cols, _) in resolved.items()})
    if shuffle_seed is not None:
        n = len(next(iter(out.values())))
        perm = np.random.default_rng(shuffle_seed).permutation(n)
        out = {k: np.take(v, perm, axis=0) for k, v in out.items()}  # the rows of v[perm], 5x faster
    return out


class ParquetStream:
    """This rank's endless stream of batches; see the module docstring for the plan.

    A buffer window is ``shuffle_units`` row groups. Its rows are dealt out in a random
    interleaving of the row groups (a seeded permutation of row-group labels), and within each
    row group in a seeded random order: together a uniform permutation of the window. The
    within-group order is applied where the row group is read (a reading thread or a Dask
    worker), so the training loop only copies contiguous runs of rows into each batch.
    """

    def __init__(self, source: ParquetSource, batch_size: int, seed: int, rank: int, world_size: int, device="cpu",
                 shuffle_units: int = 4, prefetch: int = 4):
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.source = source
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.device = torch.device(device)
        self.shuffle_units = max(1, int(shuffle_units))
        self.prefetch = max(1, int(prefetch))
        self.epoch = 0
        self.batch = 0  # batches already yielded in this epoch
        # full batches where one process reads (the compiled step's one shape); a stream resumed
        # from a checkpoint that predates them keeps the nearly equal batches it was cut into
        self.full_batches = self.world_size == 1
        self._reset()

    # --- the epoch plan ------------------------------------------------------------------------
    def _reset(self) -> None:
        shares, self.steps = plan_epoch(self.source.units, self.seed, self.epoch, self.world_size, self.batch_size)
        self.my_units = [self.source.units[i] for i in shares[self.rank]]
        self.sizes = _batch_sizes(sum(u.rows for u in self.my_units), self.steps,
                                  self.batch_size if self.full_batches else None)
        self.windows = [self.my_units[i : i + self.shuffle_units] for i in range(0, len(self.my_units),
                                                                                 self.shuffle_units)]
        start = sum(self.sizes[: self.batch])
        offset, w = 0, 0
        for w, units in enumerate(self.windows):  # the window holding row `start` of this epoch
            n = sum(u.rows for u in units)
            if offset + n > start:
                break
            offset += n
        self._next_window = w
        self._skip = start - offset
        self._window = None  # (parts, labels, position, cursors)
        self._inflight: deque[tuple[int, list[Future]]] = deque()

    @property
    def steps_per_epoch(self) -> int:
        return self.steps

    def _fill_reads(self) -> None:
        in_flight = sum(len(f) for _, f in self._inflight)
        while self._next_window + len(self._inflight) < len(self.windows) and (
                not self._inflight or in_flight < self.prefetch):
            w = self._next_window + len(self._inflight)
            # rows arrive in a seeded random order (see the class docstring)
            futures = [self.source.submit(u, shuffle_seed=[self.seed, self.epoch, self.rank, w, j, 0x0DE])
                       for j, u in enumerate(self.windows[w])]
            self._inflight.append((w, futures))
            in_flight += len(futures)

    def _load_window(self) -> None:
        self._fill_reads()
        w, futures = self._inflight.popleft()
        parts = [f.result() for f in futures]
        sizes = [len(next(iter(p.values()))) for p in parts]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, w, 0x1AB])
        labels = np.repeat(np.arange(len(parts), dtype=np.int32), sizes)
        rng.shuffle(labels)
        cursors = np.zeros(len(parts), dtype=np.int64)
        position = 0
        if self._skip:
            cursors += np.bincount(labels[: self._skip], minlength=len(parts))
            position, self._skip = self._skip, 0
        self._window = (parts, labels, position, cursors)
        self._next_window = w + 1
        self._fill_reads()

    def _take(self, n: int, out: dict[str, np.ndarray], at: int) -> int:
        """Copy up to n rows of the current window into ``out`` from row ``at``; returns how many."""
        parts, labels, position, cursors = self._window
        n = min(n, len(labels) - position)
        counts = np.bincount(labels[position : position + n], minlength=len(parts))
        for j in np.nonzero(counts)[0]:
            for k, v in parts[j].items():  # the next counts[j] rows of the (already permuted) row group
                out[k][at : at + counts[j]] = v[cursors[j] : cursors[j] + counts[j]]
            at += counts[j]
        self._window = (parts, labels, position + n, cursors + counts)
        return n

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch == self.steps:
            self.epoch += 1
            self.batch = 0
            self._reset()
        size = self.sizes[self.batch]
        out, done = None, 0
        while done < size:
            if self._window is None or self._window[2] == len(self._window[1]):
                self._load_window()
            if out is None:
                first = self._window[0][0]
                out = {k: np.empty((size,) + v.shape[1:], dtype=v.dtype) for k, v in first.items()}
            done += self._take(size - done, out, done)
        self.batch += 1
        return {k: t.to(self.device) for k, t in self.source.to_tensors(out).items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "full_batches": self.full_batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise DataError(f"the data cursor was saved with {state['world_size']} ranks; this run has "
                            f"{self.world_size}: resume with the same number of processes")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        # only one process cuts full batches; anything but a saved true (an older cursor) keeps them equal
        self.full_batches = state.get("full_batches", False) is True and self.world_size == 1
        self._reset()
