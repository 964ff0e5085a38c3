"""Owners answer everyone alike: the leader's comparison of what the members of its group received.

After the all-reduce, every member of a group sends its leader a digest of each owner's answer
(``JoinRequest.confirm_group`` / ``answer_digests``, in the group's member order) before it
applies them. The leader answers ``CONFIRMED`` to the members whose digests are the ones a
strict majority of the group reported, and ``ANSWERS_DIFFER`` to the others, whose round then
fails (they keep their state and resync from a member that completed it). With no majority
(everyone received something else), the round fails for every member: all keep the state they
started from, which they share. An owner that answers members differently is detected, logged
and counted here, on every leader that sees it; it is not blamed by name beyond the log line: a
member that misreports its digests would look the same, and it only fails its own round.

A group of two (or one) confirms nothing (``compared``): each owner answers one member besides
itself, so no owner can answer two members differently. An owner of a pair that applies one
answer and sends its partner another leaves two states, which the next round's hash check meets
as it meets any other disagreement; the confirmation could not have caught that owner anyway
(it reports whatever digest it likes). Skipping it takes a network round trip off every round
of a pair.

Loop-only; a confirmation waits at most the group's all-reduce deadline for the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from peer.types import Group, JoinOutcome, JoinReply, JoinRequest, digest_hasher

log = logging.getLogger(__name__)

KEEP_GROUPS = 16
"""Groups a leader can confirm: the last few it formed (a round's confirmations follow at once)."""


def compared(group: Group) -> bool:
    """Whether the members of ``group`` report their answers' digests to its leader: only in a
    group of three or more, where an owner answers two members or more (see the module's text)."""
    return len(group.members) > 2


def answer_digest(payload: bytes) -> str:
    """The digest a member reports of one owner's answer: members compare them, so a lying
    owner must not be able to craft two answers with one digest (``digest_hasher``: BLAKE3,
    ~5x blake2b's speed here; 128 bits of it are plenty for an equality check)."""
    h = digest_hasher()
    h.update(payload)
    return h.hexdigest(length=16)


@dataclass
class _Check:
    group: Group
    reports: dict[str, tuple[str, ...]] = field(default_factory=dict)
    decided: asyncio.Future | None = None
    timer: asyncio.TimerHandle | None = None


class AnswerChecks:
    """Leader side. ``formed(group)`` for every group this peer formed; ``confirm(req)`` for
    each member's report. ``on_mismatch(group, owners, members)`` once per group whose owners
    answered members differently: the owners whose digests differ, and the members outside the
    majority."""

    def __init__(self, *, on_mismatch: Callable[[Group, list[str], list[str]], None],
                 on_invalid: Callable[[str, str], None]) -> None:
        self._on_mismatch = on_mismatch
        self._on_invalid = on_invalid
        self._groups: OrderedDict[str, Group] = OrderedDict()
        self._checks: dict[str, _Check] = {}

    def formed(self, group: Group) -> None:
        self._groups[group.group_id] = group
        while len(self._groups) > KEEP_GROUPS:
            old, _ = self._groups.popitem(last=False)
            check = self._checks.pop(old, None)
            if check is not None:
                self._close(check)

    def close(self) -> None:
        for check in self._checks.values():
            self._close(check)
        self._checks.clear()
        self._groups.clear()

    @staticmethod
    def _close(check: _Check) -> None:
        if check.timer is not None:
            check.timer.cancel()
        if check.decided is not None and not check.decided.done():
            check.decided.set_result(None)

    async def confirm(self, req: JoinRequest) -> JoinReply:
        group = self._groups.get(req.confirm_group)
        if group is None:
            return JoinReply(JoinOutcome.REFUSED, f"no group {req.confirm_group[:16]!r} formed here lately")
        if group.member(req.peer_id) is None:
            self._on_invalid("bad_confirmation", f"{req.peer_id} confirmed group {group.group_id}, not being in it")
            return JoinReply(JoinOutcome.REFUSED, f"{req.peer_id} is not in group {group.group_id}")
        if not compared(group):
            self._on_invalid("bad_confirmation", f"{req.peer_id} confirmed group {group.group_id} of "
                             f"{len(group.members)}, which compares nothing")
            return JoinReply(JoinOutcome.REFUSED, f"group {group.group_id} has {len(group.members)} members: "
                             "a group of fewer than three confirms nothing")
        digests = tuple(req.answer_digests)
        if len(digests) != len(group.members) or any(len(d) > 64 for d in digests):
            self._on_invalid("bad_confirmation", f"{req.peer_id} confirmed group {group.group_id} with "
                             f"{len(digests)} digests for {len(group.members)} owners")
            return JoinReply(JoinOutcome.REFUSED, f"a confirmation of group {group.group_id} needs one digest "
                             f"(at most 64 characters) per member, {len(group.members)}")
        check = self._checks.get(group.group_id)
        if check is None:
            loop = asyncio.get_running_loop()
            check = self._checks[group.group_id] = _Check(group, decided=loop.create_future())
            check.timer = loop.call_later(group.reduce_deadline_s, self._decide, check, True)
        if req.peer_id in check.reports:
            return JoinReply(JoinOutcome.REFUSED, f"{req.peer_id} already confirmed group {group.group_id}")
        check.reports[req.peer_id] = digests
        if check.decided.done():
            agreed = check.decided.result()
            if digests != agreed:  # a late report that differs
                owners = [m.peer_id for i, m in enumerate(group.members) if agreed is None or digests[i] != agreed[i]]
                self._on_mismatch(group, owners, [req.peer_id])
        self._decide(check)
        agreed = await asyncio.shield(check.decided)
        if agreed is not None and digests == agreed:
            return JoinReply(JoinOutcome.CONFIRMED)
        if agreed is None:
            why = "the members of the group received different answers and no majority agrees"
        else:
            owners = [m.peer_id for m, mine, theirs in zip(group.members, digests, agreed) if mine != theirs]
            why = f"the answers you received from {', '.join(owners)} differ from what the group's majority received"
        return JoinReply(JoinOutcome.ANSWERS_DIFFER, f"round {group.round}: {why}")

    def _decide(self, check: _Check, timed_out: bool = False) -> None:
        if check.decided is None or check.decided.done() or not check.reports:
            if timed_out and check.decided is not None and not check.decided.done():
                check.decided.set_result(None)
            return
        size = len(check.group.members)
        vector, count = Counter(check.reports.values()).most_common(1)[0]
        if 2 * count > size:
            agreed = vector
        elif len(check.reports) == size or timed_out:
            # Everyone reported (or the rest never will): a majority of those who did, or none.
            agreed = vector if 2 * count > len(check.reports) else None
        else:
            return
        if check.timer is not None:
            check.timer.cancel()
        check.decided.set_result(agreed)
        self._report(check, agreed)

    def _report(self, check: _Check, agreed: tuple[str, ...] | None) -> None:
        group = check.group
        owners = sorted({m.peer_id for i, m in enumerate(group.members)
                         if len({d[i] for d in check.reports.values()}) > 1})
        outside = sorted(pid for pid, d in check.reports.items() if d != agreed)
        if owners or outside:
            self._on_mismatch(group, owners, outside)
