# Shared by the sweep scripts: run one experiment unless it already finished.
# A finished run is skipped; an interrupted one is resumed (--resume is always passed,
# and the runner starts fresh when a run dir has no checkpoint yet).
# Usage: run_one <run_dir> <flags...>
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}

run_one() {
    local dir=$1; shift
    "$PYTHON" main_imp_fillback.py "$@" --save_dir "$dir" --resume
}
