"""The state store: the current global state, its snapshot for donors, and checkpoints.

Loop-side methods (``adopt``, ``maybe_checkpoint`` and the ``async_`` ones) run on the event
loop; everything that touches the disk or hashes or serializes a whole state runs on the
store's own executor, so that neither a round nor a joiner ever waits for the other, and the
loop never waits for the disk.

Copies, and why: a ``GlobalState`` is immutable once built (``outer_step`` and
``decode_state`` make new tensors), so the current state is shared by reference with the
round, donors and checkpoints. The one serialized snapshot for donors (``encode_state``'s
bytes, 8 bytes a value: the state and its momentum) is built lazily, once per state, and kept
until a snapshot of a later state replaces it; the previous one is let go before the next is
built, so at most one is held here. A checkpoint is serialized (as safetensors) when it is
written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from peer.errors import StateError
from peer.sync.state import (
    GlobalState,
    decode_state,
    encode_state,
    read_checkpoint,
    read_legacy_checkpoint,
    state_header,
    write_checkpoint,
)
from peer.types import StateHeader

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
LEGACY_CHECKPOINT_FILE = "checkpoint.bin"
"""What versions before safetensors checkpoints wrote (PEERSTATE1): loaded when it fits."""
GENERATIONS = 3
"""Checkpoint generations kept: a newest one that fails its checks falls back to the one before."""


class StateStore:
    """Owns the current ``GlobalState`` of one peer.

    ``on_adopt(state)`` runs on the loop after every change (metrics); ``on_checkpoint(ok)``
    runs on the executor after every checkpoint write. ``meta`` (run_id, task, schema_hash) goes
    into every checkpoint's metadata; a checkpoint whose ``schema_hash`` differs is not loaded.
    """

    def __init__(
        self,
        initial: GlobalState,
        state_dir: Path,
        executor: Executor,
        *,
        checkpoint_interval_s: float,
        on_adopt: Callable[[GlobalState], None] = lambda state: None,
        on_checkpoint: Callable[[bool], None] = lambda ok: None,
        meta: dict[str, str] | None = None,
    ) -> None:
        self._state = initial
        self._meta = dict(meta or {})
        self._numel = initial.params.numel()
        self._path = state_dir / CHECKPOINT_FILE
        self._executor = executor
        self._interval_s = checkpoint_interval_s
        self._on_adopt = on_adopt
        self._on_checkpoint = on_checkpoint
        self._snapshot: tuple[GlobalState, tuple[StateHeader, bytes]] | None = None
        self._snapshot_lock = threading.Lock()
        self._checkpointing: asyncio.Future | None = None
        self._last_checkpoint = time.monotonic()

    @property
    def state(self) -> GlobalState:
        """The last completed round's state. Never modified in place: hold on to it freely."""
        return self._state

    @property
    def numel(self) -> int:
        return self._numel

    @property
    def checkpoint_path(self) -> Path:
        return self._path

    def adopt(self, state: GlobalState) -> None:
        """Make ``state`` current (loop). Its snapshot is built lazily, off the round's path."""
        if state.params.numel() != self._numel:
            raise StateError(f"state has {state.params.numel()} parameters; this model has {self._numel}")
        self._state = state
        # A snapshot of an older state is never served again (streams in flight hold their
        # own reference): let it go, with the state it pins (16 bytes a parameter).
        if self._snapshot is not None and self._snapshot[0] is not state:
            self._snapshot = None
        self._on_adopt(state)

    def snapshot(self, state: GlobalState) -> tuple[StateHeader, bytes]:
        """The serialized snapshot of ``state``, built once per state (any thread but the loop)."""
        with self._snapshot_lock:
            if self._snapshot is not None and self._snapshot[0] is state:
                return self._snapshot[1]
            # Let go of the previous snapshot (and the previous state it keeps alive) before
            # building this one: a stream still serving it holds its own reference.
            self._snapshot = None
            blob = encode_state(state)
            header = state_header(state, blob)
            self._snapshot = (state, (header, blob))
            return header, blob

    async def async_snapshot(self) -> tuple[StateHeader, bytes]:
        """The current state's snapshot, for a donor to serve (built on the executor)."""
        state = self._state
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.snapshot, state)

    async def async_decode(self, blob: bytes | memoryview, checked: StateHeader | None = None) -> GlobalState:
        """Parse and verify a state blob from a donor (on the executor); ``checked`` as in
        ``decode_state``. Raises StateError."""
        state, _ = await asyncio.get_running_loop().run_in_executor(self._executor, decode_state, blob, self._numel,
                                                                     checked)
        return state

    def generations(self) -> list[Path]:
        """The checkpoint files, newest first: ``checkpoint.safetensors``,
        ``checkpoint.1.safetensors``, ..."""
        return [self._path] + [self._path.with_name(f"{self._path.stem}.{i}{self._path.suffix}")
                               for i in range(1, GENERATIONS)]

    async def async_load(self) -> bool:
        """Resume from the newest good checkpoint generation (read, verified and hashed on the
        executor); a torn or foreign file is logged, left alone, and the one before is tried.
        True if resumed. Without any, an older version's ``checkpoint.bin`` (PEERSTATE1) is
        loaded when it fits this model, else refused with a logged reason."""
        paths = self.generations()
        legacy = self._path.with_name(LEGACY_CHECKPOINT_FILE)
        if not any(p.exists() for p in paths) and legacy.exists():
            paths = [legacy]
        for path in paths:
            if not path.exists():
                continue
            try:
                state = await asyncio.get_running_loop().run_in_executor(self._executor, self._read, path)
            except (StateError, OSError) as exc:
                log.error("not resuming from %s: %s", path, exc)
                continue
            log.info("resumed from checkpoint %s at round %d", path, state.round)
            self.adopt(state)
            return True
        self._on_adopt(self._state)
        return False

    def _read(self, path: Path) -> GlobalState:
        if path.name == LEGACY_CHECKPOINT_FILE:
            state = read_legacy_checkpoint(path, self._numel)
            log.warning("%s is an old PEERSTATE1 checkpoint; from now on checkpoints are written as %s",
                        path, self._path.name)
        else:
            state, meta = read_checkpoint(path, self._numel)
            want = self._meta.get("schema_hash")
            if want and meta.get("schema_hash") not in (None, want):
                raise StateError(f"checkpoint is for another model (schema {meta['schema_hash'][:12]}, "
                                 f"this model's is {want[:12]})")
        state.global_hash  # noqa: B018 (hashed here, off the loop, then cached)
        return state

    def _rotate(self) -> None:
        """.1 -> .2, ...; the oldest generation falls off. ``checkpoint.safetensors`` itself gets a
        second name (.1, a hard link) instead of moving, so that the newest name exists at
        every instant: the new state then replaces it atomically."""
        paths = self.generations()
        for older, newer in zip(reversed(paths[2:]), reversed(paths[1:-1])):
            if newer.exists():
                os.replace(newer, older)
        if paths[0].exists():
            paths[1].unlink(missing_ok=True)
            os.link(paths[0], paths[1])

    def write(self, state: GlobalState) -> bool:
        """Write ``state`` atomically as the newest checkpoint generation, keeping the previous
        ones (executor thread); False on failure."""
        try:
            self._rotate()
            write_checkpoint(self._path, state, self._meta)
            ok = True
        except OSError as exc:
            log.error("checkpoint to %s failed: %s", self._path, exc)
            ok = False
        self._on_checkpoint(ok)
        return ok

    def maybe_checkpoint(self) -> None:
        """Start a background checkpoint when ``checkpoint_interval_s`` passed and none runs (loop)."""
        if self._interval_s <= 0 or time.monotonic() - self._last_checkpoint < self._interval_s:
            return
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        self._last_checkpoint = time.monotonic()
        self._checkpointing = asyncio.get_running_loop().run_in_executor(self._executor, self.write, self._state)

    async def async_checkpoint(self) -> bool:
        """Write the current state now (at stop); waits for a background write first."""
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.write, self._state)
