#!/usr/bin/env bash
# GPU checks of issue 14. Run on an NVIDIA H200 on 2026-11-27 (output in bench/README.md, "GPU
# check"); `DEVICE=cpu` runs the same steps on the host.
#
#   bash bench/gpu_check.sh            # from the repository root, on a machine with CUDA
#   DEVICE=cpu bash bench/gpu_check.sh # the same steps on the host
#
# 1. bench/_gpu_check.py: codec bytes on the GPU == host bytes, decode onto the GPU, int8 bytes
#    over PCIe, the outer step and 3 mirrored rounds on the GPU == the host's bits, and (2+ GPUs)
#    two NCCL local ranks.
# 2. A peer training on the GPU (its delta encoded there, the rounds applied there by its
#    mirror) and a peer on the CPU run 3 rounds of digits together and must log the same global
#    hash after every round; the GPU peer's mirror must not have turned itself off.
# 3. Two peers sharing the GPU train digits (3 rounds) and the character transformer charlm
#    (4 rounds of H=50) under bf16 autocast: equal global hashes after every round, and on each
#    peer a finite training loss that falls from the first round to the last.
# 4. The training overhead with H=50 on the GPU (bf16): `python -m bench.overhead`, two peers
#    sharing the GPU, steps/s with a round every 50 steps against the loop with no networking.
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
# Two ports below the ephemeral range (bench.averaging._free_ports: a port 0 bind hands out could
# be taken by a peer's own metrics server, port 0, before the other peer listens on it).
free_ports() { "$PY" -c 'from bench.averaging import _free_ports; print(*_free_ports(2))'; }
hashes() { grep -o 'round [0-9]* done: 2 peers.*global [0-9a-f]*' "$1" | sed -E 's/round ([0-9]+) done.*global ([0-9a-f]+)/\1 \2/'; }
losses() { grep -o 'round [0-9]* done: 2 peers, [^,]*, loss [^,]*' "$1" | sed -E 's/.*loss //' | tr '\n' ' '; }

# pair NAME TASK DEVICE_A DEVICE_B PRECISION ROUNDS INNER_STEPS: two peers train TASK together;
# fails unless both log ROUNDS rounds of 2 peers with equal global hashes and a finite loss
# that falls from the first round to the last.
pair() {
    local name=$1 task=$2 dev_a=$3 dev_b=$4 precision=$5 rounds=$6 inner=$7
    local pa pb dir="$tmp/$name" started=$SECONDS
    read -r pa pb < <(free_ports); mkdir -p "$dir"; pids=()
    local common=(--run-id "gpu-check-$name" --insecure --task "$task" --rounds "$rounds" --inner-steps "$inner"
                  --precision "$precision" --mdns off --metrics-port 0 --matchmaking-timeout-s 5
                  --startup-grace-s 5 --threads 1)
    "$PY" -m peer run "${common[@]}" --device "$dev_a" --listen 127.0.0.1:$pa --peer 127.0.0.1:$pb \
        --state-dir "$dir/a" >"$dir/a.log" 2>&1 & pids+=($!)
    "$PY" -m peer run "${common[@]}" --device "$dev_b" --listen 127.0.0.1:$pb --peer 127.0.0.1:$pa \
        --state-dir "$dir/b" >"$dir/b.log" 2>&1 & pids+=($!)
    for p in "${pids[@]}"; do
        if ! timeout 180 tail --pid="$p" -f /dev/null; then echo "FAIL $name: a peer did not finish in 180 s"; exit 1; fi
    done
    for p in "${pids[@]}"; do wait "$p" || { echo "FAIL $name: a peer exited non-zero"; tail -20 "$dir"/*.log; exit 1; }; done
    if [[ "$(hashes "$dir/a.log")" != "$(hashes "$dir/b.log")" || $(hashes "$dir/a.log" | wc -l) -ne $rounds ]]; then
        echo "FAIL $name: the peers differ after a round"; hashes "$dir/a.log"; hashes "$dir/b.log"
        tail -20 "$dir"/*.log; exit 1
    fi
    for side in a b; do
        # shellcheck disable=SC2046
        set -- $(losses "$dir/$side.log")
        if [[ $# -ne $rounds ]] || ! awk -v f="$1" -v l="${!#}" 'BEGIN { exit !(f == f + 0 && l == l + 0 && l < f) }'; then
            echo "FAIL $name: peer $side's loss is not finite and falling: $*"; tail -20 "$dir/$side.log"; exit 1
        fi
    done
    if [[ "$dev_a" != cpu ]] && grep -q "gets the host's state copied" "$dir/a.log"; then
        echo "FAIL $name: peer a's device mirror turned off"; grep "host's state copied" "$dir/a.log"; exit 1
    fi
    echo "$name: $task on $dev_a + $dev_b ($precision), $rounds rounds of 2 peers with equal global hashes" \
         "($((SECONDS - started)) s); loss by round: $(losses "$dir/a.log")| $(losses "$dir/b.log")"
}

pair mixed digits "$DEVICE" cpu fp32 3 20
pair shared-digits digits "$DEVICE" "$DEVICE" bf16 3 20
pair shared-charlm charlm "$DEVICE" "$DEVICE" bf16 4 50
"$PY" -m bench.overhead --tasks digits,charlm --H 50 --min-steps 200 --device "$DEVICE" --precision bf16 --timeout 240
echo "ALL OK"
