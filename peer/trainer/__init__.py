"""Local training: tasks (model + data + loss + evaluation) and the DiLoCo inner phase.

Knows nothing of the network. The daemon builds an ``InnerTrainer`` and calls it from a
dedicated single-thread executor.
"""

from peer.trainer.loop import InnerResult, InnerTrainer, resolve_device
from peer.trainer.params import (
    StateLayout,
    assign_flat_state,
    flatten_state,
    param_count,
    schema_hash,
    schema_of,
    state_layout,
)
from peer.trainer.schedule import LRSchedule
from peer.trainer.task import BUILTIN_TASKS, Task, TaskDefaults, init_model, load_task

__all__ = [
    "BUILTIN_TASKS",
    "InnerResult",
    "InnerTrainer",
    "LRSchedule",
    "StateLayout",
    "Task",
    "TaskDefaults",
    "assign_flat_state",
    "flatten_state",
    "init_model",
    "load_task",
    "param_count",
    "resolve_device",
    "schema_hash",
    "schema_of",
    "state_layout",
]
