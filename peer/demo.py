"""`peer demo`: several local peers on 127.0.0.1 training a built-in task together.

Starts N `peer run` processes (mDNS on loopback only), prints one progress line per peer every
few seconds (round, loss, eval loss, bytes sent), and stops them all (SIGTERM) when they have
completed the requested rounds or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peer.cli import _human, fetch_status, status_dict

LISTEN_RE = re.compile(r"listening on \S+ \(grpc (?P<grpc>\S+), metrics :(?P<metrics>\d+)\)")


def run_demo(args: argparse.Namespace) -> int:
    if not 1 <= args.peers <= 16:
        print("peer demo: --peers must be between 1 and 16", file=sys.stderr)
        return 2
    state_root = Path(args.state_dir or tempfile.mkdtemp(prefix="peer-demo-"))
    procs: list[tuple[subprocess.Popen, Path]] = []
    print(f"starting {args.peers} peers (task {args.task}, codec {args.codec}, {args.rounds} rounds); "
          f"logs and state in {state_root}", flush=True)
    try:
        for i in range(args.peers):
            state = state_root / f"peer{i}"
            state.mkdir(parents=True, exist_ok=True)
            port = args.base_port + i if args.base_port else 0
            argv = [sys.executable, "-m", "peer", "run", "--run-id", args.run_id, "--task", args.task,
                    "--codec", args.codec, "--rounds", "0", "--listen", f"127.0.0.1:{port}",
                    "--metrics-port", "0", "--interface", "127.0.0.1", "--state-dir", str(state),
                    "--threads", "1"]
            if args.inner_steps:
                argv += ["--inner-steps", str(args.inner_steps)]
            log = open(state_root / f"peer{i}.log", "wb")
            procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"}), state_root / f"peer{i}.log"))
            log.close()
        addresses = [_wait_address(p, path) for p, path in procs]
        print("peers listening at " + ", ".join(addresses), flush=True)
        return _watch(procs, addresses, args.rounds)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the peers", flush=True)
        return 130
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_address(proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = LISTEN_RE.search(log.read_text(errors="replace"))
        if m:
            return m["grpc"]
        if proc.poll() is not None:
            raise SystemExit(f"a peer exited with {proc.returncode}; see {log}")
        time.sleep(0.2)
    raise SystemExit(f"a peer did not start within {timeout_s:.0f} s; see {log}")


def _row(address: str) -> tuple[str, dict | None]:
    fmt = lambda x: "   -  " if x is None else f"{x:6.3f}"  # noqa: E731
    try:
        s = status_dict(asyncio.run(fetch_status(address, 2.0)))
    except Exception as exc:  # a peer that is busy or stopping: show it, keep watching
        return f"  {address:<21} no answer ({type(exc).__name__})", None
    return (f"  {s['peer_id']}  round {s['round']:4d}  {s['phase']:<11} loss {fmt(s['loss'])}  "
            f"eval {fmt(s['eval_loss'])}  acc {fmt(s['eval_accuracy'])}  peers {len(s['peers'])}  "
            f"sent {_human(s['bytes_sent']):>9}  {s['global_sha256'][:10]}"), s


def _watch(procs, addresses: list[str], rounds: int) -> int:
    """Print progress every 2 s until every peer reached ``rounds``; 0 if all did."""
    while True:
        rows, done = [], 0
        for (p, _), address in zip(procs, addresses):
            if p.poll() is not None:
                rows.append(f"  {address:<21} exited ({p.returncode})")
                continue
            row, s = _row(address)
            rows.append(row)
            done += bool(s and s["round"] >= rounds)
        print(time.strftime("%H:%M:%S") + "\n" + "\n".join(rows), flush=True)
        if done == len(procs):
            print(f"all {len(procs)} peers reached round {rounds}; stopping them", flush=True)
            return 0
        if all(p.poll() is not None for p, _ in procs):
            print("all peers exited early", flush=True)
            return 1
        time.sleep(2)
