"""Write a synthetic Parquet data set with known true parameters for a built-in model.

    python pipelines/make_synthetic.py data/logistic --model logistic --rows 10000000 \
        --features 50 --files 16 --row-group-size 65536

The folder gets part-*.parquet; data/logistic.truth.json beside it holds the true parameters and
the columns mapping (the folder holds data only, so any Parquet reader can read it whole).
The ADVI paper's mixture experiment (250,000 histogram rows, 30 clusters), with held-out rows:

    python pipelines/make_synthetic.py data/histograms --model histogram_mixture --rows 250000 \
        --features 200 --components 30 --files 4 --heldout 10000
"""

import argparse
import time

from svi.data.jobs import write_synthetic
from svi.synthetic import MODELS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output folder")
    ap.add_argument("--model", default="logistic", choices=MODELS)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=10)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--row-group-size", type=int, default=65_536)
    ap.add_argument("--groups", type=int, default=20, help="groups of the hierarchical models")
    ap.add_argument("--components", type=int, default=3, help="components of the mixture")
    ap.add_argument("--varying-slopes", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=int, default=0, help="rows written to <out>-heldout from the same truth")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    meta = write_synthetic(args.out, args.model, args.rows, args.features, args.files, args.row_group_size, args.seed,
                           args.groups, args.components, args.varying_slopes, heldout=args.heldout)
    print(f"wrote {meta['rows']} rows in {args.files} files to {args.out} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
