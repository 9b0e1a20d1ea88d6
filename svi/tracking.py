"""Where metrics go: a small ``Tracker`` protocol, :class:`NullTracker`, and
:class:`MLflowTracker` (rank 0 only).

The MLflow tracker talks to the store through ``MlflowClient`` (no global active run).
A server that cannot be reached at start is an error before any training. After that,
every operation (metrics, params, tags, artifacts, model registration, the final status)
goes through one background thread in order, so a lost or hung server never stalls a
step: the thread retries every ``retry_seconds``. Artifacts are uploaded from files that
stay on disk (the run's output folder), so nothing is lost while the client backs off.
What is still unsent when the fit ends is written to ``unsent-mlflow-<run>.jsonl`` beside
the checkpoints, and ``svi sync <folder>`` (or the next resume of the run) sends it and
closes the run with its true status.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable
from urllib.parse import urlsplit

from svi.fitrecord import FitRecord

__all__ = ["Tracker", "NullTracker", "MLflowTracker", "TrackingError", "RunNotFoundError", "flatten",
           "DEFAULT_TRACKING_URI", "apply_op", "read_spool", "write_spool", "sync", "fit_status_tags", "tracker_for_fit",
           "log_fit_start", "log_fit_outputs", "elbo_plot", "RUN_ID_FILE"]

log = logging.getLogger("svi")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


class RunNotFoundError(TrackingError):
    """The store answers, but the run to continue is not in it (a new store, or the run was deleted).

    Args:
        message: what happened and what to do.
        run_id: the run that was asked for.
        tracking_uri: the store that was asked.
    """

    def __init__(self, message: str, run_id: str | None = None, tracking_uri: str | None = None):
        super().__init__(message)
        self.run_id = run_id
        self.tracking_uri = tracking_uri


@runtime_checkable
class Tracker(Protocol):
    """What the trainer needs from a tracking backend (only rank 0 ever gets a real one)."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...

    def commit(self) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Accepts everything, records nothing (ranks other than 0, and fits without tracking)."""

    run_id = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def commit(self):
        pass

    def finish(self, status="FINISHED"):
        pass


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay as JSON text."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
    return out


def _quick_http_failures() -> None:
    # MLflow retries a failed request 7 times with exponential backoff (minutes in all); the
    # probe and the mid-run sends should fail fast instead. A user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


class MLflowTracker:
    """Logs a fit to MLflow.

    Args:
        tracking_uri: store URI (``sqlite:///mlflow.db``, ``http://host:5000``, a folder ...);
            ``MLFLOW_TRACKING_URI`` when ``None``, else the embedded default ``sqlite:///mlflow.db``.
        experiment: experiment name (created when missing).
        run_name: name of a new run.
        run_id: continue this run instead (resume); :class:`RunNotFoundError` when the store does
            not hold it (told apart from a store that cannot be reached: :class:`TrackingError`).
        system_metrics: also log CPU/GPU/memory with MLflow's system metrics monitor.
        spool_dir: where unsent metrics are written if the server never comes back.
        retry_seconds: after a failed send, wait this long before trying again (in the background).
        finish_wait: at the end, how long to wait for a lost server before spooling what is unsent.
        hold_metrics: keep metrics until :meth:`commit` (called after each checkpoint), so a run
            resumed from its last checkpoint never logs a step twice.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "svi", run_name: str | None = None,
                 run_id: str | None = None, system_metrics: bool = False, spool_dir: str | os.PathLike | None = None,
                 retry_seconds: float = 20.0, hold_metrics: bool = False, finish_wait: float = 30.0):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        _quick_http_failures()
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        created = run_id is None
        try:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            if run_id is None:
                run = self.client.create_run(exp_id, run_name=run_name, tags=_default_tags())
                run_id = run.info.run_id
            else:
                if self.client.get_run(run_id).info.lifecycle_stage == "deleted":
                    raise RunNotFoundError(f"MLflow run {run_id} was deleted from the tracking store "
                                           f"{self.tracking_uri!r}", run_id, self.tracking_uri)
                self.client.update_run(run_id, status="RUNNING")
        except RunNotFoundError:
            raise
        except Exception as e:  # any failure of the store at start must stop the fit before training
            if not created and isinstance(e, MlflowException) and e.error_code == "RESOURCE_DOES_NOT_EXIST":
                # the store answered "no such run" (SQL and file stores and a server alike): blaming the
                # server or the URI would send the user the wrong way
                raise RunNotFoundError(f"MLflow run {run_id} is not in the tracking store {self.tracking_uri!r}",
                                       run_id, self.tracking_uri) from None
            raise TrackingError(
                f"cannot use the MLflow tracking store at {self.tracking_uri!r}: {type(e).__name__}: {e}. "
                "Start the server, fix tracking_uri (or MLFLOW_TRACKING_URI), or turn tracking off."
            ) from None
        self.run_id = run_id
        self.created = created  # this tracker started the run (a fresh fit, or a resume into a new run)
        self.experiment_id = exp_id
        self.spool_dir = Path(spool_dir) if spool_dir else None
        self.retry_seconds = retry_seconds
        self.finish_wait = finish_wait
        self.hold_metrics = hold_metrics
        self._held: list = []
        self._sender = _Sender(self.client, run_id, self.tracking_uri, retry_seconds)
        self._remove_when_sent: list[Path] = []
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, tracking_uri=self.tracking_uri, resume_logging=True)
            self._monitor.start()

    # --- everything goes through the sender thread: training never waits for the server ----------
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._sender.put({"op": "params", "params": {k: str(v)[:6000] for k, v in flatten(params).items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        new = [[k, float(v), now, int(step)] for k, v in metrics.items()]
        if self.hold_metrics:
            self._held += new
            return
        self._sender.put({"op": "metrics", "metrics": new})

    def commit(self) -> None:
        """Send the metrics held since the last checkpoint."""
        if self._held:
            self._sender.put({"op": "metrics", "metrics": self._held})
        self._held = []

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._sender.put({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Upload a local file or folder; it must stay in place until sent (or be spooled by path)."""
        self._sender.put({"op": "artifact", "path": os.path.abspath(path), "artifact_path": artifact_path})

    def register_model(self, name: str, path: str | os.PathLike) -> None:
        """Log the MLflow model folder ``path`` (written by :func:`svi.posterior.save_mlflow_model`) as
        a logged model of the run and register it as a new version of model ``name`` (in the
        background, like every other operation; see :func:`apply_op`). The folder must stay in place
        until sent, as for :meth:`log_artifact`."""
        self._sender.put({"op": "register", "name": name, "path": os.path.abspath(path)})

    def remove_when_sent(self, folder: str | os.PathLike) -> None:
        """Delete ``folder`` (a temporary home of artifacts) once everything has been sent."""
        self._remove_when_sent.append(Path(folder))

    def adopt_spool(self, folder: str | os.PathLike | None = None) -> int:
        """Queue what an earlier process of this run spooled in ``folder`` (a resume sends it now);
        the status it recorded is dropped, as the run goes on. Returns the number of operations."""
        ops = []
        for path in sorted(Path(folder or self.spool_dir or ".").glob(f"unsent-mlflow-{self.run_id}.jsonl")):
            ops += [op for op in read_spool(path)[1] if op["op"] != "status"]
            path.unlink()
        for op in ops:
            self._sender.put(op)
        return len(ops)

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is held and the final status; wait up to ``finish_wait`` seconds for a lost
        server, then write whatever is still unsent to ``unsent-mlflow-<run>.jsonl`` for ``svi sync``."""
        if self._monitor is not None:
            self._monitor.finish()
        self.commit()
        self._sender.put({"op": "status", "status": status})
        unsent = self._sender.close(self.finish_wait)
        if unsent:
            self._spool(unsent)
            return
        for folder in self._remove_when_sent:
            shutil.rmtree(folder, ignore_errors=True)

    def _spool(self, ops: list[dict]) -> None:
        target = self.spool_dir or Path(".")
        f = target / f"unsent-mlflow-{self.run_id}.jsonl"
        write_spool(f, self.run_id, self.tracking_uri, ops)
        metrics = sum(len(op["metrics"]) for op in ops if op["op"] == "metrics")
        artifacts = sum(op["op"] == "artifact" for op in ops)
        warnings.warn(f"svi: MLflow at {self.tracking_uri} stayed unreachable; {metrics} metrics, {artifacts} artifacts "
                      f"and the run's status are kept in {f} (the checkpoints and outputs are complete on disk). "
                      f"Send them when the server is back with:  svi sync {target}", RuntimeWarning, stacklevel=2)


class _Sender:
    """A thread that applies tracking operations in order, retrying a lost server every
    ``retry_seconds`` without blocking the caller (a hung server stalled training ~30 s per try).

    Operations are plain JSON-able dicts (see :func:`apply_op`), so what is unsent at the end can
    be spooled to disk and replayed by another process with the same code.
    """

    def __init__(self, client, run_id: str, tracking_uri: str, retry_seconds: float):
        self.client, self.run_id, self.tracking_uri, self.retry_seconds = client, run_id, tracking_uri, retry_seconds
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.closing = False
        self.gave_up = False
        self.lost = False
        self.gaps: list[str] = []
        self.thread = threading.Thread(target=self._run, name=f"svi-mlflow-{run_id[:8]}", daemon=True)
        self.thread.start()

    def put(self, op: dict) -> None:
        with self.cond:
            self.queue.append(op)
            self.cond.notify_all()

    def close(self, wait: float) -> list[dict]:
        """Let the queue drain for up to ``wait`` seconds (retrying often); return what is left."""
        deadline = time.monotonic() + wait
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            while self.queue and time.monotonic() < deadline:
                self.cond.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            self.gave_up = True
            self.cond.notify_all()
            left = list(self.queue)
        self.thread.join(timeout=1.0)
        if left and self.gaps and left[-1]["op"] == "status":  # the gaps go with the status, spooled or not
            left.insert(len(left) - 1, {"op": "tags", "tags": {"svi.tracking_gaps": "; ".join(self.gaps)[:5000]}})
        return left

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if self.gave_up or not self.queue:
                    return
                op = self.queue[0]
            if op["op"] == "status" and self.gaps:
                op = {**op, "gaps": "; ".join(self.gaps)[:5000]}
            if self._send(op):
                with self.cond:
                    if self.queue and self.queue[0]["op"] == op["op"]:
                        self.queue.popleft()
                    self.cond.notify_all()
                continue
            with self.cond:  # lost: try again later, sooner once the fit is ending
                if not self.gave_up:
                    self.cond.wait(timeout=min(2.0, self.retry_seconds) if self.closing else self.retry_seconds)

    def _send(self, op: dict) -> bool:
        try:
            note = apply_op(self.client, self.run_id, op)
        except Exception as e:  # a lost server: keep the operation, keep training, try later
            if not self.lost:
                self.lost = True
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                warnings.warn(f"svi: MLflow at {self.tracking_uri} did not accept {op['op']} ({type(e).__name__}"
                              f"{': ' + reason if reason else ''}); training goes on, everything is kept and sent "
                              "when it answers", RuntimeWarning, stacklevel=2)
                self.gaps.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} lost ({type(e).__name__})")
            return False
        if self.lost:
            self.lost = False
            self.gaps.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} back")
        if note:
            self.gaps.append(note)
        return True


def apply_op(client, run_id: str, op: Mapping[str, Any]) -> str | None:
    """Send one tracking operation (``params``, ``metrics``, ``tags``, ``artifact``, ``register``,
    ``status``) to MLflow; raises whatever MLflow raises. Returns a note for the run's gap tag."""
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "params":
        items = [Param(k, v) for k, v in op["params"].items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    elif kind == "metrics":
        items = [Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]]
        for i in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[i : i + 1000])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
    elif kind == "artifact":
        path = Path(op["path"])
        if not path.exists():  # an older checkpoint rotated away before the server answered
            return f"artifact {path.name} not uploaded (removed locally before the server answered)"
        send = client.log_artifacts if path.is_dir() else client.log_artifact
        send(run_id, os.fspath(path), op.get("artifact_path"))
    elif kind == "register":
        try:
            client.get_registered_model(op["name"])
        except Exception:  # not registered yet
            client.create_registered_model(op["name"])
        if "path" not in op:  # a spool written by an svi that registered the run artifact itself
            client.create_model_version(op["name"], source=f"runs:/{run_id}/posterior", run_id=run_id)
            return None
        path = Path(op["path"])
        if not path.is_dir():
            return f"model {op['name']} not registered ({path} removed locally before the server answered)"
        _log_and_register(client, run_id, op, path)
    elif kind == "status":
        if op.get("gaps"):
            client.set_tag(run_id, "svi.tracking_gaps", op["gaps"])
        client.set_terminated(run_id, op["status"])
    else:
        raise ValueError(f"unknown tracking operation {kind!r}")
    return None


def _log_and_register(client, run_id: str, op: dict, folder: Path) -> None:
    """Log ``folder`` (an MLflow model folder) as an MLflow 3 *logged model* of run ``run_id`` and
    register it as a new version of ``op["name"]``.

    MLflow 3's registry and its Models pages read a version's signature from the logged model it
    points to; a version made from plain run artifacts (``runs:/<run>/posterior``) shows "Inputs (0)".
    This is what ``mlflow.pyfunc.log_model(name=..., registered_model_name=...)`` does (create the
    logged model, link it to the run as an output, upload the folder, register ``models:/<model_id>``),
    done with the tracker's own ``MlflowClient``: ``log_model`` works through MLflow's process-wide
    fluent state (the global tracking URI, the thread's active run and experiment), which svi never
    touches. Without an active run it even puts the model in experiment 0 with no source run. The
    folder's ``MLmodel`` already holds the signature and the pinned requirements, so the logged model,
    its registered version and the run's ``posterior`` artifact are the same files.

    A retry after a lost server reuses the logged model recorded in ``op["model_id"]`` (the op is
    kept, and spooled, with it) and creates no second version for it.
    """
    import tempfile

    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    if not op.get("model_id"):
        experiment = client.get_run(run_id).info.experiment_id
        op["model_id"] = client.create_logged_model(experiment, name="posterior", source_run_id=run_id).model_id
        client.log_outputs(run_id, [LoggedModelOutput(op["model_id"], step=0)])
    model = client.get_logged_model(op["model_id"])
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        shutil.copytree(folder, staged)
        mlmodel = Model.load(os.fspath(staged / "MLmodel"))
        # what log_model writes into a logged model's MLmodel: where it lives and whose it is
        mlmodel.model_id = mlmodel.model_uuid = model.model_id
        mlmodel.run_id, mlmodel.artifact_path = run_id, model.artifact_location
        mlmodel.save(os.fspath(staged / "MLmodel"))
        client.log_model_artifacts(model.model_id, os.fspath(staged))
    client.finalize_logged_model(model.model_id, "READY")
    # A server resolves a "models:/<model_id>" source in its own store (the version page then links
    # the logged model). A database store opened in this process resolves it through MLflow's
    # process-wide default tracking URI instead (a TODO in MLflow's sqlalchemy registry), which
    # need not be this store: registration failed whenever it was not (seen in the test suite). There
    # the source is the logged model's storage location; the registry still shows its schema.
    remote = urlsplit(str(client.tracking_uri)).scheme in ("http", "https", "databricks")
    source = f"models:/{model.model_id}" if remote else model.artifact_location
    if not any(v.source == source for v in client.search_model_versions(f"name='{op['name']}'")):
        client.create_model_version(op["name"], source=source, run_id=run_id, model_id=model.model_id)


# --- the spool: what a lost server did not get, replayed by `svi sync` or the next resume ------
SPOOL_FORMAT = 1


def write_spool(path: Path, run_id: str, tracking_uri: str, ops: list[dict]) -> None:
    """Write ``ops`` after a header line naming the run and the store (atomically)."""
    from svi.checkpoint import atomic_write_text

    lines = [json.dumps({"svi_spool": SPOOL_FORMAT, "run_id": run_id, "tracking_uri": tracking_uri})]
    lines += [json.dumps(op) for op in ops]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_spool(path: Path) -> tuple[dict, list[dict]]:
    """(header, operations) of a spool file.

    Raises:
        TrackingError: a file that is not an svi spool.
    """
    try:
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise TrackingError(f"{path} is not a readable svi spool file: {e}") from None
    if not lines or not isinstance(lines[0], dict) or lines[0].get("svi_spool") != SPOOL_FORMAT:
        raise TrackingError(f"{path} is not an svi spool file (no header line); it was not written by this svi")
    ops = lines[1:]
    if not all(isinstance(op, dict) and op.get("op") in _OPS for op in ops):
        raise TrackingError(f"{path} holds an unknown operation; it was not written by this svi")
    for op in ops:
        if op["op"] in ("artifact", "register") and "path" in op and \
                not _svi_output(Path(op.get("path", "")), Path(path).parent):
            # a spool is data: it may not make svi upload a file it did not write (a key, a password file)
            raise TrackingError(f"{path} asks to upload {op.get('path')!r}, which is neither beside the spool nor in "
                                "a temporary svi-outputs folder; it was not written by svi")
    return lines[0], ops


def _svi_output(path: Path, spool_folder: Path) -> bool:
    """Whether ``path`` lies where svi writes artifacts: beside the spool (checkpoints, outputs) or in
    a temporary ``svi-outputs-*`` folder (fits without a checkpoint folder)."""
    import tempfile

    target = path.resolve()
    if target.is_relative_to(spool_folder.resolve()):
        return True
    tmp = Path(tempfile.gettempdir()).resolve()
    return target.is_relative_to(tmp) and target.relative_to(tmp).parts[:1] != () and \
        target.relative_to(tmp).parts[0].startswith("svi-outputs-")


_OPS = {"params", "metrics", "tags", "artifact", "register", "status"}


def sync(folder: str | os.PathLike, tracking_uri: str | None = None) -> list[tuple[str, int, str | None]]:
    """Replay every ``unsent-mlflow-*.jsonl`` in ``folder`` into its run, closing the run with the
    status it recorded. A file is removed once all of it is sent; when the server fails part way
    the file keeps exactly what is still unsent, so running ``svi sync`` again never repeats a step.

    Returns:
        (run id, operations sent, final status or None) for each file.

    Raises:
        TrackingError: the store is still unreachable (nothing is lost), or a file is not a spool.
    """
    from mlflow.tracking import MlflowClient

    _quick_http_failures()
    done = []
    files = sorted(Path(folder).glob("unsent-mlflow-*.jsonl"))
    if not files:
        raise TrackingError(f"{folder} holds no unsent-mlflow-*.jsonl file: nothing to send")
    for path in files:
        header, ops = read_spool(path)
        uri = tracking_uri or header["tracking_uri"]
        client = MlflowClient(uri)
        status = None
        for i, op in enumerate(ops):
            try:
                apply_op(client, header["run_id"], op)
            except Exception as e:  # still lost: keep exactly the unsent part for the next try
                write_spool(path, header["run_id"], header["tracking_uri"], ops[i:])
                raise TrackingError(f"MLflow at {uri} did not accept run {header['run_id']}'s {op['op']} "
                                    f"({type(e).__name__}: {e}); {len(ops) - i} operations stay in {path}: "
                                    "run svi sync again when the server answers") from None
            status = op.get("status", status)
        path.unlink()
        done.append((header["run_id"], len(ops), status))
    return done


RUN_ID_FILE = "mlflow_run_id"


def tracker_for_fit(opts, rank: int, resume) -> Tracker:
    """MLflow on rank 0. A fit that resumes (or restarts under torchrun before its first
    checkpoint) continues the run recorded beside its checkpoints.

    When the store does not hold that run (a new tracking URI, a deleted ``mlflow.db``), the fit
    says so in one line and continues in a new run there, tagged with the old run, its store and
    the step it resumes from; with ``missing_run="error"`` it raises :class:`RunNotFoundError`.

    Args:
        opts: the fit's :class:`svi.options.FitOptions`.
        rank: this process's rank (only rank 0 tracks).
        resume: (path, payload) of the checkpoint the fit resumes from, or None.
    """
    from svi.checkpoint import atomic_write_text, is_file, join, local_folder, read_text

    if not opts.tracking or rank != 0:
        return NullTracker()
    run_id = resume[1].get("run_id") if resume is not None else None
    marker = join(opts.checkpoint_dir, RUN_ID_FILE) if opts.checkpoint_dir else None
    if run_id is None and marker is not None and opts.resume is not False and is_file(marker):
        run_id = read_text(marker).strip() or None
    # the spool lists local files to upload, so it stays on this machine: beside local checkpoints,
    # else in the working folder (as for a fit without checkpoints)
    local = local_folder(opts.checkpoint_dir)
    kw = dict(system_metrics=opts.system_metrics, spool_dir=local, hold_metrics=bool(opts.checkpoint_dir),
              finish_wait=opts.tracking_wait)
    try:
        tracker = MLflowTracker(opts.tracking_uri, opts.experiment, opts.run_name, run_id=run_id, **kw)
    except RunNotFoundError as e:
        # checkpoints written before the store was recorded do not say where the run is
        old_store = resume[1].get("tracking_uri") if resume is not None else None
        source = f"checkpoint {resume[0]}" if resume is not None else f"{marker}"
        if opts.missing_run == "error":
            where = f" (in {old_store!r})" if old_store else ""
            back = (f", or set tracking_uri to {old_store!r} to continue it there"
                    if old_store and old_store != e.tracking_uri else "")
            raise RunNotFoundError(f"{e}; {source} belongs to it{where}. Set missing_run='new' "
                                   f"(tracking.missing_run=new in a job config) to continue in a new run in this "
                                   f"store{back}", run_id, e.tracking_uri) from None
        step = int(resume[1]["ranks"][0]["state"]["step"]) if resume is not None else 0
        tracker = MLflowTracker(opts.tracking_uri, opts.experiment, opts.run_name, **kw)
        password = urlsplit(old_store).password if old_store else None  # a tag is no place for a database password
        tracker.set_tags({"svi.resumed_from_run": run_id, "svi.resumed_from_step": str(step),
                          "svi.resumed_from_store": (old_store.replace(password, "***") if password else old_store)
                          or "unknown"})
        log.warning("%s (%s names it); continuing from step %d in a new run %s there, tagged "
                    "svi.resumed_from_run", e, source, step, tracker.run_id)
    if not tracker.created and opts.checkpoint_dir:  # the same run goes on: send what an outage left unsent
        sent = tracker.adopt_spool(local)
        if sent:
            log.info("sending %d tracking operations that an earlier tracking outage left in %s", sent,
                     local or os.getcwd())
    if marker is not None:
        atomic_write_text(marker, tracker.run_id)
    return tracker


def log_fit_start(tracker: Tracker, opts, model, space, fingerprints: Mapping[str, str], num_rows: int,
                  world_size: int, family: str) -> None:
    """A new run's parameters (options, model, data fingerprints, versions), the checkpoint folder
    as a tag, and the job file beside the checkpoints as an artifact, so ``svi resume <run id>``
    can rebuild the job elsewhere."""
    import dask
    import torch

    import svi
    from svi.checkpoint import JOB_FILE, local_folder

    tracker.log_params({
        "options": opts.as_dict(),
        "model": {"class": model.spec()["class"], "params": {b.name: f"{list(b.shape)} {b.constraint!r}"
                                                             for b in space.blocks}},
        "fingerprint": dict(fingerprints), "num_rows": num_rows, "world_size": world_size, "family": family,
        "versions": {"svi": svi.__version__, "torch": torch.__version__, "dask": dask.__version__},
    })
    if opts.checkpoint_dir:  # an empty tag is a name with no value in the run page's tag list
        local = local_folder(opts.checkpoint_dir)
        tracker.set_tags({"svi.checkpoint_dir": os.path.abspath(local) if local is not None else opts.checkpoint_dir})
        if local is not None and (local / JOB_FILE).is_file():  # a remote job.yaml stays beside its checkpoints
            tracker.log_artifact(str(local / JOB_FILE))


def log_fit_outputs(post, tracker: Tracker, opts) -> None:
    """Posterior, summary table, ELBO plot and config as run artifacts; the posterior registered
    in the model registry when asked.

    The files are written to the run's own folder first (``<checkpoint_dir>/outputs``, else a
    temporary folder removed once everything is sent) and uploaded from there in the tracker's
    background thread, so a tracking outage loses none of them: what is unsent is spooled by
    path and ``svi sync`` uploads it later.
    """
    if not isinstance(tracker, MLflowTracker):
        return
    import dataclasses
    import tempfile

    from svi.checkpoint import local_folder
    from svi.posterior import save_mlflow_model

    if local_folder(opts.checkpoint_dir):  # uploads read local files: a remote folder gets a temporary one
        folder = local_folder(opts.checkpoint_dir) / "outputs"
        shutil.rmtree(folder, ignore_errors=True)  # a resumed fit's outputs replace the earlier ones
        folder.mkdir(parents=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix="svi-outputs-"))
        tracker.remove_when_sent(folder)
    save_mlflow_model(post, folder / "posterior")
    tracker.log_artifact(str(folder / "posterior"), "posterior")
    post.summary().to_csv(folder / "summary.csv", float_format="%.6g")  # Monte Carlo error is far above 17 digits
    tracker.log_artifact(str(folder / "summary.csv"))
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(opts), indent=1, default=str))
    tracker.log_artifact(str(folder / "config.json"))
    if post.info.history:
        elbo_plot(post.info.history, folder / "elbo.png")
        tracker.log_artifact(str(folder / "elbo.png"))
    if opts.register_model:  # a logged model of the run, so the registry shows its signature
        tracker.register_model(opts.register_model, folder / "posterior")


def elbo_plot(history, path: Path) -> None:
    """The ELBO per window as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO (window mean)")
    ax.set_title("svi fit")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fit_status_tags(info: FitRecord) -> dict[str, str]:
    """Tags that tell an unconverged or untrustworthy fit apart in the MLflow run list and run page:
    ``svi.status`` (one word a run-list column can show), ``svi.converged``, ``svi.stop_reason``,
    ``svi.khat`` and the run description (``mlflow.note.content``).

    Args:
        info: the fit's record (a :class:`svi.fitrecord.FitRecord`; a dict of its fields is read as one).
    """
    info = FitRecord.from_dict(info)
    khat = info.khat
    trusted = khat is None or khat <= 0.7
    if info.converged and trusted:
        status = "converged"
    elif info.converged:
        status = "converged, k-hat high"
    else:
        status = "NOT converged" + ("" if trusted else ", k-hat high")
    lines = [f"**{status}**: {info.reason} ({info.steps} steps)."]
    if khat is not None:
        verdict = "good" if khat < 0.5 else "fair" if khat <= 0.7 else "poor: do not trust the draws"
        rows = info.khat_rows if info.khat_rows is not None else "?"
        lines.append(f"PSIS k-hat {khat:.3f} on {rows} rows ({verdict}).")
    tags = {"svi.status": status, "svi.converged": str(bool(info.converged)).lower(),
            "svi.stop_reason": info.stop_reason, "mlflow.note.content": "\n\n".join(lines)}
    if khat is not None:
        tags["svi.khat"] = f"{khat:.3f}"
    return tags


def _default_tags() -> dict[str, str]:
    tags = {"host": socket.gethostname()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags
