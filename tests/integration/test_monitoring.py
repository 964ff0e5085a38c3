"""The monitoring side against real processes: three `peer run` peers on 127.0.0.1 and a real
Prometheus that finds them through ONE peer's /sd, loads the project's rule files, and answers
every query of the Grafana dashboard.

Needs the ``prometheus`` and ``promtool`` binaries (Debian package ``prometheus``; CI installs it).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.integration._peers import Swarm, wait_until

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "peer-swarm.json"

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="prometheus/promtool not found (apt-get install --no-install-recommends prometheus)")

# Grafana's built-in variables, as Grafana would expand them for a 1 s scrape interval
# ($__rate_interval is at least four scrape intervals).
GRAFANA_VARS = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "1m"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout_s: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.load(r)


def get_text(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read()


class Prometheus:
    """A real Prometheus on 127.0.0.1 with the project's rules and one http_sd entry."""

    def __init__(self, tmp: Path, sd_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # YAML is a superset of JSON; the rule files are the committed ones, by absolute path.
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(p) for p in sorted((PROM / "rules").glob("*.yml"))],
            "scrape_configs": [{
                "job_name": "peer",
                "honor_labels": True,
                "http_sd_configs": [{"url": sd_url, "refresh_interval": "1s"}],
            }],
        }
        self.config_path = tmp / "prometheus.yml"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log_path = tmp / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={self.config_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def query(self, expr: str) -> dict:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return get_json(url)
        except urllib.error.HTTPError as exc:  # 400 with a JSON body for a bad expression
            return json.load(exc)

    def targets(self) -> list[dict]:
        return get_json(f"{self.url}/api/v1/targets?state=active")["data"]["activeTargets"]

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def dashboard_queries(run_id: str) -> list[tuple[str, str]]:
    """(panel title, expr) for every target, with dashboard and Grafana variables filled in."""
    dash = json.loads(DASHBOARD.read_text())
    values = {**GRAFANA_VARS, "$run_id": run_id, "$peer_id": ".*"}
    out = []
    for p in dash["panels"]:
        for target in p.get("targets", []):
            expr = target["expr"]
            for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{p['title']}: unexpanded variable in {expr}"
            out.append((p["title"], expr))
    return out


def recorded_rules() -> list[str]:
    names = []
    for path in sorted((PROM / "rules").glob("*.yml")):
        # "- record: name" lines; the rule files are checked as YAML by the unit tests.
        names += [line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                  if line.strip().startswith("- record:")]
    return names


def test_prometheus_scrapes_the_swarm_through_one_peer_and_answers_every_panel(tmp_path):
    run_id = f"mon-{uuid.uuid4().hex[:8]}"
    with Swarm(tmp_path, run_id) as swarm:
        # Prepare: three peers; Prometheus knows only the first one's /sd.
        peers = [swarm.start(f"p{i}", wait=False) for i in range(3)]
        for p in peers:
            p.wait_listening()
        logs = lambda: "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in peers)  # noqa: E731
        sd_url = f"http://127.0.0.1:{peers[0].metrics_port}/sd"
        expected = {p.peer_id: f"127.0.0.1:{p.metrics_port}" for p in peers}

        # /sd of one peer lists all three, labelled with run and peer.
        def sd_complete():
            groups = get_json(sd_url)
            listed = {g["labels"]["peer_id"]: g["targets"][0] for g in groups}
            return listed == expected and all(g["labels"]["run_id"] == run_id for g in groups)

        wait_until(sd_complete, 20, "/sd listing all three peers", logs)

        prom = Prometheus(tmp_path, sd_url)
        try:
            prom_logs = lambda: logs() + f"\n--- prometheus\n{prom.tail()}"  # noqa: E731

            # Act 1: all three peers are up in Prometheus, found through that one /sd.
            def all_up():
                up = {t["labels"].get("peer_id") for t in prom.targets() if t["health"] == "up"}
                return up == set(expected)

            wait_until(all_up, 20, "all three peers up in /api/v1/targets", prom_logs)

            # Act 2: every panel query parses at once, and returns data once a few rounds were scraped.
            queries = dashboard_queries(run_id)
            assert len(queries) >= 15
            for title, expr in queries:
                reply = prom.query(expr)
                assert reply["status"] == "success", f"{title}: {expr}: {reply.get('error')}"
            pending: list[tuple[str, str]] = []

            def all_panels_answer():
                pending[:] = [(title, expr) for title, expr in queries if not prom.query(expr)["data"]["result"]]
                return not pending

            t0 = time.monotonic()
            try:
                wait_until(all_panels_answer, 30, "every dashboard query to return data", prom_logs)
            except AssertionError as exc:
                raise AssertionError(f"panels without data: {json.dumps(list(pending), indent=1)}\n{exc}") from None
            panels_s = time.monotonic() - t0

            # Act 3: the recording rules produce series for this run.
            names = recorded_rules()
            assert names

            def rules_recorded():
                return all(prom.query(f'{n}{{run_id="{run_id}"}}')["data"]["result"] for n in names)

            wait_until(rules_recorded, 15, f"recording rules {names} to produce data", prom_logs)

            # Assert: numbers that say the swarm is what the dashboard shows.
            peers_up = prom.query(f'run:peer_up:sum{{run_id="{run_id}"}}')["data"]["result"]
            assert float(peers_up[0]["value"][1]) == 3
            samples = prom.query(f'run:peer_train_samples:rate1m{{run_id="{run_id}"}}')["data"]["result"]
            assert float(samples[0]["value"][1]) > 0
            bytes_by_codec = prom.query(f'run_codec:peer_net_sent_bytes:rate1m{{run_id="{run_id}"}}')
            assert {r["metric"]["codec"] for r in bytes_by_codec["data"]["result"]} == {"int8"}
            # peer_info feeds the dashboard's run/peer selectors: one series per peer, with its own
            # run_id/peer_id kept (honor_labels), not renamed to exported_*.
            info = prom.query(f'peer_info{{run_id="{run_id}"}}')["data"]["result"]
            assert {r["metric"]["peer_id"] for r in info} == set(expected)
            assert not [k for r in info for k in r["metric"] if k.startswith("exported_")], info
            alerts = get_json(f"{prom.url}/api/v1/rules?type=alert")["data"]["groups"]
            assert all(r["health"] == "ok" for g in alerts for r in g["rules"]), dump_rules(alerts)

            # promtool's linter accepts a live peer's exposition.
            body = get_text(f"http://127.0.0.1:{peers[1].metrics_port}/metrics")
            lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
            assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
            print(f"panels answered {panels_s:.1f} s after all targets were up")
        finally:
            prom.stop()


def dump_rules(groups: list[dict]) -> str:
    return json.dumps([{r["name"]: r.get("lastError", "")} for g in groups for r in g["rules"]], indent=1)
