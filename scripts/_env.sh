#!/usr/bin/env bash
# Shared by demo.sh and test.sh: use the active virtual environment, or create ./.venv, and install
# edgeseg with every extra (host, device, dev). torch is pinned to the CPU build by constraints.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "edgeseg: creating a virtual environment in $ROOT/.venv" >&2
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
PY="$(command -v python)"
stamp=".venv-installed.$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$VIRTUAL_ENV/$stamp" ]; then
    echo "edgeseg: installing edgeseg[host,device,dev] into $VIRTUAL_ENV (torch CPU build)" >&2
    "$PY" -m pip install -q --upgrade pip >&2
    "$PY" -m pip install -q -c constraints.txt -e '.[host,device,dev]' >&2
    touch "$VIRTUAL_ENV/$stamp"
fi
