"""mDNS discovery between real processes: on 127.0.0.1, and across network namespaces.

Safety: in the root namespace every process binds 127.0.0.1 only; the default (all interfaces)
is used only inside namespaces this test creates and deletes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peer.discovery import browse_once
from peer.types import PROTOCOL_VERSION

try:
    from tests.integration._netns import NetnsUnavailable, bridged_namespaces
except ImportError:  # tests/ not importable as a package: the test's own folder is on sys.path
    from _netns import NetnsUnavailable, bridged_namespaces

ROOT = Path(__file__).resolve().parents[2]

# One discovery peer: JSON lines on stdout ("started", "join", "leave", "stopped"), goodbye on SIGTERM.
RUNNER = r"""
import asyncio, json, signal, sys, time
from dataclasses import asdict
from peer.discovery.mdns import MdnsDiscovery

def out(**fields):
    fields["t"] = time.monotonic()
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()

async def main(cfg):
    d = MdnsDiscovery(run_id=cfg["run_id"], peer_id=cfg["peer_id"], grpc_port=cfg["grpc_port"],
                      metrics_port=cfg["metrics_port"], advertise_host=None, interfaces=cfg["interfaces"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def pump():
        async for ev in d.events():
            out(kind=ev.kind, **asdict(ev.record))

    pump_task = asyncio.create_task(pump())
    await d.start()
    out(kind="started", advertised=d.advertised_addresses)
    await stop.wait()
    t0 = time.monotonic()
    await d.stop()
    await asyncio.wait_for(pump_task, 5)
    out(kind="stopped", ignored_other_run=d.ignored_other_run, malformed=d.malformed,
        stop_s=time.monotonic() - t0)

asyncio.run(main(json.loads(sys.argv[1])))
"""

# A foreign announcement of our service type whose TXT is broken ("proto=one").
MALFORMED = r"""
import asyncio, json, signal, sys
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
from peer.discovery.base import SERVICE_TYPE

async def main(cfg):
    azc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(SERVICE_TYPE, cfg["peer_id"] + "." + SERVICE_TYPE, port=7000,
                            properties={"run": cfg["run_id"], "id": cfg["peer_id"], "proto": "one",
                                        "grpc": "7000", "metrics": "7001"},
                            server=cfg["peer_id"] + ".local.", parsed_addresses=["127.0.0.1"])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await (await azc.async_register_service(info))
    print(json.dumps({"kind": "started"}), flush=True)
    await stop.wait()
    await (await azc.async_unregister_service(info))
    await azc.async_close()

asyncio.run(main(json.loads(sys.argv[1])))
"""

Event = dict[str, Any]


class Proc:
    """A child process whose stdout JSON lines are collected by a thread; waits are bounded."""

    def __init__(self, argv: list[str], peer_id: str) -> None:
        self.peer_id = peer_id
        self.spawned_at = time.monotonic()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.events: list[Event] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"kind": "garbage", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr.append(line)

    def wait_for(self, pred: Callable[[Event], bool], deadline: float, what: str) -> Event:
        with self._cond:
            while True:
                for event in self.events:
                    if pred(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._threads[0].is_alive()):
                    raise AssertionError(
                        f"{self.peer_id}: no {what} in time; events={self.events}; stderr tail:\n"
                        + "".join(self.stderr[-30:])
                    )
                self._cond.wait(min(left, 0.2))

    def joins(self) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e["kind"] == "join"]

    def terminate_and_wait(self, timeout_s: float) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout_s)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        for thread in self._threads:
            thread.join(2)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def _peer(procs: list[Proc], run_id: str, interfaces: list[str] | None, wrap=lambda argv: argv) -> Proc:
    peer_id = uuid.uuid4().hex[:12]
    port = 20000 + len(procs) * 2
    cfg = {"run_id": run_id, "peer_id": peer_id, "grpc_port": port, "metrics_port": port + 1, "interfaces": interfaces}
    proc = Proc(wrap([sys.executable, "-c", RUNNER, json.dumps(cfg)]), peer_id)
    procs.append(proc)
    return proc


def _is_join(peer_id: str) -> Callable[[Event], bool]:
    return lambda e: e["kind"] == "join" and e["peer_id"] == peer_id


def _is_leave(peer_id: str) -> Callable[[Event], bool]:
    return lambda e: e["kind"] == "leave" and e["peer_id"] == peer_id


def _is(kind: str) -> Callable[[Event], bool]:
    return lambda e: e["kind"] == kind


def _grpc_port(p: Proc) -> int:
    cfg = json.loads(p.popen.args[-1])
    return cfg["grpc_port"]


def _report(label: str, values: list[float]) -> None:
    print(f"{label}: min {min(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms (n={len(values)})")


def test_loopback_peers_find_each_other_ignore_other_runs_and_see_leave(procs: list[Proc]) -> None:
    # Prepare: three peers of one run, one of another run, one broken announcement.
    run_id, other_run = f"run-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    peers = [_peer(procs, run_id, ["127.0.0.1"]) for _ in range(3)]
    stranger = _peer(procs, other_run, ["127.0.0.1"])
    broken_id = f"broken{uuid.uuid4().hex[:8]}"  # unique: parallel runs share 127.0.0.1:5353
    broken = Proc([sys.executable, "-c", MALFORMED, json.dumps({"run_id": run_id, "peer_id": broken_id})], broken_id)
    procs.append(broken)

    # Assert: everyone of the run sees the two others within 10 s, with full records.
    deadline = time.monotonic() + 10
    started = {p.peer_id: p.wait_for(_is("started"), deadline, "start") for p in peers}
    latency_spawn, latency_registered = [], []
    for p in peers:
        for q in peers:
            if q is p:
                continue
            join = p.wait_for(_is_join(q.peer_id), deadline, f"join of {q.peer_id}")
            assert join["run_id"] == run_id
            assert join["host"] == "127.0.0.1"
            assert join["grpc_port"] == _grpc_port(q) and join["metrics_port"] == _grpc_port(q) + 1
            assert join["protocol_version"] == PROTOCOL_VERSION
            latency_spawn.append(join["t"] - max(p.spawned_at, q.spawned_at))
            latency_registered.append(join["t"] - max(started[p.peer_id]["t"], started[q.peer_id]["t"]))
    stranger.wait_for(_is("started"), deadline, "start")
    broken.wait_for(_is("started"), deadline, "start")
    _report("loopback join latency from spawn", latency_spawn)
    _report("loopback join latency from both registered", latency_registered)

    # Execute: browse like `peer peers` does.
    async def browse() -> tuple[list, list]:
        return await asyncio.gather(
            browse_once(run_id, ["127.0.0.1"], 2.5), browse_once(None, ["127.0.0.1"], 2.5)
        )

    of_run, of_all = asyncio.run(browse())

    # Assert: the run's peers, sorted; the stranger only when asking for every run.
    assert [r.peer_id for r in of_run] == sorted(p.peer_id for p in peers)
    assert {r.address for r in of_run} == {f"127.0.0.1:{_grpc_port(p)}" for p in peers}
    assert {p.peer_id for p in peers} | {stranger.peer_id} <= {r.peer_id for r in of_all}
    assert broken_id not in {r.peer_id for r in of_all}
    for p in peers:
        assert {e["peer_id"] for e in p.joins()} == {q.peer_id for q in peers if q is not p}
    assert stranger.joins() == []

    # Execute: one peer leaves with SIGTERM (goodbye).
    leaver, stayers = peers[2], peers[:2]
    t0 = time.monotonic()
    assert leaver.terminate_and_wait(10) == 0
    stopped = leaver.wait_for(_is("stopped"), time.monotonic() + 1, "stopped line")
    leave_latency = [s.wait_for(_is_leave(leaver.peer_id), t0 + 10, "leave")["t"] - t0 for s in stayers]
    _report("loopback leave latency after SIGTERM", leave_latency)
    print(f"stop() (goodbye + close) took {stopped['stop_s'] * 1000:.0f} ms")

    # Assert: the others saw the stranger and the broken record, and ignored them.
    for s in stayers:
        assert s.terminate_and_wait(10) == 0
        stats = s.wait_for(_is("stopped"), time.monotonic() + 1, "stopped line")
        assert stats["ignored_other_run"] >= 1, stats
        assert stats["malformed"] >= 1, stats  # >= : parallel runs share 127.0.0.1


@pytest.mark.netns
def test_peers_in_separate_network_namespaces_find_each_other(procs: list[Proc]) -> None:
    with contextlib.ExitStack() as stack:
        try:
            hosts = stack.enter_context(bridged_namespaces(3, "pdisc"))
        except NetnsUnavailable as exc:
            pytest.skip(f"network namespaces unavailable: {exc}")
        # Close the processes before the namespaces go (the fixture kills again, harmlessly).
        stack.callback(lambda: [p.kill() for p in procs])

        # Prepare: one peer per namespace with the real-LAN default (all interfaces).
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        peers = [_peer(procs, run_id, None, wrap=host.exec_argv) for host in hosts]
        ip_of = {p.peer_id: h.ip for p, h in zip(peers, hosts)}

        # Assert: each sees the two others at their namespace address within 15 s.
        deadline = time.monotonic() + 15
        started = {p.peer_id: p.wait_for(_is("started"), deadline, "start") for p in peers}
        for p in peers:
            assert started[p.peer_id]["advertised"] == [ip_of[p.peer_id]]
        latency = []
        for p in peers:
            for q in peers:
                if q is not p:
                    join = p.wait_for(_is_join(q.peer_id), deadline, f"join of {q.peer_id}")
                    assert join["host"] == ip_of[q.peer_id]
                    latency.append(join["t"] - max(started[p.peer_id]["t"], started[q.peer_id]["t"]))
        _report("netns join latency from both registered", latency)
        _report("netns join latency from spawn", [e - min(p.spawned_at for p in peers) for e in
                                                  [j["t"] for p in peers for j in p.joins()]])

        # Execute + Assert: a SIGTERM'd peer is seen leaving.
        t0 = time.monotonic()
        assert peers[0].terminate_and_wait(10) == 0
        leave = [p.wait_for(_is_leave(peers[0].peer_id), t0 + 10, "leave")["t"] - t0 for p in peers[1:]]
        _report("netns leave latency after SIGTERM", leave)
