"""Library mode: a process running its own training loop with ``peer.Swarm`` trains with
``peer run`` peers of the same run (real processes, sockets and credentials on 127.0.0.1)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import peer
from peer.sync.outer import tensor_digest
from peer.trainer import flatten_state
from tests.integration._peers import PeerProc, check_invariant, credentials_for, metric, round_hashes, wait_until
from tests.integration._peers import Swarm as Peers

REPO = Path(__file__).resolve().parents[2]


def _start_library_peer(tmp: Path, run_id: str, *args: str) -> PeerProc:
    """tests/integration/_swarm_peer.py as a process, from the repository root (so it imports
    this checkout's ``peer``), in its own session."""
    log_path = tmp / "library.log"
    argv = [sys.executable, "-m", "tests.integration._swarm_peer", "--run-id", run_id,
            "--credentials", str(credentials_for(run_id)), "--state-dir", str(tmp / "library"), *args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                                start_new_session=True)
    return PeerProc("library", proc, log_path)


def _kill(p: PeerProc) -> None:
    if p.proc.poll() is None:
        os.killpg(p.proc.pid, signal.SIGKILL)
        p.proc.wait(5)


def test_a_swarm_process_catches_up_and_trains_with_two_peer_run_peers_with_equal_hashes(tmp_path):
    run_id = f"lib-{os.getpid()}"
    # Rounds of 100 steps (not FAST's 10) and a short start-up grace for the joiner: between
    # its handshake and its catch-up, a joiner is still at round 0 and yet a possible leader
    # of the others' rounds; with rounds of milliseconds, many rounds fall into that window
    # (an open weakness of leader rotation, not of library mode; see the report of this change).
    with Peers(tmp_path, run_id, ["--codec", "int8", "--inner-steps", "100"]) as peers:
        # Prepare: two `peer run` peers, a few rounds ahead when the library peer starts
        a, b = peers.start("p0", wait=False), peers.start("p1", wait=False)
        a.wait_listening(60)
        b.wait_listening(60)
        wait_until(lambda: len(round_hashes(a.log())) >= 2, 120, "two rounds of the peer run peers",
                   lambda: a.tail() + b.tail())
        # Execute: the library peer joins, trains 4 rounds with its own loop and leaves (with block)
        lib = _start_library_peer(tmp_path, run_id, "--rounds", "4", "--inner-steps", "100",
                                  "--startup-grace-s", "1")
        try:
            code = lib.proc.wait(200)
        finally:
            _kill(lib)
        peer_logs = a.tail(60) + "\n" + b.tail(60)
        assert code == 0, f"library peer exited {code}:\n{lib.tail(60)}\n{peer_logs}"
        # ... and the two others go on without it
        after = max(round_hashes(a.log()))
        wait_until(lambda: max(round_hashes(a.log())) > after, 60, "a round after the library peer left",
                   lambda: a.tail() + b.tail())
        alive = [p.alive() for p in (a, b)]
    log = lib.log()

    # Assert 1: it caught up from a donor before it trained (the others were at round 2 or later)
    caught_up = re.search(r"resynced to round (\d+)", log)
    assert caught_up and int(caught_up[1]) >= 2, log
    first_done = re.search(r"round \d+ done:", log)
    assert first_done and caught_up.start() < first_done.start(), log
    joined = re.search(r"joined at round (\d+), model (\w+), global (\w+)", log)
    assert joined and int(joined[1]) >= 2 and joined[2] == joined[3], log

    # Assert 2: rounds with all three, and after each the same global hash on all three
    together = [int(r) for r in re.findall(r"round (\d+) done: 3 peers", log)]
    assert len(together) >= 2, log
    mine, ha, hb = round_hashes(log), round_hashes(a.log()), round_hashes(b.log())
    for r in together:
        assert mine[r] == ha[r] == hb[r], f"round {r}: {mine[r]} {ha.get(r)} {hb.get(r)}"
    assert check_invariant([a, b, lib]) >= len(together)

    # Assert 3: after every round the user's model held exactly the new global parameters
    held = {int(r): h for h, r in re.findall(r"model holds global (\w+) at round (\d+)", log)}
    assert len(held) >= 4, log
    for r in together:
        assert held[r + 1] == mine[r], f"round {r}: model {held[r + 1]}, global {mine[r]}"

    # Assert 4: it left cleanly (said so, no thread left behind), and the others kept training
    assert re.search(r"peer \w+ stopped at round \d+", log), log
    assert "threads left after close: []" in log, log
    assert alive == [True, True]


def test_a_swarm_left_open_is_closed_when_the_interpreter_exits(tmp_path):
    run_id = f"lib-exit-{os.getpid()}"
    # Prepare / Execute: alone, two rounds, then main returns without close()
    lib = _start_library_peer(tmp_path, run_id, "--rounds", "2", "--no-close")
    try:
        code = lib.proc.wait(120)
    finally:
        _kill(lib)
    log = lib.log()

    # Assert: it exited 0 after stopping the daemon the way `peer run` stops on SIGTERM
    assert code == 0, log
    stopped = re.search(r"peer \w+ stopped at round (\d+)", log)
    assert stopped and int(stopped[1]) >= 2, log
    assert "leaving the run" in log, log


@pytest.mark.parametrize("overlap", [False, True])
def test_a_swarm_inside_this_process_trains_serves_metrics_and_leaves_no_thread(tmp_path, overlap):
    """In the test process itself, so the suite's guards (tests/conftest.py) fail the test if the
    swarm blocks its event loop or leaves a thread behind after close(). With overlap, each
    round runs while the next phase trains; closing waits for the round in flight."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    returned, held = [], []
    before = set(threading.enumerate())
    # Prepare: alone (no discovery), H = 3
    with peer.Swarm(model, run_id=f"lib-in-{os.getpid()}", insecure=True, inner_steps=3, listen="127.0.0.1:0",
                    metrics_port=0, mdns=False, startup_grace_s=0.5, state_dir=str(tmp_path),
                    overlap=overlap) as swarm:
        # Execute: six optimizer steps of an ordinary loop
        for _ in range(6):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            returned.append(swarm.step(samples=8, loss=loss))
            if returned[-1]:
                held.append(tensor_digest(flatten_state(model)) == swarm.global_hash)
        port = swarm.metrics_port
        counts = [metric(port, 'peer_rounds_total{outcome="completed"}'), metric(port, "peer_train_inner_steps_total"),
                  metric(port, "peer_train_samples_total")]
    swarm.close()  # idempotent
    left = [t.name for t in threading.enumerate() if t not in before]

    # Assert: a round every third step, the model held the global parameters after each (with
    # overlap: plus its own progress), the same metrics as `peer run`, no thread left once
    # close() returned (without waiting for the suite's garbage collection), and a closed swarm
    # refuses further steps
    assert returned == [False, False, True, False, False, True]
    assert swarm.round == swarm.completed_rounds == 2
    if overlap:
        assert counts[0] in (1.0, 2.0) and counts[1:] == [6.0, 48.0]  # the second round may be in flight
    else:
        assert held == [True, True]
        assert counts == [2.0, 6.0, 48.0]
    assert left == []
    with pytest.raises(peer.SwarmStopped, match="closed"):
        swarm.step()
