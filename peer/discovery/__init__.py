"""Finding the peers of a run: mDNS on the LAN, a static list, or both, behind one interface.

Sources yield :class:`PeerEvent` (join/leave) and list the peers they currently see. Only the
daemon builds concrete sources; everything else sees the :class:`Discovery` protocol.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from peer.discovery.base import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Discovery,
    EventStream,
    PeerEvent,
    PeerRecord,
    decode_txt,
    encode_txt,
    format_hostport,
    parse_hostport,
)
from peer.discovery.mdns import MdnsDiscovery, browse_once
from peer.discovery.static import StaticDiscovery

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "CombinedDiscovery",
    "Discovery",
    "MdnsDiscovery",
    "PeerEvent",
    "PeerRecord",
    "StaticDiscovery",
    "browse_once",
    "decode_txt",
    "encode_txt",
    "format_hostport",
    "parse_hostport",
]

log = logging.getLogger(__name__)


class CombinedDiscovery:
    """Several sources as one: their events merged into one stream, their peers into one list.

    Events pass through unchanged (the same machine may be reported by mDNS and a static entry;
    the daemon tells them apart by handshake). :meth:`current` lists each gRPC address once,
    preferring an identified record over a provisional static one. Loop-only.
    """

    def __init__(self, sources: Sequence[Discovery], *, drain_timeout_s: float = 1.0) -> None:
        self._sources = list(sources)
        self._drain_timeout_s = drain_timeout_s
        self._stream = EventStream()
        self._pumps: set[asyncio.Task[None]] = set()
        self._started: list[Discovery] = []

    def add(self, source: Discovery) -> None:
        """Add a source; only before ``start``."""
        self._sources.append(source)

    async def start(self) -> None:
        """Start all sources concurrently; if one fails, stop those that started and re-raise."""
        for source in self._sources:
            task = asyncio.create_task(self._pump(source), name=f"discovery-pump {type(source).__name__}")
            self._pumps.add(task)
            task.add_done_callback(self._pump_done)

        async def start_one(source: Discovery) -> None:
            await source.start()
            self._started.append(source)

        tasks = [asyncio.create_task(start_one(source)) for source in self._sources]
        if not tasks:
            return  # no source (mDNS off, no static peers): a peer on its own
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t.exception() for t in done if t.exception() is not None]
            if failed:
                raise failed[0]  # plain, not an ExceptionGroup: callers catch PeerError
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.stop()
            raise

    async def _pump(self, source: Discovery) -> None:
        async for event in source.events():
            self._stream.put(event)

    def _pump_done(self, task: asyncio.Task[None]) -> None:
        self._pumps.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("discovery source failed", exc_info=exc)

    async def stop(self) -> None:
        """Stop every started source (errors are logged, the first re-raised) and end ``events()``."""
        started, self._started = self._started, []
        results = await asyncio.gather(*(s.stop() for s in started), return_exceptions=True)
        # Sources that never started do not end their streams by themselves.
        for source in self._sources:
            if source not in started:
                try:
                    await source.stop()
                except Exception:
                    log.exception("stopping an unstarted discovery source failed")
        pumps = list(self._pumps)
        if pumps:
            _, pending = await asyncio.wait(pumps, timeout=self._drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._stream.close()
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def events(self) -> AsyncIterator[PeerEvent]:
        return self._stream.iterate()

    def current(self) -> list[PeerRecord]:
        by_address: dict[str, PeerRecord] = {}
        for source in self._sources:
            for record in source.current():
                known = by_address.get(record.address)
                if known is None or (known.provisional and not record.provisional):
                    by_address[record.address] = record
        return sorted(by_address.values(), key=lambda r: r.peer_id)
