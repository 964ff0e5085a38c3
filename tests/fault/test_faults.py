"""Crashes at every phase of a round, late join, restart, torn checkpoints: the run goes on,
nothing hangs, and members of a group that completes a round hold identical parameters.

Faults are injected through the product's own seam (``--faults``, peer/faults.py): a peer
SIGKILLs itself at the named phase of the named round, exactly like ``kill -9`` at that moment.
"""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import datetime

import pytest

from tests.integration._peers import Swarm, check_invariant, consistent_rounds, metric, round_groups, wait_until

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*round (\d+) done: (\d+) peers", re.M)


def _logs(swarm: Swarm) -> str:
    return "\n".join(f"--- {p.name}\n{p.tail(30)}" for p in swarm.peers)


def _done_times(log: str) -> list[tuple[float, int, int]]:
    """(unix time, round, group size) of every completed round in a log."""
    # (fromisoformat reads the logging module's "2026-11-27 20:10:04,572" as strptime does, a
    # thousand times faster: predicates polled over logs of thousands of rounds ran for seconds)
    return [(datetime.fromisoformat(m[1]).timestamp(), int(m[2]), int(m[3])) for m in STAMP.finditer(log)]


def _report(name: str, seconds: float) -> None:
    # Collected by the issue note: the slowest recovery seen (fault to next completed round).
    print(f"\nRECOVERY {name}: {seconds:.2f} s")


# Victim p0 is the leader (lowest id); p9 is a follower.
@pytest.mark.parametrize("victim, phase", [("p9", "inner"), ("p0", "join"), ("p9", "reduce"), ("p0", "owner")])
def test_kill_at_each_phase_leaves_the_survivors_training(tmp_path, victim, phase):
    with Swarm(tmp_path, f"crash-{phase}-{os.getpid()}", ["--rounds", "0"]) as swarm:
        others = [swarm.start(pid, "--peer-id", pid, wait=False) for pid in ("p1", "p2")]
        bad = swarm.start(victim, "--peer-id", victim, "--faults", f"crash@3:{phase}", wait=False)
        for p in [*others, bad]:
            p.wait_listening(60)

        # Execute: the victim kills itself at round 3, phase `phase`
        bad.proc.wait(60)
        died = time.time()
        assert bad.proc.returncode == -signal.SIGKILL, bad.tail()

        # Assert: the survivors complete rounds without it, with identical parameters
        def two_peer_round_after_death():
            return [t for t, r, k in _done_times(others[0].log()) if t > died and k == 2]

        after = wait_until(two_peer_round_after_death, 40, "a 2-peer round after the crash", lambda: _logs(swarm))
        _report(f"kill -9 {victim} at {phase}", after[0] - died)
        assert after[0] - died < 30
        wait_until(lambda: len([r for r in consistent_rounds(others) if r > 3]) >= 3, 30,
                   "three more rounds on both survivors", lambda: _logs(swarm))
        assert check_invariant(swarm.peers) > 0
        assert all(p.alive() for p in others)
        assert "nan" not in " ".join(str(p.status()["loss"]) for p in others).lower()


def test_a_late_joiner_fetches_the_state_and_joins_the_next_round(tmp_path):
    with Swarm(tmp_path, f"join-{os.getpid()}", ["--rounds", "0"]) as swarm:
        first = [swarm.start(f"p{i}", wait=False) for i in range(2)]
        for p in first:
            p.wait_listening(60)
        wait_until(lambda: len(consistent_rounds(first)) >= 5, 60, "five rounds of the first two", lambda: _logs(swarm))

        joiner = swarm.start("late")
        wait_until(lambda: re.search(r"resynced to round \d+", joiner.log()), 30, "the joiner's state transfer",
                   lambda: _logs(swarm))
        m = re.search(r"resynced to round (\d+) \(\w+\) from (\w+): (\d+) bytes in ([0-9.]+) s \(([0-9.]+) MB/s\)",
                      joiner.log())
        assert int(m[1]) >= 5 and m[2] in {p.peer_id for p in first}
        print(f"\nSTATE TRANSFER {m[3]} bytes in {m[4]} s ({m[5]} MB/s)")
        # its next rounds are completed in one group with the other two, with the same hash
        wait_until(lambda: any(round_groups(joiner.log()).get(r, ("", ""))[0]
                               and len({round_groups(p.log()).get(r) for p in swarm.peers}) == 1
                               for r in round_groups(joiner.log())), 40,
                   "a round completed by all three in one group", lambda: _logs(swarm))
        assert check_invariant(swarm.peers) > 0
        assert re.search(r"round \d+ done: 3 peers", joiner.log())


def test_a_donor_killed_while_serving_state_does_not_stop_the_joiner(tmp_path):
    # Both donors stall at round 3 (serving continues): they sit at the same round, so the
    # joiner asks the lowest id first — p1, which dies while serving.
    with Swarm(tmp_path, f"donor-{os.getpid()}", ["--rounds", "0"]) as swarm:
        d1 = swarm.start("p1", "--peer-id", "p1", "--faults", "stall@3:inner,crash@*:serve_state", wait=False)
        d2 = swarm.start("p2", "--peer-id", "p2", "--faults", "stall@3:inner", wait=False)
        for p in (d1, d2):
            p.wait_listening(60)
        wait_until(lambda: d1.status()["round"] == 3 and d2.status()["round"] == 3, 60, "both donors at round 3",
                   lambda: _logs(swarm))

        joiner = swarm.start("p5", "--peer-id", "p5")
        wait_until(lambda: "resynced to round 3" in joiner.log(), 40, "the joiner to get the state from p2",
                   lambda: _logs(swarm))
        assert d1.proc.wait(10) == -signal.SIGKILL
        assert re.search(rf"state transfer from {d1.peer_id} failed", joiner.log()), joiner.log()
        assert re.search(rf"resynced to round 3 \(\w+\) from {d2.peer_id}", joiner.log())
        assert joiner.status()["global_hash"] == d2.status()["global_hash"]


def test_a_restarted_peer_resumes_from_its_checkpoint_then_catches_up(tmp_path):
    with Swarm(tmp_path, f"restart-{os.getpid()}", ["--rounds", "0"]) as swarm:
        peers = [swarm.start(f"p{i}", "--peer-id", f"p{i}", "--checkpoint-interval-s", "0.2", wait=False)
                 for i in range(3)]
        for p in peers:
            p.wait_listening(60)
        wait_until(lambda: len(consistent_rounds(peers)) >= 4, 60, "four rounds together", lambda: _logs(swarm))

        # Execute: kill -9, let the others move on, restart with the same state dir
        os.killpg(peers[2].proc.pid, signal.SIGKILL)
        peers[2].proc.wait(10)
        ckpt = tmp_path / "p2" / "checkpoint.safetensors"
        assert ckpt.exists()
        before = max(consistent_rounds(peers[:2]))
        wait_until(lambda: len([r for r in consistent_rounds(peers[:2]) if r > before]) >= 3, 40,
                   "the others go on: three rounds together after the kill", lambda: _logs(swarm))
        again = swarm.start("p2", "--peer-id", "p2")

        # Assert
        wait_until(lambda: re.search(r"resumed from checkpoint .* at round (\d+)", again.log()), 20,
                   "resume from the checkpoint", lambda: _logs(swarm))
        wait_until(lambda: "resynced to round" in again.log().split("resumed from checkpoint")[-1], 30,
                   "the restarted peer to catch up from a donor", lambda: _logs(swarm))
        wait_until(lambda: len([r for r in consistent_rounds([peers[0], peers[1], again])
                                if r > 8]) >= 1, 40, "a round of all three after the restart",
                   lambda: _logs(swarm))
        check_invariant(swarm.peers)


def test_three_peers_at_three_states_converge_on_the_highest_round(tmp_path):
    # p0 and p1 train alone first (3 rounds, 1 round) and p2 not at all, then all three start
    # from those checkpoints: three states, no two alike, so no state is ever attested. (CI met
    # this after a kill -9 mid-round left the two survivors a round apart and the victim came
    # back from an older checkpoint: every leader refused the others' rounds, for good.)
    with Swarm(tmp_path, f"split-{os.getpid()}", ["--rounds", "0"]) as swarm:
        for i, rounds in enumerate((3, 1)):
            alone = swarm.start(f"alone{i}", "--peer-id", f"p{i}", "--state-dir", str(tmp_path / f"p{i}"),
                                "--rounds", str(rounds), "--startup-grace-s", "0")
            assert alone.proc.wait(60) == 0, alone.tail()
        peers = [swarm.start(f"p{i}", "--peer-id", f"p{i}", wait=False) for i in range(3)]
        for p in peers:
            p.wait_listening(60)

        # Assert: the two behind move to the highest round's state (round 3, or later if p0 led
        # itself through groups of one meanwhile): the first to move takes it as a split's, after
        # its wait, counted; the other may by then see two peers sharing it (a plurality)
        for p in peers[1:]:
            wait_until(lambda p=p: "resynced to round" in p.log(), 60, "the split to heal", lambda: _logs(swarm))
        split = re.compile(r"resynced to round (\d+) .*no two peers share a state")
        healed = [p for p in peers[1:] if split.search(p.log())]
        assert healed, _logs(swarm)
        for p in healed:
            assert int(split.search(p.log())[1]) >= 3
            assert metric(p.metrics_port, "peer_sync_split_adoptions_total") == 1
        assert "resynced" not in peers[0].log()
        wait_until(lambda: consistent_rounds(peers), 30, "a round of all three in one group", lambda: _logs(swarm))
        check_invariant(swarm.peers)


def test_a_torn_checkpoint_is_detected_and_not_loaded(tmp_path):
    with Swarm(tmp_path, f"torn-{os.getpid()}", ["--rounds", "3"]) as swarm:
        p = swarm.start("p0", "--peer-id", "p0")
        assert p.proc.wait(60) == 0, p.tail()
        ckpt = tmp_path / "p0" / "checkpoint.safetensors"
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])  # torn: half written
        again = swarm.start("p0-again", "--peer-id", "p0", "--state-dir", str(tmp_path / "p0"), "--rounds", "1")
        assert again.proc.wait(60) == 0, again.tail()
        assert re.search(r"not resuming from .*checkpoint.safetensors: .*torn or corrupt", again.log())
        assert "resumed from checkpoint" not in again.log()
        assert "initial eval loss" in again.log() and "at round 0" in again.log()


def test_sigterm_mid_training_leaves_cleanly_and_nobody_waits(tmp_path):
    with Swarm(tmp_path, f"leave-{os.getpid()}", ["--rounds", "0"]) as swarm:
        peers = [swarm.start(f"p{i}", "--peer-id", f"p{i}", wait=False) for i in range(3)]
        for p in peers:
            p.wait_listening(60)
        wait_until(lambda: len(consistent_rounds(peers)) >= 5, 60, "five rounds together", lambda: _logs(swarm))

        # Execute: stop the leader while rounds are running
        leaver, others = peers[0], peers[1:]
        t0 = time.time()
        leaver.signal(signal.SIGTERM)
        assert leaver.proc.wait(10) == 0, leaver.tail()
        stopped_s = time.time() - t0

        # Assert: it said goodbye, checkpointed, and the others went on at once without it
        assert stopped_s < 10
        assert (tmp_path / "p0" / "checkpoint.safetensors").exists()
        for p in others:
            # Either its Leave RPC or its "leaving" answer to a JoinRound told them first.
            wait_until(lambda p=p: re.search(rf"peer left: {leaver.peer_id} \((said goodbye|it is leaving)\)",
                                             p.log()), 10, "the goodbye", lambda: _logs(swarm))
            assert leaver.peer_id not in p.status()["peers"]
        after = wait_until(lambda: [t for t, r, k in _done_times(others[0].log()) if t > t0 and k == 2], 20,
                           "a 2-peer round after the leave", lambda: _logs(swarm))
        _report("SIGTERM of the leader", after[0] - t0)
        assert after[0] - t0 < 10
        check_invariant(swarm.peers)
