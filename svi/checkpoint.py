"""Atomic, verified checkpoints of the whole training state.

A checkpoint file is a short header (magic, format version, SHA-256 of the payload)
followed by the payload written by ``torch.save``. It is written to a temporary file in
the same folder, fsync'ed, and moved into place with ``os.replace``, so a crash at any
moment leaves either the old set of checkpoints or the new one, never a torn file under
a checkpoint's name. Loading verifies the checksum before anything is unpickled and
unpickles with ``torch.load(weights_only=True)``: plain tensors and containers only.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["JOB_FILE", "CheckpointError", "atomic_write_text", "temporary_name", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint", "remove_stale_temporaries",
           "CHECKPOINT_GLOB"]

MAGIC = b"SVICKPT1"
JOB_FILE = "job.yaml"  # the job's config beside its checkpoints, so `svi resume <folder>` can rebuild it
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.\d+\.tmp$")
CHECKPOINT_GLOB = "ckpt-*.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, altered, or incompatible with this run."""


def temporary_name(path: Path) -> Path:
    """A temporary file beside ``path`` that no other process or thread uses."""
    import threading

    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a private temporary file, then ``os.replace``.
    Several processes may write the same file at once; each reader sees one whole version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _path(folder: Path, step: int) -> Path:
    return folder / f"ckpt-{step:09d}.pt"


def save_checkpoint(folder: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 3,
                    before_replace: Callable[[Path], None] | None = None) -> Path:
    """Write ``state`` as checkpoint ``step`` atomically and keep only the newest ``keep``.

    Args:
        folder: checkpoint folder (created).
        step: the optimisation step the state is at; names the file.
        state: nested dicts/lists of tensors and plain Python values.
        keep: how many checkpoints to keep (older ones are deleted after the new one is in place).
        before_replace: test hook called with the temporary file between write and rename.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    final = _path(folder, step)
    tmp = temporary_name(final)
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + digest + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, final)
    except OSError as e:  # disk full, quota, permissions: the older checkpoints are untouched
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}. The earlier checkpoints in "
                              f"{folder} are intact: free space (or fix permissions) and resume, or point "
                              "checkpoint.dir elsewhere") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify one checkpoint file.

    Raises:
        CheckpointError: missing, truncated, altered or not a checkpoint; nothing is returned then.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    header_len = len(MAGIC) + 64 + 1
    if len(raw) < header_len or not raw.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an svi checkpoint (bad header); it is damaged or another file")
    digest, payload = raw[len(MAGIC) : len(MAGIC) + 64], raw[header_len:]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"checkpoint {path} is damaged (checksum mismatch: truncated or altered); "
                              "an earlier checkpoint in the same folder may still be valid")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as e:  # the checksum matched, so this is an incompatible content, not a torn write
        raise CheckpointError(f"checkpoint {path} could not be read: {e}") from None


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed process left in ``folder`` (see :func:`temporary_name`).

    Only files whose writing process is gone are removed, so another live writer's file is safe.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, with its state. A damaged newer one is skipped with a
    warning naming it (the steps since the older one are redone)."""
    errors = []
    for path in reversed(list_checkpoints(folder)):
        try:
            found = path, load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        for message in errors:
            warnings.warn(f"skipping a damaged checkpoint: {message}; resuming from {path.name}", RuntimeWarning,
                          stacklevel=2)
        return found
    if errors:
        raise CheckpointError("no valid checkpoint in " + os.fspath(folder) + ": " + "; ".join(errors))
    return None
