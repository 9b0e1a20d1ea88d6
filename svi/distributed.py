"""The only module that imports ``torch.distributed``.

Set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):
gloo on CPU, NCCL on CUDA with one GPU per local rank, and no process group at all when the
world has one process. Collectives used by the trainer are small helpers here, each a no-op
in a world of one.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

__all__ = ["World", "setup", "teardown", "wrap", "all_mean", "all_sum", "all_min", "gather_object", "barrier",
           "broadcast_object", "agreed", "PeerError", "launch_rank"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this fit created the process group, so it destroys it
    backend: str | None = None


def setup(device_option: str = "cpu") -> World:
    """Join the process group torchrun describes in the environment (a world of one otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launch_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return World()
    if torch_dist.is_initialized():
        return World(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, False, torch_dist.get_backend())
    use_cuda = device_option.startswith("cuda") or (device_option == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # A finite timeout turns a lost peer into an error (which torchrun answers with a restart)
    # instead of a wait of gloo's default 30 minutes.
    timeout = timedelta(seconds=float(os.environ.get("SVI_DIST_TIMEOUT", "300")))
    torch_dist.init_process_group(backend=backend, store=_attempt_store(rank, world_size, timeout), rank=rank,
                                  world_size=world_size, timeout=timeout)
    return World(rank, world_size, local_rank, True, backend)


def _attempt_store(rank: int, world_size: int, timeout: timedelta):
    """The rendezvous store of this launch attempt.

    torchrun keeps its agent's store across ``--max-restarts`` attempts, so a restarted group
    could read the addresses the dead attempt published and fail to connect (seen here with
    gloo on loopback; pytorch/pytorch#167288). A prefix per attempt keeps every attempt's keys apart.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                is_master=not agent and rank == 0, timeout=timeout, multi_tenant=not agent)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch_dist.PrefixStore(f"svi/attempt_{attempt}/", store)


def teardown(world: World, clean: bool = True) -> None:
    """Destroy the group this fit created, on success and on error alike. After a clean finish
    the ranks first meet at a barrier, so none closes its connections while another still uses
    them (that aborted the process with "terminate called without an active exception")."""
    if world.owns_group and torch_dist.is_initialized():
        if clean:
            try:
                if world.backend == "gloo":
                    torch_dist.monitored_barrier(timeout=timedelta(seconds=60))
                else:
                    torch_dist.barrier()
            except RuntimeError:  # a peer already gone: nothing left to wait for
                pass
        torch_dist.destroy_process_group()


def wrap(module: torch.nn.Module, world: World) -> torch.nn.Module | None:
    """``DistributedDataParallel`` around the family when there are several ranks, else None.

    The trainer then backpropagates through the wrapper, so DDP averages the gradients of the
    per-rank ELBO estimates (each already scaled by N / |B_rank|) over the ranks.
    """
    if world.world_size <= 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.local_rank] if world.backend == "nccl" else None
    # broadcast_buffers: the frame buffers are equal on every rank by construction (same warm start)
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def _reduce(t: torch.Tensor, world: World, op) -> torch.Tensor:
    # NCCL reduces CUDA tensors only; the set-up's statistics (centrings, curvatures) live on the CPU
    out = t.detach().clone()
    if world.backend == "nccl" and out.device.type != "cuda":
        moved = out.to(torch.device("cuda", world.local_rank))
        torch_dist.all_reduce(moved, op=op)
        return moved.to(t.device)
    torch_dist.all_reduce(out, op=op)
    return out


def all_mean(t: torch.Tensor, world: World | None) -> torch.Tensor:
    """Elementwise mean over ranks (on the tensor's own device; ``t`` itself in a world of one)."""
    if world is None or world.world_size <= 1:
        return t
    return _reduce(t, world, torch_dist.ReduceOp.SUM) / world.world_size


def all_sum(t: torch.Tensor, world: World | None) -> torch.Tensor:
    """Elementwise sum over ranks (``t`` itself in a world of one, or without a world)."""
    if world is None or world.world_size <= 1:
        return t
    return _reduce(t, world, torch_dist.ReduceOp.SUM)


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), known before any process group
    exists: what decides, before a fit starts, which process talks to the user."""
    return int(os.environ.get("RANK", "0"))


def all_min(t: torch.Tensor, world: World | None) -> torch.Tensor:
    """Elementwise minimum over ranks (``t`` itself in a world of one)."""
    if world is None or world.world_size <= 1:
        return t
    return _reduce(t, world, torch_dist.ReduceOp.MIN)


def gather_object(obj, world: World) -> list:
    """Every rank's ``obj`` on every rank (small objects: cursors, RNG states)."""
    if world.world_size <= 1:
        return [obj]
    out = [None] * world.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world: World, src: int = 0):
    if world.world_size <= 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(world: World) -> None:
    if world.world_size > 1:
        torch_dist.barrier()


class PeerError(RuntimeError):
    """Another rank failed with an error whose type this rank cannot rebuild from its name."""


@contextmanager
def agreed(world: World):
    """Run a block on every rank; an error raised in it on any rank is raised on every rank.

    Without this, a rank that fails before training (say rank 0, the only one that opens the
    tracking store) tears the group down while its peers wait in their first collective, and
    they die with gloo's "Connection closed by peer" traceback instead of the reason. Here every
    rank reports "ok" or its error in one all-gather; when any failed, all raise the error of the
    lowest failing rank, rebuilt by type and message, so each prints the same line.

    Every rank must enter the block, and nothing in it may call a collective (a rank that failed
    before reaching it would never join). In a world of one this is a plain block.
    """
    if world.world_size <= 1:
        yield
        return
    failure = None
    try:
        yield
    except Exception as e:  # any error, known or not, must reach the peers
        failure = e
    mine = None if failure is None else (type(failure).__module__, type(failure).__qualname__, str(failure))
    outcomes = gather_object(mine, world)  # plain strings: nothing a peer sends is unpickled as code
    first = next((r for r, o in enumerate(outcomes) if o is not None), None)
    if first is None:
        return
    # Every rank holds the outcomes now; one more meeting, so no rank destroys the group while a
    # peer is still reading the gather from it.
    barrier(world)
    if first == world.rank:
        raise failure
    raise _rebuild(outcomes[first], first) from failure


def _rebuild(outcome: tuple[str, str, str], rank: int) -> Exception:
    """The error ``rank`` reported as ``(module, qualname, message)``: of the same type with the
    same message when that type is already imported here and takes a message, else a
    :class:`PeerError` naming the type. Nothing is imported by name (a peer's words are data)."""
    module, qualname, message = outcome
    cls = sys.modules.get(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            err = cls(message)
        except Exception:  # a constructor that wants other arguments
            err = None
        if err is not None and str(err) == message:
            return err
    return PeerError(f"rank {rank} failed before training: {qualname}: {message}")
