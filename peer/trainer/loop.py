"""The inner phase of DiLoCo for one peer: H local optimizer steps from the global parameters.

``InnerTrainer`` owns the model, the inner optimizer and the data stream. It is not thread
safe: the daemon calls it from one dedicated single-thread executor, never from the event loop.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peer.errors import ConfigError, StateError
from peer.trainer.params import (
    StateLayout, assign_flat_state, flat_on_device, flatten_state, schema_hash, state_layout,
)
from peer.trainer.schedule import LRSchedule
from peer.trainer.task import Task, init_model

__all__ = ["PRECISIONS", "InnerResult", "InnerTrainer", "resolve_device"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InnerResult:
    """Outcome of one inner phase.

    ``delta`` is the flat float32 pseudo-gradient ``theta_global - theta_local`` over the whole
    state, parameters and buffers (the outer optimizer steps along ``-delta``; integer buffers'
    slices are 0), on the model's device: a GPU's delta is encoded there and only the encoded
    bytes reach the host (see ``peer.codec.base``). ``samples`` counts training samples
    (sequences for language models). ``mean_loss`` is over the steps taken (NaN if none).
    ``seconds`` is wall time. If ``nonfinite`` is True a loss or parameter became NaN/Inf: do
    not send ``delta``.
    """

    delta: torch.Tensor
    samples: int
    mean_loss: float
    steps: int
    seconds: float
    nonfinite: bool
    lr: float = math.nan  # the inner learning rate of the last step taken (NaN if none)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises ``ConfigError`` for another string or a CUDA device that is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"bad device {device!r}: {exc}") from exc
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"device {device!r} requested but only {count} CUDA devices exist")
        return dev
    raise ConfigError(f"bad device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


class InnerTrainer:
    """Owns the model, inner optimizer and data stream of one peer.

    Not thread safe: one thread calls it at a time. The daemon runs its methods in a dedicated
    single-thread executor, off the event loop.

    ``seed`` is the run's shared seed (same initial parameters on every peer); ``stream_id``
    (e.g. the peer id) picks this peer's data order. ``threads`` is passed to
    ``torch.set_num_threads``, which is PROCESS-WIDE: it also affects any other torch work in
    this process. Keep it at 1 when several peers share a machine (oversubscription makes
    training ~20x slower).

    The global state is the model's parameters and persistent buffers as one flat float32
    vector (``peer.trainer.params``). ``schedule`` sets the inner learning rate at each global
    inner step (through ``Task.inner_lr``). ``precision`` ``"bf16"`` runs the forward pass and
    loss of the inner phase under ``torch.autocast`` (CPU and CUDA); the model, its gradients,
    the optimizer state, the global state and evaluation stay float32.
    """

    def __init__(
        self,
        task: Task,
        *,
        seed: int,
        stream_id: str,
        device: str = "cpu",
        threads: int = 1,
        batch_size: int,
        inner_lr: float,
        schedule: LRSchedule | None = None,
        precision: str = "fp32",
    ) -> None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not (inner_lr > 0 and math.isfinite(inner_lr)):
            raise ConfigError(f"inner_lr must be a positive finite number, got {inner_lr}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self._device = resolve_device(device)
        torch.set_num_threads(threads)
        self._task = task
        self._inner_lr = inner_lr
        self._schedule = schedule or LRSchedule()
        self._autocast = precision == "bf16"
        self._next_step: int | None = None  # the global step after the last phase (None: none yet)
        model = init_model(task, seed)
        self._layout = state_layout(model)
        # theta_0 is not kept (4 bytes a value for a value needed once): initial_params()
        # rebuilds it from the seed.
        self._seed = seed
        self._schema_hash = schema_hash(model)
        self._numel = self._layout.numel
        self._model = model.to(self._device)
        self._model.train()
        # A separate copy for evaluation so evaluate() never disturbs the training model, built
        # at the first evaluate(): a peer that never evaluates (eval_every_rounds = 0) does not
        # hold it (4 bytes a value).
        self._eval_model: torch.nn.Module | None = None
        self._optimizer = task.make_inner_optimizer(self._model.parameters(), inner_lr)
        self._names = [name for name, _ in self._model.named_parameters()]
        self._batches = task.batches(seed, stream_id, batch_size)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def task(self) -> Task:
        return self._task

    @property
    def param_count(self) -> int:
        """Length of the flat state (parameters and buffers)."""
        return self._numel

    @property
    def layout(self) -> StateLayout:
        return self._layout

    def initial_params(self) -> torch.Tensor:
        """theta_0, a new tensor: the flat float32 CPU state of ``init_model(task, seed)``
        (rebuilt on every call, the same on every peer for the run's seed)."""
        return flatten_state(init_model(self._task, self._seed))

    def schema_hash(self) -> str:
        return self._schema_hash

    def _check_flat(self, flat: torch.Tensor) -> None:
        if flat.dim() != 1 or flat.numel() != self._numel:
            raise ValueError(
                f"expected a flat state of {self._numel} values, got shape {tuple(flat.shape)}"
            )

    def run_inner(
        self,
        global_params: torch.Tensor,
        steps: int,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
        first_step: int = 0,
    ) -> InnerResult:
        """Load ``global_params`` (the flat state, on the host or on the model's device; not
        modified) and run up to ``steps`` inner optimizer steps; step ``i`` is global inner step
        ``first_step + i`` of the learning-rate schedule.

        The inner optimizer state persists across calls (as in DiLoCo). ``should_stop`` is
        polled before every step; when it returns True the phase ends early (``steps`` in the
        result is then smaller). ``on_step(step_index, loss)`` runs after each step, on this
        thread; keep it cheap. Stops at the first non-finite loss (that step is not applied) and
        then resets the inner optimizer state so the next phase starts clean.

        Raises ``ValueError`` if ``global_params`` has the wrong shape.
        """
        self._check_flat(global_params)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if first_step < 0:
            raise ValueError(f"first_step must be >= 0, got {first_step}")
        start = time.perf_counter()
        if self._next_step != first_step:
            # First phase, or a jump (joined late, resynced, resumed): say where in the schedule.
            log.info("inner phase starts at global step %d, inner lr %.6g", first_step,
                     self._task.inner_lr(first_step, self._inner_lr, self._schedule))
        # On the model's device once, for the model and the delta's base: no copy when the
        # driver's mirror (``peer.sync.mirror``) already holds the global state there.
        start_params = global_params.detach().to(device=self._device, dtype=torch.float32)
        assign_flat_state(self._model, start_params)
        self._model.train()
        done = samples = 0
        loss_sum = 0.0
        lr = math.nan
        nonfinite = False
        for i in range(steps):
            if should_stop is not None and should_stop():
                break
            lr = float(self._task.inner_lr(first_step + i, self._inner_lr, self._schedule))
            for group in self._optimizer.param_groups:
                group["lr"] = lr
            x, y = next(self._batches)
            x = x.to(self._device, non_blocking=True)
            y = y.to(self._device, non_blocking=True)
            self._optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self._autocast):
                loss = self._task.loss(self._model, (x, y))
            loss = loss.float()
            value = loss.item()
            if not math.isfinite(value):
                nonfinite = True
                break
            loss.backward()
            self._optimizer.step()
            done += 1
            samples += int(x.shape[0])
            loss_sum += value
            if on_step is not None:
                on_step(i, value)
        self._next_step = first_step + done
        # The last step's gradients are not needed after the phase (every step sets them anew):
        # let them go, rather than hold 4 bytes a value through the round.
        self._optimizer.zero_grad(set_to_none=True)
        delta = start_params - flat_on_device(self._model)
        del start_params
        for start_, stop in self._layout.int_slices:
            # Integer buffers (num_batches_tracked) keep the global value: a counter's change of
            # H next to the float statistics would set a lossy codec's block scale and swamp them.
            delta[start_:stop] = 0
        if not nonfinite and not bool(torch.isfinite(delta).all()):
            nonfinite = True
        if nonfinite:
            log.warning("inner phase non-finite after %d steps; resetting inner optimizer", done)
            self._optimizer = self._task.make_inner_optimizer(
                self._model.parameters(), self._inner_lr
            )
        return InnerResult(
            delta=delta,
            samples=samples,
            mean_loss=loss_sum / done if done else float("nan"),
            steps=done,
            seconds=time.perf_counter() - start,
            nonfinite=nonfinite,
            lr=lr,
        )

    def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        """Evaluate the flat state ``params`` (parameters and buffers) on the task's held-out
        split, in float32, using a separate model copy.

        Raises ``ValueError`` if ``params`` has the wrong shape.
        """
        self._check_flat(params)
        if self._eval_model is None:
            # A copy of the training model's structure (its values are replaced right below),
            # without the gradients it may hold.
            self._eval_model = copy.deepcopy(self._model)
            for p in self._eval_model.parameters():
                p.grad = None
            self._eval_model.eval()
        assign_flat_state(self._eval_model, params.detach())
        with torch.no_grad():
            return self._task.evaluate(self._eval_model, self._device)

    def inner_state_dict(self) -> dict[str, torch.Tensor]:
        """The inner optimizer state as ``{"<param name>/<key>": CPU tensor}``.

        For AdamW the keys are ``exp_avg``, ``exp_avg_sq`` and ``step`` (0-d); plain numbers in
        the state become 0-d float64 tensors. Safe to save without pickle. Hyper-parameters
        (lr, betas) are not included: they come from configuration.
        """
        index = {id(p): name for name, p in self._model.named_parameters()}
        out: dict[str, torch.Tensor] = {}
        for p, state in self._optimizer.state.items():
            name = index[id(p)]
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[f"{name}/{key}"] = value.detach().to("cpu").clone()
                elif isinstance(value, (int, float)):
                    out[f"{name}/{key}"] = torch.tensor(value, dtype=torch.float64)
                # Other state (none for the built-in optimizers) is not checkpointed.
        return out

    def load_inner_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the inner optimizer state from ``inner_state_dict`` output.

        Raises ``StateError`` for a key naming an unknown parameter or a tensor whose shape
        does not fit (0-d tensors and tensors shaped like their parameter are accepted).
        """
        params = dict(self._model.named_parameters())
        per_param: dict[str, dict[str, torch.Tensor]] = {}
        for full_key, value in state.items():
            name, sep, key = full_key.rpartition("/")
            if not sep or name not in params:
                raise StateError(f"inner optimizer state has an unknown entry {full_key!r}")
            if not isinstance(value, torch.Tensor):
                raise StateError(f"inner optimizer state {full_key!r} is not a tensor")
            if value.dim() != 0 and tuple(value.shape) != tuple(params[name].shape):
                raise StateError(
                    f"inner optimizer state {full_key!r} has shape {tuple(value.shape)}, "
                    f"parameter has {tuple(params[name].shape)}"
                )
            per_param.setdefault(name, {})[key] = value
        sd = self._optimizer.state_dict()
        sd["state"] = {
            i: {
                key: (v.to(torch.float32) if v.dim() == 0 else v)
                for key, v in per_param[name].items()
            }
            for i, name in enumerate(self._names)
            if name in per_param
        }
        try:
            self._optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise StateError(f"inner optimizer state does not fit: {exc}") from exc
