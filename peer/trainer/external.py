"""The inner phase when the user's own training loop runs it (library mode, ``peer.Swarm``).

The round driver asks for an inner phase exactly as it asks ``ThreadedInner``: ``run(rnd, start,
should_stop)`` on the event loop, answered with an ``InnerResult``. Here nobody trains on a
thread of ours: the user's thread trains its own model and calls ``step()`` after every optimizer
step. The two meet in this object:

- ``run`` (loop) posts a phase: the start parameters and a future for its result;
- the user's thread picks the phase up inside ``wait_phase`` (at start) or inside the H-th
  ``step()``, writes the start parameters into the model in place, and at the H-th step of the
  phase resolves the future with ``delta = start - local`` (the same pseudo-gradient
  ``InnerTrainer`` reports), then waits for the next phase.

So the loop never touches the user's model (only the user's thread does, between its own
optimizer steps), and the user's thread never touches the loop's state: everything crosses in a
condition variable and a ``concurrent.futures.Future``. Parameters cross as flat float32 CPU
vectors through ``peer.trainer.params`` (the same mapping ``InnerTrainer`` uses).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from peer.errors import PeerError
from peer.trainer.loop import InnerResult
from peer.trainer.params import assign_flat_state, flatten_state, state_layout
from peer.trainer.task import Task, TaskDefaults

__all__ = ["LIBRARY_DEFAULTS", "ExternalInner", "SwarmStopped"]

log = logging.getLogger(__name__)

# The settings a library-mode peer uses when the user gives none. H = 500 and the outer step are
# DiLoCo's defaults. batch_size and inner_lr are not used: the user's loop owns its data and its
# inner optimizer (they only fill the Settings record).
LIBRARY_DEFAULTS = TaskDefaults(inner_steps=500, batch_size=1, inner_lr=1e-3, outer_lr=0.7, outer_momentum=0.9)

# How often a waiting side re-checks whether the other side is gone (seconds).
_POLL_S = 0.2


class SwarmStopped(PeerError):
    """The swarm behind a ``peer.Swarm`` stopped (closed, or its daemon failed); the message says why."""


@dataclass
class _Phase:
    rnd: int
    start: torch.Tensor  # flat float32 CPU: the state (parameters, buffers) the phase starts from
    done: concurrent.futures.Future  # of InnerResult, resolved by the user's thread


class ExternalInner:
    """An ``InnerPhase`` whose steps are taken by the user's loop (see the module docstring).

    ``steps`` is H. ``executor`` runs evaluation (only with a ``task``: its held-out split on a
    copy of the model; without one, evaluation is the user's business and returns nothing).
    ``on_step(step, loss)`` runs on the user's thread after each counted step (cheap, thread
    safe). ``run``/``evaluate`` are loop-only; ``wait_phase``/``step`` belong to the one thread
    that trains the model; ``close`` may be called from any thread.
    """

    def __init__(self, model: torch.nn.Module, steps: int, executor: Executor, *,
                 on_step: Callable[[int, float], None] | None = None, task: Task | None = None) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self._model = model
        self._layout = state_layout(model)
        self._numel = self._layout.numel
        self._steps = steps
        self._executor = executor
        self._on_step = on_step
        self._task = task
        # Evaluation reads a copy, so it never races the user's thread on the live model.
        self._eval_model = copy.deepcopy(model).eval() if task is not None else None
        self._cond = threading.Condition()
        self._posted: _Phase | None = None  # posted by run(), not yet picked up
        self._stopped: str | None = None  # why, once closed
        # The user's thread only:
        self._phase: _Phase | None = None
        self._taken = self._samples = 0
        self._loss_sum = 0.0
        self._losses = 0
        self._nonfinite = False
        self._t0 = 0.0

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def steps_taken(self) -> int:
        """Steps counted in the current phase (0 <= n < H); the user's thread."""
        return self._taken

    # ----------------------------------------------------------------- the loop's side

    async def run(self, rnd: int, start: torch.Tensor, should_stop: Callable[[], bool]) -> InnerResult | None:
        """Post a phase from ``start`` and wait until the user's loop has taken H steps of it;
        None when ``should_stop()`` turns true first or ``close`` was called (polled every 0.2 s)."""
        if start.dim() != 1 or start.numel() != self._numel:
            raise ValueError(f"expected a flat vector of {self._numel} parameters, got shape {tuple(start.shape)}")
        phase = _Phase(rnd, start.detach().to(device="cpu", dtype=torch.float32), concurrent.futures.Future())
        with self._cond:
            if self._stopped is not None:
                return None
            self._posted = phase
            self._cond.notify_all()
        waiter = asyncio.wrap_future(phase.done)
        try:
            while not waiter.done():
                if should_stop() or self._stopped is not None:
                    return None
                await asyncio.wait({waiter}, timeout=_POLL_S)
            return waiter.result()
        finally:
            with self._cond:
                if self._posted is phase:
                    self._posted = None
            if not waiter.done():
                waiter.cancel()  # also cancels phase.done: a late hand-over is dropped

    async def evaluate(self, params: torch.Tensor) -> Mapping[str, float]:
        if self._task is None or self._eval_model is None:
            return {}
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._evaluate, params)

    def _evaluate(self, params: torch.Tensor) -> dict[str, float]:
        assert self._task is not None and self._eval_model is not None
        assign_flat_state(self._eval_model, params.detach())
        device = next(self._eval_model.parameters()).device
        with torch.no_grad():
            return self._task.evaluate(self._eval_model, device)

    # ----------------------------------------------------------------- any thread

    def close(self, reason: str) -> None:
        """Wake a waiting user thread with ``SwarmStopped(reason)``; later waits fail the same way.
        Drops ``on_step`` (it references the daemon, which may then be freed)."""
        with self._cond:
            if self._stopped is None:
                self._stopped = reason
            self._on_step = None
            self._cond.notify_all()

    # ----------------------------------------------------------------- the user's thread

    def wait_phase(self, timeout_s: float | None = None) -> None:
        """Block until the loop posts the next phase, then write its start parameters into the
        model. Raises ``SwarmStopped`` when closed first, or after ``timeout_s`` (None: no limit;
        the round's own deadlines bound the wait while the daemon lives)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._posted is None:
                if self._stopped is not None:
                    raise SwarmStopped(self._stopped)
                left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                if left <= 0:
                    raise SwarmStopped(f"the swarm did not hand over its parameters within {timeout_s:.0f} s "
                                       "(it was still finding its peers or fetching their state; see the log)")
                self._cond.wait(left)
            phase, self._posted = self._posted, None
        assign_flat_state(self._model, phase.start)
        self._phase = phase
        self._taken = self._samples = self._losses = 0
        self._loss_sum = 0.0
        self._nonfinite = False
        self._t0 = time.perf_counter()

    def step(self, samples: int = 1, loss: float | None = None) -> bool:
        """Count one optimizer step of the user's loop (``samples`` trained in it, its ``loss``
        if known). At the H-th step: hand the phase's delta over, wait for the next phase (the
        round in between) and write its start parameters into the model; return True then,
        else False. Raises ``SwarmStopped`` when the swarm is gone."""
        phase = self._phase
        if phase is None or self._stopped is not None:
            with self._cond:
                raise SwarmStopped(self._stopped or "no inner phase in progress")
        self._taken += 1
        self._samples += samples
        if loss is not None:
            if math.isfinite(loss):
                self._loss_sum += loss
                self._losses += 1
            else:
                self._nonfinite = True
        on_step = self._on_step
        if on_step is not None:
            on_step(self._taken - 1, math.nan if loss is None else loss)
        if self._taken < self._steps:
            return False
        delta = phase.start - flatten_state(self._model)
        for start, stop in self._layout.int_slices:
            delta[start:stop] = 0  # integer buffers keep the swarm's value (peer.trainer.params)
        nonfinite = self._nonfinite or not bool(torch.isfinite(delta).all())
        if nonfinite:
            log.warning("inner phase of round %d non-finite (a loss or a parameter is NaN/Inf); its delta is "
                        "withheld and the model is reset to the global parameters", phase.rnd)
        result = InnerResult(delta=delta, samples=self._samples,
                             mean_loss=self._loss_sum / self._losses if self._losses else math.nan,
                             steps=self._taken, seconds=time.perf_counter() - self._t0, nonfinite=nonfinite)
        self._phase = None
        try:
            phase.done.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass  # the loop stopped waiting (stopping): the next wait says so
        self.wait_phase()
        return True
