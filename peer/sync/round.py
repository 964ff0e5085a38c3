"""The round state machine: group formation, butterfly all-reduce, failures as data.

Async, loop-only code. It talks to other peers only through the ``PeerClient`` protocol (the
transport implements it; tests may implement it in memory) and never imports grpc.

Group formation (no coordinator): the leader of round r is the live peer (itself included)
with the smallest sha256(r, peer id) (``leader_for``): every member computes the same, and the
role rotates from round to round, so no id leads forever (ids come from keys; a low one could be
ground for, a low hash for every round cannot). A peer that finished its inner phase sends ``JoinRound`` to
its leader (or joins locally when it leads). The leader forms the group when every live peer it
knows has joined, or ``matchmaking_timeout_s`` after the first join, whichever comes first. The
group keeps the joiners whose ``(round, global_hash)`` agree with the majority (ties: the
leader's own hash, then the smallest); the others are told to resync. A follower whose leader
does not answer tries the next one by the same order; a leader whose groups fail is skipped for a
while (``RoundDriver``).

Butterfly all-reduce: the flat delta is cut into one contiguous shard per member (sorted by peer
id). Each member encodes every other member's shard of its own delta (with error feedback), one
shard at a time, and streams shard j to owner j as soon as it is encoded (the wire carries one
shard while the codec works on the next; the transport sends a shard that fits one chunk in one
message); its own part of its own shard it averages as it is, exact (a device delta's is encoded
too). The owner checks each part as it arrives (its size, and its scales where the codec has
them, which bound its values: finite without a pass over them; others are decoded piece by piece
there: finite values, their norm), and averages what arrived by its cut-off (weighted by
samples; each part's norm measured in the same pass, and the mean taken again without a part
whose norm is an outlier), encodes the average once and answers every stream with the same bytes;
everyone, the owner included, applies ``decode(those bytes)``. So all members that complete the
round apply the same averaged delta, bit for bit, whatever the codec.

A pair swaps (``swaps``: a group of two, at most ``PAIR_SWAP_NUMEL`` values): each member sends
the other its whole encoded delta, offered with its join where it expected the pair (the leader
of the pair answers with its own, ``Matchmaker._relayed``), and both compute the same mean of the
two payloads (``pair_mean``). One exchange, no owner, no answer; the copies below do not apply
to it (its deltas and its mean are at most a few MB).

Where the round's copies live, and why (bytes per model parameter, N parameters, K members,
int8; ``bench.memory`` measures the whole: K=2, error feedback on, ~23 B/param at its peak):

| copy | B/param | lives | why |
|---|---|---|---|
| training model (the trainer's) | 4 | always | the inner phase trains it |
| global state: parameters, momentum | 8 | always | ``StateStore``; the step writes over it |
| the delta, given to the round | 4 | until the round ends | with error feedback it holds the corrected delta, then the next residual (``ErrorFeedback.corrected_in_place``): no separate corrected tensor |
| error-feedback residual | 4 | always (error feedback on) | changed only by a completed round (``commit`` copies the delta's memory into it): a failed round leaves it as it was |
| this member's encoded shards | (K-1)/K | until every stream is over | the wire reads them in place; its own part of its own shard is the delta's slice |
| an owner's parts, encoded | (K-1) x 1/K | until averaged | checked on arrival (no decoded part; the robust rules decode them: 4/K x (K-1)) |
| an owner's mean | 0 | | decoded, averaged and encoded piece by piece (``weighted_mean_iter``, ``Codec.encode_pieces``) |
| an owner's answer, and its frames | 1/K + 1/K | until every member has it | then the shard leaves the registry (``OwnedShard.answered``), not at the deadline; the servicer keeps the frames only while streams send them |
| the answers, encoded (``Averaged``) | 1 | until the outer step is done | checked from their scales (finite, magnitude, norm within the member's limit; decoded piece by piece only when the scales cannot show that); the outer step decodes them again chunk by chunk: no full-size averaged delta (``tensor()`` makes one for diagnostics) |
| next state (fresh) | 0 or 8 | while a donor or checkpoint pins the current one | the step writes in place otherwise (``StateStore``) |

Buffers of 8 MB or more are their own memory maps (``peer.daemon.large_buffers_to_os``): freed,
they leave the resident set, where glibc's heaps would keep them between rounds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
import uuid
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Protocol

PhaseHook = Callable[[str, int], Awaitable[None]]
"""``await hook(phase, round)`` at the named points of a round (a seam for fault injection)."""


async def no_hook(phase: str, rnd: int) -> None:
    """The default phase hook: nothing happens."""

import numpy as np
import torch

from peer.codec import Codec, ErrorFeedback, all_finite, get_codec
from peer.errors import CodecError, PeerUnavailable, RoundError
from peer.sync.aggregate import aggregate, cap_weights, l2_norm, outliers_by_norm, square_sum, weighted_mean_iter
from peer.sync.confirm import answer_digest, compared
from peer.sync.outer import magnitude
from peer.types import Group, JoinOutcome, JoinReply, JoinRequest, Member, ReduceHeader, StateHeader

log = logging.getLogger(__name__)


INLINE_NUMEL = 1 << 20
"""Codec, averaging and outer-step work on at most this many values runs on the loop itself (at
most a few milliseconds: int8 encodes or decodes ~1 GB/s a thread here, and the outer step sweeps
~17 bytes a value). Handing it to the executor costs a thread hand-off, a wake-up each way and
the GIL's hand-back, which with every core busy cost more than the work: a round of the
9.6k-parameter digits model made five such hops per peer. Measured with 32Ki values as the line
(bench/README.md "fifth pass", in turn on two cores): a K=2 round of 203,530 values (fashion) took
4.4-5.8 ms inline against 6.6-8.2 ms; of 1M values 11.3-11.9 ms against 15.1-15.5 ms; K=4 at 1M
42-43 ms against 48-50 ms. Larger work keeps the loop free for the network.

Work on a device (a GPU's kernels, copies and the waits for them) keeps the line of 32Ki values
it had (``DEVICE_INLINE_NUMEL``): its time is mostly waiting, which the loop would sit through."""

DEVICE_INLINE_NUMEL = 1 << 15
"""``INLINE_NUMEL`` for work on a device (``runs_inline(numel, on_device=True)``)."""


HOST_NUMEL = 1 << 15
"""A delta on another device (a GPU) of at most this many values is reduced on the host:
copied over whole (128 KiB at most) in one transfer, where encoding its shards on the device
launches a dozen kernels and waits for the device several times per shard. On an H200 shared by
two peers that was most of a digits round's reduce phase (26-35 ms; bench/README.md "GPU
check"). The same bytes either way (the codecs' host and device paths are byte-identical)."""


def runs_inline(numel: int, on_device: bool = False) -> bool:
    """Whether work on ``numel`` values runs on the loop itself (``INLINE_NUMEL``, or
    ``DEVICE_INLINE_NUMEL`` for work on a device) rather than on an executor: ``offload``'s
    choice, which the round's other inline paths must make alike."""
    return numel <= (DEVICE_INLINE_NUMEL if on_device else INLINE_NUMEL)


async def offload(executor: Executor, numel: int, fn: Callable, *args, on_device: bool = False):
    """``fn(*args)`` on ``executor``, or inline when it works on at most ``INLINE_NUMEL`` values
    (``DEVICE_INLINE_NUMEL`` when ``on_device``: it works on a GPU's tensors)."""
    if runs_inline(numel, on_device):
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


async def let_replies_out() -> None:
    """Before CPU work on the loop (a small model's outer step runs inline): let the tasks that
    are ready run first (a reply this peer owes another, such as the confirmation its leader
    side just gave, is written by one), then give this CPU up once, to the gRPC thread that
    sends what they wrote (woken on this CPU, it otherwise waited for the work to end). On
    loopback with digits, a leader's confirmation took a p90 of 1.6-2.0 ms to reach the member
    without this, 0.7 ms with it (median 0.22 ms either way)."""
    await asyncio.sleep(0)
    if hasattr(os, "sched_yield"):
        os.sched_yield()


class PeerClient(Protocol):
    """What the round logic needs from the network. Every call is bounded by ``timeout_s``;
    failures to reach a peer raise ``PeerUnavailable``; a peer's refusal raises ``RoundError``.
    The transport frames payloads and fills in ``ReduceHeader.total_bytes`` and ``crc32``."""

    async def join_round(self, address: str, req: JoinRequest, timeout_s: float) -> JoinReply: ...

    async def reduce(
        self, address: str, header: ReduceHeader, payload: bytes, timeout_s: float
    ) -> tuple[ReduceHeader, bytes]: ...

    async def get_state(
        self, address: str, run_id: str, peer_id: str, schema_hash: str, timeout_s: float
    ) -> tuple[StateHeader, bytes]: ...


def leader_for(rnd: int, peer_ids: Iterable[str]) -> str:
    """The leader of round ``rnd`` among ``peer_ids``: the smallest sha256(round, id)."""
    return min(peer_ids, key=lambda pid: hashlib.sha256(f"{rnd}\x00{pid}".encode()).digest())


def shard_bounds(numel: int, k: int) -> list[tuple[int, int]]:
    """Split ``numel`` elements into ``k`` contiguous shards whose sizes differ by at most one."""
    base, extra = divmod(numel, k)
    bounds, start = [], 0
    for i in range(k):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


MAX_ROUND = (1 << 63) - 1
"""Rounds travel as uint64; anything past int64 is a lie (and would not fit a tensor or JSON int)."""


def check_group(group: Group, *, me: str, round: int, codec: str, numel: int, max_deadline_s: float,
                is_member: Callable[[str], bool]) -> None:
    """Validate a group a leader announced, where it arrives: the run's codec, our round and
    model size, a deadline within the configured cap, unique members (us among them) that this
    peer knows, shard bounds recomputed here from the member list, finite weights. Raises
    RoundError("bad_group") naming the first claim that does not hold, or
    RoundError("unknown_member") for a group naming peers this one has not met yet (not a lie:
    an honest leader may know a joiner first; the group may complete without this peer)."""
    def bad(why: str) -> RoundError:
        return RoundError("bad_group", f"group {group.group_id[:16]!r} from the leader: {why}")

    if not group.group_id or len(group.group_id) > 64:
        raise bad("no valid group id")
    if group.codec != codec:
        raise bad(f"codec {group.codec[:16]!r} is not the run's {codec!r}")
    if group.round != round or group.numel != numel:
        raise bad(f"round {group.round} / {group.numel} parameters; we are at round {round} with {numel}")
    if not (0 < group.reduce_deadline_s <= max_deadline_s):
        raise bad(f"deadline {group.reduce_deadline_s} s is outside (0, {max_deadline_s}]")
    ids = [m.peer_id for m in group.members]
    if not ids or len(set(ids)) != len(ids) or ids != sorted(ids):
        raise bad("members are not unique and sorted")
    if me not in ids:
        raise bad("this peer is not a member")
    bounds = shard_bounds(numel, len(ids))
    if [(m.shard_start, m.shard_end) for m in group.members] != bounds:
        raise bad("shard bounds differ from the ones computed here")
    if not all(m.weight >= 0 and m.weight < float("inf") for m in group.members):
        raise bad("a weight is not finite and >= 0")
    strangers = [pid for pid in ids if pid != me and not is_member(pid)]
    if strangers:
        raise RoundError("unknown_member", f"group {group.group_id[:16]!r} from the leader: members unknown here: "
                         f"{', '.join(s[:16] for s in strangers)}")


def answer_limit(own_part_norm: float, group_size: int, norm_outlier_factor: float) -> float | None:
    """The largest norm this member accepts for an owner's averaged shard, given the norm of
    its own part of that shard (None: it sent nothing to bound it with, a withheld delta).
    Every rule keeps a shard's average within sqrt(K) x the largest part it kept (the mean and
    centered clipping within that part itself), and owners keep parts within
    ``norm_outlier_factor`` x the median part norm; honest members' parts of one shard are of
    one order (the same model, the same optimizer), and 4x covers a lossy codec's error and
    error feedback. A gross lie (an answer scaled up) fails it; a subtle one is the robust
    rules' and the digest comparison's business."""
    if not own_part_norm > 0:
        return None
    return 4.0 * math.sqrt(group_size) * norm_outlier_factor * own_part_norm


PAIR_SWAP_NUMEL = 1 << 18
"""A group of two with at most this many values swaps whole deltas (``swaps``)."""


def swaps(group: Group) -> bool:
    """Whether ``group``'s members swap their whole encoded deltas instead of reducing shards:
    a group of two whose model has at most ``PAIR_SWAP_NUMEL`` values. Each member sends the other
    its whole delta and computes the same mean itself (``pair_mean``), so a round takes one
    message each way after the group forms instead of a part and then an answer: a small
    model's round is a few of those latencies and little else. The same bytes on the wire (each
    member sends N values either way, ``2(K-1)/K N`` with K=2), and no owner answers anyone, so
    no owner can lie about a mean. A function of the group alone, which both members validated
    alike: they agree on it without a word. (Above the line the owners' shards stay: a whole delta
    kept encoded beside the partner's would cost a byte a value or more, and a streamed part lets
    the owner's barrier overlap with the wire.)"""
    return len(group.members) == 2 and group.numel <= PAIR_SWAP_NUMEL


@dataclass
class SwapOffer:
    """A member's whole delta encoded before it joins a round it expects to swap (``swaps``),
    offered with its join (``JoinRequest.swap_delta``), and what error feedback keeps if the
    round takes it (``corrected``: the next residual, a tensor of its own; None without error
    feedback). The delta itself is left as it was, for a group that does not swap."""

    payload: bytes
    corrected: torch.Tensor | None


def encode_whole(codec: Codec, delta: torch.Tensor, ef: ErrorFeedback | None, *, keep_delta: bool) -> SwapOffer:
    """``delta`` encoded whole for a pair's swap (with error feedback when ``ef``), as bytes
    (protobuf takes nothing else; a codec may hand over the bytearray it wrote). ``keep_delta``:
    the corrected delta is a new tensor and ``delta`` stays as it is (an offer, for a group that
    may not swap); otherwise it is corrected in its own memory (``ErrorFeedback.corrected_in_place``).
    Raises CodecError for a delta the codec refuses (NaN/Inf). Any thread."""
    if ef is None:
        return SwapOffer(bytes(codec.encode(delta)), None)
    corrected = ef.corrected(delta) if keep_delta else ef.corrected_in_place(delta)
    return SwapOffer(bytes(ef.encode_shard(corrected, 0, delta.numel())), corrected)


def pair_mean(codec: Codec, payloads: list[bytes | bytearray], weights: list[float], numel: int) -> torch.Tensor:
    """The weighted mean of a pair's encoded deltas (in the group's member order), the same bits
    on every member and device: each decoded (exact, or one multiplication: int8), multiplied
    by its share ``w / sum(w)`` rounded to float32 once, and the two products added; single,
    correctly rounded float32 operations in numpy, which never fuses them (as the outer step,
    ``peer.sync.outer``). A part of weight 0 takes no part (weight 1 of 1: the other's values
    exactly); all weights 0 give zeros. Raises CodecError for a payload that does not decode to
    ``numel`` finite values.

    The group's weights are used as they are: with two members the median-based cap
    (``cap_weights``) cannot hold one member's claim below the other's anyway, and no robust rule
    (``Aggregation``) can tell which of two is honest. The pair's mean depends on nothing of
    either member's own settings, which is what lets both compute it."""
    out = torch.zeros(numel, dtype=torch.float32)
    total = float(sum(weights))
    if not total > 0:
        return out
    acc, first = out.numpy(), True
    for payload, w in zip(payloads, weights):
        if not w > 0:
            continue
        x = codec.decode(payload, numel).numpy()  # a fresh array: scratch from here on
        share = np.float32(w / total)
        if first:
            np.multiply(x, share, out=acc)
            first = False
        else:
            np.multiply(x, share, out=x)
            np.add(acc, x, out=acc)
    return out


class SwapShard:
    """This member's side of a pair's swap (``swaps``), registered as an owner's shard is: it takes
    the partner's whole delta where it arrives (the span ``[0, numel)``), checks it as an owner
    checks a part (a member of the group, its announced weight the group's, a payload that
    decodes to finite values), and answers the partner's call with nothing but success. Waits
    for it until ``cutoff_s``; then the round fails here (``received``'s error): a mean without
    the partner would differ from the one the partner may compute with us."""

    def __init__(self, group: Group, me: str, codec: Codec, cutoff_s: float,
                 on_delivered: Callable[[list[str], list[str]], None] = lambda delivered, missing: None) -> None:
        self.group = group
        self._me = me
        self._partner = next(m for m in group.members if m.peer_id != me)
        self._codec = codec
        self._on_delivered = on_delivered
        loop = asyncio.get_running_loop()
        self.received: asyncio.Future[bytes] = loop.create_future()  # the partner's payload
        self.result: asyncio.Future[tuple[bytes, int]] = loop.create_future()  # the reply to its call
        self._cutoff_s = cutoff_s
        self._cutoff_at = loop.time() + cutoff_s
        self._timer = loop.call_later(cutoff_s, self._cutoff)

    @property
    def span(self) -> tuple[int, int]:
        return 0, self.group.numel

    @property
    def numel(self) -> int:
        return self.group.numel

    async def add(self, peer_id: str, weight: float, payload: bytes | bytearray) -> None:
        """The partner's delta. Raises RoundError (with a metric reason) if it is refused; a
        refused delta (not a stranger's, not a repeat) also fails this member's round."""
        if peer_id != self._partner.peer_id:
            raise RoundError("not_member", f"{peer_id} is not this peer's partner in group {self.group.group_id}")
        if self.received.done():
            if self.received.exception() is not None:
                raise RoundError("late", f"the delta from {peer_id} arrived after the cut-off")
            raise RoundError("duplicate", f"{peer_id} already sent its delta")
        try:
            if not (weight >= 0 and weight < float("inf")) or weight != self._partner.weight:
                raise RoundError("bad_weight", f"{peer_id} announces weight {weight}; it joined the group with "
                                 f"{self._partner.weight}")
            if self._codec.value_bounds(payload, self.numel) is None:
                self._codec.decode(payload, self.numel)  # (its scales do not prove it finite: decoded once)
        except CodecError as exc:
            self._refuse(RoundError("corrupt", f"the delta from {peer_id} does not decode: {exc}"))
        except RoundError as exc:
            self._refuse(exc)
        self._timer.cancel()
        self.received.set_result(payload)
        self.result.set_result((b"", 2))
        self._on_delivered(sorted([self._me, peer_id]), [])

    def _refuse(self, error: RoundError) -> None:
        self._timer.cancel()
        self.received.set_exception(RoundError(error.reason, f"round {self.group.round}: {error}"))
        self.result.set_exception(error)
        raise error

    def answered(self, peer_id: str) -> bool:
        """The partner's call was answered: nobody else may send anything here."""
        return True

    def _cutoff(self) -> None:
        late_by = asyncio.get_running_loop().time() - self._cutoff_at
        stalled = late_by > max(0.05, 0.2 * self._cutoff_s)
        if self.received.done():
            return
        error = RoundError("shard_missing", f"round {self.group.round}: the delta of {self._partner.peer_id} did "
                           f"not arrive by the cut-off")
        self.received.set_exception(error)
        self.result.set_exception(error)
        self._on_delivered([self._me], [] if stalled else [self._partner.peer_id])

    def close(self) -> None:
        self._timer.cancel()
        for f in (self.received, self.result):
            if not f.done():
                f.set_exception(RoundError("closed", "round closed"))
            if not f.cancelled():
                f.exception()  # consumed: asyncio does not log "never retrieved" for abandoned rounds


@dataclass
class _Match:
    """The leader's bookkeeping for one round."""

    round: int
    joins: dict[str, JoinRequest] = field(default_factory=dict)
    formed: asyncio.Future | None = None
    timer: asyncio.Task | None = None
    first_join: float = 0.0
    formed_at: float = 0.0
    redirect: str = ""  # "peer@address" of the leader this peer itself joined the round at (``redirect``)


class Matchmaker:
    """Leader side of group formation. Loop-only.

    ``live`` returns the ids of the live peers of the run this peer knows (without itself);
    ``deadline_s`` returns the all-reduce deadline to announce with a group; ``excluded(id)``
    turns a member's join away. A leader behind the round it matches forms that round's group
    only at its matchmaking timeout, never early.
    """

    def __init__(
        self,
        *,
        peer_id: str,
        numel: int,
        codec: str,
        live: Callable[[], Mapping[str, str]],
        current_round: Callable[[], int],
        timeout_s: Callable[[], float],
        deadline_s: Callable[[], float],
        on_formed: Callable[[float, bool], None] | None = None,
        excluded: Callable[[str], bool] = lambda peer_id: False,
        leaders: Callable[[], Iterable[str]] | None = None,
        swarm_round: Callable[[], int] = lambda: -1,
        stalled_before: Callable[[str, int], bool] = lambda peer_id, rnd: False,
        on_group: Callable[[Group], None] = lambda group: None,
    ) -> None:
        self._on_group = on_group
        self._leaders = leaders
        self._swarm_round = swarm_round
        self._stalled_before = stalled_before
        self._excluded = excluded
        self._me = peer_id
        self._numel = numel
        self._codec = codec
        self._live = live
        self._current_round = current_round
        self._timeout_s = timeout_s
        self._deadline_s = deadline_s
        self._on_formed = on_formed or (lambda wait_s, complete: None)
        self._matches: dict[int, _Match] = {}

    def close(self) -> None:
        for m in self._matches.values():
            if m.timer is not None:
                m.timer.cancel()
            if m.formed is not None and not m.formed.done():
                m.formed.cancel()
        self._matches.clear()

    def peer_left(self, peer_id: str) -> None:
        """A peer left or died: groups being formed stop waiting for it."""
        for m in list(self._matches.values()):
            self._maybe_form(m)

    async def join(self, req: JoinRequest) -> JoinReply:
        live = self._live()
        # Who may lead (failing leaders skipped) is narrower than whom the group waits for.
        leader = leader_for(req.round, [self._me, *(live if self._leaders is None else self._leaders())])
        if leader != self._me:
            return JoinReply(JoinOutcome.NOT_LEADER, f"{leader} leads round {req.round}",
                             leader_hint=f"{leader}@{live[leader]}")
        if self._excluded(req.peer_id):
            return JoinReply(JoinOutcome.TOO_LATE, f"{req.peer_id} is left out of groups for a while: it missed the "
                             f"deadline in several rounds in a row")
        # A leader whose own training lags (a slow disk, a stalled trainer) still leads: it
        # matches rounds up to the one the majority of members attests, not only its own.
        current = max(self._current_round(), self._swarm_round())
        if req.round < current:
            return JoinReply(JoinOutcome.WRONG_ROUND,
                             f"round {req.round} is over; the leader is at round {current}", leader_round=current)
        if req.round > current + 1:
            # Bounded bookkeeping: a round far ahead of ours is not matched here (the leader
            # resyncs when its heartbeat sees members ahead; a liar gains nothing).
            return JoinReply(JoinOutcome.WRONG_ROUND, f"round {req.round} is ahead of the leader's round {current}",
                             leader_round=current)
        for old in [r for r in self._matches if r < current]:
            self._drop(old)
        m = self._matches.get(req.round)
        if m is not None and m.formed is not None and m.formed.done() and not m.formed.cancelled():
            # A group of this round formed, and its deadline has long passed (or one of its own
            # members asks again: members ask again only after giving the round up), yet peers
            # still ask for this round: nobody completed it (an owner vanished). Form it again.
            previous = m.formed.result()
            if (previous.member(req.peer_id) is not None
                    or time.monotonic() > m.formed_at + previous.reduce_deadline_s + 2.0):
                log.info("round %d: the previous group did not complete it; forming a new one", req.round)
                self._drop(req.round)
                m = None
        if m is None:
            m = self._matches[req.round] = _Match(round=req.round)
            m.formed = asyncio.get_running_loop().create_future()
        if m.formed.done():
            return JoinReply(JoinOutcome.TOO_LATE, f"the group of round {req.round} formed without {req.peer_id}")
        m.joins[req.peer_id] = req
        if m.timer is None:
            m.first_join = time.monotonic()
            m.timer = asyncio.create_task(self._form_after(m, self._timeout_s()), name=f"matchmaking-{req.round}")
        self._maybe_form(m)
        try:
            group: Group | None = await asyncio.shield(m.formed)
        except asyncio.CancelledError:
            # The joiner stopped waiting (its call timed out or was cancelled): it will not
            # learn of a group formed after this, so that group must not count on its part
            # (its owners would wait for a part that never comes and blame it for missing the
            # deadline: three such rounds and it is left out of every group this peer leads).
            if not m.formed.done() and m.joins.get(req.peer_id) is req:
                del m.joins[req.peer_id]
                if not m.joins and m.timer is not None:  # the next join starts the wait afresh
                    m.timer.cancel()
                    m.timer = None
            raise
        if group is None and m.redirect:
            leader_id = m.redirect.partition("@")[0]
            return JoinReply(JoinOutcome.NOT_LEADER, f"{leader_id} leads round {req.round}", leader_hint=m.redirect)
        if group is None:
            # The round was given up here while this peer waited (most members moved past it).
            current = max(self._current_round(), self._swarm_round())
            return JoinReply(JoinOutcome.WRONG_ROUND, f"round {req.round} is over; the leader is at round {current}",
                             leader_round=current)
        if group.member(req.peer_id) is not None:
            return JoinReply(JoinOutcome.GROUP, group=group, swap_delta=self._relayed(m, group, req.peer_id))
        if req.global_hash != group.global_hash:
            return JoinReply(JoinOutcome.HASH_MISMATCH,
                             f"round {req.round}: your parameters {req.global_hash[:12]} differ from the "
                             f"group's {group.global_hash[:12]}; resync", leader_round=group.round)
        return JoinReply(JoinOutcome.TOO_LATE, f"the group of round {req.round} formed without {req.peer_id}")

    def _relayed(self, m: _Match, group: Group, peer_id: str) -> bytes:
        """For member ``peer_id`` of a pair that swaps (``swaps``): the delta the other member
        offered with its join, when this leader is that other member and both offered one. Both
        replies are decided alike from the same joins, so either both members have the other's
        delta when the group forms, or neither does (and both send theirs on the Session
        stream). Nobody else's delta is ever passed on: a leader outside the pair relays nothing."""
        if not swaps(group) or group.member(self._me) is None:
            return b""
        other = next(x.peer_id for x in group.members if x.peer_id != peer_id)
        asking, offered = m.joins.get(peer_id), m.joins.get(other)
        if asking is None or offered is None or not asking.swap_delta or not offered.swap_delta:
            return b""
        return offered.swap_delta

    def redirect(self, rnd: int, leader: str, address: str) -> None:
        """This peer joins round ``rnd`` at ``leader``: its view of the members changed since it
        took the joins it holds for that round (a peer joined: the rotation moved). Those joiners
        are told to go there too (NOT_LEADER, with the hint), instead of waiting here for a
        leader that never joins its own round and then getting a group of one: a fork."""
        m = self._matches.get(rnd)
        if m is None or m.formed is None or m.formed.done() or not m.joins or self._me in m.joins:
            return
        m.redirect = f"{leader}@{address}"
        log.info("round %d: this peer joins it at %s; sending %s there", rnd, leader, ", ".join(sorted(m.joins)))
        self._drop(rnd)

    def _drop(self, rnd: int) -> None:
        """Forget round ``rnd``; peers still waiting for its group are told it is over."""
        m = self._matches.pop(rnd)
        if m.timer is not None:
            m.timer.cancel()
        if m.formed is not None and not m.formed.done():
            m.formed.set_result(None)

    async def _form_after(self, m: _Match, delay: float) -> None:
        await asyncio.sleep(delay)
        # A group of one while other live peers are known would fork the run (each side applies
        # only its own delta): give them up to two more timeouts to arrive. Peers that died are
        # dropped from the live set by the daemon's heartbeat in the meantime.
        for _ in range(2):
            expected = self._expected(m.round)
            if len(m.joins) > 1 or not expected - {self._me}:
                break
            # (the one join may be another peer's: this one may not have joined its own round yet)
            name = lambda p: "this peer" if p == self._me else p  # noqa: E731
            log.info("round %d: only %s joined so far; waiting %.1f s more for %s", m.round,
                     ", ".join(map(name, m.joins)) or "no one", delay,
                     ", ".join(map(name, sorted(expected - set(m.joins)))))
            await asyncio.sleep(delay)
        m.timer = None
        self._form(m)

    def _expected(self, rnd: int) -> set[str]:
        """Whom the group of round ``rnd`` waits for: the live peers, this one included, but
        not those stuck two or more rounds behind it (``stalled_before``; this one: by its own
        round): they must resync before they can join, and waiting for them would make every
        round wait for a stalled peer."""
        own = {self._me} if self._current_round() >= rnd - 1 else set()
        return own | {pid for pid in self._live() if not self._stalled_before(pid, rnd)}

    def _maybe_form(self, m: _Match) -> None:
        if m.formed is None or m.formed.done():
            return
        # A leader that is behind the round it matches (it just started or restarted from an
        # old checkpoint) may see part of the swarm: "everyone joined" could be a group of part
        # of it, which then forks from the rest. The timer forms it. (Its handshakes in flight
        # are no sign: a fresh peer's server answers joins before it has met anyone itself, and
        # the fork then left three peers at three states, none attested, none resyncing.)
        partial_view = self._current_round() < m.round - 1
        if self._expected(m.round) <= set(m.joins) and not partial_view:
            self._form(m, complete=True)

    def _form(self, m: _Match, complete: bool = False) -> None:
        if m.formed is None or m.formed.done() or not m.joins:
            return
        if complete and m.timer is not None:
            m.timer.cancel()
        tally = Tally(j.global_hash for j in m.joins.values())
        best = max(tally.values())
        winners = sorted(h for h, n in tally.items() if n == best)
        mine = m.joins.get(self._me)
        chosen = mine.global_hash if mine is not None and mine.global_hash in winners else winners[0]
        members = sorted((j for j in m.joins.values() if j.global_hash == chosen), key=lambda j: j.peer_id)
        bounds = shard_bounds(self._numel, len(members))
        group = Group(
            group_id=uuid.uuid4().hex[:16],
            round=m.round,
            global_hash=chosen,
            members=tuple(Member(j.peer_id, j.address, s, e, j.weight) for j, (s, e) in zip(members, bounds)),
            codec=self._codec,
            numel=self._numel,
            reduce_deadline_s=self._deadline_s(),
        )
        left_out = sorted(set(m.joins) - {x.peer_id for x in members})
        m.formed_at = time.monotonic()
        wait = m.formed_at - m.first_join
        missing = sorted(self._expected(m.round) - set(m.joins))
        log.info("round %d: group %s formed with %d peers after %.2f s%s%s", m.round, group.group_id,
                 len(members), wait, "" if complete else f" (matchmaking timeout; missing: {', '.join(missing)})",
                 f" (left out for hash mismatch: {', '.join(left_out)})" if left_out else "")
        self._on_formed(wait, complete)
        self._on_group(group)
        m.formed.set_result(group)


@dataclass(frozen=True)
class Aggregation:
    """How an owner combines the parts of its shard (``[sync]`` settings)."""

    rule: str = "mean"              # peer.sync.aggregate.AGGREGATIONS
    trim_fraction: float = 0.2      # trimmed_mean: share cut at each end, per coordinate
    weight_cap_factor: float = 4.0  # a weight counts at most this multiple of the group's median
    norm_outlier_factor: float = 10.0  # a part this many times the median norm is left out


_PIECE = 1 << 16
"""Values per piece when an owner decodes a part to reduce it (256 KiB of float32 and its 512
KiB float64 widening: they stay in cache, unlike a part's full-size decoded tensor)."""


@dataclass
class _Scanned:
    """A part kept encoded (``payload``, checked to decode to finite values), or the owner's own
    part as it is (``payload`` a float32 tensor: it needs no wire, so it is never encoded), with
    its L2 norm: taken on arrival, or None until the mean's pass over the values measures it (a
    part whose codec's scales bound its values below float32's maximum: proven finite without a
    pass)."""

    payload: bytes | bytearray | memoryview | torch.Tensor
    norm: float | None

    def pieces(self, codec: Codec, numel: int) -> Iterable[tuple[int, torch.Tensor]]:
        """``(start, values)``: the values in pieces of about ``_PIECE``, cut as ``codec``'s
        ``decode_pieces`` cuts them (the mean adds the parts piece by piece)."""
        if isinstance(self.payload, torch.Tensor):
            step = codec.piece_size(_PIECE)
            return ((at, self.payload[at:at + step]) for at in range(0, numel, step))
        return codec.decode_pieces(self.payload, numel, _PIECE)


class OwnedShard:
    """An owner's shard of one group: collects encoded parts, averages, answers everyone.

    Parts are checked where they arrive: the announced weight must be the one the group lists
    (capped at ``weight_cap_factor`` x the group's median), a part must decode to finite values,
    and at the cut-off parts whose norm is ``norm_outlier_factor`` x the median are left out
    (``on_rejected``) before the ``rule`` combines the rest."""

    def __init__(self, group: Group, me: Member, codec: Codec, executor: Executor, cutoff_s: float,
                 aggregation: Aggregation = Aggregation(),
                 on_rejected: Callable[[str, RoundError], None] = lambda peer_id, error: None,
                 on_delivered: Callable[[list[str], list[str]], None] = lambda delivered, missing: None) -> None:
        self.group = group
        self._on_delivered = on_delivered
        self._aggregation = aggregation
        self._on_rejected = on_rejected
        self.me = me
        self._codec = codec
        self._executor = executor
        self._expected = {m.peer_id: m for m in group.members}
        # The mean keeps each part encoded (its norm taken on arrival) and decodes it again piece
        # by piece while averaging; the robust rules need the decoded parts whole.
        self._by_pieces = aggregation.rule == "mean"
        self._parts: dict[str, tuple[float, torch.Tensor | _Scanned | None]] = {}  # dropped once averaged
        self._arrived: set[str] = set()  # parts that reached this owner (decoded or not)
        self._answered: set[str] = set()  # members given the answer
        self._stalled = False  # whether this owner's own loop was stalled at its cut-off
        self._pending = 0
        self.result: asyncio.Future[tuple[bytes, int]] = asyncio.get_running_loop().create_future()
        self._finishing: asyncio.Future | None = None
        self._averaging = False
        loop = asyncio.get_running_loop()
        self._cutoff_s = cutoff_s
        self._cutoff_at = loop.time() + cutoff_s
        self._timer = loop.call_later(cutoff_s, self._cutoff)

    @property
    def span(self) -> tuple[int, int]:
        """The values this shard covers, ``[start, end)`` of the model."""
        return self.me.shard_start, self.me.shard_end

    @property
    def numel(self) -> int:
        return self.me.shard_end - self.me.shard_start

    async def add(self, peer_id: str, weight: float, payload: bytes | bytearray | torch.Tensor) -> None:
        """Add one member's encoded part, or this owner's own part as a float32 tensor (read, not
        copied, until the shard is averaged). Raises RoundError (with a metric reason) if it is
        refused."""
        if peer_id not in self._expected:
            raise RoundError("not_member", f"{peer_id} is not a member of group {self.group.group_id}")
        if peer_id in self._parts:
            raise RoundError("duplicate", f"{peer_id} already sent its part of shard {self.me.shard_start}")
        if self.result.done():
            raise RoundError("late", f"part from {peer_id} arrived after the owner's cut-off")
        if not (weight >= 0 and weight < float("inf")):
            raise RoundError("bad_weight", f"weight {weight} from {peer_id} is not finite and >= 0")
        if weight != self._expected[peer_id].weight:
            raise RoundError("bad_weight", f"{peer_id} announces weight {weight}; it joined the group with "
                             f"{self._expected[peer_id].weight}")
        self._arrived.add(peer_id)
        self._pending += 1
        try:
            if isinstance(payload, torch.Tensor):
                if payload.numel() != self.numel or not all_finite(payload):
                    raise CodecError(f"the owner's own part has {payload.numel()} values (NaN/Inf or not "
                                     f"{self.numel})")
                part = _Scanned(payload, None) if self._by_pieces else payload
            elif self._by_pieces:
                # Size and scales are checked now (microseconds); where the scales prove the values
                # finite, the norm is measured by the mean's own pass over them (``_finish``)
                # instead of a pass of its own.
                bounds = self._codec.value_bounds(payload, self.numel)
                norm = None if bounds is not None else await offload(
                    self._executor, self.numel, self._scan, payload)
                part = _Scanned(payload, norm)
            else:
                part = await offload(self._executor, self.numel, self._codec.decode, payload, self.numel)
        except CodecError as exc:
            raise RoundError("corrupt", f"part from {peer_id} does not decode: {exc}") from None
        finally:
            self._pending -= 1
        # (decode refuses a payload that decodes to NaN or Inf: a CodecError above)
        if self.result.done():
            raise RoundError("late", f"part from {peer_id} arrived after the owner's cut-off")
        self._parts[peer_id] = (weight, part)
        if set(self._parts) == set(self._expected):
            await self._finish()

    def answered(self, peer_id: str) -> bool:
        """Note that member ``peer_id`` was given the answer; True once every member was: nobody
        else may ask, and the shard (its answer: N/K x bits/8 bytes) need not wait for the
        deadline to go (``ShardRegistry.remove``)."""
        self._answered.add(peer_id)
        return self._answered >= self._expected.keys()

    def _scan(self, payload: bytes | bytearray | memoryview | torch.Tensor) -> float:
        """The L2 norm of a part, decoded piece by piece into a cache-sized buffer (nothing of
        the part's size is kept). Raises CodecError as ``decode`` does (size, scales, NaN/Inf).
        Executor or loop."""
        if isinstance(payload, torch.Tensor):
            return l2_norm(payload)
        scratch = torch.empty(min(self.numel, _PIECE), dtype=torch.float64)
        return math.sqrt(sum(square_sum(values, scratch) for _, values in
                             self._codec.decode_pieces(payload, self.numel, _PIECE)))

    def _cutoff(self) -> None:
        # A cut-off that fires late means this owner's loop was stalled (CPU starved, a long
        # callback): parts may have reached its socket in time and not been read yet.
        late_by = asyncio.get_running_loop().time() - self._cutoff_at
        self._stalled = late_by > max(0.05, 0.2 * self._cutoff_s)
        if not self.result.done() and self._parts:
            self._finishing = asyncio.ensure_future(self._finish())
        elif not self.result.done():
            self.result.set_exception(RoundError("no_parts", "no part arrived before the owner's cut-off"))

    async def _finish(self) -> None:
        if self.result.done() or self._averaging:
            return  # (the cut-off and the last part can both get here: one averages)
        self._averaging = True
        self._timer.cancel()
        order = sorted(self._parts)
        agg = self._aggregation
        # One member's claim of many samples buys it at most weight_cap_factor x the median.
        capped = dict(zip([m.peer_id for m in self.group.members],
                          cap_weights([m.weight for m in self.group.members], agg.weight_cap_factor)))

        def mean_of(members: list[str]) -> bytes:
            # The mean straight from the encoded parts, piece by piece: each piece of each part
            # decoded into a cache-sized buffer and added in, and each piece of the mean encoded
            # as it comes (weighted_mean_iter, encode_pieces); accumulated in float32 for a lossy
            # codec, whose error dwarfs float32's (``wide``). A part's norm still unknown is
            # measured on the pieces as they go by.
            scratch = torch.empty(min(self.numel, _PIECE), dtype=torch.float64)

            def pieces(part: _Scanned):
                measure, squares = part.norm is None, 0.0
                for start, values in part.pieces(self._codec, self.numel):
                    if measure:
                        squares += square_sum(values, scratch)
                        if start + values.numel() == self.numel:  # (the mean takes no piece past the last)
                            part.norm = math.sqrt(squares)
                    yield start, values

            mean = weighted_mean_iter([pieces(self._parts[p][1]) for p in members], [capped[p] for p in members],
                                      self.numel, wide=not self._codec.lossy)
            return self._codec.encode_pieces(mean, self.numel)

        def reduce() -> tuple[bytes, list[str]]:
            parts = [self._parts[p][1] for p in order]
            if not self._by_pieces:
                norms = [l2_norm(p) for p in parts]
                outliers = {order[i] for i in outliers_by_norm(norms, agg.norm_outlier_factor)}
                kept = [p for p in order if p not in outliers]
                result = aggregate(agg.rule, [self._parts[p][1] for p in kept], [capped[p] for p in kept],
                                   agg.trim_fraction)
                return self._codec.encode(result), sorted(outliers)
            for p in order:  # a part of weight 0 takes no part in the mean's pass; its norm counts
                part = self._parts[p][1]
                if part.norm is None and not (capped[p] > 0 and self.numel):
                    part.norm = self._scan(part.payload)
            # The mean of every part, measuring the norms on the way; only when that finds an
            # outlier (a part norm_outlier_factor x the median) is the mean taken again without it.
            payload = mean_of(order)
            outliers = {order[i] for i in outliers_by_norm([p.norm for p in parts], agg.norm_outlier_factor)}
            if outliers:
                payload = mean_of([p for p in order if p not in outliers])
            return payload, sorted(outliers)

        payload, outliers = await offload(self._executor, self.numel * len(order), reduce)
        # The decoded parts (4 bytes a parameter of the model over the group's shards) are not
        # needed once averaged; the shard itself stays registered until the deadline, to answer
        # late streams, and must not keep them alive that long.
        self._parts = {p: (w, None) for p, (w, _) in self._parts.items()}
        for peer_id in outliers:
            self._on_rejected(peer_id, RoundError("norm_outlier", f"part of {peer_id} for shard "
                                                  f"{self.me.shard_start}-{self.me.shard_end} has a norm over "
                                                  f"{agg.norm_outlier_factor:g}x the median; left out"))
        if not self.result.done():
            self.result.set_result((payload, len(order)))
        missing = sorted(set(self._expected) - set(order))
        # Blamed for missing the deadline: members whose part never reached this owner, and only
        # when the owner itself was on time (a part still decoding at the cut-off arrived).
        late = [] if self._stalled else sorted(set(self._expected) - self._arrived)
        self._on_delivered(order, late)
        if missing:
            log.warning("round %d: shard %d-%d averaged without %s%s", self.group.round, self.me.shard_start,
                        self.me.shard_end, ", ".join(missing),
                        " (this owner's loop was stalled at its cut-off: no one is blamed)" if self._stalled else "")

    def close(self) -> None:
        self._timer.cancel()
        if not self.result.done():
            self.result.set_exception(RoundError("closed", "round closed"))
        # Consume the exception so asyncio does not log "never retrieved" for abandoned rounds.
        if self.result.done() and not self.result.cancelled():
            self.result.exception()


class ShardRegistry:
    """Owned shards (and pairs' swaps) by group id, so the server can route incoming parts. Loop-only."""

    def __init__(self) -> None:
        self._shards: dict[str, OwnedShard | SwapShard] = {}
        self._waiters: dict[str, asyncio.Event] = {}

    def put(self, shard: OwnedShard | SwapShard) -> None:
        self._shards[shard.group.group_id] = shard
        self._waiters.pop(shard.group.group_id, asyncio.Event()).set()

    def remove(self, group_id: str) -> None:
        shard = self._shards.pop(group_id, None)
        if shard is not None:
            shard.close()

    async def get(self, group_id: str, timeout_s: float) -> OwnedShard | SwapShard:
        """The shard of ``group_id``; waits up to ``timeout_s`` for the owner to learn its group."""
        if group_id in self._shards:
            return self._shards[group_id]
        event = self._waiters.setdefault(group_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            raise RoundError("unknown_group", f"no group {group_id} here") from None
        finally:
            if not event.is_set():
                self._waiters.pop(group_id, None)
        return self._shards[group_id]


@dataclass
class ReduceStats:
    sent_bytes: int = 0
    received_bytes: int = 0
    encoded_bytes: int = 0
    contributors: list[int] = field(default_factory=list)
    answer_digests: list[str] = field(default_factory=list)  # each owner's answer, in member order (none in a pair)
    # Each owner's answer as received, (shard start, shard end, payload) in member order: a
    # device mirror (``peer.sync.mirror``) applies these same bytes on the training device.
    answers: tuple[tuple[int, int, bytes], ...] = ()


class Averaged:
    """The averaged delta of a round as its owners answered it: each shard's encoded answer
    (checked by the member: it decodes to finite values within ``answer_limit``), decoded only
    where it is used. The outer step reads it piece by piece (``peer.sync.outer.GradPieces``):
    no full-size averaged delta exists. ``tensor()`` decodes it whole (diagnostics, tests,
    benchmarks): the same values, bit for bit."""

    def __init__(self, codec: Codec, numel: int, shards: tuple[tuple[int, int, bytes], ...], magnitude: float):
        self.codec = codec
        self.shards = shards  # (start, end, payload), in order, covering [0, numel)
        self.magnitude = magnitude
        self._numel = numel

    def numel(self) -> int:
        return self._numel

    def pieces(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, values)``: each shard decoded in pieces of ``_PIECE`` values into a scratch
        the next piece reuses (read it before advancing), in order from the first value."""
        for s, e, p in self.shards:
            for at, values in self.codec.decode_pieces(p, e - s, _PIECE):
                yield s + at, values

    def tensor(self) -> torch.Tensor:
        """The whole averaged delta, each shard decoded into its slice of one tensor."""
        avg = torch.empty(self._numel, dtype=torch.float32)
        for s, e, p in self.shards:
            self.codec.decode_into(p, avg[s:e])
        return avg


class Reducer:
    """Member side of the butterfly all-reduce for this peer."""

    def __init__(
        self,
        *,
        peer_id: str,
        run_id: str,
        client: PeerClient,
        registry: ShardRegistry,
        executor: Executor,
        error_feedback: bool,
        owner_cutoff_share: float = 0.5,
        phase_hook: PhaseHook = no_hook,
        aggregation: Aggregation = Aggregation(),
        on_rejected: Callable[[str, RoundError], None] = lambda peer_id, error: None,
        on_delivered: Callable[[list[str], list[str]], None] = lambda delivered, missing: None,
    ) -> None:
        self._aggregation = aggregation
        self._on_rejected = on_rejected
        self._on_delivered = on_delivered
        self._me = peer_id
        self._run_id = run_id
        self._client = client
        self._registry = registry
        self._executor = executor
        self._use_ef = error_feedback
        self._ef: ErrorFeedback | None = None
        self._cutoff_share = owner_cutoff_share
        self._hook = phase_hook
        self._sending: set[asyncio.Future] = set()  # pairs' swaps still sending (``_send_swap``)

    @property
    def feedback(self) -> ErrorFeedback | None:
        """The error-feedback state (None until a lossy round ran with error feedback on)."""
        return self._ef

    def reset_feedback(self) -> None:
        """Forget the carried error (after a resync: it belonged to parameters we left)."""
        if self._ef is not None:
            self._ef.reset()

    def _feedback(self, codec: Codec, numel: int) -> ErrorFeedback | None:
        if not (self._use_ef and codec.lossy):
            return None
        if self._ef is None or self._ef.residual.numel() != numel or self._ef.codec.name != codec.name:
            self._ef = ErrorFeedback(codec, numel)
        return self._ef

    async def offer(self, delta: torch.Tensor, codec_name: str) -> SwapOffer | None:
        """This member's delta encoded whole for a pair's swap (``SwapOffer``), to offer with its
        join; None for a delta the codec refuses (NaN/Inf: the round itself says so)."""
        codec = get_codec(codec_name)
        if delta.device.type != "cpu" and delta.numel() <= HOST_NUMEL:
            delta = delta.cpu()
        ef = self._feedback(codec, delta.numel())
        try:
            return await offload(self._executor, delta.numel(), lambda: encode_whole(codec, delta, ef, keep_delta=True),
                                 on_device=delta.device.type != "cpu")
        except CodecError:
            return None

    async def run(self, group: Group, delta: torch.Tensor, weight: float, *, offer: SwapOffer | None = None,
                  relayed: bytes = b"") -> tuple[Averaged, ReduceStats]:
        """All-reduce ``delta`` within ``group``; return the averaged delta (identical on every
        member that completes; kept encoded, ``Averaged``) and traffic stats. Raises RoundError
        when a shard is missing.

        ``delta`` is given to the round: with error feedback its own memory holds the corrected
        delta and then the next residual (``ErrorFeedback.corrected_in_place``), so its values
        are gone after the call, whether the round completes or fails; a caller that needs them
        passes a copy. (The residual itself changes only when the round completes.)

        A pair that swaps (``swaps``) uses ``offer``, this member's delta as it offered it with
        its join, and ``relayed``, the partner's as the join's reply carried it (empty: it comes
        on the partner's Session stream, and ours goes there too)."""
        me = group.member(self._me)
        if me is None:
            raise RoundError("not_member", f"{self._me} is not in group {group.group_id}")
        if delta.numel() != group.numel:
            raise RoundError("bad_size", f"delta has {delta.numel()} elements, the group expects {group.numel}")
        codec = get_codec(group.codec)
        if delta.device.type != "cpu" and delta.numel() <= HOST_NUMEL:
            # A small model's delta on a GPU: over to the host in one transfer and reduced
            # there like a host delta (its error feedback residual moves with it), instead of
            # a dozen kernels and waits for the device per shard (``HOST_NUMEL``).
            delta = delta.cpu()
        if swaps(group):
            return await self._swap(group, delta, weight, codec, offer, relayed)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        deadline = started + group.reduce_deadline_s
        ef = self._feedback(codec, delta.numel())
        bounds = [(m.shard_start, m.shard_end) for m in group.members]

        mine = group.members.index(me)
        k = len(group.members)
        # Shards are encoded one at a time, each stream starting as soon as its shard is: the
        # wire carries the first shard while the codec works on the next. Every member starts
        # with the shard after its own (no owner gets every member's first part at once). Its
        # own shard needs no wire: on the host, it averages its own part as it is (exact, and
        # neither encoded nor decoded); a device delta's own shard is encoded last.
        raw_own = delta.device.type == "cpu" and delta.dtype == torch.float32
        order = [(mine + i) % k for i in range(1, k + 1 - raw_own)]
        encoded: list[asyncio.Future[bytes]] = [loop.create_future() for _ in range(k)]
        if raw_own:
            encoded[mine].set_result(b"")

        def prepare() -> tuple[list[float], torch.Tensor | None]:
            # The norms of this member's own parts bound the answers (``answer_limit``); taken
            # first, as error feedback then corrects the delta in its own memory.
            norms = [l2_norm(delta[s:e]) if weight > 0 else 0.0 for s, e in bounds]
            return norms, (ef.corrected_in_place(delta) if ef is not None else None)

        on_device = delta.device.type != "cpu"
        own_norms, corrected = await offload(self._executor, delta.numel(), prepare, on_device=on_device)

        def encode_one(j: int) -> bytes:
            s, e = bounds[j]
            return codec.encode(delta[s:e]) if ef is None else ef.encode_shard(corrected, s, e)

        async def encode_in_order() -> None:
            for j in order:
                try:
                    encoded[j].set_result(await offload(self._executor, bounds[j][1] - bounds[j][0], encode_one, j,
                                                        on_device=on_device))
                except CodecError as exc:  # every shard not yet encoded fails alike
                    for f in encoded:
                        if not f.done():
                            f.set_exception(exc)
                    return

        stats = ReduceStats()
        # The owner stops waiting for parts at a share of the deadline, so that its answer
        # reaches every member before their own deadline.
        owned = OwnedShard(group, me, codec, self._executor, cutoff_s=group.reduce_deadline_s * self._cutoff_share,
                           aggregation=self._aggregation, on_rejected=self._on_rejected,
                           on_delivered=self._on_delivered)
        self._registry.put(owned)
        try:
            await self._hook("reduce", group.round)
            tasks: dict[str, asyncio.Task] = {}
            async with asyncio.TaskGroup() as tg:
                tg.create_task(encode_in_order())
                # The parts for the other owners start first: this member's own part, when it
                # completes its shard, has its owner average it on the loop (a small model's
                # mean runs inline), which must not hold up the parts the others wait for.
                for j, m in enumerate(group.members):
                    if m.peer_id == self._me:
                        continue
                    header = ReduceHeader(
                        run_id=self._run_id, group_id=group.group_id, round=group.round, peer_id=self._me,
                        shard_start=m.shard_start, shard_end=m.shard_end, codec=codec.name,
                        numel=m.shard_end - m.shard_start,
                        total_bytes=codec.encoded_size(m.shard_end - m.shard_start),
                        weight=weight)
                    tasks[m.peer_id] = tg.create_task(self._send(m, header, encoded[j], deadline, stats, k))
                own = (delta if corrected is None else corrected)[me.shard_start:me.shard_end] if raw_own \
                    else encoded[mine]
                tasks[self._me] = tg.create_task(self._own(owned, own, weight))
            for f in encoded:
                if f.done() and f.exception() is not None:
                    raise f.exception()  # a delta the codec refuses (NaN/Inf): as before, the caller's error
            stats.encoded_bytes = sum(len(f.result()) for f in encoded)
            if raw_own:  # (what its own part would take on the wire, for the compression figure)
                stats.encoded_bytes += codec.encoded_size(me.shard_end - me.shard_start)
            encoded.clear()  # every stream is over: this member's encoded shards may go
            results: list[tuple[Member, bytes]] = []
            missing = []
            for m in group.members:
                outcome = tasks[m.peer_id].result()
                if isinstance(outcome, Exception):
                    missing.append(f"{m.peer_id}: {outcome}")
                else:
                    payload, contributors = outcome
                    stats.contributors.append(contributors)
                    results.append((m, payload))
            if missing:
                raise RoundError("shard_missing", f"round {group.round}: averaged shard missing from "
                                 + "; ".join(missing))

            factor = self._aggregation.norm_outlier_factor

            def check_all() -> tuple[float, list[str], list[tuple[str, float, float]]]:
                # Each averaged shard is kept encoded: the outer step decodes it where it is
                # used, so no full-size averaged delta exists. Where its codec's scales bound its
                # values below float32's maximum (finite; their largest is the bound, for int8 at
                # most 128/127 of it) and its norm within this member's limit (an honest answer's
                # bound is a few times its norm, the limit 4 sqrt(K) x norm_outlier_factor its
                # part's), nothing more is read. Otherwise it is decoded piece by piece through
                # cache-sized buffers (decode_pieces refuses NaN/Inf): its norm, its largest value.
                too_large, size = [], 0.0
                scratch = torch.empty(min(max(group.numel, 1), _PIECE), dtype=torch.float64)
                for m, p in results:
                    n = m.shard_end - m.shard_start
                    limit = answer_limit(own_norms[group.members.index(m)], len(group.members), factor)
                    bounds = codec.value_bounds(p, n)
                    if bounds is not None and (limit is None or bounds[1] <= limit):
                        size = max(size, bounds[0])
                        continue
                    squares = 0.0
                    for _, values in codec.decode_pieces(p, n, _PIECE):
                        squares += square_sum(values, scratch)
                        if bounds is None:
                            size = max(size, magnitude(values))
                    if bounds is not None:
                        size = max(size, bounds[0])
                    if limit is not None and math.sqrt(squares) > limit:
                        too_large.append((m.peer_id, math.sqrt(squares), limit))
                # (digests only where the leader compares them: a group of two compares nothing)
                return size, [answer_digest(p) for _, p in results] if compared(group) else [], too_large

            try:
                size, stats.answer_digests, too_large = await offload(self._executor, group.numel, check_all)
            except CodecError as exc:
                raise RoundError("bad_reply", f"round {group.round}: an averaged shard does not decode: {exc}") from None
            if too_large:
                # Treated as missing: this member fails the round and resyncs.
                raise RoundError("answer_norm", f"round {group.round}: the averaged shard of "
                                 + ", ".join(f"{pid} has norm {norm:.3g} (at most {limit:.3g} by this "
                                             f"member's part)" for pid, norm, limit in too_large),
                                 culprits=tuple(pid for pid, _, _ in too_large))
            if ef is not None and corrected is not None:
                if raw_own:  # its own part was averaged exactly: nothing of it is carried over
                    corrected[me.shard_start:me.shard_end].zero_()
                ef.commit(corrected, copy=corrected is delta)
            stats.answers = tuple((m.shard_start, m.shard_end, p) for m, p in results)
            return Averaged(codec, group.numel, stats.answers, size), stats
        finally:
            # Give streams that still want our shard's answer a moment, then drop it.
            loop.call_later(max(0.0, deadline - time.monotonic()) + 1.0, self._registry.remove, group.group_id)

    async def _swap(self, group: Group, delta: torch.Tensor, weight: float, codec: Codec, offer: SwapOffer | None,
                    relayed: bytes) -> tuple[Averaged, ReduceStats]:
        """``run`` for a pair that swaps whole deltas (``swaps``). Both members compute the same
        mean (``pair_mean``) of the two payloads, this member's own as encoded (the partner has
        only those bytes). Where the join carried both deltas (``relayed``: the leader's reply
        held the partner's, and the leader holds ours), nothing more is sent: the round is one
        round trip, the join's. Otherwise this member's delta goes to the partner on the Session
        stream, the partner's comes in on this peer's server (``SwapShard``), and the round ends
        here when it is in: the partner's reply to our call (its acceptance) is not waited for; a
        partner that refuses our delta fails its own round, and the next round's hash check meets
        the two states as any other disagreement."""
        partner = next(m for m in group.members if m.peer_id != self._me)
        n = group.numel
        deadline = time.monotonic() + group.reduce_deadline_s
        ef = self._feedback(codec, n)
        swap = SwapShard(group, self._me, codec, cutoff_s=group.reduce_deadline_s, on_delivered=self._on_delivered)
        if relayed:
            try:  # checked as the partner's own call would be
                await swap.add(partner.peer_id, partner.weight, relayed)
            except RoundError as exc:
                self._on_rejected(partner.peer_id, exc)
                swap.close()
                raise
        else:
            self._registry.put(swap)
        try:
            await self._hook("reduce", group.round)
            if offer is None:  # (a delta the codec refuses, NaN/Inf, raises CodecError: the caller's error, as in ``run``)
                offer = await offload(self._executor, n, lambda: encode_whole(codec, delta, ef, keep_delta=False),
                                      on_device=delta.device.type != "cpu")
            mine, corrected = offer.payload, offer.corrected
            # (counted alike whether the join or the Session stream carried them)
            stats = ReduceStats(encoded_bytes=len(mine), sent_bytes=len(mine))
            if not relayed:
                header = ReduceHeader(run_id=self._run_id, group_id=group.group_id, round=group.round,
                                      peer_id=self._me, shard_start=0, shard_end=n, codec=codec.name, numel=n,
                                      total_bytes=len(mine), weight=weight)
                sending = asyncio.ensure_future(self._send_swap(partner, header, mine, deadline))
                self._sending.add(sending)
                sending.add_done_callback(self._sending.discard)
            theirs = await asyncio.shield(swap.received)
            stats.received_bytes += len(theirs)
            payloads = [mine if m.peer_id == self._me else theirs for m in group.members]
            try:
                mean = await offload(self._executor, 2 * n, pair_mean, codec, payloads,
                                     [m.weight for m in group.members], n)
            except CodecError as exc:  # (both were checked to decode: a codec's bug, not a peer's)
                raise RoundError("corrupt", f"round {group.round}: a pair's delta does not decode: {exc}") from None
            if ef is not None and corrected is not None:
                ef.commit(corrected, copy=corrected is delta)
            stats.contributors.append(2)  # (both deltas are in, as an owner counts the parts that arrived)
            exact = get_codec("fp32")
            stats.answers = ((0, n, exact.encode(mean)),)
            return Averaged(exact, n, stats.answers, magnitude(mean)), stats
        finally:
            if relayed:
                swap.close()
            else:  # (answered, the partner's call removed it already; else a late call still gets told)
                asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()) + 1.0,
                                                      self._registry.remove, group.group_id)

    async def _send_swap(self, partner: Member, header: ReduceHeader, payload: bytes, deadline: float) -> None:
        """This member's whole delta to its partner (``_swap``); runs on after the round ended here,
        until the partner accepts it or the deadline passes. A failure is logged: the partner's
        round fails with it, and ours may not have."""
        timeout = deadline - time.monotonic()
        try:
            if timeout <= 0:
                raise RoundError("deadline", "no time left")
            await self._client.reduce(partner.address, header, payload, timeout)
        except (PeerUnavailable, RoundError) as exc:
            log.warning("round %d: the delta for partner %s was not taken: %s", header.round, partner.peer_id, exc)

    async def _own(self, owned: OwnedShard, part: asyncio.Future[bytes] | torch.Tensor, weight: float
                   ) -> tuple[bytes, int] | Exception:
        """This member's part of its own shard (encoded, or a float32 tensor as it is) to the
        shard it owns; the shard's answer."""
        try:
            try:
                payload = part if isinstance(part, torch.Tensor) else await part
            except CodecError as exc:
                return RoundError("encode", str(exc))
            await owned.add(self._me, weight, payload)
            answer = await asyncio.shield(owned.result)
        except RoundError as exc:
            return exc
        if owned.answered(self._me):
            self._registry.remove(owned.group.group_id)
        return answer

    async def _send(
        self, m: Member, header: ReduceHeader, encoded: asyncio.Future[bytes], deadline: float, stats: ReduceStats,
        group_size: int
    ) -> tuple[bytes, int] | Exception:
        try:
            payload = await encoded
        except CodecError as exc:
            return RoundError("encode", str(exc))
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return RoundError("deadline", "no time left")
        try:
            reply, result = await self._client.reduce(m.address, header, payload, timeout)
        except (PeerUnavailable, RoundError) as exc:
            log.warning("round %d: shard owner %s failed: %s", header.round, m.peer_id, exc)
            return exc
        stats.sent_bytes += len(payload)
        stats.received_bytes += len(result)
        if (reply.shard_start, reply.shard_end, reply.codec) != (m.shard_start, m.shard_end, header.codec):
            return RoundError("bad_reply", f"owner {m.peer_id} answered for another shard")
        if len(result) != get_codec(header.codec).encoded_size(header.numel):
            return RoundError("bad_reply", f"owner {m.peer_id} answered {len(result)} bytes for {header.numel} values")
        if not 0 < reply.contributors <= group_size:
            return RoundError("bad_reply", f"owner {m.peer_id} claims {reply.contributors} contributors")
        return result, reply.contributors


Traffic = Callable[[str, int, int], None]
"""``traffic(codec, sent_bytes, received_bytes)``: payload bytes moved, for metrics."""


class ReduceOwner:
    """The owner side of Reduce as the service sees it: accept a header (and learn the exact
    payload size to expect), then contribute the part and get the averaged shard to answer
    with. Loop-only. Framing and checksums are the transport's; this checks the claims."""

    def __init__(
        self,
        *,
        run_id: str,
        peer_id: str,
        registry: ShardRegistry,
        group_wait_s: float,
        on_rejected: Callable[[ReduceHeader | None, RoundError], None],
        traffic: Traffic,
        phase_hook: PhaseHook = no_hook,
    ) -> None:
        self._run_id = run_id
        self._me = peer_id
        self._registry = registry
        self._wait_s = group_wait_s
        self._on_rejected = on_rejected
        self._traffic = traffic
        self._hook = phase_hook

    async def expect(self, header: ReduceHeader) -> int:
        """Validate ``header`` against the group this peer owns a shard of; return the exact
        payload size. Raises RoundError (with a metric reason)."""
        if header.run_id != self._run_id:
            raise RoundError("not_member", f"run {header.run_id!r} is not this run")
        owned = await self._registry.get(header.group_id, self._wait_s)
        if owned.group.member(header.peer_id) is None:
            # Before anything is allocated for the part: only the group's members may send one.
            raise RoundError("not_member", f"{header.peer_id} is not a member of group {owned.group.group_id}")
        if (header.shard_start, header.shard_end) != owned.span:
            raise RoundError("bad_shard", f"{header.peer_id} sent shard {header.shard_start}-{header.shard_end}; "
                             f"this peer takes {owned.span[0]}-{owned.span[1]}")
        if header.codec != owned.group.codec or header.numel != owned.numel or header.round != owned.group.round:
            raise RoundError("malformed", f"{header.peer_id}: codec/size/round do not match group "
                             f"{owned.group.group_id}")
        return get_codec(header.codec).encoded_size(owned.numel)

    async def contribute(self, header: ReduceHeader, payload: bytes) -> tuple[ReduceHeader, bytes]:
        """Add a member's part (a refused part is left out, reported to ``on_rejected``; its
        sender still gets the average and stays in sync); return the averaged shard. A pair's
        swapped delta (``SwapShard``) is answered with nothing but success; a refused one fails
        the call (RoundError, which the server counts), as the refusal also fails this peer's round."""
        owned = await self._registry.get(header.group_id, self._wait_s)
        self._traffic(header.codec, 0, len(payload))
        try:
            await owned.add(header.peer_id, header.weight, payload)
        except RoundError as exc:
            if isinstance(owned, SwapShard):
                raise  # a pair's refused delta fails the partner's call (the server counts it)
            self._on_rejected(header, exc)
        await self._hook("owner", header.round)
        result, contributors = await asyncio.shield(owned.result)
        if owned.answered(header.peer_id):
            self._registry.remove(owned.group.group_id)
        self._traffic(header.codec, len(result), 0)
        reply = replace(header, peer_id=self._me, total_bytes=len(result), contributors=contributors, weight=0.0)
        return reply, result
