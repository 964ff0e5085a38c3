#!/usr/bin/env bash
# Create bench/.venv-hivemind: an isolated venv with hivemind, for `bench.averaging --system hivemind`.
# torch is installed first and pinned to the CPU wheel so that hivemind does not pull a CUDA build;
# numpy stays below 2.4 because hivemind 1.1.12's 8-bit codec breaks on NumPy 2.4.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${HIVEMIND_VENV:-$here/.venv-hivemind}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet "torch==2.13.0"
"$venv/bin/pip" install --quiet "hivemind==1.1.12" "numpy<2.4" "torch==2.13.0"
"$venv/bin/python" - <<'PY'
import hivemind, numpy, torch
from hivemind.compression import Uniform8BitQuantization, NoCompression  # noqa: F401
print(f"hivemind {hivemind.__version__}, torch {torch.__version__}, numpy {numpy.__version__}: ok")
PY
