"""The service: the transport's ``Handler``, as thin calls into membership, the state store
and the round's leader and owner sides. Loop-only; nothing here decides anything itself."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from peer.config import Config
from peer.errors import HandshakeRefused, RoundError
from peer.membership import Membership
from peer.metrics import Metrics
from peer.sync.driver import RoundDriver
from peer.sync.round import PhaseHook, no_hook
from peer.sync.state import StateSnapshot
from peer.sync.store import StateStore
from peer.types import (
    HandshakeReply, JoinReply, JoinRequest, LocalRank, PeerInfo, ReduceHeader, StatusInfo,
)


log = logging.getLogger(__name__)


class Service:
    def __init__(
        self,
        cfg: Config,
        me: Callable[[], PeerInfo],
        membership: Membership,
        driver: RoundDriver,
        store: StateStore,
        metrics: Metrics,
        phase_hook: PhaseHook = no_hook,
        local_ranks: Callable[[], tuple[LocalRank, ...]] = tuple,
    ) -> None:
        self._cfg = cfg
        self._me = me
        self._membership = membership
        self._driver = driver
        self._store = store
        self._metrics = metrics
        self._hook = phase_hook
        self._local_ranks = local_ranks
        self._refused_callers: set[str] = set()

    def handshake(self, info: PeerInfo, observed_host: str) -> HandshakeReply:
        return self._membership.answer_handshake(info, observed_host)

    def status(self) -> StatusInfo:
        p = self._driver.progress
        return StatusInfo(peer=self._me(), inner_step=p.inner_step, loss=p.loss,
                          eval_loss=p.eval.get("loss", math.nan), eval_accuracy=p.eval.get("accuracy", math.nan),
                          peers=tuple(sorted(self._membership.known)), bytes_sent=p.bytes_sent,
                          bytes_received=p.bytes_received, last_round_s=p.last_round_s, phase=p.phase,
                          samples=p.samples, rounds_completed=p.completed, rounds_failed=p.failed,
                          codec=self._cfg.sync.codec, local_ranks=self._local_ranks())

    async def join_round(self, req: JoinRequest) -> JoinReply:
        return await self._driver.join(req)

    async def reduce_expect(self, header: ReduceHeader) -> int:
        return await self._driver.owner.expect(header)

    async def reduce_part(self, header: ReduceHeader, payload: bytes) -> tuple[ReduceHeader, bytes]:
        return await self._driver.owner.contribute(header, payload)

    def reduce_rejected(self, header: ReduceHeader | None, error: RoundError) -> None:
        self._driver.rejected(header, error)

    async def state_snapshot(self, run_id: str, peer_id: str, schema_hash: str) -> StateSnapshot:
        me = self._me()
        if run_id != me.run_id:
            raise HandshakeRefused("run_mismatch", f"run {run_id!r} != {me.run_id!r}")
        if schema_hash != me.schema_hash:
            raise HandshakeRefused("schema_mismatch", "model schema differs")
        return await self._store.async_serve()

    async def serving_state(self, sent_bytes: int) -> None:
        await self._hook("serve_state", self._store.state.round)

    def state_served(self, ok: bool) -> None:
        self._metrics.state_transfers.labels("served", "ok" if ok else "failed").inc()

    def leave(self, run_id: str, peer_id: str) -> None:
        self._membership.said_leave(run_id, peer_id)

    def malformed(self, method: str, caller: str, message: str) -> None:
        """Counted every time, logged at debug (a liar may send them in a loop)."""
        self._metrics.invalid_claims.labels("malformed").inc()
        log.debug("refused a %s message from %s: %s", method, caller or "a caller", message)

    def auth_refused(self, method: str, caller: str, named: str) -> None:
        """Counted every time, logged once per caller (a liar may call in a loop)."""
        self._metrics.auth_refusals.labels("identity_mismatch" if caller else "no_certificate").inc()
        if caller not in self._refused_callers and len(self._refused_callers) < 1024:
            self._refused_callers.add(caller)
            log.warning("refused %s from %s: it named peer %r (further refusals of this caller are only counted)",
                        method, caller or "a caller without a certificate", named)
