"""A small CNN with BatchNorm on the 8x8 digits: a task whose state has buffers.

``--task tests.tasks.bn_digits:BNDigitsTask`` (the peer's working directory must be the
repository root). The model's state: conv and linear parameters, BatchNorm's affine parameters,
and the buffers ``running_mean``, ``running_var`` (float) and ``num_batches_tracked`` (int64).
"""

from __future__ import annotations

import torch

from peer.trainer.task import TaskDefaults
from peer.trainer.tasks.digits import DigitsTask


class BNDigitsTask(DigitsTask):
    name = "bn_digits"
    defaults = TaskDefaults(inner_steps=10, batch_size=32, inner_lr=1e-3, outer_lr=0.5)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 8, 8)

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(8 * 64, 10),
        )
