"""The endpoint file: where a running daemon listens, written into its state dir.

The daemon writes ``<state dir>/endpoint.json`` once it listens; local tools (``peer demo``, the
tests) read it instead of parsing log lines. The file names the writing process (``pid``), so a
reader that started the daemon itself can tell a fresh file from one left by an earlier run in
the same state dir.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENDPOINT_FILE = "endpoint.json"


@dataclass(frozen=True)
class Endpoint:
    peer_id: str
    grpc: str  # the advertised gRPC address, host:port
    metrics_port: int
    pid: int


def write_endpoint(state_dir: Path, *, peer_id: str, grpc: str, metrics_port: int) -> Path:
    """Write this process's endpoint into ``state_dir`` atomically (a temp file in the same
    directory, then ``os.replace``): a reader sees the old file or the new one, never a part."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / ENDPOINT_FILE
    text = json.dumps({"peer_id": peer_id, "grpc": grpc, "metrics_port": metrics_port, "pid": os.getpid()})
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{ENDPOINT_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; an address is no secret (other users' tools)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read_endpoint(state_dir: Path, pid: int | None = None) -> Endpoint | None:
    """The endpoint in ``state_dir``; None when the file is missing, unreadable or malformed, or
    (``pid`` given) written by another process: a stale file from an earlier run."""
    try:
        data = json.loads((Path(state_dir) / ENDPOINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(data, dict):
        return None
    peer_id, grpc, metrics_port, writer = (data.get(k) for k in ("peer_id", "grpc", "metrics_port", "pid"))
    if not (isinstance(peer_id, str) and peer_id and isinstance(grpc, str) and ":" in grpc
            and _is_int(metrics_port) and 0 <= metrics_port <= 65535 and _is_int(writer) and writer > 0):
        return None
    if pid is not None and writer != pid:
        return None
    return Endpoint(peer_id, grpc, metrics_port, writer)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
