"""Aggregation rules over decoded contributions (pure)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch


_CHUNK = 1 << 16
"""Elements per chunk of the float64 accumulation (512 KiB of float64: stays in L2)."""


def _check_weights(parts: int, weights: Sequence[float]) -> None:
    """ValueError unless there is one weight per part (at least one part), each finite and >= 0."""
    if parts != len(weights) or not parts:
        raise ValueError(f"need one weight per part, got {parts} parts and {len(weights)} weights")
    for w in weights:
        if not (w >= 0 and w != float("inf")):
            raise ValueError(f"weights must be finite and >= 0, got {w}")


def weighted_mean(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sum_i w_i x_i / sum_i w_i, accumulated in float64 in the given order (deterministic).

    Parts with weight 0 are skipped. If no part has positive weight the result is zeros (a
    round where every member withheld its delta moves nothing but momentum).
    Raises ValueError on mismatched lengths or negative / non-finite weights.
    """
    _check_weights(len(parts), weights)
    total = float(sum(weights))
    n = parts[0].numel()
    out = torch.zeros(n, dtype=torch.float32)
    if total <= 0:
        return out
    # Chunk by chunk: the float64 accumulator and the widened part stay in cache and are reused
    # instead of two shard-sized float64 temporaries per part (same operations per element, so
    # the result is the same bits as a whole-tensor pass).
    chunk = min(n, _CHUNK)
    acc = torch.empty(chunk, dtype=torch.float64)
    wide = torch.empty(chunk, dtype=torch.float64)
    used = [(x, w / total) for x, w in zip(parts, weights) if w > 0]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        a, tmp = acc[: stop - start], wide[: stop - start]
        a.zero_()
        for x, alpha in used:
            tmp.copy_(x[start:stop])
            a.add_(tmp, alpha=alpha)
        out[start:stop].copy_(a)
    return out


def weighted_mean_pieces(pieces: Sequence[Iterable[tuple[int, torch.Tensor]]], weights: Sequence[float],
                         numel: int) -> torch.Tensor:
    """``weighted_mean`` of parts that arrive piece by piece: ``pieces[i]`` yields ``(start,
    values)`` for consecutive pieces of part i, and every part is cut alike (the same starts
    and lengths: one codec, one size). A piece's values may be a scratch buffer reused for the
    next one. The same operations per element as ``weighted_mean``, so the same bits, without
    the parts' full-size tensors. Raises ValueError like ``weighted_mean``, and for parts cut
    differently or shorter than ``numel``."""
    out = torch.empty(numel, dtype=torch.float32)
    for start, values in weighted_mean_iter(pieces, weights, numel):
        out[start:start + values.numel()].copy_(values)
    return out


def weighted_mean_iter(pieces: Sequence[Iterable[tuple[int, torch.Tensor]]], weights: Sequence[float],
                       numel: int, *, wide: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """``weighted_mean_pieces`` piece by piece: yields ``(start, values)`` for consecutive
    pieces of the mean, cut as the parts are (all zeros in one piece when every weight is 0),
    ``values`` a float32 scratch reused for the next piece. An owner encodes the pieces as they
    come (``Codec.encode_pieces``): no shard-sized mean exists. Raises as ``weighted_mean_pieces``
    (the weights before the first piece).

    ``wide=False`` accumulates in float32 (``acc += alpha * x``, fused where the CPU fuses):
    about 3x cheaper than widening every part to float64, and within a few float32 roundings
    (K x 2^-24 relative) of it: for a lossy codec, whose own error (int8: 2^-8 of a block's
    largest value) is orders of magnitude larger. Only the owner computes its mean, and every
    member applies the owner's encoded answer, so no bits need to agree with anyone else's."""
    _check_weights(len(pieces), weights)
    return _mean_pieces(pieces, weights, numel, wide)


def _mean_pieces(pieces: Sequence[Iterable[tuple[int, torch.Tensor]]], weights: Sequence[float],
                 numel: int, wide: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    total = float(sum(weights))
    used = [(iter(p), w / total) for p, w in zip(pieces, weights) if w > 0]
    if total <= 0:
        if numel:
            yield 0, torch.zeros(numel, dtype=torch.float32)
        return
    acc = widened = narrow = None
    done = 0
    while done < numel:
        start = n = None
        for i, (it, alpha) in enumerate(used):
            got = next(it, None)
            if got is None:
                raise ValueError(f"part {i} ended at element {done} of {numel}")
            s, values = got
            if start is None:
                start, n = s, values.numel()
                if start != done or n == 0 or start + n > numel:
                    raise ValueError(f"a piece at {start} of {n} elements; expected one at {done}")
                if acc is None or acc.numel() < n:
                    acc = torch.empty(n, dtype=torch.float64 if wide else torch.float32)
                    widened = torch.empty(n, dtype=torch.float64) if wide else None
                    narrow = torch.empty(n, dtype=torch.float32) if wide else acc
                a = acc[:n]
                a.zero_()
            elif (s, values.numel()) != (start, n):
                raise ValueError(f"parts are cut differently at element {start}")
            if wide:
                tmp = widened[:n]
                tmp.copy_(values)
                a.add_(tmp, alpha=alpha)
            else:
                a.add_(values, alpha=alpha)
        piece = narrow[:n]
        if wide:
            piece.copy_(a)
        yield start, piece
        done = start + n


AGGREGATIONS = ("mean", "trimmed_mean", "centered_clip")


def _stack(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    _check_weights(len(parts), weights)
    return torch.stack([p.to(torch.float64) for p in parts]), torch.tensor(weights, dtype=torch.float64)


def trimmed_mean(parts: Sequence[torch.Tensor], weights: Sequence[float], trim: float = 0.2) -> torch.Tensor:
    """Coordinate-wise: drop the ``floor(trim * n)`` smallest and largest values of each
    coordinate, then the weighted mean of the rest (float64, deterministic). With fewer than 3
    parts nothing is trimmed. Parts of weight 0 take no part. Raises ValueError like
    ``weighted_mean`` and for ``trim`` outside [0, 0.5)."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    x, w = _stack(parts, weights)
    x, w = x[w > 0], w[w > 0]
    n = x.shape[0]
    if n == 0:
        return torch.zeros(parts[0].numel(), dtype=torch.float32)
    k = int(trim * n) if n >= 3 else 0
    if k == 0:
        return ((x * w[:, None]).sum(0) / w.sum()).float()
    ranks = x.argsort(dim=0, stable=True).argsort(dim=0, stable=True)
    keep = ((ranks >= k) & (ranks < n - k)).to(torch.float64) * w[:, None]
    return ((x * keep).sum(0) / keep.sum(0)).float()


def centered_clip(parts: Sequence[torch.Tensor], weights: Sequence[float], iterations: int = 3,
                  tau: float | None = None) -> torch.Tensor:
    """Centered clipping (Karimireddy et al., 2021): start at the coordinate-wise median, then
    ``v += sum_i w_i clip(x_i - v, tau) / sum_i w_i`` where ``clip(z, tau) = z min(1, tau/|z|)``.
    ``tau`` defaults to the median distance of the parts from the start, so honest parts move
    ``v`` freely and one huge part moves it at most ``tau``. Float64, deterministic."""
    x, w = _stack(parts, weights)
    x, w = x[w > 0], w[w > 0]
    if x.shape[0] == 0:
        return torch.zeros(parts[0].numel(), dtype=torch.float32)
    v = x.median(dim=0).values if x.shape[0] > 2 else (x * w[:, None]).sum(0) / w.sum()
    if tau is None:
        tau = float((x - v).norm(dim=1).median())
    for _ in range(iterations):
        z = x - v
        norms = z.norm(dim=1)
        scale = torch.where(norms > tau, tau / norms.clamp_min(1e-300), torch.ones_like(norms))
        v = v + (z * (scale * w)[:, None]).sum(0) / w.sum()
    return v.float()


def aggregate(rule: str, parts: Sequence[torch.Tensor], weights: Sequence[float], trim: float = 0.2) -> torch.Tensor:
    """Apply the aggregation ``rule`` (one of ``AGGREGATIONS``)."""
    if rule == "mean":
        return weighted_mean(parts, weights)
    if rule == "trimmed_mean":
        return trimmed_mean(parts, weights, trim)
    if rule == "centered_clip":
        return centered_clip(parts, weights)
    raise ValueError(f"unknown aggregation {rule!r}; known: {', '.join(AGGREGATIONS)}")


def cap_weights(weights: Sequence[float], factor: float) -> list[float]:
    """Each weight capped at ``factor`` times the median of the positive weights: one member's
    claim of many samples buys it at most that much influence."""
    positive = sorted(w for w in weights if w > 0)
    if not positive:
        return list(weights)
    cap = factor * positive[len(positive) // 2] if len(positive) % 2 else factor * 0.5 * (
        positive[len(positive) // 2 - 1] + positive[len(positive) // 2])
    return [min(w, cap) for w in weights]


def square_sum(values: torch.Tensor, scratch: torch.Tensor | None = None) -> float:
    """Sum of squares of a float32 tensor, for checks with slack (norm outliers, answer limits):
    each piece of ``_CHUNK`` values a float32 dot product (vectorized, ~3x cheaper than widening
    to float64; its relative error, at most ~``_CHUNK``/lanes x 2^-24, is far below any check's
    slack), the pieces summed in float64. A piece whose float32 sum overflows (values beyond
    ~1e19) is summed again in float64, through ``scratch`` (a cache-sized float64 buffer, or one
    made here). NaN in, NaN out."""
    n = values.numel()
    total = 0.0
    for start in range(0, n, _CHUNK):
        piece = values[start:start + _CHUNK]
        squares = float(piece.dot(piece))
        if not math.isfinite(squares):
            squares = _square_sum64(piece, scratch)
        total += squares
    return total


def _square_sum64(values: torch.Tensor, scratch: torch.Tensor | None) -> float:
    """``square_sum`` widened to float64 piece by piece (no overflow below ~1e154)."""
    n = values.numel()
    if scratch is None or not scratch.numel():
        scratch = torch.empty(min(n, _CHUNK), dtype=torch.float64)
    total = 0.0
    step = scratch.numel()
    for start in range(0, n, step):
        piece = values[start:start + step]
        wide = scratch[: piece.numel()]
        wide.copy_(piece)
        total += float(wide.dot(wide))
    return total


def l2_norm(values: torch.Tensor) -> float:
    """The L2 norm of a float32 tensor (see ``square_sum``: for checks, not for bits)."""
    return math.sqrt(square_sum(values))


def norm_outliers(parts: Sequence[torch.Tensor], factor: float) -> list[int]:
    """Indices of parts whose L2 norm is above ``factor`` times the median norm (with at least
    three parts; fewer have no meaningful median)."""
    return outliers_by_norm([l2_norm(p) for p in parts], factor)


def outliers_by_norm(norms: Sequence[float], factor: float) -> list[int]:
    """``norm_outliers`` given the parts' L2 norms."""
    if len(norms) < 3:
        return []
    median = sorted(norms)[len(norms) // 2]
    return [i for i, n in enumerate(norms) if n > factor * median and n > 0]
