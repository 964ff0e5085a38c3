"""Blockwise scaled codecs: int8 and int4 (absmax), sign1 (mean absolute value).

The tensor is cut into consecutive blocks of ``block`` elements; the last block holds the
remainder (``numel % block`` elements) when ``numel`` is not a multiple. ``nblocks =
ceil(numel / block)``. Every payload is

    [nblocks x float32 LE scale][packed values]

with no header. The packed values are, per codec:

* int8:  ``numel`` bytes, int8 ``q = round(x / scale)`` in [-127, 127], ``scale = absmax / 127``.
         Decode: ``q * scale``.
* int4:  ``ceil(numel / 2)`` bytes; element ``2i`` in the low nibble of byte ``i``, ``2i + 1`` in
         the high nibble. Nibble ``= q + 8`` with ``q = round(x / scale)`` in [-7, 7],
         ``scale = absmax / 7``; the unused high nibble when ``numel`` is odd is 0. Decode:
         ``(nibble - 8) * scale``; nibble 0 is never produced and decodes to 0.
* sign1: ``ceil(numel / 8)`` bytes of sign bits, LSB first (``numpy.packbits(bitorder="little")``);
         bit 1 means ``x < 0``, so +0, -0 and positives send bit 0. ``scale = mean|x|`` over the
         block's elements. Decode: ``-scale`` for bit 1, ``+scale`` for bit 0. Padding bits are 0.

A block of zeros has scale 0 and decodes to zeros. Rounding is round-half-to-even.

The torch-only path (``encode_torch``/``decode_torch``, and ``encode``/``decode`` of a tensor on
another device) does the same arithmetic on the whole tensor at once on its device, and gives
the host path's bytes: every step is exact or correctly rounded (absmax, one division, rounding,
one multiplication). Only sign1's scale is a sum, whose order a GPU may change in the last bit.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from peer.codec.base import Codec, all_finite, check_numel, payload_to
from peer.errors import CodecError

if sys.byteorder != "little":  # scales are written through native float32 views
    raise ImportError("peer.codec.blockwise supports little-endian hosts only")

_F32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal, 2**-126
_F32_MAX = float(torch.finfo(torch.float32).max)
# Absolute slack for blocks whose scale is subnormal (scale rounding up to 2**-150, clamping):
# a few hundred times the smallest subnormal; irrelevant for any real tensor.
_ABS_SLACK = 2.0**-140
# Relative slack for float32 rounding in x / scale, q * scale and absmax / qmax (a few ulps).
_REL_SLACK = 2.0**-20
# Work in chunks of about 2**20 elements (4 MiB of float32): temporaries stay in cache and are
# reused, which is about twice as fast as whole-tensor passes with 40 MB temporaries.
_CHUNK_ELEMENTS = 2**20


def _block_views(t: torch.Tensor, block: int) -> list[tuple[torch.Tensor, slice]]:
    """2-D views of ``t`` by block, with the rows of the per-block scale vector each covers.

    The full blocks are one ``(nfull, block)`` view and the tail a ``(1, rest)`` view, so
    every per-block operation is two broadcast torch ops and no padding copy.
    """
    n = t.numel()
    nfull = n // block
    cut = nfull * block
    views = []
    if nfull:
        views.append((t[:cut].view(nfull, block), slice(0, nfull)))
    if cut < n:
        views.append((t[cut:].view(1, n - cut), slice(nfull, nfull + 1)))
    return views


def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block ``max|x|`` (float32, NaN propagates); ``amax``/``amin`` need no temporary."""
    parts = [torch.maximum(v.amax(dim=1), v.amin(dim=1).neg()) for v, _ in _block_views(x, block)]
    return torch.cat(parts) if parts else torch.empty(0)


SMALL_NUMEL = 1 << 15
"""Host tensors of at most this many values are encoded and scaled with numpy: a torch op costs
~5 us here before it touches a value, a numpy one ~1 us, and a small model's shard (a few
thousand values) took ~20 torch ops to encode. The same correctly rounded float32 operations
(absmax, one division, round half to even, one multiplication), so the same bytes."""


def _scale_into(out: torch.Tensor, scales: torch.Tensor, block: int) -> None:
    """Multiply each block of ``out`` in place by its scale."""
    if out.device.type == "cpu" and out.numel() <= SMALL_NUMEL:
        _np_scale_into(out.numpy(), scales.numpy(), block)
        return
    for view, rows in _block_views(out, block):
        view.mul_(scales[rows, None])


def _np_blocks(a: np.ndarray, block: int) -> list[tuple[np.ndarray, slice]]:
    """``_block_views`` for a 1-D numpy array."""
    n = a.size
    nfull = n // block
    cut = nfull * block
    views = []
    if nfull:
        views.append((a[:cut].reshape(nfull, block), slice(0, nfull)))
    if cut < n:
        views.append((a[cut:].reshape(1, n - cut), slice(nfull, nfull + 1)))
    return views


def _np_scale_into(out: np.ndarray, scales: np.ndarray, block: int) -> None:
    for view, rows in _np_blocks(out, block):
        view *= scales[rows, None]


class _BlockCodec(Codec):
    """Shared layout, chunking and scale handling; subclasses pack and unpack one chunk.

    A chunk is a whole number of blocks (and a multiple of 8 elements, so packed values start
    on a byte boundary); only the last chunk may end in a partial block.
    """

    default_block: int
    decoded_qmax: float
    """The largest ``|q|`` a payload's body decodes to before its block's scale multiplies it,
    whatever the sender wrote in it (int8: -128, which no encoder writes)."""

    def __init__(self, block: int | None = None) -> None:
        block = self.default_block if block is None else block
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise CodecError(f"{self.name}: block must be a positive int, got {block!r}")
        self.block = block
        blocks_per_chunk = max(8, (_CHUNK_ELEMENTS // block) // 8 * 8)
        self._chunk = blocks_per_chunk * block

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block={self.block})"

    def nblocks(self, numel: int) -> int:
        """``ceil(numel / block)``: the number of float32 scales in a payload."""
        return -(-check_numel(numel) // self.block)

    def encoded_size(self, numel: int) -> int:
        return 4 * self.nblocks(numel) + self._packed_size(numel)

    def _packed_size(self, numel: int) -> int:
        return -(-check_numel(numel) * int(self.bits_per_value) // 8)

    def _chunks(self, numel: int, chunk: int | None = None):
        """``(element slice, scale rows, packed byte slice)`` for each chunk (of ``chunk``
        elements, by default ``self._chunk``: a whole number of blocks and of bytes)."""
        bits = int(self.bits_per_value)
        chunk = self._chunk if chunk is None else chunk
        for start in range(0, numel, chunk):
            stop = min(numel, start + chunk)
            rows = slice(start // self.block, -(-stop // self.block))
            packed = slice(start * bits // 8, -(-stop * bits // 8))
            yield slice(start, stop), rows, packed

    def _payload(self, n: int) -> tuple[bytearray, torch.Tensor, np.ndarray]:
        """The payload of ``n`` values (a bytearray: returned as it is written, without the
        copy that ``ndarray.tobytes`` makes of a whole payload), its scales and its body."""
        head = 4 * self.nblocks(n)
        data = bytearray(head + self._packed_size(n))
        payload = np.frombuffer(data, dtype=np.uint8)
        return data, torch.from_numpy(payload[:head].view(np.float32)), payload[head:]

    def _encode(self, x: torch.Tensor) -> bytearray:
        n = x.numel()
        data, scales, body = self._payload(n)
        head = scales.numel()
        work = torch.empty(min(n, self._chunk), dtype=torch.float32)
        for elems, rows, packed in self._chunks(n):
            self._encode_chunk(x[elems], scales[rows], body[packed], work)
        if head and not bool(torch.isfinite(scales).all()):
            raise CodecError(f"{self.name}: cannot encode NaN or infinite values")
        return data

    def encode_pieces(self, pieces, numel: int) -> bytearray:
        # Each chunk gathered from the pieces into one chunk of scratch and encoded once full:
        # the chunks of ``_encode``, so the same bytes.
        n = check_numel(numel)
        if n <= SMALL_NUMEL:  # gathered whole and encoded by ``encode``'s numpy path (see SMALL_NUMEL)
            return super().encode_pieces(pieces, n)
        data, scales, body = self._payload(n)
        head = scales.numel()
        gathered = torch.empty(min(n, self._chunk), dtype=torch.float32)
        work = torch.empty_like(gathered)
        chunks = self._chunks(n)
        elems, rows, packed = next(chunks, (slice(0, 0), None, None))
        done = 0
        for start, values in pieces:
            self._next_piece(start, values.numel(), done, n)
            taken = 0
            while taken < values.numel():
                take = min(values.numel() - taken, elems.stop - done)
                at = done - elems.start
                gathered[at:at + take].copy_(values[taken:taken + take])
                taken, done = taken + take, done + take
                if done == elems.stop:
                    self._encode_chunk(gathered[:elems.stop - elems.start], scales[rows], body[packed], work)
                    elems, rows, packed = next(chunks, (slice(n, n), None, None))
        self._pieces_ended(done, n)
        if head and not bool(torch.isfinite(scales).all()):
            raise CodecError(f"{self.name}: cannot encode NaN or infinite values")
        return data

    def _decode(self, view: memoryview, numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32)
        self._decode_into(view, out)
        return out

    def _decode_into(self, view: memoryview, out: torch.Tensor) -> None:
        numel = out.numel()
        scales = self._read_scales(view, numel)
        body = np.frombuffer(view, dtype=np.uint8, offset=4 * scales.numel())
        for elems, rows, packed in self._chunks(numel):
            self._decode_chunk(body[packed], scales[rows], out[elems])

    def _scales_bound(self, scales: torch.Tensor) -> float:
        """An upper bound of ``|v|`` over the values of a payload with these (validated: finite,
        not negative) scales: each value is ``fl(q * scale)`` with ``|q| <= decoded_qmax``, one
        rounding (at most 2**-24 of itself) above the exact product."""
        if not scales.numel():
            return 0.0
        return float(scales.max()) * self.decoded_qmax * (1.0 + _REL_SLACK)

    def _value_bounds(self, view: memoryview, numel: int) -> tuple[float, float] | None:
        scales = self._read_scales(view, numel)
        largest = self._scales_bound(scales)
        if not largest < _F32_MAX:
            return None
        # L2: at most ``block`` values of at most decoded_qmax x scale (plus a rounding) a block;
        # the float64 sum of squares errs by far less than the slack.
        wide = scales.numpy().astype(np.float64)
        norm = math.sqrt(float(np.dot(wide, wide)) * self.block) * self.decoded_qmax * (1.0 + _REL_SLACK)
        return largest, norm

    def piece_size(self, piece: int) -> int:
        # Pieces of whole blocks and whole bytes (a multiple of 8 blocks), as the chunks are.
        unit = 8 * self.block
        return max(unit, piece // unit * unit)

    def _decode_pieces(self, view: memoryview, numel: int, piece: int):
        scales = self._read_scales(view, numel)
        # Values bounded below float32's maximum by their scales are finite: only a payload whose
        # scales come near it (which no encoder writes) has its pieces checked.
        checked = not self._scales_bound(scales) < _F32_MAX
        body = np.frombuffer(view, dtype=np.uint8, offset=4 * scales.numel())
        scratch = torch.empty(min(numel, piece), dtype=torch.float32)
        for elems, rows, packed in self._chunks(numel, piece):
            values = scratch[: elems.stop - elems.start]
            self._decode_chunk(body[packed], scales[rows], values)
            if checked and not all_finite(values):
                raise CodecError(f"{self.name}: payload decodes to non-finite values")
            yield elems.start, values

    def _read_scales(self, view: memoryview, numel: int) -> torch.Tensor:
        """Parse and validate the scale prefix; a copy, so the payload buffer is not aliased."""
        nblocks = self.nblocks(numel)
        scales = np.frombuffer(view, dtype="<f4", count=nblocks).astype(np.float32)
        if not np.isfinite(scales).all():
            raise CodecError(f"{self.name}: payload has a non-finite scale")
        if (scales < 0).any():
            raise CodecError(f"{self.name}: payload has a negative scale")
        return torch.from_numpy(scales)

    def _encode_torch(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        head = 4 * self.nblocks(n)
        payload = torch.empty(head + self._packed_size(n), dtype=torch.uint8, device=x.device)
        if n:
            scales = payload[:head].view(torch.float32)
            self._pack(x, scales, payload[head:])
            if not bool(torch.isfinite(scales).all()):
                raise CodecError(f"{self.name}: cannot encode NaN or infinite values")
        return payload

    def _decode_torch(self, view: memoryview, numel: int, device: torch.device) -> torch.Tensor:
        scales = self._read_scales(view, numel).to(device)
        body = payload_to(view, device, offset=4 * scales.numel())
        return self._unpack(body, scales, numel)

    def _pack(self, x: torch.Tensor, scales: torch.Tensor, body: torch.Tensor) -> None:
        """The torch-only encode of all of ``x``: scales into ``scales``, values into ``body``
        (a uint8 tensor), on ``x``'s device."""
        raise NotImplementedError

    def _unpack(self, body: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
        """The torch-only decode on ``body``'s device: ``numel`` float32 values."""
        raise NotImplementedError

    def _encode_chunk(
        self, x: torch.Tensor, scales: torch.Tensor, body: np.ndarray, work: torch.Tensor
    ) -> None:
        """Write this chunk's scales into ``scales`` and its packed values into ``body``."""
        raise NotImplementedError

    def _decode_chunk(self, body: np.ndarray, scales: torch.Tensor, out: torch.Tensor) -> None:
        """Fill ``out`` from this chunk's packed values and (validated) scales."""
        raise NotImplementedError


class _AbsmaxCodec(_BlockCodec):
    """Symmetric absmax quantization to integers in ``[-qmax, qmax]``."""

    qmax: int

    def error_bound(self, x: torch.Tensor) -> float:
        # Per block the error is at most scale / 2 = absmax_b / (2 qmax); the max over blocks is
        # the global absmax over 2 qmax, plus float32 rounding slack.
        amax = float(_block_absmax(x, self.block).max()) if x.numel() else 0.0
        return amax * (1.0 / (2 * self.qmax) + _REL_SLACK) + _ABS_SLACK

    def _encode(self, x: torch.Tensor) -> bytearray:
        if x.numel() > SMALL_NUMEL or not x.numel():
            return super()._encode(x)
        a = x.numpy()
        n = a.size
        data, scales_t, body = self._payload(n)
        scales = scales_t.numpy()
        blocks = _np_blocks(a, self.block)
        for view, rows in blocks:  # absmax; a NaN propagates (np.maximum, max and min do)
            np.maximum(view.max(axis=1), -view.min(axis=1), out=scales[rows])
        scales /= np.float32(self.qmax)
        lo, hi = float(scales.min()), float(scales.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CodecError(f"{self.name}: cannot encode NaN or infinite values")
        if not (lo >= _F32_TINY and hi * self.qmax < _F32_MAX / 2):
            # A zero block (whose scale's sign bit torch's maximum sets by its code path),
            # subnormal or near-overflow scales: the general path's care.
            return super()._encode(x)
        q = np.empty(n, dtype=np.float32)
        for (src, rows), (dst, _) in zip(blocks, _np_blocks(q, self.block)):
            np.divide(src, scales[rows, None], out=dst)
        np.rint(q, out=q)
        self._pack_np(q, body)
        return data

    def _pack_np(self, q: np.ndarray, body: np.ndarray) -> None:
        """Pack quantized values (integers in [-qmax, qmax], float32) into ``body``."""
        raise NotImplementedError

    def _quantize(self, x: torch.Tensor, scales: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        """Write per-block scales; return ``round(x / scale)`` in ``[-qmax, qmax]`` in ``work``."""
        absmax = _block_absmax(x, self.block)
        if absmax.device.type == "cpu":
            torch.div(absmax, self.qmax, out=scales)
        else:
            # CUDA divides by a Python number through its float32 reciprocal (absmax * (1/qmax)),
            # which differs from absmax / qmax in the last bit of ~4% of scales (seen on an
            # H200, bench/gpu_check.sh); a tensor divisor takes the correctly rounded division.
            torch.div(absmax, torch.full_like(absmax, self.qmax), out=scales)
        # The rare cases below are found from the scales' extremes (one reduction) and only
        # then checked exactly: for small tensors each extra op cost more than the quantizing.
        # (NaN input makes an extreme NaN: the slow paths run, and the caller rejects it.)
        lo, hi = (float(v) for v in torch.aminmax(scales))
        if not hi * self.qmax < _F32_MAX / 2:  # (in float64: a float32 overflow is checked exactly below)
            # Near float32 max, scale * qmax can round up to infinity; step such scales down
            # one ulp so the decoder never overflows (x / scale then rounds to qmax, still
            # within the bound).
            overflow = torch.isinf(scales * self.qmax) & torch.isfinite(scales)
            if bool(overflow.any()):
                lowered = torch.nextafter(scales, torch.zeros_like(scales))
                scales.copy_(torch.where(overflow, lowered, scales))
        if lo > 0:
            divisors = scales
        else:
            divisors = torch.where(scales > 0, scales, torch.ones_like(scales))  # zero block -> q = 0
        q = work[: x.numel()]
        for (src, rows), (dst, _) in zip(_block_views(x, self.block), _block_views(q, self.block)):
            torch.div(src, divisors[rows, None], out=dst)
        q.round_()
        # A subnormal scale is rounded coarsely, so x / scale may exceed qmax; normal scales
        # cannot (x / scale <= qmax * (1 + 2**-23) rounds to qmax), so skip the pass then.
        # NaN input leaves NaN here; the caller rejects it by its scale.
        if not lo >= _F32_TINY and bool(((scales > 0) & (scales < _F32_TINY)).any()):
            q.clamp_(-self.qmax, self.qmax)
        return q


class Int8Codec(_AbsmaxCodec):
    """Blockwise absmax int8: 8 bits per value plus one float32 scale per block (default 256)."""

    name = "int8"
    bits_per_value = 8.0
    lossy = True
    qmax = 127
    decoded_qmax = 128.0
    default_block = 256

    def _encode_chunk(
        self, x: torch.Tensor, scales: torch.Tensor, body: np.ndarray, work: torch.Tensor
    ) -> None:
        q = self._quantize(x, scales, work)
        torch.from_numpy(body).view(torch.int8).copy_(q)  # exact: q is an integer in range

    def _pack_np(self, q: np.ndarray, body: np.ndarray) -> None:
        np.copyto(body.view(np.int8), q, casting="unsafe")  # exact: q is an integer in range

    def _decode_chunk(self, body: np.ndarray, scales: torch.Tensor, out: torch.Tensor) -> None:
        np.copyto(out.numpy(), body.view(np.int8), casting="unsafe")  # int8 -> float32, exact
        _scale_into(out, scales, self.block)

    def _pack(self, x: torch.Tensor, scales: torch.Tensor, body: torch.Tensor) -> None:
        body.view(torch.int8).copy_(self._quantize(x, scales, torch.empty_like(x)))

    def _unpack(self, body: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
        out = body.view(torch.int8).to(torch.float32)
        _scale_into(out, scales, self.block)
        return out


def _int4_table() -> np.ndarray:
    """Byte -> (low value, high value) as float32; nibble 0 (never produced) decodes to 0."""
    nibble = np.arange(16, dtype=np.float32) - 8
    nibble[0] = 0
    table = np.empty((256, 2), dtype=np.float32)
    table[:, 0] = np.tile(nibble, 16)
    table[:, 1] = np.repeat(nibble, 16)
    return table


_INT4_TABLE = _int4_table()


def _pack_nibbles(nibbles: torch.Tensor, out: torch.Tensor) -> None:
    """Two 4-bit values (0..15, uint8) a byte into ``out``, the first in the low nibble; an odd
    last value alone in its byte (high nibble 0). Host and device paths alike."""
    n = nibbles.numel()
    pairs = n // 2
    if pairs:
        two = nibbles[: 2 * pairs].view(pairs, 2)
        torch.bitwise_left_shift(two[:, 1], 4, out=out[:pairs])
        out[:pairs].bitwise_or_(two[:, 0])
    if n % 2:
        out[pairs] = nibbles[n - 1]


class Int4Codec(_AbsmaxCodec):
    """Blockwise absmax int4 in [-7, 7], two per byte, float32 scale per block (default 128)."""

    name = "int4"
    bits_per_value = 4.0
    lossy = True
    qmax = 7
    decoded_qmax = 7.0  # a nibble decodes to -7..7 (_INT4_TABLE)
    default_block = 128

    def _encode_chunk(
        self, x: torch.Tensor, scales: torch.Tensor, body: np.ndarray, work: torch.Tensor
    ) -> None:
        _pack_nibbles(self._quantize(x, scales, work).add_(8).to(torch.uint8), torch.from_numpy(body))

    def _pack_np(self, q: np.ndarray, body: np.ndarray) -> None:
        nibbles = np.add(q, 8, dtype=np.float32).astype(np.uint8)  # exact: 1..15
        pairs = nibbles.size // 2
        np.bitwise_or(nibbles[0:2 * pairs:2], np.left_shift(nibbles[1:2 * pairs:2], 4), out=body[:pairs])
        if nibbles.size % 2:
            body[pairs] = nibbles[-1]

    def _decode_chunk(self, body: np.ndarray, scales: torch.Tensor, out: torch.Tensor) -> None:
        numel = out.numel()
        pairs = numel // 2
        out_np = out.numpy()
        # mode="clip" skips numpy's bounds-check buffering; a byte always indexes the 256 rows.
        target = out_np[: 2 * pairs].reshape(pairs, 2)
        np.take(_INT4_TABLE, body[:pairs], axis=0, out=target, mode="clip")
        if numel % 2:
            out_np[numel - 1] = _INT4_TABLE[body[pairs], 0]
        _scale_into(out, scales, self.block)

    def _pack(self, x: torch.Tensor, scales: torch.Tensor, body: torch.Tensor) -> None:
        _pack_nibbles(self._quantize(x, scales, torch.empty_like(x)).add_(8).to(torch.uint8), body)

    def _unpack(self, body: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
        table = torch.from_numpy(_INT4_TABLE).to(body.device)
        out = torch.empty(numel, dtype=torch.float32, device=body.device)
        pairs = numel // 2
        index = body.long()
        out[: 2 * pairs].view(pairs, 2).copy_(table[index[:pairs]])
        if numel % 2:
            out[numel - 1] = table[index[pairs], 0]
        _scale_into(out, scales, self.block)
        return out


class Sign1Codec(_BlockCodec):
    """1-bit sign with a per-block float32 scale ``mean|x|`` (default block 256).

    Decodes to ``+-scale``. One step's error is large (up to ``max|x|`` per block); error
    feedback carries it into the next step instead of losing it.
    """

    name = "sign1"
    bits_per_value = 1.0
    lossy = True
    decoded_qmax = 1.0
    default_block = 256

    def _mean_abs(self, x: torch.Tensor) -> torch.Tensor:
        """Per-block mean of ``|x|`` as float32; in float64 for a block whose float32 sum
        overflows (decided per block, so the host path's chunks and the torch-only path's whole
        tensor agree)."""
        parts = []
        for view, _ in _block_views(x, self.block):
            total = torch.linalg.vector_norm(view, 1, dim=1)
            mean = total / view.shape[1]
            overflow = ~torch.isfinite(total)
            if bool(overflow.any()):
                wide = torch.linalg.vector_norm(view, 1, dim=1, dtype=torch.float64) / view.shape[1]
                mean = torch.where(overflow, wide.to(torch.float32), mean)
            parts.append(mean)
        return torch.cat(parts) if parts else torch.empty(0, device=x.device)

    def error_bound(self, x: torch.Tensor) -> float:
        if x.numel() == 0:
            return 0.0
        # Per element the error is ||x| - s| (sign kept) or s (x == 0): at most max(absmax - s, s).
        amax = _block_absmax(x, self.block).double()
        scales = self._mean_abs(x).double()
        worst = float(torch.maximum(amax - scales, scales).max())
        return worst + float(amax.max()) * _REL_SLACK + _ABS_SLACK

    def _encode_chunk(
        self, x: torch.Tensor, scales: torch.Tensor, body: np.ndarray, work: torch.Tensor
    ) -> None:
        scales.copy_(self._mean_abs(x))
        body[:] = np.packbits((x < 0).numpy(), bitorder="little")

    def _pack(self, x: torch.Tensor, scales: torch.Tensor, body: torch.Tensor) -> None:
        scales.copy_(self._mean_abs(x))
        negative = (x < 0).to(torch.uint8)
        pad = -x.numel() % 8
        if pad:
            negative = torch.cat([negative, negative.new_zeros(pad)])
        shifts = torch.arange(8, dtype=torch.uint8, device=x.device)
        # LSB first, as numpy.packbits(bitorder="little"); distinct bits, so the sum is an OR.
        body.copy_((negative.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8))

    def _unpack(self, body: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
        shifts = torch.arange(8, dtype=torch.uint8, device=body.device)
        negative = ((body[:, None] >> shifts) & 1).view(-1)[:numel].bool()
        out = torch.empty(numel, dtype=torch.float32, device=body.device)
        pos, neg = scales[:, None], scales.neg()[:, None]
        for (dst, rows), (sign, _) in zip(_block_views(out, self.block), _block_views(negative, self.block)):
            torch.where(sign, neg[rows], pos[rows], out=dst)
        return out

    def _decode_chunk(self, body: np.ndarray, scales: torch.Tensor, out: torch.Tensor) -> None:
        bits = np.unpackbits(body, count=out.numel(), bitorder="little")
        negative = torch.from_numpy(bits).view(torch.bool)
        pos, neg = scales[:, None], scales.neg()[:, None]
        for (dst, rows), (sign, _) in zip(
            _block_views(out, self.block), _block_views(negative, self.block)
        ):
            torch.where(sign, neg[rows], pos[rows], out=dst)


__all__ = ["Int4Codec", "Int8Codec", "Sign1Codec"]
