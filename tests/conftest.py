import json
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


def posteriordb(name: str) -> tuple[dict, dict]:
    """(data, reference summary params) of a posteriordb posterior copied into tests/data."""
    folder = DATA / "posteriordb" / name
    return json.loads((folder / "data.json").read_text()), json.loads((folder / "ref_summary.json").read_text())["params"]
