"""Talking to a running daemon from local tools (``peer status``, ``peer export``, ``peer demo``,
the tests).

Asks a daemon for its status (or its global state) over gRPC and turns the answer into plain data. Imported by
``peer.cli`` and ``peer.demo`` (neither imports the other for this); never exits the process.
grpc is imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peer.types import PeerInfo, StateHeader, StatusInfo


def status_dict(s: StatusInfo) -> dict:
    """A status answer as a JSON-ready dict (NaN losses become None)."""
    nan = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731
    return {
        "peer_id": s.peer.peer_id, "run_id": s.peer.run_id, "task": s.peer.task, "address": s.peer.address,
        "round": s.peer.round, "inner_step": s.inner_step, "loss": nan(s.loss), "eval_loss": nan(s.eval_loss),
        "eval_accuracy": nan(s.eval_accuracy), "global_hash": s.peer.global_hash, "peers": list(s.peers),
        "phase": s.phase, "codec": s.codec, "samples": s.samples, "bytes_sent": s.bytes_sent,
        "bytes_received": s.bytes_received, "last_round_s": s.last_round_s,
        "rounds_completed": s.rounds_completed, "rounds_failed": s.rounds_failed,
        "metrics_port": s.peer.metrics_port,
        "local_ranks": [{"rank": r.rank, "pid": r.pid, "device": r.device, "alive": r.alive, "samples": r.samples}
                        for r in s.local_ranks],
    }


class StatusClient:
    """One gRPC client for many status calls; an async context manager bound to one event loop.

    ``status`` raises ``peer.errors.PeerUnavailable`` (a ``PeerError``) when the daemon does not
    answer within ``timeout_s``."""

    def __init__(self, idle_timeout_s: float = 5.0, credentials: str | None = None,
                 max_state_bytes: int = 1 << 34) -> None:
        """``credentials``: the run's credentials directory (mutual TLS, with a throwaway
        identity signed by the run CA); None talks plain TCP to an ``--insecure`` daemon.
        ``max_state_bytes``: the largest state ``state`` accepts."""
        self._idle_timeout_s = idle_timeout_s
        self._credentials = credentials
        self._max_state_bytes = max_state_bytes
        self._peer_id = "tool"
        self._client = None

    async def __aenter__(self) -> StatusClient:
        from peer.transport import GrpcPeerClient

        identity = None
        if self._credentials:
            from peer.credentials import ephemeral_identity, load_run_ca

            identity = ephemeral_identity(load_run_ca(self._credentials))
            self._peer_id = identity.peer_id  # a state request must name the id the certificate proves
        self._client = GrpcPeerClient(chunk_bytes=1 << 20, chunk_idle_timeout_s=self._idle_timeout_s,
                                      identity=identity, max_state_bytes=self._max_state_bytes)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def info(self, address: str, timeout_s: float = 5.0) -> StatusInfo:
        if self._client is None:
            raise RuntimeError("StatusClient is used outside its 'async with' block")
        return await self._client.status(address, timeout_s)

    async def state(self, address: str, peer: PeerInfo, timeout_s: float) -> tuple[StateHeader, bytes]:
        """The daemon's global state snapshot (wire format, checked against its sha256), for the
        run and model schema of ``peer`` (its status). Raises ``PeerError``."""
        if self._client is None:
            raise RuntimeError("StatusClient is used outside its 'async with' block")
        return await self._client.get_state(address, peer.run_id, self._peer_id, peer.schema_hash, timeout_s)

    async def status(self, address: str, timeout_s: float = 5.0) -> dict:
        return status_dict(await self.info(address, timeout_s))


async def fetch_status(address: str, timeout_s: float, credentials: str | None = None) -> StatusInfo:
    """One status call with its own short-lived client."""
    async with StatusClient(idle_timeout_s=timeout_s, credentials=credentials) as client:
        return await client.info(address, timeout_s)


def get_status(address: str, timeout_s: float = 5.0, credentials: str | None = None) -> dict:
    """Blocking: the status of the daemon at ``address`` as a dict (runs its own event loop)."""
    return status_dict(asyncio.run(fetch_status(address, timeout_s, credentials)))


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units, bytes below 1 KiB as an integer)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
