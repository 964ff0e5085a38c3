"""The daemon: wires the parts and owns the lifecycle. The only place concrete classes are built.

Parts: ``Membership`` (who is a member), ``StateStore`` (the global state and checkpoints),
``RoundDriver`` (the rounds), ``Service`` (what the gRPC server calls), the transport, discovery
and the metrics exporter. Fault injection (``--faults``, tests only) is wired in here as hooks.

Threads:
  - the asyncio event loop (uvloop when available): network I/O, timers, round orchestration;
  - one trainer thread: every call into the model and inner optimizer (in library mode the
    user's own thread trains, and this one only evaluates; see peer.swarm; with
    ``local_workers`` > 1 also the collectives with the other local ranks, which are child
    processes: see peer.trainer.workers);
  - a codec thread: encode, decode, averaging and the outer step;
  - a state-io thread: snapshots for donors, checkpoints (so neither waits for the other);
  - the metrics HTTP thread (peer.metrics.Exporter).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from peer.codec import CODEC_NAMES, get_codec
from peer.config import Config, resolve_settings
from peer.discovery import CombinedDiscovery, MdnsDiscovery, StaticDiscovery
from peer.credentials import Identity, load_run_ca, node_identity
from peer.endpoint import write_endpoint
from peer.errors import ConfigError
from peer.faults import FaultPlan, FaultyClient, FaultyInner, FaultyService
from peer.membership import Membership
from peer.metrics import Exporter, Metrics
from peer.service import Service
from peer.sync.driver import RoundDriver
from peer.sync.mirror import DeviceMirror
from peer.sync.round import Averaged
from peer.sync.state import GlobalState, max_blob_bytes
from peer.sync.store import StateStore
from peer.trainer import InnerTrainer, LRSchedule, Task, flatten_state, load_task, param_count, schema_hash
from peer.trainer.external import LIBRARY_DEFAULTS, ExternalInner
from peer.trainer.params import StateLayout, state_layout
from peer.trainer.runner import ThreadedInner
from peer.trainer.workers import LocalRanks, RankSpec, Torchrun
from peer.transport import GrpcPeerClient, PeerServer
from peer.types import PROTOCOL_VERSION, PeerInfo

log = logging.getLogger(__name__)

NO_CREDENTIALS = ("no run credentials: create them once with `peer keys new --run-id {run} --out DIR`, copy DIR "
                  "to every machine of the run and pass --credentials DIR (or --insecure to run without TLS)")


def load_peer_id(state_dir: Path, configured: str | None) -> str:
    """The configured id, else the one kept in ``state_dir``, else a new random one (kept)."""
    if configured:
        return configured
    path = state_dir / "peer_id"
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    peer_id = secrets.token_hex(6)
    state_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(peer_id + "\n")
    return peer_id


MMAP_THRESHOLD = 1 << 23
"""Buffers of this many bytes or more are their own memory maps (glibc's ``M_MMAP_THRESHOLD``)."""

TRIM_THRESHOLD = 1 << 26
"""Free memory at the top of a glibc heap that stays there instead of going back to the system
(``M_TRIM_THRESHOLD``; setting the mmap threshold made it 2 x 8 MB)."""


def large_buffers_to_os() -> None:
    """Have glibc give every buffer of ``MMAP_THRESHOLD`` bytes or more back to the system when
    it is freed (a no-op elsewhere). A round's transient buffers (encoded shards and answers:
    25 MB each with K=2 at 50M parameters) are below glibc's own ceiling for that (32 MB): by
    default it raises its threshold to the largest map freed and serves such buffers from its
    heaps from then on, where freed ones stay resident; bench.memory measured ~2 B/param kept
    that way between rounds at N=50M, growing round by round. A fixed threshold also fixes the
    trim threshold (2x). The price: fresh pages for each buffer that large (~1 ms per 8 MB);
    smaller ones (1 MB frames, a 10M model's 2.5 MB shards) are reused from the heaps as before
    (with 1 MB every frame took fresh pages: CPU per round at K=4, N=10M looked ~5 % higher,
    within this machine's noise).

    Those smaller ones stay resident between rounds (``TRIM_THRESHOLD``): at the 16 MB that the
    fixed mmap threshold implies, freeing a round's frames and shards shrank the heaps and the
    next round faulted the same memory in again, ~11,000 page faults (~45 MB) a peer a round at
    K=4, N=10M, ~25 ms of CPU; with it, ~3,000. What stays is at most 64 MB a heap of what a
    round used at once below 8 MB a buffer, the next round's to reuse (bench.memory: 23.7
    B/param, 23.3 before: within its noise; with 512 MB it was 23.9)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (malloc.h)
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class Daemon:
    """One peer. Build with a Config, then ``await run()``; ``request_stop()`` from a signal.

    With ``model`` (library mode, ``peer.Swarm``) the user's own loop trains that model: the
    inner phase is an ``ExternalInner`` (``self.external``) instead of an ``InnerTrainer`` on the
    configured task; ``eval_task``, if given, evaluates the global parameters.

    ``torchrun``: this process is rank 0 of a torchrun launch, whose other ranks serve its inner
    phases (instead of ``local_workers`` ranks this peer starts itself).
    """

    def __init__(self, cfg: Config, registry: CollectorRegistry | None = None, *,
                 model: torch.nn.Module | None = None, eval_task: Task | None = None,
                 torchrun: Torchrun | None = None) -> None:
        if not cfg.run.run_id:
            raise ConfigError("a run id is required (--run-id, PEER_RUN_ID or [run] run_id)")
        get_codec(cfg.sync.codec)  # validates the name early, with the list of known codecs
        large_buffers_to_os()
        self.cfg = cfg
        faults = self._faults = FaultPlan.parse(cfg.faults)
        hook = faults.at if faults else None
        self.state_dir = Path(cfg.run.state_dir or Path("peer-state") / cfg.run.run_id)
        if cfg.net.credentials:
            self.identity: Identity | None = node_identity(load_run_ca(Path(cfg.net.credentials), cfg.run.run_id),
                                                           self.state_dir)
            self.peer_id = self.identity.peer_id
        elif cfg.net.insecure:
            self.identity = None
            self.peer_id = load_peer_id(self.state_dir, cfg.run.peer_id)
        else:
            raise ConfigError(NO_CREDENTIALS.format(run=cfg.run.run_id))
        self.metrics = Metrics(registry or CollectorRegistry())
        self.train_pool = ThreadPoolExecutor(1, thread_name_prefix="trainer")
        self._failure: str | None = None
        self.local_ranks: LocalRanks | None = None
        self.trainer: InnerTrainer | None = None
        world = cfg.train.local_workers
        if model is None:
            self.task: Task | None = load_task(cfg.run.task, cfg.run.data)
            self.settings = resolve_settings(cfg, self.task.defaults)
            if torchrun is not None:
                if world not in (1, torchrun.world):
                    raise ConfigError(f"local_workers {world} under torchrun with {torchrun.world} ranks: leave it out")
                world = torchrun.world
            tc = cfg.train
            if world > 1:
                spec = RankSpec(task=cfg.run.task, data=cfg.run.data, seed=cfg.run.seed, stream_id=self.peer_id,
                                device=tc.device, threads=tc.threads, batch_size=self.settings.batch_size,
                                inner_lr=self.settings.inner_lr, rank=0, world=world, store_port=0,
                                timeout_s=cfg.timeouts.local_rank_timeout_s, parent_pid=0, precision=tc.precision,
                                inner_lr_schedule=tc.inner_lr_schedule, warmup_steps=tc.warmup_steps,
                                total_steps=tc.total_steps)
                self.local_ranks = LocalRanks(spec, self.train_pool, self.settings.inner_steps, on_step=self._on_step,
                                              on_failure=self.fail, on_samples=self._on_rank_samples,
                                              task=self.task, torchrun=torchrun)
                self.trainer = self.local_ranks.trainer
            else:
                self.trainer = InnerTrainer(self.task, seed=cfg.run.seed, stream_id=self.peer_id, device=tc.device,
                                            threads=tc.threads, batch_size=self.settings.batch_size,
                                            inner_lr=self.settings.inner_lr, precision=tc.precision,
                                            schedule=LRSchedule(tc.inner_lr_schedule, tc.warmup_steps,
                                                                tc.total_steps))
            self.schema_hash = self.trainer.schema_hash()
            self.layout: StateLayout = self.trainer.layout
            params = self.trainer.initial_params()
        else:
            if world > 1 or torchrun is not None:
                raise ConfigError("library mode (peer.Swarm) trains on the caller's thread: local_workers must be 1")
            if param_count(model) == 0:
                raise ConfigError("the model has no parameters to train together")
            self.task = eval_task
            self.settings = resolve_settings(cfg, eval_task.defaults if eval_task else LIBRARY_DEFAULTS)
            self.schema_hash = schema_hash(model)
            self.layout = state_layout(model)
            params = flatten_state(model)
        self.metrics.local_ranks.set(world)
        self.numel = params.numel()
        self.codec_pool = ThreadPoolExecutor(1, thread_name_prefix="codec")
        self.io_pool = ThreadPoolExecutor(1, thread_name_prefix="state-io")
        # Hashes a donor's state while it arrives (one job per transfer, for its whole length).
        self.recv_pool = ThreadPoolExecutor(1, thread_name_prefix="state-recv")
        self.address = ""
        self.metrics_port = 0
        self.store = StateStore(GlobalState(0, params, torch.zeros_like(params)), self.state_dir, self.io_pool,
                                checkpoint_interval_s=cfg.sync.checkpoint_interval_s,
                                on_adopt=lambda state: self.metrics.round_current.set(state.round),
                                on_checkpoint=lambda ok: self.metrics.checkpoints.labels(
                                    "ok" if ok else "failed").inc(),
                                meta={"run_id": cfg.run.run_id, "task": cfg.run.task,
                                      "schema_hash": self.schema_hash})
        t = cfg.timeouts
        self.client = GrpcPeerClient(chunk_bytes=cfg.sync.chunk_bytes, chunk_idle_timeout_s=t.chunk_idle_timeout_s,
                                     on_error=lambda m, c: self.metrics.rpc_errors.labels(m, c).inc(),
                                     max_state_bytes=max_blob_bytes(self.numel), reconnect_wait_s=t.reconnect_wait_s,
                                     tamper=faults.tamper if faults else None, identity=self.identity,
                                     executor=self.recv_pool)
        self.mdns: MdnsDiscovery | None = None
        self.discovery = CombinedDiscovery([])
        me = (lambda: faults.claim(self.info())) if faults else self.info
        self.membership = Membership(cfg, me, self.client, self.discovery, self.metrics,
                                     on_drop=lambda pid: self.driver.peer_left(pid),
                                     ignored_counts=self._mdns_ignored)
        self.external: ExternalInner | None = None
        if model is not None:
            inner: ThreadedInner | ExternalInner | LocalRanks = ExternalInner(
                model, self.settings.inner_steps, self.train_pool, on_step=self._on_step, task=eval_task)
            self.external = inner
        else:
            assert self.trainer is not None
            inner = self.local_ranks or ThreadedInner(self.trainer, self.train_pool, self.settings.inner_steps,
                                                      on_step=self._on_step)
        mirror = None
        if self.local_ranks is None and self.trainer is not None and self.trainer.device.type != "cpu":
            # The model is on a GPU: each round's answers are applied there too (peer.sync.mirror).
            mirror = DeviceMirror(self.trainer.device, lr=self.settings.outer_lr,
                                  momentum=self.settings.outer_momentum, param_numel=self.layout.param_numel,
                                  int_slices=self.layout.int_slices)
        self.driver = RoundDriver(cfg, self.settings, peer_id=self.peer_id, schema_hash=self.schema_hash,
                                  members=self.membership,
                                  client=FaultyClient(self.client, faults) if faults else self.client,
                                  store=self.store, inner=FaultyInner(inner, faults) if faults else inner,
                                  executor=self.codec_pool, metrics=self.metrics, address=lambda: self.address,
                                  param_numel=self.layout.param_numel,
                                  int_slices=self.layout.int_slices, mirror=mirror,
                                  **({"phase_hook": hook} if hook else {}))
        self.service = Service(cfg, me, self.membership, self.driver, self.store, self.metrics,
                               **({"phase_hook": hook} if hook else {}),
                               **({"local_ranks": self.local_ranks.ranks} if self.local_ranks else {}))
        self.server: PeerServer | None = None
        self.exporter: Exporter | None = None
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._train_task: asyncio.Task | None = None

    @property
    def pools(self) -> tuple[ThreadPoolExecutor, ...]:
        """The executors this daemon owns (``stop`` shuts them down without waiting)."""
        return self.train_pool, self.codec_pool, self.io_pool, self.recv_pool

    @property
    def state(self) -> GlobalState:
        return self.store.state

    def info(self) -> PeerInfo:
        """This peer as others see it (its round and hash change every round)."""
        state = self.store.state
        return PeerInfo(peer_id=self.peer_id, run_id=self.cfg.run.run_id, protocol_version=PROTOCOL_VERSION,
                        schema_hash=self.schema_hash, codecs=CODEC_NAMES, round=state.round,
                        global_hash=state.global_hash, address=self.address, metrics_port=self.metrics_port,
                        task=self.cfg.run.task)

    def _on_step(self, step: int, loss: float) -> None:
        # The trainer thread (the user's, in library mode): plain increments and thread-safe
        # metrics only.
        self.driver.progress.inner_step += 1
        self.metrics.inner_steps.inc()

    def _on_rank_samples(self, per_rank: list[int]) -> None:
        for rank, samples in enumerate(per_rank):
            self.metrics.rank_samples.labels(str(rank)).inc(samples)

    def fail(self, why: str) -> None:
        """Stop this peer and exit non-zero (a local rank died). Call on the loop."""
        if self._failure is None:
            self._failure = why
            log.error("peer %s fails: %s; leaving the run", self.peer_id, why)
        self.request_stop()

    def _mdns_ignored(self) -> dict[str, int]:
        if self.mdns is None:
            return {}
        return {"other_run": self.mdns.ignored_other_run, "malformed": self.mdns.malformed}

    async def round_once(self, delta: torch.Tensor, weight: float) -> Averaged | None:
        """One round from an already computed delta (benchmarks drive the real round code this
        way); the averaged delta that was applied (``Averaged.tensor()`` decodes it), or None if
        the round failed here. The round takes ``delta`` over (``RoundDriver.round``)."""
        return await self.driver.round(delta, weight)

    # ----------------------------------------------------------------- lifecycle

    def request_stop(self) -> None:
        """Call on the loop (signal handlers are added with loop.add_signal_handler)."""
        if not self._stopping:
            log.info("stop requested; leaving the run")
        self._stopping = True
        self.driver.request_stop()
        if self._stop_event is not None:
            self._stop_event.set()

    async def run(self) -> int:
        """Run until stopped or ``rounds`` completed; return the process exit status."""
        try:
            await self.start()
        except BaseException:
            await self.stop()  # whatever did start is closed again
            raise
        status = 0
        try:
            trainer = self._train_task = asyncio.create_task(self.driver.run(), name="train")
            stop = asyncio.create_task(self._stop_event.wait(), name="stop")
            await asyncio.wait({trainer, stop}, return_when=asyncio.FIRST_COMPLETED)
            if trainer.done() and trainer.cancelled() and not self._stopping:
                log.error("training was cancelled unexpectedly; stopping")
                status = 1
            elif trainer.done() and not trainer.cancelled() and trainer.exception() is not None:
                log.error("training stopped: %r", trainer.exception(), exc_info=trainer.exception())
                status = 1
            stop.cancel()
        finally:
            await self.stop()
        return 1 if self._failure is not None else status

    async def start(self) -> None:
        """Resume, listen, export metrics, start discovery and membership upkeep (no training)."""
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        cfg = self.cfg
        await self.store.async_load()
        if self.local_ranks is not None:
            # Before the swarm sees this peer: ranks that cannot meet fail the start.
            await self.local_ranks.start()
        handler = FaultyService(self.service, self._faults) if self._faults else self.service
        self.server = PeerServer(handler, cfg.net.listen, identity=self.identity, chunk_bytes=cfg.sync.chunk_bytes,
                                 chunk_idle_timeout_s=cfg.timeouts.chunk_idle_timeout_s,
                                 max_concurrent_rpcs=cfg.net.max_concurrent_rpcs,
                                 max_streams_per_connection=cfg.net.max_streams_per_connection)
        port = self.server.port
        self.exporter = Exporter(self.metrics.registry, cfg.net.metrics_host, cfg.net.metrics_port,
                                 lambda: self.membership.sd_targets(self.address, self.metrics_port))
        self.metrics_port = self.exporter.port
        advertise_host = self._advertise_host(cfg.net.listen.rsplit(":", 1)[0].strip("[]"))
        self.address = f"{advertise_host}:{port}" if advertise_host else ""
        await self.server.start()
        self.exporter.start()
        secure = self.identity is not None
        self.metrics.info.labels(self.peer_id, cfg.run.run_id, cfg.run.task, cfg.sync.codec,
                                 "true" if secure else "false").set(1)
        if not secure:
            log.warning("running WITHOUT TLS (--insecure): anyone who reaches %s can join run %s, read its model "
                        "and change it; use run credentials (peer keys new) on a shared network",
                        cfg.net.listen, cfg.run.run_id)
        if cfg.net.mdns:
            self.mdns = MdnsDiscovery(run_id=cfg.run.run_id, peer_id=self.peer_id, grpc_port=port,
                                      metrics_port=self.metrics_port, advertise_host=advertise_host,
                                      interfaces=list(cfg.net.interfaces) or None)
            self.discovery.add(self.mdns)
        if cfg.net.peers:
            self.discovery.add(StaticDiscovery(list(cfg.net.peers)))
        await self.discovery.start()
        if not self.address:
            # Listening on a wildcard: advertise what mDNS announces for us, else loopback.
            hosts = self.mdns.advertised_addresses if self.mdns is not None else []
            self.address = f"{hosts[0] if hosts else '127.0.0.1'}:{port}"
        layout = self.layout
        log.info("peer %s listening on %s (grpc %s, metrics :%d), run %s, task %s (%d parameters, %d buffer "
                 "values), codec %s", self.peer_id, cfg.net.listen, self.address, self.metrics_port, cfg.run.run_id,
                 cfg.run.task, layout.param_numel, layout.numel - layout.param_numel, cfg.sync.codec)
        await asyncio.get_running_loop().run_in_executor(
            self.io_pool, lambda: write_endpoint(self.state_dir, peer_id=self.peer_id, grpc=self.address,
                                                 metrics_port=self.metrics_port))
        self.membership.start()

    def _advertise_host(self, listen_host: str) -> str:
        if self.cfg.net.advertise:
            return self.cfg.net.advertise
        if listen_host not in ("0.0.0.0", "::", ""):
            return listen_host
        if len(self.cfg.net.interfaces) == 1:
            return self.cfg.net.interfaces[0]
        return ""

    async def stop(self) -> None:
        """Leave the run: finish a round in flight (bounded), tell the peers, checkpoint, mDNS
        goodbye, close everything. Safe after a partial ``start``."""
        self.request_stop()
        t = self.cfg.timeouts
        deadline = time.monotonic() + t.stop_grace_s
        if self.driver.in_round() and self._train_task is not None:
            # Mid-round, the others may already count on our shard: finishing the round (it is
            # bounded by its deadline) costs them less than a failed round. The inner phase
            # checks the stop flag after every step, so it ends by itself.
            await asyncio.wait({self._train_task}, timeout=min(t.finish_round_grace_s, t.stop_grace_s / 2))
        self.driver.progress.phase = "stopping"
        if self._train_task is not None:
            self._train_task.cancel()
            await asyncio.gather(self._train_task, return_exceptions=True)
        await self.driver.close()
        if self.local_ranks is not None:
            await self.local_ranks.close()
        await self.membership.stop()
        loop = asyncio.get_running_loop()
        # Tell the others first so that nobody waits for us, then say goodbye on mDNS.
        await self.membership.leave_all(min(1.0, max(0.5, deadline - time.monotonic() - 3)))
        if self.store.state.round > 0:
            await self.store.async_checkpoint()
        try:
            await asyncio.wait_for(self.discovery.stop(), max(0.5, deadline - time.monotonic() - 1.5))
        except TimeoutError:
            log.warning("mDNS goodbye did not finish in time")
        if self.server is not None:
            await self.server.stop(grace_s=min(1.0, max(0.0, deadline - time.monotonic() - 0.5)))
            # gRPC's server holds our handlers from C, out of the garbage collector's sight: only
            # letting go of it here frees it (and lets gRPC's poller thread end in library mode).
            self.server = None
        await self.client.close()
        if self.exporter is not None:
            await loop.run_in_executor(self.io_pool, self.exporter.stop)
        for pool in self.pools:
            pool.shutdown(wait=False, cancel_futures=True)
        log.info("peer %s stopped at round %d", self.peer_id, self.store.state.round)


def install_signal_handlers(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)


async def run_daemon(cfg: Config, torchrun: Torchrun | None = None) -> int:
    daemon = Daemon(cfg, torchrun=torchrun)
    install_signal_handlers(daemon)
    return await daemon.run()
