"""Run under torchrun by tests/test_distributed.py: K engine steps on a DDP-wrapped family, the
final parameters saved by rank 0.

    torchrun --nproc-per-node 2 tests/ddp_worker.py OUT.npy FAMILY STEPS
"""

import sys

import numpy as np
import torch

from svi import distributed as dist
from svi.trainer import init_state, step
from tests.ddp_reference import setup_problem


def main(out, family, steps):
    world = dist.setup("cpu")
    clean = False
    try:
        ctx, data, fam = setup_problem(family, world)
        state = init_state(ctx, fam, trainable=dist.wrap(fam, world))
        stream = data.stream(ctx.options.batch_size, ctx.options.seed, rank=world.rank, world_size=world.world_size)
        for _ in range(steps):
            state, info = step(ctx, state, next(stream))
            assert info.ok
        if world.rank == 0:
            np.save(out, torch.cat([p.detach().reshape(-1) for p in fam.parameters()]).numpy())
        clean = True
    finally:
        dist.teardown(world, clean)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
