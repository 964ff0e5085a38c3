"""Peers from a fixed ``--peer HOST:PORT`` list, for networks that multicast does not cross."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from peer.discovery.base import STATIC_PREFIX, EventStream, PeerEvent, PeerRecord, format_hostport, parse_hostport


class StaticDiscovery:
    """One ``join`` per distinct address at :meth:`start`; never a ``leave``.

    Records are provisional (``peer_id == "static:HOST:PORT"``, ``run_id == ""``, protocol version
    and metrics port 0): the handshake learns who is there, and the daemon drops peers whose RPCs
    fail. The constructor raises ValueError for a malformed address. Loop-only.
    """

    def __init__(self, addresses: Sequence[str]) -> None:
        if isinstance(addresses, str):
            raise ValueError("addresses must be a list of HOST:PORT strings, not one string")
        records: dict[str, PeerRecord] = {}
        for text in addresses:
            host, port = parse_hostport(text)
            address = format_hostport(host, port)
            records.setdefault(
                address,
                PeerRecord(
                    peer_id=STATIC_PREFIX + address,
                    run_id="",
                    protocol_version=0,
                    host=host,
                    grpc_port=port,
                    metrics_port=0,
                ),
            )
        self._records = list(records.values())
        self._stream = EventStream()
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for record in self._records:
            self._stream.put(PeerEvent("join", record))

    async def stop(self) -> None:
        self._stream.close()

    def events(self) -> AsyncIterator[PeerEvent]:
        return self._stream.iterate()

    def current(self) -> list[PeerRecord]:
        return list(self._records) if self._started else []
