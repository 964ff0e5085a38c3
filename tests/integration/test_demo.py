"""`peer demo` as a newcomer runs it: a real process that starts real peers, shows their
progress, stops at the rounds it announced, and ends with a summary and an exit status."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from peer.endpoint import read_endpoint

ROUND_DONE_RE = re.compile(r"round (\d+) done: (\d+) peers, .* global ([0-9a-f]{12})")


def _demo(tmp_path: Path, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "peer", "demo", "--state-dir", str(tmp_path), *args]
    # Its own session, so that a hung demo and the peers it started are killed together.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"peer demo did not finish in {timeout_s} s\n{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_trains_together_stops_at_the_announced_round_and_sums_up(tmp_path):
    rounds, steps = 3, 10
    run_id = f"demo-test-{os.getpid()}"
    res = _demo(tmp_path, "--peers", "2", "--task", "digits", "--rounds", str(rounds),
                "--inner-steps", str(steps), "--run-id", run_id)
    report = f"stdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-2000:]}"

    assert res.returncode == 0, report
    assert "peer demo:" not in res.stderr, report
    out = res.stdout
    assert f"starting 2 peers training digits together for {rounds} rounds of {steps} inner steps" in out, report

    # The summary a newcomer reads.
    assert f"Summary: 2 peers trained digits together, {rounds} rounds of {steps} steps each, in " in out, report
    assert re.search(r"^  together:  eval loss \d+\.\d{3}, accuracy \d+\.\d %", out, re.M), report
    alone = re.search(r"^  alone:     eval loss \d+\.\d{3}, accuracy \d+\.\d %  \(one peer training alone for the "
                      r"same [\d.]+ s: (\d+) rounds\)", out, re.M)
    assert alone, report
    assert re.search(r"together reached a \d+% (lower|HIGHER) eval loss than alone", out), report
    assert re.search(r"^  bytes:     each peer sent [\d.]+ (B|KiB|MiB) \(int8 model deltas, once a round\)", out, re.M)
    ratio = re.search(rf"data-parallel training would have sent .* for the same {rounds * steps} steps "
                      r"\(fp32 gradients of 9,610 parameters, all-reduced after every step\): (\d+)x more", out)
    assert ratio and int(ratio[1]) > 1, report
    same = re.search(r"^  same model on every peer: yes \(all 2 hold global hash ([0-9a-f]{12})\.\.\.\)", out, re.M)
    assert same, report

    # It stopped at the round it announced: each peer completed exactly `rounds` rounds, together,
    # ending with the hash the summary reports; the last table shows them stopped there.
    for name in ("peer0", "peer1"):
        log = (tmp_path / f"{name}.log").read_text()
        done = ROUND_DONE_RE.findall(log)
        assert [int(r) for r, _, _ in done] == list(range(rounds)), log[-3000:]
        assert all(k == "2" for _, k, _ in done), log[-3000:]
        assert done[-1][2] == same[1]
        assert f"completed {rounds} rounds; stopping" in log
        assert re.search(rf"^  {name}\s+rounds\s+\d+/{rounds}\s+stopped ", out, re.M), report

    # The lone peer ran in its own run, alone, and was stopped by the demo.
    alone_log = (tmp_path / "alone.log").read_text()
    assert f"run {run_id}-alone" in alone_log
    assert {k for _, k, _ in ROUND_DONE_RE.findall(alone_log)} <= {"1"}
    assert len(ROUND_DONE_RE.findall(alone_log)) >= int(alone[1])

    # Every peer ran with throwaway run credentials (mutual TLS), wrote its endpoint file, and
    # none is left running.
    for name in ("peer0", "peer1", "alone"):
        log = (tmp_path / f"{name}.log").read_text()
        assert "WITHOUT TLS" not in log and (tmp_path / name / "node.key").exists(), name
        ep = read_endpoint(tmp_path / name)
        assert ep is not None and ep.grpc.startswith("127.0.0.1:"), name
        assert _gone(ep.pid), f"{name} (pid {ep.pid}) is still running"


def test_demo_usage_errors_exit_2_with_one_line(tmp_path):
    for args, message in [(["--peers", "1"], "--peers must be between 2 and 16"),
                          (["--rounds", "0"], "--rounds must be at least 1"),
                          (["--inner-steps", "0"], "--inner-steps must be at least 1")]:
        res = _demo(tmp_path, *args, timeout_s=60)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr == f"peer demo: {message}\n", (args, res.stderr)
        assert res.stdout == ""


def test_demo_reports_peers_that_cannot_start(tmp_path):
    res = _demo(tmp_path, "--peers", "2", "--task", "no_such_module:NoTask", timeout_s=120)

    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert re.match(r"peer demo: (peer\d|alone) exited with \d+ before listening \(.+\); see .+\.log$", lines[0])
