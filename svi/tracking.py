"""Where metrics go: a small ``Tracker`` protocol, :class:`NullTracker`, and
:class:`MLflowTracker` (rank 0 only).

The MLflow tracker talks to the store through ``MlflowClient`` (no global active run).
A server that cannot be reached at start is an error before any training. A server lost
mid-run does not stop training: metrics are buffered and sent when it answers again;
artifacts that fail are retried at the end; whatever still cannot be sent is written
next to the checkpoints and the gap is reported.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

__all__ = ["Tracker", "NullTracker", "MLflowTracker", "TrackingError", "flatten", "DEFAULT_TRACKING_URI"]

log = logging.getLogger("svi")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


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
        run_id: continue this run instead (resume).
        system_metrics: also log CPU/GPU/memory with MLflow's system metrics monitor.
        spool_dir: where unsent metrics are written if the server never comes back.
        retry_seconds: after a failed send, wait this long before trying again.
        hold_metrics: keep metrics until :meth:`commit` (called after each checkpoint), so a run
            resumed from its last checkpoint never logs a step twice.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "svi", run_name: str | None = None,
                 run_id: str | None = None, system_metrics: bool = False, spool_dir: str | os.PathLike | None = None,
                 retry_seconds: float = 20.0, hold_metrics: bool = False):
        from mlflow.tracking import MlflowClient

        _quick_http_failures()
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            if run_id is None:
                run = self.client.create_run(exp_id, run_name=run_name, tags=_default_tags())
                run_id = run.info.run_id
            else:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
        except Exception as e:  # any failure of the store at start must stop the fit before training
            raise TrackingError(
                f"cannot use the MLflow tracking store at {self.tracking_uri!r}: {type(e).__name__}: {e}. "
                "Start the server, fix tracking_uri (or MLFLOW_TRACKING_URI), or turn tracking off."
            ) from None
        self.run_id = run_id
        self.experiment_id = exp_id
        self.spool_dir = Path(spool_dir) if spool_dir else None
        self.retry_seconds = retry_seconds
        self.hold_metrics = hold_metrics
        self._held: list = []
        self._pending_metrics: list = []
        self._pending_artifacts: list[tuple[str, str | None]] = []
        self._failed_at: float | None = None
        self._gaps: list[str] = []
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, tracking_uri=self.tracking_uri, resume_logging=True)
            self._monitor.start()

    # --- sending with a buffer ----------------------------------------------------------------
    def _try(self, fn, what: str) -> bool:
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_seconds:
            return False
        try:
            fn()
        except Exception as e:  # a lost server: keep training, keep the data, try later
            if self._failed_at is None:
                warnings.warn(f"svi: MLflow at {self.tracking_uri} did not accept {what} ({type(e).__name__}); "
                              "training goes on, metrics are kept and sent when it answers", RuntimeWarning,
                              stacklevel=3)
                self._gaps.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} lost ({type(e).__name__})")
            self._failed_at = time.monotonic()
            return False
        if self._failed_at is not None:
            self._gaps.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} back")
            self._failed_at = None
        return True

    def _flush_metrics(self) -> bool:
        while self._pending_metrics:
            chunk = self._pending_metrics[:1000]
            if not self._try(lambda: self.client.log_batch(self.run_id, metrics=chunk), "metrics"):
                return False
            del self._pending_metrics[: len(chunk)]
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._try(lambda: self.client.log_batch(self.run_id, params=chunk), "params")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if self.hold_metrics:
            self._held += new
            return
        self._pending_metrics += new
        self._flush_metrics()

    def commit(self) -> None:
        """Send the metrics held since the last checkpoint."""
        self._pending_metrics += self._held
        self._held = []
        self._flush_metrics()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._try(lambda: self.client.log_batch(self.run_id, tags=items), "tags")

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        send = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
        if not self._try(lambda: send(self.run_id, os.fspath(path), artifact_path), f"artifact {path}"):
            self._pending_artifacts.append((os.fspath(path), artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._monitor.finish()
        self._failed_at = None  # one more try for everything held back
        self._pending_metrics += self._held
        self._held = []
        sent = self._flush_metrics()
        retry, self._pending_artifacts = self._pending_artifacts, []
        for path, ap in retry:
            if not Path(path).exists():  # an older checkpoint rotated away while the server was gone
                self._gaps.append(f"artifact {Path(path).name} not uploaded (removed locally before the server answered)")
                continue
            self._failed_at = None
            self.log_artifact(path, ap)
        if not sent or self._pending_artifacts:
            self._spool()
        self._failed_at = None
        if self._gaps:
            self.set_tags({"svi.tracking_gaps": "; ".join(self._gaps)[:5000]})
        self._try(lambda: self.client.set_terminated(self.run_id, status), "run status")

    def _spool(self) -> None:
        target = self.spool_dir or Path(".")
        target.mkdir(parents=True, exist_ok=True)
        f = target / f"unsent-mlflow-{self.run_id}.jsonl"
        with open(f, "a") as out:
            for m in self._pending_metrics:
                out.write(json.dumps({"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}) + "\n")
            for path, ap in self._pending_artifacts:
                out.write(json.dumps({"artifact": path, "artifact_path": ap}) + "\n")
        warnings.warn(f"svi: MLflow at {self.tracking_uri} stayed unreachable; {len(self._pending_metrics)} metrics and "
                      f"{len(self._pending_artifacts)} artifacts are in {f} (the checkpoints are complete)",
                      RuntimeWarning, stacklevel=2)


def _default_tags() -> dict[str, str]:
    tags = {"host": socket.gethostname()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags
