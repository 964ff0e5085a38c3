"""The round as one peer sees it: inner phase, group formation (leader and follower side),
consistency check, all-reduce, outer step, resync, adaptive deadlines and overlap.

Async, loop-only. It reaches other peers only through the ``PeerClient`` protocol and the
``Members`` view, and its own model only through ``InnerPhase``; the daemon passes the real
ones, the unit tests in-memory ones. Fault injection comes in through the phase hook and
wrappers the daemon builds; this module knows nothing of it.

Resync rule (logged on every resync): adopt only the ``(round, global hash)`` that more than
half of the reachable members report (with one other member, its word), and only bytes that hash
to it; at equal rounds, the group's majority (the leader tells a minority member to resync).
Where no two peers share a state (nothing can ever be attested), a peer without progress for
three matchmaking timeouts takes the highest round's (``Members.split``, ``_target``).

Late confirmation (models of at most ``confirm_late_max_numel`` values): a member applies a
round's answers as soon as it has them and sends its answer digests to the round's leader in the
background; the round is *settled* (counted completed, logged "done", checkpointed, evaluated)
only once the leader confirmed, and the member's next round waits for that before it sends
anything (see ``settle``). The
confirmation was the third network round trip of a round, most of a small model's round; an
inner phase, or the next JoinRound, now hides it. Larger models confirm first and step in place:
rolling back needs the previous state, which a small model keeps for nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from peer.codec import all_finite, get_codec
from peer.config import Config, Settings
from peer.errors import PeerError, PeerUnavailable, RoundError, StateError
from peer.metrics import Metrics
from peer.sync.confirm import AnswerChecks, compared
from peer.sync.mirror import Answers, DeviceMirror
from peer.sync.outer import REMEASURE_ABOVE, finite_bound, step_hashed_into
from peer.sync.round import (
    PAIR_SWAP_NUMEL, Aggregation, Averaged, Matchmaker, PeerClient, PhaseHook, Reducer, ReduceOwner, ShardRegistry,
    check_group, leader_for, let_replies_out, no_hook, offload, runs_inline,
)
from peer.sync.state import GlobalState
from peer.sync.store import StateStore
from peer.tasks import TaskSet
from peer.types import Group, JoinOutcome, JoinReply, JoinRequest, ReduceHeader

log = logging.getLogger(__name__)

ATTESTED_LEAD_ROUNDS = 1000
"""How far past the attested round a donor's state may be (rounds it finished since it reported)."""


class Deadlines:
    """Adaptive waits, pure: ``factor`` x the smoothed observed time + ``margin_s``, capped by
    the configured value; before any observation, the cap itself.

    The matchmaking wait follows how long the members take to arrive (only formations where
    everyone arrived say that; a timeout says nothing new); the all-reduce deadline follows
    the observed all-reduce time.
    """

    def __init__(self, *, matchmaking_cap_s: float, reduce_cap_s: float, factor: float, margin_s: float,
                 smoothing: float) -> None:
        self._caps = {"formation": matchmaking_cap_s, "reduce": reduce_cap_s}
        self._factor = factor
        self._margin_s = margin_s
        self._smoothing = smoothing
        self._ewma: dict[str, float] = {}

    def _observe(self, what: str, seconds: float) -> None:
        old = self._ewma.get(what)
        self._ewma[what] = seconds if old is None else (1 - self._smoothing) * old + self._smoothing * seconds

    def _limit(self, what: str) -> float:
        cap = self._caps[what]
        ewma = self._ewma.get(what)
        return cap if ewma is None else min(cap, self._factor * ewma + self._margin_s)

    def observe_formation(self, wait_s: float, complete: bool) -> None:
        if complete:
            self._observe("formation", wait_s)

    def observe_reduce(self, seconds: float) -> None:
        self._observe("reduce", seconds)

    def matchmaking_timeout(self) -> float:
        return self._limit("formation")

    def reduce_deadline(self) -> float:
        return self._limit("reduce")


class Members(Protocol):
    """What the round needs to know about the run's members (``peer.membership``)."""

    def live(self) -> dict[str, str]: ...
    def is_member(self, peer_id: str) -> bool: ...
    def majority_round(self) -> int:
        """The highest round more than half of the reachable members have reached."""
    def round_of(self, peer_id: str) -> int:
        """The round ``peer_id`` reported last (-1 if unknown)."""
    def attested(self) -> Any | None:
        """The state a majority of the reachable members reports: ``.round``, ``.global_hash``,
        ``.donors`` [(peer id, address)]; None without a majority."""
    def split(self) -> Any | None:
        """Where no two of the reachable members and this peer share a state: the highest
        round's state, if not this peer's own (same shape as ``attested``); None otherwise."""
    def settled(self) -> bool: ...
    def drop(self, peer_id: str, why: str) -> None: ...
    def introduce(self, address: str, hint: str) -> None: ...


class InnerPhase(Protocol):
    """This peer's model: H inner steps off the loop, and evaluation."""

    async def run(self, rnd: int, start: torch.Tensor, should_stop: Callable[[], bool]) -> Any | None:
        """An ``InnerResult`` (delta, samples, mean_loss, nonfinite), or None when stopped."""

    async def evaluate(self, params: torch.Tensor) -> Mapping[str, float]: ...


@dataclass
class _Unconfirmed:
    """A round applied here before its leader confirmed the answers (``RoundDriver.settle``)."""

    rnd: int
    group: Group
    confirm: asyncio.Task | None  # -> bool (RoundDriver._confirm); None: confirmed before applying
    before: GlobalState  # the state the round started from (its tensors untouched: no in-place step)
    after: GlobalState
    seconds: float  # the round up to the applied state
    reduce_s: float
    sent_bytes: int
    loss: float  # of the inner phase whose delta it averaged (the next one may have ended by the settling)
    settled: asyncio.Task | None = None


@dataclass
class Progress:
    """What ``peer status`` shows of the rounds (mutated on the loop only)."""

    phase: str = "starting"
    inner_step: int = 0  # incremented on the trainer thread (a plain int: atomic under the GIL)
    completed: int = 0
    failed: int = 0
    loss: float = math.nan
    eval: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    last_round_s: float = 0.0


class RoundDriver:
    """Runs this peer's rounds. Build, then ``await run()``; ``request_stop()`` ends it."""

    def __init__(
        self,
        cfg: Config,
        settings: Settings,
        *,
        peer_id: str,
        schema_hash: str,
        members: Members,
        client: PeerClient,
        store: StateStore,
        inner: InnerPhase,
        executor: Executor,
        metrics: Metrics,
        address: Callable[[], str],
        phase_hook: PhaseHook = no_hook,
        param_numel: int | None = None,
        int_slices: tuple[tuple[int, int], ...] = (),
        mirror: DeviceMirror | None = None,
    ) -> None:
        """``param_numel``: how many values of the flat state are parameters (the rest are
        buffers, averaged without outer momentum; None: all); ``int_slices``: the integer
        buffers' ranges, rounded after every outer step (see ``peer.sync.outer.outer_step``).
        ``mirror``: the global state on the training device (``peer.sync.mirror``), advanced
        there by each round's answers; inner phases then start from its parameters instead of
        the host's. Not used with ``sync.overlap``."""
        self._cfg = cfg
        self._mirror = None if cfg.sync.overlap else mirror
        self._param_numel = param_numel
        self._int_slices = int_slices
        self._settings = settings
        self._me = peer_id
        self._schema_hash = schema_hash
        self._run_id = cfg.run.run_id
        self._members = members
        self._client = client
        self._store = store
        self._inner = inner
        self._executor = executor
        self._metrics = metrics
        metrics.mirror_active.set(1 if self._mirror is not None and self._mirror.enabled else 0)
        self._address = address
        self._hook = phase_hook
        self._stopping = False
        self._tasks = TaskSet()
        self.progress = Progress()
        s = cfg.sync
        self.deadlines = Deadlines(matchmaking_cap_s=s.matchmaking_timeout_s, reduce_cap_s=s.reduce_deadline_s,
                                   factor=s.deadline_factor, margin_s=s.deadline_margin_s,
                                   smoothing=s.deadline_smoothing)
        self.registry = ShardRegistry()
        self._suspects: dict[str, float] = {}  # leader id -> monotonic time until which it is skipped
        self._leader_failures: dict[str, int] = {}
        self._group_leader = peer_id
        self._relayed: tuple[str, bytes] = ("", b"")  # (group id, the partner's delta its join reply carried)
        self._swap_bytes = get_codec(cfg.sync.codec).encoded_size(store.numel)  # a pair's offered delta, exactly
        self._misses: dict[str, int] = {}  # member -> rounds in a row its part missed our cut-off
        self._excluded: dict[str, float] = {}  # member -> monotonic time until which it is left out
        self._mismatched: dict[str, set[str]] = {}  # owner -> members that received other bytes from it
        self._heard: dict[str, float] = {}  # member -> when it last joined a round here or sent us a part
        self.answers = AnswerChecks(on_mismatch=self._answers_differ, on_invalid=self._invalid)
        self._unconfirmed: _Unconfirmed | None = None  # the last round applied, until its leader confirms
        self._moved_at = time.monotonic()  # when this peer last completed a round or adopted a state
        # ... and when it last completed one with another peer, or adopted a state (``_alone_ahead``)
        self._together_at = self._moved_at
        self.matchmaker = Matchmaker(peer_id=peer_id, numel=store.numel, codec=s.codec, live=self._waitable,
                                     leaders=self._candidates,
                                     current_round=lambda: store.state.round,
                                     timeout_s=self.deadlines.matchmaking_timeout, deadline_s=self._reduce_deadline,
                                     on_formed=self.deadlines.observe_formation, excluded=self._is_excluded,
                                     swarm_round=members.majority_round, stalled_before=self._stalled_before,
                                     on_group=self.answers.formed)
        self.reducer = Reducer(peer_id=peer_id, run_id=self._run_id, client=client, registry=self.registry,
                               executor=executor, error_feedback=s.error_feedback,
                               owner_cutoff_share=s.owner_cutoff_share, phase_hook=phase_hook,
                               aggregation=Aggregation(s.aggregation, s.trim_fraction, s.weight_cap_factor,
                                                       s.norm_outlier_factor),
                               on_rejected=lambda pid, error: self.rejected_part(pid, error, self._store.state.round),
                               on_delivered=self._delivery)
        self.owner = ReduceOwner(run_id=self._run_id, peer_id=peer_id, registry=self.registry,
                                 group_wait_s=cfg.timeouts.chunk_idle_timeout_s, on_rejected=self.rejected,
                                 traffic=self._traffic, phase_hook=phase_hook)

    # ----------------------------------------------------------------- for the service

    @property
    def stopping(self) -> bool:
        return self._stopping

    def request_stop(self) -> None:
        self._stopping = True

    def in_round(self) -> bool:
        return self.progress.phase in ("matchmaking", "reduce", "outer")

    async def join(self, req: JoinRequest) -> JoinReply:
        """Leader side: a member asks to join round ``req.round``."""
        if req.run_id != self._run_id or not self._members.is_member(req.peer_id) or self._stopping:
            why = "leaving" if self._stopping else f"{req.peer_id} of run {req.run_id!r} is not a known peer here"
            return JoinReply(JoinOutcome.REFUSED, why)
        if req.confirm_group:
            return await self.answers.confirm(req)
        if not (0 <= req.weight < float("inf")) or len(req.global_hash) > 64:
            self._invalid("bad_join", f"{req.peer_id} asked to join with weight {req.weight} / hash "
                          f"{req.global_hash[:16]!r}")
            return JoinReply(JoinOutcome.REFUSED, "a join needs a finite weight >= 0 and a hex hash of at most 64 digits")
        if req.swap_delta and (self._store.numel > PAIR_SWAP_NUMEL or len(req.swap_delta) != self._swap_bytes):
            # (its values are checked where the round takes it: ``SwapShard.add``)
            why = (f"a delta offered with a join must be the whole delta encoded with {self._cfg.sync.codec} "
                   f"({self._swap_bytes} bytes), for a model of at most {PAIR_SWAP_NUMEL} values; "
                   f"{req.peer_id} offered {len(req.swap_delta)} bytes")
            self._invalid("bad_join", why)
            return JoinReply(JoinOutcome.REFUSED, why)
        self._heard[req.peer_id] = time.monotonic()
        return await self.matchmaker.join(req)

    def peer_left(self, peer_id: str) -> None:
        self.matchmaker.peer_left(peer_id)
        # A member that comes back starts with a clean record.
        self._misses.pop(peer_id, None)
        self._leader_failures.pop(peer_id, None)
        self._heard.pop(peer_id, None)
        self._mismatched.pop(peer_id, None)

    def rejected(self, header: ReduceHeader | None, error: RoundError) -> None:
        """An owner left a part out of the average (counted, logged; the round goes on)."""
        self.rejected_part(header.peer_id if header else "unknown peer", error, header.round if header else -1)

    def rejected_part(self, peer_id: str, error: RoundError, rnd: int = -1) -> None:
        self._metrics.rejected.labels(error.reason).inc()
        log.warning("round %d: left out the part from %s: %s (%s)", rnd, peer_id, error, error.reason)

    def _traffic(self, codec: str, sent: int, received: int) -> None:
        self._metrics.sent_bytes.labels(codec).inc(sent)
        self._metrics.received_bytes.labels(codec).inc(received)
        self.progress.bytes_sent += sent
        self.progress.bytes_received += received

    async def close(self) -> None:
        await self._tasks.cancel_all()
        self.matchmaker.close()
        self.answers.close()

    # ----------------------------------------------------------------- the loop

    async def run(self) -> None:
        """Inner phase, round, inner phase, round, ... until stopped or ``rounds`` completed.

        With ``overlap`` on, the round of one inner phase's delta runs while the next inner phase
        trains (a one-step-delayed outer update, as in Streaming DiLoCo's overlapping
        communication): each phase starts from the newest global parameters plus this peer's
        own progress of the previous phase, and sends its own progress as its delta. The global
        parameters are still changed only by averaged deltas, identically on every member.
        """
        await self._startup_wait()
        await self._evaluate()
        log.info("initial eval loss %.4f at round %d%s", self.progress.eval.get("loss", math.nan),
                 self._store.state.round, " (overlapping rounds with inner phases)" if self._cfg.sync.overlap else "")
        start = await self._start_point()
        pending: asyncio.Task | None = None
        try:
            while not self._stopping:
                rounds = self._cfg.run.rounds
                if rounds and self.progress.completed + (self._unconfirmed is not None) >= rounds:
                    # The last round counts once its leader confirmed it (it may fail yet).
                    if pending is None and not await self.settle():
                        start = await self._start_point()
                        continue
                    if self.progress.completed >= rounds:
                        log.info("completed %d rounds; stopping", self.progress.completed)
                        return
                if pending is None and (ahead := self._resync_round()) is not None:
                    await self.settle()
                    await self.resync(ahead, self._cfg.timeouts.state_transfer_timeout_s)
                    start = await self._start_point()
                    continue
                rnd = self._store.state.round
                await self._hook("inner", rnd)
                # With a round in flight (overlap), this phase's delta goes to the round after it,
                # and so does its place in the inner learning-rate schedule.
                inner = await self._inner_phase(rnd + 1 if pending is not None else rnd, start)
                if inner is None:
                    return
                delta, weight = inner
                if pending is not None:
                    await pending  # the previous delta's round, which ran while this phase trained
                    pending = None
                if not self._cfg.sync.overlap:
                    await self.round(delta, weight)
                    start = await self._start_point()
                    continue
                # Re-base this phase's progress onto the newest global parameters.
                start = self._store.state.params - delta.to(self._store.state.params.device)
                pending = self._tasks.spawn(self.round(delta, weight), "round")
        finally:
            grace_s = self._cfg.timeouts.finish_round_grace_s
            if pending is not None and not pending.done():
                # Stopping: give the round in flight its bounded time.
                await asyncio.wait({pending}, timeout=grace_s)
            if self._unconfirmed is not None:
                # And the last round's confirmation (whose failure rolls the state back).
                await asyncio.wait({self._tasks.spawn(self.settle(), "settle-at-stop")}, timeout=grace_s)

    async def _start_point(self) -> torch.Tensor:
        """The parameters the next inner phase starts from: the current global state's, on the
        training device when a mirror holds them there (the host's otherwise)."""
        state = self._store.state
        if self._mirror is None or not self._mirror.enabled:
            return state.params
        return await offload(self._executor, state.params.numel(), self._mirror.start, state, on_device=True)

    async def _startup_wait(self) -> None:
        """Give discovery a moment so that a peer joining a running swarm fetches its state
        before it trains, instead of training alone."""
        grace = self._cfg.sync.startup_grace_s
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._stopping:
            if self._members.settled() and time.monotonic() > deadline - grace / 2:
                break
            await asyncio.sleep(0.1)
        if (ahead := self._ahead()) > self._store.state.round:
            await self.resync(ahead, self._cfg.timeouts.state_transfer_timeout_s)

    async def _inner_phase(self, rnd: int, start: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """H inner steps from ``start``; return (delta, weight), or None when stopping. A NaN/Inf
        phase yields a zero delta of weight 0 (withheld, counted, logged)."""
        self.progress.phase = "inner"
        t0 = time.monotonic()
        result = await self._inner.run(rnd, start, lambda: self._stopping)
        self._metrics.round_phase_seconds.labels("inner").observe(time.monotonic() - t0)
        if self._stopping or result is None:
            return None
        self.progress.samples += result.samples
        self._metrics.samples.inc(result.samples)
        delta, weight = result.delta, float(result.samples)
        if result.nonfinite or not all_finite(delta):
            self._metrics.nonfinite.inc()
            log.error("round %d: inner phase produced NaN/Inf; withholding this peer's delta", rnd)
            return torch.zeros_like(delta), 0.0
        self.progress.loss = result.mean_loss
        self._metrics.train_loss.set(result.mean_loss)
        self._metrics.inner_lr.set(getattr(result, "lr", math.nan))
        return delta, weight

    async def _evaluate(self) -> None:
        self.progress.eval = dict(await self._inner.evaluate(self._store.state.params))
        self._metrics.eval_loss.set(self.progress.eval.get("loss", math.nan))
        if "accuracy" in self.progress.eval:
            self._metrics.eval_accuracy.set(self.progress.eval["accuracy"])

    # ----------------------------------------------------------------- one round

    def _reduce_deadline(self) -> float:
        deadline = self.deadlines.reduce_deadline()
        self._metrics.round_deadline_seconds.set(deadline)
        return deadline

    async def form_group(self, rnd: int, weight: float, offer: bytes = b"") -> Group | JoinReply:
        """Follower and leader side: join round ``rnd`` through its leader (``leader_for`` over
        the live members not under suspicion; the next one when it does not answer); return the
        group, or why there is none. ``offer``: this peer's encoded delta, for a pair that swaps
        (``peer.sync.round.swaps``); the partner's, where the reply carried it, is kept for the
        round (``_relayed``)."""
        req = JoinRequest(run_id=self._run_id, peer_id=self._me, round=rnd,
                          global_hash=self._store.state.global_hash, weight=weight, address=self._address(),
                          swap_delta=offer)
        self._relayed = ("", b"")
        # The leader answers within its own matchmaking timeout, which adapts to what it has
        # seen (not what we have): wait for the configured cap, plus a margin for the network.
        timeout = self._cfg.sync.matchmaking_timeout_s + 2.0
        deadline = time.monotonic() + timeout
        unreachable: set[str] = set()
        hint: tuple[str, str] | None = None
        while time.monotonic() < deadline and not self._stopping:
            live = {pid: a for pid, a in self._candidates().items() if pid not in unreachable}
            if hint is not None and hint[0] not in unreachable:
                # A hint names a leader; where it listens is what our membership knows (a
                # handshake proved it), not what the hinting peer says.
                leader = hint[0]
                address = self._members.live().get(leader, hint[1])
            else:
                leader = leader_for(rnd, [self._me, *live])
                address = live.get(leader, "")
            hint = None
            if leader == self._me:
                reply = await self.matchmaker.join(req)
            else:
                # Joins this peer took for the round as its leader (before its view changed) go there
                # too; only to a member, at the address this peer's own handshake proved (a hint's
                # address is another peer's word, not passed on in this peer's name).
                if (proved := self._members.live().get(leader)) is not None:
                    self.matchmaker.redirect(rnd, leader, proved)
                try:
                    reply = await self._client.join_round(address, req, max(0.1, deadline - time.monotonic()))
                except (PeerUnavailable, RoundError) as exc:
                    log.warning("round %d: leader %s did not answer (%s); trying the next", rnd, leader, exc)
                    unreachable.add(leader)
                    if isinstance(exc, PeerUnavailable) and exc.code == "UNAVAILABLE":
                        # Nothing listens there: it is gone. Discovery re-admits it if it returns.
                        self._members.drop(leader, "its address refuses connections")
                    continue
            self._group_leader = leader
            if reply.outcome == JoinOutcome.GROUP and reply.group is not None:
                checked = self._checked(reply.group, rnd)
                if isinstance(checked, JoinReply):
                    # A lie gets its leader skipped at once; a group naming a peer we have not
                    # met yet counts as one failed round of an honest leader.
                    self._leader_outcome(leader, False, "bad_group" if checked.leader_round == rnd else "")
                elif reply.swap_delta:
                    self._relayed = (checked.group_id, reply.swap_delta)
                return checked
            if reply.outcome == JoinOutcome.NOT_LEADER and "@" in reply.leader_hint:
                pid, _, addr = reply.leader_hint.partition("@")
                if pid != leader and pid not in unreachable and not self._suspected(pid):
                    if not self._members.is_member(pid):
                        # A leader we have not met: meet it first (its group must name only
                        # members we know), then ask it. The loop's deadline bounds this.
                        self._members.introduce(addr, pid)
                        await asyncio.sleep(0.3)
                    hint = (pid, addr)
                    continue
                # It still believes in a leader we found gone; its heartbeat will notice soon.
                await asyncio.sleep(0.2)
                continue
            if reply.outcome == JoinOutcome.REFUSED and reply.message.startswith("leaving"):
                self._members.drop(leader, "it is leaving")
                continue
            if reply.outcome == JoinOutcome.REFUSED and leader != self._me and not self._stopping:
                # It does not know us yet (we just met, or a partition healed): introduce
                # ourselves, then ask again. The loop's deadline bounds this.
                self._members.introduce(address, leader)
                await asyncio.sleep(0.3)
                continue
            return reply
        return JoinReply(JoinOutcome.TOO_LATE, f"no group formed for round {rnd} within {timeout:.1f} s")

    def _checked(self, group: Group, rnd: int) -> Group | JoinReply:
        """The leader's group if it holds (``check_group``), with each member's address as this
        peer knows it (a leader cannot redirect our parts); else why not, counted."""
        try:
            check_group(group, me=self._me, round=rnd, codec=self._cfg.sync.codec, numel=self._store.numel,
                        max_deadline_s=self._cfg.sync.reduce_deadline_s, is_member=self._members.is_member)
        except RoundError as exc:
            self._invalid(exc.reason, str(exc))
            # leader_round: where the rest of the group may be now. A bad group is refused by
            # every honest member it reaches, so nobody completes the round without us; one that
            # names a peer we have not met may complete without us (resync to catch up).
            return JoinReply(JoinOutcome.REFUSED, str(exc), leader_round=rnd if exc.reason == "bad_group" else rnd + 1)
        live = self._members.live()
        members = tuple(replace(m, address=self._address() if m.peer_id == self._me else live[m.peer_id])
                        for m in group.members)
        return replace(group, members=members)

    def _suspected(self, peer_id: str) -> bool:
        return self._suspects.get(peer_id, 0.0) > time.monotonic()

    def _candidates(self) -> dict[str, str]:
        """The live members that may lead (and that a leader waits for): not under suspicion
        and not left out for missing deadlines."""
        return {pid: a for pid, a in self._members.live().items()
                if not self._suspected(pid) and not self._is_excluded(pid)}

    def _waitable(self) -> dict[str, str]:
        """The live members a group waits for: all but those left out for missing deadlines (a
        leader skipped for failing still trains, and a lagging one must be able to catch up)."""
        return {pid: a for pid, a in self._members.live().items() if not self._is_excluded(pid)}

    def _stalled_before(self, peer_id: str, rnd: int) -> bool:
        """Whether ``peer_id`` is stuck behind round ``rnd``: it reported (heartbeat) a round two
        or more before ``rnd`` and has not joined a round here or sent this peer a part for three
        heartbeat intervals. A group need not wait for it: it must resync before it can join.
        (Heartbeat rounds lag with fast rounds, hence the second condition.)"""
        quiet_s = 3 * self._cfg.timeouts.heartbeat_interval_s
        return (self._members.round_of(peer_id) < rnd - 1
                and time.monotonic() - self._heard.get(peer_id, 0.0) > quiet_s)

    def _is_excluded(self, peer_id: str) -> bool:
        return self._excluded.get(peer_id, 0.0) > time.monotonic()

    def _delivery(self, delivered: list[str], missing: list[str]) -> None:
        """As an owner: who sent its part by the cut-off. A member of our groups that missed it
        in ``exclude_after_misses`` rounds in a row is left out of the groups this peer leads
        (and of its leader choice) for ``exclude_backoff_s``, so one stalled peer does not make
        every round wait. (Missing a leader's matchmaking timeout does not count: a peer that
        joins late, restarts or resyncs does that honestly.)"""
        now = time.monotonic()
        for pid in delivered:
            self._misses.pop(pid, None)
            self._heard[pid] = now
        for pid in missing:
            if pid == self._me:
                continue
            misses = self._misses[pid] = self._misses.get(pid, 0) + 1
            if misses >= self._cfg.sync.exclude_after_misses:
                self._misses.pop(pid, None)
                self._exclude(pid, "missed_deadline", f"its part missed the deadline in {misses} rounds in a row")

    def _leader_outcome(self, leader: str, ok: bool, why: str = "") -> None:
        """Count a leader's failed rounds; ``leader_failure_limit`` in a row (or one bad group)
        and it is skipped for ``leader_backoff_s``. Honest members see the same failures, so
        they skip the same leader and agree on the next one."""
        if ok or leader == self._me:
            self._leader_failures.pop(leader, None)
            return
        failures = self._leader_failures[leader] = self._leader_failures.get(leader, 0) + 1
        if why == "bad_group" or failures >= self._cfg.sync.leader_failure_limit:
            self._leader_failures.pop(leader, None)
            self._suspects[leader] = time.monotonic() + self._cfg.timeouts.leader_backoff_s
            self._metrics.excluded.labels("failing_leader").inc()
            log.warning("skipping %s as leader for %.0f s: %s", leader, self._cfg.timeouts.leader_backoff_s,
                        why or f"{failures} of its rounds failed in a row")

    async def _confirm(self, group: Group, digests: list[str], leader: str) -> bool:
        """Ask the group's leader whether the answers this peer received (their digests) are the
        ones the group's majority received (``peer.sync.confirm``); False when they are not. A
        leader that cannot say (gone, too slow) does not fail the round: the next round's hash
        check still catches a member that applied something else. Bounded by the group's
        all-reduce deadline + 2 s; a background task when the round confirms late (``settle``)."""
        req = JoinRequest(run_id=self._run_id, peer_id=self._me, round=group.round,
                          global_hash=self._store.state.global_hash, weight=0.0, address=self._address(),
                          confirm_group=group.group_id, answer_digests=tuple(digests))
        if leader == self._me:
            reply = await self.answers.confirm(req)
        else:
            address = self._members.live().get(leader)
            if address is None:
                log.warning("round %d: leader %s is gone; applying the answers unconfirmed", group.round, leader)
                return True
            try:
                reply = await self._client.join_round(address, req, group.reduce_deadline_s + 2.0)
            except (PeerUnavailable, RoundError) as exc:
                log.warning("round %d: leader %s did not confirm the answers (%s); applying them", group.round,
                            leader, exc)
                return True
        if reply.outcome == JoinOutcome.ANSWERS_DIFFER:
            self._invalid("owner_mismatch", reply.message)
            return False
        if reply.outcome != JoinOutcome.CONFIRMED:
            log.warning("round %d: leader %s did not confirm the answers (%s); applying them", group.round, leader,
                        reply.message)
        return True

    def _answers_differ(self, group: Group, owners: list[str], members: list[str]) -> None:
        """As leader: owners of ``group`` answered its members differently (detected, counted)."""
        self._metrics.invalid_claims.labels("owner_mismatch").inc()
        log.warning("round %d group %s: owners answered members differently (owners whose answers differ: %s; "
                    "members outside the majority, whose round fails: %s)", group.round, group.group_id,
                    ", ".join(owners) or "-", ", ".join(members) or "-")
        # One mismatch does not say who lied (a member may misreport what it received), but an
        # owner whose answers differed for two different members is the common factor: it is
        # left out of the groups this peer leads for a while.
        for owner in owners:
            victims = self._mismatched.setdefault(owner, set())
            victims.update(m for m in members if m != owner)
            if len(victims) >= 2 and not self._is_excluded(owner):
                self._mismatched.pop(owner, None)
                self._exclude(owner, "owner_mismatch", f"its answers differed for members {', '.join(sorted(victims))}")

    def _exclude(self, peer_id: str, reason: str, why: str) -> None:
        """Leave ``peer_id`` out of the groups this peer leads, and of its leader choice, for
        ``exclude_backoff_s`` (counted by ``reason``)."""
        if peer_id == self._me:
            return
        self._excluded[peer_id] = time.monotonic() + self._cfg.timeouts.exclude_backoff_s
        self._metrics.excluded.labels(reason).inc()
        log.warning("leaving %s out of groups for %.0f s: %s", peer_id, self._cfg.timeouts.exclude_backoff_s, why)

    def _invalid(self, reason: str, message: str) -> None:
        self._metrics.invalid_claims.labels(reason).inc()
        log.warning("refused what a peer claimed (%s): %s", reason, message)

    async def round(self, delta: torch.Tensor, weight: float) -> Averaged | None:
        """One round from an already computed delta (benchmarks drive it this way too); return
        the averaged delta that was applied (kept encoded: ``Averaged.tensor()`` decodes it), or
        None if the round failed here. The round takes ``delta`` over: with error feedback its
        memory is reused and its values are gone after the call (``Reducer.run``)."""
        previous = self._unconfirmed
        if previous is not None and previous.confirm.done() and not await self._settle_round(previous):
            # (the usual case: the confirmation came back while this peer trained)
            return None
        base = self._store.state  # the state this round's delta was trained from
        rnd = base.round
        t0 = time.monotonic()
        self.progress.phase = "matchmaking"
        await self._hook("join", rnd)
        # Expecting a pair that swaps (one other live peer, a small model): the delta goes with
        # the join, encoded already, and the partner's may come back with the group.
        offer = await self.reducer.offer(delta, self._cfg.sync.codec) \
            if self._store.numel <= PAIR_SWAP_NUMEL and len(self._members.live()) == 1 else None
        formed = await self.form_group(rnd, weight, offer.payload if offer is not None else b"")
        if previous is not None and not await self._settle_round(previous):
            # This round started from answers the previous group's majority did not receive; the
            # state is back to the one before them. A group that formed with us goes on without
            # us: a member holding the same state received the same answers and is told the same.
            self._fail(rnd, "answers_differ", f"it started from round {previous.rnd}'s answers, which were not "
                       "the group's majority's")
            return None
        t1 = time.monotonic()
        self._metrics.round_phase_seconds.labels("matchmaking").observe(t1 - t0)
        if isinstance(formed, JoinReply):
            self._fail(rnd, "no_group", formed.message)
            if formed.outcome == JoinOutcome.WRONG_ROUND:
                target = formed.leader_round
                if target < rnd:
                    # The leader is behind and does not match our round yet: give it a moment
                    # instead of asking again at once.
                    await asyncio.sleep(min(1.0, self.deadlines.matchmaking_timeout()))
            elif formed.outcome == JoinOutcome.REFUSED and formed.leader_round == rnd:
                # We refused the leader's group as a lie: no group completes this round without
                # us that we must wait for (a member told otherwise catches up when the next
                # leader says the round is over).
                target = rnd
            else:
                target = max(formed.leader_round, rnd + 1)
            if target > rnd:
                await self.resync(target, self.deadlines.reduce_deadline() + self._cfg.sync.matchmaking_timeout_s)
            return None
        group = formed
        self._metrics.group_size.set(len(group.members))
        self._metrics.round_deadline_seconds.set(group.reduce_deadline_s)
        self.progress.phase = "reduce"
        leader = self._group_leader
        try:
            sent = delta.clone() if self._cfg.run.dump_dir else delta  # dump_round writes it afterwards
            relayed = self._relayed[1] if self._relayed[0] == group.group_id else b""
            self._relayed = ("", b"")
            avg, stats = await self.reducer.run(group, sent, weight, offer=offer, relayed=relayed)
            # Kept only for a mirror to apply (a byte a value with int8): let them go otherwise.
            answers, stats.answers = (stats.answers if self._mirror is not None else ()), ()
        except RoundError as exc:
            if not exc.culprits:  # a failure no one in particular was proved to cause
                self._leader_outcome(leader, False)
            self._fail(rnd, exc.reason, str(exc))
            if exc.reason == "answer_norm":
                self._invalid("answer_norm", str(exc))
                for owner in exc.culprits:
                    self._exclude(owner, "answer_norm", "its averaged shard was larger than any honest average")
            await self._catch_up(rnd)
            return None
        self._leader_outcome(leader, True)
        checked = compared(group)  # (a group of two or one has nothing to compare: peer.sync.confirm)
        late = checked and group.numel <= self._cfg.sync.confirm_late_max_numel
        if late:  # applied now, settled as soon as the leader answers, and by the next round at the latest
            confirm = self._tasks.spawn(self._confirm(group, stats.answer_digests, leader), f"confirm-{rnd}")
        elif checked and not await self._confirm(group, stats.answer_digests, leader):
            self._fail(rnd, "answers_differ", "the averaged shards this peer received differ from the group's; "
                       "keeping the previous state")
            await self._catch_up(rnd)
            return None
        t2 = time.monotonic()
        reduce_s = t2 - t1
        self._metrics.round_phase_seconds.labels("reduce").observe(reduce_s)
        self.deadlines.observe_reduce(reduce_s)
        self._traffic(group.codec, stats.sent_bytes, stats.received_bytes)
        if stats.encoded_bytes:
            self._metrics.compression_ratio.set(4 * group.numel / stats.encoded_bytes)
        loop = asyncio.get_running_loop()
        if self._cfg.run.dump_dir:
            await loop.run_in_executor(self._executor, dump_round, Path(self._cfg.run.dump_dir) / self._me, rnd,
                                       delta, weight, avg, group.codec)
        await self._hook("outer", rnd)
        if runs_inline(avg.numel()):  # the step runs on the loop (``_apply``): replies first
            await let_replies_out()
        self.progress.phase = "outer"
        now = self._store.state
        if now is not base:
            # Adopted meanwhile (the previous round's rollback and catch-up, late confirmation):
            # this group's average belongs on the state the round began from, not on that one.
            self._fail(rnd, "state_moved", f"this peer's state became round {now.round} "
                       f"({now.global_hash[:12]}) during round {rnd}; its average is not applied")
            return None
        state = await self._apply(base, avg, keep_before=late)
        if state is None:  # (a late confirmation goes on by itself: a mismatch it finds is still counted)
            self._fail(rnd, "nonfinite_outer", "the outer step gave NaN/Inf parameters; keeping the previous state")
            self._invalid("nonfinite_outer", f"round {rnd}: the averaged delta made the parameters non-finite")
            return None
        if self._mirror is not None and self._mirror.enabled:
            # The same answers and the same step on the training device; the host's state (just
            # adopted) stays the one hashed, served and saved, and checks the device's.
            await offload(self._executor, avg.numel(), self._mirror.advance, base, Answers(avg.codec.name, answers),
                          state, on_device=True)
            if not self._mirror.enabled:
                self._metrics.mirror_active.set(0)
                self._metrics.mirror_off.labels(self._mirror.off_reason).inc()
        self._metrics.round_phase_seconds.labels("outer").observe(time.monotonic() - t2)
        done = _Unconfirmed(rnd, group, confirm if late else None, base, state, time.monotonic() - t0, reduce_s,
                            stats.sent_bytes, self.progress.loss)
        if late:
            self._unconfirmed = done
            # Counted and logged once confirmed, while this peer trains on.
            done.settled = self._tasks.spawn(self._settle(done), f"settle-{rnd}")
        else:
            await self._completed(done)
        return avg

    async def _completed(self, u: _Unconfirmed) -> None:
        """Count, checkpoint, evaluate and log a round that is settled here."""
        p = self.progress
        p.completed += 1
        self._moved_at = time.monotonic()
        if len(u.group.members) > 1:
            self._together_at = self._moved_at
        self._metrics.rounds.labels("completed").inc()
        p.last_round_s = u.seconds
        self._store.maybe_checkpoint()
        every = self._cfg.train.eval_every_rounds
        if every and p.completed % every == 0:
            await self._evaluate()
        group = u.group
        log.info("round %d done: %d peers, %s, loss %.4f, eval %.4f, sent %d B, %.2f s (reduce %.2f s, deadline "
                 "%.1f s), group %s, global %s", u.rnd, len(group.members), group.codec, u.loss,
                 p.eval.get("loss", math.nan), u.sent_bytes, u.seconds, u.reduce_s, group.reduce_deadline_s,
                 group.group_id, u.after.global_hash[:12])

    async def settle(self) -> bool:
        """Wait for the leader's word on the last round applied here before it was confirmed
        (if any), then count it completed (``_completed``); False when the leader answered that
        the answers applied here are not the majority's: the round is counted failed, the state
        it started from is restored (unless a newer one was adopted since) and this peer
        resyncs to the round's result (``_catch_up``), as it does when it confirms before
        applying. Loop-only; concurrent callers share one settling.

        Why applying first is safe: until settled, the unconfirmed state is only this peer's. It
        is what its heartbeat reports and what its next inner phase starts from (that phase's
        delta is dropped if the round fails); it is not counted, nor checkpointed (but by a stop
        that outlasts the settling, ``run``), nor served: a donor serves the last settled state
        meanwhile (``StateStore.adopt(provisional=True)``). A joiner that took it (as a state a
        few rounds past the attested one, which ``resync`` accepts) was left holding a state
        nobody else had once its donor rolled back, and trained alone from it (a group of one by
        timeout), which split test_rogue's swarm for good. The next round settles the previous one before it sends
        any part (``round``: before its JoinRound when the confirmation is back, else once its
        group formed, which it then gives up on a failure). Its group could hold it only with
        the same state (the leader keeps the joiners whose hash is the majority's), which only
        members that received the same answers reach, and the leader of the previous round
        tells them all the same. Leaders rotate: the confirmation goes to the leader of the
        round it confirms, whoever leads the next. A leader that is gone or silent: the round is
        applied unconfirmed, as before."""
        u = self._unconfirmed
        return True if u is None else await self._settle_round(u)

    def _settle_round(self, u: _Unconfirmed) -> asyncio.Future[bool]:
        """The settling of ``u`` (started at the first call; a shield: a cancelled waiter does not
        stop it)."""
        if u.settled is None:
            u.settled = self._tasks.spawn(self._settle(u), f"settle-{u.rnd}")
        return asyncio.shield(u.settled)

    async def _settle(self, u: _Unconfirmed) -> bool:
        await asyncio.wait({u.confirm})
        confirmed = u.confirm.cancelled() or u.confirm.result()  # cancelled: closing; nothing was refuted
        if not confirmed:
            self._fail(u.rnd, "answers_differ", "the averaged shards this peer received differ from the group's; "
                       "back to the state before them")
            if self._store.state is u.after:
                self._store.adopt(u.before)
            try:
                await self._catch_up(u.rnd)
            finally:
                # Only now: a round that began meanwhile waits for this catch-up (``round``
                # settles ``_unconfirmed`` first) instead of starting from the rolled-back state
                # while a resync replaces it.
                if self._unconfirmed is u:
                    self._unconfirmed = None
            return False
        if self._unconfirmed is u:
            self._unconfirmed = None
        self._store.settle(u.after)
        await self._completed(u)
        return True

    async def _catch_up(self, rnd: int) -> None:
        """After round ``rnd`` failed here: peers that completed it show round rnd+1 at their next
        heartbeat, so fetch that state; if nobody did (a vanished owner fails the round for all),
        keep round ``rnd`` and go on."""
        t = self._cfg.timeouts
        if not await self.resync(rnd + 1, t.heartbeat_misses * t.heartbeat_interval_s + 1.0):
            log.warning("round %d abandoned: no peer completed it; continuing from round %d", rnd, rnd)

    async def _apply(self, before: GlobalState, avg: Averaged, keep_before: bool = False) -> GlobalState | None:
        """The outer step from ``before`` (the current state) with ``avg``, and its adopt: the
        new state, or None (nothing adopted) when it would be non-finite (loop).

        In place over ``before``'s tensors when the store says nothing pins them
        (``StateStore.begin_step``): no new memory, no page faults; fresh tensors otherwise. The
        adopt and ``end_step`` (pins are given again) happen when the executor thread is done
        writing, in that order, even if the awaiting round is cancelled meanwhile (a stop): the
        thread cannot be stopped half-way, and a step that ended without its adopt would leave
        the next round's bytes under this round's label. ``keep_before``: never in place (a
        late confirmation may roll back to ``before``)."""
        in_place = not keep_before and self._store.begin_step(before)

        def finish(state: GlobalState | None) -> GlobalState | None:
            try:
                if state is not None:
                    self._store.adopt(state, provisional=keep_before)
            finally:
                self._store.end_step()
            return state

        if runs_inline(avg.numel()):  # on the loop itself (see ``offload``): nothing can interrupt it
            try:
                state = self._outer(before, avg, in_place)
            except BaseException:
                self._store.end_step()
                raise
            return finish(state)
        job = asyncio.get_running_loop().run_in_executor(self._executor, self._outer, before, avg, in_place)

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None:
                self._store.end_step()
            else:
                finish(f.result())

        job.add_done_callback(done)  # runs before the awaiting task resumes (registered first)
        return await asyncio.shield(job)

    def _outer(self, s: GlobalState, avg: Averaged, in_place: bool = False) -> GlobalState | None:
        """The outer step (executor thread: keeps the loop free), hashed here, off the loop.
        None if it made the parameters or momentum non-finite: never adopted, served or saved.

        ``in_place``: the step may write over ``s``'s own tensors (nothing else reads them,
        ``StateStore.begin_step``). It does when the result is certain to be finite
        (``finite_bound``, from ``avg.magnitude``): a non-finite result could not be undone,
        and the previous state must then be kept. Otherwise, and when not ``in_place``, the new
        state gets fresh tensors (8 bytes a value) and ``s`` stays as it was. The same bits
        either way (``step_hashed_into``). In place, the new state's magnitude is that bound, not
        measured, unless it grew past ``REMEASURE_ABOVE``.

        It runs on the host even when the model is on a GPU: the new state's bytes must be on
        the host to be hashed, served and saved, so the step there costs no copy, where the step
        on the device would copy 8 bytes a value back. A mirror repeats it on the device
        (``peer.sync.mirror``), checked against this one. ``s``: the state of round ``s.round``
        the step starts from."""
        lr, momentum = self._settings.outer_lr, self._settings.outer_momentum
        s.global_hash  # noqa: B018 (cached before the bytes change: the mirror and logs name the old state by it)
        bound = finite_bound(s.magnitude, avg, lr=lr, momentum=momentum) if in_place else None
        if bound is not None:
            params, buf = s.params, s.momentum
        else:
            in_place = False
            params, buf = torch.empty_like(s.params), torch.empty_like(s.momentum)
        # One sweep: step, finiteness and the digest the next round's consistency check needs.
        measure = bound is None or bound > REMEASURE_ABOVE
        digest, size = step_hashed_into(s.params, avg, s.momentum, params, buf, lr=lr, momentum=momentum,
                                        param_numel=self._param_numel, int_slices=self._int_slices, measure=measure)
        if size is None:
            size = bound
        elif not math.isfinite(size):
            if in_place:  # finite_bound proved otherwise: a bug, and the old state is gone
                raise RuntimeError(f"round {s.round}: the in-place outer step gave non-finite values")
            return None
        return GlobalState(s.round + 1, params, buf).with_hash(digest, size)

    def _fail(self, rnd: int, reason: str, message: str) -> None:
        self.progress.failed += 1
        self._metrics.rounds.labels("failed").inc()
        log.warning("round %d failed (%s): %s", rnd, reason, message)

    # ----------------------------------------------------------------- resync

    def _target(self) -> tuple[Any | None, bool]:
        """The state to resync to, and whether it is a split's (``Members.split``) rather than
        the attested one. A split's only once this peer has made no progress (no round completed,
        no state adopted) for ``_split_patience_s``: it is one peer's word, taken only where the
        run would otherwise wait forever."""
        found = self._members.attested()
        if found is not None or time.monotonic() - self._moved_at < self._split_patience_s():
            return found, False
        found = self._members.split()
        return found, found is not None

    def _ahead(self) -> int:
        """The round of ``_target``'s state (-1 without one)."""
        found, _ = self._target()
        return -1 if found is None else found.round

    def _resync_round(self) -> int | None:
        """The round to resync to before the next inner phase, ``_target``'s (computed once):
        when it is later than this peer's, or when this peer is ahead of it only by rounds it
        trained alone (``_alone_ahead``); None otherwise."""
        found, _ = self._target()
        if found is None or not (found.round > self._store.state.round or self._alone_ahead(found)):
            return None
        return found.round

    def _alone_ahead(self, found: Any) -> bool:
        """Whether this peer holds a later round than ``found`` (``_target``'s state) only because
        it trained alone: its state is not that one, which two or more members report (so the
        attested state, never a split's), and it completed no round with another peer (nor
        adopted a state) for ``_split_patience_s``.

        A partition that left it on a side of its own: its groups of one went faster than the
        majority's rounds. When the link returned nothing moved it (``_ahead`` looks forward
        only), the majority's leaders refused its rounds as ahead of theirs, and the majority
        tried to resync to its round, which nobody attested: no round completed anywhere again.
        The documented rule (the state the majority of reachable members reports) takes it back
        to the majority's state, its later round notwithstanding. A peer that rounds with others
        is never moved back by this: its lead over the heartbeats' rounds is a report's lag."""
        if time.monotonic() - self._together_at < self._split_patience_s():
            return False
        state = self._store.state
        # (backed by two or more: one member's word, enough to move a peer forward, does not
        # take back the later rounds of a peer that went on alone while that member was away,
        # say restarting from an older checkpoint; it resyncs forward to this one instead)
        return len(found.donors) >= 2 and found.round < state.round and found.global_hash != state.global_hash

    def _split_patience_s(self) -> float:
        """How long a peer without progress waits before it follows a split (``_target``): as
        long as a leader waits before it forms a group of one (its matchmaking timeout three
        times, ``Matchmaker``), at the configured timeout."""
        return 3 * self._cfg.sync.matchmaking_timeout_s

    async def resync(self, min_round: int, wait_s: float) -> bool:
        """Fetch the state of a member at round >= ``min_round``; wait up to ``wait_s`` for one."""
        deadline = time.monotonic() + wait_s
        previous = self._store.state.round
        self.progress.phase = "resync"
        started = time.monotonic()
        timeout_s = self._cfg.timeouts.state_transfer_timeout_s
        while time.monotonic() < deadline and not self._stopping:
            # Only a state the majority attests: one member's claim (a round far ahead, a made-up
            # state whose hash matches its own claim) moves nobody, but a split's (``_target``).
            target, split = self._target()
            for donor, address in target.donors if target is not None and target.round >= min_round else ():
                fetch_t0 = time.monotonic()
                try:
                    header, blob = await self._client.get_state(address, self._run_id, self._me,
                                                                self._schema_hash, timeout_s)
                    state = await self._store.async_decode(blob, header)
                except (PeerError, StateError) as exc:
                    self._metrics.state_transfers.labels("received", "failed").inc()
                    if isinstance(exc, StateError):  # bytes that arrived whole but do not hold
                        self._invalid("bad_state", f"{donor} served a state that fails its checks: {exc}")
                    log.warning("state transfer from %s failed: %s", donor, exc)
                    continue
                # The attested state, or a later one of the same donor (small models finish many
                # rounds between a heartbeat and the download), at most ATTESTED_LEAD_ROUNDS ahead:
                # a later state that was forged shows at the next group formation, where the
                # leader's majority-hash check sends this peer to resync again.
                exact = (state.round, state.global_hash) == (target.round, target.global_hash)
                if not exact and not target.round < state.round <= target.round + ATTESTED_LEAD_ROUNDS:
                    self._invalid("unattested_state", f"{donor} served round {state.round} "
                                  f"({state.global_hash[:12]}), not the attested round {target.round} "
                                  f"({target.global_hash[:12]}) or one shortly after it")
                    continue
                self._metrics.state_transfers.labels("received", "ok").inc()
                if split:
                    self._metrics.split_adoptions.inc()
                self._store.adopt(state)
                self._moved_at = self._together_at = time.monotonic()
                self.reducer.reset_feedback()
                now = time.monotonic()
                self._metrics.round_phase_seconds.labels("resync").observe(now - started)  # (waits included)
                log.info("resynced to round %d (%s) from %s: %d bytes in %.2f s (%.1f MB/s); was at round %d "
                         "(rule: %s)", state.round, state.global_hash[:12], donor, len(blob), now - fetch_t0,
                         len(blob) / max(now - fetch_t0, 1e-9) / 1e6, previous,
                         f"no two peers share a state and this one made no progress for {self._split_patience_s():.0f}"
                         " s: the highest round's" if split else
                         "the state the majority of reachable members reports; at equal rounds, the group's majority"
                         + ("; this peer's later round was its own, trained alone" if state.round < previous else ""))
                if not self._cfg.sync.overlap:
                    # The reported eval is of the state held now (buffers included). With overlap
                    # an inner phase holds the trainer thread: the next round's eval covers it.
                    await self._evaluate()
                return True
            await asyncio.sleep(0.2)
        return False


def dump_round(out: Path, rnd: int, delta: torch.Tensor, weight: float, avg: Averaged, codec: str) -> None:
    """Diagnostics (``dump_dir``): this peer's delta and the applied average as .npy files."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"round{rnd:05d}-delta.npy", delta.cpu().numpy())
    np.save(out / f"round{rnd:05d}-avg.npy", avg.tensor().numpy())
    (out / f"round{rnd:05d}.json").write_text(json.dumps({"round": rnd, "weight": weight, "codec": codec}))
