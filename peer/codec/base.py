"""The codec contract and the validation every codec shares.

A codec turns a 1-D float32 tensor into wire bytes and back. The wire layout is fully
determined by ``(codec.name, numel)``: there is no header, so a receiver must know both from the
surrounding message. Codecs are stateless and pure; any instance may be called from any thread.

Two implementations give the same bytes: the host path (numpy and torch, chunked to stay in
cache) for CPU tensors, and a torch-only path that runs on the tensor's own device
(``encode_torch`` / ``decode_torch``). A CUDA tensor is encoded on the GPU and only the payload
crosses PCIe (int8: a quarter of the float32 bytes); a payload decodes straight onto a device.
The torch-only path also runs on CPU, which is how the tests pin it to the host path's bytes.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from peer.errors import CodecError

# Far more elements than any model shard this daemon moves (2**36 float32 = 256 GiB); a larger
# ``numel`` in a message is a corrupt or hostile header, refused before anything is allocated.
MAX_NUMEL = 2**36

Buffer = bytes | bytearray | memoryview


def check_numel(numel: int) -> int:
    """Return ``numel`` as an int; raise ``CodecError`` if negative or absurdly large."""
    if isinstance(numel, bool) or not isinstance(numel, (int, np.integer)):
        raise CodecError(f"numel must be an int, got {type(numel).__name__}")
    numel = int(numel)
    if numel < 0 or numel > MAX_NUMEL:
        raise CodecError(f"numel {numel} out of range [0, {MAX_NUMEL}]")
    return numel


def as_byte_view(data: Buffer) -> memoryview:
    """A flat, contiguous byte view of ``data`` (no copy)."""
    try:
        view = memoryview(data)
        return view if (view.format == "B" and view.ndim == 1) else view.cast("B")
    except TypeError as exc:
        raise CodecError(f"payload is not a contiguous byte buffer: {exc}") from exc


def extrema(x: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of a non-empty tensor; a NaN anywhere makes both NaN.

    One reduction without a temporary: about ten times cheaper than ``isfinite(x).all()``.
    """
    lo, hi = torch.aminmax(x)
    return float(lo), float(hi)


def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` holds no NaN and no infinity.

    First the sum: a NaN or an infinity anywhere makes it NaN or infinite (IEEE addition never
    turns them back into a number), so a finite sum proves every value finite, in one plain
    vectorized pass (two to four times cheaper than ``extrema``). A non-finite sum is either a bad
    value or finite values whose sum overflows: ``extrema`` tells which.
    """
    if x.numel() == 0:
        return True
    if math.isfinite(float(x.sum())):
        return True
    lo, hi = extrema(x)
    return math.isfinite(lo) and math.isfinite(hi)


def abs_max(x: torch.Tensor) -> float:
    """``max|x|`` as a Python float (0.0 for an empty tensor, NaN if ``x`` holds a NaN)."""
    if x.numel() == 0:
        return 0.0
    lo, hi = extrema(x)
    return max(-lo, hi) if not (math.isnan(lo) or math.isnan(hi)) else math.nan


class Codec(abc.ABC):
    """Encode a 1-D float32 tensor to bytes and back.

    Subclasses set ``name``, ``bits_per_value`` and ``lossy`` and implement ``encoded_size``,
    ``_encode``, ``_decode`` (host path), ``_encode_torch``, ``_decode_torch`` (any device) and
    ``error_bound``; the public ``encode``/``decode`` validate first. Every method raises
    ``CodecError`` (and nothing else on purpose) for bad input.
    """

    name: str
    bits_per_value: float
    lossy: bool

    def encode(self, x: torch.Tensor) -> bytes | bytearray:
        """Encode ``x`` (1-D float32, finite, any device) to exactly ``encoded_size(x.numel())``
        bytes: on the host path for a CPU tensor, on ``x``'s device otherwise (then only the
        payload is copied to the host). The block codecs' host path gives a bytearray, written
        in place (no copy of the whole payload); nobody changes a payload once encoded.

        Raises ``CodecError`` for a tensor of the wrong shape or dtype, or one holding NaN or
        infinity: every receiver would reject such a payload, so the sender refuses it.
        """
        x = self._check_input(x)
        if x.device.type == "cpu":
            return self._encode(x)
        return self._encode_torch(x).cpu().numpy().tobytes()

    def encode_pieces(self, pieces: Iterable[tuple[int, torch.Tensor]], numel: int) -> bytes | bytearray:
        """``encode`` of the ``numel`` values that ``pieces`` yields as ``(start, values)``, in
        order (consecutive float32 CPU pieces, cut anywhere; ``values`` may be a scratch reused
        for the next piece): the same bytes as ``encode`` of them whole. The block codecs encode
        as the pieces come, through one chunk of scratch, so that an owner's shard-sized mean
        never exists (``peer.sync.aggregate.weighted_mean_iter``); others gather them first.
        Raises ``CodecError`` as ``encode`` does, and for pieces that do not cover ``numel``."""
        check_numel(numel)
        out = torch.empty(numel, dtype=torch.float32)
        done = 0
        for start, values in pieces:
            done = self._next_piece(start, values.numel(), done, numel)
            out[start:done].copy_(values)
        self._pieces_ended(done, numel)
        return self.encode(out)

    def _next_piece(self, start: int, count: int, done: int, numel: int) -> int:
        """Where a piece of ``count`` values at ``start`` ends, when it is the next one of
        ``encode_pieces`` (``done`` values so far, of ``numel``); CodecError otherwise."""
        if start != done or start + count > numel:
            raise CodecError(f"{self.name}: a piece at {start} of {count} values; expected one at {done}")
        return start + count

    def _pieces_ended(self, done: int, numel: int) -> None:
        """CodecError unless the pieces of ``encode_pieces`` covered all ``numel`` values."""
        if done != numel:
            raise CodecError(f"{self.name}: pieces ended at {done} of {numel} values")

    def encode_torch(self, x: torch.Tensor) -> bytes:
        """``encode`` by the torch-only path on ``x``'s device, also for a CPU tensor (the
        same bytes as the host path). Raises ``CodecError`` like ``encode``."""
        return self._encode_torch(self._check_input(x)).cpu().numpy().tobytes()

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise CodecError(f"{self.name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1 or x.dtype != torch.float32 or x.device.type == "meta":
            raise CodecError(
                f"{self.name}: expected a 1-D float32 tensor, got shape {tuple(x.shape)} "
                f"dtype {x.dtype} device {x.device}"
            )
        check_numel(x.numel())
        return x.detach().contiguous()

    def decode(self, data: Buffer, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Decode ``data`` into a new writable 1-D float32 tensor of ``numel`` elements on
        ``device`` (default CPU; another device gets the payload, not the float32 values, over
        its bus and decodes there).

        The payload size, ``numel`` and any per-block scales are checked before the output is
        allocated. Raises ``CodecError`` for a wrong-size payload, a bad ``numel``, a non-finite
        or negative scale, or values that decode to NaN or infinity.
        """
        dev = torch.device("cpu" if device is None else device)
        return self._decode_checked(data, numel, dev, torch_path=dev.type != "cpu")

    def decode_torch(self, data: Buffer, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``decode`` by the torch-only path on ``device``, also on CPU (the same values as
        the host path). Raises ``CodecError`` like ``decode``."""
        return self._decode_checked(data, numel, torch.device(device), torch_path=True)

    def _sized_view(self, data: Buffer, numel: int) -> tuple[memoryview, int]:
        """``data`` as bytes and ``numel`` checked; raises ``CodecError`` unless the payload has
        exactly the encoded size of ``numel`` values."""
        numel = check_numel(numel)
        view = as_byte_view(data)
        expected = self.encoded_size(numel)
        if view.nbytes != expected:
            raise CodecError(
                f"{self.name}: payload is {view.nbytes} bytes, "
                f"expected {expected} for numel {numel}"
            )
        return view, numel

    def _decode_checked(self, data: Buffer, numel: int, device: torch.device, torch_path: bool) -> torch.Tensor:
        view, numel = self._sized_view(data, numel)
        if numel == 0:
            return torch.empty(0, dtype=torch.float32, device=device)
        out = self._decode_torch(view, numel, device) if torch_path else self._decode(view, numel)
        if not all_finite(out):
            raise CodecError(f"{self.name}: payload decodes to non-finite values")
        return out

    def decode_into(self, data: Buffer, out: torch.Tensor) -> None:
        """Decode ``data`` into ``out`` (a contiguous 1-D float32 CPU tensor; its length is the
        numel), with the checks of ``decode``. Saves the fresh output that ``decode`` allocates
        (at 10M values its page faults cost as much as the decoding): the all-reduce decodes
        every averaged shard into its slice of one delta. Raises ``CodecError`` as ``decode``
        does; ``out`` may then hold partial values."""
        if out.dim() != 1 or out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
            raise CodecError(f"{self.name}: decode_into needs a contiguous 1-D float32 CPU tensor")
        view, numel = self._sized_view(data, out.numel())
        if numel == 0:
            return
        self._decode_into(view, out)
        if not all_finite(out):
            raise CodecError(f"{self.name}: payload decodes to non-finite values")

    def decode_pieces(self, data: Buffer, numel: int, piece: int = 1 << 16) -> Iterator[tuple[int, torch.Tensor]]:
        """Decode ``data`` (``numel`` values) piece by piece, in order: yields ``(start,
        values)`` for consecutive pieces of about ``piece`` elements (a codec may round it to its
        block size). ``values`` is a float32 CPU scratch tensor reused for the next piece: read it
        before advancing. The values are those ``decode`` gives, without its full-size output:
        a cache-sized buffer instead, for an owner that only reduces the values (norm, mean).
        Raises ``CodecError`` as ``decode`` does: the size and scales before the first piece, a
        non-finite value at the piece that holds it."""
        view, numel = self._sized_view(data, numel)
        if numel:
            yield from self._decode_pieces(view, numel, self.piece_size(piece))

    def piece_size(self, piece: int) -> int:
        """The length of ``decode_pieces``'s pieces (the last may be shorter) when asked for
        ``piece``: values to be averaged with decoded ones must be cut alike."""
        return max(1, piece)

    def value_bounds(self, data: Buffer, numel: int) -> tuple[float, float] | None:
        """Upper bounds of ``max |v|`` and of the L2 norm of the values ``data`` decodes to, read
        from its header alone (a blockwise codec's scales: no value is decoded), and so a proof
        that they are finite; None where the codec has no such header, or where the bound reaches
        float32's maximum (scales no encoder writes): read the values then. Raises
        ``CodecError`` as ``decode`` does for a wrong size or bad scales."""
        view, numel = self._sized_view(data, numel)
        return self._value_bounds(view, numel) if numel else (0.0, 0.0)

    def _value_bounds(self, view: memoryview, numel: int) -> tuple[float, float] | None:
        return None

    def _decode_pieces(self, view: memoryview, numel: int, piece: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The generic way: decode the whole payload once, then hand it out in pieces."""
        out = self._decode(view, numel)
        for start in range(0, numel, piece):
            values = out[start:start + piece]
            if not all_finite(values):
                raise CodecError(f"{self.name}: payload decodes to non-finite values")
            yield start, values

    def _decode_into(self, view: memoryview, out: torch.Tensor) -> None:
        """Decode a checked payload into ``out``; codecs that can skip the temporary override it."""
        out.copy_(self._decode(view, out.numel()))

    @abc.abstractmethod
    def encoded_size(self, numel: int) -> int:
        """Exact byte count of ``encode`` output for ``numel`` elements."""

    def compression_ratio(self, numel: int) -> float:
        """``4 * numel / encoded_size(numel)``; 1.0 for ``numel == 0``."""
        size = self.encoded_size(numel)
        return 4.0 * numel / size if size else 1.0

    @abc.abstractmethod
    def error_bound(self, x: torch.Tensor) -> float:
        """A guaranteed bound on ``max|decode(encode(x)) - x|`` for this ``x`` (finite ``x``)."""

    @abc.abstractmethod
    def _encode(self, x: torch.Tensor) -> bytes:
        """Encode a validated contiguous 1-D float32 tensor."""

    @abc.abstractmethod
    def _decode(self, view: memoryview, numel: int) -> torch.Tensor:
        """Decode a payload already checked to be ``encoded_size(numel)`` bytes, ``numel > 0``."""

    @abc.abstractmethod
    def _encode_torch(self, x: torch.Tensor) -> torch.Tensor:
        """``_encode`` in torch ops on ``x``'s device: the payload as a uint8 tensor there."""

    @abc.abstractmethod
    def _decode_torch(self, view: memoryview, numel: int, device: torch.device) -> torch.Tensor:
        """``_decode`` in torch ops on ``device`` (payload checked as for ``_decode``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def payload_to(view: memoryview, device: torch.device, offset: int = 0) -> torch.Tensor:
    """The bytes of ``view`` from ``offset`` as a uint8 tensor on ``device`` (one host copy:
    a tensor may not alias a read-only buffer)."""
    host = torch.from_numpy(np.frombuffer(view, dtype=np.uint8, offset=offset).copy())
    return host.to(device)
