"""Job configs: typed YAML (OmegaConf structured configs), command-line overrides, and
running a job end to end.

A job names a model (an import path and constructor arguments), the data (Parquet
path and column mapping, optionally how to make a synthetic data set when it is
missing), the fit options, tracking, checkpoints and outputs. Every key is checked
before anything runs: an unknown key, a wrong type or a bad value is an error naming
the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from svi.checkpoint import JOB_FILE
from svi.distributed import launch_rank
from svi.options import FitOptions, OptionsError, specs, suggest

__all__ = ["JobConfig", "ConfigError", "load_config", "fit_config", "build_model", "fit_options", "JOB_FILE"]



class ConfigError(ValueError):
    """A bad config file or override: names the key and what is allowed."""


@dataclass
class ModelConfig:
    target: str = MISSING  # "package.module:ClassName"
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MakeConfig:
    """A synthetic data set to write when data.path does not exist (svi.data.jobs.write_synthetic)."""

    model: str = "logistic"
    rows: int = 1_000_000
    features: int = 10
    files: int = 8
    row_group_size: int = 65_536
    groups: int = 20
    components: int = 3
    varying_slopes: bool = False
    seed: int = 0
    heldout: int = 0  # rows written to <data.path>-heldout (for data.heldout)


def _yaml_type(t):
    """An OmegaConf-friendly annotation for a FitOptions type (bare list/dict typed, other unions Any)."""
    if t is list:
        return List[Any]
    if t is dict:
        return Dict[str, Any]
    args = typing.get_args(t)
    if typing.get_origin(t) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return Optional[_yaml_type(rest[0])]
        return Any
    return t


def _section(name: str, section: str, extra: Sequence[tuple] = ()):
    """The structured config of one job section, generated from the FitOptions declarations
    (svi.options.option) after ``extra`` fields the section has beyond fit options."""
    fields = list(extra)
    for s in specs():
        if s.section == section:
            d = s.job_default
            f = field(default_factory=lambda d=d: copy.deepcopy(d)) if isinstance(d, (list, dict)) else field(default=d)
            fields.append((s.key, _yaml_type(s.type), f))
    return dataclasses.make_dataclass(name, fields, namespace={"__module__": __name__})


DataConfig = _section("DataConfig", "data", [
    ("path", str, field(default=MISSING)),  # Parquet file, glob or folder (local or fsspec URL)
    ("columns", Dict[str, Any], field(default_factory=dict)),
    ("make", Optional[MakeConfig], field(default=None)),
])
TrackingConfig = _section("TrackingConfig", "tracking")
CheckpointConfig = _section("CheckpointConfig", "checkpoint")


@dataclass
class OutputConfig:
    posterior: Optional[str] = None  # folder to save the fitted posterior in
    summary_draws: int = 4000


@dataclass
class JobConfig:
    name: str = "job"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fit: Dict[str, Any] = field(default_factory=dict)  # any svi.FitOptions field
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: Any = next(s.job_default for s in specs() if s.name == "resume")  # true | false | auto
    output: OutputConfig = field(default_factory=OutputConfig)


_SECTIONS = {f.name for f in dataclasses.fields(JobConfig)}
_FIT_KEYS = {f.name for f in dataclasses.fields(FitOptions)}
_PATH = {s.name: s.path for s in specs()}  # each fit option's key in a job config
# fit options that the data, tracking and checkpoint sections (or the top level) set
_ELSEWHERE = {s.name: s.path if s.section != "job" else f"{s.path} (top level)" for s in specs() if s.section != "fit"}


def _normalise_overrides(overrides: Sequence[str]) -> list[str]:
    """``family=fullrank`` is short for ``fit.family=fullrank``."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. fit.family=fullrank)")
        key, value = item.split("=", 1)
        if "." not in key and key not in _SECTIONS:
            if key in _ELSEWHERE:
                raise ConfigError(f"override {item!r}: {key} is set as {_ELSEWHERE[key]} in a job config")
            if key not in _FIT_KEYS:
                known = (_SECTIONS | _FIT_KEYS) - set(_ELSEWHERE)
                raise ConfigError(f"unknown key {key!r} in override {item!r}; "
                                  f"{suggest(key, known, 'top-level keys and fit options')}")
            key = f"fit.{key}"
        out.append(f"{key}={value}")
    return out


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a YAML job config onto the typed schema and apply ``key=value`` overrides.

    Raises:
        ConfigError: missing file, unknown key, wrong type or bad value, naming the key.
    """
    schema = OmegaConf.structured(JobConfig)
    try:
        merged = schema
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            try:
                loaded = OmegaConf.load(p)
            except yaml.YAMLError as e:  # broken YAML: say where, not a parser traceback
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                raise ConfigError(f"config file {p} is not valid YAML{where}: "
                                  f"{getattr(e, 'problem', None) or e}") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"config file {p} must hold a mapping of keys (name:, model:, data:, ...), "
                                  f"not a {type(loaded).__name__}")
            merged = OmegaConf.merge(merged, loaded)
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(_normalise_overrides(overrides)))
        OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except ConfigError:
        raise
    except ConfigKeyError as e:
        raise ConfigError(f"unknown config key {e.full_key!r}: {_allowed(e.full_key)}") from None
    except ValidationError as e:
        raise ConfigError(f"config key {e.full_key!r}: {e.msg}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config key {key!r}: {e.msg}" if key else f"bad config: {e}") from None
    fit_options(merged)  # values checked now, before anything runs
    return merged


def _allowed(full_key: str | None) -> str:
    parts = (full_key or "").split(".")
    sub = {"model": ModelConfig, "data": DataConfig, "tracking": TrackingConfig, "checkpoint": CheckpointConfig,
           "output": OutputConfig}.get(parts[0])
    if sub is not None and len(parts) >= 2:
        return suggest(parts[-1], {f.name for f in dataclasses.fields(sub)}, f"keys of {parts[0]!r}")
    return suggest(parts[0], _SECTIONS, "top-level keys")


def fit_options(cfg: DictConfig) -> FitOptions:
    """The :class:`FitOptions` of a job (fit section plus data, tracking and checkpoint sections)."""
    fit = OmegaConf.to_container(cfg.fit, resolve=True)
    unknown = sorted(set(fit) - _FIT_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key 'fit.{unknown[0]}'; "
                          f"{suggest(unknown[0], _FIT_KEYS - set(_ELSEWHERE), 'fit options')}")
    misplaced = sorted(set(fit) & set(_ELSEWHERE))
    if misplaced:
        raise ConfigError(f"config key 'fit.{misplaced[0]}' belongs in another section: {_ELSEWHERE[misplaced[0]]}")
    values = dict(fit)
    for s in specs():
        if s.section != "fit":
            value = (cfg if s.section == "job" else cfg[s.section])[s.key]
            values[s.name] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    if not cfg.checkpoint.dir:  # the job default resume="auto" only means something with a checkpoint folder
        values["resume"] = False
    try:
        return FitOptions.from_dict(values)
    except OptionsError as e:
        raise ConfigError(f"config key {e.naming(_PATH.get(e.key, e.key))}" if e.key in _PATH else str(e)) from None


def build_model(cfg: DictConfig):
    """Import ``model.target`` ("package.module:Class") and construct it with ``model.args``."""
    target = cfg.model.target
    module_name, _, qualname = target.partition(":")
    if not qualname:
        raise ConfigError(f"config key 'model.target' = {target!r}: write it as 'package.module:ClassName'")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config key 'model.target': cannot import {target!r} ({type(e).__name__}: {e}); "
                          "is the package installed or on PYTHONPATH?") from None
    except SystemExit as e:  # a module that exits at import would end the job silently (exit 0)
        raise ConfigError(f"config key 'model.target': importing {module_name!r} called sys.exit({e.code!r}); "
                          "a model module must not exit when imported") from None
    except Exception as e:  # the user's module raised at import: name it, not a traceback
        raise ConfigError(f"config key 'model.target': importing {module_name!r} raised {type(e).__name__}: {e}; "
                          "fix the module (run `python -c 'import {module_name}'` to see where)") from None
    args = OmegaConf.to_container(cfg.model.args, resolve=True)
    try:
        return obj(**args)
    except Exception as e:  # the user's constructor: say which args it rejected
        raise ConfigError(f"config key 'model.args': {target}({', '.join(f'{k}={v!r}' for k, v in args.items())}) "
                          f"failed: {type(e).__name__}: {e}") from None


def ensure_data(cfg: DictConfig) -> dict | None:
    """Write the synthetic data set described by ``data.make`` when ``data.path`` is missing.

    Returns:
        The data set's truth (``<data.path>.truth.json``, synthetic data) when there is one, else None.
    """
    from svi.data.jobs import truth_file as jobs_truth_file
    from svi.data.jobs import write_synthetic

    path = Path(cfg.data.path)
    truth_file = jobs_truth_file(path)
    if cfg.data.make is not None and not truth_file.is_file():
        m = cfg.data.make
        if launch_rank() == 0:
            print(f"making synthetic data: {m.rows:,} rows of {m.model} in {path} ...", flush=True)
            write_synthetic(path, m.model, m.rows, m.features, m.files, m.row_group_size, m.seed, m.groups,
                            m.components, m.varying_slopes, heldout=m.heldout)
        else:  # rank 0 writes; the truth file, written last, says the data set is complete
            deadline = time.monotonic() + float(os.environ.get("SVI_DIST_TIMEOUT", "300"))
            while not truth_file.is_file():
                if time.monotonic() > deadline:
                    raise ConfigError(f"data.make: rank 0 did not finish writing {path} in time")
                time.sleep(0.2)
    if truth_file.is_file():
        return json.loads(truth_file.read_text())
    return None


def fit_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), cfg: DictConfig | None = None):
    """Run a job: make the data if asked and missing, fit, save the posterior.

    Args:
        path: YAML job config.
        overrides: ``key=value`` strings (``fit.family=fullrank`` or short ``family=fullrank``).
        cfg: an already loaded config (then ``path`` and ``overrides`` are ignored).

    Returns:
        The :class:`svi.Posterior`.
    """
    import svi

    cfg = cfg if cfg is not None else load_config(path, overrides)
    opts = fit_options(cfg)
    model = build_model(cfg)
    truth = ensure_data(cfg)
    columns = OmegaConf.to_container(cfg.data.columns, resolve=True) or None
    record = {"job": OmegaConf.to_container(cfg, resolve=True), "truth": truth["truth"] if truth else None}
    post = svi.fit(model, cfg.data.path, columns=columns, job_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                   record=record, **dataclasses.asdict(opts))
    if cfg.output.posterior and launch_rank() == 0:
        post.save(cfg.output.posterior)
    return post

