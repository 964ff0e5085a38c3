"""Local-tool plumbing: the endpoint file a daemon writes, and the status dict the tools print."""

from __future__ import annotations

import json
import math
import os

import pytest

from peer.client import human_bytes, status_dict
from peer.endpoint import ENDPOINT_FILE, Endpoint, read_endpoint, write_endpoint
from peer.types import LocalRank, PeerInfo, StatusInfo


def test_endpoint_round_trip_names_this_process(tmp_path):
    path = write_endpoint(tmp_path / "state", peer_id="p1", grpc="127.0.0.1:7070", metrics_port=9470)

    assert path == tmp_path / "state" / ENDPOINT_FILE
    assert json.loads(path.read_text()) == {"peer_id": "p1", "grpc": "127.0.0.1:7070", "metrics_port": 9470,
                                            "pid": os.getpid()}
    expected = Endpoint("p1", "127.0.0.1:7070", 9470, os.getpid())
    assert read_endpoint(tmp_path / "state") == expected
    assert read_endpoint(tmp_path / "state", pid=os.getpid()) == expected
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [ENDPOINT_FILE]  # no temp file left


def test_endpoint_rewrite_replaces_the_old_one(tmp_path):
    write_endpoint(tmp_path, peer_id="p1", grpc="127.0.0.1:1000", metrics_port=1)
    write_endpoint(tmp_path, peer_id="p1", grpc="127.0.0.1:2000", metrics_port=2)

    assert read_endpoint(tmp_path).grpc == "127.0.0.1:2000"
    assert [p.name for p in tmp_path.iterdir()] == [ENDPOINT_FILE]


def test_endpoint_of_another_process_is_stale(tmp_path):
    # A file left by an earlier run in the same state dir: written by another pid.
    (tmp_path / ENDPOINT_FILE).write_text(json.dumps({"peer_id": "p1", "grpc": "127.0.0.1:7070",
                                                      "metrics_port": 9470, "pid": os.getpid() + 1}))

    assert read_endpoint(tmp_path, pid=os.getpid()) is None
    assert read_endpoint(tmp_path, pid=os.getpid() + 1) is not None
    assert read_endpoint(tmp_path) is not None  # no pid asked for: any writer


def test_endpoint_missing_is_none(tmp_path):
    assert read_endpoint(tmp_path) is None
    assert read_endpoint(tmp_path / "no-such-dir", pid=1) is None


@pytest.mark.parametrize("content", [
    "",
    "{",
    '{"peer_id": "p1", "grpc": "127.0.0.1:7070", "metrics_port": 9470',  # torn write
    "[1, 2]",
    "null",
    '{"grpc": "127.0.0.1:7070", "metrics_port": 9470, "pid": 5}',
    '{"peer_id": "", "grpc": "127.0.0.1:7070", "metrics_port": 9470, "pid": 5}',
    '{"peer_id": "p1", "grpc": "no-port", "metrics_port": 9470, "pid": 5}',
    '{"peer_id": "p1", "grpc": "127.0.0.1:7070", "metrics_port": "9470", "pid": 5}',
    '{"peer_id": "p1", "grpc": "127.0.0.1:7070", "metrics_port": true, "pid": 5}',
    '{"peer_id": "p1", "grpc": "127.0.0.1:7070", "metrics_port": 70000, "pid": 5}',
    '{"peer_id": "p1", "grpc": "127.0.0.1:7070", "metrics_port": 9470, "pid": 0}',
    '{"peer_id": "p1", "grpc": "127.0.0.1:7070", "metrics_port": 9470, "pid": 5.0}',
    '{"peer_id": 7, "grpc": "127.0.0.1:7070", "metrics_port": 9470, "pid": 5}',
])
def test_endpoint_malformed_is_none(tmp_path, content):
    (tmp_path / ENDPOINT_FILE).write_text(content)

    assert read_endpoint(tmp_path) is None
    assert read_endpoint(tmp_path, pid=5) is None


def test_endpoint_not_utf8_is_none(tmp_path):
    (tmp_path / ENDPOINT_FILE).write_bytes(b"\xff\xfe{}")

    assert read_endpoint(tmp_path) is None


def _status(**kw) -> StatusInfo:
    peer = PeerInfo(peer_id="p1", run_id="lab1", protocol_version=1, schema_hash="s", round=7,
                    global_hash="ab" * 32, address="10.0.0.1:7070", metrics_port=9470, task="fashion")
    return StatusInfo(peer=peer, **kw)


def test_status_dict_has_every_field_and_nan_becomes_none():
    s = status_dict(_status(inner_step=350, loss=0.5, eval_loss=math.nan, peers=("p2", "p3"), bytes_sent=10,
                            bytes_received=20, last_round_s=1.5, phase="inner", samples=64, rounds_completed=7,
                            rounds_failed=1, codec="int8",
                            local_ranks=(LocalRank(0, 11, "cpu", True, 32), LocalRank(1, 12, "cpu", False, 32))))

    assert s == {
        "peer_id": "p1", "run_id": "lab1", "task": "fashion", "address": "10.0.0.1:7070", "round": 7,
        "inner_step": 350, "loss": 0.5, "eval_loss": None, "eval_accuracy": None, "global_hash": "ab" * 32,
        "peers": ["p2", "p3"], "phase": "inner", "codec": "int8", "samples": 64, "bytes_sent": 10,
        "bytes_received": 20, "last_round_s": 1.5, "rounds_completed": 7, "rounds_failed": 1,
        "metrics_port": 9470,
        "local_ranks": [{"rank": 0, "pid": 11, "device": "cpu", "alive": True, "samples": 32},
                        {"rank": 1, "pid": 12, "device": "cpu", "alive": False, "samples": 32}],
    }
    json.dumps(s, allow_nan=False)  # what `peer status --json` prints is strict JSON


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                     (5 * 2**20, "5.0 MiB"), (3 * 2**30, "3.0 GiB"), (2**40, "1.0 TiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_demo_does_not_import_the_cli():
    # The status client lives in peer.client; peer.demo must not pull in peer.cli (no circle).
    import subprocess
    import sys

    code = "import sys, peer.demo; print('peer.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
