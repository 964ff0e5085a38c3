"""Discovery logic without sockets: TXT codec, address parsing, static and combined sources."""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import AsyncIterator

import pytest

from peer.discovery import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    CombinedDiscovery,
    Discovery,
    MdnsDiscovery,
    PeerEvent,
    PeerRecord,
    StaticDiscovery,
    decode_txt,
    encode_txt,
    parse_hostport,
)
from peer.discovery.base import EventStream
from peer.discovery.mdns import choose_address

RECORD = PeerRecord(
    peer_id="a1b2c3d4e5f6", run_id="fmnist-7", protocol_version=PROTOCOL_VERSION, host="10.0.0.5",
    grpc_port=7070, metrics_port=9100,
)


def _props(**overrides: str | None) -> dict[bytes, bytes | None]:
    txt: dict[str, str | None] = {**encode_txt(RECORD), **overrides}
    return {k.encode(): (None if v is None else v.encode()) for k, v in txt.items()}


def _collect(stream: AsyncIterator[PeerEvent]) -> list[PeerEvent]:
    async def run() -> list[PeerEvent]:
        return [e async for e in stream]

    return asyncio.run(asyncio.wait_for(run(), 2))


# ---------------------------------------------------------------- TXT


def test_txt_round_trip() -> None:
    # Prepare
    txt = encode_txt(RECORD)
    wire = {k.encode(): v.encode() for k, v in txt.items()}
    # Execute
    back = decode_txt(wire, "10.0.0.5", 7070)
    # Assert
    assert txt == {"run": "fmnist-7", "id": "a1b2c3d4e5f6", "proto": str(PROTOCOL_VERSION), "grpc": "7070",
                   "metrics": "9100"}
    assert back == RECORD
    assert SERVICE_TYPE == "_peer-train._tcp.local."


def test_txt_ignores_unknown_keys() -> None:
    props = _props()
    props[b"future"] = b"x"
    props[b"flag"] = None
    assert decode_txt(props, "10.0.0.5", 7070) == RECORD


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"run": None}, "lacks 'run'"),
        ({"id": None}, "lacks 'id'"),
        ({"proto": None}, "lacks 'proto'"),
        ({"metrics": None}, "lacks 'metrics'"),
        ({"run": ""}, "run id"),
        ({"run": "has space"}, "run id"),
        ({"id": "bad.id"}, "peer id"),
        ({"id": "x" * 64}, "peer id"),
        ({"proto": "one"}, "'proto'"),
        ({"proto": "0"}, "'proto'"),
        ({"proto": "+1"}, "'proto'"),
        ({"grpc": "70x"}, "'grpc'"),
        ({"grpc": "70000"}, "'grpc' port 70000 is not a TCP port"),
        ({"grpc": "7071"}, "differs from the service (SRV) port"),
        ({"metrics": "0"}, "metrics"),
        ({"metrics": " 9100"}, "'metrics'"),
    ],
)
def test_malformed_txt_is_rejected_with_a_clear_message(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        decode_txt(_props(**overrides), "10.0.0.5", 7070)


def test_non_utf8_txt_is_rejected() -> None:
    props = _props()
    props[b"run"] = b"\xff\xfe"
    with pytest.raises(ValueError, match="not UTF-8"):
        decode_txt(props, "10.0.0.5", 7070)


def test_txt_without_address_is_rejected() -> None:
    with pytest.raises(ValueError, match="no address"):
        decode_txt(_props(), "", 7070)


@pytest.mark.parametrize(
    "record",
    [
        PeerRecord("static:1.2.3.4:5", "r", 1, "1.2.3.4", 5, 6),
        PeerRecord("abc", "", 1, "h", 5, 6),
        PeerRecord("abc", "r", 0, "h", 5, 6),
        PeerRecord("abc", "r", 1, "h", 0, 6),
        PeerRecord("abc", "r", 1, "h", 5, 65536),
    ],
)
def test_encode_refuses_unannounceable_records(record: PeerRecord) -> None:
    with pytest.raises(ValueError):
        encode_txt(record)


def test_record_addresses_bracket_ipv6() -> None:
    v6 = PeerRecord("abc", "r", 1, "fd00::5", 7070, 9100)
    assert RECORD.address == "10.0.0.5:7070"
    assert RECORD.metrics_address == "10.0.0.5:9100"
    assert v6.address == "[fd00::5]:7070"
    assert v6.metrics_address == "[fd00::5]:9100"


# ---------------------------------------------------------------- host:port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5:7070", ("10.0.0.5", 7070)),
        ("localhost:1", ("localhost", 1)),
        ("node-3.lab.example:65535", ("node-3.lab.example", 65535)),
        ("[::1]:7070", ("::1", 7070)),
        ("[fd00::1:2]:80", ("fd00::1:2", 80)),
    ],
)
def test_parse_hostport_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "HOST:PORT"),
        ("10.0.0.5", "lacks ':PORT'"),
        ("10.0.0.5:", "not a number"),
        (":7070", "lacks a host"),
        ("host:http", "not a number"),
        ("host:0", "out of range"),
        ("host:65536", "out of range"),
        ("host:-1", "not a number"),
        ("host:123456", "not a number"),
        (" host:1", "without spaces"),
        ("::1:7070", "in brackets"),
        ("[::1]7070", "lacks ':PORT'"),
        ("[::1:7070", "unclosed"),
        ("[nothost]:7070", "not an IPv6"),
        ("bad_host!:1", "not a valid host"),
        ("300.1.1.1:1", "not a valid IPv4"),
    ],
)
def test_parse_hostport_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hostport(text)


# ---------------------------------------------------------------- address choice


def test_choose_address_prefers_own_network_then_non_loopback() -> None:
    lab = [ipaddress.IPv4Network("192.168.7.0/24")]
    assert choose_address(["172.17.0.1", "192.168.7.20"], lab) == "192.168.7.20"
    assert choose_address(["127.0.0.1", "10.1.2.3"], lab) == "10.1.2.3"
    assert choose_address(["127.0.0.1"], lab) == "127.0.0.1"
    assert choose_address(["127.0.0.1"], [ipaddress.IPv4Network("127.0.0.1/32")]) == "127.0.0.1"
    assert choose_address(["junk"], lab) is None


# ---------------------------------------------------------------- constructors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"peer_id": "a.b"}, "peer id"),
        ({"run_id": ""}, "run id"),
        ({"grpc_port": 0}, "gRPC port"),
        ({"metrics_port": 70000}, "metrics port"),
        ({"interfaces": ["eth0"]}, "not an IPv4 address"),
        ({"advertise_host": "::1"}, "advertise host"),
    ],
)
def test_mdns_discovery_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = dict(run_id="r", peer_id="abc", grpc_port=7070, metrics_port=9100, advertise_host=None,
                interfaces=["127.0.0.1"])
    with pytest.raises(ValueError, match=message):
        MdnsDiscovery(**{**args, **kwargs})


def test_mdns_discovery_advertises_the_chosen_interface() -> None:
    d = MdnsDiscovery(run_id="r", peer_id="abc", grpc_port=7070, metrics_port=9100, advertise_host=None,
                      interfaces=["127.0.0.1"])
    assert d.advertised_addresses == ["127.0.0.1"]
    assert MdnsDiscovery(run_id="r", peer_id="abc", grpc_port=7070, metrics_port=9100, advertise_host="",
                         interfaces=["127.0.0.1"]).advertised_addresses == ["127.0.0.1"]
    assert MdnsDiscovery(run_id="r", peer_id="abc", grpc_port=7070, metrics_port=9100, advertise_host="10.9.8.7",
                         interfaces=["127.0.0.1"]).advertised_addresses == ["10.9.8.7"]
    assert d.current() == [] and d.ignored_other_run == 0 and d.malformed == 0
    assert isinstance(d, Discovery)


# ---------------------------------------------------------------- static and combined


def test_static_discovery_joins_each_address_once_and_never_leaves() -> None:
    # Prepare
    d = StaticDiscovery(["10.0.0.5:7070", "[::1]:7071", "10.0.0.5:7070"])

    async def run() -> list[PeerEvent]:
        assert d.current() == []
        await d.start()
        await d.stop()
        return [e async for e in d.events()]

    # Execute
    events = asyncio.run(asyncio.wait_for(run(), 2))
    # Assert
    assert [(e.kind, e.record.peer_id, e.record.address) for e in events] == [
        ("join", "static:10.0.0.5:7070", "10.0.0.5:7070"),
        ("join", "static:[::1]:7071", "[::1]:7071"),
    ]
    record = events[0].record
    assert record.run_id == "" and record.provisional and record.protocol_version == 0
    assert [r.address for r in d.current()] == ["10.0.0.5:7070", "[::1]:7071"]
    assert isinstance(d, Discovery)


def test_static_discovery_rejects_bad_addresses() -> None:
    with pytest.raises(ValueError, match="lacks ':PORT'"):
        StaticDiscovery(["10.0.0.5"])
    with pytest.raises(ValueError, match="list"):
        StaticDiscovery("10.0.0.5:7070")  # type: ignore[arg-type]


class FakeSource:
    """A Discovery that emits given events at start; optionally fails to start."""

    def __init__(self, records: list[PeerRecord], fail: Exception | None = None) -> None:
        self.records, self.fail, self.stopped = records, fail, False
        self._stream = EventStream()

    async def start(self) -> None:
        if self.fail is not None:
            raise self.fail
        for r in self.records:
            self._stream.put(PeerEvent("join", r))

    async def stop(self) -> None:
        self.stopped = True
        self._stream.close()

    def events(self) -> AsyncIterator[PeerEvent]:
        return self._stream.iterate()

    def current(self) -> list[PeerRecord]:
        return list(self.records)


def test_combined_discovery_merges_events_and_prefers_identified_records() -> None:
    # Prepare: the same machine found by mDNS and listed statically, plus one static-only peer.
    mdns = FakeSource([RECORD])
    static = StaticDiscovery(["10.0.0.5:7070", "10.0.0.9:7070"])
    combined = CombinedDiscovery([mdns, static])

    async def run() -> tuple[list[PeerEvent], list[PeerRecord]]:
        await combined.start()
        current = combined.current()
        await combined.stop()
        return [e async for e in combined.events()], current

    # Execute
    events, current = asyncio.run(asyncio.wait_for(run(), 2))
    # Assert
    assert sorted(e.record.peer_id for e in events) == sorted(
        [RECORD.peer_id, "static:10.0.0.5:7070", "static:10.0.0.9:7070"]
    )
    assert [r.peer_id for r in current] == [RECORD.peer_id, "static:10.0.0.9:7070"]
    assert mdns.stopped


def test_combined_discovery_start_failure_stops_the_others_and_raises_plainly() -> None:
    good, bad = FakeSource([RECORD]), FakeSource([], fail=RuntimeError("boom"))
    combined = CombinedDiscovery([good, bad])

    async def run() -> list[PeerEvent]:
        with pytest.raises(RuntimeError, match="boom"):
            await combined.start()
        return [e async for e in combined.events()]

    asyncio.run(asyncio.wait_for(run(), 2))
    assert good.stopped and bad.stopped


def test_event_stream_buffers_until_read_and_ends_on_close() -> None:
    stream = EventStream()
    stream.put(PeerEvent("join", RECORD))
    stream.put(PeerEvent("leave", RECORD))
    stream.close()
    stream.put(PeerEvent("join", RECORD))  # after close: dropped
    assert [e.kind for e in _collect(stream.iterate())] == ["join", "leave"]
