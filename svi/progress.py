"""Progress bars: one per phase of a fit (warm start, full-data pass, fit, k-hat) or nothing.

The one place that decides whether a bar is shown, so every phase follows the same rule: only
on rank 0 (other ranks run the same phases in step with it), and only when ``progress`` is
``True``, or ``"auto"`` with stderr (where tqdm writes) a terminal. Where no bar is shown,
callers log their plain lines instead, so a log file or a CI job gets one line per phase rather
than carriage-return noise. Modules that compute (svi.warmstart) take a callback and know
nothing of bars.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, Mapping

__all__ = ["shown", "bar", "counted"]


def shown(setting: bool | str, rank: int = 0) -> bool:
    """Whether bars are shown for ``progress=setting`` on ``rank``."""
    if rank != 0:
        return False
    return bool(setting) if setting != "auto" else sys.stderr.isatty()


def bar(setting: bool | str, rank: int = 0, **kwargs: Any):
    """A ``tqdm`` bar (``kwargs`` as tqdm takes them) when :func:`shown`, else ``None``."""
    if not shown(setting, rank):
        return None
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)


def counted(chunks: Iterable[Mapping[str, Any]], setting: bool | str, rank: int = 0, desc: str = "",
            total: int | None = None, leave: bool = True) -> Iterator[Mapping[str, Any]]:
    """``chunks`` (dicts of row tensors) passed through, with a bar of the rows done when shown.

    A chunk counts as done once the consumer asks for the next one, so the bar says how far the
    pass has got, not how far the reading threads have read ahead. The bar closes when the pass
    ends or is abandoned.
    """
    progress = bar(setting, rank, desc=desc, total=total, unit="row", unit_scale=True, leave=leave)
    if progress is None:
        yield from chunks
        return
    try:
        for chunk in chunks:
            yield chunk
            progress.update(len(next(iter(chunk.values()))))
    finally:
        progress.close()
