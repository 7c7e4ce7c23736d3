#!/usr/bin/env bash
# Run the whole test suite (lint first) in the project's virtual environment, one thread per process.
source "$(dirname "$0")/venv.sh"
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
