"""The foundation: real `peer run` processes on 127.0.0.1 find each other, refuse strangers,
and leave cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


from tests.integration._peers import Swarm, wait_until


def _logs(swarm: Swarm) -> str:
    return "\n".join(f"--- {p.name}\n{p.tail(25)}" for p in swarm.peers)


def _peers_json(run_id: str | None, timeout: float = 3.0) -> list[dict]:
    argv = [sys.executable, "-m", "peer", "peers", "--interface", "127.0.0.1", "--timeout", str(timeout), "--json"]
    if run_id:
        argv += ["--run-id", run_id]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 20, check=True)
    return json.loads(out.stdout)


def test_three_peers_find_each_other_and_strangers_stay_out(tmp_path):
    run_id = f"found-{os.getpid()}"
    with Swarm(tmp_path, run_id, ["--rounds", "0", "--inner-steps", "5"]) as swarm:
        # Prepare: start all four at once; time discovery from the moment the last one listens
        peers = [swarm.start(f"p{i}", wait=False) for i in range(3)]
        other = swarm.start("other", run_id=f"{run_id}-other", wait=False)
        for p in [*peers, other]:
            p.wait_listening(60)
        started = time.monotonic()
        ids = {p.peer_id for p in peers}

        # Execute: every peer lists the other two
        def all_connected():
            return all(set(p.status()["peers"]) == ids - {p.peer_id} for p in peers)

        wait_until(all_connected, 10, "three peers to see each other", lambda: _logs(swarm))
        elapsed = time.monotonic() - started

        # Assert
        assert elapsed < 10
        listed = _peers_json(run_id)
        assert {r["peer_id"] for r in listed} == ids
        assert other.peer_id not in {r["peer_id"] for r in listed}
        assert other.status()["peers"] == []
        # ... and counted as ignored by the peers' discovery
        wait_until(lambda: 'peer_discovery_ignored_total{reason="other_run"}' in _metrics(peers[0].metrics_port), 5,
                   "the ignored run in the metrics")
        for p in peers:
            assert other.peer_id not in p.status()["peers"]
            assert "peer joined: " in p.log()


def test_a_different_model_is_refused_with_a_clear_message(tmp_path):
    run_id = f"schema-{os.getpid()}"
    with Swarm(tmp_path, run_id, ["--rounds", "0"]) as swarm:
        a = swarm.start("a")
        b = swarm.start("b", "--task", "fashion")

        def refused():
            return "schema_mismatch" in a.log() and "schema_mismatch" in b.log()

        wait_until(refused, 10, "a schema refusal in both logs", lambda: _logs(swarm))
        assert "model schema differs" in a.log()
        assert a.status()["peers"] == [] and b.status()["peers"] == []
        assert a.alive() and b.alive()
        metrics = _metrics(a.metrics_port)
        assert 'peer_handshake_refusals_total{reason="schema_mismatch"}' in metrics


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_sigterm_leaves_the_view_of_the_others_and_exits_zero(tmp_path):
    run_id = f"leave-{os.getpid()}"
    with Swarm(tmp_path, run_id, ["--rounds", "0"]) as swarm:
        peers = [swarm.start(f"p{i}") for i in range(3)]
        ids = {p.peer_id for p in peers}
        wait_until(lambda: all(len(p.status()["peers"]) == 2 for p in peers), 10, "a full mesh",
                   lambda: _logs(swarm))

        # Execute
        leaver = peers[2]
        t0 = time.monotonic()
        leaver.signal(signal.SIGTERM)
        code = leaver.proc.wait(10)
        stop_s = time.monotonic() - t0

        # Assert: exit 0 within 10 s, gone from the others' view (and mDNS) within 10 s
        assert code == 0, leaver.tail()
        assert stop_s < 10
        wait_until(lambda: all(leaver.peer_id not in p.status()["peers"] for p in peers[:2]), 10,
                   "the others to drop the leaver", lambda: _logs(swarm))
        wait_until(lambda: leaver.peer_id not in {r["peer_id"] for r in _peers_json(run_id, 2.0)}, 10,
                   "mDNS to forget the leaver")
        assert {r["peer_id"] for r in _peers_json(run_id, 2.0)} == ids - {leaver.peer_id}


def test_status_json_has_the_documented_fields(tmp_path):
    with Swarm(tmp_path, f"st-{os.getpid()}", ["--rounds", "0"]) as swarm:
        p = swarm.start("solo")
        creds = ["--credentials", p.credentials]
        out = subprocess.run([sys.executable, "-m", "peer", "status", p.grpc, "--json", *creds], capture_output=True,
                             text=True, timeout=30, check=True)
        s = json.loads(out.stdout)
        for key in ("peer_id", "run_id", "round", "inner_step", "loss", "global_hash", "peers"):
            assert key in s
        assert s["peer_id"] == p.peer_id and len(s["global_hash"]) == 64
        human = subprocess.run([sys.executable, "-m", "peer", "status", p.grpc, *creds], capture_output=True,
                               text=True, timeout=30, check=True).stdout
        assert f"peer {p.peer_id}" in human and "round" in human and "TLS" in human
        # without the run's credentials the daemon does not answer, and the message says why
        bare = subprocess.run([sys.executable, "-m", "peer", "status", p.grpc, "--timeout", "3"], capture_output=True,
                              text=True, timeout=30)
        assert bare.returncode == 2 and "--credentials" in bare.stderr, bare.stderr


def test_status_of_an_unreachable_address_fails_clearly():
    out = subprocess.run([sys.executable, "-m", "peer", "status", "127.0.0.1:1", "--timeout", "2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "Status to 127.0.0.1:1" in out.stderr and "UNAVAILABLE" in out.stderr


def test_bad_config_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "peer", "run", "--run-id", "x", "--codec", "int3",
                          "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "int3" in out.stderr and "int8" in out.stderr
