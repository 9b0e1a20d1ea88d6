"""What a fit records about itself: a typed, frozen record, built once before the posterior
is saved or logged.

``Posterior.info`` is a :class:`FitRecord`. It is written by one place (``svi.fit``, with the
end-of-fit PSIS k-hat already in it) and never changed in place: what comes later (a k-hat from
:func:`svi.diagnostics.diagnose`, columns added for serving) makes a new record with
:meth:`FitRecord.replace`. On disk it is the same flat JSON object as before (``posterior.json``'s
``info``), so posteriors saved by earlier versions load: a missing key takes its default, and a key
this version does not know is kept, unchanged, in :attr:`FitRecord.extra` and written back on save.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from svi.model import _jsonable

__all__ = ["FitRecord"]


@dataclass(frozen=True)
class FitRecord:
    """Fit information of a posterior (``post.info``).

    Args:
        steps: optimisation steps taken.
        converged: whether a stopping rule (not ``max_steps``) ended the fit.
        reason: why it stopped, in words.
        stop_reason: why it stopped, as a key (``converged``, ``max_steps``, ...).
        warm_start: how q was initialised (``""`` when it was not warm-started).
        eta: the step-size scale the fit used (``None`` with Adam).
        nonfinite_steps: steps skipped for a non-finite ELBO or gradient.
        seconds: wall time of the optimisation.
        num_rows: rows in the data set (N).
        batch_size: rows per step and rank.
        dropped_rows: rows a filter dropped before the fit.
        world_size: processes of the fit.
        fingerprints: fingerprints of the model spec and data.
        options: the fit's options (:class:`svi.options.FitOptions` as a dict).
        history: ``(step, ELBO window mean)`` pairs.
        heldout_lpd: ``(step, seconds, held-out lpd)`` triples.
        run_id: the fit's MLflow run, or ``None``.
        columns: the {batch key: columns} mapping the fit was given, or ``None``.
        resolved_columns: that mapping with patterns expanded, or ``None``.
        data_path: the data set's path (recorded for path or Parquet data), or ``None``.
        job: the job's config (``svi fit``), or ``None``.
        truth: the data set's known truth (synthetic jobs), or ``None``.
        khat: PSIS k-hat of q, or ``None`` when not computed.
        khat_rows: rows the k-hat was computed on, or ``None``.
        extra: any other JSON-able information (keys a caller's ``record`` adds, or that a newer
            svi wrote); saved at the top level of ``info`` beside the fields.
    """

    steps: int = 0
    converged: bool = False
    reason: str = ""
    stop_reason: str = ""
    warm_start: str = ""
    eta: float | None = None
    nonfinite_steps: int = 0
    seconds: float = 0.0
    num_rows: int = 0
    batch_size: int = 0
    dropped_rows: int = 0
    world_size: int = 1
    fingerprints: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    history: list = field(default_factory=list)
    heldout_lpd: list = field(default_factory=list)
    run_id: str | None = None
    columns: Mapping[str, Any] | None = None
    resolved_columns: Mapping[str, Any] | None = None
    data_path: Any = None
    job: Mapping[str, Any] | None = None
    truth: Any = None
    khat: float | None = None
    khat_rows: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, info: Mapping[str, Any] | None) -> "FitRecord":
        """A record from the flat ``info`` object of ``posterior.json`` (or ``svi.fit``'s pieces).

        Missing keys take their defaults (older files); unknown keys go to :attr:`extra`.
        """
        if isinstance(info, FitRecord):
            return info
        info = dict(info or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = dict(info.pop("extra", None) or {}) if isinstance(info.get("extra"), Mapping) else {}
        known = {k: info.pop(k) for k in list(info) if k in names}
        return cls(**known, extra={**extra, **info})

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON-able object saved as ``info``: the fields, then :attr:`extra`'s keys."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return _jsonable({**dict(self.extra), **out})

    def replace(self, **changes: Any) -> "FitRecord":
        """A new record with ``changes``; this one is left as it is."""
        return dataclasses.replace(self, **changes)

    # Read-only dict-style access, kept for code written against the dict ``info`` of earlier
    # versions (``post.info["steps"]``, ``post.info.get("khat")``); new code reads attributes.
    # Item assignment and deletion raise TypeError naming ``replace``.
    def __getitem__(self, key: str) -> Any:
        if key != "extra" and key in _FIELD_NAMES:
            return getattr(self, key)
        if key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError(f"post.info is a frozen FitRecord: it cannot be changed in place (info[{key!r}] = ...); "
                        f"make a new one with post.info = post.info.replace({key}=...)")

    def __delitem__(self, key: str) -> None:
        raise TypeError(f"post.info is a frozen FitRecord: it cannot be changed in place (del info[{key!r}]); "
                        f"make a new one with post.info.replace(...)")

    def __contains__(self, key: object) -> bool:
        return (key != "extra" and key in _FIELD_NAMES) or key in self.extra

    def keys(self) -> Iterator[str]:
        return iter(self.to_dict())


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(FitRecord))
