"""Bounded fuzzing (hypothesis) of what crosses the wire.

1. Every RPC handler of a running swarm (real processes, real TLS) gets generated messages from
   a holder of the run's credentials, in its own name so that they pass the identity check and
   reach the handlers; afterwards both peers are up and still complete rounds with equal hashes.
2. Every client-side decode path (handshake, status, join, reduce, state) meets generated
   answers from a fake peer, and the checks behind them (``check_group``, ``decode_state``): the
   only errors are the project's own (``PeerError``), never a crash of another kind.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.errors import PeerError
from peer.sync.round import check_group
from peer.sync.state import decode_state
from peer.transport import GrpcPeerClient
from peer.transport.gen import peer_pb2 as pb
from peer.transport.gen import peer_pb2_grpc as pb_grpc
from peer.types import JoinRequest, PeerInfo, ReduceHeader
from tests.integration._peers import Swarm, check_invariant, consistent_rounds, wait_until

U64 = st.one_of(st.integers(0, 10), st.integers(0, 2**64 - 1))
U32 = st.integers(0, 2**32 - 1)
F64 = st.floats(allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=40)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
# Streams from the sync client to a daemon over TLS take ~0.5 s each here (Reduce's did before
# Session existed): fewer examples for the Session fuzzers, which add to the suite's time.
FUZZ_STREAMS = settings(FUZZ, max_examples=15)


def _info(me: str, run: st.SearchStrategy, schema: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(pb.PeerInfo, peer_id=st.just(me), run_id=run, protocol_version=st.sampled_from([1, 0, 2**32 - 1]),
                     schema_hash=schema, codecs=st.lists(TEXT, max_size=3), round=U64, global_hash=TEXT,
                     address=st.one_of(TEXT, st.just("127.0.0.1:9")), metrics_port=U32, task=TEXT)


def _reduce_header(me: str, run: str) -> st.SearchStrategy:
    return st.builds(pb.ReduceHeader, run_id=st.sampled_from([run, "x"]), group_id=TEXT, round=U64,
                     peer_id=st.just(me), shard_start=U64, shard_end=U64,
                     codec=st.sampled_from(["int8", "fp32", "evil", ""]), numel=U64, total_bytes=U64,
                     crc32=U32, weight=F64, contributors=U32)


def _reduce_part(me: str, run: str) -> st.SearchStrategy:
    return st.builds(pb.ReducePart, header=_reduce_header(me, run), data=st.binary(max_size=64))


def _reduce_messages(me: str, run: str) -> st.SearchStrategy:
    header = _reduce_header(me, run)
    chunk = st.builds(pb.Chunk, offset=U64, data=st.binary(max_size=64))
    msg = st.one_of(st.builds(pb.ReduceMessage, header=header), st.builds(pb.ReduceMessage, chunk=chunk))
    return st.lists(msg, min_size=0, max_size=4)


def test_every_handler_survives_generated_messages_from_a_member(tmp_path):
    run_id = f"fuzz-{id(tmp_path) % 100000}"
    with Swarm(tmp_path, run_id, ["--rounds", "0", "--chunk-idle-timeout-s", "1"]) as swarm:
        peers = [swarm.start(f"p{i}", wait=False) for i in range(2)]
        for p in peers:
            p.wait_listening(60)
        logs = lambda: "\n".join(p.tail(25) for p in peers)  # noqa: E731
        wait_until(lambda: len(consistent_rounds(peers)) >= 2, 60, "two rounds", logs)

        from peer.credentials import MEMBER_NAME, ephemeral_identity, load_run_ca

        ident = ephemeral_identity(load_run_ca(peers[0].credentials))
        creds = grpc.ssl_channel_credentials(ident.ca_pem, ident.key_pem, ident.cert_pem)
        channel = grpc.secure_channel(peers[0].grpc, creds, options=[("grpc.ssl_target_name_override", MEMBER_NAME)])
        stub = pb_grpc.PeerServiceStub(channel)
        me = ident.peer_id
        real = stub.Handshake(pb.HandshakeRequest(peer=pb.PeerInfo(peer_id=me, run_id=run_id)), timeout=5).peer
        run, schema = st.sampled_from([run_id, "other"]), st.sampled_from([real.schema_hash, "x" * 64])
        answered: dict[str, int] = {}

        def call(name, fn):
            try:
                fn()
                answered[name] = answered.get(name, 0) + 1
            except grpc.RpcError as exc:  # a refusal is fine; the daemon must stay up
                assert exc.code() != grpc.StatusCode.UNAVAILABLE, f"{name}: the daemon went away: {exc}"

        @FUZZ
        @given(info=_info(me, run, schema))
        def handshake(info):
            call("Handshake", lambda: stub.Handshake(pb.HandshakeRequest(peer=info), timeout=5))

        @FUZZ
        @given(req=st.builds(pb.JoinRoundRequest, run_id=run, peer_id=st.just(me), round=U64, global_hash=TEXT,
                             weight=F64, address=TEXT, swap_delta=st.binary(max_size=64)))
        def join(req):
            call("JoinRound", lambda: stub.JoinRound(req, timeout=5))

        @FUZZ
        @given(messages=_reduce_messages(me, run_id))
        def reduce(messages):
            call("Reduce", lambda: list(stub.Reduce(iter(messages), timeout=5)))

        @FUZZ
        @given(part=_reduce_part(me, run_id))
        def reduce_whole(part):
            call("ReduceWhole", lambda: stub.ReduceWhole(part, timeout=5))

        @FUZZ_STREAMS
        @given(messages=st.lists(st.one_of(
            st.builds(pb.SessionMessage, id=U64, timeout_s=F64,
                      join=st.builds(pb.JoinRoundRequest, run_id=run, peer_id=st.sampled_from([me, "someone"]),
                                     round=U64, global_hash=TEXT, weight=F64, address=TEXT,
                                     swap_delta=st.binary(max_size=64))),
            st.builds(pb.SessionMessage, id=U64, timeout_s=st.floats(0, 0.5), part=_reduce_part(me, run_id)),
            st.builds(pb.SessionMessage, id=U64, error=st.builds(pb.SessionError, code=TEXT, message=TEXT)),
            st.builds(pb.SessionMessage, id=U64)), max_size=4))
        def session(messages):
            # (each request served for at most 0.5 s: a join the leader holds does not hold the test)
            capped = [pb.SessionMessage(id=m.id, timeout_s=min(abs(m.timeout_s), 0.5) if m.timeout_s == m.timeout_s
                                        else 0.5, **{k.name: v for k, v in m.ListFields() if k.name not in ("id",
                                                                                                        "timeout_s")})
                      for m in messages]
            call("Session", lambda: [r.WhichOneof("kind") for r in stub.Session(iter(capped), timeout=5)])

        @FUZZ
        @given(req=st.builds(pb.GetStateRequest, run_id=run, peer_id=st.just(me), schema_hash=schema))
        def get_state(req):
            call("GetState", lambda: [m.WhichOneof("kind") for m in stub.GetState(req, timeout=5)])

        @FUZZ
        @given(raw=st.binary(max_size=64), method=st.sampled_from(["Handshake", "JoinRound", "Status", "Leave"]))
        def garbage(raw, method):
            fn = channel.unary_unary(f"/peer.v1.PeerService/{method}")
            call(f"raw-{method}", lambda: fn(raw, timeout=5))

        @FUZZ_STREAMS
        @given(raws=st.lists(st.binary(max_size=64), max_size=3))
        def session_garbage(raws):
            fn = channel.stream_stream("/peer.v1.PeerService/Session")
            call("raw-Session", lambda: list(fn(iter(raws), timeout=5)))

        try:
            for fuzz in (handshake, join, reduce, reduce_whole, session, get_state, garbage, session_garbage):
                fuzz()
            stub.Leave(pb.LeaveRequest(run_id=run_id, peer_id=me), timeout=5)
        finally:
            channel.close()
        assert answered.get("Handshake", 0) > 0 and answered.get("GetState", 0) > 0, answered
        assert answered.get("Session", 0) > 0, answered
        # Assert: both peers up, and they go on together with equal hashes
        assert all(p.alive() for p in peers), logs()
        before = max(consistent_rounds(peers))
        wait_until(lambda: max(consistent_rounds(peers)) >= before + 3, 90, "rounds after the fuzzing", logs)
        assert check_invariant(peers) > 0


class _FakePeer:
    """A gRPC server (sync API, its own threads) that answers every call with ``self.reply``."""

    def __init__(self) -> None:
        self.reply: dict = {}
        self._server = grpc.server(ThreadPoolExecutor(4))
        outer = self

        class Servicer(pb_grpc.PeerServiceServicer):
            def Handshake(self, request, context):  # noqa: N802
                return outer.reply["handshake"]

            def Status(self, request, context):  # noqa: N802
                return outer.reply["status"]

            def JoinRound(self, request, context):  # noqa: N802
                return outer.reply["join"]

            def Reduce(self, request_iterator, context):  # noqa: N802
                for _ in request_iterator:
                    pass
                yield from outer.reply["reduce"]

            def ReduceWhole(self, request, context):  # noqa: N802
                return outer.reply["reduce_whole"]

            def Session(self, request_iterator, context):  # noqa: N802
                # Each request answered as the generated ``session`` reply says: its own id or
                # another, the right kind of reply or another, or an error of any code.
                for request in request_iterator:
                    how = outer.reply["session"]
                    reply = pb.SessionMessage(id=request.id if how["same_id"] else how["id"])
                    kind = how["kind"] or ("joined" if request.WhichOneof("kind") == "join" else "part")
                    if kind == "joined":
                        reply.joined.CopyFrom(outer.reply["join"])
                    elif kind == "part":
                        reply.part.CopyFrom(outer.reply["reduce_whole"])
                    elif kind == "error":
                        reply.error.CopyFrom(how["error"])
                    yield reply
                    if how["end"]:
                        return

            def GetState(self, request, context):  # noqa: N802
                yield from outer.reply["state"]

        pb_grpc.add_PeerServiceServicer_to_server(Servicer(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(0).wait()


@pytest.fixture(scope="module")
def fake_peer():
    fake = _FakePeer()
    yield fake
    fake.stop()


def _state_messages() -> st.SearchStrategy:
    header = st.builds(pb.StateHeader, round=U64, global_hash=TEXT, total_bytes=st.integers(0, 512), digest=TEXT,
                       format=TEXT, params_offset=st.one_of(st.integers(0, 600), U64),
                       params_bytes=st.one_of(st.integers(0, 600), U64))
    chunk = st.builds(pb.Chunk, offset=st.integers(0, 512), data=st.binary(max_size=128))
    msg = st.one_of(st.builds(pb.StateMessage, header=header), st.builds(pb.StateMessage, chunk=chunk))
    return st.lists(msg, max_size=4)


_MEMBER = st.builds(pb.Member, peer_id=st.sampled_from(["me", "a", "b"]), address=TEXT, shard_start=U64,
                    shard_end=U64, weight=F64)
_GROUP = st.builds(pb.Group, group_id=TEXT, round=U64, global_hash=TEXT, members=st.lists(_MEMBER, max_size=4),
                   codec=st.sampled_from(["int8", "evil"]), numel=U64, reduce_deadline_s=F64)


@FUZZ
@given(handshake=st.builds(pb.HandshakeResponse, accepted=st.booleans(), reason=TEXT, message=TEXT,
                           peer=_info("x", TEXT, TEXT)),
       status=st.builds(pb.StatusResponse, peer=_info("x", TEXT, TEXT), loss=F64, samples=U64),
       join=st.builds(pb.JoinRoundResponse, outcome=st.integers(0, 9), message=TEXT, group=_GROUP, leader_hint=TEXT,
                      leader_round=U64),
       reduce=_reduce_messages("x", "r"), reduce_whole=_reduce_part("x", "r"), state=_state_messages(),
       session=st.fixed_dictionaries({
           "same_id": st.booleans(), "id": U64, "kind": st.sampled_from([None, "joined", "part", "error", "none"]),
           "error": st.builds(pb.SessionError, code=st.one_of(TEXT, st.sampled_from([c.name for c in grpc.StatusCode])),
                              message=TEXT),
           "end": st.booleans()}))
def test_client_decode_paths_raise_only_peer_errors(fake_peer, handshake, status, join, reduce, reduce_whole, state,
                                                    session):
    fake_peer.reply = {"handshake": handshake, "status": status, "join": join, "reduce": reduce,
                       "reduce_whole": reduce_whole, "state": state, "session": session}
    address = f"127.0.0.1:{fake_peer.port}"
    me = PeerInfo("me", "r", 1, "s")

    async def drive() -> None:
        client = GrpcPeerClient(chunk_bytes=1 << 20, chunk_idle_timeout_s=1, max_state_bytes=1 << 16,
                                reconnect_wait_s=0.2)
        # Parts larger than a chunk are streamed (Reduce), smaller ones go whole (ReduceWhole).
        streaming = GrpcPeerClient(chunk_bytes=8, chunk_idle_timeout_s=1, reconnect_wait_s=0.2)
        part = ReduceHeader("r", "g", 1, "me", 0, 16, "int8", 16, 0)
        try:
            for fn in (lambda: client.handshake(address, me, 3), lambda: client.status(address, 3),
                       # (a reply under another id is never matched: these wait out their deadline)
                       lambda: client.join_round(address, JoinRequest("r", "me", 1, "h", 1.0, "me:1"), 0.3),
                       lambda: client.reduce(address, part, b"\x00" * 20, 0.3),
                       lambda: streaming.reduce(address, part, b"\x00" * 20, 3),
                       lambda: client.get_state(address, "r", "me", "s", 3)):
                try:
                    result = await fn()
                except PeerError:
                    continue
                if isinstance(result, tuple) and result and hasattr(result[0], "digest"):
                    try:
                        decode_state(result[1], 16, result[0])  # a state that passed the transport's checks
                    except PeerError:
                        pass
                group = getattr(result, "group", None)
                if group is not None:
                    try:
                        check_group(group, me="me", round=1, codec="int8", numel=16, max_deadline_s=30.0,
                                    is_member=lambda pid: pid in ("a", "b"))
                    except PeerError:
                        pass
        finally:
            await client.close()
            await streaming.close()

    asyncio.run(drive())
    assert threading.active_count() < 100
