"""Generates dashboards/peer-swarm.json, the Grafana dashboard of a peer swarm.

    python deploy/grafana/dashboard.py            # rewrite the JSON
    python deploy/grafana/dashboard.py --check    # exit 1 if the committed JSON is stale

Plain dicts, standard library only: the JSON is what Grafana imports (schemaVersion 39, Grafana
10.4 and later). Every panel and target reads the ``${datasource}`` variable, and every query
filters on ``$run_id`` (and ``$peer_id`` where it is per peer), so one Grafana can watch several
runs. tests/unit/test_deploy_files.py checks that the committed JSON equals this output, and
tests/integration/test_monitoring.py runs every query against a Prometheus scraping real peers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).parent / "dashboards" / "peer-swarm.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'run_id=~"$run_id"'
PEER = f'{RUN}, peer_id=~"$peer_id"'
# A failure counter has no series until its first failure (its labels are not known before);
# show 0 then instead of "No data", labelled so the legend says so.
NO_FAILURES = 'or on() label_replace(vector(0), "{label}", "none", "", "")'


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def panel(kind: str, title: str, description: str, targets: list[tuple[str, str]], grid: tuple[int, int, int, int],
          unit: str = "short", **options) -> dict:
    x, y, w, h = grid
    body = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
    }
    if kind == "timeseries":
        body["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                           "tooltip": {"mode": "multi", "sort": "desc"}}
    elif kind == "stat":
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                           "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    body["options"] = {**body.get("options", {}), **options}
    return body


def row(title: str, y: int) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": []}


def failures(metric: str, by: str) -> str:
    label = by.split(",")[-1].strip()
    return (f"sum by ({by}) (rate({metric}{{{RUN}}}[$__rate_interval])) "
            + NO_FAILURES.format(label=label))


def panels() -> list[dict]:
    def quantile(q: str) -> str:
        return (f"histogram_quantile({q}, sum by (phase, le) "
                f"(rate(peer_round_phase_duration_seconds_bucket{{{RUN}}}[$__rate_interval])))")

    out = [
        row("Swarm", 0),
        panel("timeseries", "Peers", "Peers scraped (up, from any peer's /sd), and the size of the last round's "
              "group as each peer saw it.",
              [(f"sum(up{{{RUN}}})", "peers up"),
               (f"max(peer_round_group_size_peers{{{RUN}}})", "round group size")],
              (0, 1, 8, 7)),
        panel("stat", "Round", "Round number of the global parameters (the most advanced peer).",
              [(f"max(peer_round_current{{{RUN}}})", "round")], (8, 1, 4, 7)),
        panel("stat", "Samples/s", "Training samples consumed per second by the whole swarm.",
              [(f"sum(rate(peer_train_samples_total{{{RUN}}}[$__rate_interval]))", "samples/s")],
              (12, 1, 4, 7), unit="short"),
        panel("timeseries", "Samples/s per peer", "Training throughput of each peer.",
              [(f"sum by (peer_id) (rate(peer_train_samples_total{{{PEER}}}[$__rate_interval]))", "{{peer_id}}")],
              (16, 1, 8, 7)),
        row("Training", 8),
        panel("timeseries", "Training loss per peer", "Mean training loss of each peer's last inner phase.",
              [(f"peer_train_loss{{{PEER}}}", "{{peer_id}}")], (0, 9, 8, 8)),
        panel("timeseries", "Evaluation loss", "Evaluation loss of the global parameters (equal on peers in step).",
              [(f"peer_eval_loss{{{PEER}}}", "{{peer_id}}")], (8, 9, 8, 8)),
        panel("timeseries", "Evaluation accuracy", "Evaluation accuracy of the global parameters.",
              [(f"peer_eval_accuracy_ratio{{{PEER}}}", "{{peer_id}}")], (16, 9, 8, 8), unit="percentunit"),
        row("Rounds", 17),
        panel("timeseries", "Round rate", "Rounds completed per second by the swarm (its fastest peer: every "
              "member counts a round) and rounds failed per second, summed over peers.",
              [(f'max(rate(peer_rounds_total{{outcome="completed", {RUN}}}[$__rate_interval]))', "completed"),
               (f'sum(rate(peer_rounds_total{{outcome="failed", {RUN}}}[$__rate_interval]))', "failed")],
              (0, 18, 8, 8), unit="ops"),
        panel("timeseries", "Round phase duration", "Median and 90th percentile of each round phase over all "
              "peers (inner training, matchmaking, all-reduce, outer step, resync).",
              [(quantile("0.5"), "p50 {{phase}}"), (quantile("0.9"), "p90 {{phase}}")],
              (8, 18, 10, 8), unit="s"),
        panel("timeseries", "All-reduce deadline", "The adaptive all-reduce deadline each peer applies.",
              [(f"peer_round_reduce_deadline_seconds{{{PEER}}}", "{{peer_id}}")], (18, 18, 6, 8), unit="s"),
        row("Network", 26),
        panel("timeseries", "Bytes per second by codec", "Payload bytes sent and received per second, summed "
              "over peers, by wire codec.",
              [(f"sum by (codec) (rate(peer_net_sent_bytes_total{{{RUN}}}[$__rate_interval]))", "sent {{codec}}"),
               (f"sum by (codec) (rate(peer_net_received_bytes_total{{{RUN}}}[$__rate_interval]))",
                "received {{codec}}")],
              (0, 27, 10, 8), unit="Bps"),
        panel("timeseries", "Compression ratio", "fp32 bytes / encoded bytes of each peer's last delta.",
              [(f"peer_codec_compression_ratio{{{PEER}}}", "{{peer_id}}")], (10, 27, 7, 8)),
        panel("timeseries", "State transfers", "Full-state transfers (a joining or lagging peer catching up) "
              "per second, by direction and outcome.",
              [(f"sum by (direction, outcome) (rate(peer_state_transfers_total{{{RUN}}}[$__rate_interval]))",
                "{{direction}} {{outcome}}")],
              (17, 27, 7, 8), unit="ops"),
        row("Failures", 35),
        panel("timeseries", "Rounds failed", "Rounds each peer lost (timeouts, a member gone, a bad part) per "
              "second.",
              [(f'sum by (peer_id) (rate(peer_rounds_total{{outcome="failed", {PEER}}}[$__rate_interval]))',
                "{{peer_id}}")],
              (0, 36, 6, 8), unit="ops"),
        panel("timeseries", "Rejected contributions", "Contributions an owner left out of a round, by reason, "
              "per second.",
              [(failures("peer_sync_rejected_contributions_total", "reason"), "{{reason}}")],
              (6, 36, 6, 8), unit="ops"),
        panel("timeseries", "Handshake refusals", "Handshakes refused per second, by reason (another schema, "
              "protocol or run is announcing itself).",
              [(failures("peer_handshake_refusals_total", "reason"), "{{reason}}")],
              (12, 36, 6, 8), unit="ops"),
        panel("timeseries", "RPC errors", "Failed RPCs per second by method and gRPC status code.",
              [(failures("peer_rpc_errors_total", "method, code"), "{{method}} {{code}}")],
              (18, 36, 6, 8), unit="ops"),
        panel("timeseries", "Non-finite inner phases", "Inner phases that produced NaN/Inf per second (the "
              "delta is withheld).",
              [(f"sum by (peer_id) (rate(peer_train_nonfinite_total{{{PEER}}}[$__rate_interval]))", "{{peer_id}}")],
              (0, 44, 12, 6), unit="ops"),
        panel("timeseries", "Checkpoint writes", "Checkpoints written per second, by outcome.",
              [(f"sum by (outcome) (rate(peer_checkpoint_writes_total{{{RUN}}}[$__rate_interval]))", "{{outcome}}")],
              (12, 44, 12, 6), unit="ops"),
        row("Devices", 50),
        panel("timeseries", "Samples/s per local rank", "Training samples per second of each local rank of a "
              "peer that spans several devices (peer run --local-workers N); a peer's rank count beside it.",
              [(f"sum by (peer_id, rank) (rate(peer_train_rank_samples_total{{{PEER}}}[$__rate_interval])) "
                + NO_FAILURES.format(label="rank"), "{{peer_id}} rank {{rank}}"),
               (f"peer_train_local_ranks{{{PEER}}}", "{{peer_id}} ranks")],
              (0, 51, 12, 7)),
        panel("timeseries", "Device mirror", "1 while a GPU peer applies each round's answers on its device "
              "(peer.sync.mirror), 0 without one or after it switched itself off; switches off by reason "
              "(error: the device step failed; bits: the device's result differed from the host's).",
              [(f"peer_sync_device_mirror_active{{{PEER}}}", "{{peer_id}} active"),
               (f"sum by (reason) (increase(peer_sync_device_mirror_off_total{{{RUN}}}[$__rate_interval])) "
                + NO_FAILURES.format(label="reason"), "off: {{reason}}")],
              (12, 51, 12, 7)),
    ]
    for i, p in enumerate(out, start=1):
        p["id"] = i
    return out


def variables() -> list[dict]:
    def query_var(name: str, label: str, query: str) -> dict:
        return {"type": "query", "name": name, "label": label, "datasource": DS,
                "query": {"query": query, "refId": f"{name}-var"}, "definition": query, "refresh": 2,
                "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}

    return [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": ""},
        query_var("run_id", "Run", "label_values(peer_info, run_id)"),
        query_var("peer_id", "Peer", 'label_values(peer_info{run_id=~"$run_id"}, peer_id)'),
    ]


def dashboard() -> dict:
    return {
        "uid": "peer-swarm",
        "title": "peer swarm",
        "description": "DiLoCo peers of one or more runs: membership, training, rounds, network, failures.",
        "tags": ["peer", "diloco"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "links": [],
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale; run: python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
