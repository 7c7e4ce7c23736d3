#!/usr/bin/env bash
# Build msr's wheel (python -m build) and install it into a fresh virtual environment that
# already has a torch (the pinned CPU build, installed first, as a user's would be); then run
# README.md's library quick start there, outside the repository, so it imports the wheel's msr.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"  # the project's environment: PY, ROOT, CONSTRAINTS
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
logged() {  # run "$@" quietly; on failure show its output
    "$@" > "$WORK/step.log" 2>&1 || { cat "$WORK/step.log" >&2; return 1; }
}
# from a copy of the files git would commit: no stale build/ or egg-info can leak into the wheel
mkdir "$WORK/src"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$WORK/src"
logged "$PY" -m build --wheel --outdir "$WORK/dist" "$WORK/src"
logged "${PYTHON:-python3.11}" -m venv "$WORK/env"
logged "$WORK/env/bin/python" -m pip install -c "$CONSTRAINTS" torch
logged "$WORK/env/bin/python" -m pip install -c "$CONSTRAINTS" "$WORK"/dist/*.whl
cd "$WORK"
"$WORK/env/bin/python" - "$WORK/env" <<'PY'
import sys
from pathlib import Path

import msr

assert Path(msr.__file__).is_relative_to(sys.argv[1]), f"msr imported from {msr.__file__}"
PY
"$WORK/env/bin/python" "$ROOT/scripts/quickstart.py"
echo "[msr] wheel $(basename "$WORK"/dist/*.whl): built, installed beside torch, quick start ran"
