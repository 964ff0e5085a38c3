"""The inner phase as the round driver sees it: an ``InnerTrainer`` on its own thread.

Every call into the model and the inner optimizer runs on the one-thread ``executor`` the
daemon owns, never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

import torch

from peer.trainer.loop import InnerResult, InnerTrainer


class ThreadedInner:
    """``steps`` inner steps per phase on ``executor``; ``on_step(step, loss)`` runs on that
    thread after every step (keep it cheap and thread safe). The phase that starts from round
    ``rnd`` begins at global inner step ``rnd * steps`` of the learning-rate schedule."""

    def __init__(self, trainer: InnerTrainer, executor: Executor, steps: int,
                 on_step: Callable[[int, float], None] | None = None) -> None:
        self._trainer = trainer
        self._executor = executor
        self._steps = steps
        self._on_step = on_step

    async def run(self, rnd: int, start: torch.Tensor, should_stop: Callable[[], bool]) -> InnerResult:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._trainer.run_inner(start, self._steps, should_stop=should_stop,
                                                            on_step=self._on_step, first_step=rnd * self._steps))

    async def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._trainer.evaluate, params)
