"""Where metrics go: a small ``Tracker`` protocol; :class:`NullTracker` drops everything."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

__all__ = ["Tracker", "NullTracker"]


@runtime_checkable
class Tracker(Protocol):
    """What the trainer needs from a tracking backend (only rank 0 ever gets a real one)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Accepts everything, records nothing (ranks other than 0, and fits without tracking)."""

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def finish(self, status="FINISHED"):
        pass
