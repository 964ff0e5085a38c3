"""``peer export``: the swarm's current global model as a ``.safetensors`` file.

The file holds the task model's own ``state_dict`` names (parameters and persistent buffers;
tied weights once, as ``safetensors.torch.save_model`` writes them) and string metadata:
``run_id``, ``round``, ``global_hash`` (the swarm's global hash of that round, BLAKE3), ``task`` and
``schema_hash``. ``model.load_state_dict(safetensors.torch.load_file(path))`` reads it (for a
model with tied weights: ``safetensors.torch.load_model(model, path)``).

Two sources: a running peer (its status says the run, task and round; ``GetState`` gives the
state, checked against its digests) or a peer's state directory (its newest good
checkpoint). Every check runs before anything is written; the output is written to a temporary
file beside ``--out`` and renamed over it, so a failed export leaves ``--out`` as it was.
Called from ``peer.cli`` (blocking; never exits the process). Raises ``PeerError`` children.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.errors import StateError
from peer.sync.state import GlobalState, decode_state, max_blob_bytes, read_checkpoint, read_legacy_checkpoint
from peer.sync.store import CHECKPOINT_FILE, GENERATIONS, LEGACY_CHECKPOINT_FILE
from peer.trainer.params import assign_flat_state, schema_hash, state_layout
from peer.trainer.task import Task, init_model, load_task

__all__ = ["Exported", "export_from_peer", "export_from_state_dir", "model_with_state", "save_model_file"]

MODEL_FORMAT = "peer-model-1"


@dataclass(frozen=True)
class Exported:
    """What was written: the file, the round, the global hash, the task and tensor count."""

    path: Path
    round: int
    global_hash: str
    task: str
    tensors: int


def model_with_state(task: Task, flat: torch.Tensor) -> torch.nn.Module:
    """The task's model (CPU, float32 as built) holding the flat global state ``flat``.

    Raises ``StateError`` when ``flat`` does not fit the model's state."""
    model = init_model(task, 0)  # the values are replaced; only the architecture matters
    try:
        assign_flat_state(model, flat)
    except ValueError as exc:
        raise StateError(f"the state does not fit task {task.name!r}'s model: {exc}") from None
    return model.eval()


def save_model_file(model: torch.nn.Module, out: Path, metadata: dict[str, str]) -> None:
    """Write ``model`` with ``safetensors.torch.save_model`` to ``out``, atomically."""
    from safetensors.torch import save_model

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_model(model, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _check_out(out: Path) -> None:
    if not out.parent.is_dir():
        raise StateError(f"--out {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise StateError(f"--out {out} is a directory; name a file such as model.safetensors")


def _write(task: Task, task_name: str, state: GlobalState, run_id: str, out: Path) -> Exported:
    model = model_with_state(task, state.params)
    meta = {"format": MODEL_FORMAT, "run_id": run_id, "round": str(state.round),
            "global_hash": state.global_hash, "task": task_name, "schema_hash": schema_hash(model)}
    save_model_file(model, out, meta)
    return Exported(out, state.round, state.global_hash, task_name, len(model.state_dict()))


def _task_for(name: str | None, data: str | None, where: str) -> tuple[Task, str]:
    if not name:
        raise StateError(f"{where} does not say which task it trained; pass --task NAME")
    return load_task(name, data), name


def export_from_state_dir(state_dir: str | Path, out: str | Path, *, task: str | None = None,
                          data: str | None = None) -> Exported:
    """Export the newest good checkpoint in ``state_dir`` (a torn newest generation falls back to
    the one before, as a resuming peer does). ``task`` overrides the task the checkpoint names.

    Raises ``StateError`` without a checkpoint, when none is readable, or when the task's model
    does not match the checkpoint; ``TaskError`` for a task that does not load."""
    state_dir, out = Path(state_dir), Path(out)
    _check_out(out)
    if not state_dir.is_dir():
        raise StateError(f"state dir {state_dir} does not exist")
    newest = state_dir / CHECKPOINT_FILE
    paths = [newest] + [newest.with_name(f"{newest.stem}.{i}{newest.suffix}") for i in range(1, GENERATIONS)]
    paths = [p for p in paths if p.exists()]
    legacy = state_dir / LEGACY_CHECKPOINT_FILE
    if not paths and not legacy.exists():
        raise StateError(f"no checkpoint in {state_dir} (expected {CHECKPOINT_FILE}; a peer writes one every "
                         "checkpoint_interval_s and when it stops after a completed round)")
    if not paths:
        the_task, name = _task_for(task, data, f"old checkpoint {legacy}")
        numel = state_layout(init_model(the_task, 0)).numel
        return _write(the_task, name, read_legacy_checkpoint(legacy, numel), "", out)
    problems = []
    for path in paths:
        meta = _peek_meta(path)
        the_task, name = _task_for(task or meta.get("task"), data, f"checkpoint {path}")
        model = init_model(the_task, 0)
        want = meta.get("schema_hash")
        if want and want != schema_hash(model):
            raise StateError(f"task {name!r}'s model does not match checkpoint {path} (written by task "
                             f"{meta.get('task', '?')!r}: its tensors have other names, shapes or dtypes)")
        try:
            state, meta = read_checkpoint(path, state_layout(model).numel)
        except (StateError, OSError) as exc:
            problems.append(str(exc))
            continue
        return _write(the_task, name, state, meta.get("run_id", ""), out)
    raise StateError("no readable checkpoint: " + "; ".join(problems))


def _peek_meta(path: Path) -> dict[str, str]:
    from peer.sync.state import checkpoint_metadata

    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 20)
        return checkpoint_metadata(head)
    except (StateError, OSError):
        return {}  # read_checkpoint then says what is wrong with it


def export_from_peer(address: str, out: str | Path, *, credentials: str | None = None, task: str | None = None,
                     data: str | None = None, timeout_s: float = 60.0) -> Exported:
    """Export the global state of the running peer at ``address`` (blocking).

    Raises ``StateError`` when the peer has completed no round yet, when the task's model does
    not match the peer's, or when its state fails its checks; ``PeerUnavailable`` when it does
    not answer."""
    out = Path(out)
    _check_out(out)
    the_task, name, state, run_id = asyncio.run(_fetch(address, credentials, task, data, timeout_s))
    return _write(the_task, name, state, run_id, out)


async def _fetch(address: str, credentials: str | None, task: str | None, data: str | None,
                 timeout_s: float) -> tuple[Task, str, GlobalState, str]:
    from peer.client import StatusClient, fetch_status

    info = (await fetch_status(address, min(timeout_s, 10.0), credentials)).peer
    if info.round == 0:
        raise StateError(f"peer {info.peer_id} at {address} has completed no round yet (round 0): nothing to "
                         "export; try again after its first round")
    the_task, name = _task_for(task or info.task, data, f"peer {address}")
    model = init_model(the_task, 0)
    if schema_hash(model) != info.schema_hash:
        raise StateError(f"task {name!r}'s model does not match the model of peer {info.peer_id} at {address} "
                         f"(it runs task {info.task!r}): pass --task (and --data) as the peer runs it")
    numel = state_layout(model).numel
    async with StatusClient(idle_timeout_s=timeout_s, credentials=credentials,
                            max_state_bytes=max_blob_bytes(numel)) as client:
        header, blob = await client.state(address, info, timeout_s)
    state, _ = decode_state(blob, numel, header)
    return the_task, name, state, info.run_id
