"""One peer over several local ranks: a data-parallel inner phase with ``torch.distributed``.

``peer run --local-workers N`` makes the daemon process rank 0 and starts ranks 1..N-1 as
child processes (``python -m peer.trainer.workers SPEC``) on this machine. They meet through a
``TCPStore`` that rank 0 hosts on 127.0.0.1 (a free port) and form one process group: gloo on
CPU, NCCL when every rank has its own CUDA device (rank r on ``cuda:r``). The swarm sees one
member per machine; only rank 0 talks to it.

One inner phase, as every rank runs it (``DataParallelTrainer.run_inner``):

1. rank 0 posts ``train <steps> <first step>`` under the key ``phase/<seq>`` of the store
   (workers wait for it there, not in a collective, so a long round in between trips no
   collective timeout; the first step is the phase's place in the inner learning-rate schedule);
2. rank 0 broadcasts the global parameters; every rank loads them;
3. every step, each rank computes its loss and gradients on its own batch (rank r reads the
   data stream ``<peer stream>/rank<r>``; rank 0 keeps the peer's own stream, so a one-rank peer
   trains exactly as before), and one ``all_reduce`` (sum) of a flat buffer averages the
   gradients weighted by samples and carries a few control slots: the loss, a non-finite flag,
   rank 0's stop flag and each rank's samples. Every rank then takes the same optimizer step
   (the learning rate of the schedule at that step; with ``precision`` bf16 each rank's forward
   pass and loss run under autocast, the averaged gradients and the step in float32), so their
   parameters stay identical; a stop or a non-finite loss ends the phase on all ranks
   at the same step;
4. rank 0 returns the ``InnerResult`` of the machine: the delta of its (shared) parameters and
   the samples of all ranks, which become the peer's weight in the round.

Failures: a rank that dies is noticed by rank 0's watch (``LocalRanks``, every 0.2 s) or by a
collective that fails; the peer then stops with a clear log line and exits non-zero, and the
swarm goes on without it. A worker exits when rank 0 says ``stop``, when its parent process is
gone, or when a collective fails; it ignores SIGINT and SIGTERM (a Ctrl-C in a terminal reaches
the whole process group: rank 0 decides when the ranks stop).

Under ``torchrun`` (``torchrun --nproc-per-node N --no-python peer run ...``, one machine) the
launcher starts the ranks instead: rank 0 runs the daemon, ranks 1..N-1 run ``torchrun_worker``.
They meet through the launcher's store (under the prefix ``peer/``); rank 0 posts each worker's
spec there and each worker its pid. Rank 0 cannot watch processes it did not start: a dead
rank shows as a failing collective (rank 0 then exits 1), and torchrun ends the other ranks and
exits non-zero.

Not here: buffers such as BatchNorm statistics are rank 0's own (the flat parameters are what
the ranks share).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from peer.errors import ConfigError, PeerError
from peer.trainer.loop import InnerResult, InnerTrainer, resolve_device
from peer.trainer.params import assign_flat_state, flat_on_device
from peer.trainer.schedule import LRSchedule
from peer.trainer.task import Task, load_task
from peer.types import LocalRank

__all__ = ["DataParallelTrainer", "LocalRankError", "LocalRanks", "RankSpec", "Torchrun", "rank_device",
           "rank_stream_id", "torchrun_worker"]

log = logging.getLogger(__name__)

# Control slots after the gradients in the per-step all_reduce buffer.
_LOSS, _NONFINITE, _STOP = 0, 1, 2
_CONTROL = 3  # then one samples slot per rank
# How often a worker waiting for the next phase looks for it (and whether its parent is still
# there). A non-blocking check: a blocking store.wait logs two warnings at every timeout.
_WAIT_POLL_S = 0.02


class LocalRankError(PeerError):
    """A local rank died, or a collective between the ranks failed."""


def rank_stream_id(stream_id: str, rank: int) -> str:
    """Rank 0 reads the peer's own stream; rank r > 0 reads ``<stream>/rank<r>``."""
    return stream_id if rank == 0 else f"{stream_id}/rank{rank}"


def rank_device(device: str, rank: int, world: int) -> str:
    """The device of ``rank`` of ``world`` local ranks for the configured ``device``.

    One rank keeps ``device`` as it is. Several ranks: ``cpu`` for all (gloo), or rank r on
    ``cuda:r`` when ``device`` is ``auto``/``cuda`` and CUDA shows at least ``world`` devices
    (NCCL). Raises ``ConfigError`` for ``cuda:N`` with several ranks (which rank gets which
    device would be a guess) or too few CUDA devices.
    """
    if world == 1:
        return device
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if device in ("auto", "cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < world:
            raise ConfigError(f"local_workers {world} needs {world} CUDA devices, {count} found "
                              "(or pass --device cpu)")
        return f"cuda:{rank}"
    raise ConfigError(f"device {device!r} with local_workers {world}: give 'auto', 'cuda' (rank r on cuda:r) "
                      "or 'cpu'")


@dataclass(frozen=True)
class RankSpec:
    """What one rank needs; a worker gets it as JSON on its command line (local, no pickle)."""

    task: str
    data: str | None
    seed: int
    stream_id: str  # the peer's stream; the rank's own is derived by rank_stream_id
    device: str  # the configured device; the rank's own is derived by rank_device
    threads: int
    batch_size: int
    inner_lr: float
    rank: int
    world: int
    store_port: int
    timeout_s: float
    parent_pid: int
    precision: str = "fp32"  # as InnerTrainer's
    inner_lr_schedule: str = "constant"  # LRSchedule's kind, warm-up and total steps
    warmup_steps: int = 0
    total_steps: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RankSpec:
        try:
            raw = json.loads(text)
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad local rank spec: {exc}") from None


@dataclass(frozen=True)
class Torchrun:
    """This process is one rank of a ``torchrun`` launch on one machine (read from its env)."""

    rank: int
    world: int
    master_addr: str
    master_port: int
    agent_store: bool  # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Torchrun | None:
        """None unless ``env`` is a torchrun rank's with ``WORLD_SIZE`` > 1. Raises
        ``ConfigError`` for malformed values or ranks over several machines (one peer is one
        machine: use ``--nnodes 1``)."""
        if "WORLD_SIZE" not in env or "RANK" not in env:
            return None
        try:
            world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
            port = int(env["MASTER_PORT"])
            addr = env["MASTER_ADDR"]
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"torchrun environment is incomplete or malformed: {exc}") from None
        if world <= 1:
            return None
        if local_world != world:
            raise ConfigError(f"one peer spans one machine: torchrun gave {world} ranks over several machines "
                              f"({local_world} here); run one torchrun per machine with --nnodes 1")
        if not 0 <= rank < world:
            raise ConfigError(f"torchrun RANK {rank} is outside WORLD_SIZE {world}")
        return cls(rank, world, addr, port, env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true")

    def store(self, timeout_s: float) -> dist.Store:
        """The launcher's store, under the prefix ``peer/`` (rank 0 hosts it if the agent does not)."""
        base = dist.TCPStore(self.master_addr, self.master_port, self.world,
                             is_master=self.rank == 0 and not self.agent_store,
                             timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        return dist.PrefixStore("peer/", base)


class DataParallelTrainer(InnerTrainer):
    """``InnerTrainer`` whose inner phase is data-parallel over a process group (see the module).

    Every rank calls ``run_inner`` once per phase, in the same order; rank 0 gives the global
    parameters, ``should_stop`` and the first step, the others pass ``None``. ``store`` is the
    group's store (rank 0 posts the phases in it); ``task`` saves loading ``spec.task`` again.
    Not thread safe; one thread per process calls it.
    """

    def __init__(self, spec: RankSpec, store: dist.Store, task: Task | None = None) -> None:
        super().__init__(task or load_task(spec.task, spec.data), seed=spec.seed,
                         stream_id=rank_stream_id(spec.stream_id, spec.rank),
                         device=rank_device(spec.device, spec.rank, spec.world), threads=spec.threads,
                         batch_size=spec.batch_size, inner_lr=spec.inner_lr, precision=spec.precision,
                         schedule=LRSchedule(spec.inner_lr_schedule, spec.warmup_steps, spec.total_steps))
        self.rank = spec.rank
        self.world = spec.world
        self._store = store
        self._seq = 0
        self._params = list(self._model.parameters())
        self.rank_samples = [0] * spec.world  # samples per rank, over every phase so far

    # ------------------------------------------------------------ phases (rank 0 posts, workers wait)

    def post(self, command: str) -> None:
        """Rank 0: announce the next phase (``train <steps> <first step>`` or ``stop``) to the workers."""
        self._store.set(f"phase/{self._seq}", command)
        if self._seq:
            self._store.delete_key(f"phase/{self._seq - 1}")  # every worker read it: it ran that phase

    def wait_command(self, parent_pid: int) -> tuple[str, int, int]:
        """A worker: block until rank 0 posts the next phase; ``("train", steps, first_step)`` or
        ``("stop", 0, 0)``.

        Raises ``LocalRankError`` when the parent (rank 0) is gone or the store fails.
        """
        key = f"phase/{self._seq}"
        while True:
            if os.getppid() != parent_pid:
                raise LocalRankError(f"rank {self.rank}: the parent process (pid {parent_pid}) is gone")
            try:
                if self._store.check([key]):
                    break
            except dist.DistError as exc:
                raise LocalRankError(f"rank {self.rank}: the store of the local ranks failed: {exc}") from exc
            time.sleep(_WAIT_POLL_S)
        text = self._store.get(key).decode("ascii", "replace")
        match text.split():
            case ["stop"]:
                return "stop", 0, 0
            case ["train", steps, first] if steps.isdigit() and first.isdigit():
                return "train", int(steps), int(first)
        raise LocalRankError(f"rank {self.rank}: unknown command {text!r} from rank 0")

    # ------------------------------------------------------------ the data-parallel inner phase

    def run_inner(
        self,
        global_params: torch.Tensor | None,
        steps: int,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
        first_step: int = 0,
    ) -> InnerResult:
        """One phase on every rank (see the module docstring). Rank 0 posts the phase first;
        step ``i`` is global inner step ``first_step + i`` of the learning-rate schedule (rank
        0's, posted to the workers with the phase).

        Returns this rank's view: on rank 0 the machine's result (``samples`` summed over ranks).
        Raises ``LocalRankError`` when a collective fails (a rank died, or the timeout passed).
        """
        if steps < 0 or first_step < 0:
            raise ValueError(f"steps and first_step must be >= 0, got {steps}, {first_step}")
        if self.rank == 0:
            if global_params is None:
                raise ValueError("rank 0 must give the global parameters")
            self._check_flat(global_params)
            self.post(f"train {steps} {first_step}")
        self._seq += 1
        try:
            return self._phase(global_params, steps, should_stop, on_step, first_step)
        except (RuntimeError, dist.DistError) as exc:
            raise LocalRankError(f"rank {self.rank}: a collective of the local ranks failed: {exc}") from exc

    def _phase(self, global_params, steps, should_stop, on_step, first_step) -> InnerResult:
        start = time.perf_counter()
        dev = self._device
        # A copy on rank 0: the global parameters are never written, whatever the backend does.
        flat = (global_params.detach().to(device=dev, dtype=torch.float32, copy=True) if self.rank == 0
                else torch.empty(self._numel, dtype=torch.float32, device=dev))
        dist.broadcast(flat, src=0)
        assign_flat_state(self._model, flat)
        self._model.train()
        sizes = [p.numel() for p in self._params]
        pn = self._layout.param_numel  # the flat state is parameters, then buffers (rank 0's)
        buf = torch.empty(pn + _CONTROL + self.world, dtype=torch.float32, device=dev)
        grads, control = buf[:pn], buf[pn:]
        done = samples = 0
        loss_sum = 0.0
        lr = taken_lr = math.nan
        nonfinite = False
        for i in range(steps):
            stop = self.rank == 0 and should_stop is not None and should_stop()
            # Every rank computes the same rate from the same step: their steps stay identical.
            lr = float(self._task.inner_lr(first_step + i, self._inner_lr, self._schedule))
            for group in self._optimizer.param_groups:
                group["lr"] = lr
            x, y = next(self._batches)
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            n = int(x.shape[0])
            self._optimizer.zero_grad(set_to_none=True)
            control.zero_()
            grads.zero_()
            if not stop:
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self._autocast):
                    loss = self._task.loss(self._model, (x, y))
                loss = loss.float()
                value = loss.item()
                if math.isfinite(value):
                    loss.backward()
                    offset = 0
                    for p, size in zip(self._params, sizes):
                        if p.grad is not None:
                            # Weighted by samples: the sum over ranks divided by all samples is
                            # the gradient of the mean loss over every rank's batch.
                            grads[offset: offset + size].copy_(p.grad.reshape(-1)).mul_(n)
                        offset += size
                    control[_LOSS] = value * n
                    control[_CONTROL + self.rank] = n
                else:
                    control[_NONFINITE] = 1
            else:
                control[_STOP] = 1
            dist.all_reduce(buf)
            ctl = control.tolist()
            if ctl[_STOP] > 0:
                break
            if ctl[_NONFINITE] > 0:
                nonfinite = True
                break
            total = sum(ctl[_CONTROL:])
            grads.div_(total)
            offset = 0
            for p, size in zip(self._params, sizes):
                g = grads[offset: offset + size].view_as(p)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
                offset += size
            self._optimizer.step()
            done += 1
            taken_lr = lr
            step_samples = [int(v) for v in ctl[_CONTROL:]]
            # A new list, swapped in: a status read on another thread sees every rank's count
            # of the same step (it read rank 0 ahead of rank 1 when they were added one by one).
            self.rank_samples = [a + s for a, s in zip(self.rank_samples, step_samples)]
            samples += sum(step_samples)
            step_loss = ctl[_LOSS] / total
            loss_sum += step_loss
            if on_step is not None:
                on_step(i, step_loss)
        delta = flat - flat_on_device(self._model)  # on the device, as InnerTrainer's
        for start_, stop in self._layout.int_slices:
            delta[start_:stop] = 0  # integer buffers keep the global value, as InnerTrainer's
        if not nonfinite and not bool(torch.isfinite(delta).all()):
            nonfinite = True
        if nonfinite:
            # Every rank saw the same flag (or the same delta): they reset together.
            log.warning("rank %d: inner phase non-finite after %d steps; resetting inner optimizer", self.rank, done)
            self._optimizer = self._task.make_inner_optimizer(self._model.parameters(), self._inner_lr)
        return InnerResult(delta=delta, samples=samples, mean_loss=loss_sum / done if done else float("nan"),
                           steps=done, seconds=time.perf_counter() - start, nonfinite=nonfinite, lr=taken_lr)


# ---------------------------------------------------------------------------------------------- rank 0


def _group_init(spec: RankSpec, store: dist.Store) -> None:
    backend = "nccl" if rank_device(spec.device, spec.rank, spec.world).startswith("cuda") else "gloo"
    dist.init_process_group(backend, store=store, rank=spec.rank, world_size=spec.world,
                            timeout=timedelta(seconds=spec.timeout_s))


class LocalRanks:
    """Rank 0's side: starts the workers, forms the group, runs the machine's inner phases.

    The inner phase object the round driver gets (``run``/``evaluate``, like ``ThreadedInner``).
    Every call into torch runs on ``executor`` (one thread). ``start`` and ``close`` are
    loop-only coroutines; ``on_failure(message)`` is called on the loop, once, when a worker
    dies while the peer is not stopping (the daemon stops and exits non-zero);
    ``torchrun``: the ranks were started by torchrun (nothing is spawned here);
    ``on_samples(per_rank)`` is called on the loop after every phase with each rank's samples
    of that phase.
    """

    def __init__(self, spec: RankSpec, executor: Executor, steps: int,
                 on_step: Callable[[int, float], None] | None = None,
                 on_failure: Callable[[str], None] | None = None,
                 on_samples: Callable[[list[int]], None] | None = None, task: Task | None = None,
                 torchrun: Torchrun | None = None) -> None:
        if spec.rank != 0 or spec.world < 2:
            raise ConfigError(f"LocalRanks is rank 0 of 2 or more ranks, got rank {spec.rank} of {spec.world}")
        if spec.timeout_s <= 0:
            raise ConfigError("the local ranks' timeout must be > 0")
        rank_device(spec.device, 0, spec.world)  # a bad device fails here, before anything starts
        self._executor = executor
        self._steps = steps
        self._on_step = on_step
        self._on_failure = on_failure
        self._on_samples = on_samples
        self._timeout_s = spec.timeout_s
        self._torchrun = torchrun
        if torchrun is not None:
            if torchrun.rank != 0 or torchrun.world != spec.world:
                raise ConfigError(f"torchrun rank {torchrun.rank} of {torchrun.world} cannot lead {spec.world} ranks")
            self._store = torchrun.store(spec.timeout_s)
            port = torchrun.master_port
        else:
            # The store first: its port goes into every worker's spec.
            self._store = dist.TCPStore("127.0.0.1", 0, spec.world, is_master=True,
                                        timeout=timedelta(seconds=spec.timeout_s), wait_for_workers=False)
            port = self._store.port
        self.spec = RankSpec(**{**asdict(spec), "store_port": port, "parent_pid": os.getpid()})
        self.trainer = DataParallelTrainer(self.spec, self._store, task)
        self._procs: list[subprocess.Popen] = []
        self._pids = [os.getpid()] + [0] * (spec.world - 1)
        self._devices = [rank_device(spec.device, r, spec.world) for r in range(spec.world)]
        self._closing = False
        self._failed = False
        self._watch: asyncio.Task | None = None
        self._group = False

    @property
    def world(self) -> int:
        return self.spec.world

    def ranks(self) -> tuple[LocalRank, ...]:
        """Every local rank, rank 0 first (any thread)."""
        samples = self.trainer.rank_samples  # one snapshot for every rank
        out = [LocalRank(0, os.getpid(), str(self.trainer.device), True, samples[0])]
        for r in range(1, self.world):
            # A torchrun rank's liveness is only known by the collectives: alive until one fails.
            alive = self._procs[r - 1].poll() is None if self._procs else not self._failed
            out.append(LocalRank(r, self._pids[r], self._devices[r], alive, samples[r]))
        return tuple(out)

    async def start(self) -> None:
        """Start ranks 1..N-1 and form the process group (bounded by the timeout).

        Raises ``LocalRankError`` when a worker exits or the group does not form in time.
        """
        env = {**os.environ, "OMP_NUM_THREADS": str(self.spec.threads), "PYTHONUNBUFFERED": "1"}
        specs = [RankSpec(**{**asdict(self.spec), "rank": r}) for r in range(1, self.world)]
        for spec in specs if self._torchrun is None else ():
            r = spec.rank
            proc = subprocess.Popen([sys.executable, "-m", "peer.trainer.workers", spec.to_json()], env=env,
                                    stdin=subprocess.DEVNULL)
            self._procs.append(proc)
            self._pids[r] = proc.pid
            log.info("local rank %d started: pid %d, device %s, data stream %s", r, proc.pid, self._devices[r],
                     rank_stream_id(self.spec.stream_id, r))
        loop = asyncio.get_running_loop()
        init: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if not init.done():
                init.set_result(None) if exc is None else init.set_exception(exc)

        def form() -> None:
            # Store calls block: on this thread, not the loop.
            try:
                if self._torchrun is not None:
                    for spec in specs:
                        self._store.set(f"spec/{spec.rank}", spec.to_json())  # the worker waits for it
                _group_init(self.spec, self._store)
                if self._torchrun is not None:
                    # Every worker posted its pid before it joined the group, which just formed.
                    for spec in specs:
                        self._pids[spec.rank] = int(self._store.get(f"pid/{spec.rank}"))
                error = None
            except BaseException as exc:  # handed to the loop, which raises it
                error = exc
            try:
                loop.call_soon_threadsafe(settle, error)
            except RuntimeError:
                pass  # the loop is closed: start() already failed and nobody waits

        # A daemon thread, not the executor: when a worker dies before the ranks meet, this
        # waits for it until the timeout, and must not keep the process from exiting meanwhile.
        threading.Thread(target=form, name="local-ranks-init", daemon=True).start()
        while not init.done():
            await asyncio.wait({init}, timeout=0.2)
            dead = self._dead()
            if dead and not init.done():
                # The group can no longer form; init_process_group gives up at its timeout.
                raise LocalRankError(f"{self._describe(dead)} before the ranks met")
        init.result()
        self._group = True
        if self._torchrun is not None:
            for r in range(1, self.world):
                log.info("local rank %d (torchrun): pid %d, device %s, data stream %s", r, self._pids[r],
                         self._devices[r], rank_stream_id(self.spec.stream_id, r))
        log.info("%d local ranks formed a %s group", self.world, dist.get_backend())
        self._watch = asyncio.create_task(self._watch_ranks(), name="local-ranks")

    def _dead(self) -> tuple[int, int] | None:
        for r, proc in enumerate(self._procs, start=1):
            code = proc.poll()
            if code is not None:
                return r, code
        return None

    def _describe(self, dead: tuple[int, int]) -> str:
        rank, code = dead
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        return f"local rank {rank} (pid {self._procs[rank - 1].pid}) {how}"

    async def _watch_ranks(self) -> None:
        while not self._closing:
            dead = self._dead()
            if dead is not None:
                self._failed = True
                message = self._describe(dead)
                log.error("%s; this peer stops", message)
                if self._on_failure is not None:
                    self._on_failure(message)
                return
            await asyncio.sleep(0.2)

    async def run(self, rnd: int, start: torch.Tensor, should_stop: Callable[[], bool]) -> InnerResult:
        if (dead := self._dead()) is not None:
            self._failed = True
            raise LocalRankError(f"{self._describe(dead)}; not starting the inner phase of round {rnd}")
        if self._failed:
            raise LocalRankError(f"a local rank is gone; not starting the inner phase of round {rnd}")
        before = list(self.trainer.rank_samples)
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: self.trainer.run_inner(start, self._steps, should_stop=should_stop,
                                                               on_step=self._on_step,
                                                               first_step=rnd * self._steps))
        except LocalRankError as exc:
            # A collective fails as soon as a rank's sockets close; name the rank if it died.
            deadline = time.monotonic() + 1.0
            while (dead := self._dead()) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self._failed = True
            if dead is None:
                raise
            raise LocalRankError(f"{self._describe(dead)} during the inner phase of round {rnd}") from exc
        if self._on_samples is not None:
            self._on_samples([now - then for now, then in zip(self.trainer.rank_samples, before)])
        return result

    async def evaluate(self, params: torch.Tensor) -> dict[str, float]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.trainer.evaluate, params)

    async def close(self, grace_s: float = 3.0) -> None:
        """Tell the workers to stop (after the phase in flight), then end them (bounded)."""
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        loop = asyncio.get_running_loop()
        if self._group:
            stop = loop.run_in_executor(self._executor, self._stop_group)
            try:
                await asyncio.wait_for(asyncio.shield(stop), grace_s)
            except (TimeoutError, LocalRankError, RuntimeError) as exc:
                log.warning("local ranks did not stop in order (%r); ending them", exc)
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in self._procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            while proc.poll() is None:
                await asyncio.sleep(0.02)
        if self._procs:
            log.info("local ranks stopped: %s", ", ".join(f"rank {r} exit {p.returncode}"
                                                          for r, p in enumerate(self._procs, start=1)))

    def _stop_group(self) -> None:
        # On the trainer thread, after any phase in flight: the workers wait for a command.
        if not self._dead():
            self.trainer.post("stop")
        dist.destroy_process_group()  # local clean-up, no collective
        self._group = False


# ---------------------------------------------------------------------------------------------- a worker


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent dies (a worker still meeting the others
    would otherwise wait for a dead rank 0 until the timeout). Elsewhere the phase wait's
    parent check and failing collectives end it."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise LocalRankError(f"the parent process (pid {parent_pid}) is gone")


def _serve(spec: RankSpec, store: dist.Store, parent_pid: int) -> None:
    """Join the group, then run phases until rank 0 says stop."""
    torch.set_num_threads(spec.threads)
    trainer = DataParallelTrainer(spec, store)
    _group_init(spec, store)
    while True:
        command, steps, first_step = trainer.wait_command(parent_pid)
        if command == "stop":
            break
        trainer.run_inner(None, steps, first_step=first_step)
    dist.destroy_process_group()


def _worker_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s rank {rank}: %(message)s")


def worker_main(spec_json: str) -> int:
    """A rank 1..N-1 that rank 0 started: the process's exit status."""
    spec = RankSpec.from_json(spec_json)
    _worker_logging(spec.rank)
    # Rank 0 decides when the ranks stop (a Ctrl-C reaches the whole process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _die_with_parent(spec.parent_pid)
        store = dist.TCPStore("127.0.0.1", spec.store_port, spec.world, is_master=False,
                              timeout=timedelta(seconds=spec.timeout_s))
        _serve(spec, store, spec.parent_pid)
        return 0
    except (PeerError, RuntimeError, dist.DistError) as exc:
        log.error("local rank %d stops: %s", spec.rank, exc)
        return 1


def torchrun_worker(torchrun: Torchrun, timeout_s: float) -> int:
    """A rank 1..N-1 that torchrun started: wait for rank 0's spec, then serve; the exit status.

    SIGINT and SIGTERM (torchrun forwards both to every rank) are left to rank 0, which stops
    the ranks in order after the phase in flight; a rank whose agent is gone dies with it.
    """
    _worker_logging(torchrun.rank)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    agent = os.getppid()  # torchrun's agent: when it is gone, so is this rank
    try:
        _die_with_parent(agent)
        store = torchrun.store(timeout_s)
        store.set(f"pid/{torchrun.rank}", str(os.getpid()))
        spec = RankSpec.from_json(store.get(f"spec/{torchrun.rank}").decode("utf-8", "replace"))
        if spec.rank != torchrun.rank or spec.world != torchrun.world:
            raise LocalRankError(f"rank 0 sent the spec of rank {spec.rank} of {spec.world}")
        _serve(spec, store, agent)
        return 0
    except (PeerError, RuntimeError, dist.DistError) as exc:
        log.error("local rank %d (torchrun) stops: %s", torchrun.rank, exc)
        return 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m peer.trainer.workers SPEC_JSON (started by `peer run --local-workers N`)",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(worker_main(sys.argv[1]))
