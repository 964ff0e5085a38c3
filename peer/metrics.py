"""Prometheus metrics on an injected registry, the HTTP exporter and the http_sd endpoint.

Names follow ``peer_<area>_<what>_<unit>``; every label takes values from a small fixed set
(outcome, phase, codec, reason, method, code, direction), never a peer id or a round number,
so the series count stays bounded however long the run lasts.

The exporter serves, on one port:
  /metrics  Prometheus text format of the registry
  /sd       Prometheus http_sd JSON: this peer and every peer of the run it currently sees
  /healthz  "ok"
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Every collector the daemon exports. Thread safe (prometheus_client is)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.info = Gauge("peer_info", "Identity of this peer (value 1).",
                          ["peer_id", "run_id", "task", "codec", "secure"], registry=r)
        self.rounds = Counter("peer_rounds", "Rounds by outcome (completed, failed).", ["outcome"], registry=r)
        self.round_current = Gauge("peer_round_current", "Round number of this peer's global parameters.", registry=r)
        self.round_phase_seconds = Histogram(
            "peer_round_phase_duration_seconds", "Time spent in each phase of a round.", ["phase"],
            buckets=PHASE_BUCKETS, registry=r)
        self.round_deadline_seconds = Gauge(
            "peer_round_reduce_deadline_seconds", "Current (adaptive) all-reduce deadline.", registry=r)
        self.group_size = Gauge("peer_round_group_size_peers", "Members of the last round's group.", registry=r)
        self.live_peers = Gauge("peer_swarm_live_peers", "Peers of this run this peer is connected to.", registry=r)
        self.inner_steps = Counter("peer_train_inner_steps", "Inner optimizer steps taken.", registry=r)
        self.samples = Counter("peer_train_samples", "Training samples consumed.", registry=r)
        self.local_ranks = Gauge("peer_train_local_ranks", "Local ranks (processes) this peer trains with.",
                                 registry=r)
        self.rank_samples = Counter("peer_train_rank_samples", "Training samples consumed, by local rank.",
                                    ["rank"], registry=r)
        self.train_loss = Gauge("peer_train_loss", "Mean training loss of the last inner phase.", registry=r)
        self.inner_lr = Gauge("peer_train_inner_lr", "Inner learning rate of the last inner step (the schedule's "
                              "value at its global inner step).", registry=r)
        self.eval_loss = Gauge("peer_eval_loss", "Evaluation loss of the global parameters.", registry=r)
        self.eval_accuracy = Gauge("peer_eval_accuracy_ratio", "Evaluation accuracy of the global parameters.",
                                   registry=r)
        self.nonfinite = Counter("peer_train_nonfinite", "Inner phases that produced NaN/Inf (delta withheld).",
                                 registry=r)
        self.sent_bytes = Counter("peer_net_sent_bytes", "Payload bytes sent, by codec.", ["codec"], registry=r)
        self.received_bytes = Counter("peer_net_received_bytes", "Payload bytes received, by codec.", ["codec"],
                                      registry=r)
        self.compression_ratio = Gauge("peer_codec_compression_ratio",
                                       "fp32 bytes / encoded bytes of the last round's delta.", registry=r)
        self.state_transfers = Counter("peer_state_transfers", "State transfers by direction and outcome.",
                                       ["direction", "outcome"], registry=r)
        self.handshake_refusals = Counter("peer_handshake_refusals", "Handshakes refused, by reason.", ["reason"],
                                          registry=r)
        self.rpc_errors = Counter("peer_rpc_errors", "Failed RPCs by method and gRPC status code.",
                                  ["method", "code"], registry=r)
        self.rejected = Counter("peer_sync_rejected_contributions",
                                "Contributions an owner left out of a round, by reason.", ["reason"], registry=r)
        self.auth_refusals = Counter("peer_auth_refusals", "Calls refused because they named another peer than "
                                     "their certificate proves, by reason.", ["reason"], registry=r)
        self.invalid_claims = Counter("peer_sync_invalid_claims", "What other peers told this peer that failed its "
                                      "checks where it arrived (a group, a state, an averaged shard), by reason.",
                                      ["reason"], registry=r)
        self.excluded = Counter("peer_sync_excluded", "Members left out of leading or of groups for a while, by "
                                "reason.", ["reason"], registry=r)
        self.split_adoptions = Counter(
            "peer_sync_split_adoptions", "States adopted without a majority: no two peers shared a state and this one "
            "had made no progress for a while, so it took the highest round's (peer.membership.Membership.split).",
            registry=r)
        self.discovery_ignored = Counter("peer_discovery_ignored", "Discovered services ignored, by reason.",
                                         ["reason"], registry=r)
        self.mirror_active = Gauge(
            "peer_sync_device_mirror_active", "1 while each round's answers are applied on the training device "
            "(peer.sync.mirror); 0 without a mirror or after it switched itself off.", registry=r)
        self.mirror_off = Counter(
            "peer_sync_device_mirror_off", "Times the device mirror switched itself off, by reason (error: the "
            "device step failed, e.g. out of memory; bits: its result differed from the host's).", ["reason"],
            registry=r)
        self.checkpoints = Counter("peer_checkpoint_writes", "Checkpoints written, by outcome.", ["outcome"],
                                   registry=r)
        for outcome in ("completed", "failed"):
            self.rounds.labels(outcome)
        # Not measured yet: NaN (a gap on a graph), not 0, which would read as a perfect loss and
        # pull min_over_time() down in the loss alerts.
        for gauge in (self.train_loss, self.eval_loss, self.eval_accuracy, self.inner_lr):
            gauge.set(math.nan)
        for direction in ("served", "received"):
            self.state_transfers.labels(direction, "ok")


Targets = Callable[[], list[dict]]


class Exporter:
    """HTTP server for /metrics, /sd and /healthz on its own thread (outside the event loop).

    ``targets`` is called on the HTTP thread; it must return a fresh list and be thread safe.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, targets: Targets) -> None:
        self._registry = registry
        self._targets = targets
        handler = self._handler()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Blocks until the HTTP thread ended (up to 5 s): call it off the event loop."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype = generate_latest(exporter._registry), CONTENT_TYPE_LATEST
                elif path == "/sd":
                    body, ctype = json.dumps(exporter._targets()).encode(), "application/json"
                elif path == "/healthz":
                    body, ctype = b"ok\n", "text/plain"
                else:
                    self.send_error(404, "try /metrics, /sd or /healthz")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("metrics http: " + format, *args)

        return Handler


def sd_group(address: str, run_id: str, peer_id: str) -> dict:
    """One http_sd target group: a metrics endpoint labelled with run and peer."""
    return {"targets": [address], "labels": {"run_id": run_id, "peer_id": peer_id}}
