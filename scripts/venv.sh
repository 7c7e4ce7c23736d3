# Sourced by the other scripts: create or reuse .venv with torch==2.13.0 (CPU build here) and msr.
# Torch is installed first, pinned by scripts/constraints.txt, so that no later install can pull a
# multi-GB CUDA build. Only msr is installed; synthetic/ and experiments/ run from the repository.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.msr-installed"
CONSTRAINTS="$ROOT/scripts/constraints.txt"
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$PY" ]; then
    echo "[msr] creating $VENV" >&2
    "${PYTHON:-python3.11}" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[msr] installing torch (pinned in $CONSTRAINTS) and msr[experiments,test,docs]" >&2
    "$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" torch
    "$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" \
        -e "$ROOT[experiments,test,docs]"
    echo "$WANT" > "$STAMP"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$ROOT"
