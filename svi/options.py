"""Fit options: one frozen dataclass, shared by ``svi.fit`` and the YAML configs.

Defaults are chosen to land on the exact optimum of the chosen family without
tuning (README, "Accurate by default"); each part can be switched off to get
plain Stan-style ADVI: ``warm_start="none", optimizer="stan", lr="auto",
convergence="stan", stl=False``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from svi.families import AUTO, FAMILIES

__all__ = ["FitOptions", "OptionsError", "STAN_ADVI", "SAFE_TO_CHANGE", "FREE_TO_CHANGE", "SECTIONS", "Spec", "option", "specs", "suggest"]


class OptionsError(ValueError):
    """An unknown option, a wrong type or a bad value; names the key and what is allowed.

    ``key`` is the FitOptions field at fault (``None`` when no single one is); ``value`` and
    ``allowed`` are set for a bad value, so a job config can name the key as the user wrote it
    (:meth:`naming`).
    """

    def __init__(self, message: str, *, key: Optional[str] = None, value: Any = None, allowed: Optional[str] = None):
        super().__init__(message)
        self.key, self.value, self.allowed = key, value, allowed

    def naming(self, name: str) -> str:
        """The message with the key called ``name`` (a job config's ``checkpoint.every``)."""
        if self.allowed is None:
            return str(self)
        return f"{name}={self.value!r} is not allowed: {self.allowed}"


#: where a fit option lives in a job config: the sections of its YAML; ``job`` is the top level
SECTIONS = ("fit", "data", "tracking", "checkpoint", "job")
#: a job default standing for the job's ``name`` (an OmegaConf interpolation in the job schema)
JOB_NAME = "${name}"
_SAME = object()  # no job default: a job config starts from the Python default


def option(default: Any, section: str = "fit", *, key: Optional[str] = None, job_default: Any = _SAME,
           safe: bool = False, free: bool = False):
    """A FitOptions field: its default (given once), where a job config sets it (``section.key``;
    ``key`` defaults to the field's name), a job default where a job must start elsewhere, and
    whether a resume may change it: with ``force_resume`` (``safe``, see :data:`SAFE_TO_CHANGE`)
    or freely (``free``, see :data:`FREE_TO_CHANGE`)."""
    if section not in SECTIONS:
        raise ValueError(f"section {section!r} is not one of {SECTIONS}")
    metadata = {"section": section, "key": key, "job_default": job_default, "safe_to_change": safe or free,
                "free_to_change": free}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Spec:
    """One fit option as the job schema sees it (:func:`specs`)."""

    name: str  # the FitOptions field (svi.fit's keyword)
    section: str  # one of SECTIONS
    key: str  # its key in that section
    default: Any  # FitOptions's default
    job_default: Any  # a job config's default (== default unless declared otherwise)
    type: Any  # the field's type, resolved
    safe_to_change: bool

    @property
    def path(self) -> str:
        """The key as a job config's user writes it: ``checkpoint.every``, ``fit.lr``, ``resume``."""
        return self.key if self.section == "job" else f"{self.section}.{self.key}"


@dataclass(frozen=True)
class FitOptions:
    """Every option of a fit.

    Attributes:
        family: ``auto`` (``structured`` for a model with group effects, else ``meanfield``),
            ``meanfield``, ``fullrank``, ``lowrank`` or ``structured``.
        rank: factor columns of ``lowrank``.
        max_steps: hard cap on optimisation steps.
        batch_size: rows per step per process; ``None`` is all rows up to 10,000, else 1,024.
        num_particles: S, draws of z per step.
        seed: seeds the noise, the data order and the warm start.
        optimizer: ``adam`` (default; lr is then a fraction of a posterior sd in the warm start's
            frame), ``stan`` (Stan's step-size sequence) or any ``torch.optim`` name.
        lr: step size (eta for ``stan``); ``"auto"`` runs Stan's eta search (``stan`` only).
        optimizer_options: extra keyword arguments of the optimiser.
        lr_schedule: ``{"name": <torch.optim.lr_scheduler class>, ...}`` stepped every step.
        convergence: ``posterior`` (stall-triggered decay, averaging, stop in posterior units)
            or ``stan`` (relative ELBO tolerance).
        window: steps per window of the ``posterior`` rule at the initial step size; windows grow
            as the step size decays (a step of size lr relaxes over about 1/lr steps).
        tol_param: ``posterior`` rule tolerance: root-mean-square movement between phase averages,
            in q's sds (means) and relative (sds); no coordinate may move more than max(4, sqrt(2 ln K) + 1) x tol_param for K coordinates.
        lr_decay: step-size factor at each stall (``posterior`` rule).
        max_decays: stop after this many decays.
        averaging: Polyak-Ruppert averaging of the iterates within each phase.
        stl: sticking-the-landing gradient: ``"auto"`` (after the first decay), True or False.
        antithetic: pair each noise draw with its negation (2 x num_particles particles a step).
        control_variate: subtract the warm start's quadratic approximation of the log density
            and add back its exact expectation (needs the warm start).
        tol_rel_obj, eval_elbo, elbo_samples, eval_rows: Stan's rule: tolerance, steps between
            evaluations, draws per evaluation, rows of the fixed evaluation batch.
        adapt_iter: steps per candidate in the eta search.
        warm_start: ``laplace`` (L-BFGS path + Laplace, see svi.warmstart) or ``none``.
        warm_start_rows: rows used by the warm start (a uniform sample when N is larger).
        warm_start_draws: Monte Carlo draws to score each warm-start candidate.
        newton_start: when the warm start saw a sample of the rows and the data control variate
            passes over all of them, move the warm start by Newton steps on the full data's gradient
            (each kept only where the full log density rises; models without group effects).
        init_scale: initial sd of q in z-space when there is no warm start (Stan uses 1).
        init: initial mean in z-space when a Param has no init: a number (Stan's init=0 is 0).
        dtype: ``float32`` or ``float64`` for the optimisation (the warm start is always float64).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        nan_policy: ``error`` or ``drop`` rows with NaN in used columns.
        row_filter: Parquet rows to keep, in pyarrow's form: ``[["age", ">", 18], ...]`` (all must hold).
        scheduler: a Dask ``distributed`` scheduler address for the reads; ``None``: local threads.
        storage_options: fsspec options for remote Parquet (credentials, endpoints).
        cache_dir: where row counts after a filter and data statistics are cached (~/.cache/svi).
        standardize: batch keys to centre and scale by full-data column means and sds (the fitted
            coefficients are then on the standardised scale).
        in_memory_rows: a Parquet data set with at most this many rows is read into memory whole;
            larger ones are streamed.
        shuffle_units: row groups whose rows the shuffle buffer mixes.
        prefetch: row groups read ahead while the optimiser runs.
        nonfinite_patience: consecutive non-finite steps before restoring the last good state.
        max_nonfinite_restores: restores (each halving the step size) before giving up.
        heldout: rows kept out of the fit (Parquet file, folder or glob, read with the fit's
            ``columns``): every ``heldout_every`` steps and at the end, their average log
            predictive density under ``heldout_draws`` draws of q is logged as ``heldout_lpd``
            (Kucukelbir et al., JMLR 2017, section 4); a uniform sample of ``heldout_rows`` rows
            when there are more.
        heldout_rows, heldout_every, heldout_draws: see ``heldout``.
        log_every: steps between tracked metrics.
        khat_rows: PSIS k-hat (Yao et al., ICML 2018) at the end of the fit on this many rows: the
            whole data set when it is no larger, else a uniform sample with a difference estimator
            (``svi.diagnostics.psis_on_rows``), at most 5e7 / (parameters) rows (2,000 at least) so
            its cost stays bounded for large models; 0 turns it off. A k-hat above 0.7 is warned about
            and tagged in MLflow.
        compile: run the step as one ``torch.compile`` graph (single process, an optimiser with a
            functional form: adam, sgd, stan). ``auto`` (the default): from step ``compile_after``
            on, where the platform can compile (a C++ compiler for the CPU backend, or CUDA with
            Triton); ``true``: from the first step; ``false``: never. A batch of another size than
            the fit's (the ragged last batch of a pass) runs the uncompiled step rather than
            compiling a graph it would use once a pass; a compilation that fails logs one warning
            and the fit goes on uncompiled.
        compile_after: the step from which ``compile: auto`` compiles. Compiling costs seconds (about
            3 s with torch's on-disk graph cache, 15-20 s without, on 2 CPU cores) and saves about
            1 ms a step of the default estimator, so it pays only for long fits; the switch is at a
            fixed step, so a resumed fit takes the same steps as an uninterrupted one.
        threads: torch's intra-op threads during the fit. ``None``: torch's current setting
            (``OMP_NUM_THREADS``, else all cores), less one while Parquet is streamed through
            local reading threads, which need a core of their own (when every core runs torch's
            OpenMP workers the two preempt each other; on 2 cores one thread streams 1.4x faster).
        progress: show a progress bar per phase (warm start, full-data pass, fit, k-hat) on rank 0
            (``auto``: when stderr, where the bars go, is a terminal; plain log lines otherwise).
        checkpoint_dir: folder for checkpoints (none are written when ``None``): a local folder or an
            fsspec URL (``s3://bucket/run/ckpt``, ``file:///scratch/ckpt``, ``memory://run``).
        checkpoint_every: steps between checkpoints (one is always written at the end).
        keep_checkpoints: how many checkpoints to keep.
        resume: ``True`` (a checkpoint must exist), ``"auto"`` (resume when one exists) or ``False``.
        force_resume: accept a checkpoint whose options differ, only in keys safe to change.
        tracking: log the fit to MLflow.
        tracking_uri: MLflow store; ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` when ``None``.
        missing_run: what a resume does when the MLflow run of its checkpoint is not in the current
            store (a new ``tracking_uri``, a deleted ``mlflow.db``): ``"new"`` continues in a new run
            there, tagged ``svi.resumed_from_run`` / ``svi.resumed_from_store``; ``"error"`` refuses.
        tracking_wait: seconds the end of a fit waits for a lost tracking server before writing what
            is unsent to ``unsent-mlflow-<run>.jsonl`` for ``svi sync``.
        experiment, run_name: MLflow experiment and run names.
        system_metrics: also log MLflow system metrics (CPU, memory, GPU).
        register_model: register the fitted posterior in the MLflow model registry under this name.

    Each field is declared with :func:`option`: its default, and where a YAML job config sets it
    (``fit.<name>`` unless it says otherwise, e.g. ``tracking_uri`` is ``tracking.uri``); the job
    schema (``svi.config``) is generated from these declarations. A job starts from the same
    defaults except the declared job defaults: ``tracking`` is on (a job is a tracked run), ``resume``
    is ``"auto"`` (when ``checkpoint.dir`` is set) and ``run_name`` is the job's ``name``.
    """

    family: str = option(AUTO)
    rank: int = option(2)
    max_steps: int = option(20000, safe=True)
    batch_size: Optional[int] = option(None)
    num_particles: int = option(1)
    seed: int = option(0)
    optimizer: str = option("adam")
    lr: Union[float, str] = option(0.1)
    optimizer_options: dict = option(dict())
    lr_schedule: Optional[dict] = option(None)
    convergence: str = option("posterior")
    window: int = option(100)
    tol_param: float = option(0.05)
    lr_decay: float = option(0.5)
    max_decays: int = option(10)
    averaging: bool = option(True)
    stl: Union[bool, str] = option("auto")
    antithetic: bool = option(True)
    control_variate: bool = option(True)
    tol_rel_obj: float = option(0.01)
    eval_elbo: int = option(100)
    elbo_samples: int = option(100)
    eval_rows: int = option(10000)
    adapt_iter: int = option(50)
    warm_start: str = option("laplace")
    warm_start_rows: int = option(200_000)
    warm_start_draws: int = option(64)
    newton_start: bool = option(True, free=True)
    init_scale: float = option(0.1)
    init: float = option(0.0)
    dtype: str = option("float32")
    device: str = option("cpu")
    nan_policy: str = option("error", "data")
    row_filter: Optional[list] = option(None, "data")
    scheduler: Optional[str] = option(None, "data", safe=True)
    storage_options: Optional[dict] = option(None, "data", safe=True)
    cache_dir: Optional[str] = option(None, "data", safe=True)
    in_memory_rows: int = option(1_000_000, "data")
    standardize: list = option(list(), "data")
    shuffle_units: int = option(4, "data")
    prefetch: int = option(4, "data", free=True)
    nonfinite_patience: int = option(20)
    max_nonfinite_restores: int = option(5)
    heldout: Optional[str] = option(None, "data", safe=True)
    heldout_rows: int = option(10_000, "data", safe=True)
    heldout_every: int = option(500, "data", safe=True)
    heldout_draws: int = option(32, "data", safe=True)
    log_every: int = option(100, safe=True)
    khat_rows: int = option(50_000, safe=True)
    compile: Union[bool, str] = option("auto", free=True)
    compile_after: int = option(5000, free=True)
    threads: Optional[int] = option(None, free=True)
    progress: Union[bool, str] = option("auto", free=True)
    checkpoint_dir: Optional[str] = option(None, "checkpoint", key="dir", safe=True)
    checkpoint_every: int = option(1000, "checkpoint", key="every", safe=True)
    keep_checkpoints: int = option(3, "checkpoint", key="keep", safe=True)
    resume: Union[bool, str] = option(False, "job", job_default="auto", safe=True)
    force_resume: bool = option(False, safe=True)
    tracking: bool = option(False, "tracking", key="enabled", job_default=True, safe=True)
    tracking_uri: Optional[str] = option(None, "tracking", key="uri", safe=True)
    missing_run: str = option("new", "tracking", safe=True)
    tracking_wait: float = option(30.0, "tracking", key="wait", safe=True)
    experiment: str = option("svi", "tracking", safe=True)
    run_name: Optional[str] = option(None, "tracking", job_default=JOB_NAME, safe=True)
    system_metrics: bool = option(False, "tracking", safe=True)
    register_model: Optional[str] = option(None, "tracking", safe=True)

    def __post_init__(self):
        _check(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FitOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OptionsError(f"unknown option {unknown[0]!r}; {suggest(unknown[0], known, 'known options')}",
                               key=unknown[0])
        return cls(**values)

    def replace(self, **changes) -> "FitOptions":
        return FitOptions.from_dict({**dataclasses.asdict(self), **changes})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def suggest(word: str, choices, what: str = "choices") -> str:
    """``did you mean 'x'?`` when a choice is close to ``word`` (a typo), else the sorted list."""
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=2, cutoff=0.75)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"{what} are {', '.join(sorted(choices))}"


def specs() -> list[Spec]:
    """Every fit option with its job-config section, key and defaults, in field order."""
    import typing

    hints = typing.get_type_hints(FitOptions)
    out = []
    for f in dataclasses.fields(FitOptions):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        job = f.metadata["job_default"]
        out.append(Spec(f.name, f.metadata["section"], f.metadata["key"] or f.name, default,
                        default if job is _SAME else job, hints[f.name], f.metadata["safe_to_change"]))
    return out


#: options that may differ between a checkpoint and the run resuming it (with force_resume): they
#: change how long the fit runs or what it reports, not the trajectory it follows (``safe=True``).
SAFE_TO_CHANGE = frozenset(f.name for f in dataclasses.fields(FitOptions) if f.metadata["safe_to_change"])
#: options a resume may change without ``force_resume`` (``free=True``): they change how fast the
#: fit runs (compilation, threads, read-ahead: its numbers at most by rounding) or what it shows,
#: or act on a fresh start only (``newton_start``). A checkpoint written under an older default
#: (``compile: false`` before ``auto``) resumes under the new one without being asked.
FREE_TO_CHANGE = frozenset(f.name for f in dataclasses.fields(FitOptions) if f.metadata["free_to_change"])

STAN_ADVI = dict(warm_start="none", optimizer="stan", lr="auto", convergence="stan", stl=False, averaging=False,
                 antithetic=False, control_variate=False, init_scale=1.0)


def _check(o: FitOptions) -> None:
    def bad(key, value, allowed):
        raise OptionsError(f"option {key}={value!r} is not allowed: {allowed}", key=key, value=value, allowed=allowed)

    def positive_int(key):
        v = getattr(o, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(key, v, "a positive integer")

    def non_negative_int(key, allowed="a non-negative integer"):
        v = getattr(o, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            bad(key, v, allowed)

    def one_of(key, choices, allowed):
        # by identity for true/false: 1 == True, and a 1 or 0 would pass as a flag it does not mean
        v = getattr(o, key)
        if not any(v is c if isinstance(c, bool) else (not isinstance(v, bool) and v == c) for c in choices):
            bad(key, v, allowed)

    def positive_float(key):
        v = getattr(o, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            bad(key, v, "a positive number")

    if o.family not in FAMILIES and o.family != AUTO:
        bad("family", o.family, f"one of {AUTO}, {', '.join(FAMILIES)}")
    for key in ("shuffle_units", "prefetch", "rank", "max_steps", "num_particles", "window", "eval_elbo", "elbo_samples", "eval_rows",
                "adapt_iter", "warm_start_rows", "warm_start_draws", "nonfinite_patience", "log_every",
                "heldout_rows", "heldout_every", "heldout_draws"):
        positive_int(key)
    non_negative_int("khat_rows", "a non-negative integer (0 turns the end-of-fit k-hat off)")
    if o.batch_size is not None:
        positive_int("batch_size")
    if o.heldout is not None and not isinstance(o.heldout, str):
        bad("heldout", o.heldout, "a Parquet file, folder or glob of rows kept out of the fit")
    if o.threads is not None:
        positive_int("threads")
    for key in ("tol_param", "tol_rel_obj", "init_scale"):
        positive_float(key)
    non_negative_int("seed")
    if isinstance(o.lr, str):
        if o.lr != "auto":
            bad("lr", o.lr, "a positive number, or 'auto' with optimizer='stan'")
        if o.optimizer.lower() != "stan":
            bad("lr", o.lr, "'auto' (Stan's eta search) needs optimizer='stan'; give a number for other optimizers")
    else:
        positive_float("lr")
    if o.convergence not in ("posterior", "stan"):
        bad("convergence", o.convergence, "'posterior' or 'stan'")
    if not 0 < o.lr_decay <= 1:
        bad("lr_decay", o.lr_decay, "a number in (0, 1]")
    non_negative_int("max_decays")
    for key in ("antithetic", "control_variate", "averaging", "newton_start", "force_resume", "tracking", "system_metrics"):
        one_of(key, (True, False), "true or false")
    for key in ("compile", "stl"):
        one_of(key, (True, False, "auto"), "true, false or 'auto'")
    non_negative_int("compile_after", "a non-negative integer (a step)")
    if o.warm_start not in ("laplace", "none"):
        bad("warm_start", o.warm_start, "'laplace' or 'none'")
    if o.dtype not in ("float32", "float64"):
        bad("dtype", o.dtype, "'float32' or 'float64'")
    if not (o.device in ("cpu", "cuda", "auto") or str(o.device).startswith("cuda:")):
        bad("device", o.device, "'cpu', 'cuda', 'cuda:N' or 'auto'")
    if o.nan_policy not in ("error", "drop"):
        bad("nan_policy", o.nan_policy, "'error' or 'drop'")
    non_negative_int("max_nonfinite_restores")
    non_negative_int("in_memory_rows")
    if o.row_filter is not None and not (isinstance(o.row_filter, (list, tuple)) and all(
            isinstance(f, (list, tuple)) and len(f) == 3 for f in o.row_filter)):
        bad("row_filter", o.row_filter, "a list of [column, op, value] triples")
    if isinstance(o.tracking_wait, bool) or not isinstance(o.tracking_wait, (int, float)) or o.tracking_wait < 0:
        bad("tracking_wait", o.tracking_wait, "a non-negative number of seconds")
    if o.missing_run not in ("new", "error"):
        bad("missing_run", o.missing_run, "'new' (continue in a new run) or 'error'")
    one_of("resume", (True, False, "auto"), "true, false or 'auto'")
    for key in ("checkpoint_every", "keep_checkpoints"):
        positive_int(key)
    if o.resume is not False and not o.checkpoint_dir:
        bad("resume", o.resume, "resume needs checkpoint_dir")
    if isinstance(o.checkpoint_dir, str):
        from svi.checkpoint import location_problem

        if problem := location_problem(o.checkpoint_dir):
            bad("checkpoint_dir", o.checkpoint_dir, problem)
    one_of("progress", (True, False, "auto"), "true, false or 'auto'")
    if not isinstance(o.optimizer_options, dict):
        bad("optimizer_options", o.optimizer_options, "a mapping of keyword arguments")
