"""Peers on the LAN by mDNS / DNS-SD (python-zeroconf, AsyncZeroconf).

Every peer registers ``<peer_id>._peer-train._tcp.local.`` with its gRPC port as the SRV port and
its identity in TXT (see :func:`peer.discovery.base.encode_txt`), and browses the same type. Only
IPv4 is used. All methods run on one asyncio event loop; zeroconf's browser calls our handler on
that loop.

Safety: with ``interfaces`` None or empty zeroconf joins the multicast group on *every* interface
(InterfaceChoice.All), which is what a lab LAN wants; tests pass ``["127.0.0.1"]`` (or run inside
network namespaces) so that nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import ifaddr
from zeroconf import DNSQuestionType, InterfaceChoice, IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peer.discovery.base import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    EventStream,
    PeerEvent,
    PeerRecord,
    check_peer_id,
    check_port,
    check_run_id,
    decode_txt,
    encode_txt,
)
from peer.errors import PeerError

log = logging.getLogger(__name__)

# Interfaces whose addresses are local to one machine (container and VM bridges): every machine
# may have the same 172.17.0.1, so they are not advertised when another address exists.
_VIRTUAL_PREFIXES = ("docker", "br-", "virbr", "cni", "flannel", "podman", "lxcbr", "lxdbr")


def choose_address(addresses: Sequence[str], local_networks: Sequence[ipaddress.IPv4Network]) -> str | None:
    """Pick the address of a multi-homed peer that we most likely reach.

    Preference: an address inside one of our own networks, then any non-loopback address, then
    whatever is left; ties keep the announced order. Returns None if no address parses.
    """
    parsed: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in addresses:
        try:
            parsed.append(ipaddress.ip_address(text))
        except ValueError:
            continue
    if not parsed:
        return None

    def rank(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
        if any(addr.version == net.version and addr in net for net in local_networks):
            return 0
        return 1 if not addr.is_loopback else 2

    return str(min(parsed, key=rank))


def interface_plan(
    interfaces: Sequence[str] | None,
) -> tuple[InterfaceChoice | list[str], list[str], list[ipaddress.IPv4Network]]:
    """What to bind, what to advertise by default, and which networks are ours.

    Returns ``(zeroconf interfaces argument, default advertised IPv4 addresses, local networks)``.
    Reads the host's interfaces (ifaddr, a quick getifaddrs call). Raises ValueError for an entry
    of ``interfaces`` that is not an IPv4 address.
    """
    local: list[tuple[str, ipaddress.IPv4Interface]] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4:
                local.append((str(adapter.name), ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}")))
    if not interfaces:
        non_loopback = [(name, iface) for name, iface in local if not iface.ip.is_loopback]
        preferred = [iface for name, iface in non_loopback if not name.startswith(_VIRTUAL_PREFIXES)]
        chosen = preferred or [iface for _, iface in non_loopback]
        advertise = [str(iface.ip) for iface in chosen] or ["127.0.0.1"]
        return InterfaceChoice.All, advertise, [iface.network for _, iface in non_loopback]
    addrs: list[str] = []
    networks: list[ipaddress.IPv4Network] = []
    for text in interfaces:
        try:
            addr = ipaddress.IPv4Address(text)
        except ValueError:
            raise ValueError(f"interface {text!r} is not an IPv4 address (mDNS uses IPv4 only)") from None
        addrs.append(str(addr))
        match = [iface.network for _, iface in local if iface.ip == addr]
        networks.append(match[0] if match else ipaddress.IPv4Network(f"{addr}/32"))
    return addrs, addrs, networks


class _Browser:
    """Browses SERVICE_TYPE, resolves what appears and keeps the table of peers of one run.

    Shared by :class:`MdnsDiscovery` and :func:`browse_once`. Loop-only.
    """

    def __init__(
        self,
        *,
        run_id: str | None,
        own_name: str | None,
        local_networks: Sequence[ipaddress.IPv4Network],
        on_event: Callable[[PeerEvent], None] | None,
        resolve_timeout_s: float,
        resolve_attempts: int = 3,
    ) -> None:
        self._run_id = run_id
        self._own_name = own_name.lower() if own_name else None
        self._local_networks = list(local_networks)
        self._on_event = on_event
        self._resolve_timeout_s = resolve_timeout_s
        self._resolve_attempts = resolve_attempts
        self.peers: dict[str, PeerRecord] = {}
        self.ignored_other_run = 0
        self.malformed = 0
        self._other_run_names: set[str] = set()
        self._malformed_names: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._browser: AsyncServiceBrowser | None = None
        self._zc: Zeroconf | None = None
        self._running = False

    def start(self, azc: AsyncZeroconf) -> None:
        self._zc = azc.zeroconf
        self._running = True
        # QM (multicast-response) questions only: a unicast reply to a QU question goes to
        # 127.0.0.1:5353 or host:5353, which the kernel hands to just one of the several mDNS
        # sockets that share the port (SO_REUSEPORT) when more than one peer runs on a machine.
        # Multicast replies also fill the cache in time for zeroconf's probe to notice a peer id
        # that is already taken (its probes are QU and suffer from the same lottery).
        self._browser = AsyncServiceBrowser(
            azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change], question_type=DNSQuestionType.QM
        )

    async def stop(self) -> None:
        self._running = False
        if self._browser is not None:
            browser, self._browser = self._browser, None
            await browser.async_cancel()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        # Our own tasks were cancelled; their CancelledError is expected. A cancellation of stop()
        # itself still propagates out of gather.
        await asyncio.gather(*tasks, return_exceptions=True)

    # zeroconf calls handlers with keyword arguments: these parameter names are its contract.
    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if not self._running or name.lower() == self._own_name:
            return
        if state_change is ServiceStateChange.Removed:
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
            self._other_run_names.discard(name)
            self._malformed_names.discard(name)
            self._forget(name)
            return
        # Added or Updated: (re)resolve; a newer resolution replaces one in flight.
        old = self._tasks.pop(name, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(self._resolve(name), name=f"mdns-resolve {name}")
        self._tasks[name] = task
        task.add_done_callback(lambda t, n=name: self._resolved(n, t))

    def _resolved(self, name: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("resolving %s failed", name, exc_info=exc)

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        timeout_ms = self._resolve_timeout_s * 1000 / self._resolve_attempts
        for _ in range(self._resolve_attempts):
            if await info.async_request(self._zc, timeout_ms, question_type=DNSQuestionType.QM):
                break
        else:
            log.debug("could not resolve %s within %.1f s", name, self._resolve_timeout_s)
            return
        host = choose_address(info.parsed_addresses(IPVersion.V4Only), self._local_networks)
        try:
            record = decode_txt(info.properties or {}, host or "", info.port or 0)
        except ValueError as exc:
            if name not in self._malformed_names:
                self._malformed_names.add(name)
                self.malformed += 1
                log.warning("ignoring malformed mDNS announcement %s: %s", name, exc)
            self._forget(name)
            return
        self._malformed_names.discard(name)
        if self._own_name is not None and f"{record.peer_id}.{SERVICE_TYPE}".lower() == self._own_name:
            return  # another announcement carrying our id; never talk to ourselves
        if self._run_id is not None and record.run_id != self._run_id:
            if name not in self._other_run_names:
                self._other_run_names.add(name)
                self.ignored_other_run += 1
                log.debug("ignoring peer %s of run %r", record.peer_id, record.run_id)
            self._forget(name)
            return
        self._other_run_names.discard(name)
        old = self.peers.get(name)
        if old == record:
            return
        self.peers[name] = record
        if old is not None:
            self._emit(PeerEvent("leave", old))
        self._emit(PeerEvent("join", record))

    def _forget(self, name: str) -> None:
        record = self.peers.pop(name, None)
        if record is not None:
            self._emit(PeerEvent("leave", record))

    def _emit(self, event: PeerEvent) -> None:
        log.info(
            "peer %s %s at %s",
            event.record.peer_id,
            event.kind,
            event.record.address,
            extra={"peer_id": event.record.peer_id, "event": event.kind},
        )
        if self._on_event is not None:
            self._on_event(event)


class MdnsDiscovery:
    """Announce this peer and report the peers of the same run on the LAN.

    ``interfaces``: None or empty = every interface (zeroconf's InterfaceChoice.All, IPv4 only);
    otherwise a list of local IPv4 addresses (tests use ``["127.0.0.1"]``).
    ``advertise_host``: the IPv4 address put in our A record; None or "" = the addresses of the chosen
    interfaces (for all interfaces: every non-loopback IPv4 address, container bridges left out,
    127.0.0.1 if there is none).
    ``resolve_timeout_s``: how long to try resolving one announced service (split over retries).
    ``unregister_timeout_s``: bound on sending the goodbye in :meth:`stop`.

    Constructor raises ValueError for a bad id, port or address. Loop-only otherwise.
    """

    def __init__(
        self,
        *,
        run_id: str,
        peer_id: str,
        grpc_port: int,
        metrics_port: int,
        advertise_host: str | None,
        interfaces: Sequence[str] | None,
        resolve_timeout_s: float = 3.0,
        unregister_timeout_s: float = 3.0,
    ) -> None:
        self._run_id = check_run_id(run_id)
        self._peer_id = check_peer_id(peer_id)
        self._txt = encode_txt(
            PeerRecord(
                peer_id=peer_id,
                run_id=run_id,
                protocol_version=PROTOCOL_VERSION,
                host="",
                grpc_port=check_port(grpc_port, "gRPC port"),
                metrics_port=check_port(metrics_port, "metrics port"),
            )
        )
        self._grpc_port = grpc_port
        self._choice, default_advertise, networks = interface_plan(interfaces)
        if advertise_host:  # "" means unknown, like None
            try:
                self._advertise = [str(ipaddress.IPv4Address(advertise_host))]
            except ValueError:
                raise ValueError(f"advertise host {advertise_host!r} is not an IPv4 address") from None
        else:
            self._advertise = default_advertise
        if any(ipaddress.IPv4Address(a).is_unspecified for a in self._advertise):
            raise ValueError("cannot advertise 0.0.0.0; pass advertise_host")
        self._name = f"{peer_id}.{SERVICE_TYPE}"
        self._unregister_timeout_s = unregister_timeout_s
        self._stream = EventStream()
        self._browser = _Browser(
            run_id=run_id,
            own_name=self._name,
            local_networks=networks,
            on_event=self._stream.put,
            resolve_timeout_s=resolve_timeout_s,
        )
        self._azc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._start_called = False
        self._stopped = False

    @property
    def ignored_other_run(self) -> int:
        """How many announcements of other runs were seen and ignored (once per appearance)."""
        return self._browser.ignored_other_run

    @property
    def malformed(self) -> int:
        """How many malformed announcements were seen and ignored (once per appearance)."""
        return self._browser.malformed

    @property
    def advertised_addresses(self) -> list[str]:
        return list(self._advertise)

    async def start(self) -> None:
        """Open the mDNS sockets, start browsing, and register (probing takes ~1.5 s).

        Raises PeerError if zeroconf's probe finds our peer id already announced. That check is
        best effort: the probes are QU questions, and a unicast defence sent to a machine running
        several mDNS sockets on port 5353 can reach the wrong one, so a duplicate on the same
        machine may go unnoticed (peer ids are random, so this needs a copied id).
        """
        if self._start_called or self._stopped:
            raise RuntimeError("MdnsDiscovery.start() may be called once")
        self._start_called = True
        self._azc = azc = AsyncZeroconf(interfaces=self._choice, ip_version=IPVersion.V4Only)
        try:
            self._browser.start(azc)
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                self._name,
                port=self._grpc_port,
                properties=self._txt,
                server=f"{self._peer_id}.local.",
                parsed_addresses=self._advertise,
            )
            # register returns a task that finishes after probing and announcing.
            await (await azc.async_register_service(info, allow_name_change=False))
            self._info = info
        except NonUniqueNameException as exc:
            await self._close()
            raise PeerError(f"peer id {self._peer_id!r} is already announced by another peer") from exc
        except BaseException:
            await self._close()
            raise
        log.info(
            "announced %s on %s (addresses %s)",
            self._name,
            "all interfaces" if self._choice is InterfaceChoice.All else self._choice,
            self._advertise,
            extra={"peer_id": self._peer_id},
        )

    async def stop(self) -> None:
        """Say goodbye (so others see us leave within about a second), close, end ``events()``.

        Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        await self._close()

    async def _close(self) -> None:
        try:
            await self._browser.stop()
            azc, info = self._azc, self._info
            self._azc = self._info = None
            if azc is not None and info is not None:
                try:
                    # Both awaits matter: async_close() would cancel the goodbye still queued.
                    async with asyncio.timeout(self._unregister_timeout_s):
                        await (await azc.async_unregister_service(info))
                except TimeoutError:
                    log.warning("mDNS goodbye for %s not sent within %.1f s", self._name, self._unregister_timeout_s)
            if azc is not None:
                await azc.async_close()
        finally:
            self._stream.close()

    def events(self) -> AsyncIterator[PeerEvent]:
        return self._stream.iterate()

    def current(self) -> list[PeerRecord]:
        return sorted(self._browser.peers.values(), key=lambda r: r.peer_id)


async def browse_once(
    run_id: str | None,
    interfaces: Sequence[str] | None,
    timeout_s: float,
    *,
    resolve_timeout_s: float = 2.0,
) -> list[PeerRecord]:
    """Browse for ``timeout_s`` seconds and return the peers of ``run_id`` (all runs if None),
    sorted by peer id. Registers nothing. ``interfaces`` as for :class:`MdnsDiscovery`.
    """
    choice, _, networks = interface_plan(interfaces)
    azc = AsyncZeroconf(interfaces=choice, ip_version=IPVersion.V4Only)
    browser = _Browser(
        run_id=run_id,
        own_name=None,
        local_networks=networks,
        on_event=None,
        resolve_timeout_s=min(resolve_timeout_s, timeout_s),
    )
    try:
        browser.start(azc)
        await asyncio.sleep(timeout_s)
        peers = list(browser.peers.values())
    finally:
        try:
            await browser.stop()
        finally:
            await azc.async_close()
    return sorted(peers, key=lambda r: (r.peer_id, r.run_id))
