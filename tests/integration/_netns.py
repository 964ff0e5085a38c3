"""Throw-away network namespaces joined by a bridge, for multi-host tests on one machine (root only).

    with bridged_namespaces(3, "disc") as hosts:
        subprocess.Popen(hosts[0].exec_argv([sys.executable, "-c", "..."]))

Layout: one namespace holds bridge ``br0`` (multicast snooping off); each host namespace has
``eth0`` (a veth whose peer is a port of br0) with ``<subnet>.<i+1>/<prefix>``, plus ``lo`` up.
Nothing is attached to the root namespace, so multicast sent inside never reaches a real
interface. Namespace names carry the prefix, the pid and a counter, so parallel runs do not
collide. On exit every process still inside the namespaces is killed and every namespace is
deleted, also when setup failed half-way.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """``ip netns add`` failed (not root, no iproute2, no namespace support): skip, don't fail."""


@dataclass(frozen=True)
class NetnsHost:
    name: str  # namespace name
    ip: str  # IPv4 address of eth0
    iface: str  # "eth0"
    bridge_ns: str = ""  # namespace of the bridge this host's veth is plugged into
    port: str = ""  # this host's veth end in bridge_ns

    def exec_argv(self, cmd: Sequence[str]) -> list[str]:
        """argv that runs ``cmd`` inside this namespace (``ip netns exec`` execs it in place, so
        the child's pid is the command's own pid and signals reach it directly)."""
        return ["ip", "netns", "exec", self.name, *cmd]


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")


def _add_namespace(name: str, created: list[str]) -> None:
    try:
        result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsUnavailable(f"cannot run `ip netns add`: {exc}") from exc
    if result.returncode != 0:
        if not created:
            raise NetnsUnavailable(f"`ip netns add` failed (root and netns support needed): {result.stderr.strip()}")
        raise RuntimeError(f"`ip netns add {name}` failed: {result.stderr.strip()}")
    created.append(name)


def _kill_inside(name: str) -> None:
    # Only processes the test itself started can be inside a namespace it just created.
    result = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
    for pid in result.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete(names: Sequence[str]) -> None:
    errors = []
    for name in reversed(names):
        try:
            _kill_inside(name)
            _ip("netns", "del", name)
        except Exception as exc:  # keep deleting the others
            errors.append(f"{name}: {exc}")
    if errors:
        raise RuntimeError("namespace cleanup failed: " + "; ".join(errors))


@contextmanager
def bridged_namespaces(n: int, prefix: str, subnet: str = "10.77.1.0/24") -> Iterator[list[NetnsHost]]:
    """Create ``n`` host namespaces on one bridge; yield their :class:`NetnsHost` list.

    Raises NetnsUnavailable if namespaces cannot be created at all (callers skip the test),
    RuntimeError for any later setup failure.
    """
    net = ipaddress.IPv4Network(subnet)
    if not 1 <= n < net.num_addresses - 2:
        raise ValueError(f"{n} hosts do not fit in {subnet}")
    tag = f"{prefix}-{os.getpid()}-{next(_counter)}"
    bridge = f"{tag}-br"
    created: list[str] = []
    try:
        _add_namespace(bridge, created)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", bridge, "link", "set", "br0", "up")
        hosts = []
        for i in range(n):
            name = f"{tag}-h{i}"
            ip = str(net.network_address + i + 1)
            _add_namespace(name, created)
            # Created directly in the namespaces: no interface name is ever taken in the root one.
            _ip("link", "add", "name", "eth0", "netns", name, "type", "veth", "peer", "name", f"vh{i}", "netns", bridge)
            _ip("-n", bridge, "link", "set", f"vh{i}", "master", "br0", "up")
            _ip("-n", name, "addr", "add", f"{ip}/{net.prefixlen}", "dev", "eth0")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "link", "set", "eth0", "up", "multicast", "on")
            hosts.append(NetnsHost(name=name, ip=ip, iface="eth0", bridge_ns=bridge, port=f"vh{i}"))
        yield hosts
    finally:
        _delete(created)


def partition(hosts: Sequence[NetnsHost], side_b: Sequence[int]) -> None:
    """Cut the hosts ``side_b`` off the others: their ports move to a second bridge ``br1``, so
    each side still reaches its own members (multicast included) and nothing of the other side."""
    bridge_ns = hosts[0].bridge_ns
    result = subprocess.run(["ip", "-n", bridge_ns, "link", "show", "br1"], capture_output=True, timeout=10)
    if result.returncode != 0:
        _ip("-n", bridge_ns, "link", "add", "br1", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br1", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", bridge_ns, "link", "set", "br1", "up")
    for i in side_b:
        _ip("-n", bridge_ns, "link", "set", hosts[i].port, "master", "br1")


def heal(hosts: Sequence[NetnsHost]) -> None:
    """Plug every host back into ``br0``."""
    for h in hosts:
        _ip("-n", h.bridge_ns, "link", "set", h.port, "master", "br0")
