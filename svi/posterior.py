"""A fitted posterior: the variational Gaussian over z, pushed through the model's
bijections. Sample it, summarise it, save it and load it back.

On disk a posterior is a folder with ``posterior.safetensors`` (the family's
tensors) and ``posterior.json`` (format version, family, parameter names, shapes
and constraints from svi's fixed vocabulary, the model's class path and
constructor arguments as a record, fit information). The file describes the
approximation completely: loading, sampling, summaries and ArviZ export run no
model code and unpickle nothing. What needs the model's likelihood (prediction,
PSIS on data) takes the model object from the caller, or rebuilds it from the
recorded class path only when that class lies in ``svi.models`` or in a module
the caller trusts (:mod:`svi.imports`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from svi.families import Family, make_family
from svi.imports import UntrustedModelError, import_model_class, is_trusted
from svi.model import Model, ModelError, _jsonable
from svi.transforms import ParamSpace, element_names

__all__ = ["Posterior", "PosteriorFormatError", "FORMAT_VERSION", "load_posterior",
           "save_mlflow_model"]

FORMAT_VERSION = 2  # 2: constraints as vocabulary entries (1 stored their repr; still read)


class PosteriorFormatError(ValueError):
    """A saved posterior that is missing, damaged, or from an incompatible version."""


class Posterior:
    """q(theta): a Gaussian family over the unconstrained vector, mapped to constrained space.

    Args:
        model: the model it was fitted to, or ``None`` for a posterior loaded without model code
            (sampling, summaries and ArviZ export need none; :meth:`require_model` says what to do).
        space: the model's unconstrained space.
        family: the fitted family (z-space Gaussian).
        info: fit information (steps, convergence, options, ...), JSON-able.
        model_spec: the model's recorded class path and arguments (defaults to ``model.spec()``).
    """

    def __init__(self, model: Model | None, space: ParamSpace, family: Family, info: Mapping[str, Any] | None = None,
                 model_spec: Mapping[str, Any] | None = None):
        self.model = model
        self.space = space
        self.family = family.eval()
        self.info = dict(info or {})
        self.model_spec = dict(model_spec) if model_spec is not None else (model.spec() if model is not None else {})

    @property
    def model_name(self) -> str:
        return self.model.name if self.model is not None else self.model_spec.get("class", "?").rpartition(":")[2]

    def require_model(self, purpose: str) -> Model:
        """The model, or an error saying how to provide it (``purpose``: what needs it)."""
        if self.model is None:
            target = self.model_spec.get("class", "?")
            module = target.partition(":")[0]
            raise UntrustedModelError(
                f"{purpose} needs the model's code ({target}), which svi does not import from a posterior file on its "
                f"own: pass the model object (load_posterior(uri, model=...)), or trust its module "
                f"(load_posterior(uri, trust=[{module!r}]); CLI --trust {module}; MLflow pyfunc "
                f"SVI_TRUSTED_MODULES={module})")
        return self.model

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
        table = pd.DataFrame(
            {"mean": x.mean(0), "sd": x.std(0, ddof=1), "q5": q5, "q50": q50, "q95": q95}, index=pd.Index(names, name="param")
        )
        if self.info.get("khat") is not None:  # after svi.diagnostics.diagnose: one k-hat for the whole q
            table["khat"] = float(self.info["khat"])
            table.attrs["khat"] = float(self.info["khat"])
        return table

    def to_arviz(self, n: int = 4000, seed: int = 0):
        """``arviz.InferenceData`` with one chain of n draws (dims named ``<param>_dim_<i>``)."""
        import arviz as az

        draws = {k: v.double().cpu().numpy()[None] for k, v in self.sample(n, seed).items()}
        return az.from_dict(posterior=draws)

    # --- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, data, n: int = 1000, seed: int = 0, columns: Mapping[str, Any] | None = None,
                chunk_rows: int = 65536):
        """Posterior predictive summaries per row of ``data`` (dict, DataFrame or Parquet path).

        Draws ``n`` parameter sets, simulates the outcome of each row with the model's
        ``sample_obs(p, batch, generator)``, and returns a pandas DataFrame with columns
        ``mean``, ``sd``, ``q5``, ``q50``, ``q95``, one row per input row. The outcome column
        need not be present.
        """
        import pandas as pd

        model = self.require_model("prediction")
        if not hasattr(model, "sample_obs"):
            raise TypeError(f"{model.name} has no sample_obs(p, batch, generator) method, so it cannot predict")
        batch = self._prediction_batch(data, columns)
        rows = next(iter(batch.values())).shape[0]
        gen = torch.Generator().manual_seed(seed)
        theta = self.sample(n, seed)
        out = []
        for start in range(0, rows, chunk_rows):
            part = {k: v[start : start + chunk_rows] for k, v in batch.items()}
            y = model.sample_obs(theta, part, generator=gen).double()  # (n, rows)
            q = torch.quantile(y, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), dim=0)
            out.append(pd.DataFrame({"mean": y.mean(0), "sd": y.std(0), "q5": q[0], "q50": q[1], "q95": q[2]}))
        return pd.concat(out, ignore_index=True)

    def _prediction_batch(self, data, columns) -> dict[str, torch.Tensor]:
        from svi.data.memory import InMemoryData
        from svi.data.parquet import is_parquet_input
        from svi.data.source import open_source
        from svi.options import FitOptions

        keys = list(self.model.batch_keys or [])
        columns = dict(columns or self.info.get("columns") or {})
        dtype = self.family.frame_loc.dtype
        if is_parquet_input(data):
            import pyarrow.parquet as pq

            from svi.data.parquet import list_parquet_files

            _, files = list_parquet_files(data)
            names = pq.ParquetFile(files[0]).schema_arrow.names
            mapping = {k: columns.get(k, k) for k in keys}
            mapping = {k: v for k, v in mapping.items() if k != "y" or v in names}
            src = open_source(data, mapping, list(mapping), self.model.integer_keys, dtype,
                              FitOptions(in_memory_rows=2**62), validate=self.model.validate)
            return dict(src.tensors)
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover
            pd = None
        if pd is not None and isinstance(data, pd.DataFrame):
            mapping = {k: columns.get(k, k) for k in keys}
            mapping = {k: v for k, v in mapping.items() if not (k == "y" and isinstance(v, str) and v not in data)}
            return dict(InMemoryData(data, mapping, integer_keys=self.model.integer_keys, dtype=dtype,
                                     validate=self.model.validate).tensors)
        present = [k for k in keys if k in data]
        return dict(InMemoryData({k: data[k] for k in present}, integer_keys=self.model.integer_keys,
                                 dtype=dtype, validate=self.model.validate).tensors)

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
            "model": _jsonable(self.model_spec),
            "space": self.space.spec(),
            "info": _jsonable(self.info),
        }
        from svi.checkpoint import temporary_name

        tmp_t, tmp_j = temporary_name(path / "posterior.safetensors"), temporary_name(path / "posterior.json")
        save_file(tensors, str(tmp_t))
        tmp_j.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_t, path / "posterior.safetensors")
        os.replace(tmp_j, path / "posterior.json")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | None = None, trust: Sequence[str] = ()) -> "Posterior":
        """Load a folder written by :meth:`save` (or an MLflow model folder holding one).

        The parameters and the family come from the files alone. The model object is ``model``
        when given (checked against the saved parameters); else the recorded class is rebuilt when
        it lies in ``svi.models`` or a module of ``trust``; else the posterior has no model
        (sampling and summaries work; prediction says what to pass).

        Raises:
            PosteriorFormatError: a missing or damaged file, or one that does not match ``model``.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "posterior.json").exists() and (path / "MLmodel").exists():
            path = path / "artifacts" / "posterior"  # an MLflow pyfunc model folder written by svi
        meta_file, tensor_file = path / "posterior.json", path / "posterior.safetensors"
        for f in (meta_file, tensor_file):
            if not f.is_file():
                raise PosteriorFormatError(f"{f} does not exist: not a saved svi posterior folder")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PosteriorFormatError(f"{meta_file} is damaged (not valid JSON: {e})") from None
        if not isinstance(meta, dict) or meta.get("format_version") not in (1, FORMAT_VERSION):
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise PosteriorFormatError(
                f"{meta_file} has format_version {version!r}; this svi reads versions 1 and {FORMAT_VERSION}. "
                "Load it with the svi version that wrote it."
            )
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise PosteriorFormatError(f"{tensor_file} is damaged: {e}") from None
        model_spec = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        if model is not None:  # the caller's model: its parameters must be the saved ones
            space = ParamSpace(model.get_params(), model.name)
            if not _same_params(space, meta.get("space")):
                raise PosteriorFormatError(f"model {model.name} does not match the parameters saved in {meta_file}")
        else:
            try:
                space = ParamSpace.from_spec(meta["space"], model_spec.get("class", "model"))
            except (KeyError, TypeError, AttributeError, ModelError) as e:
                raise PosteriorFormatError(f"{meta_file} does not describe its parameters with svi's vocabulary "
                                           f"({e}); pass model= to load it") from None
            model = _rebuild_model(model_spec, trust, meta_file)
            if model is not None and not _same_params(ParamSpace(model.get_params(), model.name), meta["space"]):
                raise PosteriorFormatError(f"model {model.name} does not match the parameters saved in {meta_file}")
        if meta.get("size") != space.size or meta.get("family") not in ("meanfield", "fullrank", "lowrank") \
                or meta.get("dtype") not in ("float32", "float64"):
            raise PosteriorFormatError(f"{meta_file}: family {meta.get('family')!r} of size {meta.get('size')!r} and "
                                       f"dtype {meta.get('dtype')!r} do not describe {space.size} parameters")
        rank = meta.get("rank") or 2
        family = make_family(meta["family"], meta["size"], dtype=getattr(torch, meta["dtype"]), rank=int(rank))
        try:
            family.load_state_dict(tensors)
        except RuntimeError as e:
            raise PosteriorFormatError(f"{tensor_file} does not hold a {meta['family']} family of size {meta['size']}: {e}") from None
        info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
        return cls(model, space, family, info, model_spec=model_spec)

    def __repr__(self) -> str:
        return f"Posterior({self.model_name}, family={self.family.name}, K={self.space.size})"


def _same_params(space: ParamSpace, saved: Any) -> bool:
    """Whether ``space`` has the parameters a posterior file describes (format 1 stored constraints' repr)."""
    if not isinstance(saved, dict) or list(saved) != list(space.names):
        return False
    mine = space.spec()
    for b in space.blocks:
        entry = saved[b.name]
        if not isinstance(entry, dict) or list(entry.get("shape", [])) != list(b.shape):
            return False
        c = entry.get("constraint")
        if (repr(b.constraint) if isinstance(c, str) else mine[b.name]["constraint"]) != c:
            return False
    return True


def _rebuild_model(spec: Mapping[str, Any], trust: Sequence[str], meta_file: Path) -> Model | None:
    """The recorded model when its class is trusted (svi.models, ``trust``), else ``None``."""
    target = spec.get("class")
    if not isinstance(target, str) or not is_trusted(target.partition(":")[0], trust):
        return None
    try:
        cls = import_model_class(target, trust, named_in=str(meta_file))
    except UntrustedModelError as e:
        raise PosteriorFormatError(str(e)) from None
    except Exception as e:  # a trusted module that fails to import: say which
        raise PosteriorFormatError(f"cannot import the model class {target!r} ({type(e).__name__}: {e})") from None
    args, kwargs = spec.get("args", []), spec.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise PosteriorFormatError(f"{meta_file}: the model's recorded arguments are malformed")
    try:
        return cls(*args, **kwargs)
    except Exception as e:  # the constructor of a trusted class: report whatever it raised
        raise PosteriorFormatError(f"rebuilding {target} with its saved arguments failed: {e}") from None


# --- URIs and MLflow ---------------------------------------------------------------------------
def load_posterior(uri: str | os.PathLike, model: Model | None = None, tracking_uri: str | None = None,
                   trust: Sequence[str] = ()) -> Posterior:
    """Load a posterior from a folder, ``runs:/<run_id>/posterior`` or ``models:/<name>/<version>``.

    ``model`` and ``trust`` are as in :meth:`Posterior.load`: no model code named in the file is
    imported unless it lies in ``svi.models`` or a module of ``trust``.

    Raises:
        PosteriorFormatError: for an unknown URI scheme, a missing run or model, or a damaged file.
    """
    text = os.fspath(uri)
    if text.startswith(("runs:/", "models:/")):
        import mlflow.artifacts

        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=text, tracking_uri=tracking_uri)
        except Exception as e:  # MLflow raises many kinds for a missing run, model or artifact
            raise PosteriorFormatError(f"cannot fetch {text} from MLflow: {type(e).__name__}: {e}") from None
        return Posterior.load(local, model=model, trust=trust)
    if "://" in text or (":" in text.split("/")[0] and not os.path.exists(text)):
        raise PosteriorFormatError(
            f"unknown posterior URI {text!r}: use a folder, runs:/<run_id>/posterior or models:/<name>/<version>"
        )
    return Posterior.load(text, model=model, trust=trust)


def save_mlflow_model(post: Posterior, path: str | os.PathLike) -> Path:
    """Write ``post`` as an MLflow model folder with a pyfunc flavour that needs no pickled code:
    MLflow loads it through ``loader_module="svi.posterior"`` (see :func:`_load_pyfunc`)."""
    import tempfile

    import mlflow.pyfunc

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        folder = post.save(Path(tmp) / "posterior")
        from mlflow.models import ModelSignature
        from mlflow.types.schema import ParamSchema, ParamSpec

        params = ParamSchema([ParamSpec("draws", "long", 1000), ParamSpec("seed", "long", 0)])
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow's nudge for an input example; predict takes any rows
            mlflow.pyfunc.save_model(os.fspath(path), loader_module="svi.posterior", data_path=os.fspath(folder),
                                     pip_requirements=["svi"], signature=ModelSignature(inputs=None, params=params))
    # MLflow copies data_path under artifacts/: keep the svi folder where Posterior.load looks
    data = path / "data"
    if data.exists() and not (path / "artifacts" / "posterior").exists():
        (path / "artifacts").mkdir(exist_ok=True)
        os.replace(data / "posterior", path / "artifacts" / "posterior")
        _rewrite_data_path(path)
    return path


def _rewrite_data_path(path: Path) -> None:
    import yaml

    mlmodel = path / "MLmodel"
    spec = yaml.safe_load(mlmodel.read_text())
    spec["flavors"]["python_function"]["data"] = "artifacts/posterior"
    mlmodel.write_text(yaml.safe_dump(spec))
    data = path / "data"
    if data.exists() and not any(data.iterdir()):
        data.rmdir()


class PyfuncPosterior:
    """What ``mlflow.pyfunc.load_model(uri).predict(df)`` calls: posterior predictive summaries
    for each row of a DataFrame, with columns ``mean``, ``sd``, ``q5``, ``q50``, ``q95``."""

    def __init__(self, post: Posterior, draws: int = 1000):
        self.post = post
        self.draws = draws

    def predict(self, data, params=None):
        params = params or {}
        return self.post.predict(data, n=int(params.get("draws", self.draws)), seed=int(params.get("seed", 0)))


def _load_pyfunc(data_path: str) -> PyfuncPosterior:
    """MLflow's entry point for the pyfunc flavour (``loader_module``). The model's code is imported
    only from svi.models or the modules named in ``SVI_TRUSTED_MODULES``."""
    return PyfuncPosterior(Posterior.load(data_path))
