#!/usr/bin/env bash
# The test command: set up (idempotent), start the localhost SLURM cluster, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash slurm/local/start.sh
# shellcheck disable=SC1091
source "${CMSCALE_SLURM_DIR:-/tmp/cmscale-slurm}/env.sh"

export CMSCALE_REQUIRE_SLURM=1
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that counts as a failure" >&2
    exit 1
fi
exit "$status"
