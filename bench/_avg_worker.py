"""One process of ``bench.averaging`` for the ``peer`` and ``gloo`` systems (see bench/_proto.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time

from bench.common import phase_sums, pin_threads, security


def _args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["peer", "gloo"], required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--params", type=int, required=True)
    p.add_argument("--codec", default="int8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--addresses", default="[]", help="JSON list of host:port of every rank (peer/gloo)")
    p.add_argument("--iface", default=None, help="interface whose tx_bytes to count (netns runs)")
    p.add_argument("--run-id", default="bench")
    p.add_argument("--credentials", default=None, help="run credentials (default: --insecure, no TLS)")
    p.add_argument("--memory", action="store_true",
                   help="peer: measure memory as a peer of a real run holds it (error feedback on, the donor "
                        "snapshot built after every round as when a joiner asks); no exact mean is kept")
    return p.parse_args(argv)


class PeerWorker:
    """A real Daemon; each round is ``round_once`` with this rank's deterministic delta."""

    def __init__(self, a) -> None:
        self.a = a
        self.addresses = json.loads(a.addresses)
        self.tmp = tempfile.mkdtemp(prefix=f"bench-peer-{a.rank}-")

    async def setup(self) -> dict:
        from peer.config import load_config
        from peer.daemon import Daemon

        a = self.a
        cfg = load_config({
            "run_id": a.run_id, "listen": self.addresses[a.rank], **security(a.credentials),
            "metrics_host": "127.0.0.1", "metrics_port": 0, "mdns": False,
            "peers": [x for i, x in enumerate(self.addresses) if i != a.rank],
            "codec": a.codec, "task": "bench.tasks:synthetic", "data": str(a.params), "state_dir": self.tmp,
            "threads": 1, "error_feedback": a.memory, "eval_every_rounds": 0, "checkpoint_interval_s": 0,
            "matchmaking_timeout_s": 30.0, "reduce_deadline_s": 120.0, "chunk_idle_timeout_s": 60.0,
            "startup_grace_s": 0.1,
        }, env={})
        self.d = Daemon(cfg)
        await self.d.start()
        deadline = time.monotonic() + 60
        while len(self.d.membership.known) < a.peers - 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"knows {len(self.d.membership.known)} of {a.peers - 1} peers after 60 s")
            await asyncio.sleep(0.05)
        from bench.common import wait_channels

        await wait_channels(self.d)
        from peer.codec import get_codec

        self.codec = get_codec(a.codec)
        self._prepared = {}
        return {"peer_id": self.d.peer_id, **memory_status()}

    async def do_round(self, r: int) -> dict:
        import torch

        from bench.deltas import delta, read_tx_bytes

        a = self.a
        # Inputs are built before the parent's barrier (``prepare``), so that every peer starts
        # the round at the same moment (building them after the release skewed the starts by up
        # to ~0.1 s, which the matchmaking phase then showed as waiting), and after every peer
        # has ended the previous round (so that no peer's ~1 s of input building competes for
        # the CPU with another peer's timed round).
        if a.memory:  # (the delta is popped there: a reference here would outlive the round)
            return await self._memory_round(r)
        mine, exact, bound_in = self._prepared.pop(r, None) or self._inputs(r)
        tx0, b0 = read_tx_bytes(a.iface), self.d.driver.progress.bytes_sent
        phases0 = phase_sums(self.d)
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        avg = await self.d.round_once(mine, 1.0)
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
        tx1 = read_tx_bytes(a.iface)
        out = {"seconds": seconds, "cpu_s": cpu, "bytes_sent": self.d.driver.progress.bytes_sent - b0,
               "wire_tx_bytes": None if tx0 is None else tx1 - tx0, "ok": avg is not None}
        out.update({f"{p}_s": v - phases0[p] for p, v in phase_sums(self.d).items()})
        if avg is not None:
            out["max_abs_err"] = float((avg.tensor().double() - exact).abs().max())
            # + float32 rounding of the average (the exact mean is float64).
            out["err_bound"] = (2 * bound_in + (self.codec.error_bound(exact.float()) if self.codec.lossy else 0.0)
                                + float(exact.abs().max()) * 2.0**-22)
        del torch, mine, exact
        return out

    async def prepare(self, r: int) -> None:
        self._prepared[r] = self._inputs(r)

    def _inputs(self, r: int) -> tuple:
        from bench.deltas import delta

        a = self.a
        if a.memory:
            return delta(a.seed, a.rank, r, a.params), None, None
        return (delta(a.seed, a.rank, r, a.params),
                *_exact_and_bound(a.seed, a.peers, r, a.params, self.codec))

    async def _memory_round(self, r: int) -> dict:
        """A round, then the donor snapshot a joiner would ask for; peak RSS so far. This process
        holds only what a peer holds (its delta, given to the round) besides the daemon: the next
        round's delta is built once this one is gone."""
        mine = (self._prepared.pop(r, None) or self._inputs(r))[0]
        phases0 = phase_sums(self.d)
        peak = memory_status()["peak_rss_bytes"]
        reset_peak()
        t0 = time.perf_counter()
        avg = await self.d.round_once(mine, 1.0)
        seconds = time.perf_counter() - t0
        ok = avg is not None
        del avg, mine
        round_peak = memory_status()["peak_rss_bytes"]
        reset_peak()
        await serve_state(self.d)
        snapshot_peak = memory_status()["peak_rss_bytes"]
        return {"seconds": seconds, "ok": ok, "bytes_sent": None, "wire_tx_bytes": None, **memory_status(),
                # The peak over the whole life of the process, and where this round's peaks were.
                "peak_rss_bytes": max(peak, round_peak, snapshot_peak), "round_peak_rss_bytes": round_peak,
                "snapshot_peak_rss_bytes": snapshot_peak,
                **{f"{p}_s": v - phases0[p] for p, v in phase_sums(self.d).items()}}

    async def teardown(self) -> None:
        try:
            if hasattr(self, "d"):
                await self.d.stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


async def serve_state(d) -> None:
    """What a donor does for a GetState, less the network: the pinned snapshot, framed chunk by
    chunk as the servicer frames it (``chunk_frames``), then released."""
    from peer.transport.streams import chunk_frames

    served = await d.store.async_serve()
    try:
        start = 0
        for part in served.parts:
            for _ in chunk_frames(part, d.cfg.sync.chunk_bytes, start):
                pass
            start += len(part)
    finally:
        served.release()


def memory_status() -> dict:
    """This process's peak and current resident set size in bytes (``/proc/self/status``)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out["peak_rss_bytes" if key == "VmHWM" else "rss_bytes"] = int(value.split()[0]) * 1024
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all its threads: less sensitive to
    other work on a shared machine than wall time."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def reset_peak() -> None:
    """Restart this process's peak RSS (VmHWM) at its current RSS (Linux ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _exact_and_bound(seed: int, k: int, r: int, n: int, codec) -> tuple:
    """Exact float64 mean of the round's K deltas, and the mean of the codec's bound over them.

    The all-reduce error is at most: each sender's codec error (averaged over senders) plus the
    owner's re-encoding error of that average; the bench's bound is 2 * mean_i bound(d_i) +
    bound(mean), which covers the owner input being off the exact mean by the first term.
    """
    import torch

    from bench.deltas import delta

    acc = torch.zeros(n, dtype=torch.float64)
    bound = 0.0
    for rank in range(k):
        d = delta(seed, rank, r, n)
        if codec is not None and codec.lossy:
            bound += codec.error_bound(d) / k
        acc.add_(d.double())
    return acc.div_(k), bound


class GlooWorker:
    """torch.distributed gloo all_reduce of fp32 (sum, then / K)."""

    def __init__(self, a) -> None:
        self.a = a

    async def setup(self) -> dict:
        import datetime

        import torch.distributed as dist

        a = self.a
        master = json.loads(a.addresses)[0]
        dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=a.rank, world_size=a.peers,
                                timeout=datetime.timedelta(seconds=120))
        dist.barrier()
        self._prepared = {}
        return {}

    async def do_round(self, r: int) -> dict:
        import torch.distributed as dist

        from bench.deltas import delta, read_tx_bytes

        a = self.a
        t, exact = self._prepared.pop(r, None) or self._inputs(r)  # built on ``prepare`` (see PeerWorker)
        tx0 = read_tx_bytes(a.iface)
        t0 = time.perf_counter()
        dist.all_reduce(t)
        t.div_(a.peers)
        seconds = time.perf_counter() - t0
        tx1 = read_tx_bytes(a.iface)
        out = {"seconds": seconds, "bytes_sent": None, "wire_tx_bytes": None if tx0 is None else tx1 - tx0,
               "ok": True, "max_abs_err": float((t.double() - exact).abs().max()), "err_bound": 1e-6}
        del t, exact
        return out

    async def prepare(self, r: int) -> None:
        self._prepared[r] = self._inputs(r)

    def _inputs(self, r: int) -> tuple:
        from bench.deltas import delta

        a = self.a
        return delta(a.seed, a.rank, r, a.params), _exact_and_bound(a.seed, a.peers, r, a.params, None)[0]

    async def teardown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> int:
    pin_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s rank{os.environ.get('BENCH_RANK', '?')} %(name)s %(message)s")
    a = _args(argv)
    worker = PeerWorker(a) if a.system == "peer" else GlooWorker(a)
    from bench._proto import serve

    served = serve(worker.setup, worker.do_round, worker.teardown, prepare=worker.prepare)
    if a.system == "peer":  # the daemon's own loop, as `peer run` and peer.Swarm run it
        import uvloop

        return uvloop.run(served)
    return asyncio.run(served)


if __name__ == "__main__":
    sys.exit(main())
