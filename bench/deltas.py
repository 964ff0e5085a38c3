"""Deterministic deltas for the averaging benchmark (torch only: the hivemind venv imports it too).

Peer ``rank`` in round ``r`` contributes ``delta(seed, rank, r, n)``; every process can rebuild
all K deltas and so knows the exact mean without any communication.
"""

from __future__ import annotations

import torch

SCALE = 1e-2  # about the size of a DiLoCo pseudo-gradient element


def delta(seed: int, rank: int, rnd: int, numel: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + rank * 10_007 + rnd) & ((1 << 62) - 1))
    return torch.randn(numel, generator=gen).mul_(SCALE)


def exact_mean(seed: int, k: int, rnd: int, numel: int) -> torch.Tensor:
    """The float64 mean of all K peers' deltas of round ``rnd`` (equal weights)."""
    acc = torch.zeros(numel, dtype=torch.float64)
    for rank in range(k):
        acc.add_(delta(seed, rank, rnd, numel).double())
    return acc.div_(k)


def read_tx_bytes(iface: str | None) -> int | None:
    """Bytes sent on ``iface`` (inside the caller's network namespace), or None."""
    if not iface:
        return None
    try:
        with open(f"/sys/class/net/{iface}/statistics/tx_bytes") as f:
            return int(f.read())
    except OSError:
        return None
