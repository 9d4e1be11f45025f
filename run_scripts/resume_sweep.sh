#!/usr/bin/env bash
# Resume every interrupted run under a folder from its own saved config; finished runs are skipped.
#   bash run_scripts/resume_sweep.sh runs
source "$(dirname "$0")/common.sh"
ROOT=${1:-runs}
for config in "$ROOT"/*/config.json; do
    [ -e "$config" ] || { echo "no run dirs under $ROOT"; exit 2; }
    dir=$(dirname "$config")
    mapfile -t flags < <("$PYTHON" -m utils.replay_flags "$config")
    run_one "$dir" "${flags[@]}"
done
