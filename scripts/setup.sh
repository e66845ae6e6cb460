#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages, a virtual environment, and cmscale itself.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${CMSCALE_VENV:-.venv}

need_apt=()
# Chromium renders the HTML report headless for the report screenshot test.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# Every version from constraints.txt (torch and torchvision as the pinned pair from the local wheel
# cache: an unpinned torch would pull gigabytes); pyproject.toml itself only states ranges.
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[train,dev,latent]"
echo "setup: done ($("$VENV/bin/cmscale" --version))"
