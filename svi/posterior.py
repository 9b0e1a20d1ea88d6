"""A fitted posterior: the variational Gaussian over z, pushed through the model's
bijections. Sample it, summarise it, save it and load it back.

On disk a posterior is a folder with ``posterior.safetensors`` (the family's
tensors) and ``posterior.json`` (format version, family, parameter names, shapes
and constraints from svi's fixed vocabulary, the model's class path and
constructor arguments as a record, fit information). The file describes the
approximation completely: loading, sampling, summaries and ArviZ export of the
posterior group run no model code and unpickle nothing. What needs the model's
likelihood (prediction, PSIS on data, ArviZ's log_likelihood and posterior_predictive
groups) takes the model object from the caller, or rebuilds it from the
recorded class path only when that class lies in ``svi.models`` or in a module
the caller trusts (:mod:`svi.imports`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from svi.families import FAMILIES, Family, make_family
from svi.fitrecord import FitRecord
from svi.imports import UntrustedModelError, import_model_class, is_trusted
from svi.model import Model, ModelError, _jsonable
from svi.transforms import ParamSpace, element_names

__all__ = ["Posterior", "PosteriorFormatError", "FORMAT_VERSION", "load_posterior",
           "save_mlflow_model"]

FORMAT_VERSION = 2  # 2: constraints as vocabulary entries (1 stored their repr; still read)
_PREDICT_KINDS = ("mean", "draws", "probability", "components")
_DEFAULT_ARVIZ_ROWS = 10_000
_ROW_SAMPLE_SEED = 14  # with the row count: the rows ArviZ export samples


class PosteriorFormatError(ValueError):
    """A saved posterior that is missing, damaged, or from an incompatible version."""


class Posterior:
    """q(theta): a Gaussian family over the unconstrained vector, mapped to constrained space.

    Args:
        model: the model it was fitted to, or ``None`` for a posterior loaded without model code
            (sampling, summaries and ArviZ export need none; :meth:`require_model` says what to do).
        space: the model's unconstrained space.
        family: the fitted family (z-space Gaussian).
        info: fit information (steps, convergence, options, k-hat, ...): a
            :class:`svi.fitrecord.FitRecord`, or its flat dict form (read with
            :meth:`FitRecord.from_dict`).
        model_spec: the model's recorded class path and arguments (defaults to ``model.spec()``).
    """

    def __init__(self, model: Model | None, space: ParamSpace, family: Family, info: FitRecord | Mapping[str, Any] | None = None,
                 model_spec: Mapping[str, Any] | None = None):
        self.model = model
        self.space = space
        self.family = family.eval()
        self.info = FitRecord.from_dict(info)  # frozen: later changes replace it (FitRecord.replace)
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
        """n draws in constrained space: {name: (n, *shape)}, in the model's canonical labelling
        (:meth:`svi.Model.relabel`)."""
        theta, _ = self.space.constrain(self.sample_unconstrained(n, seed))
        if self.model is not None:
            theta = self.model.relabel(theta)
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
        if self.info.khat is not None:  # from the fit or svi.diagnostics.diagnose: one k-hat for the whole q
            table["khat"] = float(self.info.khat)
            table.attrs["khat"] = float(self.info.khat)
        return table

    def to_arviz(self, n: int = 4000, seed: int = 0, data: Any = None, columns: Mapping[str, Any] | None = None,
                 rows: int | None = None, chains: int = 4):
        """``arviz.InferenceData`` of n draws from q, with named dims and, given data, the groups
        that ``az.loo``, ``az.waic``, ``az.compare`` and ``az.plot_ppc`` read.

        Groups:
            posterior: every parameter. An axis gets a named dim when the model declares one in its
                optional ``dims`` attribute, ``{param: (batch key or dim name, ...)}`` (the built-in
                regressions declare ``{"w": ("x",)}``, the hierarchical ones also ``alpha: ("g",)``,
                ``beta: ("g", "x")``): a key mapped to several columns (a list or a pattern such as
                ``"x*"``) becomes dim ``x`` with the column names as coordinates; a key mapped to one
                column (group ids) becomes a dim named after that column, with coordinates 0..G-1.
                Undeclared axes keep ArviZ's ``<param>_dim_<i>``.
            log_likelihood (with ``data``): one variable named after the observed key (``y``; a model
                may name another in an optional ``observed_key`` attribute), ``(chain, draw, row)``:
                the log-likelihood of each row under each draw, as ArviZ's PSIS-LOO expects.
            observed_data (with ``data``): the observed key's values on the same rows.
            posterior_predictive (with ``data``, for models with ``sample_obs``): one simulated
                outcome per draw and row.

        The ``row`` coordinate holds each row's position in the data (in file order for Parquet).
        Larger data sets use a uniform sample of rows, drawn with a fixed seed that depends on
        nothing but the row count, so posteriors of two models of the same data get the same rows
        and ``az.compare`` works; memory stays about ``n x rows`` numbers per group. The
        log_likelihood group's attributes ``num_rows`` and ``rows_used`` say whether a sample
        was used (elpd_loo then sums over the sample only).

        A posterior loaded without its model's code (``model is None``) has the posterior group
        only, with ArviZ's default dims; asking for data groups raises :meth:`require_model`'s error.

        Args:
            n: number of draws in all.
            seed: seed of the draws (and of the simulated outcomes).
            data: ``None`` (posterior group only); a dict of arrays, a DataFrame or a Parquet
                path/glob as :meth:`predict` takes, holding the outcome; or ``True`` for the data
                the posterior was fitted to (``info.data_path``, recorded by config fits).
            columns: batch key -> column(s) mapping for DataFrame or Parquet data (default: the
                fit's ``info.columns``).
            rows: cap on the rows used for the data groups (default 10,000): all rows when the
                data have no more, else a uniform sample of this many.
            chains: the n independent draws are laid out as this many chains of ``n // chains``
                draws (n must be a multiple). Several chains let ``az.summary`` compute R-hat without
                ArviZ's shape warning; for independent draws R-hat is about 1 and ESS about n,
                which says nothing of how close q is to the posterior (that is PSIS k-hat, ``svi
                diagnose``). ``chains=1`` gives one chain as PyMC's ADVI does.

        Raises:
            ValueError: ``n`` not a multiple of ``chains``, or ``data=True`` for a posterior that
                does not record its data set.
            UntrustedModelError: data groups asked of a posterior without its model.
        """
        import arviz as az

        if chains < 1 or n < chains or n % chains:
            raise ValueError(f"to_arviz: n={n} draws cannot be split into {chains} chains of equal length; "
                             f"pass n as a multiple of chains (or chains=1)")
        per_chain = n // chains
        theta = self.sample(n, seed)

        def layout(a: np.ndarray) -> np.ndarray:
            return a.reshape(chains, per_chain, *a.shape[1:])

        want_data = data is not None and data is not False
        model = self.require_model("ArviZ's log_likelihood, posterior_predictive and observed_data groups") \
            if want_data else self.model
        frame = data if want_data and data is not True else None
        names = self._column_names(columns, frame)
        obs = _observed_key(model)
        dims, coords = self._arviz_dims(columns, names, taken={*self.space.names, obs})
        groups: dict[str, Any] = {"posterior": {k: layout(v.double().cpu().numpy()) for k, v in theta.items()}}
        attrs: dict[str, Any] = {}
        if want_data:
            batch, index, total = self._arviz_rows(model, data, columns, rows)
            if obs not in batch:
                raise ValueError(f"to_arviz: the data have no observed key {obs!r}, which the log_likelihood "
                                 f"group needs; they have {sorted(batch)}")
            ll, pp = _pointwise(model, {k: v.double() for k, v in theta.items()}, batch, seed)
            row_dim = "row" if "row" not in coords and "row" not in self.space.names else f"{obs}_row"
            coords[row_dim] = index.tolist()
            dims[obs] = [row_dim]
            groups["log_likelihood"] = {obs: layout(ll)}
            groups["observed_data"] = {obs: batch[obs].cpu().numpy()}
            if pp is not None:
                groups["posterior_predictive"] = {obs: layout(pp)}
            attrs = {"num_rows": int(total), "rows_used": int(len(index)), "row_dim": row_dim}
        idata = az.from_dict(**groups, dims=dims, coords=coords)
        if attrs:
            idata.log_likelihood.attrs.update(attrs)
        return idata

    def _column_names(self, columns: Mapping[str, Any] | None, data: Any = None) -> dict[str, list[str] | None]:
        """{batch key: the columns it reads} from the mapping (``columns``, else the fit's), with
        glob patterns expanded against ``data``'s columns, else a resolution the fit recorded
        (``info.resolved_columns``), else the schema of ``info.data_path``; ``None`` for a
        pattern none of these can expand."""
        from svi.data.columns import is_pattern

        mapping = dict(columns if columns is not None else (self.info.columns or {}))
        recorded = self.info.resolved_columns
        recorded = recorded if isinstance(recorded, Mapping) else {}
        available: list[str] | None = None
        out: dict[str, list[str] | None] = {}
        for key, spec in mapping.items():
            if isinstance(spec, str) and not is_pattern(spec):
                out[key] = [spec]
            elif isinstance(spec, (list, tuple)):
                out[key] = [str(c) for c in spec]
            elif isinstance(spec, str):
                if isinstance(recorded.get(key), list):
                    out[key] = [str(c) for c in recorded[key]]
                    continue
                if available is None:
                    available = _available_columns(data) or _available_columns(self.info.data_path) or []
                out[key] = [c for c in available if fnmatch.fnmatchcase(c, spec)] or None
        return out

    def _arviz_dims(self, columns, names, taken) -> tuple[dict[str, list[str]], dict[str, list]]:
        """ArviZ ``dims`` and ``coords`` from the model's optional ``dims`` declaration."""
        from svi.data.columns import is_pattern

        declared = getattr(self.model, "dims", None) if self.model is not None else None
        if not isinstance(declared, Mapping):
            return {}, {}
        mapping = dict(columns if columns is not None else (self.info.columns or {}))
        dims: dict[str, list[str]] = {}
        coords: dict[str, list] = {}
        for b in self.space.blocks:
            decl = declared.get(b.name)
            decl = (decl,) if isinstance(decl, str) else tuple(decl or ())
            if len(decl) != len(b.shape):  # a declaration that does not fit the shape: ArviZ's default names
                continue
            named = []
            for axis, (key, size) in enumerate(zip(decl, b.shape)):
                spec, cols = mapping.get(key), names.get(key)
                one_column = isinstance(spec, str) and not is_pattern(spec)
                if cols and not one_column and len(cols) == size:
                    dim, labels = str(key), list(cols)  # a matrix key: its columns label the axis
                elif one_column:
                    dim, labels = spec, list(range(size))  # group ids: the dim takes the column's name
                else:
                    dim, labels = str(key), list(range(size))
                if dim in taken:  # xarray cannot hold a variable and a dim of one name
                    dim = f"{dim}_dim"
                if dim in coords and len(coords[dim]) != size:  # one name, two lengths: keep them apart
                    dim, labels = f"{b.name}_dim_{axis}", list(range(size))
                coords.setdefault(dim, labels)
                named.append(dim)
            dims[b.name] = named
        return dims, coords

    def _arviz_rows(self, model: Model, data: Any, columns, rows: int | None):
        """(batch of the chosen rows, their row positions, total rows) for the data groups.

        Parquet data are streamed once and only the chosen rows kept, so memory is bounded by
        ``rows`` whatever the data set's size."""
        from svi.data.memory import InMemoryData
        from svi.data.source import open_source
        from svi.options import FitOptions

        if data is True:
            data = self.info.data_path
            if data is None:
                raise ValueError("this posterior does not record its data set (info.data_path); pass data= "
                                 "(a Parquet path, dict or DataFrame)")
        cap = _DEFAULT_ARVIZ_ROWS if rows is None else int(rows)
        if cap < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        if isinstance(data, Mapping) and not hasattr(data, "columns"):
            columns = None  # a dict names its keys itself
        else:
            columns = columns if columns is not None else self.info.columns
        # float64, as svi diagnose: observed_data holds the values as given, and elpd sums many terms
        source = open_source(data, columns, model.batch_keys, model.integer_keys, torch.float64,
                             FitOptions(in_memory_rows=0), validate=model.validate)
        try:
            total = source.num_rows
            pick = None
            if total > cap:  # the same rows for every posterior of these data: a seed fixed by the row count
                gen = torch.Generator().manual_seed(_ROW_SAMPLE_SEED + total)
                pick = torch.randperm(total, generator=gen)[:cap].sort().values
            if isinstance(source, InMemoryData):
                tensors = dict(source.tensors)
                batch = tensors if pick is None else {k: v[pick] for k, v in tensors.items()}
            else:
                parts, offset = [], 0
                for chunk in source.chunks():
                    m = next(iter(chunk.values())).shape[0]
                    if pick is None:
                        parts.append(chunk)
                    else:
                        lo, hi = (int(torch.searchsorted(pick, offset + e)) for e in (0, m))
                        if hi > lo:
                            parts.append({k: v[pick[lo:hi] - offset] for k, v in chunk.items()})
                    offset += m
                batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        finally:
            if hasattr(source, "close"):
                source.close()
        index = pick if pick is not None else torch.arange(next(iter(batch.values())).shape[0])
        return batch, index.numpy(), total

    # --- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, data, n: int = 1000, seed: int = 0, columns: Mapping[str, Any] | None = None,
                chunk_rows: int = 65536, kind: str = "mean"):
        """Posterior predictions per row of ``data`` (dict, DataFrame or Parquet path).

        Draws ``n`` parameter sets and returns a pandas DataFrame with one row per input row. The
        outcome column need not be present.

        Args:
            data: the rows to predict.
            n: number of posterior draws.
            seed: seed of the draws and of the simulated outcomes.
            columns: batch key -> column(s) for DataFrame or Parquet data (default: the fit's).
            chunk_rows: rows simulated at a time (memory is about ``n x chunk_rows`` numbers).
            kind: what to return:

                - ``"mean"``: summaries of the posterior predictive, simulated with the model's
                  ``sample_obs(p, batch, generator)``: columns ``mean``, ``sd``, ``q5``, ``q50``, ``q95``.
                - ``"draws"``: the simulated outcomes themselves, one column per draw
                  (``draw_0`` ... ``draw_<n-1>``), so each output row stays aligned with its input
                  row (what MLflow's batch and REST scoring expect).
                - ``"probability"``: for Bernoulli models, P(y = 1) from the model's
                  ``predict_probability(p, batch)`` (the inverse logit of the linear predictor, no
                  Bernoulli noise): columns ``probability`` (its posterior mean), ``sd``, ``q5``,
                  ``q50``, ``q95`` over the draws.
                - ``"components"``: for mixtures, each row's posterior probability of coming from
                  each component, from the model's ``component_probabilities(p, batch)``
                  (responsibilities averaged over the draws): columns ``p0`` ... ``p<K-1>``.

            Vector outcomes (a mixture's ``y`` of D columns) get one column per outcome column
            and summary: ``mean_0``, ``sd_0``, ..., and ``draw_<i>_<j>`` for ``"draws"``.

        Raises:
            ValueError: an unknown ``kind``.
            TypeError: the model lacks the method ``kind`` needs.
        """
        import pandas as pd

        if kind not in _PREDICT_KINDS:
            raise ValueError(f"predict: kind must be one of {', '.join(map(repr, _PREDICT_KINDS))}; got {kind!r}")
        model = self.require_model("prediction")
        if kind == "probability" and not hasattr(model, "predict_probability"):
            raise TypeError(f"kind='probability' needs P(y=1) from the model's predict_probability(p, batch) method, "
                            f"which {model.name} does not have: it is defined for Bernoulli (logistic) models such as "
                            f"LogisticRegression and HierarchicalLogisticRegression")
        if kind == "components" and not hasattr(model, "component_probabilities"):
            raise TypeError(f"kind='components' needs the model's component_probabilities(p, batch) method, which "
                            f"{model.name} does not have: it is defined for mixtures such as GaussianMixture")
        if kind in ("mean", "draws") and not hasattr(model, "sample_obs"):
            raise TypeError(f"{model.name} has no sample_obs(p, batch, generator) method, so it cannot predict")
        batch = self._prediction_batch(data, columns)
        rows = next(iter(batch.values())).shape[0]
        gen = torch.Generator().manual_seed(seed)
        theta = self.sample(n, seed)
        levels = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
        out = []
        for start in range(0, rows, chunk_rows):
            part = {k: v[start : start + chunk_rows] for k, v in batch.items()}
            if kind == "components":
                r = model.component_probabilities(theta, part).double().mean(0)  # (rows, K)
                out.append(pd.DataFrame(r.cpu().numpy(), columns=[f"p{k}" for k in range(r.shape[-1])]))
                continue
            if kind == "probability":
                y = model.predict_probability(theta, part).double()  # (n, rows)
            else:
                y = model.sample_obs(theta, part, generator=gen).double()  # (n, rows) or (n, rows, D)
            if kind == "draws":
                flat = y.permute(1, 0, *range(2, y.dim())).reshape(y.shape[1], -1)
                names = ([f"draw_{i}" for i in range(n)] if y.dim() == 2
                         else [f"draw_{i}_{j}" for i in range(n) for j in range(y.shape[2])])
                out.append(pd.DataFrame(flat.cpu().numpy(), columns=names))
                continue
            q = torch.quantile(y, levels, dim=0)
            first = "probability" if kind == "probability" else "mean"
            stats = {first: y.mean(0), "sd": y.std(0), "q5": q[0], "q50": q[1], "q95": q[2]}
            if y.dim() == 3:  # one column per outcome column and summary
                stats = {f"{name}_{j}": v[:, j] for j in range(y.shape[2]) for name, v in stats.items()}
            out.append(pd.DataFrame({k: v.cpu().numpy() for k, v in stats.items()}))
        return pd.concat(out, ignore_index=True)

    def _prediction_batch(self, data, columns) -> dict[str, torch.Tensor]:
        from svi.data.memory import InMemoryData
        from svi.data.parquet import is_parquet_input
        from svi.data.source import open_source
        from svi.options import FitOptions

        keys = list(self.model.batch_keys or [])
        columns = dict(columns or self.info.columns or {})
        dtype = self.family.frame_loc.dtype
        if is_parquet_input(data):
            import pyarrow.parquet as pq

            from svi.data.parquet import list_parquet_files

            _, files = list_parquet_files(data)
            names = pq.ParquetFile(files[0]).schema_arrow.names
            mapping = {k: columns.get(k, k) for k in keys}
            mapping = {k: v for k, v in mapping.items() if k != "y" or _columns_present(v, names)}
            src = open_source(data, mapping, list(mapping), self.model.integer_keys, dtype,
                              FitOptions(in_memory_rows=2**62), validate=self.model.validate)
            return dict(src.tensors)
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover
            pd = None
        if pd is not None and isinstance(data, pd.DataFrame):
            mapping = {k: columns.get(k, k) for k in keys}
            mapping = {k: v for k, v in mapping.items() if k != "y" or _columns_present(v, list(data.columns))}
            return dict(InMemoryData(data, mapping, integer_keys=self.model.integer_keys, dtype=dtype,
                                     validate=self.model.validate).tensors)
        present = [k for k in keys if k in data]
        return dict(InMemoryData({k: data[k] for k in present}, integer_keys=self.model.integer_keys,
                                 dtype=dtype, validate=self.model.validate).tensors)

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path | str:
        """Write ``posterior.safetensors`` and ``posterior.json`` into folder ``path`` (created); an
        fsspec URL (``s3://bucket/post``, ``memory://post``) is written locally, then uploaded."""
        from safetensors.torch import save_file

        if "://" in os.fspath(path):
            import tempfile

            fs, root = _filesystem(os.fspath(path))
            with tempfile.TemporaryDirectory() as tmp:
                local = self.save(Path(tmp) / "posterior")
                fs.makedirs(root, exist_ok=True)
                for f in ("posterior.safetensors", "posterior.json"):  # the JSON last: a reader sees whole files
                    fs.put_file(str(local / f), f"{root.rstrip('/')}/{f}")
            return os.fspath(path)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.family.state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "family": self.family.name,
            "size": self.family.size,
            "rank": getattr(self.family, "num_factors", None),
            "dtype": str(self.family.frame_loc.dtype).replace("torch.", ""),
            "model": _jsonable(self.model_spec),
            "space": self.space.spec(),
            "info": self.info.to_dict(),
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
            try:
                space.load_centering(meta["space"])
            except ModelError as e:
                raise PosteriorFormatError(f"{meta_file}: {e}") from None
        else:
            try:
                space = ParamSpace.from_spec(meta["space"], model_spec.get("class", "model"))
            except (KeyError, TypeError, AttributeError, ModelError) as e:
                raise PosteriorFormatError(f"{meta_file} does not describe its parameters with svi's vocabulary "
                                           f"({e}); pass model= to load it") from None
            model = _rebuild_model(model_spec, trust, meta_file)
            if model is not None and not _same_params(ParamSpace(model.get_params(), model.name), meta["space"]):
                raise PosteriorFormatError(f"model {model.name} does not match the parameters saved in {meta_file}")
        if meta.get("size") != space.size or meta.get("family") not in FAMILIES \
                or meta.get("dtype") not in ("float32", "float64"):
            raise PosteriorFormatError(f"{meta_file}: family {meta.get('family')!r} of size {meta.get('size')!r} and "
                                       f"dtype {meta.get('dtype')!r} do not describe {space.size} parameters")
        rank = meta.get("rank") or 2
        family = make_family(meta["family"], meta["size"], dtype=getattr(torch, meta["dtype"]), num_factors=int(rank),
                             layout=space.group_layout())
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
        group = entry.get("group") or {}
        if (group.get("loc"), group.get("scale")) != (b.loc, b.scale):
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


def _columns_present(spec, names) -> bool:
    """Whether the outcome's columns (a name, a list or a pattern) are in the data: an outcome
    may be absent when predicting, except where it is the model's input (a mixture's rows)."""
    from svi.data.columns import is_pattern

    if isinstance(spec, str):
        return spec in names or (is_pattern(spec) and any(fnmatch.fnmatchcase(n, spec) for n in names))
    return all(c in names for c in spec)


def _observed_key(model: Model | None) -> str:
    """The batch key holding the outcome: a model's optional ``observed_key`` attribute, else ``"y"``."""
    key = getattr(model, "observed_key", None) if model is not None else None
    return key if isinstance(key, str) else "y"


def _available_columns(data: Any) -> list[str] | None:
    """Column names of a DataFrame or of a Parquet data set's first file (its footer only), else ``None``."""
    if data is None or isinstance(data, bool):
        return None
    if hasattr(data, "columns") and not isinstance(data, (str, os.PathLike)):
        return [str(c) for c in data.columns]
    try:
        from svi.data.parquet import is_parquet_input, list_parquet_files

        if not is_parquet_input(data):
            return None
        import pyarrow.parquet as pq

        _, files = list_parquet_files(data)
        return list(pq.ParquetFile(files[0]).schema_arrow.names)
    except Exception:  # a data set moved or deleted since the fit: the names are unknown, not an error
        return None


@torch.no_grad()
def _pointwise(model: Model, theta: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], seed: int):
    """(log-likelihood (S, B) float64, simulated outcomes (S, B) or ``None``) as numpy arrays.

    Rows go through the model a slice at a time so that intermediates such as a hierarchical
    model's (S, rows, D) slopes stay near 2**22 numbers."""
    S = next(iter(theta.values())).shape[0]
    rows = next(iter(batch.values())).shape[0]
    step = max(1, 2**22 // max(S, 1))
    simulate = getattr(model, "sample_obs", None)
    gen = torch.Generator().manual_seed(seed)
    ll, pp = [], []
    for start in range(0, rows, step):
        part = {k: v[start : start + step] for k, v in batch.items()}
        b = next(iter(part.values())).shape[0]
        values = model.log_likelihood(theta, part)
        if tuple(values.shape) != (S, b):
            raise ModelError(f"{model.name}.log_likelihood returned shape {tuple(values.shape)}; expected ({S}, {b})")
        ll.append(values.double().cpu().numpy())
        if simulate is not None:
            pp.append(simulate(theta, part, generator=gen).cpu().numpy())
    return np.concatenate(ll, axis=1), (np.concatenate(pp, axis=1) if simulate is not None else None)


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
    if "://" in text:  # any fsspec file system: s3://, gs://, file://, memory:// ...
        import tempfile

        fs, root = _filesystem(text)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                fs.get(root.rstrip("/") + "/", tmp + "/", recursive=True)
            except Exception as e:  # fsspec raises per backend: FileNotFoundError, ClientError, ...
                raise PosteriorFormatError(f"cannot fetch {text}: {type(e).__name__}: {e}") from None
            return Posterior.load(tmp, model=model, trust=trust)
    if ":" in text.split("/")[0] and not os.path.exists(text):
        raise PosteriorFormatError(
            f"unknown posterior URI {text!r}: use a folder (local or fsspec URL), runs:/<run_id>/posterior or "
            "models:/<name>/<version>"
        )
    return Posterior.load(text, model=model, trust=trust)


def _filesystem(url: str):
    """(fsspec file system, path) of a URL, or a clear error for a protocol fsspec does not know."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as e:
        raise PosteriorFormatError(f"unknown posterior URI {url!r}: {e}") from None


def save_mlflow_model(post: Posterior, path: str | os.PathLike, columns: Mapping[str, Any] | None = None) -> Path:
    """Write ``post`` as an MLflow model folder with a pyfunc flavour that needs no pickled code:
    MLflow loads it through ``loader_module="svi.posterior"`` (see :func:`_load_pyfunc`).

    The model carries:

    - an input signature: one column per input column of the fit's mapping (``post.info.columns``,
      or ``columns``), the outcome excluded; integer keys (group ids) as ``long``, the rest as
      ``double``. MLflow then checks each request and names missing columns ("Model is missing
      inputs ['x3']") instead of failing inside the model. A glob pattern (``"x*"``) is expanded
      from the fit's record (``info.resolved_columns``, or the schema of ``info.data_path``);
      when svi cannot name every column (a pattern it cannot expand, a fit on a dict of arrays, a
      posterior without its model) the model is written without an input signature and a warning
      says so;
    - params ``draws`` (1000), ``seed`` (0) and ``kind`` (``"mean"``, ``"draws"`` or
      ``"probability"``, as in :meth:`Posterior.predict`);
    - requirements pinned to the versions that wrote it: svi, torch, numpy, pandas, pyarrow, safetensors.

    Args:
        post: the posterior.
        path: the folder to create.
        columns: batch key -> column(s), to name the inputs where the fit's record cannot (e.g.
            ``{"x": ["age", "income"]}`` for a fit mapped with ``"x*"``, or for a fit on a dict of
            arrays); merged over the fit's mapping and recorded in the saved model, which then
            reads these columns at predict time.
    """
    import tempfile

    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    path = Path(path)
    inputs = _input_schema(post, columns)
    if columns:  # the served model must read the columns its signature names
        post = Posterior(post.model, post.space, post.family, post.info.replace(columns={
            **(post.info.columns or {}), **dict(columns)}), post.model_spec)
    params = ParamSchema([ParamSpec("draws", "long", 1000), ParamSpec("seed", "long", 0),
                          ParamSpec("kind", "string", "mean")])
    with tempfile.TemporaryDirectory() as tmp:
        folder = post.save(Path(tmp) / "posterior")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow's nudge for an input example
            mlflow.pyfunc.save_model(os.fspath(path), loader_module="svi.posterior", data_path=os.fspath(folder),
                                     pip_requirements=_pinned_requirements(),
                                     signature=ModelSignature(inputs=inputs, params=params))
    # MLflow copies data_path under artifacts/: keep the svi folder where Posterior.load looks
    data = path / "data"
    if data.exists() and not (path / "artifacts" / "posterior").exists():
        (path / "artifacts").mkdir(exist_ok=True)
        os.replace(data / "posterior", path / "artifacts" / "posterior")
        _rewrite_data_path(path)
    return path


def _input_schema(post: Posterior, columns: Mapping[str, Any] | None):
    """The MLflow input ``Schema`` of the columns the model reads, or ``None`` with a warning."""
    from mlflow.types import ColSpec, Schema

    def none(why: str):
        warnings.warn(f"the MLflow model gets no input signature: {why}. MLflow will not check requests' columns",
                      UserWarning, stacklevel=4)
        return None

    model = post.model
    if model is None:  # which keys hold integers is the model's to say
        return none("the posterior's model code is not loaded, so svi cannot tell the input types")
    mapping = dict(columns if columns is not None else (post.info.columns or {}))
    if not mapping:
        return none("the fit mapped no columns (it was given a dict of arrays); name them with "
                    "save_mlflow_model(post, path, columns={key: column(s)})")
    keys = list(model.batch_keys) if model.batch_keys is not None else list(mapping)
    names = post._column_names(mapping)
    outcome = _observed_key(model)
    specs, seen = [], set()
    for key in keys:
        if key == outcome:
            continue
        cols = names.get(key) if key in mapping else [key]
        if not cols:
            return none(f"key {key!r} maps to the pattern {mapping[key]!r} and svi cannot tell which columns it "
                        f"matched; pass columns={{{key!r}: [...]}} to name them")
        for c in cols:
            if c not in seen:
                seen.add(c)
                specs.append(ColSpec("long" if key in model.integer_keys else "double", c))
    return Schema(specs) if specs else None


def _pinned_requirements() -> list[str]:
    """pip requirements pinned to this environment, so a served model predicts as it did here."""
    from importlib.metadata import PackageNotFoundError, version

    import svi

    reqs = [f"svi=={svi.__version__}", f"torch=={torch.__version__.split('+')[0]}"]
    for dist in ("numpy", "pandas", "pyarrow", "safetensors"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:  # pragma: no cover - all are svi's dependencies
            pass
    return reqs


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
    """What ``mlflow.pyfunc.load_model(uri).predict(df, params=...)`` calls: :meth:`Posterior.predict`
    on each row of a DataFrame. Params: ``draws`` (1000), ``seed`` (0) and ``kind``: ``"mean"``
    (columns ``mean``, ``sd``, ``q5``, ``q50``, ``q95``), ``"draws"`` (``draw_0`` ...) or
    ``"probability"`` (P(y=1) of Bernoulli models: ``probability``, ``sd``, ``q5``, ``q50``, ``q95``)."""

    def __init__(self, post: Posterior, draws: int = 1000):
        self.post = post
        self.draws = draws

    def predict(self, data, params=None):
        params = params or {}
        return self.post.predict(data, n=int(params.get("draws", self.draws)), seed=int(params.get("seed", 0)),
                                 kind=str(params.get("kind", "mean")))


def _load_pyfunc(data_path: str) -> PyfuncPosterior:
    """MLflow's entry point for the pyfunc flavour (``loader_module``). The model's code is imported
    only from svi.models or the modules named in ``SVI_TRUSTED_MODULES``."""
    return PyfuncPosterior(Posterior.load(data_path))
