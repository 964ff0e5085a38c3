"""Hostile or broken input: every case gets a clear error, a counted rejection, and no crash,
hang or corrupted state on the receiver."""

from __future__ import annotations

import asyncio
import os
import re
import urllib.request
import zlib

import grpc
import pytest

from peer.errors import RoundError
from peer.transport import PeerServer
from peer.transport.gen import peer_pb2 as pb
from peer.types import HandshakeReply, ReduceHeader, StatusInfo, PeerInfo
from tests.integration._peers import Swarm, check_invariant, consistent_rounds, tls_channel, wait_until

EXPECTED = 4096


class RecordingHandler:
    """Accepts any group; records what the server rejected. The server and client are real."""

    def __init__(self) -> None:
        self.rejected: list[RoundError] = []
        self.parts: list[bytes] = []

    def handshake(self, info, observed_host):
        return HandshakeReply(True, "", "", None)

    def status(self):
        return StatusInfo(peer=PeerInfo("me", "r", 1, "s"))

    async def join_round(self, req):  # pragma: no cover (not called here)
        raise NotImplementedError

    async def reduce_expect(self, header: ReduceHeader) -> int:
        if header.round != 7:
            raise RoundError("malformed", f"round {header.round} is not the group's round 7")
        return EXPECTED

    async def reduce_part(self, header, payload):
        self.parts.append(payload)
        return header, payload

    def reduce_rejected(self, header, error):
        self.rejected.append(error)

    def state_snapshot(self, run_id, peer_id, schema_hash):  # pragma: no cover
        raise NotImplementedError

    async def serving_state(self, sent_bytes):  # pragma: no cover
        pass

    def state_served(self, ok):  # pragma: no cover
        pass

    def leave(self, run_id, peer_id):  # pragma: no cover
        pass


def _header(**kw) -> pb.ReduceMessage:
    payload = kw.pop("payload", b"\x01" * EXPECTED)
    fields = dict(run_id="r", group_id="g", round=7, peer_id="attacker", shard_start=0, shard_end=4096,
                  codec="int8", numel=4096, total_bytes=len(payload), crc32=zlib.crc32(payload))
    fields.update(kw)
    return pb.ReduceMessage(header=pb.ReduceHeader(**fields))


def _chunk(offset: int, data: bytes) -> pb.ReduceMessage:
    return pb.ReduceMessage(chunk=pb.Chunk(offset=offset, data=data))


async def _reduce(port: int, messages, half_close: bool = True):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream("/peer.v1.PeerService/Reduce",
                                     request_serializer=pb.ReduceMessage.SerializeToString,
                                     response_deserializer=pb.ReduceMessage.FromString)(timeout=10)
        for m in messages:
            await call.write(m)
        if half_close:
            await call.done_writing()
        try:
            replies = [r async for r in call]
            return grpc.StatusCode.OK, replies
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()


GOOD = b"\x01" * EXPECTED


@pytest.mark.parametrize("messages, half_close, reason, code", [
    ([_chunk(0, GOOD)], True, "malformed", grpc.StatusCode.INVALID_ARGUMENT),                  # no header
    ([_header(round=8)], True, "malformed", grpc.StatusCode.INVALID_ARGUMENT),                 # wrong round
    ([_header(payload=b"\x01" * 10)], True, "bad_size", grpc.StatusCode.INVALID_ARGUMENT),     # wrong size
    ([_header(), _chunk(0, GOOD[:100])], True, "truncated", grpc.StatusCode.INVALID_ARGUMENT), # ends early
    ([_header(), _chunk(0, GOOD[:100])], False, "stalled", grpc.StatusCode.DEADLINE_EXCEEDED), # stalls
    ([_header(), _chunk(5, GOOD)], True, "malformed", grpc.StatusCode.INVALID_ARGUMENT),       # bad offset
    ([_header(), _chunk(0, GOOD + b"x")], True, "oversized", grpc.StatusCode.INVALID_ARGUMENT),  # too long
    ([_header(), _chunk(0, b"\x02" * EXPECTED)], True, "corrupt", grpc.StatusCode.INVALID_ARGUMENT),  # crc
])
async def test_broken_reduce_streams_are_refused_with_a_reason(messages, half_close, reason, code):
    # Prepare
    handler = RecordingHandler()
    server = PeerServer(handler, "127.0.0.1:0", chunk_idle_timeout_s=0.5)
    await server.start()
    try:
        # Execute
        got, details = await asyncio.wait_for(_reduce(server.port, messages, half_close), 15)
        # Assert: the sender gets a clear status, the owner counts the reason, nothing is averaged
        assert got == code, details
        assert [e.reason for e in handler.rejected] == [reason]
        assert handler.parts == []
        # ... and the server still serves a well-formed stream afterwards
        ok, replies = await _reduce(server.port, [_header(), _chunk(0, GOOD)])
        assert ok == grpc.StatusCode.OK and replies[1].chunk.data == GOOD
    finally:
        await server.stop(0)


async def _reduce_whole(port: int, header: pb.ReduceMessage, data: bytes):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/peer.v1.PeerService/ReduceWhole",
                                   request_serializer=pb.ReducePart.SerializeToString,
                                   response_deserializer=pb.ReducePart.FromString)
        try:
            return grpc.StatusCode.OK, await call(pb.ReducePart(header=header.header, data=data), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()


@pytest.mark.parametrize("header, data, reason", [
    (_header(round=8), GOOD, "malformed"),                          # wrong round
    (_header(payload=b"\x01" * 10), b"\x01" * 10, "bad_size"),      # the wrong size, announced
    (_header(), GOOD[:100], "bad_size"),                            # less than announced
    (_header(), GOOD + b"x", "bad_size"),                           # more than announced
    (_header(), b"\x02" * EXPECTED, "corrupt"),                     # crc
])
async def test_broken_whole_parts_are_refused_with_a_reason(header, data, reason):
    # Prepare
    handler = RecordingHandler()
    server = PeerServer(handler, "127.0.0.1:0", chunk_idle_timeout_s=0.5)
    await server.start()
    try:
        # Execute
        got, details = await asyncio.wait_for(_reduce_whole(server.port, header, data), 15)
        # Assert: the sender gets a clear status, the owner counts the reason, nothing is averaged
        assert got == grpc.StatusCode.INVALID_ARGUMENT, details
        assert [e.reason for e in handler.rejected] == [reason]
        assert handler.parts == []
        # ... and the server still answers a well-formed part whole, with its crc32
        ok, reply = await _reduce_whole(server.port, _header(), GOOD)
        assert ok == grpc.StatusCode.OK and reply.data == GOOD and reply.header.crc32 == zlib.crc32(GOOD)
    finally:
        await server.stop(0)


@pytest.mark.parametrize("buffer", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1000], ids=["whole", "streamed"])
async def test_a_part_in_any_byte_buffer_goes_out_alike(buffer, chunk_bytes):
    # Prepare: codecs hand the transport bytes or the bytearray they wrote into (no copy); a part
    # within one chunk goes whole (ReduceWhole), a larger one on a Reduce stream
    from peer.transport import GrpcPeerClient

    handler = RecordingHandler()
    server = PeerServer(handler, "127.0.0.1:0", chunk_idle_timeout_s=0.5)
    await server.start()
    client = GrpcPeerClient(chunk_bytes=chunk_bytes, chunk_idle_timeout_s=1)
    header = ReduceHeader(run_id="r", group_id="g", round=7, peer_id="me", shard_start=0, shard_end=4096,
                          codec="int8", numel=4096, total_bytes=0)
    try:
        # Execute
        reply, result = await client.reduce(f"127.0.0.1:{server.port}", header, buffer(GOOD), 10)
        # Assert: the owner got the part and answered it, checksummed
        assert [bytes(p) for p in handler.parts] == [GOOD] and handler.rejected == []
        assert bytes(result) == GOOD and reply.crc32 == zlib.crc32(GOOD)
    finally:
        await client.close()
        await server.stop(0)


async def test_a_chunk_over_one_mib_is_refused():
    handler = RecordingHandler()
    big = b"\x01" * ((1 << 20) + 1)
    handler_expected = len(big)

    async def expect(header):
        return handler_expected

    handler.reduce_expect = expect
    server = PeerServer(handler, "127.0.0.1:0", chunk_idle_timeout_s=0.5)
    await server.start()
    try:
        got, details = await _reduce(server.port, [_header(payload=big), _chunk(0, big)])
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "limit" in details
        assert [e.reason for e in handler.rejected] == ["oversized"]
        # ... and so is such a part sent whole (those are streamed)
        got, details = await _reduce_whole(server.port, _header(payload=big), big)
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "streamed" in details
        assert [e.reason for e in handler.rejected] == ["oversized", "oversized"]
    finally:
        await server.stop(0)


def test_malformed_bytes_and_strangers_do_not_hurt_a_running_swarm(tmp_path):
    with Swarm(tmp_path, f"hostile-{os.getpid()}", ["--rounds", "0", "--chunk-idle-timeout-s", "2"]) as swarm:
        peers = [swarm.start(f"p{i}", wait=False) for i in range(2)]
        nan = swarm.start("nan", "--faults", "nan@3", wait=False)
        for p in [*peers, nan]:
            p.wait_listening(60)
        wait_until(lambda: len(consistent_rounds([*peers, nan])) >= 5, 60, "five rounds", lambda: "\n".join(
            p.tail(20) for p in swarm.peers))

        async def garbage(channel) -> dict:
            codes = {}
            for method in ("Handshake", "JoinRound", "Status", "GetState", "Leave"):
                call = channel.unary_unary(f"/peer.v1.PeerService/{method}") if method != "GetState" else \
                    channel.unary_stream(f"/peer.v1.PeerService/{method}")
                try:
                    result = call(b"\xff\xff\xff\xff\xff\x0f garbage", timeout=5)
                    if method == "GetState":
                        result = [m async for m in result]
                    else:
                        await result
                    codes[method] = "OK"
                except grpc.aio.AioRpcError as exc:
                    codes[method] = exc.code().name
            return codes

        async def attack(address: str) -> tuple[dict, dict]:
            async with grpc.aio.insecure_channel(address) as channel:  # a stranger: no TLS at all
                stranger = await garbage(channel)
            channel, me = tls_channel(address, peers[0].credentials)  # a member sending garbage
            async with channel:
                codes = await garbage(channel)
                # A JoinRound and a GetState for another run, in the member's own name: refused.
                join = channel.unary_unary("/peer.v1.PeerService/JoinRound",
                                           request_serializer=pb.JoinRoundRequest.SerializeToString,
                                           response_deserializer=pb.JoinRoundResponse.FromString)
                reply = await join(pb.JoinRoundRequest(run_id="other", peer_id=me, round=10**9), timeout=5)
                codes["JoinRound-stranger"] = pb.JoinRoundResponse.Outcome.Name(reply.outcome)
                state = channel.unary_stream("/peer.v1.PeerService/GetState",
                                             request_serializer=pb.GetStateRequest.SerializeToString,
                                             response_deserializer=pb.StateMessage.FromString)
                try:
                    [m async for m in state(pb.GetStateRequest(run_id="other", peer_id=me), timeout=5)]
                    codes["GetState-other-run"] = "OK"
                except grpc.aio.AioRpcError as exc:
                    codes["GetState-other-run"] = exc.code().name
            return stranger, codes

        stranger, codes = asyncio.run(attack(peers[0].grpc))
        assert all(code == "UNAVAILABLE" for code in stranger.values()), stranger  # the TLS handshake fails
        for method in ("Handshake", "JoinRound", "GetState", "Leave"):
            assert codes[method] != "OK", codes  # undecodable requests are refused
        assert codes["JoinRound-stranger"] == "REFUSED"
        assert codes["GetState-other-run"] == "FAILED_PRECONDITION"

        # The swarm goes on: more rounds, identical hashes, no NaN anywhere
        before = max(consistent_rounds([*peers, nan]))
        wait_until(lambda: max(consistent_rounds([*peers, nan])) > before + 3, 40, "rounds after the attack")
        assert check_invariant(swarm.peers) > 0
        # The NaN peer withheld its delta (weight 0), said so, counted it, and stayed in sync.
        assert re.search(r"round 3: inner phase produced NaN/Inf; withholding", nan.log())
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{nan.metrics_port}/metrics", timeout=5).read().decode()
        assert re.search(r"^peer_train_nonfinite_total 1\.0$", metrics, re.M)
        for p in swarm.peers:
            s = p.status()
            assert s["loss"] is not None and s["loss"] == s["loss"]
