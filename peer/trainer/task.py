"""What a peer trains: the ``Task`` contract, seeded model initialisation and task loading.

A task bundles a model architecture, a data stream per peer, a loss and a held-out evaluation.
Every peer of a run builds the same task with the same seed, so ``init_model`` gives them
bit-identical starting parameters; each peer then reads its own data stream, derived from
``(seed, stream_id)``.

Randomness: library code never touches the global torch / numpy RNG. Data streams use private
generators seeded from ``sha256(f"{seed}:{stream_id}")``; ``init_model`` seeds torch inside
``torch.random.fork_rng`` so the caller's global RNG state is unchanged afterwards.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from peer.errors import TaskError
from peer.trainer.schedule import LRSchedule

__all__ = [
    "BUILTIN_TASKS",
    "Task",
    "TaskDefaults",
    "derive_seed",
    "init_model",
    "load_task",
    "numpy_generator",
    "torch_generator",
]

BUILTIN_TASKS: tuple[str, ...] = ("digits", "fashion", "charlm")

# name -> "module:attr" of the Task subclass; imported lazily so that, for example, the digits
# task does not pay for reading Fashion-MNIST or the Shakespeare corpus.
_BUILTIN_IMPLS: dict[str, str] = {
    "digits": "peer.trainer.tasks.digits:DigitsTask",
    "fashion": "peer.trainer.tasks.fashion:FashionTask",
    "charlm": "peer.trainer.tasks.charlm:CharLMTask",
}


@dataclass(frozen=True)
class TaskDefaults:
    """Hyper-parameters that fit a task; the daemon uses them unless the user overrides.

    ``inner_steps`` is H (inner optimizer steps per outer round), ``batch_size`` is in samples
    (sequences for language models), learning rates are plain multipliers.
    """

    inner_steps: int
    batch_size: int
    inner_lr: float
    outer_lr: float
    outer_momentum: float = 0.9


def derive_seed(seed: int, stream_id: str) -> int:
    """A 63-bit seed derived from ``sha256(f"{seed}:{stream_id}")`` (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{stream_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def torch_generator(seed: int, stream_id: str) -> torch.Generator:
    """A private CPU ``torch.Generator`` for ``(seed, stream_id)``; the global RNG is untouched."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, stream_id))
    return gen


def numpy_generator(seed: int, stream_id: str) -> np.random.Generator:
    """A private numpy ``Generator`` for ``(seed, stream_id)``."""
    return np.random.default_rng(derive_seed(seed, stream_id))


class Task(abc.ABC):
    """A trainable problem. Subclasses set ``name`` and ``defaults`` as class attributes.

    Methods are called from the trainer's single thread; a task instance holds read-only data
    after ``__init__`` and may be shared by a training model and an evaluation model.
    Raises ``TaskError`` from ``__init__`` when its data is missing or malformed.
    """

    name: str
    defaults: TaskDefaults

    def __init__(self, data_path: str | None = None) -> None:
        self.data_path = data_path

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A fresh model on CPU, float32. The architecture must not depend on random draws;
        parameter initialisation uses the global torch RNG, which ``init_model`` seeds."""

    @abc.abstractmethod
    def batches(
        self, seed: int, stream_id: str, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An infinite stream of CPU ``(inputs, targets)`` batches for one peer.

        The order is a deterministic function of ``(seed, stream_id)`` (use ``torch_generator``
        or ``numpy_generator``); different stream ids give different orders.
        """

    @abc.abstractmethod
    def loss(
        self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch`` (already on the model's device)."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ...}`` on a fixed held-out split, in bounded time
        (well under 0.5 s on one CPU thread for the built-in tasks)."""

    def make_inner_optimizer(
        self, params: Iterable[torch.nn.Parameter], lr: float
    ) -> torch.optim.Optimizer:
        """The inner optimizer; AdamW with torch's defaults apart from ``lr``."""
        return torch.optim.AdamW(params, lr=lr)

    def inner_lr(self, step: int, base_lr: float, schedule: LRSchedule) -> float:
        """The inner learning rate at global inner step ``step`` (``round * H + i``), set on
        every parameter group before each inner step. Default: the configured schedule
        (``--inner-lr-schedule``), ``base_lr * schedule.factor(step)``. Override it to supply the
        task's own scheduler; it must be a pure function of ``step`` so that every peer, also
        one that joins late, computes the same value."""
        return base_lr * schedule.factor(step)


def init_model(task: Task, seed: int) -> torch.nn.Module:
    """Build ``task``'s model with parameters that are identical on every peer for ``seed``.

    Runs inside ``torch.random.fork_rng(devices=[])``, so the global CPU RNG state is the same
    before and after the call. The model is returned on CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        model = task.build_model()
    return model


def load_task(name: str, data_path: str | None = None) -> Task:
    """Return the task called ``name``: a built-in (see ``BUILTIN_TASKS``) or ``"pkg.mod:attr"``.

    For ``"pkg.mod:attr"``, ``attr`` is either a ``Task`` subclass (called as
    ``attr(data_path)``) or a factory returning a ``Task`` (called with no arguments when
    ``data_path`` is None, else as ``attr(data_path)``).

    Raises ``TaskError`` for an unknown built-in, a module that cannot be imported, a missing
    attribute, something that is not a task, or missing data.
    """
    if ":" in name:
        spec = name
    elif name in _BUILTIN_IMPLS:
        spec = _BUILTIN_IMPLS[name]
    else:
        raise TaskError(
            f"unknown task {name!r}: built-in tasks are {', '.join(BUILTIN_TASKS)}, "
            "or give 'package.module:attr' naming a Task subclass or factory"
        )
    module_name, _, attr_name = spec.partition(":")
    if not module_name or not attr_name:
        raise TaskError(f"task {name!r} must look like 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"task {name!r}: cannot import module {module_name!r}: {exc}") from exc
    try:
        target = getattr(module, attr_name)
    except AttributeError:
        raise TaskError(
            f"task {name!r}: module {module_name!r} has no attribute {attr_name!r}"
        ) from None

    if isinstance(target, type):
        if not issubclass(target, Task):
            raise TaskError(f"task {name!r}: {spec} is a class but not a peer Task subclass")
        if inspect.isabstract(target):
            raise TaskError(f"task {name!r}: {spec} is abstract (it lacks some Task methods)")
        task = target(data_path)
    elif callable(target):
        args = () if data_path is None else (data_path,)
        try:
            inspect.signature(target).bind(*args)
        except TypeError:
            want = "no arguments" if data_path is None else "one argument (the data path)"
            raise TaskError(f"task {name!r}: factory {spec} must accept {want}") from None
        except ValueError:
            pass  # no signature available (builtins); just try the call
        task = target(*args)
        if not isinstance(task, Task):
            raise TaskError(
                f"task {name!r}: factory {spec} returned {type(task).__name__}, not a Task"
            )
    else:
        raise TaskError(
            f"task {name!r}: {spec} is a {type(target).__name__}, not a Task subclass or factory"
        )
    for attr in ("name", "defaults"):
        if not hasattr(task, attr):
            raise TaskError(f"task {name!r}: {spec} does not set {attr!r}")
    if not isinstance(task.defaults, TaskDefaults):
        raise TaskError(f"task {name!r}: {spec}.defaults is not a TaskDefaults")
    return task
