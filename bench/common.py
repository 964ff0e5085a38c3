"""Helpers shared by the benchmarks: timing statistics, thread pinning, JSON/table output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence


def pin_threads(n: int = 1) -> None:
    """One torch thread per process: several processes share 2 cores; oversubscription costs ~20x."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    import torch

    torch.set_num_threads(n)


def summary(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
    }


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` are ``(key, header, format)``."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else (format(value, fmt) if fmt else str(value)))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(r, widths)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def emit_json(obj: dict) -> None:
    json.dump(obj, sys.stdout, indent=None, sort_keys=False, default=float)
    sys.stdout.write("\n")
    sys.stdout.flush()


async def wait_channels(d, timeout_s: float = 30.0) -> None:
    """Until a Status RPC to every known peer succeeds. A peer that dialled a static peer before
    it listened holds a gRPC channel in reconnect backoff; a JoinRound on it fails at once and
    the round splits (see bench/README.md, findings). Rounds start only on healthy channels."""
    import asyncio
    import time

    from peer.errors import PeerError

    deadline = time.monotonic() + timeout_s
    for k in list(d.membership.known.values()):
        while True:
            try:
                await d.client.status(k.address, 2.0)
                break
            except PeerError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


def throwaway_credentials(run_id: str) -> str:
    """Run credentials for one benchmark run, in a temporary directory removed at exit. Peers
    run as users run them: mutual TLS (``--insecure`` benchmarks say so)."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from peer.credentials import create_run_credentials

    root = tempfile.mkdtemp(prefix="bench-creds-")
    atexit.register(shutil.rmtree, root, True)
    return str(create_run_credentials(run_id, Path(root) / "creds"))


def security(credentials: str | None) -> dict:
    """The config settings of a benchmark peer: credentials, or ``insecure`` without them."""
    return {"credentials": credentials} if credentials else {"insecure": True}


PHASES = ("matchmaking", "reduce", "outer")
"""The round phases a daemon times (``peer_round_phase_duration_seconds``) that benches report."""


def phase_sums(daemon) -> dict[str, float]:
    """Seconds ``daemon`` has spent in each of ``PHASES`` so far (its phase histogram's sums).

    Reads that one histogram, not the whole registry: a registry collect also runs the process
    and GC collectors (reading /proc), ~1 ms of CPU a call that a worker spent right after its
    round, while another peer's round (whose last RPC it may have to answer) was still timed."""
    sums = dict.fromkeys(PHASES, 0.0)
    for family in daemon.metrics.round_phase_seconds.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum") and sample.labels.get("phase") in sums:
                sums[sample.labels["phase"]] = sample.value
    return sums
