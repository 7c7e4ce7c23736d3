#!/usr/bin/env bash
# Build the API reference (pdoc) into docs/api/ and check its references; see scripts/docs.py.
source "$(dirname "$0")/venv.sh"
"$PY" scripts/docs.py "$@"
