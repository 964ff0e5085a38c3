"""Aggregation rules over decoded contributions (pure)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_mean(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sum_i w_i x_i / sum_i w_i, accumulated in float64 in the given order (deterministic).

    Parts with weight 0 are skipped. If no part has positive weight the result is zeros (a
    round where every member withheld its delta moves nothing but momentum).
    Raises ValueError on mismatched lengths or negative / non-finite weights.
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"need one weight per part, got {len(parts)} parts and {len(weights)} weights")
    for w in weights:
        if not (w >= 0 and w != float("inf")):
            raise ValueError(f"weights must be finite and >= 0, got {w}")
    total = float(sum(weights))
    acc = torch.zeros(parts[0].numel(), dtype=torch.float64)
    if total <= 0:
        return acc.float()
    for x, w in zip(parts, weights):
        if w > 0:
            acc.add_(x.to(torch.float64), alpha=w / total)
    return acc.float()
