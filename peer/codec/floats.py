"""Element-wise float codecs: fp32 (exact), fp16 and bf16 (round to nearest even).

Wire layout: the values in order, little-endian IEEE float32 / float16 / bfloat16 (the top 16
bits of a float32), no header and no padding.
"""

from __future__ import annotations

import numpy as np
import torch

from peer.codec.base import Codec, abs_max, check_numel, payload_to
from peer.errors import CodecError

_FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # 3.3895e38


def _reject_non_finite(name: str, x: torch.Tensor) -> float:
    """Return ``max|x|``; raise ``CodecError`` if ``x`` holds NaN or infinity."""
    amax = abs_max(x)
    if not amax < float("inf"):  # also catches NaN
        raise CodecError(f"{name}: cannot encode NaN or infinite values")
    return amax


class Fp32Codec(Codec):
    """Raw little-endian float32: exact."""

    name = "fp32"
    bits_per_value = 32.0
    lossy = False

    def encoded_size(self, numel: int) -> int:
        return 4 * check_numel(numel)

    def error_bound(self, x: torch.Tensor) -> float:
        return 0.0

    def _encode(self, x: torch.Tensor) -> bytes:
        _reject_non_finite(self.name, x)
        return x.numpy().astype("<f4", copy=False).tobytes()

    def _decode(self, view: memoryview, numel: int) -> torch.Tensor:
        # astype copies: the result owns its memory and is writable.
        values = np.frombuffer(view, dtype="<f4", count=numel).astype(np.float32)
        return torch.from_numpy(values)

    def _encode_torch(self, x: torch.Tensor) -> torch.Tensor:
        _reject_non_finite(self.name, x)
        return x.view(torch.uint8)  # little-endian hosts and devices

    def _decode_torch(self, view: memoryview, numel: int, device: torch.device) -> torch.Tensor:
        return payload_to(view, device).view(torch.float32)

    def _decode_into(self, view: memoryview, out: torch.Tensor) -> None:
        np.copyto(out.numpy(), np.frombuffer(view, dtype="<f4", count=out.numel()))


class _HalfWidthCodec(Codec):
    """A 16-bit float format: 2 bytes a value, clamped to ``max_value``, round to nearest.

    Subclasses set ``max_value``, ``relative_error`` (half an ulp, relative, for normals) and
    ``subnormal_error`` (half the smallest subnormal) and implement the conversions.
    """

    bits_per_value = 16.0
    lossy = True
    max_value: float
    relative_error: float
    subnormal_error: float

    def encoded_size(self, numel: int) -> int:
        return 2 * check_numel(numel)

    def error_bound(self, x: torch.Tensor) -> float:
        amax = abs_max(x)
        clamp_error = max(amax - self.max_value, 0.0)
        rounding = min(amax, self.max_value) * self.relative_error + self.subnormal_error
        return (clamp_error + rounding) * (1 + 2.0**-40)


class Fp16Codec(_HalfWidthCodec):
    """IEEE half precision; values beyond +-65504 are clamped to it (never sent as infinity)."""

    name = "fp16"
    max_value = _FP16_MAX
    # Round to nearest: relative 2**-11 for normals, half the smallest subnormal (2**-25) below.
    relative_error = 2.0**-11
    subnormal_error = 2.0**-25

    def _encode(self, x: torch.Tensor) -> bytes:
        amax = _reject_non_finite(self.name, x)
        # The clamp costs a full extra pass, so only pay it when something is out of range.
        src = x.clamp(-_FP16_MAX, _FP16_MAX) if amax > _FP16_MAX else x
        return src.to(torch.float16).numpy().astype("<f2", copy=False).tobytes()

    def _decode(self, view: memoryview, numel: int) -> torch.Tensor:
        # numpy's half -> float conversion is scalar code; torch's is vectorized and threaded.
        # Copy the raw halves first so torch gets a writable buffer (it warns on read-only ones).
        halves = np.frombuffer(view, dtype="<u2", count=numel).copy()
        return torch.from_numpy(halves).view(torch.float16).to(torch.float32)

    def _encode_torch(self, x: torch.Tensor) -> torch.Tensor:
        amax = _reject_non_finite(self.name, x)
        src = x.clamp(-_FP16_MAX, _FP16_MAX) if amax > _FP16_MAX else x
        return src.to(torch.float16).view(torch.uint8)

    def _decode_torch(self, view: memoryview, numel: int, device: torch.device) -> torch.Tensor:
        return payload_to(view, device).view(torch.float16).to(torch.float32)


class Bf16Codec(_HalfWidthCodec):
    """bfloat16 (torch's round-to-nearest-even cast); float32 range, 8 significant bits."""

    name = "bf16"
    max_value = _BF16_MAX
    # Relative 2**-8 for normals; half the smallest bf16 subnormal (2**-134) below.
    relative_error = 2.0**-8
    subnormal_error = 2.0**-134

    def _encode(self, x: torch.Tensor) -> bytes:
        amax = _reject_non_finite(self.name, x)
        # Values in the top half-ulp below float32 max would round to infinity.
        src = x.clamp(-_BF16_MAX, _BF16_MAX) if amax > _BF16_MAX else x
        bits = src.to(torch.bfloat16).view(torch.int16).numpy()
        return bits.astype("<i2", copy=False).tobytes()

    def _decode(self, view: memoryview, numel: int) -> torch.Tensor:
        # A bfloat16 is the top half of a float32: widen and shift, no torch bf16 round trip.
        widened = np.frombuffer(view, dtype="<u2", count=numel).astype(np.uint32)
        widened <<= 16
        return torch.from_numpy(widened.view(np.float32))

    def _encode_torch(self, x: torch.Tensor) -> torch.Tensor:
        amax = _reject_non_finite(self.name, x)
        src = x.clamp(-_BF16_MAX, _BF16_MAX) if amax > _BF16_MAX else x
        return src.to(torch.bfloat16).view(torch.uint8)

    def _decode_torch(self, view: memoryview, numel: int, device: torch.device) -> torch.Tensor:
        # bfloat16 -> float32 is exact (the bits shifted up), as on the host path.
        return payload_to(view, device).view(torch.bfloat16).to(torch.float32)

