"""deploy/: Prometheus config and rules (promtool), the Grafana dashboard and provisioning, the
compose file and the systemd unit. No sockets: promtool and systemd-analyze run as subprocesses.

promtool comes with Debian's ``prometheus`` package (CI installs it); PyYAML is a dev dependency.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from peer.config import load_config
from peer.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "peer-swarm.json"
SYSTEMD = DEPLOY / "systemd"
DS = {"type": "prometheus", "uid": "${datasource}"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (apt-get install --no-install-recommends prometheus)")


def yaml_load(path: Path):
    yaml = pytest.importorskip("yaml", reason="PyYAML (a dev dependency) is not installed")
    return yaml.safe_load(path.read_text())


def promtool(*args: str, stdin: bytes | None = None, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, cwd=cwd, capture_output=True, timeout=60)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.extend(p.get("panels", []) if p["type"] == "row" else [p])
    return out


def rule_files() -> list[Path]:
    return sorted((PROM / "rules").glob("*.yml"))


def metric_names(expr: str) -> set[str]:
    """Raw metric names in a PromQL expression: peer_* identifiers (recording-rule names hold a
    colon and label names sit inside braces or by (...), so neither is picked up)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}|\b(by|on|without|ignoring)\s*\([^)]*\)", "", without_strings)
    return {m for m in re.findall(r"(?<![\w:])[a-zA-Z_][\w:]*", without_labels) if m.startswith("peer_")}


# ----------------------------------------------------------------- Prometheus


@needs_promtool
def test_prometheus_config_is_valid():
    # Act
    result = promtool("check", "config", "prometheus.yml")

    # Assert: also proves rule_files resolves to the rules directory.
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"2 rule files found" in result.stdout


@needs_promtool
def test_rule_files_are_valid():
    result = promtool("check", "rules", *map(str, rule_files()))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@needs_promtool
@pytest.mark.parametrize("test_file", sorted(p.name for p in (PROM / "tests").glob("*.yml")))
def test_rule_unit_tests_pass(test_file):
    result = promtool("test", "rules", f"tests/{test_file}")
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_every_rule_has_a_unit_test():
    # Prepare
    alerts, records = set(), set()
    for path in rule_files():
        for group in yaml_load(path)["groups"]:
            for rule in group["rules"]:
                (alerts.add(rule["alert"]) if "alert" in rule else records.add(rule["record"]))
    fired, evaluated = set(), set()
    for path in (PROM / "tests").glob("*.yml"):
        for case in yaml_load(path)["tests"]:
            fired |= {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
            evaluated |= {t["expr"] for t in case.get("promql_expr_test", [])}

    # Assert: each alert is shown to fire at least once, each recording rule is evaluated.
    assert alerts and alerts <= fired, f"alerts never shown firing: {sorted(alerts - fired)}"
    assert records and records <= evaluated, f"recording rules never evaluated: {sorted(records - evaluated)}"


@needs_promtool
def test_metrics_exposition_passes_promtool_lint():
    # Prepare: every collector with one child, as a running daemon has them.
    m = Metrics(CollectorRegistry())
    m.info.labels("p", "r", "digits", "int8", "true").set(1)
    m.auth_refusals.labels("identity_mismatch").inc()
    m.handshake_refusals.labels("schema_mismatch").inc()
    m.rpc_errors.labels("Reduce", "UNAVAILABLE").inc()
    m.rejected.labels("crc").inc()
    m.sent_bytes.labels("int8").inc(10)

    # Act
    result = promtool("check", "metrics", stdin=generate_latest(m.registry))

    # Assert
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def exported_names() -> set[str]:
    names = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def test_dashboard_and_rules_only_use_exported_metrics():
    # Prepare: a misspelt name would only show as "no data" (or as the 0 of a failure panel).
    used = {n for p in panels(dashboard()) for t in p["targets"] for n in metric_names(t["expr"])}
    for path in rule_files():
        for group in yaml_load(path)["groups"]:
            used |= {n for rule in group["rules"] for n in metric_names(rule["expr"])}

    # Assert
    assert used, "no metric names found; is metric_names() broken?"
    assert used <= exported_names(), f"not exported by peer.metrics: {sorted(used - exported_names())}"


def test_metric_names_helper_ignores_labels_and_recording_rules():
    expr = 'sum by (peer_id) (rate(peer_a_total{peer_id=~"peer_x"}[1m])) / run:peer_b:rate1m or vector(0)'
    assert metric_names(expr) == {"peer_a_total"}


# ----------------------------------------------------------------- Grafana


def test_dashboard_json_matches_its_generator():
    # Prepare
    spec = importlib.util.spec_from_file_location("peer_dashboard", GRAFANA / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    # Assert
    assert DASHBOARD.read_text() == module.render(), "stale: run python deploy/grafana/dashboard.py"


def test_every_panel_queries_the_datasource_variable():
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash):
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], f"{p['title']}: no targets"
        for t in p["targets"]:
            assert t["datasource"] == DS, p["title"]
            assert t["expr"].strip(), f"{p['title']}: empty expr"
            assert "$run_id" in t["expr"], f"{p['title']}: {t['expr']} ignores the run selector"


def test_dashboard_covers_the_designed_panels():
    titles = {p["title"] for p in panels(dashboard())}
    assert {"Peers", "Training loss per peer", "Evaluation loss", "Round rate", "Round phase duration",
            "Bytes per second by codec", "Compression ratio", "Rounds failed", "Rejected contributions",
            "Handshake refusals", "RPC errors"} <= titles


def test_grafana_provisioning_is_consistent():
    # Prepare
    ds = yaml_load(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    dashboards = yaml_load(GRAFANA / "provisioning" / "dashboards" / "peer.yml")
    prom = yaml_load(PROM / "prometheus.yml")
    compose = yaml_load(DEPLOY / "compose.yaml")

    # Assert: one Prometheus data source, whose timeInterval is the scrape interval
    # ($__rate_interval is derived from it).
    assert ds["apiVersion"] == 1 and dashboards["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    # The provider reads the directory compose mounts the dashboards at.
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    targets = {m["target"]: m["source"] for m in compose["services"]["grafana"]["volumes"] if isinstance(m, dict)}
    assert targets[provider["options"]["path"]] == "./grafana/dashboards"
    assert targets["/etc/grafana/provisioning"] == "./grafana/provisioning"


# ----------------------------------------------------------------- compose


def test_compose_services_and_mounts():
    # Prepare
    compose = yaml_load(DEPLOY / "compose.yaml")
    services = compose["services"]

    # Assert
    assert set(services) >= {"peer", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["network_mode"] == "host", f"{name}: mDNS and the /sd URL need the host network"
        for mount in service.get("volumes", []):
            if isinstance(mount, dict) and mount["type"] == "bind" and mount["source"].startswith("/"):
                assert mount.get("read_only"), f"{name}: host path {mount['source']} must be mounted read-only"
            elif isinstance(mount, dict) and mount["type"] == "bind":
                assert (DEPLOY / mount["source"]).exists(), f"{name}: {mount['source']} does not exist"
            else:
                volume = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
                assert volume in compose["volumes"], f"{name}: undeclared volume {volume}"
    prom_cmd = " ".join(services["prometheus"]["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom_cmd
    peer_cmd = " ".join(services["peer"]["command"])
    assert "peer run --config /etc/peer/peer.toml" in peer_cmd and "--credentials /etc/peer/credentials" in peer_cmd
    peer_mounts = {m["target"]: m["source"] for m in services["peer"]["volumes"] if isinstance(m, dict)}
    assert peer_mounts["/etc/peer/peer.toml"] == "./systemd/peer.toml"
    assert peer_mounts["/etc/peer/credentials"] == "/etc/peer/credentials"
    assert peer_mounts["/src"] == ".." and (DEPLOY / ".." / "pyproject.toml").exists()


# ----------------------------------------------------------------- systemd


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # systemd keys are case sensitive
    parser.read_string((SYSTEMD / "peer.service").read_text())
    return parser


def test_systemd_unit_settings():
    service = unit()["Service"]
    assert service["ExecStart"] == ("/opt/peer/.venv/bin/peer run --config /etc/peer/peer.toml --state-dir "
                                    "/var/lib/peer --credentials ${CREDENTIALS_DIRECTORY}")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["StateDirectory"] == "peer"
    assert int(service["TimeoutStopSec"]) == 15
    # The run credentials reach the dynamic user through systemd's credential store.
    text = (SYSTEMD / "peer.service").read_text()
    for name in ("ca.crt", "ca.key"):
        assert f"LoadCredential={name}:/etc/peer/credentials/{name}" in text


def test_example_config_loads_and_stops_within_the_unit_timeout():
    # Act: the loader the daemon uses, with no environment overrides.
    cfg = load_config(config_file=str(SYSTEMD / "peer.toml"), env={})

    # Assert
    assert cfg.run.run_id and cfg.net.metrics_port == 9470
    assert cfg.timeouts.stop_grace_s < int(unit()["Service"]["TimeoutStopSec"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found (no systemd here)")
def test_systemd_analyze_verify(tmp_path):
    # Prepare: verify checks that ExecStart exists; point it at this venv's console script.
    exe = Path(sys.executable).with_name("peer")
    if not exe.exists():
        pytest.skip(f"no console script at {exe} (pip install -e . first)")
    path = tmp_path / "peer.service"
    path.write_text((SYSTEMD / "peer.service").read_text().replace("/opt/peer/.venv/bin/peer", str(exe)))

    # Act
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)

    # Assert: unknown keys are only warnings (rc 0), so any complaint naming our unit fails too.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "peer.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
