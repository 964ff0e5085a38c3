"""Each benchmark in bench/ once at a tiny size, through its CLI: the JSON is complete and sane.

The hivemind and network-namespace variants are skipped, with the reason, where hivemind's venv
(bench/setup_hivemind.sh) or root + ``ip netns`` are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def bench(module: str, *args: str, timeout: float = 120) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", f"bench.{module}", *args, "--json"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"bench.{module} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_codecs_bench():
    # Execute
    out = bench("codecs", "--numel", "100000", "--reps", "2")
    # Assert
    from peer.codec import CODEC_NAMES

    assert out["clone_gbs"] > 0
    assert [row["codec"] for row in out["codecs"]] == list(CODEC_NAMES)
    for row in out["codecs"]:
        assert row["encode_gbs"] > 0 and row["decode_gbs"] > 0 and row["roundtrip_x_clone"] > 0
        assert row["max_abs_err"] <= row["error_bound"]
    int8 = next(r for r in out["codecs"] if r["codec"] == "int8")
    assert 3.9 < int8["compression"] <= 4.0


def _check_averaging(out: dict, peers: int, params: int, bits: int) -> None:
    assert "error" not in out, out.get("error")
    assert out["rounds_failed"] == 0
    assert 0 < out["min_s"] <= out["median_s"] <= out["max_s"]
    assert out["expected_bytes"] == pytest.approx(2 * (peers - 1) / peers * params * bits / 8)
    assert out["max_abs_err"] is not None and out["max_abs_err"] >= 0


def test_memory_bench():
    # Execute: two small models, so the slope is a per-parameter cost
    out = bench("memory", "--params", "200000,2000000", "--rounds", "1", timeout=240)
    # Assert: complete and sane (at these sizes the allocator's thresholds, not the peer's
    # copies, decide the slope; the per-parameter figure is for N in the millions)
    rows = out["rows"]
    assert [r["params"] for r in rows] == [200000, 2000000]
    assert all(r["peak_rss_bytes"] >= r["round_peak_rss_bytes"] > 0 for r in rows)
    assert all(r["peak_rss_bytes"] >= r["ready_peak_rss_bytes"] > 0 for r in rows)
    # every peer holds at least its state (params + momentum) and its delta: 12 bytes a parameter
    assert out["bytes_per_param"] > 12


@pytest.mark.parametrize("codec", ["int8", "fp32"])
def test_averaging_peer(codec):
    out = bench("averaging", "--system", "peer", "--peers", "2", "--params", "20000", "--codec", codec,
                "--rounds", "2", "--warmup", "1")
    _check_averaging(out, 2, 20000, 8 if codec == "int8" else 32)
    assert out["tls"] is True  # peers run as users run them: mutual TLS
    assert out["bytes_sent_per_peer"] > 0
    # Payload bytes are the codec's exact sizes: within 5% of the nominal 2(K-1)/K*N*bits/8.
    # Per-shard scale blocks round up, so a few bytes more than the whole-tensor size.
    assert out["bytes_sent_per_peer"] == pytest.approx(out["expected_payload_bytes"], rel=0.01)
    assert 1.0 <= out["bytes_ratio"] < 1.05
    assert out["max_abs_err"] <= out["err_bound"]
    if codec == "fp32":
        assert out["max_abs_err"] < 1e-6


def test_averaging_gloo():
    out = bench("averaging", "--system", "gloo", "--peers", "2", "--params", "20000", "--codec", "fp32",
                "--rounds", "2", "--warmup", "1")
    _check_averaging(out, 2, 20000, 32)
    assert out["max_abs_err"] < 1e-6


def test_averaging_hivemind():
    from bench.averaging import hivemind_available

    why = hivemind_available()
    if why:
        pytest.skip(f"hivemind variant: {why}")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "bench.averaging", "--system", "hivemind", "--peers", "2", "--params",
                        "20000", "--codec", "fp32", "--rounds", "2", "--warmup", "1", "--timeout", "60", "--json"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "in time" in out.get("error", ""):
        # hivemind's own matchmaking sometimes stalls on a loaded 2-core machine (its issue #624);
        # that is the anchor's flakiness, not the bench's: say so instead of failing.
        pytest.skip(f"hivemind did not finish a round within 60 s: {out['error'][:200]}")
    _check_averaging(out, 2, 20000, 32)
    assert out["max_abs_err"] < 1e-6


@pytest.mark.netns
def test_averaging_peer_on_rate_limited_links():
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("netns variant needs root, iproute2 and tc")
    out = bench("averaging", "--system", "peer", "--peers", "2", "--params", "20000", "--codec", "int8",
                "--rounds", "2", "--warmup", "1", "--link", "100mbit")
    if "error" in out and "netns" in out["error"]:
        pytest.skip(f"netns unavailable: {out['error']}")
    _check_averaging(out, 2, 20000, 8)
    assert out["link"] == "100mbit" and "link_emulation" in out
    # Wire bytes include TCP/IP and gRPC framing and heartbeats: at least the payload.
    assert out["wire_tx_bytes_per_peer"] >= out["bytes_sent_per_peer"] > 0


def test_overhead_bench():
    out = bench("overhead", "--tasks", "digits", "--H", "10", "--min-steps", "40", "--peers", "2", "--overlap",
                "--repeats", "2")
    (row,) = out["rows"]
    assert row["task"] == "digits" and row["H"] == 10 and row["rounds"] == 4 and row["rounds_failed"] == 0
    assert row["plain_steps_per_s"] > 0 and row["sync_steps_per_s"] > 0 and row["ratio"] > 0
    # Overlapped rounds (each while the next phase trained), every one completed; one ratio a repeat
    assert row["overlap_steps_per_s"] > 0 and row["overlap_rounds_failed"] == 0
    assert len(row["ratios"]) == len(row["overlap_ratios"]) == 2 and row["overlap_wait_s_mean"] >= 0
    # The slowest peer's phases per round, from its own metrics: every round reduced something.
    matchmaking, reduce, outer = (float(x) for x in row["phases_ms"].split("/"))
    assert reduce > 0 and outer > 0 and matchmaking >= 0


def test_convergence_bench():
    out = bench("convergence", "--tasks", "digits", "--peers", "2", "--rounds", "2", "--H", "digits=5",
                "--outer-lrs", "0.7", "--codecs", "int8,sign1+ef", "--ddp", "constant")
    methods = [(r["method"], r["codec"]) for r in out["rows"]]
    assert methods == [("ddp-constant", "fp32"), ("single", "-"), ("diloco", "int8"), ("diloco", "sign1+ef")]
    for r in out["rows"]:
        assert r["eval_loss"] > 0 and 0 <= r["accuracy"] <= 1
    ddp_bytes = out["rows"][0]["total_bytes"]
    assert 0 < out["rows"][2]["total_bytes"] < ddp_bytes


def test_state_transfer_bench():
    out = bench("state_transfer", "--params", "100000", "--reps", "2")
    # A state of N params is the params and the momentum in float32 plus a small header.
    assert 8 * 100000 < out["peer"]["bytes"] < 8 * 100000 + 4096
    assert out["peer"]["mb_per_s"] > 0 and out["raw"]["mb_per_s"] > 0 and out["ratio"] > 0


def test_overlap_bench():
    out = bench("overlap", "--task", "digits", "--peers", "2", "--H", "5", "--rounds", "3", timeout=240)
    for key in ("plain_steps_s", "sequential_steps_s", "overlap_steps_s"):
        assert out[key] > 0


def test_robust_bench():
    out = bench("robust", "--task", "digits", "--rounds", "2", "--H", "3", "--cost-numel", "10000")
    rows = {(r["attack"], r["rule"]): r for r in out["rows"]}
    assert set(rows) == {("none (4 honest)", "mean")} | {(a, r) for a in ("scale", "noise")
                                                        for r in ("mean", "trimmed_mean", "centered_clip")}
    assert all(r["eval_loss"] > 0 and r["vs_honest"] > 0 for r in out["rows"])
    assert [c["rule"] for c in out["cost"]] == ["mean", "trimmed_mean", "centered_clip"]
    assert all(c["owner_s_per_round"] > 0 for c in out["cost"])


def test_averaging_reports_tls():
    out = bench("averaging", "--system", "peer", "--peers", "2", "--params", "20000", "--rounds", "1",
                "--warmup", "0", "--insecure")
    assert out["tls"] is False and out["rounds_failed"] == 0
