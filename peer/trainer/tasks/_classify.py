"""Shared machinery of the built-in classification tasks (digits, fashion)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from peer.trainer.task import Task, torch_generator


class ArrayClassificationTask(Task):
    """A classification task over in-memory tensors.

    Subclasses fill ``train_x``/``train_y``/``test_x``/``test_y`` in ``__init__`` (inputs may be
    stored compactly, e.g. uint8, and turned into model inputs by ``prepare``) and implement
    ``build_model``. ``eval_limit`` bounds how many held-out samples ``evaluate`` uses (the
    first ones, a fixed subset) so evaluation stays cheap.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    eval_limit: int | None = None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Stored inputs -> float32 model inputs (identity by default)."""
        return x

    def batches(
        self, seed: int, stream_id: str, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epochs of the training split in a per-stream random order; full batches only."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = self.train_x.shape[0]
        batch_size = min(batch_size, n)
        gen = torch_generator(seed, stream_id)
        while True:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n - batch_size + 1, batch_size):
                idx = order[start : start + batch_size]
                yield self.prepare(self.train_x[idx]), self.train_y[idx]

    def loss(
        self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        limit = self.test_x.shape[0] if self.eval_limit is None else self.eval_limit
        x = self.prepare(self.test_x[:limit]).to(device)
        y = self.test_y[:limit].to(device)
        was_training = model.training
        model.eval()
        try:
            logits = model(x)
        finally:
            model.train(was_training)
        loss = F.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
        return {"loss": loss, "accuracy": accuracy}


def mlp(sizes: list[int]) -> torch.nn.Sequential:
    """Linear/ReLU stack, e.g. ``mlp([64, 128, 10])``."""
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)
