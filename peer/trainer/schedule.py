"""The inner learning-rate schedule: a pure function of the run's global inner step.

The global inner step of step ``i`` of the inner phase that starts from round ``r`` is
``r * H + i`` (H: inner steps per round). Every peer computes it from the round of the state it
trains from, so a peer that joins late, or resumes from a checkpoint, continues at the swarm's
point of the schedule instead of starting its warm-up again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from peer.errors import ConfigError

__all__ = ["SCHEDULES", "LRSchedule"]

SCHEDULES: tuple[str, ...] = ("constant", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """``kind``: ``"constant"`` or ``"cosine"``. ``warmup_steps``: linear warm-up from
    ``base/warmup_steps`` to ``base`` over the first steps (both kinds). ``total_steps`` (cosine
    only, > ``warmup_steps``): the cosine decays from ``base`` after warm-up to 0 at
    ``total_steps`` and stays at 0 after it.

    Raises ``ConfigError`` for an unknown kind or inconsistent step counts.
    """

    kind: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"inner_lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ConfigError("warmup_steps and total_steps must be >= 0")
        if self.kind == "cosine" and self.total_steps <= self.warmup_steps:
            raise ConfigError(f"inner_lr_schedule cosine needs total_steps > warmup_steps "
                              f"(got total_steps {self.total_steps}, warmup_steps {self.warmup_steps})")

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate at global inner step ``step`` (>= 0)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
