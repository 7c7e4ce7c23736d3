#!/usr/bin/env bash
# The project's main job: Table 1 (1-D translation symmetry) at its quick preset, in the project's
# virtual environment (created on first use). Extra arguments go to the driver.
source "$(dirname "$0")/venv.sh"
"$PY" -m experiments.synthetic --preset quick --out runs/synthetic-quick "$@"
