"""Real `peer run` processes for integration tests: start, read their addresses, ask, stop.

Every process is started in its own session and killed on exit of the ``Swarm`` context, also
when a test fails. Waits are bounded; a timeout fails with the process's log tail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import peer.transport  # noqa: F401  (see below)
from peer.client import fetch_status, status_dict

# peer.client imports grpc and torch (peer.transport) on its first call, on the caller's event
# loop; that import took 0.6-0.9 s on a loaded machine and tripped the suite's blocked-loop check
# (0.5 s) in the first ``status()`` of a test. Imported here, once, outside any loop.

LISTEN_RE = re.compile(r"listening on \S+ \(grpc (?P<grpc>\S+), metrics :(?P<metrics>\d+)\)")
PEER_RE = re.compile(r"peer (?P<id>[\w-]+) listening")

_CREDENTIALS: dict[str, Path] = {}


def credentials_for(run_id: str) -> Path:
    """Run credentials for ``run_id``, made once per test session (removed at exit)."""
    if run_id not in _CREDENTIALS:
        import atexit
        import shutil
        import tempfile

        from peer.credentials import create_run_credentials

        root = Path(tempfile.mkdtemp(prefix="peer-test-creds-"))
        atexit.register(shutil.rmtree, root, True)
        _CREDENTIALS[run_id] = create_run_credentials(run_id, root / run_id)
    return _CREDENTIALS[run_id]


def place_key_sorting_like(state_dir: Path, wanted: str) -> str:
    """Put a node key into ``state_dir`` (unless one is there) whose derived peer id starts with
    the hex of ``wanted``'s last character, so that ids like p0 < p1 < p9 keep their order.
    Returns the derived id. About 256 key generations: a few milliseconds."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from peer.credentials import NODE_KEY, _pem_key, _write_private, peer_id_of_public_key

    path = state_dir / NODE_KEY
    prefix = wanted[-1].encode().hex()
    state_dir.mkdir(parents=True, exist_ok=True)
    if path.exists():
        from cryptography.hazmat.primitives import serialization

        return peer_id_of_public_key(serialization.load_pem_private_key(path.read_bytes(), None).public_key())
    while True:
        key = ec.generate_private_key(ec.SECP256R1())
        peer_id = peer_id_of_public_key(key.public_key())
        if peer_id.startswith(prefix):
            _write_private(path, _pem_key(key))
            return peer_id


# Small, fast settings for tests on a 2-core machine.
FAST = ["--inner-steps", "10", "--matchmaking-timeout-s", "3", "--startup-grace-s", "4",
        "--eval-every-rounds", "1", "--log-level", "INFO"]


@dataclass
class PeerProc:
    name: str
    proc: subprocess.Popen
    log_path: Path
    argv_prefix: list[str] = field(default_factory=list)
    credentials: str | None = None
    grpc: str = ""
    metrics_port: int = 0
    peer_id: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def wait_listening(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = LISTEN_RE.search(self.log())
            if m:
                self.grpc, self.metrics_port = m["grpc"], int(m["metrics"])
                self.peer_id = PEER_RE.search(self.log())["id"]
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not listen within {timeout_s} s:\n{self.tail()}")

    def status(self, timeout_s: float = 5.0) -> dict:
        return status_dict(asyncio.run(fetch_status(self.grpc, timeout_s, self.credentials)))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def alive(self) -> bool:
        return self.proc.poll() is None


class Swarm:
    """A set of peer processes sharing a tmp directory; a context manager that kills them all."""

    def __init__(self, tmp: Path, run_id: str, base_args: Sequence[str] = ()) -> None:
        self.tmp = tmp
        self.run_id = run_id
        self.base_args = list(base_args)
        self.peers: list[PeerProc] = []

    def start(self, name: str, *args: str, run_id: str | None = None, netns_argv: Sequence[str] = (),
              listen: str = "127.0.0.1:0", interface: str | None = "127.0.0.1", env: dict | None = None,
              wait: bool = True) -> PeerProc:
        state = self.tmp / name
        state.mkdir(parents=True, exist_ok=True)
        log_path = self.tmp / f"{name}.log"
        rid = run_id or self.run_id
        # Every peer runs as users run it: with run credentials (mutual TLS), unless the test
        # passes its own --credentials or --insecure.
        args = list(args)
        if "--peer-id" in args and "--insecure" not in [*self.base_args, *args]:
            # With credentials an id is derived from the peer's key: give this peer a key whose
            # id sorts like the id the test asked for (the lowest id leads a round).
            i = args.index("--peer-id")
            wanted = args[i + 1]
            del args[i:i + 2]
            state_dir = Path(args[args.index("--state-dir") + 1]) if "--state-dir" in args else state
            place_key_sorting_like(state_dir, wanted)
        given = [*self.base_args, *args]
        own = "--credentials" in given or "--insecure" in given
        credentials = given[given.index("--credentials") + 1] if "--credentials" in given else (
            None if own else str(credentials_for(rid)))
        argv = [*netns_argv, sys.executable, "-m", "peer", "run", "--run-id", rid,
                *(["--credentials", credentials] if credentials and not own else []),
                "--listen", listen, "--metrics-port", "0", "--state-dir", str(state),
                *(["--interface", interface] if interface else []), *FAST, *self.base_args, *args]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                    start_new_session=True)
        peer = PeerProc(name, proc, log_path, credentials=credentials)
        self.peers.append(peer)
        if wait:
            peer.wait_listening()
        return peer

    def stop_all(self, grace_s: float = 10.0) -> None:
        for p in self.peers:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.peers:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.peers:
            if p.proc.poll() is None:
                os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait(5)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, logs: Callable[[], str] = lambda: ""):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` and logs on timeout."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a peer not answering yet is part of waiting
            last_exc = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last error: {last_exc})\n{logs()}")


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)


ROUND_DONE_RE = re.compile(r"round (\d+) done: .* group ([0-9a-f]+), global ([0-9a-f]{12})")


def round_hashes(log: str) -> dict[int, str]:
    """{round: global hash prefix after that round} from a peer's log."""
    return {int(m[1]): m[3] for m in ROUND_DONE_RE.finditer(log)}


def round_groups(log: str) -> dict[int, tuple[str, str]]:
    """{round: (group id, global hash prefix after that round)} from a peer's log."""
    return {int(m[1]): (m[2], m[3]) for m in ROUND_DONE_RE.finditer(log)}


def check_invariant(peers: Sequence[PeerProc]) -> int:
    """The core invariant over every log: members of one group that completed a round hold the
    same global parameters afterwards. Returns how many (round, group) pairs had 2+ members;
    raises AssertionError naming the round and group where members disagree."""
    seen: dict[tuple[int, str], dict[str, str]] = {}
    for p in peers:
        for r, (group, digest) in round_groups(p.log()).items():
            seen.setdefault((r, group), {})[p.name] = digest
    for (r, group), digests in seen.items():
        if len(set(digests.values())) != 1:
            raise AssertionError(f"round {r} group {group}: members disagree: {digests}")
    return sum(1 for d in seen.values() if len(d) > 1)


def consistent_rounds(peers: Sequence[PeerProc]) -> list[int]:
    """Rounds that every peer in ``peers`` completed in one group; raises AssertionError if
    members of a group disagree on the global hash after a round (the core invariant)."""
    check_invariant(peers)
    tables = [round_groups(p.log()) for p in peers]
    common = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    return [r for r in common if len({t[r] for t in tables}) == 1]


def tls_channel(address: str, credentials: Path | str):
    """A grpc.aio channel to ``address`` with a throwaway identity signed by the CA in
    ``credentials`` (a member of that run, or a stranger with a CA of its own); returns
    (channel, the identity's peer id). Imports grpc lazily: only the tests that attack use it."""
    import grpc

    from peer.credentials import MEMBER_NAME, ephemeral_identity, load_run_ca

    ident = ephemeral_identity(load_run_ca(Path(credentials)))
    creds = grpc.ssl_channel_credentials(root_certificates=ident.ca_pem, private_key=ident.key_pem,
                                         certificate_chain=ident.cert_pem)
    return grpc.aio.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", MEMBER_NAME)]), \
        ident.peer_id


def metric(port: int, sample: str) -> float:
    """The value of one sample line (``name{labels}``) on a peer's /metrics, 0 if absent."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
