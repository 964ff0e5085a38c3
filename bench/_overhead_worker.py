"""One process of ``bench.overhead``: a real Daemon whose inner phases the worker drives.

Commands (see bench/_proto.py): ``plain H S`` runs S inner steps in phases of H with the same
``InnerTrainer`` and no networking (each phase starts from the previous phase's local
parameters); ``sync H S`` runs S steps as H-step inner phases each followed by a real round
(``Daemon.round_once``: matchmaking, all-reduce, outer step, snapshot, checkpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time

from bench.common import phase_sums, pin_threads


def main(argv=None) -> int:
    pin_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--task", default="digits")
    p.add_argument("--codec", default="int8")
    p.add_argument("--addresses", required=True)
    p.add_argument("--run-id", default="bench-overhead")
    p.add_argument("--credentials", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from bench._proto import serve
    from bench.common import security
    from peer.config import load_config
    from peer.daemon import Daemon

    addresses = json.loads(a.addresses)
    tmp = tempfile.mkdtemp(prefix=f"bench-overhead-{a.rank}-")
    st: dict = {}

    async def setup() -> dict:
        cfg = load_config({
            "run_id": a.run_id, **security(a.credentials), "listen": addresses[a.rank], "metrics_host": "127.0.0.1",
            "metrics_port": 0, "mdns": False, "peers": [x for i, x in enumerate(addresses) if i != a.rank],
            "codec": a.codec, "task": a.task, "state_dir": tmp, "threads": 1, "eval_every_rounds": 0,
            "device": a.device, "precision": a.precision, "matchmaking_timeout_s": 30.0, "startup_grace_s": 0.1,
        }, env={})
        d = st["d"] = Daemon(cfg)
        await d.start()
        deadline = time.monotonic() + 60
        while len(d.membership.known) < a.peers - 1:
            if time.monotonic() > deadline:
                raise TimeoutError("peers did not show up in 60 s")
            await asyncio.sleep(0.05)
        from bench.common import wait_channels

        await wait_channels(d)
        return {"numel": d.numel}

    async def phases(arg: str, mode: str) -> dict:
        """``mode``: ``plain`` (no round), ``sync`` (each phase, then its round) or ``overlap``
        (each phase's round runs while the next phase trains, as ``RoundDriver.run`` does with
        ``sync.overlap``: the next phase starts from the newest global parameters minus this
        phase's own progress; the last round is waited for inside the timed span)."""
        d = st["d"]
        h, total = (int(x) for x in arg.split())
        loop = asyncio.get_running_loop()
        params = d.state.params
        steps = rounds = failed = 0
        round_s = 0.0  # sync: the rounds; overlap: the waits for a round the next phase did not hide
        pending: asyncio.Task | None = None
        phases0 = phase_sums(d)
        t0 = time.perf_counter()
        while steps < total:
            start = d.state.params if mode == "sync" else params
            res = await loop.run_in_executor(d.train_pool, d.trainer.run_inner, start, h)
            steps += res.steps
            if mode == "plain":
                params = start.to(res.delta.device) - res.delta  # stays on the training device
                continue
            t1 = time.perf_counter()
            if pending is not None:
                failed += (await pending) is None
                pending = None
            rounds += 1
            if mode == "sync":
                failed += (await d.round_once(res.delta, float(res.samples))) is None
            else:  # (computed before the round takes the delta over)
                params = d.state.params - res.delta.to(d.state.params.device)
                pending = asyncio.ensure_future(d.round_once(res.delta, float(res.samples)))
            round_s += time.perf_counter() - t1
        if pending is not None:
            t1 = time.perf_counter()
            failed += (await pending) is None
            round_s += time.perf_counter() - t1
        seconds = time.perf_counter() - t0
        return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds, "rounds": rounds,
                "rounds_failed": failed, "round_s_total": round_s,
                **{f"{ph}_s_total": v - phases0[ph] for ph, v in phase_sums(d).items()}}

    async def plain(arg: str) -> dict:
        return await phases(arg, "plain")

    async def sync_(arg: str) -> dict:
        return await phases(arg, "sync")

    async def overlap(arg: str) -> dict:
        return await phases(arg, "overlap")

    async def nothing(r: int) -> dict:
        return {}

    async def teardown() -> None:
        try:
            if "d" in st:
                await st["d"].stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return asyncio.run(serve(setup, nothing, teardown, commands={"plain": plain, "sync": sync_, "overlap": overlap}))


if __name__ == "__main__":
    sys.exit(main())
