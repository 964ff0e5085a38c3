"""The grpc.aio client: implements ``peer.sync.round.PeerClient`` and the handshake/status calls.

Every call carries a deadline; streamed reads also have a per-chunk idle timeout. gRPC errors
become ``PeerUnavailable`` (could not reach or lost the peer) or ``RoundError`` (the peer refused
what we sent), and are reported to ``on_error(method, code)`` for metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace

import grpc
from google.protobuf.message import DecodeError

from peer.credentials import MEMBER_NAME, Identity, member_name
from peer.errors import PeerUnavailable, RoundError, StateError
from peer.transport import convert
from peer.transport.gen import peer_pb2 as pb
from peer.transport.gen import peer_pb2_grpc as pb_grpc
from peer.transport.server import MAX_MESSAGE_BYTES
from peer.transport.streams import (assemble_frames, assemble_reduce, chunk_frames, next_message, parse_reduce,
                                    reduce_checksum, serialized)
from peer.types import HandshakeReply, JoinReply, JoinRequest, PeerInfo, ReduceHeader, StateHeader, StatusInfo

GET_STATE = f"/{pb.DESCRIPTOR.services_by_name['PeerService'].full_name}/GetState"
REDUCE = f"/{pb.DESCRIPTOR.services_by_name['PeerService'].full_name}/Reduce"

_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
}

ErrorHook = Callable[[str, str], None]
Tamper = Callable[[ReduceHeader, bytes], bytes]


def _answer_bytes_limit(numel: int) -> int:
    """The most bytes an owner's answer for ``numel`` values may take (float32 values and
    slack: more than any codec writes); a larger one is refused before it is read."""
    return 4 * (numel + 1024) + 64


def _check_answer_crc(address: str, reply: ReduceHeader, checksum: int) -> None:
    if checksum != reply.crc32:
        raise RoundError("corrupt", f"averaged shard from {address} fails its crc32 check")


class GrpcPeerClient:
    """Channels are cached per address (and expected identity) and closed by ``close()``.
    Loop-only.

    ``identity``: mutual TLS with this identity (None: plain TCP, ``--insecure``). A call to an
    address ``bind``-ed to a peer id checks in the TLS handshake that the server's certificate
    is that peer's; other calls check that it is a member of the run. ``reconnect_wait_s``: how long a call that found no connection waits for one before the
    peer counts as gone. ``executor``: where a state's digest is computed while it arrives (None:
    the loop's default executor). ``tamper`` (fault injection, tests only) may change each outgoing
    Reduce payload after its checksum was computed, as a broken link would.
    """

    def __init__(self, *, chunk_bytes: int, chunk_idle_timeout_s: float, on_error: ErrorHook | None = None,
                 max_state_bytes: int = 1 << 34, reconnect_wait_s: float = 2.0, tamper: Tamper | None = None,
                 identity: Identity | None = None, executor: Executor | None = None) -> None:
        self._chunk_bytes = chunk_bytes
        self._executor = executor
        self._idle = chunk_idle_timeout_s
        self._on_error = on_error or (lambda method, code: None)
        self._max_state_bytes = max_state_bytes
        self._reconnect_wait_s = reconnect_wait_s
        self._tamper = tamper
        self._creds = None if identity is None else grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem, private_key=identity.key_pem, certificate_chain=identity.cert_pem)
        self._bound: dict[str, str] = {}
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        # One stub a channel: building one sets up a callable per method (~50 us, three calls
        # a round of a small model).
        self._stubs: dict[tuple[str, str], pb_grpc.PeerServiceStub] = {}

    def _checksum(self, data: bytes | bytearray | memoryview) -> int:
        return reduce_checksum(data, tls=self._creds is not None)

    def bind(self, address: str, peer_id: str) -> None:
        """From now on, calls to ``address`` succeed only if the server proves ``peer_id``."""
        self._bound[address] = peer_id

    def _stub(self, address: str, expect_id: str = "") -> pb_grpc.PeerServiceStub:
        key = (address, expect_id or self._bound.get(address, ""))
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = pb_grpc.PeerServiceStub(self._channel(address, expect_id))
        return stub

    def _channel(self, address: str, expect_id: str = "") -> grpc.aio.Channel:
        expect_id = expect_id or self._bound.get(address, "")
        key = (address, expect_id)
        channel = self._channels.get(key)
        if channel is None:
            options = [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Reconnect quickly after a peer restarts on the same address.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ]
            if self._creds is None:
                channel = grpc.aio.insecure_channel(address, options=options)
            else:
                # The name the server's certificate must carry: that peer's, or any member's.
                name = member_name(expect_id) if expect_id else MEMBER_NAME
                channel = grpc.aio.secure_channel(address, self._creds,
                                                  options=[*options, ("grpc.ssl_target_name_override", name)])
            self._channels[key] = channel
        return channel

    async def forget(self, address: str) -> None:
        """Close every channel to ``address`` and forget whom it was bound to."""
        self._bound.pop(address, None)
        for key in [k for k in self._channels if k[0] == address]:
            self._stubs.pop(key, None)
            await self._channels.pop(key).close(grace=None)

    async def close(self) -> None:
        for address in {a for a, _ in self._channels}:
            await self.forget(address)

    def _fail(self, method: str, exc: grpc.aio.AioRpcError, address: str) -> Exception:
        code = exc.code()
        self._on_error(method, code.name)
        text = f"{method} to {address}: {code.name}: {exc.details()}"
        if code in _UNAVAILABLE:
            return PeerUnavailable(text, code.name)
        return RoundError(code.name.lower(), text)

    async def handshake(self, address: str, me: PeerInfo, timeout_s: float, expect_id: str = "") -> HandshakeReply:
        """``expect_id``: the peer we believe listens there (an mDNS hint), checked by TLS."""
        try:
            reply = await self._stub(address, expect_id).Handshake(pb.HandshakeRequest(peer=convert.info_to_pb(me)),
                                                         timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._fail("Handshake", exc, address) from None
        return convert.handshake_reply_from_pb(reply)

    async def status(self, address: str, timeout_s: float) -> StatusInfo:
        try:
            reply = await self._stub(address).Status(pb.StatusRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._fail("Status", exc, address) from None
        return convert.status_from_pb(reply)

    async def leave(self, address: str, run_id: str, peer_id: str, timeout_s: float) -> None:
        try:
            await self._stub(address).Leave(pb.LeaveRequest(run_id=run_id, peer_id=peer_id), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._fail("Leave", exc, address) from None

    async def join_round(self, address: str, req: JoinRequest, timeout_s: float) -> JoinReply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        request = convert.join_request_to_pb(req)
        try:
            try:
                reply = await self._stub(address).JoinRound(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                # The channel may still be in reconnect backoff from before the peer listened
                # (or restarted): wait for it to connect, briefly, before calling the peer gone.
                retry_s = min(self._reconnect_wait_s, deadline - loop.time())
                if retry_s <= 0:
                    raise
                reply = await self._stub(address).JoinRound(request, timeout=retry_s, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise self._fail("JoinRound", exc, address) from None
        return convert.join_reply_from_pb(reply)

    async def reduce(
        self, address: str, header: ReduceHeader, payload: bytes | bytearray | memoryview, timeout_s: float
    ) -> tuple[ReduceHeader, bytes]:
        # wait_for_ready: an owner whose channel is in reconnect backoff is not gone; the
        # deadline still bounds the wait for one that is.
        header = replace(header, total_bytes=len(payload), crc32=self._checksum(payload))
        if self._tamper is not None:
            payload = self._tamper(header, payload)
        if len(payload) <= self._chunk_bytes:
            return await self._reduce_whole(address, header, payload, timeout_s)
        # Chunks go out as frames (one copy of the data, see ``chunk_frames``) and answers come
        # back serialized, their chunks read in place (``assemble_reduce``): the same wire.
        call = self._channel(address).stream_stream(REDUCE, request_serializer=serialized,
                                                    response_deserializer=None)(timeout=timeout_s, wait_for_ready=True)

        async def send() -> None:
            await call.write(pb.ReduceMessage(header=convert.reduce_header_to_pb(header)))
            for _, frame in chunk_frames(payload, self._chunk_bytes):
                await call.write(frame)
            await call.done_writing()

        writer = asyncio.create_task(send(), name="reduce-send")
        try:
            it = call.__aiter__()
            first = parse_reduce(await next_message(it, timeout_s, f"reduce answer from {address}"),
                                 f"reduce answer from {address}")
            if first.WhichOneof("kind") != "header":
                raise RoundError("malformed", f"{address} answered Reduce without a header")
            reply = convert.reduce_header_from_pb(first.header)
            if reply.total_bytes > _answer_bytes_limit(header.numel):
                raise RoundError("oversized", f"{address} announced {reply.total_bytes} bytes for "
                                 f"{header.numel} elements")
            result = await assemble_reduce(it, reply.total_bytes, self._idle, f"averaged shard from {address}")
            _check_answer_crc(address, reply, self._checksum(result))
            await writer
            return reply, result
        except grpc.aio.AioRpcError as exc:
            raise self._fail("Reduce", exc, address) from None
        except RoundError:
            call.cancel()
            raise
        finally:
            if not writer.done():
                writer.cancel()
            # Collect the writer's outcome; its failure is the read side's failure too.
            await asyncio.gather(writer, return_exceptions=True)

    async def _reduce_whole(self, address: str, header: ReduceHeader, payload: bytes | bytearray | memoryview,
                            timeout_s: float) -> tuple[ReduceHeader, bytes]:
        """``reduce`` of a part that fits one chunk, by ``ReduceWhole``: one message each way
        instead of a stream's header, chunk and end each way; the answer is checked alike."""
        # protobuf takes bytes only; codecs may hand over the bytearray they wrote (at most a chunk)
        data = payload if isinstance(payload, bytes) else bytes(payload)
        request = pb.ReducePart(header=convert.reduce_header_to_pb(header), data=data)
        try:
            answer = await self._stub(address).ReduceWhole(request, timeout=timeout_s, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise self._fail("Reduce", exc, address) from None
        reply = convert.reduce_header_from_pb(answer.header)
        result = answer.data  # (each read of a bytes field copies it: once)
        if len(result) > _answer_bytes_limit(header.numel):
            raise RoundError("oversized", f"{address} answered {len(result)} bytes for {header.numel} elements")
        if len(result) != reply.total_bytes:
            raise RoundError("malformed", f"{address} answered {len(result)} bytes, announcing {reply.total_bytes}")
        _check_answer_crc(address, reply, self._checksum(result))
        return reply, result

    async def get_state(
        self, address: str, run_id: str, peer_id: str, schema_hash: str, timeout_s: float
    ) -> tuple[StateHeader, memoryview]:
        """The donor's state blob (a writable view nobody else holds), its size bounded by
        ``max_state_bytes`` before anything is allocated and its hashes checked as it arrives:
        the header's ``global_hash`` over the parameters' bytes, ``digest`` over the rest.
        Raises StateError (a donor that lies or breaks the framing) or PeerUnavailable."""
        # The messages arrive serialized (no deserializer): ``assemble_frames`` reads the
        # chunks' data in place instead of copying it out of protobuf messages.
        get = self._channel(address).unary_stream(GET_STATE, request_serializer=pb.GetStateRequest.SerializeToString,
                                                  response_deserializer=None)
        call = get(pb.GetStateRequest(run_id=run_id, peer_id=peer_id, schema_hash=schema_hash), timeout=timeout_s)
        try:
            it = call.__aiter__()
            raw = await next_message(it, self._idle, f"state header from {address}")
            try:
                first = pb.StateMessage.FromString(raw)
            except DecodeError:
                raise StateError(f"{address} sent a state header that does not parse") from None
            if first.WhichOneof("kind") != "header":
                raise StateError(f"{address} sent state without a header")
            header = convert.state_header_from_pb(first.header)
            if header.total_bytes > self._max_state_bytes:
                raise StateError(f"{address} offers {header.total_bytes} bytes of state; the limit is "
                                 f"{self._max_state_bytes}")
            # The parameters' bytes are checked against the hash the donor announces for them
            # (which the caller compares with the attested one), the rest against ``digest``.
            blob = await assemble_frames(it, header.total_bytes, header.digest, self._idle, f"state from {address}",
                                         self._executor, (header.params_offset, header.params_bytes),
                                         header.global_hash)
            return header, blob
        except grpc.aio.AioRpcError as exc:
            raise self._fail("GetState", exc, address) from None
        except (RoundError, StateError) as exc:
            call.cancel()
            raise StateError(str(exc)) from None
