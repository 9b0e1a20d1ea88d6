"""Full-data statistics of Parquet columns in one Dask pass (cached beside the data fingerprint).

    python pipelines/data_stats.py data/logistic --columns '{"x": "x*", "y": "y"}' [--integer g]
"""

import argparse
import json

from svi.data.jobs import data_stats
from svi.data.parquet import ParquetSource


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="Parquet path, glob or folder")
    ap.add_argument("--columns", required=True, help='JSON mapping of keys to columns, e.g. {"x": "x*"}')
    ap.add_argument("--integer", nargs="*", default=[], help="keys holding integer ids (counts per id are reported)")
    ap.add_argument("--scheduler", default=None, help="Dask distributed scheduler address")
    args = ap.parse_args(argv)
    source = ParquetSource(args.data, json.loads(args.columns), integer_keys=args.integer, scheduler=args.scheduler)
    try:
        print(json.dumps(data_stats(source), indent=1))
    finally:
        source.close()


if __name__ == "__main__":
    main()
