"""The state store: the current global state, pins on it, its snapshot for donors, and checkpoints.

Loop-side methods (``adopt``, ``begin_step``/``end_step``, ``maybe_checkpoint`` and the
``async_`` ones) run on the event loop; everything that touches the disk or hashes or
serializes a whole state runs on the store's own executor, so that neither a round nor a
joiner ever waits for the other, and the loop never waits for the disk.

Copies, and why (bytes per value, N values). The current state (parameters and outer momentum,
8) is the only copy of the global state this module keeps. The outer step writes the next
round over it, in place, when nothing reads it (``begin_step``): a reader of its bytes beyond
the current moment pins it (``async_pin``): a donor streaming it to a joiner
(``async_serve``), a checkpoint being written. A pinned state is never written over: the step
then builds the next state in fresh tensors (8 more, and their page faults) and the pinned
one lives on, untouched, until its last reader lets go (a slow GetState that spans several
rounds keeps its round's state alive, and each of those rounds steps into fresh tensors). While
an in-place step runs, new pins wait for it (one step, tens of milliseconds) and then get the
new state. So a pinned state's bytes never change, and a reader can never see half of two
rounds.

Alternatives left: stepping into fresh tensors every round (what this replaced: the old and the
new state side by side, 8 more at the peak, and ~25 ms of page faults per 40 MB); ping-pong
between two generations (no page faults, but both kept for good: the same 8 more at every
moment).

A donor serves the pinned state's own memory (``state_parts``: a small prefix, then the
parameters and the momentum as they lie): no serialized copy of the state. The header's digest
covers the prefix and the momentum (the parameters' is the global hash, already known): one read
of the momentum, once per state, cached with the prefix.
A checkpoint is written from the pinned state in the same way (``write_checkpoint``).
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

import torch

from peer.errors import StateError
from peer.sync.state import (
    GlobalState,
    StateSnapshot,
    decode_state,
    read_checkpoint,
    read_legacy_checkpoint,
    parts_header,
    state_parts,
    write_checkpoint,
)
from peer.types import StateHeader

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
LEGACY_CHECKPOINT_FILE = "checkpoint.bin"
"""What versions before safetensors checkpoints wrote (PEERSTATE1): loaded when it fits."""
GENERATIONS = 3
"""Checkpoint generations kept: a newest one that fails its checks falls back to the one before."""


def _where(t: torch.Tensor) -> int:
    """The address of ``t``'s memory (its storage): what a pin protects."""
    return t.untyped_storage().data_ptr()


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
        # (state, its blob's header and prefix): the donors' snapshot of one state, kept
        # until another state is current.
        self._snapshot: tuple[GlobalState, StateHeader, bytes] | None = None
        self._snapshot_lock = threading.Lock()
        # Pins count per memory (a tensor's storage), not per state object: two states could
        # share a tensor. storage address -> (the tensor, which keeps it alive; readers).
        self._pins: dict[int, tuple[torch.Tensor, int]] = {}
        self._pins_lock = threading.Lock()  # pins are taken on the loop, released anywhere
        # While the current state is provisional (a round applied before its leader confirmed
        # it: ``adopt(provisional=True)``), the last settled one, which donors serve instead.
        self._settled: GlobalState | None = None
        self._stepping: GlobalState | None = None  # the state an in-place step may be writing
        self._step_done: asyncio.Future | None = None  # resolved when that step ends
        self._checkpointing: asyncio.Future | None = None
        self._last_checkpoint = time.monotonic()

    @property
    def state(self) -> GlobalState:
        """The last completed round's state. Its tensors stay as they are for the rest of this
        round (see the module docstring); pin it (``async_pin``) to read them beyond that."""
        return self._state

    @property
    def numel(self) -> int:
        return self._numel

    @property
    def checkpoint_path(self) -> Path:
        return self._path

    def adopt(self, state: GlobalState, *, provisional: bool = False) -> None:
        """Make ``state`` current (loop). When it is the result of an in-place step over the
        current state (it holds the same tensors), the old object is retired
        (``GlobalState.retire``). Its snapshot is built lazily, off the round's path.

        ``provisional``: a round applied before its leader confirmed the answers (late
        confirmation, ``peer.sync.driver``), which may yet be rolled back: until ``settle(state)``
        donors go on serving the last settled state (``async_serve``), so that no joiner adopts
        a state its own holder may give up (a joiner takes a donor's state a few rounds past the
        attested one: see ``RoundDriver.resync``). Never an in-place step's result (the state
        it would roll back to must stay intact)."""
        if state.params.numel() != self._numel:
            raise StateError(f"state has {state.params.numel()} parameters; this model has {self._numel}")
        if provisional:
            if self._settled is None:
                self._settled = self._state
        else:
            self._settled = None
        old, self._state = self._state, state
        if old is self._stepping and old is not state and old.params is state.params:
            old.retire()
        # A snapshot of an older state is never served again (streams in flight hold their
        # own pin): let its prefix go.
        if self._snapshot is not None and self._snapshot[0] is not state:
            self._snapshot = None
        self._on_adopt(state)

    def settle(self, state: GlobalState) -> None:
        """The provisional ``state`` was confirmed (loop): donors serve it from now on, if it is
        still the current state."""
        if state is self._state:
            self._settled = None

    # ---------------------------------------------------------------- pins and the outer step

    def pinned(self, state: GlobalState) -> int:
        """How many readers pin ``state``'s memory now (any thread)."""
        with self._pins_lock:
            return sum(self._pins.get(_where(t), (t, 0))[1] for t in (state.params, state.momentum))

    def _pin(self, state: GlobalState) -> Callable[[], None]:
        """Pin ``state``'s tensors (loop, never while an in-place step may write them); return
        their release (idempotent, any thread)."""
        assert state is not self._stepping, "no pin on a state an outer step is writing"
        tensors = (state.params, state.momentum)
        with self._pins_lock:
            for t in tensors:
                _, readers = self._pins.get(_where(t), (t, 0))
                self._pins[_where(t)] = (t, readers + 1)
        released = False

        def release() -> None:
            nonlocal released
            with self._pins_lock:
                if released:
                    return
                released = True
                for t in tensors:
                    _, left = self._pins[_where(t)]
                    if left > 1:
                        self._pins[_where(t)] = (t, left - 1)
                    else:
                        del self._pins[_where(t)]

        return release

    async def async_pin(self) -> tuple[GlobalState, Callable[[], None]]:
        """The current state, pinned: its tensors are not written until ``release()`` (which
        any thread may call, once or more). Waits for an in-place step that is writing the
        current state, then pins the state it made. Loop."""
        while self._stepping is not None:
            assert self._step_done is not None
            await asyncio.shield(self._step_done)
        return self._state, self._pin(self._state)

    def begin_step(self, state: GlobalState) -> bool:
        """Whether the outer step may write the next round over ``state`` (loop): True when it
        is the current state and nobody pins it; then no pin is given on it until ``end_step``
        (``async_pin`` waits). False: the step must build the next state in fresh tensors.
        Every ``begin_step`` is followed by ``end_step``, after the step's ``adopt`` if any."""
        if self._stepping is not None:
            raise StateError("an outer step is already under way")
        if state is not self._state or self.pinned(state):
            return False
        self._stepping = state
        self._step_done = asyncio.get_running_loop().create_future()
        return True

    def end_step(self) -> None:
        """The outer step begun by ``begin_step`` wrote its last value (loop): pins are given
        again, waiting ones first. Call it only once the thread that stepped is done with the
        tensors, not when the awaiting task was cancelled (the thread may still be writing)."""
        done, self._stepping, self._step_done = self._step_done, None, None
        if done is not None and not done.done():
            done.set_result(None)

    # ---------------------------------------------------------------------- donors

    def _snapshot_of(self, state: GlobalState) -> tuple[StateHeader, tuple]:
        """The header and parts of ``state``'s blob; the header (one read of the momentum) is
        computed once per state (any thread but the loop; ``state`` pinned)."""
        parts = state_parts(state)
        with self._snapshot_lock:
            if self._snapshot is not None and self._snapshot[0] is state:
                return self._snapshot[1], (self._snapshot[2], *parts[1:])
            header = parts_header(state, parts)
            self._snapshot = (state, header, parts[0])
            return header, parts

    async def async_serve(self) -> StateSnapshot:
        """The current state as a donor streams it (``StateSnapshot``): pinned until its
        ``release()``, which the caller must call once the stream is over (also when it fails
        or is cancelled). The header is computed on the executor, once per state. While the
        current state is provisional (``adopt``), the last settled one instead."""
        if self._settled is not None:  # (never the state an in-place step writes: not current)
            state, release = self._settled, self._pin(self._settled)
        else:
            state, release = await self.async_pin()
        try:
            header, parts = await asyncio.get_running_loop().run_in_executor(self._executor, self._snapshot_of,
                                                                             state)
        except BaseException:
            release()
            raise
        return StateSnapshot(header, parts, release)

    async def async_snapshot(self) -> tuple[StateHeader, bytes]:
        """The current state's blob as one bytes object (a copy of the whole state: for tests
        and in-process donors, not for serving; see ``async_serve``)."""
        snap = await self.async_serve()
        try:
            return snap.header, await asyncio.get_running_loop().run_in_executor(self._executor, snap.tobytes)
        finally:
            snap.release()

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
        if self._stepping is not None:  # not while the step writes it: the next round's call will
            return
        self._last_checkpoint = time.monotonic()
        state = self._state
        self._checkpointing = asyncio.get_running_loop().run_in_executor(self._executor, self._write_pinned, state,
                                                                         self._pin(state))

    def _write_pinned(self, state: GlobalState, release: Callable[[], None]) -> bool:
        """``write`` of a pinned state, unpinned once written (on the executor thread itself, so
        that a cancelled waiter cannot unpin it while it is still being read)."""
        try:
            return self.write(state)
        finally:
            release()

    async def async_checkpoint(self) -> bool:
        """Write the current state now (at stop); waits for a background write first."""
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        state, release = await self.async_pin()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._write_pinned, state, release)
