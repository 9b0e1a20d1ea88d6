"""Screenshots of what an svi fit looks like in the MLflow UI, taken in a real browser.

Starts an ``mlflow server`` on 127.0.0.1 (a fresh store in a temporary folder), logs two fits to
it (one that converges and is registered as a model, one stopped early that must not look like a
success), and photographs the run list, the run page, the ELBO charts and the registered model
with headless Chromium driven by Playwright. The PNGs go to ``docs/`` for the README.

    .venv/bin/python -m pip install playwright     # the driver; the browser is Debian's:
    apt-get install chromium                        # /usr/bin/chromium
    .venv/bin/python scripts/mlflow_screenshots.py [--out docs] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/mlflow_server.py: the same server the tests start

from tests.mlflow_server import MlflowServer  # noqa: E402

import svi  # noqa: E402

# Chromium's own network chatter fails on a closed network; these flags keep it quiet and local
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _fits(uri: str) -> tuple[str, str, str]:
    """(experiment id, converged run id, unconverged run id) of two small logistic fits."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50_000, 5))
    y = (rng.random(50_000) < 1 / (1 + np.exp(-(x @ np.array([1.0, -0.5, 0.3, 0.0, 2.0]) - 0.2)))).astype(float)
    features = [f"x{j}" for j in range(5)]
    data = pd.DataFrame({**{f: x[:, j] for j, f in enumerate(features)}, "y": y})
    columns = {"x": features, "y": "y"}  # named columns: the registered model's input signature
    good = svi.fit(svi.models.LogisticRegression(5), data, columns=columns, batch_size=1024, tracking=True,
                   tracking_uri=uri, experiment="svi-demo", run_name="logistic-converged",
                   register_model="svi-demo-logistic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unconverged fit warns; that is the point of it
        bad = svi.fit(svi.models.LogisticRegression(5), data, columns=columns, batch_size=64, tracking=True,
                      tracking_uri=uri, experiment="svi-demo", run_name="logistic-stopped-early", max_decays=0,
                      warm_start="none", log_every=20)
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name("svi-demo").experiment_id
    return exp, good.info.run_id, bad.info.run_id


def _shoot(page, url: str, path: Path, wait_for: str | None = None) -> None:
    page.goto(url, wait_until="load")  # not "networkidle": the UI polls the server for ever
    if wait_for:
        try:
            page.get_by_text(wait_for, exact=False).first.wait_for(timeout=30_000)
        except Exception:  # the picture still shows what the page did render
            print(f"warning: {url} did not show {wait_for!r} within 30 s", file=sys.stderr)
    time.sleep(3)  # charts animate in
    page.screenshot(path=str(path), full_page=False)
    print(f"wrote {path}")


def _classic_view(page, base: str) -> None:
    """MLflow 3 opens on its GenAI pages with an assistant panel: switch to "Model training" (the
    runs table) and close the panel, so the pictures show what an svi user looks at."""
    page.goto(base + "/experiments", wait_until="load")
    for name in ("Model training", "Got it"):
        try:
            page.get_by_text(name, exact=True).first.click(timeout=10_000)
        except Exception:  # not shown in this MLflow version: nothing to switch
            pass
    try:
        page.locator("button[aria-label*='lose']").last.click(timeout=5_000)
    except Exception:
        pass


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = MlflowServer(Path(tmp) / "server").start()
        try:
            exp, good, bad = _fits(server.uri)
            base = server.uri + "/#"
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                _classic_view(page, base)
                _shoot(page, f"{base}/experiments/{exp}/runs", out / "mlflow-runs.png", "logistic-stopped-early")
                _shoot(page, f"{base}/experiments/{exp}/runs/{bad}", out / "mlflow-run-unconverged.png",
                       "NOT converged")
                _shoot(page, f"{base}/experiments/{exp}/runs/{good}", out / "mlflow-run-converged.png", "converged")
                _shoot(page, f"{base}/experiments/{exp}/runs/{good}/model-metrics", out / "mlflow-elbo.png",
                       "elbo_window_mean")
                _shoot(page, f"{base}/models/svi-demo-logistic/versions/1", out / "mlflow-registered-model.png",
                       "svi-demo-logistic")
                _shoot(page, f"{base}/experiments/{exp}/runs/{good}/artifacts/posterior/MLmodel",
                       out / "mlflow-model-signature.png", "x0")
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
