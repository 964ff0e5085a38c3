"""Chunked payloads on gRPC streams: split, and reassemble with validation."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterator

from peer.errors import RoundError
from peer.transport.gen import peer_pb2 as pb

MAX_CHUNK_BYTES = 1 << 20


def crc32(data: bytes | bytearray | memoryview) -> int:
    """Unsigned crc32, as carried in ReduceHeader.crc32."""
    return zlib.crc32(data) & 0xFFFFFFFF


def split(payload: bytes, chunk_bytes: int) -> Iterator[pb.Chunk]:
    view = memoryview(payload)
    for offset in range(0, len(view), chunk_bytes):
        yield pb.Chunk(offset=offset, data=bytes(view[offset : offset + chunk_bytes]))


async def next_message(it: AsyncIterator, idle_s: float, what: str):
    """The next message of a stream, or RoundError('stalled'/'truncated') — never an endless wait."""
    try:
        return await asyncio.wait_for(anext(it), idle_s)
    except StopAsyncIteration:
        raise RoundError("truncated", f"{what}: stream ended early") from None
    except TimeoutError:
        raise RoundError("stalled", f"{what}: no message for {idle_s:.1f} s") from None


async def assemble(it: AsyncIterator, total_bytes: int, idle_s: float, what: str, field: str = "chunk") -> bytearray:
    """Read chunks from ``it`` until ``total_bytes`` arrived, in order, each at most 1 MiB.

    ``total_bytes`` must already be validated by the caller (it is allocated up front).
    Raises RoundError naming what was wrong: out-of-order or oversized chunks, a stream that
    ends early or stalls for ``idle_s``.
    """
    buf = bytearray(total_bytes)
    received = 0
    while received < total_bytes:
        msg = await next_message(it, idle_s, what)
        if msg.WhichOneof("kind") != field:
            raise RoundError("malformed", f"{what}: expected a chunk, got {msg.WhichOneof('kind')}")
        chunk = msg.chunk
        data = chunk.data  # each access of a bytes field copies it out of the message (upb)
        n = len(data)
        if chunk.offset != received:
            raise RoundError("malformed", f"{what}: chunk at offset {chunk.offset}, expected {received}")
        if n == 0 or n > MAX_CHUNK_BYTES:
            raise RoundError("oversized", f"{what}: chunk of {n} bytes (limit 1..{MAX_CHUNK_BYTES})")
        if received + n > total_bytes:
            raise RoundError("oversized", f"{what}: {received + n} bytes exceed the announced {total_bytes}")
        buf[received : received + n] = data
        received += n
    return buf  # not bytes(buf): that would copy the whole payload once more
