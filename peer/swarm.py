"""Library mode: the daemon inside the user's own process, driven by the user's own loop.

    with peer.Swarm(model, run_id="lab1", credentials="lab1-keys", inner_steps=500) as swarm:
        for batch in loader:
            loss = compute(model, batch); loss.backward(); opt.step(); opt.zero_grad()
            swarm.step()   # every H calls: one round; the model then holds the new global parameters

A ``Swarm`` is a whole peer (``peer.daemon.Daemon``: discovery, gRPC server, membership, rounds,
metrics, checkpoints) on a thread of its own with its own event loop (uvloop when available).
It speaks the same wire under the same rules as ``peer run``, so both kinds of peer train one
model together when their models have the same schema. Only the inner phase differs: the user's
thread trains, and ``step()`` hands the model over at the H-th call (``peer.trainer.external``).

Threads: ``step`` belongs to the one thread that trains the model; ``close`` may be called from
any thread, any number of times. No signal handlers are installed (Python allows them only in
the main thread, and the process is the user's): a KeyboardInterrupt leaving the ``with`` block
closes the swarm, and so does a normal interpreter exit; a SIGTERM whose default action kills
the process does not (install a handler that raises SystemExit, or calls ``close``).
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from peer.config import load_config
from peer.daemon import Daemon
from peer.errors import ConfigError
from peer.trainer.external import ExternalInner, SwarmStopped
from peer.trainer.task import Task, load_task

__all__ = ["Swarm", "SwarmStopped"]

log = logging.getLogger(__name__)

# Settings of `peer run` that belong to the user's loop in library mode: they own the data, the
# inner optimizer, the device and the process's torch threads, and decide when to stop.
NOT_IN_LIBRARY = {
    "data": "your loop reads its own data",
    "batch_size": "your loop picks its batches (pass samples= to step() so that rounds weigh them)",
    "inner_lr": "your loop owns its inner optimizer",
    "device": "your model is on the device you put it on",
    "threads": "call torch.set_num_threads in your process",
    "rounds": "stop your loop and close the swarm instead",
}


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:  # pragma: no cover (uvloop is a dependency; not on every platform)
        return asyncio.new_event_loop


def _join_grpc_poller(before: set[int | None], timeout_s: float) -> None:
    """Wait for gRPC's asyncio poller thread to end, if it started after ``before`` (the idents of
    the threads alive then). Freeing gRPC's last channel and server shuts the poller down, but the
    shutdown returns once the thread has flagged its end, not once it has ended: on a busy machine
    the thread still runs for a moment (it needs the GIL to finish), and a closed swarm is to
    leave no thread behind. Its name is gRPC's: ``Thread-N (_poll_wrapper)``, ``grpc-aio-poller``
    in later releases."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.ident not in before and ("_poll_wrapper" in thread.name or thread.name == "grpc-aio-poller"):
            thread.join(max(0.0, deadline - time.monotonic()))


def _close_at_exit(ref: weakref.ref[Swarm]) -> None:
    swarm = ref()
    if swarm is not None:
        swarm.close()


class Swarm:
    """This process as a peer of run ``run_id``, trained by the caller's loop.

    ``model``: the user's ``torch.nn.Module`` (on any device), trained in place. Every peer of
    the run must have the same parameter names, shapes and dtypes (the schema hash is checked in
    the handshake), and at round 0 the same initial values (same init seed; differing round-0
    states are not averaged together, the resync rule picks one); and every peer must use the same ``outer_lr`` and
    ``outer_momentum`` (not on the wire).

    ``credentials``: the run's credentials directory (``peer keys new``), or ``insecure=True``.
    ``inner_steps``: H, the ``step()`` calls per round (default 500, as in DiLoCo). Further
    keyword arguments are the settings of ``peer run`` by their flat names (``listen``,
    ``peers``, ``codec``, ``outer_lr``, ``overlap``, ``state_dir``, ``metrics_port``, ...), with
    the same precedence over a TOML ``config`` file and ``PEER_*`` variables. The settings in
    ``NOT_IN_LIBRARY`` are refused with the reason. ``task``: a peer ``Task`` (or a task name)
    whose ``evaluate`` scores the global parameters after rounds, as ``peer run`` does; without
    one, evaluation is the caller's business. ``registry``: where the metrics live (default: a
    registry of this swarm, served on ``metrics_port`` as with ``peer run``).

    The constructor starts the peer and blocks until the model holds the swarm's current global
    parameters: those of a donor when the run is ahead of this peer's checkpoint (or round 0),
    else its own, after the start-up grace for finding peers. Raises ``ConfigError`` for bad
    settings and ``SwarmStopped`` if that takes longer than ``join_timeout_s`` or the peer
    cannot start (the message says why).
    """

    def __init__(self, model: torch.nn.Module, *, run_id: str | None = None,
                 credentials: str | os.PathLike[str] | None = None, inner_steps: int | None = None,
                 task: Task | str | None = None, config: str | os.PathLike[str] | None = None,
                 join_timeout_s: float = 300.0, registry: CollectorRegistry | None = None, **settings: Any) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        refused = sorted(name for name, value in settings.items() if name in NOT_IN_LIBRARY and value is not None)
        if refused:
            raise ConfigError("not a setting of a peer.Swarm: " + "; ".join(
                f"{name} ({NOT_IN_LIBRARY[name]})" for name in refused))
        if not join_timeout_s > 0:
            raise ConfigError(f"join_timeout_s must be > 0, got {join_timeout_s}")
        given = {"run_id": run_id, "credentials": credentials, "inner_steps": inner_steps, **settings}
        cli = {name: os.fspath(value) if isinstance(value, os.PathLike) else value
               for name, value in given.items() if value is not None}
        cfg = load_config(cli, config_file=os.fspath(config) if config is not None else None)
        eval_task = load_task(task) if isinstance(task, str) else task
        if eval_task is not None and not isinstance(eval_task, Task):
            raise TypeError(f"task must be a peer Task or a task name, got {type(eval_task).__name__}")
        # The task name is what others see of this peer (`peer status`, peer_info); rounds are
        # the caller's to end.
        label = eval_task.name if eval_task is not None else "own-loop"
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, task=label, rounds=0))
        # The threads alive before this swarm: gRPC's poller among them is not this swarm's to wait for.
        self._threads_before = {t.ident for t in threading.enumerate()}
        daemon = Daemon(cfg, registry, model=model, eval_task=eval_task)
        assert daemon.external is not None
        self._inner: ExternalInner = daemon.external
        self._cfg = cfg
        self._peer_id = daemon.peer_id
        # What the properties show once the daemon is released (close): its last values.
        self._round, self._global_hash, self._address, self._metrics_port = 0, "", "", 0
        self._completed = 0
        self._lock = threading.Lock()
        self._daemon: Daemon | None = daemon
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = False
        self._closed = False
        self._status: int | None = None
        self._thread = threading.Thread(target=self._serve, name=f"peer-swarm-{cfg.run.run_id}", daemon=True)
        # Before the executors of concurrent.futures refuse work at interpreter exit (plain
        # atexit runs after that), so that leaving still checkpoints and says goodbye.
        # threading._register_atexit is what concurrent.futures itself uses for this.
        register = getattr(threading, "_register_atexit", None)
        try:
            if register is None:
                raise RuntimeError("no threading._register_atexit")
            register(_close_at_exit, weakref.ref(self))
        except RuntimeError:
            atexit.register(_close_at_exit, weakref.ref(self))
        self._thread.start()
        try:
            self._inner.wait_phase(join_timeout_s)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- the user's thread

    def step(self, samples: int = 1, loss: float | torch.Tensor | None = None) -> bool:
        """Count one optimizer step of the caller's loop; call it after ``optimizer.step()``.

        ``samples``: how many samples (sequences) that step trained on; the rounds weigh each
        peer's delta by its samples, so pass the batch size when peers differ. ``loss``: the
        step's loss, for the ``peer_train_loss`` metric and the round log line (a tensor is read
        with ``.item()``; a NaN/Inf loss withholds this phase's delta, as in ``peer run``).

        Every H-th call runs one round and returns True: the model then holds the new global
        parameters (with ``overlap`` on: the global parameters of the round before, plus this
        peer's progress since). It blocks for the round (or, with overlap, at most for the end
        of the previous round); other calls return False at once. Only the thread that trains
        the model may call it. Raises ``ValueError`` for bad arguments and ``SwarmStopped``
        once the swarm is closed or its daemon failed.
        """
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"samples must be an integer >= 0, got {samples!r}")
        value: float | None
        if loss is None:
            value = None
        elif isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
            value = float(loss.detach().item())
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            value = float(loss)
        else:
            raise ValueError(f"loss must be a number or a scalar tensor, got {type(loss).__name__}")
        return self._inner.step(samples, value)

    @property
    def inner_steps(self) -> int:
        """H: ``step()`` calls per round."""
        return self._inner.steps

    @property
    def round(self) -> int:
        """The global round this peer holds (the rounds completed by the swarm it follows)."""
        daemon = self._daemon
        return daemon.state.round if daemon is not None else self._round

    @property
    def completed_rounds(self) -> int:
        """Rounds this peer completed in a group since it started (a resync that skips rounds
        moves ``round`` but does not count here)."""
        daemon = self._daemon
        return daemon.driver.progress.completed if daemon is not None else self._completed

    @property
    def global_hash(self) -> str:
        """The digest (BLAKE3) of the global parameters this peer holds (``global_hash`` of ``peer status``)."""
        daemon = self._daemon
        return daemon.state.global_hash if daemon is not None else self._global_hash

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def address(self) -> str:
        """Where this peer's gRPC server is reached (``host:port``)."""
        daemon = self._daemon
        return daemon.address if daemon is not None else self._address

    @property
    def metrics_port(self) -> int:
        daemon = self._daemon
        return daemon.metrics_port if daemon is not None else self._metrics_port

    # ----------------------------------------------------------------- lifecycle

    def close(self, timeout_s: float | None = None) -> None:
        """Leave the run as ``peer run`` does on SIGTERM (finish a round in flight within its
        grace, tell the peers, checkpoint, mDNS goodbye) and wait for the daemon's threads to
        end (default: ``stop_grace_s`` + 5 s; gRPC's poller thread, when this swarm started it,
        up to 1 s more). Idempotent; any thread. Also runs at interpreter
        exit, when the main thread has ended (a loop on another thread: close the swarm there)."""
        with self._lock:
            first = not self._closed
            self._closed = True
            self._stop_requested = True
            loop = self._loop
            daemon = self._daemon
        if daemon is None:
            return  # closed and released before
        if first and loop is not None:
            try:
                loop.call_soon_threadsafe(daemon.request_stop)
            except RuntimeError:
                pass  # the loop already ended
        if threading.current_thread() is self._thread:
            return  # called from the daemon's own thread: it ends when this returns
        wait_s = self._cfg.timeouts.stop_grace_s + 5.0 if timeout_s is None else timeout_s
        if self._thread.is_alive():
            self._thread.join(wait_s)
        if self._thread.is_alive():
            log.warning("the swarm's thread did not end within %.1f s", wait_s)
            return
        # Stopping shut the executors down without waiting (on the loop); here their threads
        # are joined, so that a closed swarm leaves no thread behind.
        for pool in daemon.pools:
            pool.shutdown(wait=True)
        with self._lock:
            if self._daemon is None:
                return
            self._address, self._metrics_port = daemon.address, daemon.metrics_port
            self._round, self._global_hash = daemon.state.round, daemon.state.global_hash
            self._completed = daemon.driver.progress.completed
            self._daemon = None
        # gRPC's asyncio poller thread lives while any of its servers or channels does; the
        # daemon's parts reference each other (callbacks), so only a collection frees them.
        del daemon
        gc.collect()
        _join_grpc_poller(self._threads_before, timeout_s=1.0)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- the daemon's thread

    def _serve(self) -> None:
        reason = "the swarm was closed"
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                self._status = runner.run(self._main())
            if self._status:
                reason = "the swarm's daemon stopped after an error (see the log of logger 'peer')"
        except BaseException as exc:  # noqa: BLE001 (handed to the user's thread, which raises it)
            log.error("the swarm's daemon failed: %r", exc, exc_info=exc)
            reason = f"the swarm's daemon failed: {exc}"
        finally:
            with self._lock:
                self._loop = None  # closed; it still references what ran on it
            self._inner.close(reason)

    async def _main(self) -> int:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            stop = self._stop_requested
        if stop and self._daemon is not None:
            self._daemon.request_stop()
        daemon = self._daemon
        assert daemon is not None
        return await daemon.run()
