"""Discovery types shared by every source: records, events, the TXT codec and ``host:port`` parsing.

Pure code: no sockets. The mDNS and static sources build on it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from peer.types import PROTOCOL_VERSION

SERVICE_TYPE = "_peer-train._tcp.local."
"""The DNS-SD service type every peer registers and browses."""


STATIC_PREFIX = "static:"
"""Prefix of the provisional peer id of a static peer (its identity is learnt by handshake)."""

# A peer id becomes the DNS-SD instance label, which must stay below 64 bytes; keep it to characters
# that need no escaping in a DNS name.
_PEER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
# A run id travels in a TXT string ("run=<id>", at most 255 bytes); printable ASCII, no spaces.
_RUN_ID_RE = re.compile(r"[!-~]{1,128}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")
_TXT_KEYS = ("run", "id", "proto", "grpc", "metrics")


@dataclass(frozen=True)
class PeerRecord:
    """Where a peer of some run can be reached, as discovery saw it.

    ``host`` is a bare address or host name (IPv6 without brackets); ports are TCP ports. For a
    static peer the record is provisional: ``peer_id`` is ``"static:HOST:PORT"``, ``run_id`` is
    ``""``, ``protocol_version`` and ``metrics_port`` are 0 (unknown until the handshake).
    """

    peer_id: str
    run_id: str
    protocol_version: int
    host: str
    grpc_port: int
    metrics_port: int

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC endpoint (an IPv6 host in brackets)."""
        return format_hostport(self.host, self.grpc_port)

    @property
    def metrics_address(self) -> str:
        """``host:port`` of the Prometheus endpoint (an IPv6 host in brackets)."""
        return format_hostport(self.host, self.metrics_port)

    @property
    def provisional(self) -> bool:
        """True for a static peer whose identity is not known yet."""
        return self.peer_id.startswith(STATIC_PREFIX)


@dataclass(frozen=True)
class PeerEvent:
    """A peer appeared (``join``) or said goodbye (``leave``)."""

    kind: Literal["join", "leave"]
    record: PeerRecord


@runtime_checkable
class Discovery(Protocol):
    """A source of peers.

    All methods are called on the daemon's event loop. ``events()`` has one consumer; events are
    buffered from construction, and the iterator ends after ``stop()``.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def events(self) -> AsyncIterator[PeerEvent]: ...

    def current(self) -> list[PeerRecord]: ...


class EventStream:
    """A buffered, single-consumer stream of events; ``close()`` ends the iteration.

    Events put before anyone iterates are kept. Call from the event loop only.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[PeerEvent | None] = asyncio.Queue()
        self._closed = False

    def put(self, event: PeerEvent) -> None:
        if not self._closed:
            self._queue.put_nowait(event)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    async def iterate(self) -> AsyncIterator[PeerEvent]:
        while (event := await self._queue.get()) is not None:
            yield event
        self._queue.put_nowait(None)  # a later iterator ends at once, too


def check_peer_id(peer_id: str) -> str:
    """Return ``peer_id`` if it can be announced (1-63 of ``[A-Za-z0-9_-]``); else ValueError."""
    if not isinstance(peer_id, str) or not _PEER_ID_RE.fullmatch(peer_id):
        raise ValueError(f"peer id {peer_id!r} must be 1-63 characters of letters, digits, '_' or '-'")
    return peer_id


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it can be announced (1-128 printable ASCII, no spaces); else ValueError."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-128 printable ASCII characters without spaces")
    return run_id


def check_port(port: int, what: str = "port") -> int:
    """Return ``port`` if it is an int in 1..65535; else ValueError naming ``what``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what} {port!r} is not a TCP port (1-65535)")
    return port


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def encode_txt(record: PeerRecord) -> dict[str, str]:
    """The TXT properties that announce ``record``; raises ValueError for a record that cannot be
    announced (bad ids or ports)."""
    check_run_id(record.run_id)
    check_peer_id(record.peer_id)
    if isinstance(record.protocol_version, bool) or not isinstance(record.protocol_version, int) or record.protocol_version < 1:
        raise ValueError(f"protocol version {record.protocol_version!r} must be a positive int")
    check_port(record.grpc_port, "gRPC port")
    check_port(record.metrics_port, "metrics port")
    return {
        "run": record.run_id,
        "id": record.peer_id,
        "proto": str(record.protocol_version),
        "grpc": str(record.grpc_port),
        "metrics": str(record.metrics_port),
    }


def decode_txt(props: Mapping[bytes, bytes | None], host: str, port: int) -> PeerRecord:
    """Build a record from a resolved service's TXT properties, address and SRV port.

    ``props`` is zeroconf's ``ServiceInfo.properties``. Unknown keys are ignored (newer peers may
    add some). Raises ValueError, naming the offending key, for a missing, non-UTF-8 or invalid
    value, or when the TXT ``grpc`` port differs from the SRV ``port``.
    """
    values: dict[str, str] = {}
    for key in _TXT_KEYS:
        raw = props.get(key.encode())
        if raw is None:
            raise ValueError(f"TXT record lacks {key!r}")
        try:
            values[key] = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"TXT {key!r} is not UTF-8: {raw!r}") from exc
    try:
        check_run_id(values["run"])
        check_peer_id(values["id"])
    except ValueError as exc:
        raise ValueError(f"TXT {exc}") from None
    proto = _parse_decimal(values["proto"], "proto")
    if proto < 1:
        raise ValueError(f"TXT 'proto' {values['proto']!r} must be a positive int")
    grpc_port = check_port(_parse_decimal(values["grpc"], "grpc"), "TXT 'grpc' port")
    metrics_port = check_port(_parse_decimal(values["metrics"], "metrics"), "TXT 'metrics' port")
    if grpc_port != port:
        raise ValueError(f"TXT 'grpc' port {grpc_port} differs from the service (SRV) port {port}")
    if not host:
        raise ValueError("resolved service has no address")
    return PeerRecord(
        peer_id=values["id"],
        run_id=values["run"],
        protocol_version=proto,
        host=host,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
    )


def _parse_decimal(text: str, key: str) -> int:
    # int() would also take " 7", "+7", "7_0" and non-ASCII digits; TXT values must be plain.
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise ValueError(f"TXT {key!r} value {text!r} is not a decimal integer")
    return int(text)


def parse_hostport(s: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (a host name, an IPv4 address, or ``[IPv6]:PORT``).

    Returns ``(host, port)`` with IPv6 brackets removed. Raises ValueError saying what is wrong
    (missing port, port out of range, an unbracketed IPv6 address, a bad host).
    """
    if not isinstance(s, str):
        raise ValueError(f"peer address {s!r} must be a string HOST:PORT")
    if s != s.strip() or not s:
        raise ValueError(f"peer address {s!r} must be HOST:PORT without spaces")
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"peer address {s!r}: unclosed '[' (expected [IPv6]:PORT)")
        host, rest = s[1:end], s[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"peer address {s!r} lacks ':PORT' after ']'")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"peer address {s!r}: {host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep:
            raise ValueError(f"peer address {s!r} lacks ':PORT' (expected HOST:PORT)")
        if ":" in host:
            raise ValueError(f"peer address {s!r}: write an IPv6 address in brackets, e.g. [::1]:7070")
        if not host:
            raise ValueError(f"peer address {s!r} lacks a host")
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"peer address {s!r}: {host!r} is not a valid host name or IPv4 address")
        if host.replace(".", "").isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"peer address {s!r}: {host!r} is not a valid IPv4 address") from None
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ValueError(f"peer address {s!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"peer address {s!r}: port {port} is out of range 1-65535")
    return host, port
