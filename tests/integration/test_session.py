"""The Session stream (JoinRound and ReduceWhole as messages on one stream per caller), in one
process over real sockets: requests answered out of order, refusals that fail one request and
not the stream, a caller that floods or sends garbage, a server that dies or restarts, and a
request its caller gave up on."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from peer.credentials import create_run_credentials, ephemeral_identity, load_run_ca
from peer.errors import PeerUnavailable, RoundError
from peer.transport import GrpcPeerClient, PeerServer
from peer.transport.gen import peer_pb2 as pb
from peer.transport.server import SESSION_MAX_PENDING
from peer.types import JoinOutcome, JoinReply, JoinRequest, ReduceHeader

SESSION = "/peer.v1.PeerService/Session"


class Handler:
    """Joins are held until ``release`` is set (unless their round is 0); parts are answered at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.joined: list[int] = []
        self.cancelled: list[int] = []
        self.refused: list[tuple[str, str, str]] = []
        self.malformed_seen: list[str] = []

    async def join_round(self, req: JoinRequest) -> JoinReply:
        try:
            if req.round:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(req.round)
            raise
        self.joined.append(req.round)
        return JoinReply(JoinOutcome.TOO_LATE, f"round {req.round} of {req.peer_id}")

    async def reduce_expect(self, header):
        return header.total_bytes

    async def reduce_part(self, header, payload):
        return header, bytes(reversed(payload))

    def reduce_rejected(self, header, error):  # pragma: no cover (nothing is refused here)
        raise AssertionError(error)

    def auth_refused(self, method, caller, named):
        self.refused.append((method, caller, named))

    def malformed(self, method, caller, message):
        self.malformed_seen.append(message)


def _join(peer_id: str, rnd: int) -> JoinRequest:
    return JoinRequest("r", peer_id, rnd, "h", 1.0, "me:1")


@pytest.fixture
async def plain():
    handler = Handler()
    server = PeerServer(handler, "127.0.0.1:0")
    await server.start()
    client = GrpcPeerClient(chunk_bytes=1 << 20, chunk_idle_timeout_s=2, reconnect_wait_s=0.5)
    try:
        yield handler, server, client, f"127.0.0.1:{server.port}"
    finally:
        await client.close()
        await server.stop(0)


async def test_a_part_is_answered_while_a_join_on_the_same_stream_waits(plain):
    handler, _, client, address = plain
    join = asyncio.create_task(client.join_round(address, _join("me", 5), 10))
    await asyncio.sleep(0.2)
    header = ReduceHeader("r", "g", 5, "me", 0, 3, "fp32", 3, 0)
    reply, answer = await asyncio.wait_for(client.reduce(address, header, b"abc", 10), 5)
    assert answer == b"cba" and not join.done()  # answered ahead of the join it followed
    handler.release.set()
    assert (await asyncio.wait_for(join, 5)).message == "round 5 of me"
    assert handler.joined == [5]
    assert len(client._sessions) == 1  # both went on one stream


async def test_a_request_in_another_name_fails_alone_and_the_stream_goes_on(tmp_path):
    ca = load_run_ca(create_run_credentials("r", tmp_path / "run"))
    handler = Handler()
    server = PeerServer(handler, "127.0.0.1:0", identity=ephemeral_identity(ca))
    await server.start()
    me = ephemeral_identity(ca)
    client = GrpcPeerClient(chunk_bytes=1 << 20, chunk_idle_timeout_s=2, identity=me, reconnect_wait_s=0.5)
    address = f"127.0.0.1:{server.port}"
    try:
        assert (await client.join_round(address, _join(me.peer_id, 0), 5)).message == f"round 0 of {me.peer_id}"
        with pytest.raises(RoundError) as err:
            await client.join_round(address, _join("someone-else", 0), 5)
        assert err.value.reason == "permission_denied" and "someone-else" in str(err.value)
        header = ReduceHeader("r", "g", 1, "someone-else", 0, 3, "fp32", 3, 0)
        with pytest.raises(RoundError) as err:
            await client.reduce(address, header, b"abc", 5)
        assert err.value.reason == "permission_denied"
        assert handler.refused == [("JoinRound", me.peer_id, "someone-else"), ("Reduce", me.peer_id, "someone-else")]
        # The same stream still serves the caller in its own name.
        assert (await client.join_round(address, _join(me.peer_id, 0), 5)).message == f"round 0 of {me.peer_id}"
        assert handler.joined == [0, 0] and len(client._sessions) == 1
    finally:
        await client.close()
        await server.stop(0)


async def test_a_caller_that_floods_its_stream_is_told_so_and_the_rest_is_answered(plain):
    handler, _, _, address = plain
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(SESSION, request_serializer=pb.SessionMessage.SerializeToString,
                                     response_deserializer=pb.SessionMessage.FromString)()
        for i in range(SESSION_MAX_PENDING + 1):
            await call.write(pb.SessionMessage(id=i + 1, timeout_s=10, join=pb.JoinRoundRequest(
                run_id="r", peer_id="me", round=1)))
        first = await asyncio.wait_for(call.read(), 5)
        assert first.id == SESSION_MAX_PENDING + 1 and first.error.code == "RESOURCE_EXHAUSTED"
        handler.release.set()
        ids = {(await asyncio.wait_for(call.read(), 5)).id for _ in range(SESSION_MAX_PENDING)}
        assert ids == set(range(1, SESSION_MAX_PENDING + 1))
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
    assert len(handler.joined) == SESSION_MAX_PENDING


async def test_a_message_that_does_not_parse_ends_its_stream_only(plain):
    handler, _, client, address = plain
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(SESSION)(iter([b"\xff\xff\xff"]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # An empty message parses, but asks for nothing: answered with an error under its id.
        call = channel.stream_stream(SESSION, response_deserializer=pb.SessionMessage.FromString)(
            iter([pb.SessionMessage(id=7).SerializeToString()]))
        reply = await asyncio.wait_for(call.read(), 5)
        assert reply.id == 7 and reply.error.code == "INVALID_ARGUMENT"
    assert handler.malformed_seen == ["a message that does not parse"]
    assert (await client.join_round(address, _join("me", 0), 5)).message == "round 0 of me"


async def test_a_server_that_stops_fails_the_request_in_flight_and_a_restarted_one_is_reached(plain):
    handler, server, client, address = plain
    join = asyncio.create_task(client.join_round(address, _join("me", 3), 30))
    await asyncio.sleep(0.2)
    t0 = asyncio.get_running_loop().time()
    await server.stop(0)
    with pytest.raises(PeerUnavailable):
        await asyncio.wait_for(join, 10)
    assert asyncio.get_running_loop().time() - t0 < 5  # at once, not at the request's deadline
    again = PeerServer(handler, address)
    await again.start()
    try:
        assert (await client.join_round(address, _join("me", 0), 10)).message == "round 0 of me"
    finally:
        await again.stop(0)


async def test_the_server_stops_serving_a_request_its_caller_gave_up_on(plain):
    handler, _, client, address = plain
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(PeerUnavailable) as err:
        await client.join_round(address, _join("me", 4), 0.5)
    assert err.value.code == "DEADLINE_EXCEEDED" and asyncio.get_running_loop().time() - t0 < 3
    for _ in range(50):
        if handler.cancelled:
            break
        await asyncio.sleep(0.05)
    assert handler.cancelled == [4] and handler.joined == []
    # The stream is still the caller's: the next request goes on it.
    assert (await client.join_round(address, _join("me", 0), 5)).message == "round 0 of me"
    assert len(client._sessions) == 1


async def test_a_stopping_server_ends_open_streams_at_once_and_answers_what_is_in_flight(plain):
    handler, server, client, address = plain
    assert (await client.join_round(address, _join("me", 0), 5)).message == "round 0 of me"  # a stream is open
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await server.stop(5.0)
    assert loop.time() - t0 < 1.0  # not the 5 s grace: nothing was in flight on the stream
    again = PeerServer(handler, address)
    await again.start()
    try:
        join = asyncio.create_task(client.join_round(address, _join("me", 6), 10))  # a new stream
        await asyncio.sleep(0.3)
        stopping = asyncio.create_task(again.stop(5.0))
        await asyncio.sleep(0.3)
        handler.release.set()  # answered within the grace, then the stream ends
        assert (await asyncio.wait_for(join, 5)).message == "round 6 of me"
        await asyncio.wait_for(stopping, 5)
    finally:
        await again.stop(0)


async def test_a_caller_cancelled_while_its_stream_opens_does_not_fail_the_others(plain):
    handler, server, _, address = plain
    await server.stop(0)
    client = GrpcPeerClient(chunk_bytes=1 << 20, chunk_idle_timeout_s=2, reconnect_wait_s=5)
    try:
        first = asyncio.create_task(client.join_round(address, _join("me", 0), 8))
        second = asyncio.create_task(client.join_round(address, _join("me", 0), 8))
        await asyncio.sleep(0.2)  # both wait for the one stream being opened (nothing listens yet)
        first.cancel()
        again = PeerServer(handler, address)
        await again.start()
        try:
            assert (await asyncio.wait_for(second, 8)).message == "round 0 of me"
            assert first.cancelled()
        finally:
            await again.stop(0)
    finally:
        await client.close()


async def test_a_caller_that_goes_away_mid_request_leaves_no_error_and_others_are_served(plain):
    handler, _, client, address = plain
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(SESSION, request_serializer=pb.SessionMessage.SerializeToString)()
        await call.write(pb.SessionMessage(id=1, timeout_s=10, join=pb.JoinRoundRequest(run_id="r", peer_id="me",
                                                                                      round=2)))
        await asyncio.sleep(0.2)
        call.cancel()
    await asyncio.sleep(0.2)
    handler.release.set()  # served after its caller left (its unary call would have been cancelled)
    for _ in range(50):
        if handler.joined or handler.cancelled:
            break
        await asyncio.sleep(0.05)
    assert handler.joined or handler.cancelled
    import gc

    gc.collect()  # (an exception never retrieved is reported when its task is collected)
    await asyncio.sleep(0.1)
    assert errors == []
    assert (await client.join_round(address, _join("me", 0), 5)).message == "round 0 of me"


async def test_a_closed_client_refuses_calls_instead_of_opening_a_channel(plain):
    _, _, client, address = plain
    assert (await client.join_round(address, _join("me", 0), 5)).message == "round 0 of me"
    await client.close()
    # A task that outlives the daemon's stop must not open a channel nobody would close.
    for call in (client.join_round(address, _join("me", 0), 5), client.status(address, 5),
                 client.reduce(address, ReduceHeader("r", "g", 1, "me", 0, 3, "fp32", 3, 0), b"abc", 5)):
        with pytest.raises(PeerUnavailable) as err:
            await call
        assert err.value.code == "CANCELLED" and "closed" in str(err.value)
    assert client._channels == {} and client._sessions == {}
