#!/usr/bin/env bash
# The project's main job: Table 1 (1-D translation symmetry) at its quick preset, in the project's
# virtual environment (created on first use). Extra arguments go to the driver.
# runs/synthetic-quick is this script's own demo directory: each run replaces it (the run repeats
# bit for bit). Given --out or --resume, the driver's rules apply unchanged: a non-empty --out is
# refused unless --resume or --overwrite.
source "$(dirname "$0")/venv.sh"
replace=(--overwrite)
for argument in "$@"; do
    case "$argument" in --out | --out=* | --resume | --overwrite) replace=() ;; esac
done
demo=runs/synthetic-quick  # venv.sh works from the repository root
if [ ${#replace[@]} -gt 0 ] && [ -e "$demo/metrics.jsonl" ]; then
    # its demo run of the layout before job folders, which --overwrite does not read: replaced
    echo "removing $demo, a demo run of an earlier layout" >&2
    rm -rf "$demo"
fi
"$PY" -m experiments.synthetic --preset quick --out "$demo" "${replace[@]}" "$@"
