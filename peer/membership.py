"""Membership: who is a member of the run, as this peer sees it. The one place that decides.

A peer becomes a member here after a handshake (ours to it, or its to us) that shows the same
protocol, run and model schema; it stops being one when it says ``Leave``, when mDNS says
goodbye, when its address refuses connections, or after ``heartbeat_misses`` unanswered pings.
Discovery events are only hints to try a handshake.

Loop-only. Talks to the network through ``MembershipClient``; the daemon passes the transport's
client, tests pass an in-memory one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from peer.config import Config
from peer.discovery.base import Discovery, PeerEvent
from peer.errors import HandshakeRefused, PeerError, PeerUnavailable
from peer.metrics import Metrics, sd_group
from peer.tasks import TaskSet
from peer.types import HandshakeReply, PeerInfo, StatusInfo

log = logging.getLogger(__name__)

HANDSHAKE_ATTEMPTS = 5
"""Tries of a handshake that discovery or start-up asks for (the heartbeat's retries try once)."""


class MembershipClient(Protocol):
    async def handshake(self, address: str, me: PeerInfo, timeout_s: float, expect_id: str = "") -> HandshakeReply: ...
    async def status(self, address: str, timeout_s: float) -> StatusInfo: ...
    async def leave(self, address: str, run_id: str, peer_id: str, timeout_s: float) -> None: ...
    async def forget(self, address: str) -> None: ...
    def bind(self, address: str, peer_id: str) -> None: ...


@dataclass(frozen=True)
class Attested:
    """A state the majority of the reachable members reports, and who can serve it."""

    round: int
    global_hash: str
    donors: tuple[tuple[str, str], ...]  # (peer id, address), sorted by id


@dataclass
class Known:
    """A handshaked peer of our run."""

    info: PeerInfo
    address: str
    misses: int = 0


def check_compatible(me: PeerInfo, other: PeerInfo) -> None:
    """Raise HandshakeRefused naming what differs between ``me`` and ``other``."""
    if other.peer_id == me.peer_id:
        raise HandshakeRefused("self", "that is this peer itself")
    if other.protocol_version != me.protocol_version:
        raise HandshakeRefused("protocol_mismatch", f"protocol version {other.protocol_version} != "
                               f"{me.protocol_version}")
    if other.run_id != me.run_id:
        raise HandshakeRefused("run_mismatch", f"run {other.run_id!r} != {me.run_id!r}")
    if other.schema_hash != me.schema_hash:
        raise HandshakeRefused("schema_mismatch",
                               f"model schema differs: task {other.task!r} schema {other.schema_hash[:12]} != "
                               f"task {me.task!r} schema {me.schema_hash[:12]} (parameter names, shapes or "
                               f"dtypes differ)")


def _newest_first(info: PeerInfo) -> tuple[int, str]:
    """Sort key of ``Membership.split``: the highest round first, then the smallest hash."""
    return -info.round, info.global_hash


class Membership:
    """The live peer set of this peer's run.

    ``me()`` returns this peer's current ``PeerInfo`` (round and hash change every round);
    ``on_drop(peer_id)`` runs whenever a member is dropped (the round stops waiting for it).
    """

    def __init__(
        self,
        cfg: Config,
        me: Callable[[], PeerInfo],
        client: MembershipClient,
        discovery: Discovery,
        metrics: Metrics,
        *,
        on_drop: Callable[[str], None] = lambda peer_id: None,
        ignored_counts: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self._cfg = cfg
        self._t = cfg.timeouts
        self._me = me
        self._client = client
        self._discovery = discovery
        self._metrics = metrics
        self._on_drop = on_drop
        self._ignored_counts = ignored_counts
        self._known: dict[str, Known] = {}
        self._pending: set[str] = set()
        self._refused_until: dict[str, float] = {}
        self._ignored_seen: dict[str, int] = {}
        self._leaving = False
        self._goodbye_at: dict[str, float] = {}  # peer id -> when it said Leave (monotonic), lately
        self._tasks = TaskSet()

    # ----------------------------------------------------------------- queries

    @property
    def known(self) -> Mapping[str, Known]:
        """The members, by peer id (read-only view; do not keep across awaits)."""
        return self._known

    def live(self) -> dict[str, str]:
        """peer id -> address of every member."""
        return {pid: k.address for pid, k in self._known.items()}

    def is_member(self, peer_id: str) -> bool:
        return peer_id in self._known

    def _reachable(self) -> list[Known]:
        """The members that answered their last ping: the only ones whose reports count."""
        return [k for k in self._known.values() if k.misses == 0]

    def majority_round(self) -> int:
        """The highest round that more than half of the reachable members have reached, as
        they report it (-1 with no member): one member's claim cannot raise it."""
        rounds = sorted((k.info.round for k in self._reachable()), reverse=True)
        return rounds[len(rounds) // 2] if rounds else -1

    def round_of(self, peer_id: str) -> int:
        """The round ``peer_id`` reported in its last handshake or heartbeat (-1 if unknown)."""
        known = self._known.get(peer_id)
        return -1 if known is None else known.info.round

    def attested(self) -> Attested | None:
        """The ``(round, global hash)`` that more than half of the members this peer can reach
        (those that answered their last ping) report, with those members as donors. With one
        other member, that member's word suffices. When the swarm has forked so that no state
        has such a majority (kills and restarts from old checkpoints, a leader that formed a
        group from a partial view), the state strictly more of them report than any other, if
        at least two do: without it no one could ever resync and the forks would stay apart,
        and one member's claim still moves nobody. None otherwise."""
        reachable = self._reachable()
        tally: dict[tuple[int, str], list[Known]] = {}
        for k in reachable:
            tally.setdefault((k.info.round, k.info.global_hash), []).append(k)
        ranked = sorted(tally.items(), key=lambda item: len(item[1]), reverse=True)
        if not ranked:
            return None
        (rnd, digest), backers = ranked[0]
        majority = 2 * len(backers) > len(reachable)
        plurality = len(backers) >= 2 and (len(ranked) == 1 or len(ranked[1][1]) < len(backers))
        if not (majority or plurality):
            return None
        donors = tuple((k.info.peer_id, k.address) for k in sorted(backers, key=lambda k: k.info.peer_id))
        return Attested(rnd, digest, donors)

    def split(self) -> Attested | None:
        """Where the run has split into as many states as peers (no two of the reachable members
        and this peer report the same state, so nothing is or ever becomes attested): the state
        of the highest round (at equal rounds, the smallest hash), with its one reporter as
        donor; None if this peer holds it, or if two or more share a state (then ``attested``
        rules, or a group of those two makes progress).

        This is not a majority's word, and a liar can claim a round far ahead. It is safe to
        take only where there is nothing else to take: honest peers that share a state count
        each other here, so a liar moves none of them; only peers that already disagree with
        everyone, and have made no progress for a while (the caller's patience:
        ``RoundDriver``), follow it. Without it, three peers at three states (a kill mid-round
        left two survivors a round apart, and the victim restarted from an older checkpoint)
        waited on each other forever: every leader refused the rounds of the others."""
        me = self._me()
        reachable = self._reachable()
        states = {(me.round, me.global_hash)}
        for k in reachable:
            state = (k.info.round, k.info.global_hash)
            if state in states:
                return None
            states.add(state)
        best = min(reachable, key=lambda k: _newest_first(k.info), default=None)
        if best is None or _newest_first(best.info) >= _newest_first(me):
            return None
        return Attested(best.info.round, best.info.global_hash, ((best.info.peer_id, best.address),))

    def settled(self) -> bool:
        """Some members known and no handshake in flight (start-up may stop waiting)."""
        return bool(self._known) and not self._pending

    def sd_targets(self, own_address: str, metrics_port: int) -> list[dict]:
        """http_sd groups: this peer and every member (called on the HTTP thread)."""
        run_id = self._cfg.run.run_id
        host = own_address.rsplit(":", 1)[0] if own_address else "127.0.0.1"
        groups = [sd_group(f"{host}:{metrics_port}", run_id, self._me().peer_id)]
        for pid, k in sorted(dict(self._known).items()):
            if k.info.metrics_port:
                groups.append(sd_group(f"{k.address.rsplit(':', 1)[0]}:{k.info.metrics_port}", run_id, pid))
        return groups

    # ----------------------------------------------------------------- admit and drop

    def admit(self, info: PeerInfo, address: str) -> bool:
        """Make ``info`` a member at ``address``; False (not admitted) when ``max_peers`` are."""
        is_new = info.peer_id not in self._known
        if is_new and len(self._known) >= self._cfg.net.max_peers:
            self._refused(HandshakeRefused("full", f"this peer admits at most {self._cfg.net.max_peers} members"),
                          f"{info.peer_id} at {address}")
            return False
        self._known[info.peer_id] = Known(info=info, address=address)
        self._client.bind(address, info.peer_id)
        self._metrics.live_peers.set(len(self._known))
        if is_new:
            log.info("peer joined: %s at %s (round %d); %d peers", info.peer_id, address, info.round,
                     len(self._known))
        return True

    def drop(self, peer_id: str, why: str) -> None:
        known = self._known.pop(peer_id, None)
        if known is None:
            return
        self._metrics.live_peers.set(len(self._known))
        log.info("peer left: %s (%s); %d peers", peer_id, why, len(self._known))
        self._on_drop(peer_id)
        # Close its channel later, not now: closing a channel cancels the calls still in flight
        # on it (a JoinRound or GetState of ours), which would surface as our own cancellation.
        # Later, every call has met its deadline; with churn, channels to dead addresses would
        # otherwise pile up.
        self._tasks.spawn(self._forget_later(known.address), f"forget-{known.address}")

    async def _forget_later(self, address: str) -> None:
        await asyncio.sleep(self._t.state_transfer_timeout_s + self._cfg.sync.reduce_deadline_s)
        if address not in {k.address for k in self._known.values()}:
            await self._client.forget(address)

    def _refused(self, exc: HandshakeRefused, who: str) -> None:
        self._metrics.handshake_refusals.labels(exc.reason).inc()
        log.warning("handshake with %s refused: %s: %s", who, exc.reason, exc)

    # ----------------------------------------------------------------- server side

    def answer_handshake(self, info: PeerInfo, observed_host: str) -> HandshakeReply:
        """A peer introduces itself: admit it if compatible, else refuse naming why."""
        me = self._me()
        if self._leaving:
            # After our goodbye, admitting would only make the caller a member of a peer about to
            # vanish, and make us its member again (its discovery still lists us for a moment).
            return HandshakeReply(False, "leaving", "this peer is leaving the run", me)
        try:
            check_compatible(me, info)
        except HandshakeRefused as exc:
            if exc.reason != "self":
                self._refused(exc, f"{info.peer_id} at {info.address}")
            return HandshakeReply(False, exc.reason, str(exc), me)
        if info.address:
            # Dial back where the connection came from: the caller may not know which of its
            # addresses we can reach (it listens on 0.0.0.0 with several interfaces).
            port = info.address.rsplit(":", 1)[-1]
            if not (port.isdigit() and 0 < int(port) < 65536):
                exc = HandshakeRefused("bad_address", f"address {info.address[:64]!r} has no valid port")
                self._refused(exc, f"{info.peer_id}")
                return HandshakeReply(False, exc.reason, str(exc), me)
            if not self.admit(info, f"{observed_host}:{port}" if observed_host else info.address):
                return HandshakeReply(False, "full", f"this peer admits at most {self._cfg.net.max_peers} members", me)
        return HandshakeReply(True, "", "", me)

    def said_leave(self, run_id: str, peer_id: str) -> None:
        if run_id == self._cfg.run.run_id and peer_id in self._known:
            now = time.monotonic()
            # Only a handshake in flight can cross a goodbye, and none lasts longer than this:
            # older goodbyes are forgotten (with churn, one entry per member that ever left).
            longest = HANDSHAKE_ATTEMPTS * (self._t.handshake_timeout_s + self._t.reconnect_wait_s)
            self._goodbye_at = {p: t for p, t in self._goodbye_at.items() if t > now - longest}
            self._goodbye_at[peer_id] = now
            self.drop(peer_id, "said goodbye")

    # ----------------------------------------------------------------- client side

    def introduce(self, address: str, hint: str) -> None:
        """Handshake ``address`` once, in the background, unless a handshake with it runs."""
        if address not in self._pending:
            self._tasks.spawn(self.handshake(address, hint, attempts=1, expect_id=hint), f"handshake-{address}")

    async def handshake(self, address: str, hint: str, attempts: int = HANDSHAKE_ATTEMPTS, expect_id: str = "") -> None:
        """Introduce ourselves to ``address``; admit it if it accepts and is compatible.
        ``expect_id``: whom discovery says listens there; with TLS, the handshake fails unless
        that peer's certificate answers (a discovery record is a hint, never trusted)."""
        self._pending.add(address)
        started = time.monotonic()
        try:
            for attempt in range(attempts):
                try:
                    reply = await self._client.handshake(address, self._me(), self._t.handshake_timeout_s, expect_id)
                except PeerUnavailable as exc:
                    log.debug("handshake with %s failed (attempt %d): %s", address, attempt + 1, exc)
                    await asyncio.sleep(min(self._t.reconnect_wait_s, 0.25 * 2 ** attempt))
                    continue
                if not reply.accepted and reply.reason == "leaving":
                    log.debug("%s at %s is leaving the run", hint, address)
                    return  # not an incompatibility: no refusal counted, no back-off (it may restart)
                if not reply.accepted:
                    self._refused_until[address] = time.monotonic() + self._t.refusal_backoff_s
                    if reply.reason != "self":
                        self._refused(HandshakeRefused(reply.reason, reply.message), f"{hint} at {address}")
                    return
                if reply.peer is None:
                    return
                if expect_id and reply.peer.peer_id != expect_id:
                    return  # with TLS the certificate proved expect_id; without, a mismatch is stale
                if self._goodbye_at.get(reply.peer.peer_id, -1.0) >= started:
                    return  # it said goodbye while our handshake was on the way: its welcome is stale
                try:
                    check_compatible(self._me(), reply.peer)
                except HandshakeRefused as exc:
                    self._refused_until[address] = time.monotonic() + self._t.refusal_backoff_s
                    self._refused(exc, f"{hint} at {address}")
                    return
                self.admit(reply.peer, address)
                return
        finally:
            self._pending.discard(address)

    # ----------------------------------------------------------------- upkeep

    def start(self) -> None:
        """Follow discovery and ping the members, in the background until ``stop``."""
        self._tasks.spawn(self._watch_discovery(), "discovery")
        self._tasks.spawn(self._heartbeat(), "heartbeat")

    async def stop(self) -> None:
        await self._tasks.cancel_all()

    async def leave_all(self, timeout_s: float) -> None:
        """Tell every member we are leaving (best effort, bounded by ``timeout_s``); from now on
        refuse handshakes, so that nobody admits us again between the goodbye and our exit."""
        self._leaving = True
        me = self._me()

        async def say(address: str) -> None:
            try:
                await self._client.leave(address, me.run_id, me.peer_id, timeout_s)
            except PeerError:
                pass  # it may be gone already; nothing to do

        await asyncio.gather(*(say(k.address) for k in list(self._known.values())))

    async def _watch_discovery(self) -> None:
        async for event in self._discovery.events():
            self.on_event(event)

    def on_event(self, event: PeerEvent) -> None:
        rec = event.record
        if event.kind == "leave":
            # mDNS is a hint, never trusted: a goodbye (anyone can send one) only makes us ask
            # the member at once; it is dropped if it no longer answers.
            known = self._known.get(rec.peer_id)
            if known is not None:
                self._tasks.spawn(self._ping(rec.peer_id, known, why="mDNS goodbye"), f"recheck-{rec.peer_id}")
            return
        if rec.peer_id == self._me().peer_id or rec.address in self._pending:
            return
        expect = "" if rec.provisional else rec.peer_id
        self._tasks.spawn(self.handshake(rec.address, rec.peer_id, expect_id=expect), f"handshake-{rec.address}")

    async def _heartbeat(self) -> None:
        """Ping members: drop those that stopped answering (kill -9 sends no goodbye) and keep
        their round and hash fresh (to notice that we fell behind). Static peers that are not
        connected, and mDNS records whose handshake failed (a healed partition sends no new
        mDNS event), are retried here too."""
        me = self._me().peer_id
        while True:
            await asyncio.sleep(self._t.heartbeat_interval_s)
            self._export_ignored()
            for pid, k in list(self._known.items()):
                self._tasks.spawn(self._ping(pid, k), f"ping-{pid}")
            wanted = {a: "" for a in self._cfg.net.peers}
            wanted.update({r.address: "" if r.provisional else r.peer_id for r in self._discovery.current()
                           if r.peer_id != me and r.peer_id not in self._known})
            connected = {k.address for k in self._known.values()}
            now = time.monotonic()
            for address, hint in wanted.items():
                if self._refused_until.get(address, 0.0) > now:
                    continue  # refused recently: do not spam the log and the refusal counter
                if address not in connected and address not in self._pending:
                    self._tasks.spawn(self.handshake(address, hint or "static peer", attempts=1, expect_id=hint),
                                      f"handshake-{address}")

    def _export_ignored(self) -> None:
        """Discovery counts what it ignores; export the increase since the last heartbeat."""
        for reason, total in self._ignored_counts().items():
            increase = total - self._ignored_seen.get(reason, 0)
            if increase > 0:
                self._metrics.discovery_ignored.labels(reason).inc(increase)
                self._ignored_seen[reason] = total

    async def _ping(self, pid: str, k: Known, why: str = "") -> None:
        """Ask a member for its status; ``why`` (a discovery goodbye) drops it at the first
        unanswered ping, a plain heartbeat after ``heartbeat_misses``."""
        try:
            status = await self._client.status(k.address, self._t.rpc_timeout_s)
        except PeerUnavailable:
            k.misses += 1
            if (why or k.misses >= self._t.heartbeat_misses) and self._known.get(pid) is k:
                self.drop(pid, f"{why} and no answer" if why else f"no answer to {k.misses} pings")
            return
        if status.peer.peer_id != pid:
            self.drop(pid, f"{k.address} is now {status.peer.peer_id}")
            return
        k.misses = 0
        k.info = status.peer
