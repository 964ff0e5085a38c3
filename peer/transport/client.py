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
from peer.transport.server import MAX_MESSAGE_BYTES, SESSION_IDLE_S
from peer.transport.streams import (assemble_frames, assemble_reduce, chunk_frames, next_message, parse_reduce,
                                    reduce_checksum, serialized)
from peer.types import HandshakeReply, JoinReply, JoinRequest, PeerInfo, ReduceHeader, StateHeader, StatusInfo

GET_STATE = f"/{pb.DESCRIPTOR.services_by_name['PeerService'].full_name}/GetState"
REDUCE = f"/{pb.DESCRIPTOR.services_by_name['PeerService'].full_name}/Reduce"
SESSION = f"/{pb.DESCRIPTOR.services_by_name['PeerService'].full_name}/Session"

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


class _Session:
    """One ``Session`` stream to a server: requests numbered, replies matched to them by number,
    one writer at a time (``exchange``). Opened by ``open`` (connected or PeerUnavailable); ended
    by the first failure of the stream, which fails every exchange in flight with it, or by
    ``close``. Loop-only."""

    def __init__(self, call, address: str) -> None:
        self._call = call
        self._address = address
        self._next_id = 1
        self._waiting: dict[int, asyncio.Future[pb.SessionMessage]] = {}
        self._writing = asyncio.Lock()
        self._ended: BaseException | None = None
        self.last_used = asyncio.get_running_loop().time()
        self._reader = asyncio.create_task(self._read(), name=f"session-{address}")

    @classmethod
    async def open(cls, channel: grpc.aio.Channel, address: str, connect_s: float) -> _Session:
        """A stream to ``address`` once connected; grpc.aio.AioRpcError, or TimeoutError when no
        connection comes within ``connect_s``."""
        call = channel.stream_stream(SESSION, request_serializer=pb.SessionMessage.SerializeToString,
                                     response_deserializer=None)(wait_for_ready=True)
        try:
            async with asyncio.timeout(max(connect_s, 0.0)):
                await call.wait_for_connection()
        except BaseException:
            call.cancel()
            raise
        return cls(call, address)

    @property
    def ended(self) -> bool:
        return self._ended is not None

    async def _read(self) -> None:
        try:
            while True:
                raw = await self._call.read()
                if raw is grpc.aio.EOF:
                    raise PeerUnavailable(f"Session to {self._address} ended", "UNAVAILABLE")
                try:
                    message = pb.SessionMessage.FromString(raw)
                except DecodeError:
                    raise RoundError("malformed", f"{self._address} sent a Session message that does not "
                                     "parse") from None
                waiter = self._waiting.pop(message.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
                # (a reply to no request in flight: to one that timed out here; dropped)
        except asyncio.CancelledError:
            self._end(PeerUnavailable(f"Session to {self._address} closed", "CANCELLED"))
            raise
        except BaseException as exc:
            self._end(exc)

    def _end(self, exc: BaseException) -> None:
        if self._ended is None:
            self._ended = exc
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(self._ended)
        self._waiting.clear()
        self._call.cancel()

    async def exchange(self, timeout_s: float, **request) -> pb.SessionMessage:
        """Send one request (``join=...`` or ``part=...``) and return its reply message. Raises
        what ended the stream (grpc.aio.AioRpcError, PeerUnavailable, RoundError), or TimeoutError
        after ``timeout_s``. A request cut off while being written ends the stream (its framing
        may be half-sent); one cut off while waiting for its reply leaves the stream to others."""
        if self._ended is not None:
            raise self._ended
        loop = asyncio.get_running_loop()
        self.last_used = loop.time()
        rid = self._next_id
        self._next_id += 1
        waiter = self._waiting[rid] = loop.create_future()
        try:
            async with asyncio.timeout(timeout_s):
                async with self._writing:
                    try:
                        await self._call.write(pb.SessionMessage(id=rid, timeout_s=timeout_s, **request))
                    except asyncio.CancelledError:
                        self._end(PeerUnavailable(f"Session to {self._address}: a request was cut off while "
                                                  "being written", "CANCELLED"))
                        raise
                return await waiter
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # A write on a stream that failed or finished: the reader ends the session with
            # what ended it (it has, or is about to).
            await asyncio.wait({self._reader}, timeout=1.0)
            raise self._ended if self._ended is not None else PeerUnavailable(
                f"Session to {self._address} failed", "UNAVAILABLE") from None
        finally:
            self._waiting.pop(rid, None)
            self.last_used = loop.time()

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


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
        # One stub a channel: building one sets up a callable per method (~50 us).
        self._stubs: dict[tuple[str, str], pb_grpc.PeerServiceStub] = {}
        # One Session stream a channel, for JoinRound and ReduceWhole (``_exchange``); a stream
        # being opened is a future that concurrent callers share.
        self._sessions: dict[tuple[str, str], _Session | asyncio.Future[_Session]] = {}
        self._closed = False

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
            if self._closed:
                # A call that comes after ``close`` (a task that outlived the daemon's stop) would
                # open a channel, and a connection to that peer, that nobody closes.
                raise PeerUnavailable(f"no call to {address}: this peer's client is closed",
                                      grpc.StatusCode.CANCELLED.name)
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
        for key in [k for k in self._sessions if k[0] == address]:
            session = self._sessions.pop(key)
            if isinstance(session, _Session):
                await session.close()
            else:
                session.cancel()
        for key in [k for k in self._channels if k[0] == address]:
            self._stubs.pop(key, None)
            await self._channels.pop(key).close(grace=None)

    async def close(self) -> None:
        """Close every channel; later calls raise PeerUnavailable (CANCELLED)."""
        self._closed = True
        for address in {a for a, _ in self._channels} | {a for a, _ in self._sessions}:
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
        # A channel that found no connection (before the peer listened, or after it restarted:
        # in reconnect backoff) gets ``reconnect_wait_s`` to connect before the peer counts as gone.
        reply = await self._exchange("JoinRound", address, timeout_s, min(self._reconnect_wait_s, timeout_s),
                                     "joined", join=convert.join_request_to_pb(req))
        return convert.join_reply_from_pb(reply)

    async def _exchange(self, method: str, address: str, timeout_s: float, connect_s: float, answer: str,
                        **request):
        """One request on the Session stream to ``address`` (opened, or reopened, here); its reply's
        ``answer`` field (RoundError 'malformed' for a reply of another kind). Failures as the
        unary ``method`` would raise them (``_fail``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            session = await self._session(address, connect_s)
            reply = await session.exchange(max(deadline - loop.time(), 0.0), **request)
        except grpc.aio.AioRpcError as exc:
            raise self._fail(method, exc, address) from None
        except TimeoutError:
            self._on_error(method, grpc.StatusCode.DEADLINE_EXCEEDED.name)
            raise PeerUnavailable(f"{method} to {address}: DEADLINE_EXCEEDED: no answer in {timeout_s:.1f} s",
                                  grpc.StatusCode.DEADLINE_EXCEEDED.name) from None
        except PeerUnavailable as exc:
            self._on_error(method, exc.code)
            raise PeerUnavailable(f"{method} to {address}: {exc}", exc.code) from None
        if reply.WhichOneof("kind") == "error":
            code = grpc.StatusCode.__members__.get(reply.error.code)
            if code is None or code == grpc.StatusCode.OK:
                raise RoundError("malformed", f"{address} answered {method} with an error of unknown code "
                                 f"{reply.error.code[:40]!r}")
            self._on_error(method, code.name)
            text = f"{method} to {address}: {code.name}: {reply.error.message[:1000]}"
            if code in _UNAVAILABLE:
                raise PeerUnavailable(text, code.name)
            raise RoundError(code.name.lower(), text)
        if reply.WhichOneof("kind") != answer:
            raise RoundError("malformed", f"{address} answered a {method} with {reply.WhichOneof('kind')}")
        return getattr(reply, answer)

    async def _session(self, address: str, connect_s: float) -> _Session:
        """The open Session stream to ``address``: this channel's, or a new one (connected within
        ``connect_s``) when there is none, it ended, or it was idle long enough that the server
        may be closing it (``SESSION_IDLE_S``). Callers that come while one is being opened wait
        for that one; a caller cancelled meanwhile does not cancel the opening for the others."""
        key = (address, self._bound.get(address, ""))
        current = self._sessions.get(key)
        if isinstance(current, _Session):
            if not current.ended and asyncio.get_running_loop().time() - current.last_used < SESSION_IDLE_S / 2:
                return current
            del self._sessions[key]
            await current.close()
            current = None
        if current is None:
            current = self._sessions[key] = asyncio.ensure_future(self._open_session(key, address, connect_s))
        try:
            return await asyncio.shield(current)
        except asyncio.CancelledError:
            if current.cancelled() and not asyncio.current_task().cancelling():
                # The opening was cancelled by ``forget``/``close``, not this caller.
                raise PeerUnavailable(f"Session to {address} closed", grpc.StatusCode.CANCELLED.name) from None
            raise

    async def _open_session(self, key: tuple[str, str], address: str, connect_s: float) -> _Session:
        try:
            session = await _Session.open(self._channel(address), address, connect_s)
        except BaseException:
            if self._sessions.get(key) is asyncio.current_task():
                del self._sessions[key]
            raise
        if self._sessions.get(key) is asyncio.current_task():
            self._sessions[key] = session
        else:  # forgotten while it opened
            await session.close()
        return session

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
        """``reduce`` of a part that fits one chunk, as ``ReduceWhole`` on the Session stream: one
        message each way instead of a stream's header, chunk and end each way; the answer is
        checked alike."""
        # protobuf takes bytes only; codecs may hand over the bytearray they wrote (at most a chunk)
        data = payload if isinstance(payload, bytes) else bytes(payload)
        request = pb.ReducePart(header=convert.reduce_header_to_pb(header), data=data)
        answer = await self._exchange("Reduce", address, timeout_s, timeout_s, "part", part=request)
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
