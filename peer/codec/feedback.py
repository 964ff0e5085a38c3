"""Error feedback (EF14): carry what the codec lost into the next message.

With a residual ``r``, each step sends ``Q(x + r)`` and keeps ``r' = x + r - Q(x + r)``. Summed
over steps, the decoded messages equal the summed inputs minus the final residual, so the
codec's error does not accumulate, even for sign1.
"""

from __future__ import annotations

import torch

from peer.codec.base import Codec, check_numel
from peer.errors import CodecError


class ErrorFeedback:
    """Per-sender residual for one stream of same-sized tensors.

    Not thread safe; keep one per (peer, parameter shard) and call it from one thread or task.
    """

    def __init__(self, codec: Codec, numel: int) -> None:
        self._codec = codec
        self._numel = check_numel(numel)
        self._residual = torch.zeros(self._numel, dtype=torch.float32)

    @property
    def codec(self) -> Codec:
        return self._codec

    @property
    def residual(self) -> torch.Tensor:
        """What has been fed in but not yet sent (float32, ``numel`` elements). Do not modify."""
        return self._residual

    def encode(self, x: torch.Tensor) -> bytes:
        """Encode ``x`` plus the residual and keep the new residual.

        Raises ``CodecError`` for a tensor of the wrong size (or anything ``codec.encode``
        refuses); the residual is unchanged then.
        """
        (data,), residual = self.encode_shards(x, [(0, self._numel)])
        self.commit(residual)
        return data

    def encode_shards(self, x: torch.Tensor, bounds: list[tuple[int, int]]) -> tuple[list[bytes], torch.Tensor]:
        """Encode ``x`` plus the residual, cut into the contiguous shards ``bounds``.

        Returns the payloads and the residual these payloads would leave; it is kept only by
        ``commit`` (a round that fails applied nothing, so its encoding error must not be fed
        back). Raises ``CodecError`` for a tensor of the wrong size.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.numel() != self._numel:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CodecError(f"error feedback expects {self._numel} elements, got {shape}")
        if not self._codec.lossy:
            return [self._codec.encode(x[s:e]) for s, e in bounds], self._residual
        corrected = self.corrected(x)
        return [self.encode_shard(corrected, s, e) for s, e in bounds], corrected

    def corrected(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the residual: a new tensor, which ``encode_shard`` turns shard by shard
        into the residual that the encoded shards leave. ``x`` must have this feedback's size."""
        if self._residual.device != x.device:
            # The residual lives where the deltas do (a GPU: encoded there, see peer.codec.base).
            self._residual = self._residual.to(x.device)
        return x.to(torch.float32) + self._residual  # a new tensor: x is the caller's

    def corrected_in_place(self, x: torch.Tensor) -> torch.Tensor:
        """``corrected(x)`` written over ``x`` itself when it can hold it (a contiguous 1-D
        float32 tensor): ``x`` plus the residual, the same bits, in the caller's memory (its values
        are gone). A new tensor as ``corrected`` otherwise. After ``encode_shard`` of every shard
        it holds the next residual, which ``commit(copy=True)`` copies into the residual's own
        memory (the caller keeps ``x``; nothing of it is kept here)."""
        if x.dtype != torch.float32 or x.dim() != 1 or not x.is_contiguous() or x.requires_grad:
            return self.corrected(x)
        if self._residual.device != x.device:
            self._residual = self._residual.to(x.device)
        return x.add_(self._residual)

    def encode_shard(self, corrected: torch.Tensor, start: int, end: int) -> bytes:
        """Encode ``corrected[start:end]`` (from ``corrected``) and leave there what the codec
        lost (the next residual of that shard, kept only by ``commit``). Shards may be encoded
        one at a time, in any order, each once: the all-reduce sends each as soon as it is
        encoded. Raises ``CodecError`` as ``encode`` does."""
        data = self._codec.encode(corrected[start:end])
        if not self._codec.lossy:
            return data
        if corrected.device.type != "cpu":
            corrected[start:end].sub_(self._codec.decode(data, end - start, device=corrected.device))
            return data
        # On the host piece by piece, through a cache-sized buffer: no shard-sized decoded copy
        # (the same bits: one subtraction a value either way).
        for at, values in self._codec.decode_pieces(data, end - start):
            corrected[start + at:start + at + values.numel()].sub_(values)
        return data

    def commit(self, residual: torch.Tensor, *, copy: bool = False) -> None:
        """Keep ``residual`` (from ``encode_shards``, or ``encode_shard`` of every shard) for the
        next message. ``copy``: it lies in the caller's memory (``corrected_in_place``): copied
        into the residual's own tensor, so that nothing of the caller's is kept here."""
        if copy and residual.shape == self._residual.shape and residual.device == self._residual.device:
            self._residual.copy_(residual)
        else:
            self._residual = residual

    def reset(self) -> None:
        """Forget the residual (after a resync, when the carried error no longer applies)."""
        self._residual = torch.zeros(self._numel, dtype=torch.float32, device=self._residual.device)
