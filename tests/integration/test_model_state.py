"""A BatchNorm model trained by real peers: its buffers are global state (averaged, fetched by a
joiner, in the hash, checkpointed, evaluated), `peer export` gets the model out from a running
peer and from a state dir, and the inner learning-rate schedule continues across a late join."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from peer.sync.state import checkpoint_metadata
from peer.trainer.schedule import LRSchedule
from tests.integration._peers import Swarm, check_invariant, consistent_rounds, metric, wait_until
from tests.tasks.bn_digits import BNDigitsTask

TASK = "tests.tasks.bn_digits:BNDigitsTask"
H = 10  # --inner-steps of the FAST settings
LAST = 8  # every peer stalls before the inner phase of this round: the state stays at round LAST
STARTS_RE = re.compile(r"inner phase starts at global step (\d+), inner lr (\S+)")


def _logs(swarm: Swarm) -> str:
    return "\n".join(f"--- {p.name}\n{p.tail(30)}" for p in swarm.peers)


def _export(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peer", "export", *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bn_swarm_evaluates_its_buffers_and_exports_the_model(tmp_path):
    torch.set_num_threads(1)
    args = ["--task", TASK, "--rounds", "0", "--checkpoint-interval-s", "0", "--faults", f"stall@{LAST}:inner"]
    with Swarm(tmp_path, f"bn-{os.getpid()}", args) as swarm:
        # Prepare
        peers = [swarm.start(f"p{i}", "--peer-id", f"p{i}", wait=False) for i in range(3)]
        for p in peers:
            p.wait_listening(60)

        # Execute: every peer reaches round LAST (training or resyncing), evaluates, and stops
        # before training on
        stalled = f"stall at round {LAST} phase inner"
        wait_until(lambda: all(stalled in p.log() for p in peers), 180, f"all three at round {LAST}",
                   lambda: _logs(swarm))
        statuses = [p.status() for p in peers]
        out = tmp_path / "model.safetensors"
        done = _export(peers[0].grpc, "--credentials", str(peers[0].credentials), "--out", str(out))

        # Assert 1: one global state, and it holds trained BatchNorm statistics
        assert done.returncode == 0, done.stderr
        assert {s["round"] for s in statuses} == {LAST}
        assert len({s["global_hash"] for s in statuses}) == 1
        assert check_invariant(peers) >= 1  # at least one round had several members
        meta = checkpoint_metadata(out.read_bytes())
        assert meta["round"] == str(LAST) and meta["global_hash"] == statuses[0]["global_hash"]
        assert meta["task"] == TASK and meta["run_id"] == swarm.run_id
        task = BNDigitsTask()
        model = task.build_model()
        model.load_state_dict(load_file(str(out)), strict=True)
        bn = model[1]
        assert not torch.equal(bn.running_mean, torch.zeros(8))  # trained statistics, not the initial ones
        assert not torch.equal(bn.running_var, torch.ones(8))
        assert int(bn.num_batches_tracked) == 0  # integer buffers keep the global (initial) value

        # Assert 2: every peer's evaluation is the reference evaluation of the exported file
        reference = task.evaluate(model, torch.device("cpu"))["loss"]
        assert math.isfinite(reference)
        for p, s in zip(peers, statuses, strict=True):
            assert s["eval_loss"] is not None and math.isclose(s["eval_loss"], reference, rel_tol=1e-6,
                                                              abs_tol=1e-6), (p.name, s, reference, p.tail())

        # Assert 3: a task whose model does not match the peer's is refused, --out left alone
        wrong = _export(peers[0].grpc, "--credentials", str(peers[0].credentials), "--task", "digits",
                        "--out", str(out))
        assert wrong.returncode == 2 and "does not match the model of peer" in wrong.stderr
        assert len(wrong.stderr.strip().splitlines()) == 1
        assert load_file(str(out)).keys() == set(model.state_dict())

        # Execute: stop one peer (it checkpoints) and export from its state dir
        peers[1].signal(signal.SIGTERM)
        assert peers[1].proc.wait(20) == 0, peers[1].tail()
        from_dir = tmp_path / "from-dir.safetensors"
        again = _export("--state-dir", str(tmp_path / "p1"), "--out", str(from_dir))

    # Assert 4: the checkpoint holds the same state, loadable strictly
    assert again.returncode == 0, again.stderr
    a, b = load_file(str(out)), load_file(str(from_dir))
    assert a.keys() == b.keys() == set(model.state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_late_joiner_fetches_the_buffers_and_continues_the_schedule(tmp_path):
    # bf16 autocast on CPU, too: the inner phase only; the state stays float32 and bit-identical.
    args = ["--task", TASK, "--rounds", "0", "--inner-lr-schedule", "cosine", "--warmup-steps", "15",
            "--total-steps", "100000", "--precision", "bf16"]
    with Swarm(tmp_path, f"bnlate-{os.getpid()}", args) as swarm:
        # Prepare: two peers train; a third joins once they completed two rounds
        first = [swarm.start(f"p{i}", "--peer-id", f"p{i}", wait=False) for i in range(2)]
        for p in first:
            p.wait_listening(60)
        wait_until(lambda: len(consistent_rounds(first)) >= 2, 90, "two rounds of two peers", lambda: _logs(swarm))

        # Execute
        late = swarm.start("p2", "--peer-id", "p2")
        wait_until(lambda: STARTS_RE.search(late.log().split("resynced to round")[-1])
                   if "resynced to round" in late.log() else None, 90, "the joiner's first inner phase",
                   lambda: _logs(swarm))
        joined = int(re.search(r"resynced to round (\d+)", late.log())[1])
        wait_until(lambda: [r for r in consistent_rounds([*first, late]) if r > joined], 90,
                   "a round of all three after the join", lambda: _logs(swarm))

        # Assert: it started at the swarm's point of the schedule (not at step 0), and holds the
        # swarm's state, buffers included (the hash covers them)
        step, lr = STARTS_RE.search(late.log().split("resynced to round")[1]).groups()
        assert joined > 0 and int(step) == joined * H
        expected = BNDigitsTask.defaults.inner_lr * LRSchedule("cosine", 15, 100000).factor(int(step))
        assert math.isclose(float(lr), expected, rel_tol=1e-5), (step, lr, expected)
        assert STARTS_RE.search(first[0].log())[1] == "0"  # the first peers started the schedule at 0
        assert 0 < metric(late.metrics_port, "peer_train_inner_lr") <= BNDigitsTask.defaults.inner_lr
        check_invariant(swarm.peers)


def test_export_from_a_peer_without_a_completed_round_is_refused(tmp_path):
    with Swarm(tmp_path, f"bn0-{os.getpid()}", ["--task", TASK, "--inner-steps", "1000000"]) as swarm:
        peer = swarm.start("p0")
        out = tmp_path / "model.safetensors"
        out.write_bytes(b"keep me")

        done = _export(peer.grpc, "--credentials", str(peer.credentials), "--out", str(out))

        assert done.returncode == 2
        assert done.stderr.strip().count("\n") == 0 and "has completed no round yet" in done.stderr
        assert out.read_bytes() == b"keep me"
