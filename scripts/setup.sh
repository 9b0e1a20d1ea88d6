#!/usr/bin/env bash
# Create .venv and install svi into it: torch first (pinned, so pip never swaps in another build),
# then the project with the extras named on the command line (dev, bench).
#   bash scripts/setup.sh            # to run jobs
#   bash scripts/setup.sh dev        # to run the tests
#   bash scripts/setup.sh dev,bench  # to run the benchmarks too
# For a GPU build of torch, set SVI_TORCH to the install command first, e.g.
#   SVI_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet ${SVI_TORCH:-torch==2.13.0}
extras="${1:-}"
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
.venv/bin/python -c "import svi, torch; print(f'svi {svi.__version__} with torch {torch.__version__} in .venv')"
