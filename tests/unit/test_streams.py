"""Chunk framing and reassembly of the GetState and Reduce streams, without sockets."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from blake3 import blake3
from hypothesis import given
from hypothesis import strategies as st

from peer.errors import RoundError
from peer.transport.gen import peer_pb2 as pb
from peer.transport.gen import peer_pb2_grpc as pb_grpc
from peer.transport import streams
from peer.transport.server import method_handlers
from peer.transport.streams import (
    HUGE_PAGE_MIN_BYTES, MAX_CHUNK_BYTES, Reassembly, assemble_frames, assemble_reduce, chunk_frames, chunk_of_frame,
    read_chunk,
)


def _digest(data: bytes) -> str:
    return blake3(data).hexdigest()


async def _messages(items, stall_s: float = 0.0):
    for item in items:
        yield item
    if stall_s:
        await asyncio.sleep(stall_s)


@given(payload=st.binary(max_size=300), chunk_bytes=st.integers(1, 64))
def test_frames_are_what_protobuf_writes_and_read_back_in_place(payload, chunk_bytes):
    frames = list(chunk_frames(payload, chunk_bytes))

    assert [o for o, _ in frames] == list(range(0, len(payload), chunk_bytes))
    for offset, frame in frames:
        piece = payload[offset : offset + chunk_bytes]
        assert frame == pb.StateMessage(chunk=pb.Chunk(offset=offset, data=piece)).SerializeToString()
        got_offset, data = chunk_of_frame(frame)
        assert (got_offset, bytes(data)) == (offset, piece)
        assert isinstance(data, memoryview) and data.obj is frame  # a view, not a copy


def test_large_offsets_and_chunks_take_the_fast_path():
    data = bytes(range(256)) * (MAX_CHUNK_BYTES // 256)
    for offset in (0, 1 << 20, (1 << 64) - 1):
        frame = pb.StateMessage(chunk=pb.Chunk(offset=offset, data=data)).SerializeToString()
        got_offset, view = chunk_of_frame(frame)
        assert got_offset == offset and view == data


@pytest.mark.parametrize("message", [
    pb.StateMessage(header=pb.StateHeader(round=3, total_bytes=10)).SerializeToString(),
    pb.StateMessage(chunk=pb.Chunk(offset=5)).SerializeToString(),             # no data field
    # data before offset: valid protobuf, another layout
    b"\x12\x06" + b"\x12\x02ab" + b"\x08\x05",
    # an unknown field after the chunk
    pb.StateMessage(chunk=pb.Chunk(offset=1, data=b"x")).SerializeToString() + b"\x18\x01",
    b"\x12\x05\x12\x03ab",                                                      # lengths do not add up
    b"\x12\x03\x12\x05ab",
    b"\x12\x0c\x08" + b"\xff" * 11,                                             # an endless varint
    b"", b"\x12",
])
def test_anything_but_the_plain_chunk_layout_is_left_to_protobuf(message):
    assert chunk_of_frame(message) is None


def test_read_chunk_parses_other_layouts_and_refuses_what_is_not_a_chunk():
    # Prepare: the same chunk with its fields in the other order (valid protobuf).
    reordered = b"\x12\x06" + b"\x12\x02ab" + b"\x08\x05"

    # Execute / Assert
    offset, data = read_chunk(reordered, "state")
    assert (offset, bytes(data)) == (5, b"ab")
    with pytest.raises(RoundError, match="expected a chunk") as header:
        read_chunk(pb.StateMessage(header=pb.StateHeader(round=1)).SerializeToString(), "state")
    with pytest.raises(RoundError, match="does not parse") as garbage:
        read_chunk(b"\x12\x05\x12\x03ab", "state")
    assert header.value.reason == garbage.value.reason == "malformed"


def test_reassembly_writes_in_place_and_hashes_what_arrived():
    payload = bytes(range(200)) * 50
    parts = Reassembly(len(payload), "state")
    for offset, frame in chunk_frames(payload, 999):
        assert not parts.done
        parts.add(*chunk_of_frame(frame))

    assert parts.hash_until_done() == (_digest(payload), _digest(b""))  # everything arrived: returns at once
    blob = parts.payload()
    assert parts.done and blob == payload and not blob.readonly


@pytest.mark.parametrize("size, chunk", [(1 << 20, 4096), (HUGE_PAGE_MIN_BYTES + 12345, MAX_CHUNK_BYTES)])
def test_the_hash_follows_the_writer_from_another_thread(size, chunk):
    # Prepare (the larger payload is held in huge pages where the system has them)
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
    parts = Reassembly(len(payload), "state")
    with ThreadPoolExecutor(1) as pool:
        hashed = pool.submit(parts.hash_until_done)

        # Execute
        for offset, frame in chunk_frames(payload, chunk):
            parts.add(*chunk_of_frame(frame))

        # Assert
        assert hashed.result(timeout=10) == (_digest(payload), _digest(b""))
    assert parts.payload() == payload


@pytest.mark.parametrize("start, nbytes, chunk", [
    (0, 100, 7), (3, 1000, 999), (999, 1, 999), (1000, 2000, 999), (5000, 1000, 333), (0, 6000, 1000), (6000, 0, 9),
])
def test_the_inner_range_gets_its_own_hash_and_every_byte_is_hashed_once(start, nbytes, chunk):
    # Chunks cut the range anywhere: at its start, inside it, exactly at its end.
    payload = bytes(range(251)) * 24  # 6024 bytes
    parts = Reassembly(len(payload), "state", (start, nbytes))
    with ThreadPoolExecutor(1) as pool:
        hashed = pool.submit(parts.hash_until_done)
        for offset, frame in chunk_frames(payload, chunk):
            parts.add(*chunk_of_frame(frame))

        outer, inner = hashed.result(timeout=10)

    assert inner == _digest(payload[start : start + nbytes])
    assert outer == _digest(payload[:start] + payload[start + nbytes :])


@pytest.mark.parametrize("inner", [(-1, 4), (0, 11), (8, 3), (11, 0)])
def test_an_inner_range_outside_the_payload_is_refused(inner):
    with pytest.raises(RoundError, match="outside") as err:
        Reassembly(10, "state", inner)
    assert err.value.reason == "malformed"


async def test_assemble_frames_checks_the_inner_range_against_its_own_hash():
    payload = bytes(range(256)) * 40
    frames = [frame for _, frame in chunk_frames(payload, 1000)]
    rest, inner = _digest(payload[:100] + payload[612:]), _digest(payload[100:612])

    blob = await assemble_frames(_messages(frames), len(payload), rest, 1.0, "state", None, (100, 512), inner)
    assert blob == payload
    # The right bytes, each hash given for the other part (or the whole): refused.
    for outer_hex, inner_hex in ((inner, rest), (_digest(payload), inner), (rest, _digest(payload))):
        with pytest.raises(RoundError, match="digest check") as err:
            await assemble_frames(_messages(frames), len(payload), outer_hex, 1.0, "state", None, (100, 512),
                                  inner_hex)
        assert err.value.reason == "corrupt"


def test_a_closed_reassembly_stops_its_hash():
    parts = Reassembly(10, "state")
    parts.add(0, b"abcd")
    with ThreadPoolExecutor(1) as pool:
        hashed = pool.submit(parts.hash_until_done)
        parts.close()
        assert hashed.result(timeout=10) is None


@pytest.mark.parametrize("total, chunks, reason", [
    (10, [(0, b"abcd"), (4, b"efgh"), (8, b"ijk")], "oversized"),    # past the announced 10 bytes
    (10, [(0, b"abcd"), (5, b"efgh")], "malformed"),                  # a gap
    (10, [(0, b"abcd"), (0, b"abcd")], "malformed"),                  # a repeat
    (10, [(0, b"")], "oversized"),                                     # an empty chunk
    (MAX_CHUNK_BYTES + 1, [(0, b"x" * (MAX_CHUNK_BYTES + 1))], "oversized"),
])
def test_reassembly_refuses_chunks_that_do_not_fit(total, chunks, reason):
    parts = Reassembly(total, "state")
    with pytest.raises(RoundError) as err:
        for offset, data in chunks:
            parts.add(offset, data)
    assert err.value.reason == reason


def test_reassembly_of_a_short_stream_has_no_payload():
    parts = Reassembly(10, "state")
    parts.add(0, b"abcd")
    with pytest.raises(RoundError, match="4 of 10 bytes") as err:
        parts.payload()
    assert err.value.reason == "truncated"


def test_empty_payload():
    parts = Reassembly(0, "state")
    assert parts.hash_until_done() == (_digest(b""), _digest(b"")) and parts.payload() == b""


async def test_assemble_frames_reads_a_whole_stream():
    payload = bytes(range(256)) * 40
    frames = [frame for _, frame in chunk_frames(payload, 1000)]

    blob = await assemble_frames(_messages(frames), len(payload), _digest(payload), 1.0, "state")

    assert blob == payload


@pytest.mark.parametrize("cut, stall_s, reason", [(2, 0.0, "truncated"), (2, 5.0, "stalled")])
async def test_assemble_frames_refuses_a_stream_that_ends_early_or_stalls(cut, stall_s, reason):
    payload = b"z" * 4000
    frames = [frame for _, frame in chunk_frames(payload, 1000)][:cut]
    with pytest.raises(RoundError) as err:
        await assemble_frames(_messages(frames, stall_s), len(payload), _digest(payload), 0.2, "state")
    assert err.value.reason == reason


async def test_assemble_frames_refuses_a_payload_that_fails_its_hash():
    payload = b"y" * 3000
    frames = [frame for _, frame in chunk_frames(payload, 1000)]
    with pytest.raises(RoundError, match="digest check") as err:
        await assemble_frames(_messages(frames), len(payload), _digest(b"y" * 2999 + b"x"), 1.0, "state")
    assert err.value.reason == "corrupt"


def test_every_rpc_of_the_service_has_a_handler():
    service = pb.DESCRIPTOR.services_by_name["PeerService"]

    name, handlers = method_handlers(pb_grpc.PeerServiceServicer())

    assert name == service.full_name
    assert set(handlers) == {m.name for m in service.methods}
    serialize = handlers["GetState"].response_serializer
    message = pb.StateMessage(header=pb.StateHeader(round=2))
    assert serialize(message) == message.SerializeToString() and serialize(b"\x12\x00") == b"\x12\x00"


def test_a_payload_that_cannot_be_reserved_is_refused(monkeypatch):
    def no_memory(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(streams.mmap, "mmap", no_memory)
    with pytest.raises(RoundError) as err:
        Reassembly(10, "state")
    assert err.value.reason == "oversized"


def test_without_page_prefaulting_the_hash_is_the_same(monkeypatch):
    # A kernel without MADV_POPULATE_WRITE refuses the advice (EINVAL): the copies fault pages in.
    monkeypatch.setattr(streams, "_MADV_POPULATE_WRITE", 0x7FFF)
    payload = bytes(range(256)) * 20000
    parts = Reassembly(len(payload), "state")
    for offset, frame in chunk_frames(payload, 65536):
        parts.add(*chunk_of_frame(frame))

    assert parts.hash_until_done() == (_digest(payload), _digest(b"")) and parts.payload() == payload
    assert not parts._populating


async def test_a_reduce_stream_is_read_from_frames_and_from_any_other_protobuf_layout():
    # Prepare: the frames this transport sends, and the same chunks as protobuf writes a
    # ReduceMessage with the fields in another order (what another client may send)
    payload = bytes(range(256)) * 12
    frames = [frame for _, frame in chunk_frames(payload, 1000)]
    data = payload[1000:2000]
    inner = b"\x12" + streams._varint(len(data)) + data + b"\x08" + streams._varint(1000)  # data, then offset
    other = b"\x12" + streams._varint(len(inner)) + inner
    assert chunk_of_frame(other) is None and pb.ReduceMessage.FromString(other).chunk.offset == 1000

    # Execute
    from_frames = await assemble_reduce(_messages(frames), len(payload), 1.0, "part")
    from_protobuf = await assemble_reduce(_messages([frames[0], other, *frames[2:]]), len(payload), 1.0, "part")

    # Assert: frames are ReduceMessage chunks, byte for byte
    assert from_frames == payload and from_protobuf == payload
    assert [pb.ReduceMessage.FromString(f).chunk.data for f in frames] == [payload[o:o + 1000]
                                                                         for o in range(0, len(payload), 1000)]


@pytest.mark.parametrize("bad, reason", [
    (pb.ReduceMessage(header=pb.ReduceHeader(peer_id="x")).SerializeToString(), "malformed"),  # not a chunk
    (b"\x12\x05\x08", "malformed"),  # does not parse
    (pb.ReduceMessage(chunk=pb.Chunk(offset=7, data=b"abc")).SerializeToString(), "malformed"),  # misplaced
    (pb.ReduceMessage(chunk=pb.Chunk(offset=0, data=b"a" * 5000)).SerializeToString(), "oversized"),  # past the size
])
async def test_a_reduce_stream_refuses_what_is_not_the_next_chunk(bad, reason):
    with pytest.raises(RoundError) as err:
        await assemble_reduce(_messages([bad]), 4000, 1.0, "part")
    assert err.value.reason == reason


@pytest.mark.parametrize("cut, stall_s, reason", [(2, 0.0, "truncated"), (2, 5.0, "stalled")])
async def test_a_reduce_stream_that_ends_early_or_stalls_is_refused(cut, stall_s, reason):
    frames = [frame for _, frame in chunk_frames(b"z" * 4000, 1000)][:cut]
    with pytest.raises(RoundError) as err:
        await assemble_reduce(_messages(frames, stall_s), 4000, 0.2, "part")
    assert err.value.reason == reason
