"""Convert CSV files to a Parquet folder with Dask.

    python pipelines/csv_to_parquet.py "raw/*.csv" data/converted [--scheduler tcp://host:8786]
"""

import argparse

from svi.data.jobs import csv_to_parquet


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="CSV path or glob")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--blocksize", default="64MB")
    ap.add_argument("--row-group-size", type=int, default=65_536)
    ap.add_argument("--scheduler", default=None, help="Dask distributed scheduler address")
    args = ap.parse_args(argv)
    rows = csv_to_parquet(args.src, args.out, args.blocksize, args.row_group_size, args.scheduler)
    print(f"wrote {rows} rows to {args.out}")


if __name__ == "__main__":
    main()
