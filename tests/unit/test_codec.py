"""Unit tests for peer.codec: round trips within the stated bound, exact wire sizes, hostile
payloads refused, error feedback keeping the sum of what was sent on track."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.codec import CODEC_NAMES, Codec, ErrorFeedback, Int4Codec, Int8Codec, all_finite, get_codec
from peer.errors import CodecError

SIZES = [0, 1, 7, 255, 257, 1000003]
BLOCKWISE = ["int8", "int4", "sign1"]


def _ceil(a: int, b: int) -> int:
    return (a + b - 1) // b


# Written independently of the implementation: the documented wire sizes.
EXPECTED_SIZE = {
    "fp32": lambda n: 4 * n,
    "fp16": lambda n: 2 * n,
    "bf16": lambda n: 2 * n,
    "int8": lambda n: 4 * _ceil(n, 256) + n,
    "int4": lambda n: 4 * _ceil(n, 128) + _ceil(n, 2),
    "sign1": lambda n: 4 * _ceil(n, 256) + _ceil(n, 8),
}


def _randn(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * scale


def _max_err(codec: Codec, x: torch.Tensor) -> float:
    decoded = codec.decode(codec.encode(x), x.numel())
    return (decoded.double() - x.double()).abs().max().item() if x.numel() else 0.0


def _huge(name: str) -> float:
    return 6e4 if name == "fp16" else 1e30


def test_registry_names() -> None:
    # Prepare / Execute
    names = CODEC_NAMES

    # Assert
    assert names == CODEC_NAMES == ("fp32", "fp16", "bf16", "int8", "int4", "sign1")
    for name in names:
        assert get_codec(name).name == name


def test_unknown_codec_name_lists_known_names() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match="int8"):
        get_codec("zstd9")


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_within_bound_and_exact_size(name: str, n: int) -> None:
    # Prepare
    codec = get_codec(name)
    x = _randn(n, seed=n, scale=3.0)

    # Execute
    data = codec.encode(x)
    decoded = codec.decode(data, n)

    # Assert
    assert len(data) == codec.encoded_size(n) == EXPECTED_SIZE[name](n)
    assert decoded.dtype == torch.float32 and decoded.shape == (n,)
    if n:
        assert (decoded.double() - x.double()).abs().max().item() <= codec.error_bound(x)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize(
    "kind", ["zeros", "huge", "tiny", "subnormal", "mixed_blocks", "constant", "neg_zero"]
)
def test_round_trip_special_values(name: str, kind: str) -> None:
    # Prepare
    codec = get_codec(name)
    n = 1000
    x = {
        "zeros": lambda: torch.zeros(n),
        "huge": lambda: _randn(n, 1).sign() * _huge(name),
        "tiny": lambda: _randn(n, 2) * 1e-30,
        "subnormal": lambda: _randn(n, 3) * 1e-42,
        "mixed_blocks": lambda: torch.cat(
            [torch.zeros(300), _randn(400, 4) * 1e20, _randn(300, 5)]
        ),
        "constant": lambda: torch.full((n,), -2.5),
        "neg_zero": lambda: torch.full((n,), -0.0),
    }[kind]()

    # Execute
    decoded = codec.decode(codec.encode(x), n)

    # Assert
    assert torch.isfinite(decoded).all()
    assert (decoded.double() - x.double()).abs().max().item() <= codec.error_bound(x)
    if kind == "zeros":
        assert torch.equal(decoded, torch.zeros(n))


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8", "int4", "sign1"])
def test_float32_max_does_not_overflow(name: str) -> None:
    # Prepare
    fmax = torch.finfo(torch.float32).max
    codec = get_codec(name)
    x = torch.tensor([fmax, -fmax, 1.0, 0.0] * 100)

    # Execute
    decoded = codec.decode(codec.encode(x), x.numel())

    # Assert
    assert torch.isfinite(decoded).all()
    assert (decoded.double() - x.double()).abs().max().item() <= codec.error_bound(x)


def test_fp16_clamps_out_of_range_values() -> None:
    # Prepare
    codec = get_codec("fp16")
    x = torch.tensor([1e6, -1e9, 3.0])

    # Execute
    decoded = codec.decode(codec.encode(x), 3)

    # Assert
    assert decoded.tolist() == [65504.0, -65504.0, 3.0]
    assert (decoded.double() - x.double()).abs().max().item() <= codec.error_bound(x)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(CODEC_NAMES),
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=600
    ),
)
def test_round_trip_within_bound_property(name: str, values: list[float]) -> None:
    # Prepare
    codec = get_codec(name)
    x = torch.tensor(values, dtype=torch.float32)

    # Execute
    err = _max_err(codec, x)

    # Assert
    assert err <= codec.error_bound(x)


@pytest.mark.parametrize("block", [1, 3, 64, 1000])
@pytest.mark.parametrize("cls_name", BLOCKWISE)
def test_custom_block_sizes(cls_name: str, block: int) -> None:
    # Prepare
    codec = type(get_codec(cls_name))(block)
    x = _randn(2501, seed=block)

    # Execute
    data = codec.encode(x)

    # Assert
    assert len(data) == codec.encoded_size(2501)
    assert _max_err(codec, x) <= codec.error_bound(x)


def test_fp32_round_trip_is_exact() -> None:
    # Prepare
    codec = get_codec("fp32")
    x = torch.cat([_randn(1001), torch.tensor([1e-45, -1e38, 0.0, -0.0])])

    # Execute
    decoded = codec.decode(codec.encode(x), x.numel())

    # Assert
    assert torch.equal(decoded, x)
    assert codec.error_bound(x) == 0.0


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encode_is_deterministic_and_decode_returns_fresh_writable_tensor(name: str) -> None:
    # Prepare
    codec = get_codec(name)
    x = _randn(3001, seed=7)
    snapshot = x.clone()
    payload = bytearray(codec.encode(x))

    # Execute
    first, second = codec.encode(x), codec.encode(x.clone())
    decoded = codec.decode(payload, x.numel())
    kept = decoded.clone()
    payload[:] = bytes(len(payload))  # must not change the decoded tensor: no aliasing
    decoded += 1.0  # must not raise: writable

    # Assert
    assert first == second == codec.encode(snapshot)
    assert torch.equal(x, snapshot)
    assert torch.equal(kept, codec.decode(first, x.numel()))
    assert torch.equal(decoded, kept + 1.0)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_accepts_bytes_bytearray_memoryview(name: str) -> None:
    # Prepare
    codec = get_codec(name)
    x = _randn(77)
    data = codec.encode(x)

    # Execute
    results = [codec.decode(buf, 77) for buf in (data, bytearray(data), memoryview(data))]

    # Assert
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_into_slices_equals_decode_bit_for_bit(name: str) -> None:
    # Prepare: three shards of one tensor, as the all-reduce decodes the averaged shards
    codec = get_codec(name)
    x = _randn(5000, seed=3)
    bounds = [(0, 1000), (1000, 1001), (1001, 5000)]
    payloads = [codec.encode(x[s:e]) for s, e in bounds]
    out = torch.full((5000,), 123.0)

    # Execute
    for (s, e), p in zip(bounds, payloads):
        codec.decode_into(memoryview(p), out[s:e])

    # Assert
    assert torch.equal(out, torch.cat([codec.decode(p, e - s) for (s, e), p in zip(bounds, payloads)]))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_into_refuses_a_wrong_size_or_target_and_non_finite_values(name: str) -> None:
    # Prepare
    codec = get_codec(name)
    data = codec.encode(_randn(300))
    poisoned = np.array([1.0, math.inf], dtype="<f4").tobytes()

    # Execute / Assert
    with pytest.raises(CodecError, match="expected"):
        codec.decode_into(data, torch.empty(250))
    with pytest.raises(CodecError, match="contiguous 1-D float32"):
        codec.decode_into(data, torch.empty(600)[::2])
    with pytest.raises(CodecError, match="contiguous 1-D float32"):
        codec.decode_into(data, torch.empty(300, dtype=torch.float64))
    if name == "fp32":
        with pytest.raises(CodecError, match="non-finite"):
            codec.decode_into(poisoned, torch.empty(2))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_rejects_wrong_size_naming_both_sizes(name: str) -> None:
    # Prepare
    codec = get_codec(name)
    data = codec.encode(_randn(300))
    expected = codec.encoded_size(300)

    # Execute / Assert
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(CodecError, match=rf"{len(bad)}.*{expected}"):
            codec.decode(bad, 300)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("numel", [-1, 2**62])
def test_decode_rejects_bad_numel(name: str, numel: int) -> None:
    # Execute / Assert
    with pytest.raises(CodecError):
        get_codec(name).decode(b"\0" * 16, numel)


@pytest.mark.parametrize("name", BLOCKWISE)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_decode_rejects_non_finite_scale(name: str, bad: float) -> None:
    # Prepare
    codec = get_codec(name)
    data = bytearray(codec.encode(_randn(600)))
    data[4:8] = struct.pack("<f", bad)  # second block's scale

    # Execute / Assert
    with pytest.raises(CodecError, match="non-finite scale"):
        codec.decode(data, 600)


@pytest.mark.parametrize("name", BLOCKWISE)
def test_decode_rejects_negative_scale(name: str) -> None:
    # Prepare
    codec = get_codec(name)
    data = bytearray(codec.encode(_randn(600)))
    data[0:4] = struct.pack("<f", -1.0)

    # Execute / Assert
    with pytest.raises(CodecError, match="negative scale"):
        codec.decode(data, 600)


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_float_decode_rejects_non_finite_values(name: str, bad: float) -> None:
    # Prepare
    codec = get_codec(name)
    dtype = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}[name]
    raw = np.array([1.0, bad, 2.0], dtype=dtype).tobytes()
    if name == "bf16":  # top halves of the float32s
        raw = np.frombuffer(raw, "<u4").__rshift__(16).astype("<u2").tobytes()

    # Execute / Assert
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode(raw, 3)


def test_int8_decode_rejects_overflowing_values() -> None:
    # Prepare: -128 (never produced) times a scale near float32 max / 127 overflows.
    codec = get_codec("int8")
    data = struct.pack("<f", 3e36) + bytes([0x80]) + bytes(3)

    # Execute / Assert
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode(data, 4)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_encode_rejects_non_finite_input(name: str, bad: float) -> None:
    # Prepare
    x = _randn(600)
    x[333] = bad

    # Execute / Assert
    with pytest.raises(CodecError):
        get_codec(name).encode(x)


@pytest.mark.parametrize(
    "x", [torch.zeros(2, 3), torch.zeros(4, dtype=torch.float64), torch.zeros(())]
)
def test_encode_rejects_wrong_shape_or_dtype(x: torch.Tensor) -> None:
    # Execute / Assert
    with pytest.raises(CodecError):
        get_codec("int8").encode(x)


def test_encode_accepts_non_contiguous_input() -> None:
    # Prepare
    base = _randn(2000)
    x = base[::2]

    # Execute
    data = get_codec("int8").encode(x)

    # Assert
    assert data == get_codec("int8").encode(x.contiguous())


def test_compression_ratios() -> None:
    # Prepare
    n = 10**6

    # Execute
    ratio = {name: get_codec(name).compression_ratio(n) for name in CODEC_NAMES}

    # Assert
    assert ratio["fp32"] == 1.0
    assert ratio["fp16"] == ratio["bf16"] == 2.0
    assert 3.9 < ratio["int8"] < 4.0
    assert 7.0 < ratio["int4"] < 8.0
    assert ratio["sign1"] > 25.0
    assert all(get_codec(name).compression_ratio(0) == 1.0 for name in CODEC_NAMES)


@pytest.mark.parametrize("name", BLOCKWISE)
def test_error_feedback_tracks_the_sum(name: str) -> None:
    # Prepare
    n, steps = 5000, 50
    codec = get_codec(name)
    feedback = ErrorFeedback(codec, n)
    gen = torch.Generator().manual_seed(11)
    sent = torch.zeros(n, dtype=torch.float64)
    sent_plain = torch.zeros(n, dtype=torch.float64)
    fed = torch.zeros(n, dtype=torch.float64)
    rms_gap, rms_gap_plain = [], []

    # Execute
    for _ in range(steps):
        # A persistent bias plus noise: without feedback, the codec's errors pile up.
        x = torch.randn(n, generator=gen) + 0.3 * torch.linspace(-1, 1, n)
        fed += x.double()
        sent += codec.decode(feedback.encode(x), n).double()
        sent_plain += codec.decode(codec.encode(x), n).double()
        rms_gap.append((fed - sent).norm().item() / math.sqrt(n))
        rms_gap_plain.append((fed - sent_plain).norm().item() / math.sqrt(n))

    # Assert: what was fed minus what was sent is exactly the residual ...
    assert torch.allclose(fed - sent, feedback.residual.double(), atol=1e-3, rtol=0)
    # ... which stays bounded (no growth from step 10 to step 50) ...
    assert rms_gap[-1] <= 1.5 * rms_gap[9]
    # ... while without feedback the gap keeps growing and ends several times larger.
    assert rms_gap_plain[-1] >= 2 * rms_gap_plain[9]
    assert rms_gap_plain[-1] > 4 * rms_gap[-1]


def test_error_feedback_lossless_codec_keeps_zero_residual_and_reset() -> None:
    # Prepare
    exact = ErrorFeedback(get_codec("fp32"), 10)
    lossy = ErrorFeedback(get_codec("sign1"), 10)
    x = _randn(10)

    # Execute
    data = exact.encode(x)
    lossy.encode(x)
    nonzero_before_reset = bool(lossy.residual.abs().sum() > 0)
    lossy.reset()

    # Assert
    assert data == get_codec("fp32").encode(x)
    assert torch.equal(exact.residual, torch.zeros(10))
    assert nonzero_before_reset and torch.equal(lossy.residual, torch.zeros(10))


def test_error_feedback_rejects_wrong_size_and_keeps_residual() -> None:
    # Prepare
    feedback = ErrorFeedback(get_codec("int4"), 10)
    feedback.encode(_randn(10))
    before = feedback.residual.clone()

    # Execute / Assert
    with pytest.raises(CodecError):
        feedback.encode(_randn(11))
    bad = _randn(10)
    bad[0] = math.nan
    with pytest.raises(CodecError):
        feedback.encode(bad)
    assert torch.equal(feedback.residual, before)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("piece", [1, 2048, 4096, 1 << 16])
def test_decode_pieces_are_the_values_of_decode_in_order(name: str, piece: int) -> None:
    # Prepare: a size that is not a whole number of blocks or pieces
    codec = get_codec(name)
    x = _randn(5003, seed=4)
    data = codec.encode(x)

    # Execute: the scratch buffer is reused, so each piece is copied out before the next
    got = [(start, values.clone()) for start, values in codec.decode_pieces(memoryview(data), 5003, piece)]

    # Assert: consecutive pieces from 0 that together are decode's values, bit for bit
    starts = [s for s, _ in got]
    assert starts[0] == 0 and all(s + v.numel() == nxt for (s, v), nxt in zip(got, starts[1:] + [5003]))
    assert torch.equal(torch.cat([v for _, v in got]), codec.decode(data, 5003))


@pytest.mark.parametrize("codec", [get_codec(name) for name in CODEC_NAMES] + [Int8Codec(block=300), Int4Codec(block=100)],
                         ids=[*CODEC_NAMES, "int8-block300", "int4-block100"])
def test_piece_size_is_the_cut_of_decode_pieces(codec: Codec) -> None:
    # (an owner cuts its own raw part this way, to average it piece by piece with decoded ones)
    data = codec.encode(_randn(70_001, seed=8))
    sizes = [values.numel() for _, values in codec.decode_pieces(data, 70_001, 1 << 14)]
    step = codec.piece_size(1 << 14)
    assert sizes[:-1] == [step] * (len(sizes) - 1) and 0 < sizes[-1] <= step and sum(sizes) == 70_001


@pytest.mark.parametrize("name", BLOCKWISE)
def test_decode_pieces_refuse_a_wrong_size_before_any_piece_and_non_finite_values(name: str) -> None:
    # Prepare: an int8/int4 payload whose last block's scale is finite but too large for its
    # values (q x scale overflows); sign1 decodes to +-scale, so a huge scale stays finite
    codec = get_codec(name)
    n = 3 * codec.block
    data = bytearray(codec.encode(_randn(n, seed=5)))
    data[8:12] = struct.pack("<f", 3.0e38)

    # Execute / Assert
    with pytest.raises(CodecError, match="expected"):
        next(codec.decode_pieces(data, n + codec.block))
    if name != "sign1":
        with pytest.raises(CodecError, match="non-finite"):
            list(codec.decode_pieces(data, n, 8 * codec.block))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_value_bounds_bound_every_decoded_value_and_the_norm_from_the_scales_alone(name: str) -> None:
    # Prepare: encoded values, and for int8 a body byte of -128 (no encoder writes it, a liar may)
    codec = get_codec(name)
    n = 3 * 256 + 5
    data = bytearray(codec.encode(_randn(n, seed=6) * 1e3))
    if name == "int8":
        data[-1] = 0x80

    # Execute
    bounds = codec.value_bounds(data, n)
    values = codec.decode(data, n)

    # Assert: blockwise codecs bound from their scales: the largest value within 128/127 of the
    # truth (int8's -128 against its 127), the norm a few times it for Gaussian values (a block
    # full of its largest value); the float codecs have no such header and say so
    if name in BLOCKWISE:
        largest, norm = values.abs().max().item(), values.double().norm().item()
        assert largest <= bounds[0] <= largest * 128 / 127 * (1 + 2**-19)
        assert norm <= bounds[1] <= 5 * norm
    else:
        assert bounds is None
    assert codec.value_bounds(b"", 0) == (0.0, 0.0)
    with pytest.raises(CodecError, match="expected"):
        codec.value_bounds(data, n + 256)
    if name in ("int8", "int4"):  # a scale whose values may overflow proves nothing: read the values
        data[0:4] = struct.pack("<f", 3.0e38)
        assert codec.value_bounds(data, n) is None


def _two_feedbacks(name: str, seed: int) -> tuple[torch.Tensor, ErrorFeedback, ErrorFeedback]:
    """A delta of 1000 values and two feedbacks carrying the same residual."""
    codec = get_codec(name)
    x, first = _randn(1000, seed=seed), _randn(1000, seed=seed + 1)
    pair = ErrorFeedback(codec, 1000), ErrorFeedback(codec, 1000)
    for fb in pair:
        fb.commit(fb.encode_shards(first, [(0, 1000)])[1])
    return x, *pair


@pytest.mark.parametrize("name", ["int8", "int4", "sign1", "fp16"])
def test_error_feedback_shards_encoded_one_at_a_time_in_any_order_match_encode_shards(name: str) -> None:
    # Prepare: two feedbacks with the same carried residual
    x, whole, pieces = _two_feedbacks(name, 6)
    bounds = [(0, 300), (300, 301), (301, 1000)]

    # Execute: all shards at once, and one at a time in another order
    payloads, residual = whole.encode_shards(x, bounds)
    corrected = pieces.corrected(x)
    one_by_one = {j: pieces.encode_shard(corrected, *bounds[j]) for j in (2, 0, 1)}

    # Assert: the same bytes and the same residual
    assert [one_by_one[j] for j in range(3)] == payloads
    assert torch.equal(corrected, residual)


@pytest.mark.parametrize(("values", "finite"), [
    ([], True),
    ([1.0, -2.0, 3.5], True),
    ([3e38, 3e38, -1.0], True),            # finite values whose sum overflows: the extrema decide
    ([-3e38, -3e38, 3e38, 3e38], True),
    ([1.0, math.nan, 2.0], False),
    ([1.0, math.inf], False),
    ([-math.inf, 1.0], False),
    ([math.inf, -math.inf], False),        # their sum is NaN
    ([3e38, 3e38, math.nan], False),
])
def test_all_finite_sees_every_nan_and_infinity(values: list[float], finite: bool) -> None:
    assert all_finite(torch.tensor(values, dtype=torch.float32)) is finite


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=300))
def test_all_finite_agrees_with_isfinite(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    assert all_finite(x) is bool(torch.isfinite(x).all())


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_small_tensors_encode_and_scale_like_the_general_path(name: str) -> None:
    # Prepare: sizes on both sides of SMALL_NUMEL (numpy below it), magnitudes far apart,
    # a tail block, and a zero block (which the numpy path leaves to the general one)
    from peer.codec.blockwise import SMALL_NUMEL, _BlockCodec

    codec = get_codec(name)
    gen = torch.Generator().manual_seed(3)
    cases = [torch.randn(n, generator=gen) * s for n, s in [(1, 1.0), (300, 1e-30), (4805, 2.0), (SMALL_NUMEL, 1e30),
                                                            (SMALL_NUMEL + 1, 1.0)]]
    cases.append(torch.cat([torch.zeros(256), torch.randn(700, generator=gen)]))
    for x in cases:
        # Execute
        small = codec.encode(x)
        general = _BlockCodec._encode(codec, x)
        # Assert: the same bytes, and decode (numpy scaling below SMALL_NUMEL) as the torch-only path
        assert small == general, x.numel()
        assert torch.equal(codec.decode(small, x.numel()).view(torch.int32),
                           codec.decode_torch(small, x.numel()).view(torch.int32)), x.numel()


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("cuts", [[5003], [1, 2047, 2955], [4096, 907], [1000] * 5 + [3]])
def test_encode_pieces_gives_the_bytes_of_encode(name: str, cuts: list[int]) -> None:
    # Prepare: 5003 values (not a whole number of blocks), handed over in pieces cut anywhere,
    # from one reused scratch buffer as an owner's mean comes
    codec = get_codec(name)
    x = _randn(5003, seed=8)
    starts = [sum(cuts[:i]) for i in range(len(cuts))]
    scratch = torch.empty(max(cuts))

    def pieces():
        for start, n in zip(starts, cuts):
            scratch[:n].copy_(x[start:start + n])
            yield start, scratch[:n]

    # Execute / Assert: the same bytes as encode of the whole
    assert bytes(codec.encode_pieces(pieces(), 5003)) == bytes(codec.encode(x))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encode_pieces_refuses_pieces_that_do_not_cover_the_values(name: str) -> None:
    codec = get_codec(name)
    x = _randn(600, seed=9)
    with pytest.raises(CodecError, match="ended at 500"):
        codec.encode_pieces([(0, x[:500])], 600)
    with pytest.raises(CodecError, match="expected one at 0"):
        codec.encode_pieces([(100, x[:500])], 600)
    bad = x.clone()
    bad[7] = math.nan
    with pytest.raises(CodecError):
        codec.encode_pieces([(0, bad[:300]), (300, bad[300:])], 600)


@pytest.mark.parametrize("name", ["int8", "int4", "sign1", "fp16"])
def test_error_feedback_corrected_in_place_matches_corrected_bit_for_bit(name: str) -> None:
    # Prepare: two feedbacks with the same carried residual
    x, fresh, in_place = _two_feedbacks(name, 10)
    own = in_place.residual
    bounds = [(0, 300), (300, 1000)]

    # Execute: one corrects into a new tensor, the other in the caller's delta (a copy of x)
    corrected = fresh.corrected(x)
    payloads = [fresh.encode_shard(corrected, s, e) for s, e in bounds]
    fresh.commit(corrected)
    given = x.clone()
    assert in_place.corrected_in_place(given) is given
    same = [in_place.encode_shard(given, s, e) for s, e in bounds]
    in_place.commit(given, copy=True)

    # Assert: the same bytes and residual; the residual stays its own tensor, not the caller's
    assert same == payloads
    assert torch.equal(in_place.residual.view(torch.int32), fresh.residual.view(torch.int32))
    assert in_place.residual is own and in_place.residual.data_ptr() != given.data_ptr()


def test_error_feedback_corrects_a_tensor_it_cannot_write_into_a_new_one() -> None:
    fb = ErrorFeedback(get_codec("int8"), 10)
    x = torch.ones(20)[::2]  # not contiguous
    out = fb.corrected_in_place(x)
    assert out is not x and torch.equal(out, torch.ones(10)) and torch.equal(x, torch.ones(10))
