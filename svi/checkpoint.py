"""Atomic, verified checkpoints of the whole training state.

A checkpoint file is a short header (magic, format version, SHA-256 of the payload)
followed by the payload written by ``torch.save``. It is written to a temporary file in
the same folder, fsync'ed, and moved into place with ``os.replace``, so a crash at any
moment leaves either the old set of checkpoints or the new one, never a torn file under
a checkpoint's name. Loading verifies the checksum before anything is unpickled and
unpickles with ``torch.load(weights_only=True)``: plain tensors and containers only.

A checkpoint folder may also be an fsspec URL (``s3://bucket/run/ckpt``, ``memory://run``):
the same files, written through the URL's file system (see :func:`save_checkpoint` for how
atomic that is). ``file://`` URLs are local folders and take the local path.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["JOB_FILE", "CheckpointError", "atomic_write_text", "temporary_name", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint", "remove_stale_temporaries",
           "CHECKPOINT_GLOB", "Checkpointer", "PAYLOAD_FORMAT", "find_resume", "check_compatible", "HOW_TO_RESUME", "upgrade_payload", "location_problem", "local_folder", "join", "is_file", "read_text"]

log = logging.getLogger("svi")

MAGIC = b"SVICKPT1"
JOB_FILE = "job.yaml"  # the job's config beside its checkpoints, so `svi resume <folder>` can rebuild it
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.\d+\.tmp$")
# in a folder of a remote file system, several machines write: the writer's host is in the name
_REMOTE_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.\d+\.tmp$")
#: a remote temporary of another machine this old is left by a killed writer (an upload takes minutes, not an hour)
REMOTE_STALE_SECONDS = 3600.0
CHECKPOINT_GLOB = "ckpt-*.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, altered, or incompatible with this run."""


# --- where: a local folder, or an fsspec URL ---------------------------------------------------
def location_problem(location: str) -> str | None:
    """What is wrong with ``location`` as a folder for svi's files, or ``None``: an fsspec URL whose
    protocol fsspec does not know, or whose file system's package is not installed."""
    if "://" not in location:
        return None
    import fsspec

    protocol = location.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        return (f"unknown protocol {protocol!r}: use a local folder, a file:// or memory:// URL, or a protocol "
                "fsspec knows (s3://, gs://, abfs://, ...)")
    except ImportError as e:  # a known protocol whose package is missing: fsspec's message names it
        return f"protocol {protocol!r} needs a package that is not installed: {e}"
    return None


def _split(location: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec file system, its path) of a URL of a non-local file system; (None, the local path)
    for a local folder or a ``file://`` URL, which keep the local code and its guarantees."""
    text = os.fspath(location)
    if "://" not in text:
        return None, text
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    problem = location_problem(text)
    if problem:
        raise CheckpointError(f"cannot use {text!r} as a checkpoint folder: {problem}")
    fs, path = fsspec.core.url_to_fs(text)
    return (None, path) if isinstance(fs, LocalFileSystem) else (fs, path.rstrip("/"))


def local_folder(location: str | os.PathLike | None) -> Path | None:
    """``location`` as a local folder (a path or a ``file://`` URL), or ``None`` for a remote URL or ``None``."""
    if location is None:
        return None
    fs, path = _split(location)
    return Path(path) if fs is None else None


def join(folder: str | os.PathLike, name: str) -> Path | str:
    """``folder / name``: a :class:`Path` for a local folder, else a URL spelled as ``folder`` is."""
    fs, path = _split(folder)
    return Path(path) / name if fs is None else f"{os.fspath(folder).rstrip('/')}/{name}"


def is_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (local, or an fsspec URL) is a file."""
    fs, p = _split(path)
    return Path(p).is_file() if fs is None else fs.isfile(p)


def read_text(path: str | os.PathLike) -> str:
    """The text of file ``path`` (local, or an fsspec URL)."""
    fs, p = _split(path)
    return Path(p).read_text() if fs is None else fs.cat_file(p).decode()


def _basename(path: str | os.PathLike) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def _host_tag() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _remote_temporary_name(name: str) -> str:
    """A temporary name beside ``name`` on a remote file system: the writer's host, process and thread."""
    import threading

    return f".{name}.{_host_tag()}-{os.getpid()}.{threading.get_ident()}.tmp"


def _write_remote(fs, path: str, data: bytes, before_replace: Callable[[str], None] | None = None) -> None:
    """Write ``data`` to ``path`` on ``fs`` as atomically as the file system allows.

    The whole payload goes to a temporary name first (one ``pipe_file`` of bytes already in
    memory), then ``fs.mv`` puts it under its name. On object stores (S3, GCS, Azure) an object
    appears only once its upload is complete, and the move is a server-side copy whose target is
    likewise whole or absent; on file systems with a rename (SFTP, HDFS, memory) the move is that
    rename. A reader therefore never sees a torn file under the final name. What a remote file
    system does not offer is the local path's fsync of the folder; a crash between write and move
    leaves a temporary (:func:`remove_stale_temporaries`), and the checksum in a checkpoint's
    header catches anything else.
    """
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/{_remote_temporary_name(name)}"
    try:
        fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(tmp, data)
        if before_replace is not None:
            before_replace(fs.unstrip_protocol(tmp))
        fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # the file system is failing: the temporary is cleaned at the next start
            pass
        raise


def temporary_name(path: Path) -> Path:
    """A temporary file beside ``path`` that no other process or thread uses."""
    import threading

    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path | str:
    """Write ``text`` to ``path`` atomically: a private temporary file, then ``os.replace``.
    Several processes may write the same file at once; each reader sees one whole version.
    An fsspec URL is written as :func:`save_checkpoint` writes one."""
    fs, local = _split(path)
    if fs is not None:
        _write_remote(fs, local, text.encode())
        return os.fspath(path)
    path = Path(local)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _name(step: int) -> str:
    return f"ckpt-{step:09d}.pt"


def _path(folder: Path, step: int) -> Path:
    return folder / _name(step)


def save_checkpoint(folder: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 3,
                    before_replace: Callable[[Path], None] | None = None) -> Path | str:
    """Write ``state`` as checkpoint ``step`` atomically and keep only the newest ``keep``.

    Args:
        folder: checkpoint folder (created): a local folder, or an fsspec URL, written through
            a temporary name and ``fs.mv`` (as atomic as that file system allows: see
            :func:`_write_remote`).
        step: the optimisation step the state is at; names the file.
        state: nested dicts/lists of tensors and plain Python values.
        keep: how many checkpoints to keep (older ones are deleted after the new one is in place).
        before_replace: test hook called with the temporary file between write and rename.

    Returns:
        The checkpoint's path (a URL spelled like ``folder`` for a remote one).
    """
    buf = io.BytesIO()
    fs, local = _split(folder)
    if fs is not None:
        torch.save(state, buf)
        payload = buf.getvalue()
        url = join(folder, _name(step))
        try:
            _write_remote(fs, f"{local}/{_name(step)}", MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
                          + payload, before_replace)
        except OSError as e:  # quota, permissions, a lost connection: the older checkpoints are untouched
            raise CheckpointError(f"cannot write checkpoint {url}: {e}. The earlier checkpoints in {os.fspath(folder)} "
                                  "are intact: fix the storage (or its credentials) and resume, or point "
                                  "checkpoint.dir elsewhere") from None
        for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
            fs.rm(_split(old)[1])
        return url
    folder = Path(local)
    folder.mkdir(parents=True, exist_ok=True)
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
    fs, local = _split(path)
    path = Path(local) if fs is None else os.fspath(path)
    try:
        raw = path.read_bytes() if fs is None else fs.cat_file(local)
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
        loaded = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as e:  # the checksum matched, so this is an incompatible content, not a torn write
        raise CheckpointError(f"checkpoint {path} could not be read: {e}") from None
    return upgrade_payload(loaded, path)


#: the layout of a fit's checkpoint payload (svi.api writes it): 2 keeps one entry per training
#: component (family, optimizer, lr_scheduler, objective, schedule, ...); 1 kept their parts flat
PAYLOAD_FORMAT = 2


def upgrade_payload(payload: Any, path: str | os.PathLike = "") -> Any:
    """A fit's payload of an earlier format in today's layout, so a fit checkpointed by an older
    svi resumes; anything that is not a fit's payload is returned as it is.

    Raises:
        CheckpointError: a payload written by a newer svi.
    """
    if not isinstance(payload, dict) or "ranks" not in payload:
        return payload
    version = payload.get("format", 1)
    if version > PAYLOAD_FORMAT:
        raise CheckpointError(f"checkpoint {path} has payload format {version}; this svi reads formats 1 to "
                              f"{PAYLOAD_FORMAT}: resume it with the svi that wrote it, or upgrade svi")
    if version == 1:
        try:
            ranks = [{**r, "state": _state_from_format_1(r["state"])} for r in payload["ranks"]]
        except (KeyError, TypeError, ValueError) as e:  # a file that says format 1 but lacks its parts
            raise CheckpointError(f"checkpoint {path} says payload format 1 but its training state is incomplete "
                                  f"({type(e).__name__}: {e}); resume from another checkpoint or start anew") from None
        payload = {**payload, "format": PAYLOAD_FORMAT, "ranks": ranks}
    return payload


def _state_from_format_1(old: dict) -> dict:
    total, run, restores, window = old["nonfinite"]
    schedule = {"window_elbos": old["window_elbos"], "window_cv": old["window_cv"], "history": old["history"],
                "nonfinite": {"total": total, "run": run, "restores": restores, "window": window},
                "rule": old["rule"], "averager": old["averager"]}
    objective = {"stl": old["stl"], "cv_weights": old["cv_weights"], "anchor": old["anchor"]}
    kept = ("step", "family", "optimizer", "generator", "last_good", "warm_start", "eta", "stream", "global_rng")
    return {**{k: old[k] for k in kept}, "lr_scheduler": old["scheduler"], "objective": objective,
            "schedule": schedule}


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed process left in ``folder`` (see :func:`temporary_name`).

    Only files whose writing process is gone are removed, so another live writer's file is safe.
    In a remote folder (an fsspec URL) that is known for this machine's writers; another
    machine's temporary (a job pre-empted on one node, resumed on another) is removed once it is
    ``REMOTE_STALE_SECONDS`` old, where the file system reports modification times.
    """
    fs, local = _split(folder)
    if fs is not None:
        return _remove_stale_remote(fs, local, os.fspath(folder))
    folder = Path(local)
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


def _remove_stale_remote(fs, root: str, url: str) -> list[str]:
    removed = []
    if not fs.isdir(root):
        return removed
    for p in fs.ls(root, detail=False):
        m = _REMOTE_TEMPORARY.match(_basename(p))
        if m is None:
            continue
        if m["host"] == _host_tag():
            if _alive(int(m["pid"])):
                continue
        else:  # another machine's pid says nothing here: only its age does
            try:
                age = time.time() - fs.modified(p).timestamp()
            except (NotImplementedError, OSError, AttributeError):  # no modification times: keep it
                continue
            if age < REMOTE_STALE_SECONDS:
                continue
        fs.rm(p)
        removed.append(join(url, _basename(p)))
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


def list_checkpoints(folder: str | os.PathLike) -> list[Path] | list[str]:
    """Checkpoint files in ``folder``, oldest first (URLs spelled like ``folder`` for a remote one)."""
    fs, local = _split(folder)
    if fs is not None:
        if not fs.isdir(local):
            return []
        names = sorted(n for n in map(_basename, fs.ls(local, detail=False)) if _NAME.match(n))
        return [join(folder, n) for n in names]
    folder = Path(local)
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
            warnings.warn(f"skipping a damaged checkpoint: {message}; resuming from {_basename(path)}", RuntimeWarning,
                          stacklevel=2)
        return found
    if errors:
        raise CheckpointError("no valid checkpoint in " + os.fspath(folder) + ": " + "; ".join(errors))
    return None


def find_resume(folder: str | os.PathLike | None, resume: bool | str, clean: bool = True):
    """The checkpoint a fit resumes from: (path, payload), or None for a fresh fit.

    Args:
        folder: the fit's checkpoint folder (``None``: no checkpoints).
        resume: ``True`` (a checkpoint must exist), ``"auto"`` (when one exists) or ``False``.
        clean: remove the temporaries of killed writers first (one process of a fit does it).

    Raises:
        CheckpointError: ``resume=True`` and no checkpoint in ``folder``.
    """
    if folder and clean:
        for p in remove_stale_temporaries(folder):
            log.info("removed %s, left by a process that was killed while writing it", p)
    if resume is False:
        return None
    found = latest_checkpoint(folder)
    if found is None and resume is True:
        raise CheckpointError(f"resume=true but {folder} holds no checkpoint; use resume=auto to start "
                              "fresh when there is none")
    return found


#: options that always differ on a resume (where and how to resume); missing_run and tracking_wait
#: only say what to do if the tracking store is gone, so they are neither compared nor required
#: of older checkpoints
HOW_TO_RESUME = frozenset({"resume", "force_resume", "checkpoint_dir", "missing_run", "tracking_wait"})


def check_compatible(found: tuple, options: dict, defaults: dict, safe_to_change: frozenset,
                     fingerprints: dict, world_size: int, free_to_change: frozenset = frozenset()) -> None:
    """Refuse a checkpoint from another model, data set, world size or option set.

    Args:
        found: (path, payload) from :func:`find_resume`.
        options: this fit's options as a dict; ``defaults`` stand in for options the checkpoint
            predates.
        safe_to_change: options that may differ with ``force_resume`` (they change how long the
            fit runs or what it reports, not its trajectory).
        free_to_change: options that may differ without it (they change only its speed, or a
            fresh start): not compared.

    Raises:
        CheckpointError: listing every difference and what to do.
    """
    path, saved = found
    problems = []
    for what in ("model", "data"):
        if saved["fingerprints"][what] != fingerprints[what]:
            problems.append(f"the {what} differs (fingerprint {saved['fingerprints'][what]} vs {fingerprints[what]})")
    if saved["world_size"] != world_size:
        problems.append(f"world size {saved['world_size']} vs {world_size}: resume with the same number of processes")
    old = {**{k: v for k, v in defaults.items() if k not in saved["options"]}, **saved["options"]}
    new = options
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                       and k not in HOW_TO_RESUME and k not in free_to_change)
    unsafe = [k for k in differing if k not in safe_to_change]
    if unsafe:
        problems.append("options differ: " + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in unsafe)
                        + " (these change the fit itself: start a new fit with resume=false, or use another "
                          "checkpoint folder)")
    elif differing and not new.get("force_resume"):
        problems.append("options differ: " + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing)
                        + " (safe to change: pass force_resume=true to accept)")
    if problems:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems))


class Checkpointer:
    """Writes a fit's checkpoints: every rank's training state (one entry per component, see
    :func:`svi.trainer.state_dict`) gathered on rank 0 under a header saying which fit it is.

    Args:
        folder: the checkpoint folder (local or an fsspec URL).
        keep: how many checkpoints to keep.
        header: the fit's identity (options, fingerprints, world size, run, ...), asked at each save.
        world: the fit's :class:`svi.distributed.World`; every rank calls :meth:`save` together.
        on_saved: told each saved path on rank 0 (the tracker commits its metrics and uploads a local file).
    """

    def __init__(self, folder, keep: int, header: Callable[[], dict], world, on_saved: Callable[[Any], None]):
        self.folder, self.keep, self.header, self.world, self.on_saved = folder, keep, header, world, on_saved

    def save(self, step: int, state: dict, finished: str | None = None) -> None:
        """Save this rank's ``state`` at ``step``; ``finished`` says why the fit stopped, on its last one."""
        from svi import distributed as dist

        ranks = dist.gather_object({"rank": self.world.rank, "state": state}, self.world)
        if self.world.rank == 0:
            payload = {"format": PAYLOAD_FORMAT, **self.header(), "finished": finished,
                       "ranks": sorted(ranks, key=lambda r: r["rank"])}
            self.on_saved(save_checkpoint(self.folder, step, payload, keep=self.keep))
        dist.barrier(self.world)  # no rank runs past a checkpoint before it is on disk
