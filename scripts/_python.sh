# Sourced by the launchers: the Python that has svi. $PYTHON when set, else the one that a
# `python3` on PATH would import svi from, else this checkout's .venv. Works from a pip install
# (no checkout) as well as from a development tree.
svi_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  if command -v python3 >/dev/null && python3 -c "import svi" 2>/dev/null; then command -v python3; return; fi
  local venv; venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"
  if [ -x "$venv" ]; then echo "$venv"; return; fi
  echo "no Python with svi found: set PYTHON=/path/to/python" >&2; return 1
}
