#!/usr/bin/env bash
# GPU checks of issue 14. NOT YET RUN ON A GPU: written on a CPU-only machine, where only
# `python -m bench._gpu_check --device cpu` (the same code on the host) was run.
#
#   bash bench/gpu_check.sh            # from the repository root, on a machine with CUDA
#   DEVICE=cpu bash bench/gpu_check.sh # the same steps on the host (how the script was tried)
#
# 1. bench/_gpu_check.py: codec bytes on the GPU == host bytes, decode onto the GPU, int8 bytes
#    over PCIe, the outer step and 3 mirrored rounds on the GPU == the host's bits, and (2+ GPUs)
#    two NCCL local ranks.
# 2. A peer training on the GPU (its delta encoded there, the rounds applied there by its
#    mirror) and a peer on the CPU run 3 rounds of digits together and must log the same global
#    hash after every round; the GPU peer's mirror must not have turned itself off.
# Exits non-zero on the first failure; prints ALL OK at the end.
set -euo pipefail
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
if [[ "$DEVICE" != cpu ]]; then
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
fi
"$PY" -m bench._gpu_check --device "$DEVICE"

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pa=$(free_port); pb=$(free_port)
common=(--run-id gpu-check --insecure --task digits --rounds 3 --inner-steps 20 --mdns off --metrics-port 0
        --matchmaking-timeout-s 5 --startup-grace-s 5 --threads 1)
"$PY" -m peer run "${common[@]}" --device "$DEVICE" --listen 127.0.0.1:$pa --peer 127.0.0.1:$pb \
    --state-dir "$tmp/gpu" >"$tmp/gpu.log" 2>&1 & pids+=($!)
"$PY" -m peer run "${common[@]}" --device cpu --listen 127.0.0.1:$pb --peer 127.0.0.1:$pa \
    --state-dir "$tmp/cpu" >"$tmp/cpu.log" 2>&1 & pids+=($!)
for p in "${pids[@]}"; do
    if ! timeout 180 tail --pid="$p" -f /dev/null; then echo "FAIL: a peer did not finish in 180 s"; exit 1; fi
done
for p in "${pids[@]}"; do wait "$p" || { echo "FAIL: a peer exited non-zero"; tail -20 "$tmp"/*.log; exit 1; }; done
hashes() { grep -o 'round [0-9]* done: 2 peers.*global [0-9a-f]*' "$1" | sed -E 's/round ([0-9]+) done.*global ([0-9a-f]+)/\1 \2/'; }
if [[ "$(hashes "$tmp/gpu.log")" != "$(hashes "$tmp/cpu.log")" || $(hashes "$tmp/gpu.log" | wc -l) -ne 3 ]]; then
    echo "FAIL: the GPU peer and the CPU peer differ after a round"; hashes "$tmp/gpu.log"; hashes "$tmp/cpu.log"
    tail -20 "$tmp"/*.log; exit 1
fi
if [[ "$DEVICE" != cpu ]] && grep -q "gets the host's state copied" "$tmp/gpu.log"; then
    echo "FAIL: the GPU peer's mirror turned off"; grep "host's state copied" "$tmp/gpu.log"; exit 1
fi
echo "gpu peer + cpu peer: 3 rounds of 2 peers with equal global hashes:"; hashes "$tmp/gpu.log"
echo "ALL OK"
