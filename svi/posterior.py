"""A fitted posterior: the variational Gaussian over z, pushed through the model's
bijections. Sample it, summarise it, save it and load it back.

On disk a posterior is a folder with ``posterior.safetensors`` (the family's
tensors) and ``posterior.json`` (format version, family, model class and
constructor arguments, parameter spec, fit information). Loading never
unpickles anything.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from svi.families import Family, make_family
from svi.model import Model
from svi.transforms import ParamSpace, element_names

__all__ = ["Posterior", "PosteriorFormatError", "FORMAT_VERSION"]

FORMAT_VERSION = 1


class PosteriorFormatError(ValueError):
    """A saved posterior that is missing, damaged, or from an incompatible version."""


class Posterior:
    """q(theta): a Gaussian family over the unconstrained vector, mapped to constrained space.

    Args:
        model: the model it was fitted to.
        space: the model's unconstrained space.
        family: the fitted family (z-space Gaussian).
        info: fit information (steps, convergence, options, ...), JSON-able.
    """

    def __init__(self, model: Model, space: ParamSpace, family: Family, info: Mapping[str, Any] | None = None):
        self.model = model
        self.space = space
        self.family = family.eval()
        self.info = dict(info or {})

    # --- draws ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample_unconstrained(self, n: int, seed: int | None = 0) -> torch.Tensor:
        """n draws of z, shape (n, K)."""
        gen = torch.Generator(device=self.family.frame_loc.device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        return self.family.rsample(n, gen)

    @torch.no_grad()
    def sample(self, n: int = 1000, seed: int | None = 0) -> dict[str, torch.Tensor]:
        """n draws in constrained space: {name: (n, *shape)}."""
        theta, _ = self.space.constrain(self.sample_unconstrained(n, seed))
        return {k: v.detach() for k, v in theta.items()}

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z) for unconstrained z of shape (S, K)."""
        return self.family.log_prob(torch.as_tensor(z, dtype=self.family.frame_loc.dtype))

    # --- summaries ---------------------------------------------------------------------------
    def _flat_draws(self, n: int, seed: int) -> tuple[list[str], np.ndarray]:
        draws = self.sample(n, seed)
        names, cols = [], []
        for b in self.space.blocks:
            names += element_names(b.name, b.shape)
            cols.append(draws[b.name].reshape(n, -1).double().cpu().numpy())
        return names, np.concatenate(cols, axis=1)

    def mean(self, n: int = 4000, seed: int = 0) -> dict[str, torch.Tensor]:
        """Posterior means in constrained space (Monte Carlo over n draws)."""
        return {k: v.double().mean(0) for k, v in self.sample(n, seed).items()}

    def sd(self, n: int = 4000, seed: int = 0) -> dict[str, torch.Tensor]:
        """Posterior sds in constrained space (Monte Carlo over n draws)."""
        return {k: v.double().std(0) for k, v in self.sample(n, seed).items()}

    def quantiles(self, q: Sequence[float], n: int = 4000, seed: int = 0) -> dict[str, torch.Tensor]:
        """Quantiles {name: (len(q), *shape)} in constrained space."""
        qs = torch.as_tensor(q, dtype=torch.float64)
        return {k: torch.quantile(v.double(), qs, dim=0) for k, v in self.sample(n, seed).items()}

    def summary(self, n: int = 4000, seed: int = 0):
        """A pandas DataFrame, one row per scalar element (``w[3]``): mean, sd, q5, q50, q95."""
        import pandas as pd

        names, x = self._flat_draws(n, seed)
        q5, q50, q95 = np.quantile(x, [0.05, 0.5, 0.95], axis=0)
        return pd.DataFrame(
            {"mean": x.mean(0), "sd": x.std(0, ddof=1), "q5": q5, "q50": q50, "q95": q95}, index=pd.Index(names, name="param")
        )

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``posterior.safetensors`` and ``posterior.json`` into folder ``path`` (created)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.family.state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "family": self.family.name,
            "size": self.family.size,
            "rank": getattr(self.family, "rank", None),
            "dtype": str(self.family.frame_loc.dtype).replace("torch.", ""),
            "model": self.model.spec(),
            "space": self.space.spec(),
            "info": _jsonable(self.info),
        }
        tmp_t, tmp_j = path / ".posterior.safetensors.tmp", path / ".posterior.json.tmp"
        save_file(tensors, str(tmp_t))
        tmp_j.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_t, path / "posterior.safetensors")
        os.replace(tmp_j, path / "posterior.json")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | None = None) -> "Posterior":
        """Load a folder written by :meth:`save`; the model is rebuilt from its class path and
        constructor arguments unless given."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta_file, tensor_file = path / "posterior.json", path / "posterior.safetensors"
        for f in (meta_file, tensor_file):
            if not f.is_file():
                raise PosteriorFormatError(f"{f} does not exist: not a saved svi posterior folder")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PosteriorFormatError(f"{meta_file} is damaged (not valid JSON: {e})") from None
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise PosteriorFormatError(
                f"{meta_file} has format_version {version!r}; this svi reads version {FORMAT_VERSION}. "
                "Load it with the svi version that wrote it."
            )
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise PosteriorFormatError(f"{tensor_file} is damaged: {e}") from None
        if model is None:
            model = _rebuild_model(meta["model"])
        space = ParamSpace(model.get_params(), model.name)
        if space.spec() != meta["space"]:
            raise PosteriorFormatError(f"model {model.name} does not match the parameters saved in {meta_file}")
        family = make_family(meta["family"], meta["size"], dtype=getattr(torch, meta["dtype"]), rank=meta.get("rank") or 2)
        try:
            family.load_state_dict(tensors)
        except RuntimeError as e:
            raise PosteriorFormatError(f"{tensor_file} does not hold a {meta['family']} family of size {meta['size']}: {e}") from None
        return cls(model, space, family, meta.get("info", {}))

    def __repr__(self) -> str:
        return f"Posterior({self.model.name}, family={self.family.name}, K={self.space.size})"


def _rebuild_model(spec: Mapping[str, Any]) -> Model:
    module_name, _, qualname = spec["class"].partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise PosteriorFormatError(
            f"cannot import the model class {spec['class']!r} ({e}); make it importable or pass model= to load"
        ) from None
    try:
        return obj(*spec.get("args", []), **spec.get("kwargs", {}))
    except Exception as e:  # the user's constructor: report whatever it raised
        raise PosteriorFormatError(f"rebuilding {spec['class']} with its saved arguments failed: {e}") from None


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "tolist"):
        return v.tolist()
    return repr(v)
