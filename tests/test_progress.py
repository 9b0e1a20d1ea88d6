"""A bar per phase of a fit (warm start, full-data pass, fit, k-hat) and of ``svi diagnose``, on
stderr, only when progress is shown; plain log lines otherwise."""

import logging
import re
import warnings

import numpy as np
import pytest

import svi
from svi import progress
from svi.diagnostics import diagnose

PHASES = ("warm start", "full-data pass", "fit", "k-hat")


def _data(n=3000):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    return {"x": x, "y": (rng.random(n) < 1 / (1 + np.exp(-(x @ [1.0, -1.0, 0.5])))).astype(float)}


def _fit(show, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a short fit: "NOT converged" is expected
        # batch_size below N: the warm start's anchor needs the full-data pass
        return svi.fit(svi.models.LogisticRegression(3), _data(), family="meanfield", batch_size=256,
                       max_steps=300, progress=show, **kw)


def _bars(err: str) -> dict[str, str]:
    """{phase: its bar's last state} of what tqdm wrote ("\r"-separated redraws of each bar)."""
    states = [s.strip() for s in re.split(r"[\r\n]", err) if s.strip()]
    return {phase: [s for s in states if s.startswith(phase + ":")][-1]
            for phase in PHASES if any(s.startswith(phase + ":") for s in states)}


def test_a_shown_fit_has_one_bar_per_phase_and_no_plain_lines(capsys, caplog):
    caplog.set_level(logging.INFO, logger="svi")
    post = _fit(True)
    bars = _bars(capsys.readouterr().err)
    assert set(bars) == set(PHASES), bars
    iterations = int(re.search(r"L-BFGS (\d+) iterations", post.info.warm_start).group(1))
    assert re.search(rf"\b{iterations}it\b", bars["warm start"])  # one tick per L-BFGS iteration
    assert "log density" in bars["warm start"]
    assert "3.00k/3.00k" in bars["full-data pass"] and "3.00k/3.00k" in bars["k-hat"]  # rows done of the total
    assert re.search(rf"\b{post.info.steps}step\b", bars["fit"]) and "lr " in bars["fit"]
    # the bars replace the plain lines that announce a phase
    assert not any(m.startswith(("warm start: L-BFGS towards", "full-data pass for")) for m in caplog.messages)


def test_no_bars_when_progress_is_off_or_auto_without_a_terminal(capsys, caplog):
    caplog.set_level(logging.INFO, logger="svi")
    _fit(False)
    err = capsys.readouterr().err
    assert not _bars(err) and "step/s" not in err and "it/s" not in err
    assert any(m.startswith("warm start: L-BFGS towards") for m in caplog.messages)  # the plain lines instead
    assert any(m.startswith("full-data pass for the control variate") for m in caplog.messages)
    assert not progress.shown("auto")  # pytest's captured stderr is not a terminal
    assert not progress.shown(True, rank=1)  # only rank 0 draws


def test_diagnose_shows_its_pass_over_the_rows(capsys):
    post = _fit(False, khat_rows=0)
    capsys.readouterr()
    result = diagnose(post, data=_data(), num_draws=200, progress=True, log_to_run=False)
    bars = _bars(capsys.readouterr().err)
    assert list(bars) == ["k-hat"] and "3.00k/3.00k" in bars["k-hat"]
    assert np.isfinite(result.khat)
    diagnose(post, data=_data(), num_draws=200, progress=False, log_to_run=False)
    assert not _bars(capsys.readouterr().err)


@pytest.mark.parametrize("setting", [True, "auto", False])
def test_counted_passes_every_chunk_through(setting, capsys):
    chunks = [{"x": np.zeros(5)}, {"x": np.zeros(7)}]
    assert list(progress.counted(iter(chunks), setting, desc="pass", total=12)) == chunks
    err = capsys.readouterr().err
    assert ("12.0/12.0" in err) == (setting is True)  # rows done of the total, with unit_scale
