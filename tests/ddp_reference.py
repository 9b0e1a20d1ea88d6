"""The problem both the 2-rank run and its single-process reference solve."""

import numpy as np
import torch

from svi.data.memory import InMemoryData
from svi.families import make_family
from svi.models import LogisticRegression
from svi.options import FitOptions
from svi.trainer import FitContext
from svi.transforms import ParamSpace

N, D = 203, 3  # 203 = 6 x (2 x 16) + 11: a ragged last global batch


def setup_problem(family, world=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    y = (rng.random(N) < 1 / (1 + np.exp(-(x @ [1.0, -2.0, 0.5])))).astype(float)
    model = LogisticRegression(D)
    space = ParamSpace(model.params)
    data = InMemoryData({"x": x, "y": y}, keys=model.batch_keys, dtype=torch.float64)
    options = FitOptions(family=family, optimizer="adam", lr=0.05, batch_size=16, seed=4, warm_start="none",
                         control_variate=False, antithetic=True, num_particles=2, dtype="float64")
    ctx = FitContext(model=model, space=space, options=options, num_rows=N, dtype=torch.float64,
                     device=torch.device("cpu"), eval_batch=data.sample(50, 0),
                     rank=world.rank if world else 0, world_size=world.world_size if world else 1, world=world)
    fam = make_family(family, space.size, loc=torch.linspace(-0.3, 0.3, space.size), scale=0.5, dtype=torch.float64)
    return ctx, data, fam
