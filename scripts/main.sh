#!/usr/bin/env bash
# The project's main job, in the project's virtual environment (created on first use).
source "$(dirname "$0")/venv.sh"
"$PY" -m experiments.demo "$@"
