"""Mutual TLS in the transport, in one process over real sockets: identities from certificates."""

from __future__ import annotations

import asyncio

import pytest

from peer.credentials import create_run_credentials, ephemeral_identity, load_run_ca
from peer.errors import PeerUnavailable, RoundError
from peer.transport import GrpcPeerClient, PeerServer
from peer.types import HandshakeReply, PeerInfo, StatusInfo


class Handler:
    def __init__(self) -> None:
        self.refused: list[tuple[str, str, str]] = []
        self.left: list[str] = []
        self.parts: list[tuple[int, bytes]] = []
        self.rejected: list[RoundError] = []

    def handshake(self, info, observed_host):
        return HandshakeReply(True, "", "", info)

    def status(self):
        return StatusInfo(peer=PeerInfo("server", "r", 1, "s"))

    def leave(self, run_id, peer_id):
        self.left.append(peer_id)

    def auth_refused(self, method, caller, named):
        self.refused.append((method, caller, named))

    async def reduce_expect(self, header):
        return header.total_bytes

    async def reduce_part(self, header, payload):
        self.parts.append((header.crc32, bytes(payload)))
        return header, bytes(reversed(payload))  # an "average" the client can tell from its part

    def reduce_rejected(self, header, error):  # pragma: no cover (nothing is refused here)
        self.rejected.append(error)


@pytest.fixture
async def served(tmp_path):
    ca = load_run_ca(create_run_credentials("r", tmp_path / "run"))
    server_id = ephemeral_identity(ca)
    handler = Handler()
    server = PeerServer(handler, "127.0.0.1:0", identity=server_id)
    await server.start()
    try:
        yield ca, server_id, handler, f"127.0.0.1:{server.port}"
    finally:
        await server.stop(0)


def _client(identity):
    return GrpcPeerClient(chunk_bytes=1 << 20, chunk_idle_timeout_s=2, identity=identity, reconnect_wait_s=0.5)


async def test_a_member_is_answered_in_its_own_name_only(served):
    ca, _, handler, address = served
    me = ephemeral_identity(ca)
    client = _client(me)
    try:
        reply = await client.handshake(address, PeerInfo(me.peer_id, "r", 1, "s"), 5)
        assert reply.accepted
        await client.leave(address, "r", me.peer_id, 5)
        assert handler.left == [me.peer_id]
        with pytest.raises(RoundError) as err:
            await client.leave(address, "r", "someone-else", 5)
        assert err.value.reason == "permission_denied"
        assert handler.refused == [("Leave", me.peer_id, "someone-else")] and handler.left == [me.peer_id]
    finally:
        await client.close()


async def test_another_ca_and_plain_tcp_get_no_answer(served, tmp_path):
    _, _, handler, address = served
    stranger = ephemeral_identity(load_run_ca(create_run_credentials("r", tmp_path / "other")))
    for identity in (stranger, None):
        client = _client(identity)
        try:
            with pytest.raises(PeerUnavailable):
                await client.status(address, 3)
        finally:
            await client.close()
    assert handler.refused == []  # refused by TLS itself, before any handler runs


async def test_a_bound_address_must_prove_that_peer(served):
    ca, server_id, _, address = served
    client = _client(ephemeral_identity(ca))
    try:
        client.bind(address, server_id.peer_id)
        assert (await client.status(address, 3)).peer.peer_id == "server"
        await client.forget(address)
        client.bind(address, "0000000000000000")  # we expect someone else there: TLS fails
        with pytest.raises(PeerUnavailable):
            await asyncio.wait_for(client.status(address, 3), 10)
    finally:
        await client.close()


@pytest.mark.parametrize("size", [1000, 3 * (1 << 20) + 5])
async def test_parts_and_answers_carry_no_crc32_over_tls(served, size):
    # Over TLS every record is authenticated: a changed byte fails its record, so the crc32 of a
    # part and of its answer (~9 ms of CPU a peer a round at 10M int8 values) is neither written
    # nor checked. A part that fits a chunk goes whole, a larger one streams.
    from peer.types import ReduceHeader

    ca, _, handler, address = served
    me = ephemeral_identity(ca)
    client = _client(me)
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    header = ReduceHeader(run_id="r", group_id="g", round=1, peer_id=me.peer_id, shard_start=0, shard_end=size,
                          codec="int8", numel=size, total_bytes=size, weight=1.0)
    try:
        reply, answer = await client.reduce(address, header, payload, 10)
    finally:
        await client.close()
    assert handler.parts == [(0, payload)] and handler.rejected == []
    assert reply.crc32 == 0 and answer == bytes(reversed(payload))
