"""A rogue member — a real `peer run` with the run's credentials, built from this project and told
to lie (``--faults``) — against three honest peers. The honest peers stay finite, keep equal
hashes at equal rounds, keep completing rounds, and count what they refused."""

from __future__ import annotations

import math
import os
import re

import pytest

from tests.integration._peers import Swarm, check_invariant, consistent_rounds, metric, wait_until


def _run(tmp_path, name: str, lie: str, extra: tuple[str, ...] = ()):
    swarm = Swarm(tmp_path, f"rogue-{name}-{os.getpid()}", ["--rounds", "0", *extra])
    honest = [swarm.start(f"h{i}", wait=False) for i in range(3)]
    rogue = swarm.start("rogue", "--faults", lie, wait=False)
    for p in [*honest, rogue]:
        p.wait_listening(60)
    return swarm, honest, rogue


def _counted(peers, series: str) -> float:
    """``series`` (a metric with its labels) summed over ``peers``."""
    return sum(metric(p.metrics_port, series) for p in peers)


def _logs(swarm) -> str:
    return "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in swarm.peers)


def _honest_rounds_stay_finite_and_learn(swarm, honest) -> None:
    wait_until(lambda: len(consistent_rounds(honest)) >= 6, 90, "six rounds by the honest peers",
               lambda: _logs(swarm))
    assert check_invariant(honest) >= 6
    for p in honest:
        _finite_and_learning(p)


def _finite_and_learning(p) -> None:
    s = p.status()
    assert s["loss"] is not None and math.isfinite(s["loss"]), s
    evals = [float(x) for x in re.findall(r"round \d+ done: .* eval ([0-9.e+-]+|nan|inf)", p.log())]
    first = float(re.search(r"initial eval loss ([0-9.]+)", p.log())[1])
    assert evals and all(math.isfinite(e) for e in evals) and evals[-1] < first, (first, evals)


def test_huge_values_and_an_inflated_weight_are_left_out(tmp_path):
    swarm, honest, rogue = _run(tmp_path, "huge", "huge@*,inflate@*")
    with swarm:
        _honest_rounds_stay_finite_and_learn(swarm, honest)
        rejected = _counted(honest, 'peer_sync_rejected_contributions_total{reason="norm_outlier"}')
        assert rejected >= 3, rejected
        assert all(p.alive() for p in swarm.peers)


def test_a_claim_far_ahead_moves_nobody(tmp_path):
    swarm, honest, rogue = _run(tmp_path, "ahead", "claim_ahead@*")
    with swarm:
        wait_until(lambda: len(consistent_rounds(honest)) >= 5, 90, "five rounds by the honest peers",
                   lambda: _logs(swarm))
        assert rogue.status()["round"] >= 1_000_000
        for p in honest:
            assert "resynced" not in p.log(), p.tail()
            assert p.status()["round"] < 1000
        assert check_invariant(honest) >= 5


@pytest.mark.parametrize("rule", [("trimmed_mean", "--trim-fraction", "0.25"), ("centered_clip",)],
                         ids=["trimmed_mean", "centered_clip"])
def test_a_sign_flipped_amplified_delta_is_bounded_by_a_robust_rule(tmp_path, rule):
    # K=4: a trim of 0.25 cuts one value at each end of every coordinate
    swarm, honest, rogue = _run(tmp_path, f"scale-{rule[0]}", "scale@*", ("--aggregation", *rule))
    with swarm:
        _honest_rounds_stay_finite_and_learn(swarm, honest)


def test_a_leader_handing_out_bad_groups_is_refused_and_skipped(tmp_path):
    # The rogue leads about a quarter of the rounds (rotation); its groups name a deadline of
    # 1e9 s and a codec nobody runs. Followers check every group where it arrives.
    swarm, honest, rogue = _run(tmp_path, "group", "bad_group@*")
    with swarm:
        _honest_rounds_stay_finite_and_learn(swarm, honest)
        # Six rounds need not include one the rogue leads ((3/4)^6 = 18 % of runs have none):
        # the rounds go on until it has led one, which the honest peers refuse and skip.
        wait_until(lambda: _counted(honest, 'peer_sync_invalid_claims_total{reason="bad_group"}') >= 1
                   and _counted(honest, 'peer_sync_excluded_total{reason="failing_leader"}') >= 1, 90,
                   "a group of the rogue's refused and its leader skipped", lambda: _logs(swarm))
        assert check_invariant(honest) >= 6
        assert all(p.alive() for p in swarm.peers)


def test_a_stalled_member_holds_up_nobody(tmp_path):
    # The rogue joins its first group, then its trainer and round stall for ever; its server,
    # heartbeat and matchmaker go on answering (a hung GPU, a deadlocked training loop). Rounds
    # it leads by rotation still form, and groups stop waiting for it once it is stuck behind.
    swarm, honest, rogue = _run(tmp_path, "stall", "stall@*:outer", ("--matchmaking-timeout-s", "5"))
    with swarm:
        wait_until(lambda: len(consistent_rounds(honest)) >= 8, 120, "eight rounds by the honest peers",
                   lambda: _logs(swarm))
        assert check_invariant(honest) >= 8
        assert rogue.alive() and rogue.status()["round"] <= 1
        # Once it is stuck, groups form without waiting the matchmaking timeout for it.
        fast = [float(s) for p in honest
                for s in re.findall(r"group \w+ formed with 3 peers after ([0-9.]+) s\n", p.log())]
        assert fast and min(fast) < 2.0, fast


def test_an_owner_answering_one_member_differently_fails_that_member_only(tmp_path):
    # The rogue owns a shard in every group and answers the first member that calls with other
    # (valid, checksummed) bytes. The members compare what they received through the leader
    # before applying it: the member that got other bytes fails the round and resyncs; the rest
    # complete it with one hash (the invariant holds: no group's members disagree).
    # Once two members got other bytes from it, a leader leaves it out of its groups.
    swarm, honest, rogue = _run(tmp_path, "split", "owner_split@*")
    with swarm:
        _honest_rounds_stay_finite_and_learn(swarm, honest)
        detected = _counted([*honest, rogue], 'peer_sync_invalid_claims_total{reason="owner_mismatch"}')
        failed = sum(p.log().count("(answers_differ)") for p in honest)
        assert detected >= 1 and failed >= 1, (detected, failed, _logs(swarm))
        wait_until(lambda: _counted(honest, 'peer_sync_excluded_total{reason="owner_mismatch"}') >= 1, 60,
                   "an honest leader to leave the rogue out", lambda: _logs(swarm))
        assert all(p.alive() for p in swarm.peers)


def test_an_owner_inflating_its_answer_is_caught_by_every_member_and_left_out(tmp_path):
    # The rogue answers every member with its shard's average times 1000 (valid, checksummed,
    # the same bytes for all: the digest comparison cannot see it). Each member bounds an
    # owner's answer by its own part of that shard; the bound fails, the round fails for that
    # member, and it leaves the owner out of the groups it leads.
    swarm, honest, rogue = _run(tmp_path, "inflate", "owner_inflate@*")
    with swarm:
        _honest_rounds_stay_finite_and_learn(swarm, honest)
        caught = _counted(honest, 'peer_sync_invalid_claims_total{reason="answer_norm"}')
        left_out = _counted(honest, 'peer_sync_excluded_total{reason="answer_norm"}')
        assert caught >= 1 and left_out >= 1, (caught, left_out, _logs(swarm))
        assert all(p.alive() for p in swarm.peers)


def test_a_donor_serving_a_lying_state_header_is_refused_and_the_joiner_catches_up(tmp_path):
    # The rogue's id sorts first, so a joiner asks it first for the state the majority attests;
    # its state header claims a round above 2^64 and a shape of [-1, -4]. All three stall at
    # round 4 (their servers go on answering), so they attest one state for as long as the joiner
    # needs. The joiner refuses the lie (counted) and fetches the same state from the next donor.
    swarm = Swarm(tmp_path, f"rogue-state-{os.getpid()}", ["--rounds", "0"])
    with swarm:
        rogue = swarm.start("rogue", "--peer-id", "p0", "--faults", "bad_state@*,stall@4:inner", wait=False)
        honest = [swarm.start(f"h{i}", "--peer-id", f"p{i + 1}", "--faults", "stall@4:inner", wait=False)
                  for i in range(2)]
        for p in [rogue, *honest]:
            p.wait_listening(60)
        wait_until(lambda: all(p.status()["round"] == 4 for p in [rogue, *honest]), 90, "three peers at round 4",
                   lambda: _logs(swarm))
        held = {p.status()["global_hash"] for p in [rogue, *honest]}
        assert len(held) == 1, held
        late = swarm.start("late", "--peer-id", "p3")
        wait_until(lambda: "resynced to round 4" in late.log(), 60, "the joiner to catch up", lambda: _logs(swarm))
        refused = metric(late.metrics_port, 'peer_sync_invalid_claims_total{reason="bad_state"}')
        assert refused >= 1, late.tail(30)
        assert "outside [0, 2^63)" in late.log(), late.tail(30)
        assert late.status()["global_hash"] in held or late.status()["round"] > 4, late.tail(30)
        assert all(p.alive() for p in swarm.peers)
