"""Steps to convergence from a warm start found on a sample: mean-field against fullrank, with and
without the full-data Newton start (``newton_start``), on a logistic regression with 1,000,000 rows
and 20 equicorrelated (0.64), uncentred predictors, in memory. Each fit runs in its own process.

The warm start's L-BFGS sees 200,000 of the rows (``warm_start_rows``), so its mode lies about
sqrt(N / n - 1) = 2 posterior sds from the full data's; a mean-field q, whose frame is diagonal,
crosses that distance slowly where the posterior is correlated.

    python scripts/bench/newton_start.py [--rows 1000000]

About 5-10 minutes on 2 cores (the four fits, each with its warm start and full-data passes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(family: str, newton: bool, rows: int) -> dict:
    import warnings

    import numpy as np

    import svi
    from svi.models import LogisticRegression

    rng = np.random.default_rng(1)
    d = 20
    z = rng.normal(size=(rows, d)) * 0.6 + rng.normal(size=(rows, 1)) * 0.8
    x = z * rng.uniform(0.5, 2.0, d) + rng.uniform(1, 5, d)
    eta = x @ (rng.normal(size=d) * 0.2)
    y = (rng.random(rows) < 1 / (1 + np.exp(-(eta - eta.mean())))).astype(np.float32)
    warnings.simplefilter("ignore", RuntimeWarning)
    started = time.perf_counter()
    post = svi.fit(LogisticRegression(d), {"x": x.astype(np.float32), "y": y}, family=family, progress=False,
                   khat_rows=0, newton_start=newton)
    return {"family": family, "newton_start": newton, "steps": post.info.steps,
            "optimisation_s": post.info.seconds, "wall_s": time.perf_counter() - started,
            "mean": post.family.mean.tolist()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.rows)))
        return
    print("| family | newton_start | steps | optimisation (s) | wall (s) |")
    print("|---|---|---:|---:|---:|")
    for family in ("meanfield", "fullrank"):
        for newton in (False, True):
            out = subprocess.run([sys.executable, __file__, "--child", family, "1" if newton else "0", "--rows",
                                  str(args.rows)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {family} | {newton} | {r['steps']} | {r['optimisation_s']:.1f} | {r['wall_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
