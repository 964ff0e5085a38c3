"""The daemon: wires discovery, transport, trainer and round logic; owns the lifecycle.

This is the only module that builds concrete classes. Threads:
  - the asyncio event loop (uvloop when available): network I/O, timers, round orchestration;
  - one trainer thread (a single-thread executor): every call into the model and inner optimizer;
  - a codec executor (one thread): encode, decode and averaging of deltas;
  - the metrics HTTP thread (peer.metrics.Exporter).
"""

from __future__ import annotations

import asyncio
import logging
import math
import hashlib
import secrets
import threading
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from peer.codec import CODEC_NAMES, all_finite, get_codec
from peer.config import Config
from peer.discovery import CombinedDiscovery, MdnsDiscovery, StaticDiscovery
from peer.discovery.base import PROTOCOL_VERSION, PeerEvent
from peer.errors import ConfigError, HandshakeRefused, PeerError, PeerUnavailable, RoundError, StateError
from peer.faults import FaultPlan
from peer.metrics import Exporter, Metrics, sd_group
from peer.sync.outer import outer_step
from peer.sync.round import Matchmaker, Reducer, ShardRegistry, crc32
from peer.sync.state import GlobalState, decode_state, encode_state, read_checkpoint, write_checkpoint
from peer.trainer import InnerTrainer, load_task
from peer.transport import GrpcPeerClient, PeerServer
from peer.types import (
    Group, HandshakeReply, JoinOutcome, JoinReply, JoinRequest, PeerInfo, ReduceHeader, StateHeader, StatusInfo,
)
from peer.sync.state import FORMAT as STATE_FORMAT

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
HEARTBEAT_MISSES = 3
# On SIGTERM in the middle of a round, wait at most this long for the round to end.
FINISH_ROUND_S = 4.0
# A peer that refused our handshake is not asked again for this long.
REFUSAL_BACKOFF_S = 30.0


@dataclass
class Known:
    """A handshaked peer of our run."""

    info: PeerInfo
    address: str
    misses: int = 0


@dataclass(frozen=True)
class Settings:
    """Task defaults merged with the user's overrides."""

    inner_steps: int
    batch_size: int
    inner_lr: float
    outer_lr: float
    outer_momentum: float


def resolve_settings(cfg: Config, defaults) -> Settings:
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return Settings(
        inner_steps=pick(cfg.train.inner_steps, defaults.inner_steps),
        batch_size=pick(cfg.train.batch_size, defaults.batch_size),
        inner_lr=pick(cfg.train.inner_lr, defaults.inner_lr),
        outer_lr=pick(cfg.sync.outer_lr, defaults.outer_lr),
        outer_momentum=pick(cfg.sync.outer_momentum, defaults.outer_momentum),
    )


def load_peer_id(state_dir: Path, configured: str | None) -> str:
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


class Daemon:
    """One peer. Build with a Config, then ``await run()``; ``request_stop()`` from a signal."""

    def __init__(self, cfg: Config, registry: CollectorRegistry | None = None) -> None:
        if not cfg.run.run_id:
            raise ConfigError("a run id is required (--run-id, PEER_RUN_ID or [run] run_id)")
        get_codec(cfg.sync.codec)  # validates the name early, with the list of known codecs
        self.cfg = cfg
        self.faults = FaultPlan.parse(cfg.faults)
        self.state_dir = Path(cfg.run.state_dir or Path("peer-state") / cfg.run.run_id)
        self.peer_id = load_peer_id(self.state_dir, cfg.run.peer_id)
        self.task = load_task(cfg.run.task, cfg.run.data)
        self.settings = resolve_settings(cfg, self.task.defaults)
        self.trainer = InnerTrainer(self.task, seed=cfg.run.seed, stream_id=self.peer_id, device=cfg.train.device,
                                    threads=cfg.train.threads, batch_size=self.settings.batch_size,
                                    inner_lr=self.settings.inner_lr)
        self.schema_hash = self.trainer.schema_hash()
        params = self.trainer.initial_params()
        self.numel = params.numel()
        self.state = GlobalState(0, params, torch.zeros_like(params))
        self.metrics = Metrics(registry or CollectorRegistry())
        self.known: dict[str, Known] = {}
        self.registry = ShardRegistry()
        self.train_pool = ThreadPoolExecutor(1, thread_name_prefix="trainer")
        self.codec_pool = ThreadPoolExecutor(1, thread_name_prefix="codec")
        self.chunk_bytes = cfg.sync.chunk_bytes
        self.chunk_idle_timeout_s = cfg.timeouts.chunk_idle_timeout_s
        self._stopping = False
        self._train_task: asyncio.Task | None = None
        self._stop_event: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._snapshot: tuple[GlobalState, tuple[StateHeader, bytes]] | None = None
        self._snapshot_lock = threading.Lock()
        # Snapshots and checkpoints: their own thread, so that serving a joiner never waits for
        # a round's encode/decode work, and a round never waits for the disk.
        self.io_pool = ThreadPoolExecutor(1, thread_name_prefix="state-io")
        self._checkpointing: asyncio.Future | None = None
        self._last_checkpoint = time.monotonic()
        self._reduce_ewma_s: float | None = None
        self._formation_ewma_s: float | None = None
        self._inner_step = 0
        self._loss = float("nan")
        self._eval: dict[str, float] = {}
        self._phase = "starting"
        self._samples = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._last_round_s = 0.0
        self._completed = 0
        self._failed = 0
        self._listen_port = 0
        self.address = ""
        self.metrics_port = 0
        self._pending_handshakes: set[str] = set()
        self._refused_until: dict[str, float] = {}
        self._ignored_seen: dict[str, int] = {}

    # ----------------------------------------------------------------- lifecycle

    def request_stop(self) -> None:
        """Thread-unsafe; call on the loop (signal handlers added with loop.add_signal_handler)."""
        if not self._stopping:
            log.info("stop requested; leaving the run")
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()

    async def run(self) -> int:
        """Run until stopped or ``rounds`` completed; return the process exit status."""
        await self.start()
        status = 0
        try:
            trainer = self._train_task = self._spawn(self._train_forever(), "train")
            stop = asyncio.ensure_future(self._stop_event.wait())
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
        return status

    async def start(self) -> None:
        """Listen, export metrics, start discovery and membership upkeep (no training)."""
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        self._load_checkpoint()
        self.server = PeerServer(self, self.cfg.net.listen)
        self._listen_port = self.server.port
        host = self.cfg.net.listen.rsplit(":", 1)[0].strip("[]")
        self.client = GrpcPeerClient(chunk_bytes=self.chunk_bytes, chunk_idle_timeout_s=self.chunk_idle_timeout_s,
                                     on_error=lambda m, c: self.metrics.rpc_errors.labels(m, c).inc(),
                                     max_state_bytes=64 * self.numel + (1 << 20))
        self.matchmaker = Matchmaker(peer_id=self.peer_id, numel=self.numel, codec=self.cfg.sync.codec,
                                     live=self._live, current_round=lambda: self.state.round,
                                     timeout_s=self._matchmaking_timeout, deadline_s=self._reduce_deadline,
                                     on_formed=self._observe_formation)
        self.reducer = Reducer(peer_id=self.peer_id, run_id=self.cfg.run.run_id, client=self.client,
                               registry=self.registry, executor=self.codec_pool,
                               error_feedback=self.cfg.sync.error_feedback, faults=self.faults)
        self.exporter = Exporter(self.metrics.registry, self.cfg.net.metrics_host, self.cfg.net.metrics_port,
                                 self._sd_targets)
        self.metrics_port = self.exporter.port
        advertise_host = self._advertise_host(host)
        self.address = f"{advertise_host}:{self._listen_port}" if advertise_host else ""
        await self.server.start()
        self.exporter.start()
        self.metrics.info.labels(self.peer_id, self.cfg.run.run_id, self.cfg.run.task, self.cfg.sync.codec).set(1)
        self._publish_state_metrics()
        sources = []
        if self.cfg.net.mdns:
            self.mdns = MdnsDiscovery(run_id=self.cfg.run.run_id, peer_id=self.peer_id, grpc_port=self._listen_port,
                                      metrics_port=self.metrics_port, advertise_host=advertise_host,
                                      interfaces=list(self.cfg.net.interfaces) or None)
            sources.append(self.mdns)
        if self.cfg.net.peers:
            sources.append(StaticDiscovery(list(self.cfg.net.peers)))
        self.discovery = CombinedDiscovery(sources)
        await self.discovery.start()
        if not self.address:
            # Listening on a wildcard: advertise what mDNS announces for us, else loopback.
            hosts = self.mdns.advertised_addresses if self.cfg.net.mdns else []
            self.address = f"{hosts[0] if hosts else '127.0.0.1'}:{self._listen_port}"
        log.info("peer %s listening on %s (grpc %s, metrics :%d), run %s, task %s (%d parameters), codec %s",
                 self.peer_id, self.cfg.net.listen, self.address, self.metrics_port, self.cfg.run.run_id,
                 self.cfg.run.task, self.numel, self.cfg.sync.codec)
        self._spawn(self._watch_discovery(), "discovery")
        self._spawn(self._heartbeat(), "heartbeat")

    def _advertise_host(self, listen_host: str) -> str:
        if self.cfg.net.advertise:
            return self.cfg.net.advertise
        if listen_host not in ("0.0.0.0", "::", ""):
            return listen_host
        if len(self.cfg.net.interfaces) == 1:
            return self.cfg.net.interfaces[0]
        return ""

    async def stop(self) -> None:
        """Leave the run: tell the peers, checkpoint, mDNS goodbye, close everything."""
        self._stopping = True
        deadline = time.monotonic() + self.cfg.timeouts.stop_grace_s
        if self._phase in ("matchmaking", "reduce", "outer") and self._train_task is not None:
            # Mid-round, the others may already count on our shard: finishing the round (it is
            # bounded by its deadline) costs them less than a failed round. The inner phase
            # checks the stop flag after every step, so it ends by itself.
            await asyncio.wait({self._train_task}, timeout=min(FINISH_ROUND_S, self.cfg.timeouts.stop_grace_s / 2))
        self._phase = "stopping"
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.matchmaker.close()
        # Tell the others first so that nobody waits for us, then say goodbye on mDNS.
        remaining = max(0.5, deadline - time.monotonic() - 3)
        await asyncio.gather(*(self._say_leave(k.address, min(1.0, remaining)) for k in list(self.known.values())),
                             return_exceptions=True)
        if self.state.round > 0:
            await asyncio.get_running_loop().run_in_executor(self.io_pool, self._write_checkpoint, self.state)
        try:
            await asyncio.wait_for(self.discovery.stop(), max(0.5, deadline - time.monotonic() - 1.5))
        except TimeoutError:
            log.warning("mDNS goodbye did not finish in time")
        await self.server.stop(grace_s=min(1.0, max(0.0, deadline - time.monotonic() - 0.5)))
        await self.client.close()
        self.exporter.stop()
        self.train_pool.shutdown(wait=False, cancel_futures=True)
        self.codec_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        log.info("peer %s stopped at round %d", self.peer_id, self.state.round)

    async def _say_leave(self, address: str, timeout_s: float) -> None:
        try:
            await self.client.leave(address, self.cfg.run.run_id, self.peer_id, timeout_s)
        except PeerError:
            pass  # it may be gone already; nothing to do

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----------------------------------------------------------------- membership

    def info(self) -> PeerInfo:
        return PeerInfo(peer_id=self.peer_id, run_id=self.cfg.run.run_id, protocol_version=PROTOCOL_VERSION,
                        schema_hash=self.schema_hash, codecs=CODEC_NAMES, round=self.state.round,
                        global_hash=self.state.global_hash, address=self.address, metrics_port=self.metrics_port,
                        task=self.cfg.run.task)

    def _live(self) -> dict[str, str]:
        return {pid: k.address for pid, k in self.known.items()}

    def _check_compatible(self, other: PeerInfo) -> None:
        """Raise HandshakeRefused naming what differs."""
        me = self.info()
        if other.peer_id == me.peer_id:
            raise HandshakeRefused("self", "that is this peer itself")
        if other.protocol_version != me.protocol_version:
            raise HandshakeRefused("protocol_mismatch", f"protocol version {other.protocol_version} != "
                                   f"{me.protocol_version}")
        if other.run_id != me.run_id:
            raise HandshakeRefused("run_mismatch", f"run {other.run_id!r} != {me.run_id!r}")
        if other.schema_hash != me.schema_hash:
            raise HandshakeRefused("schema_mismatch",
                                   f"model schema differs: task {other.task!r} schema {other.schema_hash[:12]} != "
                                   f"task {me.task!r} schema {me.schema_hash[:12]} (parameter names, shapes or "
                                   f"dtypes differ)")

    def _admit(self, info: PeerInfo, address: str) -> None:
        is_new = info.peer_id not in self.known
        self.known[info.peer_id] = Known(info=info, address=address)
        self.metrics.live_peers.set(len(self.known))
        if is_new:
            log.info("peer joined: %s at %s (round %d); %d peers", info.peer_id, address, info.round,
                     len(self.known))

    def _drop(self, peer_id: str, why: str) -> None:
        known = self.known.pop(peer_id, None)
        if known is None:
            return
        self.metrics.live_peers.set(len(self.known))
        log.info("peer left: %s (%s); %d peers", peer_id, why, len(self.known))
        self.matchmaker.peer_left(peer_id)
        # Close its channel later, not now: closing a channel cancels the calls still in flight
        # on it (a JoinRound or GetState of ours), which would surface as our own cancellation.
        # Later, every call has met its deadline; with churn, channels to dead addresses would
        # otherwise pile up.
        self._spawn(self._forget_later(known.address), f"forget-{known.address}")

    async def _forget_later(self, address: str) -> None:
        await asyncio.sleep(self.cfg.timeouts.state_transfer_timeout_s + self.cfg.sync.reduce_deadline_s)
        if address not in {k.address for k in self.known.values()}:
            await self.client.forget(address)

    def _refused(self, exc: HandshakeRefused, who: str) -> None:
        self.metrics.handshake_refusals.labels(exc.reason).inc()
        log.warning("handshake with %s refused: %s: %s", who, exc.reason, exc)

    async def _watch_discovery(self) -> None:
        async for event in self.discovery.events():
            self._on_event(event)

    def _on_event(self, event: PeerEvent) -> None:
        rec = event.record
        if event.kind == "leave":
            self._drop(rec.peer_id, "mDNS goodbye")
            return
        if rec.peer_id == self.peer_id:
            return
        address = rec.address
        if address in self._pending_handshakes:
            return
        self._spawn(self._handshake(address, rec.peer_id), f"handshake-{address}")

    async def _handshake(self, address: str, hint: str, attempts: int = 5) -> None:
        self._pending_handshakes.add(address)
        try:
            for attempt in range(attempts):
                try:
                    reply = await self.client.handshake(address, self.info(), self.cfg.timeouts.handshake_timeout_s)
                except PeerUnavailable as exc:
                    log.debug("handshake with %s failed (attempt %d): %s", address, attempt + 1, exc)
                    await asyncio.sleep(min(2.0, 0.25 * 2 ** attempt))
                    continue
                if not reply.accepted:
                    self._refused_until[address] = time.monotonic() + REFUSAL_BACKOFF_S
                    if reply.reason != "self":
                        self._refused(HandshakeRefused(reply.reason, reply.message), f"{hint} at {address}")
                    return
                if reply.peer is None:
                    return
                try:
                    self._check_compatible(reply.peer)
                except HandshakeRefused as exc:
                    self._refused_until[address] = time.monotonic() + REFUSAL_BACKOFF_S
                    self._refused(exc, f"{hint} at {address}")
                    return
                self._admit(reply.peer, address)
                return
        finally:
            self._pending_handshakes.discard(address)

    async def _heartbeat(self) -> None:
        """Ping known peers: drop those that stopped answering (kill -9 sends no goodbye) and
        keep their round and hash fresh (to notice that we fell behind). Static peers that are
        not connected are retried here too."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._export_discovery_counts()
            for pid, k in list(self.known.items()):
                self._spawn(self._ping(pid, k), f"ping-{pid}")
            # Peers we should know but do not: static ones that were down, and mDNS records whose
            # handshake failed (a partition that healed sends no new mDNS event).
            wanted = {a: "static peer" for a in self.cfg.net.peers}
            wanted.update({r.address: r.peer_id for r in self.discovery.current()
                           if r.peer_id != self.peer_id and r.peer_id not in self.known})
            connected = {k.address for k in self.known.values()}
            now = time.monotonic()
            for address, hint in wanted.items():
                if self._refused_until.get(address, 0.0) > now:
                    continue  # refused recently: do not spam the log and the refusal counter
                if address not in connected and address not in self._pending_handshakes:
                    self._spawn(self._handshake(address, hint, attempts=1), f"handshake-{address}")

    def _export_discovery_counts(self) -> None:
        """mDNS counts what it ignores; export the increase since the last heartbeat."""
        if not self.cfg.net.mdns:
            return
        for reason, total in (("other_run", self.mdns.ignored_other_run), ("malformed", self.mdns.malformed)):
            increase = total - self._ignored_seen.get(reason, 0)
            if increase > 0:
                self.metrics.discovery_ignored.labels(reason).inc(increase)
                self._ignored_seen[reason] = total

    async def _ping(self, pid: str, k: Known) -> None:
        try:
            status = await self.client.status(k.address, self.cfg.timeouts.rpc_timeout_s)
        except PeerUnavailable:
            k.misses += 1
            if k.misses >= HEARTBEAT_MISSES and self.known.get(pid) is k:
                self._drop(pid, f"no answer to {k.misses} pings")
            return
        if status.peer.peer_id != pid:
            self._drop(pid, f"{k.address} is now {status.peer.peer_id}")
            return
        k.misses = 0
        k.info = status.peer

    # ----------------------------------------------------------------- handler (server side)

    def handshake(self, info: PeerInfo, observed_host: str) -> HandshakeReply:
        try:
            self._check_compatible(info)
        except HandshakeRefused as exc:
            if exc.reason != "self":
                self._refused(exc, f"{info.peer_id} at {info.address}")
            return HandshakeReply(False, exc.reason, str(exc), self.info())
        if info.address:
            # Dial back where the connection came from: the caller may not know which of its
            # addresses we can reach (it listens on 0.0.0.0 with several interfaces).
            port = info.address.rsplit(":", 1)[1]
            self._admit(info, f"{observed_host}:{port}" if observed_host else info.address)
        return HandshakeReply(True, "", "", self.info())

    def status(self) -> StatusInfo:
        return StatusInfo(peer=self.info(), inner_step=self._inner_step, loss=self._loss,
                          eval_loss=self._eval.get("loss", math.nan), eval_accuracy=self._eval.get("accuracy", math.nan),
                          peers=tuple(sorted(self.known)), bytes_sent=self._bytes_sent,
                          bytes_received=self._bytes_received, last_round_s=self._last_round_s, phase=self._phase,
                          samples=self._samples, rounds_completed=self._completed, rounds_failed=self._failed,
                          codec=self.cfg.sync.codec)

    async def join_round(self, req: JoinRequest) -> JoinReply:
        if req.run_id != self.cfg.run.run_id or req.peer_id not in self.known or self._stopping:
            why = "leaving" if self._stopping else f"{req.peer_id} of run {req.run_id!r} is not a known peer here"
            return JoinReply(JoinOutcome.REFUSED, why)
        return await self.matchmaker.join(req)

    async def reduce_expect(self, header: ReduceHeader) -> int:
        if header.run_id != self.cfg.run.run_id:
            raise RoundError("not_member", f"run {header.run_id!r} is not this run")
        owned = await self.registry.get(header.group_id, self.chunk_idle_timeout_s)
        if (header.shard_start, header.shard_end) != (owned.me.shard_start, owned.me.shard_end):
            raise RoundError("bad_shard", f"{header.peer_id} sent shard {header.shard_start}-{header.shard_end}; "
                             f"this peer owns {owned.me.shard_start}-{owned.me.shard_end}")
        if header.codec != owned.group.codec or header.numel != owned.numel or header.round != owned.group.round:
            raise RoundError("malformed", f"{header.peer_id}: codec/size/round do not match group "
                             f"{owned.group.group_id}")
        return get_codec(header.codec).encoded_size(owned.numel)

    async def reduce_part(self, header: ReduceHeader, payload: bytes) -> tuple[ReduceHeader, bytes]:
        owned = await self.registry.get(header.group_id, self.chunk_idle_timeout_s)
        self.metrics.received_bytes.labels(header.codec).inc(len(payload))
        self._bytes_received += len(payload)
        try:
            await owned.add(header.peer_id, header.weight, payload)
        except RoundError as exc:
            # The part is left out; the sender still gets the average (it stays in sync).
            self.reduce_rejected(header, exc)
        await self.faults.at("owner", header.round)
        result, contributors = await asyncio.shield(owned.result)
        self.metrics.sent_bytes.labels(header.codec).inc(len(result))
        self._bytes_sent += len(result)
        reply = replace(header, peer_id=self.peer_id, total_bytes=len(result), crc32=crc32(result),
                        contributors=contributors, weight=0.0)
        return reply, result

    def reduce_rejected(self, header: ReduceHeader | None, error: RoundError) -> None:
        self.metrics.rejected.labels(error.reason).inc()
        who = header.peer_id if header else "unknown peer"
        rnd = header.round if header else -1
        log.warning("round %d: left out the part from %s: %s (%s)", rnd, who, error, error.reason)

    async def state_snapshot(self, run_id: str, peer_id: str, schema_hash: str) -> tuple[StateHeader, bytes]:
        if run_id != self.cfg.run.run_id:
            raise HandshakeRefused("run_mismatch", f"run {run_id!r} != {self.cfg.run.run_id!r}")
        if schema_hash != self.schema_hash:
            raise HandshakeRefused("schema_mismatch", "model schema differs")
        state = self.state  # the last completed round; later rounds do not touch this object
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, self._snapshot_of, state)

    async def serving_state(self, sent_bytes: int) -> None:
        await self.faults.at("serve_state", self.state.round)

    def state_served(self, ok: bool) -> None:
        self.metrics.state_transfers.labels("served", "ok" if ok else "failed").inc()

    def leave(self, run_id: str, peer_id: str) -> None:
        if run_id == self.cfg.run.run_id:
            self._drop(peer_id, "said goodbye")

    def _sd_targets(self) -> list[dict]:
        """http_sd groups: this peer and every peer it sees (called on the HTTP thread)."""
        host = self.address.rsplit(":", 1)[0] if self.address else "127.0.0.1"
        groups = [sd_group(f"{host}:{self.metrics_port}", self.cfg.run.run_id, self.peer_id)]
        for pid, k in sorted(dict(self.known).items()):
            h = k.address.rsplit(":", 1)[0]
            if k.info.metrics_port:
                groups.append(sd_group(f"{h}:{k.info.metrics_port}", self.cfg.run.run_id, pid))
        return groups

    # ----------------------------------------------------------------- state

    def _adopt(self, state: GlobalState) -> None:
        """Make ``state`` the current global state. Its snapshot for donors and checkpoints is
        built lazily (``_snapshot_of``), off the round's critical path."""
        self.state = state
        self._publish_state_metrics()

    def _snapshot_of(self, state: GlobalState) -> tuple[StateHeader, bytes]:
        """The serialized snapshot of ``state``, built once per state (any thread)."""
        with self._snapshot_lock:
            if self._snapshot is not None and self._snapshot[0] is state:
                return self._snapshot[1]
            blob = encode_state(state)
            header = StateHeader(round=state.round, global_hash=state.global_hash, total_bytes=len(blob),
                                 sha256=hashlib.sha256(blob).hexdigest(), format=STATE_FORMAT)
            self._snapshot = (state, (header, blob))
            return header, blob

    def _apply_outer(self, rnd: int, avg: torch.Tensor) -> None:
        """The outer step and the new snapshot (codec thread: keeps the loop free)."""
        params, buf = outer_step(self.state.params, avg, self.state.momentum, lr=self.settings.outer_lr,
                                 momentum=self.settings.outer_momentum)
        state = GlobalState(rnd + 1, params, buf)
        state.global_hash  # noqa: B018 (computed here, off the loop, then cached)
        self._adopt(state)

    def _publish_state_metrics(self) -> None:
        self.metrics.round_current.set(self.state.round)

    def _checkpoint_path(self) -> Path:
        return self.state_dir / "checkpoint.bin"

    def _write_checkpoint(self, state: GlobalState) -> None:
        """Write ``state`` atomically to the checkpoint file (io thread)."""
        try:
            write_checkpoint(self._checkpoint_path(), self._snapshot_of(state)[1])
            self.metrics.checkpoints.labels("ok").inc()
        except OSError as exc:
            self.metrics.checkpoints.labels("failed").inc()
            log.error("checkpoint to %s failed: %s", self._checkpoint_path(), exc)

    def _maybe_checkpoint(self) -> None:
        """Start a background checkpoint when ``checkpoint_interval_s`` passed and none runs."""
        interval = self.cfg.sync.checkpoint_interval_s
        if interval <= 0 or time.monotonic() - self._last_checkpoint < interval:
            return
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        self._last_checkpoint = time.monotonic()
        self._checkpointing = asyncio.get_running_loop().run_in_executor(self.io_pool, self._write_checkpoint,
                                                                         self.state)

    def _load_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if not path.exists():
            self._adopt(self.state)
            return
        try:
            state, _ = decode_state(read_checkpoint(path), self.numel)
        except (StateError, OSError) as exc:
            log.error("not resuming from %s: %s", path, exc)
            self._adopt(self.state)
            return
        log.info("resumed from checkpoint %s at round %d", path, state.round)
        self._adopt(state)

    async def _resync(self, min_round: int, wait_s: float) -> bool:
        """Fetch the state of a peer at round >= ``min_round``; wait up to ``wait_s`` for one."""
        deadline = time.monotonic() + wait_s
        previous = self.state.round
        self._phase = "resync"
        started = time.monotonic()
        while time.monotonic() < deadline and not self._stopping:
            donors = sorted((k for k in self.known.values() if k.info.round >= min_round),
                            key=lambda k: (-k.info.round, k.info.peer_id))
            for donor in donors:
                try:
                    header, blob = await self.client.get_state(
                        donor.address, self.cfg.run.run_id, self.peer_id, self.schema_hash,
                        self.cfg.timeouts.state_transfer_timeout_s)
                    state, _ = await asyncio.get_running_loop().run_in_executor(
                        self.codec_pool, decode_state, blob, self.numel)
                except (PeerError, StateError) as exc:
                    self.metrics.state_transfers.labels("received", "failed").inc()
                    log.warning("state transfer from %s failed: %s", donor.info.peer_id, exc)
                    continue
                if state.round < min_round:
                    continue
                self.metrics.state_transfers.labels("received", "ok").inc()
                self._adopt(state)
                self.metrics.round_phase_seconds.labels("resync").observe(time.monotonic() - started)
                elapsed = time.monotonic() - started
                log.info("resynced to round %d (%s) from %s: %d bytes in %.2f s (%.1f MB/s); was at round %d "
                         "(rule: the most advanced round wins; at equal rounds, the group's majority)",
                         state.round, state.global_hash[:12], donor.info.peer_id, len(blob), elapsed,
                         len(blob) / max(elapsed, 1e-9) / 1e6, previous)
                return True
            await asyncio.sleep(0.2)
        return False

    def _ahead(self) -> int:
        return max((k.info.round for k in self.known.values()), default=-1)

    # ----------------------------------------------------------------- training

    def _observe_formation(self, wait_s: float, complete: bool) -> None:
        # Only complete formations say how long peers take to arrive; a timeout says nothing new.
        if complete:
            self._formation_ewma_s = wait_s if self._formation_ewma_s is None else (
                0.7 * self._formation_ewma_s + 0.3 * wait_s)

    def _matchmaking_timeout(self) -> float:
        """Adaptive: the leader waits 4x the smoothed spread of the members' arrival (+1 s) for
        the known peers to join, capped by ``matchmaking_timeout_s``."""
        cap = self.cfg.sync.matchmaking_timeout_s
        if self._formation_ewma_s is None:
            return cap
        return min(cap, 4 * self._formation_ewma_s + 1.0)

    def _reduce_deadline(self) -> float:
        """Adaptive: 4x the smoothed observed all-reduce time (+1 s), capped by the configured
        ``reduce_deadline_s``; before any observation, the configured value."""
        cap = self.cfg.sync.reduce_deadline_s
        if self._reduce_ewma_s is None:
            deadline = cap
        else:
            deadline = min(cap, 4 * self._reduce_ewma_s + 1.0)
        self.metrics.round_deadline_seconds.set(deadline)
        return deadline

    async def _train_forever(self) -> None:
        """Inner phase, round, inner phase, round, ... until stopped.

        With ``overlap`` on, the round of one inner phase's delta runs while the next inner phase
        trains (a one-step-delayed outer update, as in Streaming DiLoCo's overlapping
        communication): each phase starts from the newest global parameters plus this peer's
        own progress of the previous phase, and sends its own progress as its delta. The global
        parameters are still changed only by averaged deltas, identically on every member.
        """
        await self._startup_wait()
        await self._evaluate()
        log.info("initial eval loss %.4f at round %d%s", self._eval.get("loss", math.nan), self.state.round,
                 " (overlapping rounds with inner phases)" if self.cfg.sync.overlap else "")
        start = self.state.params
        pending: asyncio.Task | None = None
        try:
            while not self._stopping:
                if self.cfg.run.rounds and self._completed >= self.cfg.run.rounds:
                    log.info("completed %d rounds; stopping", self._completed)
                    self.request_stop()
                    return
                if pending is None and self._ahead() > self.state.round:
                    await self._resync(self._ahead(), self.cfg.timeouts.state_transfer_timeout_s)
                    start = self.state.params
                    continue
                rnd = self.state.round
                await self.faults.at("inner", rnd)
                inner = await self._inner_phase(rnd, start)
                if inner is None:
                    return
                delta, weight = inner
                if pending is not None:
                    await pending  # the previous delta's round, which ran while this phase trained
                    pending = None
                if not self.cfg.sync.overlap:
                    await self._round(self.state.round, delta, weight)
                    start = self.state.params
                    continue
                # Re-base this phase's progress onto the newest global parameters.
                start = self.state.params - delta
                pending = self._spawn(self._round(self.state.round, delta, weight), "round")
        finally:
            if pending is not None and not pending.done():
                # Stopping: give the round in flight its bounded time (see stop()).
                await asyncio.wait({pending}, timeout=FINISH_ROUND_S)

    async def _inner_phase(self, rnd: int, start: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """H inner steps from ``start`` on the trainer thread; return (delta, weight), or None when
        stopping. A NaN/Inf phase yields a zero delta of weight 0 (withheld, counted, logged)."""
        self._phase = "inner"
        t0 = time.monotonic()
        result = await asyncio.get_running_loop().run_in_executor(
            self.train_pool, lambda: self.trainer.run_inner(
                start, self.settings.inner_steps, should_stop=lambda: self._stopping, on_step=self._on_step))
        self.metrics.round_phase_seconds.labels("inner").observe(time.monotonic() - t0)
        if self._stopping:
            return None
        self._samples += result.samples
        self.metrics.samples.inc(result.samples)
        delta, weight = result.delta, float(result.samples)
        if self.faults.nan(rnd):
            delta = torch.full_like(delta, float("nan"))
        if result.nonfinite or not all_finite(delta):
            self.metrics.nonfinite.inc()
            log.error("round %d: inner phase produced NaN/Inf; withholding this peer's delta", rnd)
            return torch.zeros_like(delta), 0.0
        self._loss = result.mean_loss
        self.metrics.train_loss.set(result.mean_loss)
        return delta, weight

    async def _evaluate(self) -> None:
        params = self.state.params
        self._eval = await asyncio.get_running_loop().run_in_executor(self.train_pool, self.trainer.evaluate, params)
        self.metrics.eval_loss.set(self._eval.get("loss", math.nan))
        if "accuracy" in self._eval:
            self.metrics.eval_accuracy.set(self._eval["accuracy"])

    def _on_step(self, step: int, loss: float) -> None:
        # Called on the trainer thread: only plain assignments and thread-safe metrics here.
        self._inner_step += 1
        self.metrics.inner_steps.inc()

    async def _startup_wait(self) -> None:
        """Give discovery a moment so that a peer joining a running swarm fetches its state
        before it trains, instead of training alone."""
        grace = self.cfg.sync.startup_grace_s
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._stopping:
            if self.known and not self._pending_handshakes and time.monotonic() > deadline - grace / 2:
                break
            await asyncio.sleep(0.1)
        if self._ahead() > self.state.round:
            await self._resync(self._ahead(), self.cfg.timeouts.state_transfer_timeout_s)

    async def _form_group(self, rnd: int, weight: float) -> Group | JoinReply:
        """Join round ``rnd`` through its leader; return the group, or the leader's refusal."""
        req = JoinRequest(run_id=self.cfg.run.run_id, peer_id=self.peer_id, round=rnd,
                          global_hash=self.state.global_hash, weight=weight, address=self.address)
        # The leader answers within its own matchmaking timeout; allow a margin for the network.
        timeout = self._matchmaking_timeout() + 2.0
        deadline = time.monotonic() + timeout
        unreachable: set[str] = set()
        hint: tuple[str, str] | None = None
        while time.monotonic() < deadline and not self._stopping:
            live = {pid: a for pid, a in self._live().items() if pid not in unreachable}
            if hint is not None and hint[0] not in unreachable:
                leader, address = hint
            else:
                leader = min([self.peer_id, *live])
                address = live.get(leader, "")
            hint = None
            if leader == self.peer_id:
                reply = await self.matchmaker.join(req)
            else:
                try:
                    reply = await self.client.join_round(address, req, max(0.1, deadline - time.monotonic()))
                except (PeerUnavailable, RoundError) as exc:
                    log.warning("round %d: leader %s did not answer (%s); trying the next", rnd, leader, exc)
                    unreachable.add(leader)
                    if isinstance(exc, PeerUnavailable) and exc.code == "UNAVAILABLE":
                        # Nothing listens there: it is gone. Discovery re-admits it if it returns.
                        self._drop(leader, "its address refuses connections")
                    continue
            if reply.outcome == JoinOutcome.GROUP and reply.group is not None:
                return reply.group
            if reply.outcome == JoinOutcome.NOT_LEADER and "@" in reply.leader_hint:
                pid, _, addr = reply.leader_hint.partition("@")
                if pid != leader and pid not in unreachable:
                    hint = (pid, addr)
                    continue
                # It still believes in a leader we found gone; its heartbeat will notice soon.
                await asyncio.sleep(0.2)
                continue
            if reply.outcome == JoinOutcome.REFUSED and reply.message.startswith("leaving"):
                self._drop(leader, "it is leaving")
                continue
            if reply.outcome == JoinOutcome.REFUSED and leader != self.peer_id and not self._stopping:
                # It does not know us yet (we just met, or a partition healed): introduce
                # ourselves, then ask again. The loop's deadline bounds this.
                if address not in self._pending_handshakes:
                    self._spawn(self._handshake(address, leader, attempts=1), f"handshake-{address}")
                await asyncio.sleep(0.3)
                continue
            return reply
        return JoinReply(JoinOutcome.TOO_LATE, f"no group formed for round {rnd} within {timeout:.1f} s")

    async def round_once(self, delta: torch.Tensor, weight: float) -> torch.Tensor | None:
        """One round from an already computed delta (benchmarks drive the real round code this
        way); return the averaged delta that was applied, or None if the round failed here."""
        return await self._round(self.state.round, delta, weight)

    async def _round(self, rnd: int, delta: torch.Tensor, weight: float) -> torch.Tensor | None:
        t0 = time.monotonic()
        self._phase = "matchmaking"
        await self.faults.at("join", rnd)
        formed = await self._form_group(rnd, weight)
        t1 = time.monotonic()
        self.metrics.round_phase_seconds.labels("matchmaking").observe(t1 - t0)
        if isinstance(formed, JoinReply):
            self._fail(rnd, "no_group", formed.message)
            target = max(formed.leader_round, rnd + 1) if formed.outcome != JoinOutcome.WRONG_ROUND else formed.leader_round
            if target > rnd:
                await self._resync(target, self._reduce_deadline() + self.cfg.sync.matchmaking_timeout_s)
            return None
        group = formed
        self.metrics.group_size.set(len(group.members))
        self.metrics.round_deadline_seconds.set(group.reduce_deadline_s)
        self._phase = "reduce"
        try:
            avg, stats = await self.reducer.run(group, delta, weight)
        except RoundError as exc:
            self._fail(rnd, exc.reason, str(exc))
            # Peers that completed the round show round rnd+1 at the next heartbeat; if nobody
            # did (a vanished owner fails the round for all), everyone keeps round rnd and goes on.
            if not await self._resync(rnd + 1, 3 * HEARTBEAT_S + 1.0):
                log.warning("round %d abandoned: no peer completed it; continuing from round %d", rnd, rnd)
            return None
        t2 = time.monotonic()
        reduce_s = t2 - t1
        self.metrics.round_phase_seconds.labels("reduce").observe(reduce_s)
        self._reduce_ewma_s = reduce_s if self._reduce_ewma_s is None else 0.7 * self._reduce_ewma_s + 0.3 * reduce_s
        codec = group.codec
        loop = asyncio.get_running_loop()
        self.metrics.sent_bytes.labels(codec).inc(stats.sent_bytes)
        self.metrics.received_bytes.labels(codec).inc(stats.received_bytes)
        self._bytes_sent += stats.sent_bytes
        self._bytes_received += stats.received_bytes
        if stats.encoded_bytes:
            self.metrics.compression_ratio.set(4 * self.numel / stats.encoded_bytes)
        if self.cfg.run.dump_dir:
            await loop.run_in_executor(self.codec_pool, self._dump, rnd, delta, weight, avg)
        await self.faults.at("outer", rnd)
        self._phase = "outer"
        await loop.run_in_executor(self.codec_pool, self._apply_outer, rnd, avg)
        self._completed += 1
        self.metrics.rounds.labels("completed").inc()
        self._last_round_s = time.monotonic() - t0
        self.metrics.round_phase_seconds.labels("outer").observe(time.monotonic() - t2)
        self._maybe_checkpoint()
        if self.cfg.train.eval_every_rounds and self._completed % self.cfg.train.eval_every_rounds == 0:
            await self._evaluate()
        log.info("round %d done: %d peers, %s, loss %.4f, eval %.4f, sent %d B, %.2f s (reduce %.2f s, deadline "
                 "%.1f s), group %s, global %s", rnd, len(group.members), codec, self._loss, self._eval.get("loss", math.nan),
                 stats.sent_bytes, self._last_round_s, reduce_s, group.reduce_deadline_s, group.group_id,
                 self.state.global_hash[:12])
        return avg

    def _dump(self, rnd: int, delta: torch.Tensor, weight: float, avg: torch.Tensor) -> None:
        import json

        import numpy as np

        out = Path(self.cfg.run.dump_dir) / self.peer_id
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / f"round{rnd:05d}-delta.npy", delta.numpy())
        np.save(out / f"round{rnd:05d}-avg.npy", avg.numpy())
        (out / f"round{rnd:05d}.json").write_text(json.dumps({"round": rnd, "weight": weight,
                                                              "codec": self.cfg.sync.codec}))

    def _fail(self, rnd: int, reason: str, message: str) -> None:
        self._failed += 1
        self.metrics.rounds.labels("failed").inc()
        log.warning("round %d failed (%s): %s", rnd, reason, message)


def install_signal_handlers(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)


async def run_daemon(cfg: Config) -> int:
    daemon = Daemon(cfg)
    install_signal_handlers(daemon)
    return await daemon.run()
