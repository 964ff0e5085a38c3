"""Strangers and liars against a running swarm with run credentials (real processes, real TLS).

The four attacks that once took a run over, each driven by a stranger with no credentials
(plain TCP) and by one with TLS and a CA of its own: nothing it sends is answered, and the
peers keep completing rounds with equal hashes. A member (it holds the run's credentials) that
names another peer in a call is refused with PERMISSION_DENIED and counted.
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

from peer.credentials import create_run_credentials
from peer.transport.gen import peer_pb2 as pb
from peer.transport.gen import peer_pb2_grpc as pb_grpc
from peer.types import PROTOCOL_VERSION
from tests.integration._peers import Swarm, check_invariant, consistent_rounds, metric, tls_channel, wait_until


def _stranger(kind: str, address: str, run_id: str, tmp_path):
    if kind == "plain":
        return grpc.aio.insecure_channel(address)
    own = create_run_credentials(run_id, tmp_path / f"own-ca-{time.monotonic_ns()}")  # same run id, other CA
    return tls_channel(address, own)[0]


def _fake_info(run_id: str, schema: str, peer_id: str, rnd: int) -> pb.PeerInfo:
    return pb.PeerInfo(peer_id=peer_id, run_id=run_id, protocol_version=PROTOCOL_VERSION, schema_hash=schema, round=rnd,
                       global_hash="ab" * 32, address="127.0.0.1:9", codecs=["int8", "evil"])


async def _attack(kind: str, targets: list, run_id: str, schema: str, victim_ids: list[str], tmp_path,
                  seconds: float) -> dict[str, set[str]]:
    """Every attack against every target; returns the status codes each attack got."""
    codes: dict[str, set[str]] = {}

    def note(what: str, code: str) -> None:
        codes.setdefault(what, set()).add(code)

    for address in targets:
        async with _stranger(kind, address, run_id, tmp_path) as channel:
            stub = pb_grpc.PeerServiceStub(channel)
            # 1. read the run's identity and download the model
            for what, call in (("Status", lambda: stub.Status(pb.StatusRequest(), timeout=3)),):
                try:
                    await call()
                    note(what, "OK")
                except grpc.aio.AioRpcError as exc:
                    note(what, exc.code().name)
            try:
                [m async for m in stub.GetState(pb.GetStateRequest(run_id=run_id, peer_id="x", schema_hash=schema),
                                                timeout=3)]
                note("GetState", "OK")
            except grpc.aio.AioRpcError as exc:
                note("GetState", exc.code().name)
            # 2. a made-up state far ahead; 3. the lowest id, to lead everyone
            for what, info in (("Handshake-ahead", _fake_info(run_id, schema, "ffff", 1_000_000)),
                               ("Handshake-id0", _fake_info(run_id, schema, "0", 0))):
                try:
                    await stub.Handshake(pb.HandshakeRequest(peer=info), timeout=3)
                    note(what, "OK")
                except grpc.aio.AioRpcError as exc:
                    note(what, exc.code().name)
            # 4. Leave in another peer's name, every 50 ms (bounded)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for victim in victim_ids:
                    try:
                        await stub.Leave(pb.LeaveRequest(run_id=run_id, peer_id=victim), timeout=1)
                        note("Leave", "OK")
                    except grpc.aio.AioRpcError as exc:
                        note("Leave", exc.code().name)
                await asyncio.sleep(0.05)
    return codes


@pytest.mark.parametrize("kind", ["plain", "own-ca"])
def test_a_stranger_gets_no_answer_and_the_run_goes_on(tmp_path, kind):
    run_id = f"closed-{kind}-{os.getpid()}"
    with Swarm(tmp_path, run_id, ["--rounds", "0"]) as swarm:
        peers = [swarm.start(f"p{i}", wait=False) for i in range(2)]
        for p in peers:
            p.wait_listening(60)
        logs = lambda: "\n".join(p.tail(25) for p in peers)  # noqa: E731
        wait_until(lambda: len(consistent_rounds(peers)) >= 2, 60, "two rounds", logs)
        schema = peers[0].status()["global_hash"]  # any string: the schema check never gets that far
        before = max(consistent_rounds(peers))
        # Execute: all four attacks against both peers, the Leave flood for 3 s each
        codes = asyncio.run(_attack(kind, [p.grpc for p in peers], run_id, schema, [p.peer_id for p in peers],
                                    tmp_path, seconds=3.0))
        # Assert: not one call answered (the TLS handshake fails first)
        assert set(codes) == {"Status", "GetState", "Handshake-ahead", "Handshake-id0", "Leave"}
        assert all("OK" not in got for got in codes.values()), codes
        # ... the peers went on together: more rounds, equal hashes, only each other as members
        wait_until(lambda: max(consistent_rounds(peers)) >= before + 3, 60, "rounds after the attack", logs)
        assert check_invariant(peers) >= 3
        for p in peers:
            s = p.status()
            others = {q.peer_id for q in peers} - {p.peer_id}
            assert set(s["peers"]) == others and s["round"] < 1000, s
            assert "resynced" not in p.log() and "said goodbye" not in p.log()


def test_a_member_that_names_another_peer_is_refused_and_counted(tmp_path):
    run_id = f"liar-{os.getpid()}"
    with Swarm(tmp_path, run_id, ["--rounds", "0"]) as swarm:
        a, b = (swarm.start(n, wait=False) for n in ("a", "b"))
        for p in (a, b):
            p.wait_listening(60)
        logs = lambda: a.tail(25) + "\n" + b.tail(25)  # noqa: E731
        wait_until(lambda: len(consistent_rounds([a, b])) >= 2, 60, "two rounds", logs)

        async def lie() -> dict[str, str]:
            channel, me = tls_channel(b.grpc, a.credentials)  # a holder of the run's credentials
            got = {}
            async with channel:
                stub = pb_grpc.PeerServiceStub(channel)
                calls = {
                    "Leave": lambda: stub.Leave(pb.LeaveRequest(run_id=run_id, peer_id=a.peer_id), timeout=3),
                    "Handshake": lambda: stub.Handshake(pb.HandshakeRequest(
                        peer=_fake_info(run_id, "s", "0", 0)), timeout=3),
                    "JoinRound": lambda: stub.JoinRound(pb.JoinRoundRequest(run_id=run_id, peer_id=a.peer_id,
                                                                            round=1), timeout=3),
                    "Status": lambda: stub.Status(pb.StatusRequest(), timeout=3),  # names nobody: answered
                }
                for name, call in calls.items():
                    try:
                        await call()
                        got[name] = "OK"
                    except grpc.aio.AioRpcError as exc:
                        got[name] = exc.code().name
                try:
                    [m async for m in stub.GetState(pb.GetStateRequest(run_id=run_id, peer_id=a.peer_id), timeout=3)]
                    got["GetState"] = "OK"
                except grpc.aio.AioRpcError as exc:
                    got["GetState"] = exc.code().name
            return got

        got = asyncio.run(lie())
        assert got == {"Leave": "PERMISSION_DENIED", "Handshake": "PERMISSION_DENIED",
                       "JoinRound": "PERMISSION_DENIED", "GetState": "PERMISSION_DENIED", "Status": "OK"}, got
        assert metric(b.metrics_port, 'peer_auth_refusals_total{reason="identity_mismatch"}') == 4
        assert b.log().count("further refusals of this caller are only counted") == 1
        # a is still b's member, and they keep training together
        assert a.peer_id in b.status()["peers"]
        before = max(consistent_rounds([a, b]))
        wait_until(lambda: max(consistent_rounds([a, b])) >= before + 2, 60, "rounds after the lies", logs)


def test_the_run_admits_its_credentials_and_not_another_runs(tmp_path):
    run_id = f"admit-{os.getpid()}"
    other = create_run_credentials(run_id, tmp_path / "other-ca")  # the same run id, another CA
    with Swarm(tmp_path, run_id, ["--rounds", "0"]) as swarm:
        first = swarm.start("first")
        outsider = swarm.start("outsider", "--credentials", str(other))
        member = swarm.start("member")
        logs = lambda: "\n".join(p.tail(20) for p in swarm.peers)  # noqa: E731
        wait_until(lambda: len(consistent_rounds([first, member])) >= 2, 60, "the members training together",
                   logs)
        assert set(first.status()["peers"]) == {member.peer_id}
        assert set(member.status()["peers"]) == {first.peer_id}
        assert outsider.status()["peers"] == []
        assert outsider.alive()
