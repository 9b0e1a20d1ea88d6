"""Did it work? The Pareto-smoothed importance sampling diagnostic of Yao, Vehtari, Simpson,
Gelman, "Yes, but did it work?: Evaluating variational inference" (ICML 2018).

For S draws z_s ~ q, the importance ratios r_s = p(z_s, x) / q(z_s) use the log joint over
the FULL data set, computed in one streaming pass over the data with all draws at once
(vectorised over draws; row chunks as the data source yields them; split over ranks and
summed when several processes run it). ArviZ fits the generalised Pareto tail (``psislw``);
its shape k-hat says how far q is from the posterior: below 0.5 the draws can be trusted,
up to 0.7 importance resampling repairs them, above 0.7 the fit should not be trusted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from svi import progress as bars
from svi.posterior import Posterior, load_posterior

__all__ = ["Diagnosis", "full_log_joint", "psis", "psis_on_rows", "diagnose"]


@dataclass
class Diagnosis:
    """The PSIS result.

    Attributes:
        khat: Pareto shape of the importance-ratio tail.
        log_weights: (S,) Pareto-smoothed, normalised log weights.
        draws: (S, K) the unconstrained draws they weight.
        ess: effective sample size of the weights, 1 / sum w^2.
        posterior: the posterior diagnosed.
    """

    khat: float
    log_weights: torch.Tensor
    draws: torch.Tensor
    ess: float
    posterior: Posterior

    @property
    def verdict(self) -> str:
        if self.khat < 0.5:
            return "good: q is close to the posterior; its draws can be used as they are"
        if self.khat < 0.7:
            return "fair: use the importance-resampled draws (Diagnosis.resample)"
        return "poor: q is far from the posterior; do not trust its draws (try fullrank, more steps, or MCMC)"

    def resample(self, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """n constrained draws resampled by the PSIS weights (sampling importance resampling)."""
        if self.khat >= 0.7:
            warnings.warn(f"k-hat = {self.khat:.2f} >= 0.7: importance resampling cannot repair this q",
                          RuntimeWarning, stacklevel=2)
        g = torch.Generator().manual_seed(seed)
        idx = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=g)
        theta, _ = self.posterior.space.constrain(self.draws[idx])
        return theta

    def report(self) -> str:
        return f"PSIS k-hat = {self.khat:.3f} ({self.verdict}); ESS of the weights {self.ess:.0f} of {len(self.draws)}"


@torch.no_grad()
def full_log_joint(post: Posterior, z: torch.Tensor, chunks, world=None) -> torch.Tensor:
    """log p(theta(z), x) + log|det J(z)| over the whole data set for draws z (S, K).

    Args:
        chunks: an iterable of row chunks covering the data exactly once (this rank's share
            under several processes).
        world: :class:`svi.distributed.World`; the likelihood sums are added over ranks.
    """
    theta, log_det = post.space.constrain(z)
    total = torch.zeros(z.shape[0], dtype=torch.float64)
    for chunk in chunks:
        total += _log_likelihood_sums(post.model, theta, chunk, z.dtype)
    from svi import distributed

    total = distributed.all_sum(total, world)
    return total + post.model.log_prior(theta).double() + log_det.double()


#: elements of one (draws x rows) likelihood block: 4M float64 (32 MB) whatever the draws and rows,
#: where a 65,536-row chunk at 1,000 draws took 0.5 GB a tensor and doubled a fit's peak memory
_BLOCK = 1 << 22


def _log_likelihood_sums(model, theta, rows, dtype) -> torch.Tensor:
    """sum over rows of log p(x_i | theta_s), (S,), in row blocks of bounded memory.

    A model's intermediate tensors can be wider than (draws x rows): a K-component mixture's are
    (draws, rows, K), 1 GB a tensor at 1,000 draws, 4,000 rows and K = 30. The block shrinks with
    the square root of the parameters per draw, a width that grows with K (and with D for a
    regression, whose intermediates are (draws, rows) at most) without assuming a model's form."""
    S = next(iter(theta.values())).shape[0]
    n = next(iter(rows.values())).shape[0]
    width = math.isqrt(max(1, sum(v[0].numel() for v in theta.values())))
    step = max(1, _BLOCK // (max(S, 1) * width))
    total = torch.zeros(S, dtype=torch.float64)
    for start in range(0, n, step):
        part = {k: (v[start:start + step].to(dtype) if torch.is_floating_point(v) else v[start:start + step])
                for k, v in rows.items()}
        total += model.log_likelihood(theta, part).double().sum(-1)
    return total


def psis(post: Posterior, chunks, num_draws: int = 1000, seed: int = 0, world=None, progress: bool | str = False,
         rows: int | None = None) -> Diagnosis:
    """PSIS k-hat of ``post`` against the full data the chunks cover.

    Args:
        progress: show a bar of the rows done (``"auto"``: when stderr is a terminal; rank 0 only).
        rows: the rows the chunks hold, for the bar's total.
    """
    import arviz as az

    z = post.sample_unconstrained(num_draws, seed=seed).to(torch.float64)
    post64 = _float64(post)
    with torch.no_grad():
        log_q = post64.family.log_prob(z)
    rank = world.rank if world is not None else 0
    log_p = full_log_joint(post64, z, bars.counted(chunks, progress, rank, "k-hat", rows), world)
    log_ratio = (log_p - log_q).numpy()
    if not np.all(np.isfinite(log_ratio)):
        bad = int((~np.isfinite(log_ratio)).sum())
        log_ratio = np.where(np.isfinite(log_ratio), log_ratio, -np.inf)
        warnings.warn(f"{bad} of {num_draws} draws have a non-finite log density ratio", RuntimeWarning, stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns for k-hat > 0.7 itself; we report it below
        smoothed, khat = az.psislw(log_ratio.copy())
    khat = float(khat)
    lw = torch.from_numpy(np.asarray(smoothed, dtype=np.float64))
    ess = float(1.0 / torch.exp(2 * lw).sum())
    if khat >= 0.7:
        warnings.warn(f"PSIS k-hat = {khat:.2f} >= 0.7: the variational posterior is not close to the posterior",
                      RuntimeWarning, stacklevel=2)
    return Diagnosis(khat, lw, z, ess, post)


def psis_on_rows(post: Posterior, source, rows: int, num_draws: int = 1000, seed: int = 0,
                 progress: bool | str = False) -> Diagnosis:
    """PSIS k-hat at the end of a fit, in seconds rather than a pass per draw over all the data.

    A data set of at most ``rows`` rows is diagnosed exactly. A larger one uses a uniform sample
    of ``rows`` rows with the difference estimator of Quiroz, Kohn, Villani, Tran ("Speeding up
    MCMC by efficient data subsampling", JASA 2019): the full-data log-likelihood at q's mean m
    and its gradient there (one pass, one point) plus the sample's scaled remainder,

        log p(x | z) ~ L(m) + (z - m)^T (G - (N/n) G_n) + (N/n) (l_n(z) - l_n(m)),

    whose subsampling error is of second order in z - m, where plain N/n scaling would shift the
    log density by several posterior sds and inflate k-hat.

    Args:
        post: the fitted posterior (with its model).
        source: the fit's data source (``num_rows``, ``sample``, ``chunks``).
        rows: the row budget.
        progress: show a bar of the full-data pass, as in :func:`psis`.
    """
    import arviz as az

    from svi.elbo import anchor_statistics

    model = post.require_model("PSIS k-hat")
    if source.num_rows <= rows:
        return psis(post, source.chunks(), num_draws, seed, progress=progress, rows=source.num_rows)
    post64 = _float64(post)
    space = post64.space
    m = post64.family.mean.detach().to(torch.float64)
    full = anchor_statistics(model, space, m, bars.counted(source.chunks(), progress, 0, "k-hat", source.num_rows))
    sample = source.sample(rows, seed + 29)
    n = next(iter(sample.values())).shape[0]
    part = anchor_statistics(model, space, m, [sample])
    scale = source.num_rows / n
    z = post.sample_unconstrained(num_draws, seed=seed).to(torch.float64)  # the draws psis() takes
    with torch.no_grad():
        log_q = post64.family.log_prob(z)
        theta, log_det = space.constrain(z)
        ll_n = _log_likelihood_sums(model, theta, sample, torch.float64)
        ll = full.value + (z - m) @ (full.grad - scale * part.grad) + scale * (ll_n - part.value)
        log_p = model.log_prior(theta).double() + log_det.double() + ll
    log_ratio = (log_p - log_q).numpy()
    log_ratio = np.where(np.isfinite(log_ratio), log_ratio, -np.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns for k-hat > 0.7 itself; the caller reports it
        smoothed, khat = az.psislw(log_ratio.copy())
    lw = torch.from_numpy(np.asarray(smoothed, dtype=np.float64))
    return Diagnosis(float(khat), lw, z, float(1.0 / torch.exp(2 * lw).sum()), post)


def _float64(post: Posterior) -> Posterior:
    import copy

    if post.family.frame_loc.dtype == torch.float64:
        return post
    return Posterior(post.model, post.space, copy.deepcopy(post.family).double(), post.info, post.model_spec)


def diagnose(uri_or_post: Any, data: Any = None, columns: Mapping | None = None, num_draws: int = 1000,
             seed: int = 0, tracking_uri: str | None = None, log_to_run: bool = True, model: Any = None,
             trust: Sequence[str] = (), progress: bool | str = "auto") -> Diagnosis:
    """Load a posterior (or take one), stream its full data set, and compute PSIS k-hat.

    The data default to what the posterior was fitted to (its ``info.data_path`` and
    columns); the result is logged to the fit's MLflow run when it has one. The likelihood is
    the model's: ``model`` when given, else the posterior's own when it has one, else rebuilt
    from the file only for ``svi.models`` and modules in ``trust`` (see :mod:`svi.imports`).
    ``progress`` shows a bar of the rows streamed (``"auto"``: when stderr is a terminal).

    The diagnosed posterior (``result.posterior``, the one passed in) gets a new record,
    ``post.info.replace(khat=..., khat_rows=...)``; the record it had is not changed.
    """
    from svi.data.source import open_source
    from svi.options import FitOptions

    post = uri_or_post if isinstance(uri_or_post, Posterior) else load_posterior(
        uri_or_post, model=model, tracking_uri=tracking_uri, trust=trust)
    if model is not None and post.model is None:
        post.model = model
    the_model = post.require_model("PSIS k-hat on data")
    data = data if data is not None else post.info.data_path
    if data is None:
        raise ValueError("this posterior does not record its data set; pass data= (a Parquet path, dict or DataFrame)")
    columns = columns if columns is not None else post.info.columns
    dtype = torch.float64
    source = open_source(data, columns, the_model.batch_keys, the_model.integer_keys, dtype,
                         FitOptions(in_memory_rows=0) if isinstance(data, (str,)) else FitOptions(),
                         validate=the_model.validate)
    try:
        result = psis(post, source.chunks(), num_draws, seed, progress=progress, rows=source.num_rows)
    finally:
        if hasattr(source, "close"):
            source.close()
    # a new record, not an edit of the old one: records captured before (saved, logged) stay as they were
    post.info = post.info.replace(khat=result.khat, khat_rows=source.num_rows)
    run_id = post.info.run_id
    if log_to_run and run_id:
        _log_khat(run_id, result, tracking_uri or (post.info.options or {}).get("tracking_uri"))
    return result


def _log_khat(run_id: str, result: Diagnosis, tracking_uri: str | None) -> None:
    import os

    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
        client.log_metric(run_id, "psis_khat", result.khat)
        client.log_metric(run_id, "psis_ess", result.ess)
    except Exception as e:  # the diagnostic stands on its own; logging it is a convenience
        warnings.warn(f"could not log k-hat to MLflow run {run_id}: {e}", RuntimeWarning, stacklevel=2)
