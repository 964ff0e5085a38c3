"""Synthetic tasks for benchmarks: a model of exactly N float32 parameters.

    task = "bench.tasks:synthetic", data = "10000000"   # N, as the task's data string

The averaging benchmark drives ``Daemon.round_once`` with its own deltas, so the model is
never trained there; ``batches``/``loss`` exist so that the task is a complete ``Task`` (a
least-squares toy: pull the parameters towards a fixed random target).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from peer.trainer.task import Task, TaskDefaults, torch_generator


class _Flat(torch.nn.Module):
    def __init__(self, numel: int) -> None:
        super().__init__()
        # Zeros: N = 10M random draws would cost seconds per process for nothing.
        self.weight = torch.nn.Parameter(torch.zeros(numel))


class SyntheticTask(Task):
    """One flat parameter vector of ``numel`` elements."""

    defaults = TaskDefaults(inner_steps=10, batch_size=1, inner_lr=1e-3, outer_lr=0.7)

    def __init__(self, numel: int) -> None:
        super().__init__(str(numel))
        if numel < 1:
            raise ValueError(f"numel must be >= 1, got {numel}")
        self.numel = numel
        self.name = f"synthetic-{numel}"

    def build_model(self) -> torch.nn.Module:
        return _Flat(self.numel)

    def batches(self, seed: int, stream_id: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch_generator(seed, stream_id)
        n = min(self.numel, 4096)
        while True:
            yield torch.zeros(batch_size, 1), torch.randn(batch_size, n, generator=gen)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        _, target = batch
        return ((model.weight[: target.shape[1]] - target) ** 2).mean()

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        return {"loss": float((model.weight.detach() ** 2).mean())}


def synthetic(data: str | None = None) -> SyntheticTask:
    """Factory for ``--task bench.tasks:synthetic --data N`` (N defaults to 1M)."""
    return SyntheticTask(int(data) if data else 1_000_000)
