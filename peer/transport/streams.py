"""Chunked payloads on gRPC streams: split, and reassemble with validation.

``chunk_frames``/``assemble_frames`` (GetState, the largest payload) handle the serialized
messages themselves: protobuf's Python API copies a ``bytes`` field on every step (slicing,
building, serializing, reading the field), so the donor writes the bytes protobuf would write
with one copy of the data, and the joiner reads the chunk's data as a view of the received
message, writes it straight into a buffer of the announced size and hashes it on the way.
The wire is a plain ``StateMessage`` (protobuf would write the same bytes); a message in any
other valid layout is parsed by protobuf. The Reduce streams send their chunks the same way (``chunk_frames``) and
read them with ``assemble_reduce``.
"""

from __future__ import annotations

import asyncio
import mmap
import queue
import zlib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor

from google.protobuf.message import DecodeError

from peer.errors import RoundError
from peer.transport.gen import peer_pb2 as pb
from peer.types import digest_hasher

MAX_CHUNK_BYTES = 1 << 20

# A joiner's state buffer is mapped in by the hashing thread in blocks, ahead of the chunks being
# copied into it (one madvise instead of a page fault every 4 KiB in the loop's copies), never
# more than this far past what arrived: a donor that announces much and sends little costs
# little more than it sent.
POPULATE_BLOCK_BYTES = 4 << 20
POPULATE_AHEAD_BYTES = 16 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python 3.11 lacks the name
# A buffer this large asks for transparent huge pages (where the system leaves that to madvise):
# on the test VM, 80 MB are mapped in with 12-18 ms of CPU instead of 22-34 ms (now and then more,
# when the kernel must first compact memory for 2 MiB pages).
HUGE_PAGE_MIN_BYTES = 8 << 20

# Protobuf wire tags (field number << 3 | wire type) of ``StateMessage.chunk`` (2, length-
# delimited), ``Chunk.offset`` (1, varint) and ``Chunk.data`` (2, length-delimited).
_TAG_CHUNK = 0x12
_TAG_OFFSET = 0x08
_TAG_DATA = 0x12


def crc32(data: bytes | bytearray | memoryview) -> int:
    """Unsigned crc32, as carried in ReduceHeader.crc32."""
    return zlib.crc32(data) & 0xFFFFFFFF


def reduce_checksum(data: bytes | bytearray | memoryview, tls: bool) -> int:
    """What ``ReduceHeader.crc32`` carries for ``data``: its ``crc32`` on plain TCP; 0 over TLS,
    whose records are authenticated (a byte changed on the way fails its record before it is
    read, and a member that lies writes a crc32 that matches its lie; ~9 ms of CPU a peer a round
    at 10M int8 values)."""
    return 0 if tls else crc32(data)


async def next_message(it: AsyncIterator, idle_s: float, what: str):
    """The next message of a stream, or RoundError('stalled'/'truncated') — never an endless wait."""
    try:
        async with asyncio.timeout(idle_s):  # no task per message, unlike wait_for
            return await anext(it)
    except StopAsyncIteration:
        raise RoundError("truncated", f"{what}: stream ended early") from None
    except TimeoutError:
        raise RoundError("stalled", f"{what}: no message for {idle_s:.1f} s") from None


def check_chunk(offset: int, n: int, received: int, total_bytes: int, what: str) -> None:
    """A chunk of ``n`` bytes at ``offset`` must be the next one (at ``received``), 1 byte to
    1 MiB long and within the announced ``total_bytes``; else RoundError ('malformed' or
    'oversized') naming what was wrong."""
    if offset != received:
        raise RoundError("malformed", f"{what}: chunk at offset {offset}, expected {received}")
    if n == 0 or n > MAX_CHUNK_BYTES:
        raise RoundError("oversized", f"{what}: chunk of {n} bytes (limit 1..{MAX_CHUNK_BYTES})")
    if received + n > total_bytes:
        raise RoundError("oversized", f"{what}: {received + n} bytes exceed the announced {total_bytes}")


def serialized(message: bytes | pb.ReduceMessage) -> bytes:
    """A Reduce message as sent: a chunk already framed (bytes), or a message to serialize."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def parse_reduce(message: bytes, what: str) -> pb.ReduceMessage:
    """A serialized ``ReduceMessage``; RoundError ('malformed') for one protobuf cannot parse."""
    try:
        return pb.ReduceMessage.FromString(message)
    except DecodeError:
        raise RoundError("malformed", f"{what}: a message that does not parse") from None


async def assemble_reduce(it: AsyncIterator[bytes], total_bytes: int, idle_s: float, what: str) -> bytearray:
    """Read the chunks of a Reduce stream of serialized messages from ``it`` until ``total_bytes``
    arrived, in order, each at most 1 MiB (``check_chunk``). A chunk laid out as
    ``chunk_frames`` writes it (``ReduceMessage.chunk`` has ``StateMessage.chunk``'s field
    number, so the frames are the same bytes) is read in place, with one copy of its data into
    the buffer instead of protobuf's three; any other layout is parsed by protobuf.
    ``total_bytes`` must already be validated by the caller (it is allocated up front). Raises
    RoundError naming what was wrong: a message that is not a chunk, out-of-order or oversized
    chunks, a stream that ends early or stalls for ``idle_s``."""
    buf = bytearray(total_bytes)
    view = memoryview(buf)
    received = 0
    try:
        while received < total_bytes:
            message = await next_message(it, idle_s, what)
            fast = chunk_of_frame(message)
            if fast is None:
                msg = parse_reduce(message, what)
                if msg.WhichOneof("kind") != "chunk":
                    raise RoundError("malformed", f"{what}: expected a chunk, got {msg.WhichOneof('kind')}")
                fast = msg.chunk.offset, msg.chunk.data
            offset, data = fast
            n = len(data)
            check_chunk(offset, n, received, total_bytes, what)
            view[received : received + n] = data
            received += n
    finally:
        view.release()
    return buf


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; (-1, pos) if there is none (at most 10 bytes)."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            return -1, pos
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    return -1, pos


def chunk_frames(payload: bytes | bytearray | memoryview, chunk_bytes: int,
                 start: int = 0) -> Iterator[tuple[int, bytes]]:
    """``(offset, message)`` for each piece of ``payload``: the serialized
    ``StateMessage(chunk=Chunk(offset, data))``, byte for byte what protobuf writes, made with
    one copy of the data (``payload`` is read in place and must not change meanwhile).
    ``start``: the stream offset of ``payload``'s first byte (a blob sent as several payloads,
    one after the other)."""
    view = memoryview(payload).cast("B")
    for at in range(0, len(view), chunk_bytes):
        data = view[at : at + chunk_bytes]
        offset = start + at
        # proto3 leaves a zero offset out; fields in number order, as protobuf writes them.
        inner = (bytes([_TAG_OFFSET]) + _varint(offset) if offset else b"") + bytes([_TAG_DATA]) + _varint(len(data))
        yield offset, b"".join((bytes([_TAG_CHUNK]), _varint(len(inner) + len(data)), inner, data))


def chunk_of_frame(message: bytes | memoryview) -> tuple[int, memoryview] | None:
    """Offset and data (a view into ``message``, no copy) of a serialized message that holds
    only a ``chunk`` field laid out as ``chunk_frames`` (and protobuf) write it; None for any
    other message, valid or not: the caller then parses it with protobuf."""
    view = memoryview(message)
    if len(view) < 2 or view[0] != _TAG_CHUNK:
        return None
    size, pos = _read_varint(view, 1)
    if size != len(view) - pos:
        return None
    offset = 0
    if pos < len(view) and view[pos] == _TAG_OFFSET:
        offset, pos = _read_varint(view, pos + 1)
        if offset < 0:
            return None
    if pos >= len(view) or view[pos] != _TAG_DATA:
        return None
    size, pos = _read_varint(view, pos + 1)
    if size != len(view) - pos:
        return None
    return offset, view[pos:]


def read_chunk(message: bytes, what: str) -> tuple[int, bytes | memoryview]:
    """Offset and data of a serialized ``StateMessage`` that must be a chunk. Raises RoundError
    ('malformed') for a message protobuf cannot parse or one of another kind."""
    fast = chunk_of_frame(message)
    if fast is not None:
        return fast
    try:
        msg = pb.StateMessage.FromString(message)
    except DecodeError:
        raise RoundError("malformed", f"{what}: a message that does not parse") from None
    if msg.WhichOneof("kind") != "chunk":
        raise RoundError("malformed", f"{what}: expected a chunk, got {msg.WhichOneof('kind')}")
    return msg.chunk.offset, msg.chunk.data


class Reassembly:
    """One payload of an announced size, received in order in chunks that are written straight
    into one buffer: no list of pieces, no join. ``hash_until_done`` follows the writer on
    another thread and hashes (``digest_hasher``) each piece once it is in, so the hash is ready soon
    after the last chunk, and the loop only copies.

    ``inner`` = ``(start, nbytes)``, a range inside the payload that gets its own digest (a state's
    parameters, whose hash is the one the swarm attests): every byte is hashed once, either into
    the inner digest or into the digest of everything else.

    ``total_bytes`` must already be bounded by the caller. The buffer is an anonymous mapping
    whose pages are taken only just ahead of the chunks (see ``hash_until_done``): a sender
    that announces much and sends little costs little more than it sent, and nothing is
    zeroed twice; a large one asks for transparent huge pages (``HUGE_PAGE_MIN_BYTES``).
    ``add``, ``close`` and ``payload`` belong to one thread (the loop); ``hash_until_done`` to
    one other.
    """

    def __init__(self, total_bytes: int, what: str, inner: tuple[int, int] = (0, 0)) -> None:
        if total_bytes < 0:
            raise RoundError("malformed", f"{what}: a payload of {total_bytes} bytes")
        if not (0 <= inner[0] and 0 <= inner[1] and inner[0] + inner[1] <= total_bytes):
            raise RoundError("malformed", f"{what}: a range of {inner[1]} bytes at {inner[0]} outside a payload of "
                                          f"{total_bytes} bytes")
        try:
            # Private: Python's default for an anonymous mapping is shared memory, slower to fault in.
            self._map = mmap.mmap(-1, total_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if total_bytes else None
        except OSError as exc:
            raise RoundError("oversized", f"{what}: cannot reserve {total_bytes} bytes: {exc}") from None
        if self._map is not None and total_bytes >= HUGE_PAGE_MIN_BYTES:
            try:  # 2 MiB pages: a state's memory is mapped in at about half the cost of 4 KiB pages
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except (AttributeError, OSError):  # not Linux, or no transparent huge pages: 4 KiB pages
                pass
        self._buf = memoryview(self._map if self._map is not None else bytearray())
        self._total = total_bytes
        self._received = 0
        # How far the buffer is written, for the hashing thread; None: stop following.
        self._progress: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._closed = False
        self._populating = True
        self._what = what
        self._inner = (inner[0], inner[0] + inner[1])

    @property
    def done(self) -> bool:
        return self._received == self._total

    def add(self, offset: int, data: bytes | memoryview) -> None:
        """Take the next chunk. Raises RoundError for one out of order ('malformed'), empty,
        over 1 MiB or past the announced size ('oversized')."""
        n, received = len(data), self._received
        check_chunk(offset, n, received, self._total, self._what)
        self._buf[received : received + n] = data
        self._received = received + n
        self._progress.put(self._received)

    def close(self) -> None:
        """Stop ``hash_until_done`` before the payload is complete (a stream that failed)."""
        self._closed = True
        self._progress.put(None)

    def hash_until_done(self) -> tuple[str, str] | None:
        """The digest (hex) of the payload outside the ``inner`` range and that of the range, each
        hashed piece by piece as ``add`` writes it; None if ``close`` came first. Blocks until
        then: run it on a worker thread (or after the last ``add``). Bytes once written are never
        written again, so reading them here while the loop writes further on is safe; hashlib
        and blake3 let go of the GIL meanwhile.

        While it waits for the writer, it also maps in the buffer's pages a little ahead of it
        (at most ``POPULATE_AHEAD_BYTES`` past what arrived), so that the loop's copies do not
        take a page fault every 4 KiB."""
        outer, inner = digest_hasher(), digest_hasher()
        lo, hi = self._inner
        hashed = written = mapped = 0
        while hashed < self._total:
            try:
                if mapped < min(self._total, written + POPULATE_AHEAD_BYTES):
                    mapped = self._populate(mapped)
                    end = self._progress.get_nowait()
                else:
                    end = self._progress.get()
            except queue.Empty:
                continue
            if end is None or self._closed:  # closed: what is still queued is not wanted
                return None
            written = end
            # [hashed, written) cut at the inner range's ends: before it, in it, after it.
            for a, b, digest in ((hashed, min(written, lo), outer), (max(hashed, lo), min(written, hi), inner),
                                 (max(hashed, hi), written, outer)):
                if a < b:
                    digest.update(self._buf[a:b])
            hashed = written
        return outer.hexdigest(), inner.hexdigest()

    def _populate(self, start: int) -> int:
        """Fault in the pages of one block from ``start`` (page-aligned); return the block's end."""
        end = min(self._total, start + POPULATE_BLOCK_BYTES)
        if self._map is not None and self._populating:
            try:
                self._map.madvise(_MADV_POPULATE_WRITE, start, end - start)
            except OSError:  # a kernel before 5.14: the copies fault the pages in instead
                self._populating = False
        return end

    def payload(self) -> memoryview:
        """The whole payload: a writable view that nobody else holds. RoundError ('truncated')
        until every byte arrived."""
        if not self.done:
            raise RoundError("truncated", f"{self._what}: {self._received} of {self._total} bytes arrived")
        return self._buf


async def assemble_frames(it: AsyncIterator[bytes], total_bytes: int, digest_hex: str, idle_s: float, what: str,
                          executor: Executor | None = None, inner: tuple[int, int] = (0, 0),
                          inner_digest_hex: str | None = None) -> memoryview:
    """Read serialized chunk messages from ``it`` until ``total_bytes`` (bounded by the caller)
    arrived, each checked as ``Reassembly.add`` does, while a thread of ``executor`` (None:
    the loop's default) hashes what arrived; return the payload once the digest (``digest_hasher``)
    of the bytes outside the ``inner`` range ``(start, nbytes)`` is ``digest_hex`` and that of
    the range is ``inner_digest_hex`` (with the default empty range, ``digest_hex`` covers
    everything).
    Raises RoundError: a range outside the payload, a stream that ends early or stalls for
    ``idle_s``, a malformed or misplaced chunk, a hash mismatch. Loop; each step copies at
    most 1 MiB."""
    parts = Reassembly(total_bytes, what, inner)
    hashed = asyncio.get_running_loop().run_in_executor(executor, parts.hash_until_done)
    try:
        while not parts.done:
            offset, data = read_chunk(await next_message(it, idle_s, what), what)
            parts.add(offset, data)
    except BaseException:
        parts.close()
        await asyncio.gather(hashed, return_exceptions=True)  # it stops at its next piece
        raise
    outer, inner_hex = await hashed
    if outer != digest_hex:
        raise RoundError("corrupt", f"{what}: fails its digest check")
    if inner[1] and inner_hex != inner_digest_hex:
        raise RoundError("corrupt", f"{what}: the {inner[1]} bytes at {inner[0]} fail their digest check")
    return parts.payload()
