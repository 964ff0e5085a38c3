"""One process of ``bench.averaging --system hivemind``; runs in bench/.venv-hivemind (no ``peer`` import).

Rank 0 starts the DHT and reports its multiaddrs in its ready line; the parent starts the other
ranks with ``--initial-peers``. Each round copies this rank's delta into the averaged tensor and
calls ``DecentralizedAverager.step()`` (matchmaking + butterfly all-reduce, as in hivemind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from bench.common import pin_threads


def main(argv=None) -> int:
    pin_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--params", type=int, required=True)
    p.add_argument("--codec", default="int8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--initial-peers", default="[]")
    p.add_argument("--iface", default=None)
    p.add_argument("--run-id", default="bench")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import hivemind
    import torch
    from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

    from bench._proto import serve
    from bench.deltas import delta, exact_mean, read_tx_bytes

    compression = {"int8": Uniform8BitQuantization(), "fp32": NoCompression(), "fp16": Float16Compression()}
    if a.codec not in compression:
        raise SystemExit(f"hivemind side supports codecs {sorted(compression)}, not {a.codec}")
    state: dict = {}

    async def setup() -> dict:
        dht = hivemind.DHT(start=True, initial_peers=json.loads(a.initial_peers),
                           host_maddrs=[f"/ip4/{a.host}/tcp/0"])
        state["dht"] = dht
        state["avg"] = hivemind.averaging.DecentralizedAverager(
            averaged_tensors=[torch.zeros(a.params)], dht=dht, start=True, prefix=a.run_id.replace(".", "_"),
            target_group_size=a.peers, min_group_size=a.peers, min_matchmaking_time=2.0, request_timeout=1.0,
            compression=compression[a.codec])
        return {"maddrs": [str(m) for m in dht.get_visible_maddrs()]}

    async def do_round(r: int) -> dict:
        avg = state["avg"]
        # Built on ``prepare``, before the parent's barrier: every rank starts together.
        mine, exact = state.pop(("inputs", r), None) or inputs(r)
        with avg.get_tensors() as tensors:
            tensors[0].copy_(mine)
        tx0 = read_tx_bytes(a.iface)
        t0 = time.perf_counter()
        result = avg.step(timeout=120, weight=1.0)
        seconds = time.perf_counter() - t0
        tx1 = read_tx_bytes(a.iface)
        with avg.get_tensors() as tensors:
            err = float((tensors[0].double() - exact).abs().max())
        out = {"seconds": seconds, "bytes_sent": None, "wire_tx_bytes": None if tx0 is None else tx1 - tx0,
               "ok": result is not None, "max_abs_err": err if result is not None else None,
               "group_size": len(result) if result else 0}
        del mine, exact
        return out

    async def prepare(r: int) -> None:
        state[("inputs", r)] = inputs(r)

    def inputs(r: int) -> tuple:
        return delta(a.seed, a.rank, r, a.params), exact_mean(a.seed, a.peers, r, a.params)

    async def teardown() -> None:
        if "avg" in state:
            state["avg"].shutdown()
        if "dht" in state:
            state["dht"].shutdown()

    return asyncio.run(serve(setup, do_round, teardown, prepare=prepare))


if __name__ == "__main__":
    sys.exit(main())
