"""The leader's comparison of the answers its group's members received (peer.sync.confirm)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from peer.sync.confirm import AnswerChecks, answer_digest, compared
from peer.types import Group, JoinOutcome, JoinRequest, Member

IDS = ("a", "b", "c")


def _group(deadline_s: float = 5.0) -> Group:
    members = tuple(Member(pid, pid, 10 * i, 10 * (i + 1), 1.0) for i, pid in enumerate(IDS))
    return Group(group_id="g1", round=7, global_hash="h", members=members, codec="int8", numel=30,
                 reduce_deadline_s=deadline_s)


def _confirm(pid: str, digests: tuple[str, ...], group: str = "g1") -> JoinRequest:
    return JoinRequest(run_id="r", peer_id=pid, round=7, global_hash="h", weight=0.0, address=pid,
                       confirm_group=group, answer_digests=digests)


class Seen:
    def __init__(self) -> None:
        self.mismatches: list[tuple[list[str], list[str]]] = []
        self.invalid: list[str] = []

    def checks(self) -> AnswerChecks:
        return AnswerChecks(on_mismatch=lambda g, owners, members: self.mismatches.append((owners, members)),
                            on_invalid=lambda reason, message: self.invalid.append(reason))


GOOD = tuple(answer_digest(bytes([i]) * 8) for i in range(3))


async def test_members_that_received_the_same_answers_are_confirmed():
    seen = Seen()
    checks = seen.checks()
    checks.formed(_group())
    replies = await asyncio.gather(*(checks.confirm(_confirm(pid, GOOD)) for pid in IDS))
    assert [r.outcome for r in replies] == [JoinOutcome.CONFIRMED] * 3
    assert seen.mismatches == []


async def test_a_member_that_got_other_bytes_from_one_owner_fails_and_it_is_counted():
    seen = Seen()
    checks = seen.checks()
    checks.formed(_group())
    split = (GOOD[0], GOOD[1], answer_digest(b"other bytes"))  # owner c answered b differently
    a, b, c = await asyncio.gather(checks.confirm(_confirm("a", GOOD)), checks.confirm(_confirm("b", split)),
                                   checks.confirm(_confirm("c", GOOD)))
    assert (a.outcome, c.outcome) == (JoinOutcome.CONFIRMED, JoinOutcome.CONFIRMED)
    assert b.outcome == JoinOutcome.ANSWERS_DIFFER and "from c" in b.message, b
    assert seen.mismatches == [(["c"], ["b"])]


async def test_with_no_majority_the_round_fails_for_everyone():
    seen = Seen()
    checks = seen.checks()
    checks.formed(_group())
    vectors = [(GOOD[0], GOOD[1], answer_digest(bytes([k]))) for k in range(3)]
    replies = await asyncio.gather(*(checks.confirm(_confirm(pid, v)) for pid, v in zip(IDS, vectors)))
    assert [r.outcome for r in replies] == [JoinOutcome.ANSWERS_DIFFER] * 3
    assert seen.mismatches == [(["c"], list(IDS))]


async def test_members_that_never_report_do_not_hold_up_the_others_past_the_deadline():
    seen = Seen()
    checks = seen.checks()
    checks.formed(_group(deadline_s=0.2))
    reply = await asyncio.wait_for(checks.confirm(_confirm("a", GOOD)), 2.0)
    assert reply.outcome == JoinOutcome.CONFIRMED


async def test_bad_confirmations_are_refused_and_counted():
    seen = Seen()
    checks = seen.checks()
    checks.formed(_group())
    assert (await checks.confirm(_confirm("a", GOOD[:2]))).outcome == JoinOutcome.REFUSED
    assert (await checks.confirm(_confirm("a", ("x" * 65, *GOOD[1:])))).outcome == JoinOutcome.REFUSED
    assert (await checks.confirm(_confirm("zz", GOOD))).outcome == JoinOutcome.REFUSED
    assert (await checks.confirm(_confirm("a", GOOD, group="unknown"))).outcome == JoinOutcome.REFUSED
    assert seen.invalid == ["bad_confirmation"] * 3


async def test_a_pair_compares_nothing_and_a_confirmation_of_one_is_refused_at_once_and_counted():
    seen = Seen()
    checks = seen.checks()
    trio = _group()
    pair = replace(trio, group_id="g2", members=trio.members[:2], numel=20)
    checks.formed(pair)
    # (no wait for the other member: the reply comes before the deadline's 5 s)
    reply = await asyncio.wait_for(checks.confirm(_confirm("a", GOOD[:2], group="g2")), 1.0)
    assert reply.outcome == JoinOutcome.REFUSED and "confirms nothing" in reply.message, reply
    assert seen.invalid == ["bad_confirmation"] and seen.mismatches == []
    assert (compared(trio), compared(pair), compared(replace(trio, members=trio.members[:1]))) == (True, False, False)


async def test_only_the_last_groups_are_kept():
    seen = Seen()
    checks = seen.checks()
    first = _group()
    checks.formed(first)
    for i in range(20):
        checks.formed(Group(group_id=f"later{i}", round=8 + i, global_hash="h", members=first.members,
                            codec="int8", numel=30, reduce_deadline_s=5.0))
    assert (await checks.confirm(_confirm("a", GOOD))).outcome == JoinOutcome.REFUSED
    checks.close()
