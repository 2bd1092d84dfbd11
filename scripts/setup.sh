# Sourced by run.sh and test.sh: create the project environment once, reuse it afterwards.
# Needs only Python >= 3.11 and git. Reinstalls only when pyproject.toml changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${CPAL_VENV:-$ROOT/.venv}"

find_python() {
  for cand in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  echo "error: Python >= 3.11 not found (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "[setup] creating virtual environment $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.cpal-installed"
WANT="$(cat pyproject.toml | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing the project and its dependencies into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e ".[dev]"
  echo "$WANT" > "$STAMP"
else
  echo "[setup] environment $VENV is up to date"
fi

export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
