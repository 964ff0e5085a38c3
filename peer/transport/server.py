"""The grpc.aio server: validates what arrives, converts it, and delegates to a ``Handler``.

Domain errors (``PeerError`` children) are mapped to gRPC status codes here and only here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Protocol

import grpc

from google.protobuf.message import DecodeError

from peer.credentials import Identity, peer_id_of_certificate
from peer.errors import HandshakeRefused, PeerError, RoundError, StateError
from peer.transport import convert
from peer.transport.gen import peer_pb2 as pb
from peer.transport.gen import peer_pb2_grpc as pb_grpc
from peer.transport.streams import (MAX_CHUNK_BYTES, assemble_reduce, chunk_frames, next_message,
                                    parse_reduce, reduce_checksum, serialized)
from peer.types import HandshakeReply, JoinReply, JoinRequest, PeerInfo, ReduceHeader, StateHeader, StatusInfo

log = logging.getLogger(__name__)

# Chunks are at most 1 MiB of payload; 4 MiB leaves room for framing and a header.
MAX_MESSAGE_BYTES = 4 << 20

SESSION_MAX_PENDING = 16
"""Requests one Session stream may have in flight at once (a round has one or two: a JoinRound
that waits for its group, a confirmation, a part); more are answered RESOURCE_EXHAUSTED."""

SESSION_MAX_WAIT_S = 3600.0
"""The longest a Session request is served (a request names how long its caller waits)."""

SESSION_IDLE_S = 300.0
"""A Session stream with no request in flight and none arriving for this long is closed (the
caller opens a new one with its next request): a caller that vanished without its connection
closing (a partition, a frozen host) holds no stream for good."""

_CODES = {
    "not_member": grpc.StatusCode.FAILED_PRECONDITION,
    "unknown_group": grpc.StatusCode.NOT_FOUND,
    "stalled": grpc.StatusCode.DEADLINE_EXCEEDED,
}


class StatePayload(Protocol):
    """A donor's state: its ``header`` and its blob as consecutive ``parts`` (read in place:
    they do not change until ``release()``)."""

    header: StateHeader
    parts: tuple[bytes | bytearray | memoryview, ...]

    def release(self) -> None: ...


class Handler(Protocol):
    """What the server needs from the daemon (``peer.service`` implements it). Called on the
    event loop. Framing, chunking and checksums stay in the transport."""

    def handshake(self, info: PeerInfo, observed_host: str) -> HandshakeReply:
        """``observed_host``: the caller's address as this server sees the connection."""
    def status(self) -> StatusInfo: ...
    async def join_round(self, req: JoinRequest) -> JoinReply: ...
    async def reduce_expect(self, header: ReduceHeader) -> int:
        """Validate a Reduce header; return the exact payload size expected. Raises RoundError."""
    async def reduce_part(self, header: ReduceHeader, payload: bytes) -> tuple[ReduceHeader, bytes]:
        """Owner side: add the part, return the averaged shard's header and payload."""
    def reduce_rejected(self, header: ReduceHeader | None, error: RoundError) -> None: ...
    async def state_snapshot(self, run_id: str, peer_id: str, schema_hash: str) -> StatePayload:
        """The state to serve, pinned until its ``release()`` (the servicer calls it once the
        stream is over, however it ends). Raises HandshakeRefused or StateError."""
    def state_served(self, ok: bool) -> None: ...
    async def serving_state(self, sent_bytes: int) -> None:
        """Called between the chunks of a GetState stream (a seam for fault injection)."""
    def leave(self, run_id: str, peer_id: str) -> None: ...
    def auth_refused(self, method: str, caller: str, named: str) -> None:
        """A call named another peer than the one its certificate proves (already refused)."""
    def malformed(self, method: str, caller: str, message: str) -> None:
        """A message that does not parse or breaks its method's framing (already refused)."""


class _Abort(Exception):
    """A call refused with a gRPC status: the unary handler aborts with it, a Session request is
    answered with it (``SessionError``)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Servicer(pb_grpc.PeerServiceServicer):
    def __init__(self, handler: Handler, chunk_bytes: int, chunk_idle_timeout_s: float, secure: bool) -> None:
        self._h = handler
        self._chunk_bytes = chunk_bytes
        self._idle = chunk_idle_timeout_s
        self._secure = secure
        self._ids: dict[bytes, str] = {}  # certificate PEM -> peer id (bounded below)
        # The averaged shard being answered, its crc32 (0 over TLS) and its serialized chunks (once a stream
        # needs them): an owner answers every member with the same bytes, checksummed and framed
        # once. Kept while a stream sends it (``_answer_users``), not until the next round: twice
        # the shard's encoded size (N/K x bits/8 each) that nobody needs between rounds. (A part
        # answered whole, ``ReduceWhole``, is at most one chunk; its entry waits for the next.)
        self._answer: tuple[bytes, int, list[bytes] | None] | None = None
        self._answer_users = 0
        # Each open Session stream's handler task, and the tasks serving its requests in flight.
        self._sessions: dict[asyncio.Task, set[asyncio.Task]] = {}
        self._ending = False

    async def end_sessions(self, grace_s: float) -> None:
        """Before the server stops: requests in flight on Session streams get up to ``grace_s``
        to be answered, then every Session stream ends (a caller's next request opens a new
        one, wherever it goes). Without this, every caller's open stream would hold the
        server's stop for its whole grace period."""
        pending = {t for tasks in self._sessions.values() for t in tasks}
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        self._ending = True  # (a handler cancelled now ends its stream with OK: see ``Session``)
        for handler in list(self._sessions):
            handler.cancel()

    def _answer_crc(self, result: bytes) -> int:
        if self._answer is None or self._answer[0] is not result:
            self._answer = (result, self._checksum(result), None)
            self._answer_users = 0
        return self._answer[1]

    def _checksum(self, data: bytes | bytearray | memoryview) -> int:
        return reduce_checksum(data, tls=self._secure)

    def _answer_frames(self, result: bytes) -> tuple[int, list[bytes]]:
        checksum = self._answer_crc(result)
        frames = self._answer[2]
        if frames is None:
            frames = [frame for _, frame in chunk_frames(result, self._chunk_bytes)]
            self._answer = (result, checksum, frames)
        self._answer_users += 1
        return checksum, frames

    def _answer_sent(self, result: bytes) -> None:
        """A stream is done with ``result``'s frames; the last one lets them go."""
        if self._answer is not None and self._answer[0] is result:
            self._answer_users -= 1
            if self._answer_users <= 0:
                self._answer = None

    def _caller(self, context) -> str:
        """The peer id the connection's verified certificate proves ("" if it shows none)."""
        pems = context.auth_context().get("x509_pem_cert") or [b""]
        pem = pems[0]
        caller = self._ids.get(pem)
        if caller is None:
            try:
                caller = peer_id_of_certificate(pem)
            except ValueError:
                caller = ""
            if len(self._ids) >= 4096:
                self._ids.clear()
            self._ids[pem] = caller
        return caller

    def _check_caller(self, caller: str | None, method: str, named: str) -> None:
        """Raise _Abort(PERMISSION_DENIED) for a call that names another peer than ``caller``, the
        peer its connection's certificate proves (None without TLS, ``--insecure``: there is no
        caller identity to check)."""
        if caller is None or (caller and caller == named):
            return
        self._h.auth_refused(method, caller, named)
        raise _Abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} names peer {named!r}, but this connection's "
                     f"certificate proves {caller or 'no peer'!r}")

    def _caller_of(self, context) -> str | None:
        return self._caller(context) if self._secure else None

    async def _authorize(self, context, method: str, named: str) -> None:
        """Abort (PERMISSION_DENIED) a call that names another peer than its caller."""
        try:
            self._check_caller(self._caller_of(context), method, named)
        except _Abort as exc:
            await context.abort(exc.code, exc.message)

    async def Handshake(self, request: pb.HandshakeRequest, context) -> pb.HandshakeResponse:  # noqa: N802
        await self._authorize(context, "Handshake", request.peer.peer_id)
        reply = self._h.handshake(convert.info_from_pb(request.peer), observed_host(context.peer()))
        return convert.handshake_reply_to_pb(reply)

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:  # noqa: N802
        return convert.status_to_pb(self._h.status())

    async def JoinRound(self, request: pb.JoinRoundRequest, context) -> pb.JoinRoundResponse:  # noqa: N802
        return await _unary(context, self._join_round(request, self._caller_of(context)))

    async def _join_round(self, request: pb.JoinRoundRequest, caller: str | None) -> pb.JoinRoundResponse:
        self._check_caller(caller, "JoinRound", request.peer_id)
        reply = await self._h.join_round(convert.join_request_from_pb(request))
        return convert.join_reply_to_pb(reply)

    async def Reduce(self, request_iterator: AsyncIterator[bytes], context) -> AsyncIterator[pb.ReduceMessage | bytes]:  # noqa: N802
        # Messages arrive serialized (see ``method_handlers``): the part's chunks are read in
        # place by ``assemble_reduce``, the answer's chunks are written as frames.
        header: ReduceHeader | None = None
        idle = self._idle
        try:
            first = parse_reduce(await next_message(request_iterator.__aiter__(), idle, "reduce header"),
                                 "reduce header")
            if first.WhichOneof("kind") != "header":
                raise RoundError("malformed", "a Reduce stream must start with a header")
            header = convert.reduce_header_from_pb(first.header)
            await self._authorize(context, "Reduce", header.peer_id)
            expected = await self._h.reduce_expect(header)
            if header.total_bytes != expected:
                raise RoundError("bad_size", f"{header.peer_id} announced {header.total_bytes} bytes for shard "
                                 f"{header.shard_start}-{header.shard_end}; {header.codec} needs {expected}")
            payload = await assemble_reduce(request_iterator.__aiter__(), expected, idle,
                                            f"reduce part from {header.peer_id}")
            if self._checksum(payload) != header.crc32:
                raise RoundError("corrupt", f"part from {header.peer_id} fails its crc32 check")
            reply, result = await self._h.reduce_part(header, payload)
            del payload  # averaged (or refused) by now: not kept while the answer is sent
            checksum, frames = self._answer_frames(result)
            reply = replace(reply, total_bytes=len(result), crc32=checksum)
        except RoundError as exc:
            self._h.reduce_rejected(header, exc)
            await context.abort(_CODES.get(exc.reason, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
            return
        try:
            yield pb.ReduceMessage(header=convert.reduce_header_to_pb(reply))
            for frame in frames:
                yield frame
        finally:
            self._answer_sent(result)

    async def ReduceWhole(self, request: pb.ReducePart, context) -> pb.ReducePart:  # noqa: N802
        return await _unary(context, self._reduce_whole(request, self._caller_of(context)))

    async def _reduce_whole(self, request: pb.ReducePart, caller: str | None) -> pb.ReducePart:
        # ``Reduce`` in one message each way, for a part that fits one chunk: the same checks,
        # in the same order, and the same errors.
        header: ReduceHeader | None = None
        try:
            header = convert.reduce_header_from_pb(request.header)
            self._check_caller(caller, "Reduce", header.peer_id)
            expected = await self._h.reduce_expect(header)
            if header.total_bytes != expected or len(request.data) != expected:
                raise RoundError("bad_size", f"{header.peer_id} sent {len(request.data)} bytes (announced "
                                 f"{header.total_bytes}) for shard {header.shard_start}-{header.shard_end}; "
                                 f"{header.codec} needs {expected}")
            if expected > MAX_CHUNK_BYTES:
                raise RoundError("oversized", f"{header.peer_id} sent a part of {expected} bytes whole; parts over "
                                 f"{MAX_CHUNK_BYTES} bytes are streamed (Reduce)")
            payload = request.data  # (each read of a bytes field copies it: once)
            if self._checksum(payload) != header.crc32:
                raise RoundError("corrupt", f"part from {header.peer_id} fails its crc32 check")
            reply, result = await self._h.reduce_part(header, payload)
            checksum = self._answer_crc(result)
        except RoundError as exc:
            self._h.reduce_rejected(header, exc)
            raise _Abort(_CODES.get(exc.reason, grpc.StatusCode.INVALID_ARGUMENT), str(exc)) from None
        reply = replace(reply, total_bytes=len(result), crc32=checksum)
        return pb.ReducePart(header=convert.reduce_header_to_pb(reply), data=bytes(result))

    async def Session(self, request_iterator, context) -> None:  # noqa: N802
        # Read with ``context.read`` and answered with ``context.write`` (one writer at a time):
        # each request is served by a task of its own, so a JoinRound that waits for its group
        # does not hold up the part or confirmation behind it. Messages arrive serialized
        # (``method_handlers``): one that does not parse closes the stream, counted.
        caller = self._caller_of(context)
        writing = asyncio.Lock()
        tasks: set[asyncio.Task] = set()
        handler = asyncio.current_task()
        self._sessions[handler] = tasks

        async def answer(reply: pb.SessionMessage) -> None:
            async with writing:
                try:
                    await context.write(reply)
                except (asyncio.InvalidStateError, grpc.aio.AioRpcError, grpc.aio.AbortError) as exc:
                    # The call is over (its caller went away): nobody is left to tell.
                    log.debug("a Session reply to %s was not sent: %r", caller or "a caller", exc)

        async def serve(message: pb.SessionMessage) -> None:
            # Served for as long as the caller waits (its unary call's deadline, which grpc
            # would enforce here), at most ``SESSION_MAX_WAIT_S``; then dropped unanswered.
            wait = message.timeout_s if 0 < message.timeout_s < SESSION_MAX_WAIT_S else SESSION_MAX_WAIT_S
            deadline = asyncio.timeout(wait)
            try:
                async with deadline:
                    await serve_now(message)
            except TimeoutError:
                if not deadline.expired():
                    raise  # (not the caller's deadline: an error of the handler's own)

        async def serve_now(message: pb.SessionMessage) -> None:
            kind = message.WhichOneof("kind")
            try:
                if kind == "join":
                    reply = pb.SessionMessage(id=message.id, joined=await self._join_round(message.join, caller))
                elif kind == "part":
                    reply = pb.SessionMessage(id=message.id, part=await self._reduce_whole(message.part, caller))
                else:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"a Session request is a join or a part, not {kind}")
            except _Abort as exc:
                reply = pb.SessionMessage(id=message.id, error=pb.SessionError(code=exc.code.name, message=exc.message))
            await answer(reply)

        try:
            while True:
                try:
                    async with asyncio.timeout(SESSION_IDLE_S):
                        raw = await context.read()
                except TimeoutError:
                    if tasks:
                        continue
                    return  # idle: the caller opens a new stream with its next request
                if raw is grpc.aio.EOF:
                    break
                try:
                    message = pb.SessionMessage.FromString(raw)
                except DecodeError:
                    self._h.malformed("Session", caller or "", "a message that does not parse")
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Session message that does not parse")
                    return
                if len(tasks) >= SESSION_MAX_PENDING:
                    await answer(pb.SessionMessage(id=message.id, error=pb.SessionError(
                        code=grpc.StatusCode.RESOURCE_EXHAUSTED.name,
                        message=f"more than {SESSION_MAX_PENDING} requests in flight on one Session stream")))
                    continue
                task = asyncio.create_task(serve(message), name="session-request")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            # The caller is done sending: answer what it asked before it closed its side.
            await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            if not self._ending:
                raise  # the call was cancelled (by its caller, or by gRPC)
            # ``end_sessions``: return, so that gRPC ends the call with a status (a handler that
            # stays cancelled leaves the call open in gRPC's core until the server's grace ends).
        finally:
            self._sessions.pop(handler, None)
            for task in tasks:
                task.cancel()

    async def GetState(self, request: pb.GetStateRequest, context) -> AsyncIterator[bytes]:  # noqa: N802
        await self._authorize(context, "GetState", request.peer_id)
        try:
            state = await self._h.state_snapshot(request.run_id, request.peer_id, request.schema_hash)
        except (HandshakeRefused, StateError) as exc:
            self._h.state_served(False)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            return
        ok = False
        try:
            # Serialized here (see ``_serialize_state``): the chunks are framed straight from the
            # state's memory, which is pinned (never modified) until released, with one copy of
            # each; a part's chunks do not straddle into the next part.
            yield pb.StateMessage(header=convert.state_header_to_pb(state.header)).SerializeToString()
            start = 0
            for part in state.parts:
                for offset, frame in chunk_frames(part, self._chunk_bytes, start):
                    await self._h.serving_state(offset)
                    yield frame
                start += len(part)
            ok = True
        finally:
            state.release()
            self._h.state_served(ok)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:  # noqa: N802
        await self._authorize(context, "Leave", request.peer_id)
        self._h.leave(request.run_id, request.peer_id)
        return pb.LeaveResponse()


async def _unary(context, call: Awaitable):
    """The reply of a unary call, or its abort with the status an ``_Abort`` names."""
    try:
        return await call
    except _Abort as exc:
        await context.abort(exc.code, exc.message)


def _serialize_state(message: bytes | pb.StateMessage) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class _Handlers:
    """Stands in for a server to the generated registration, to keep its method handlers."""

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def method_handlers(servicer: pb_grpc.PeerServiceServicer) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """The service name and the generated method handlers, except that GetState's and Reduce's
    responses may be messages serialized by the servicer (chunks framed without protobuf's
    copies), and Reduce's and Session's requests reach the servicer serialized (it reads chunks
    in place; it counts a Session message that does not parse)."""
    registry = _Handlers()
    pb_grpc.add_PeerServiceServicer_to_server(servicer, registry)
    handlers = dict(registry.handlers)
    handlers["GetState"] = grpc.unary_stream_rpc_method_handler(
        servicer.GetState, request_deserializer=pb.GetStateRequest.FromString, response_serializer=_serialize_state)
    handlers["Reduce"] = grpc.stream_stream_rpc_method_handler(
        servicer.Reduce, request_deserializer=None, response_serializer=serialized)
    handlers["Session"] = grpc.stream_stream_rpc_method_handler(
        servicer.Session, request_deserializer=None, response_serializer=pb.SessionMessage.SerializeToString)
    return registry.service, handlers


def observed_host(peer: str) -> str:
    """Host part of grpc's ``context.peer()`` ("ipv4:10.0.0.2:5123", "ipv6:[::1]:5123"), or ""."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0]  # keeps the brackets, ready for host:port
    return ""


class PeerServer:
    """grpc.aio server bound to ``listen`` (host:port; port 0 picks a free one).

    ``identity``: mutual TLS with this identity, client certificates of the run CA required (a
    peer of another run fails the TLS handshake); None serves plain TCP (``--insecure``).
    ``chunk_bytes``: payload bytes per streamed chunk (at most 1 MiB); ``chunk_idle_timeout_s``:
    how long a stream may go without a message before it is refused as stalled.
    ``max_concurrent_rpcs`` and ``max_streams_per_connection`` bound what callers can hold open.
    """

    def __init__(self, handler: Handler, listen: str, *, identity: Identity | None = None,
                 chunk_bytes: int = MAX_CHUNK_BYTES, chunk_idle_timeout_s: float = 10.0,
                 max_concurrent_rpcs: int = 1024, max_streams_per_connection: int = 128) -> None:
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", max_streams_per_connection),
        ], maximum_concurrent_rpcs=max_concurrent_rpcs)
        servicer = self._servicer = _Servicer(handler, chunk_bytes, chunk_idle_timeout_s, secure=identity is not None)
        service, handlers = method_handlers(servicer)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self._server.add_registered_method_handlers(service, handlers)
        try:
            if identity is None:
                self.port = self._server.add_insecure_port(listen)
            else:
                creds = grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)],
                                                    root_certificates=identity.ca_pem, require_client_auth=True)
                self.port = self._server.add_secure_port(listen, creds)
        except RuntimeError as exc:
            raise PeerError(f"cannot listen on {listen}: {exc}") from None
        if self.port == 0:
            raise PeerError(f"cannot listen on {listen} (address in use or not local)")

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace_s: float) -> None:
        """Stop serving; calls in flight get up to ``grace_s`` in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        await self._servicer.end_sessions(grace_s)
        await self._server.stop(max(0.0, deadline - loop.time()))

