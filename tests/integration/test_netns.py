"""As on a real LAN: three peers in three network namespaces joined by a bridge find each other
by mDNS with the default interface choice, and train together."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.integration._netns import NetnsUnavailable, bridged_namespaces
from tests.integration._peers import Swarm, consistent_rounds, wait_until

pytestmark = pytest.mark.netns


def _status_in(host, address: str, credentials: str) -> dict:
    out = subprocess.run(host.exec_argv([sys.executable, "-m", "peer", "status", address, "--json",
                                         "--credentials", credentials]),
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def test_three_namespaced_peers_find_each_other_with_default_interfaces(tmp_path):
    try:
        ctx = bridged_namespaces(3, "peerd")
        hosts = ctx.__enter__()
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable here: {exc}")
    try:
        with Swarm(tmp_path, f"lan-{os.getpid()}", ["--rounds", "0"]) as swarm:
            peers = [swarm.start(f"h{i}", netns_argv=host.exec_argv([]),
                                 listen="0.0.0.0:7070", interface=None, wait=False)
                     for i, host in enumerate(hosts)]
            for p in peers:
                p.wait_listening(60)

            def everyone_sees_two():
                return all(len(set(re.findall(r"peer joined: (\w+) at 10\.77\.1\.\d+:7070", p.log()))) == 2
                           for p in peers)

            wait_until(everyone_sees_two, 15, "each namespaced peer to see the other two",
                       lambda: "\n".join(p.tail(20) for p in peers))
            # They advertise their namespace address, not loopback, and train together.
            assert all(f"grpc {h.ip}:7070" in p.log() for p, h in zip(peers, hosts))

            wait_until(lambda: len(consistent_rounds(peers)) >= 3, 60, "three rounds done by all three",
                       lambda: "\n".join(p.tail(20) for p in peers))
            # The status RPC answers across the bridge, from another namespace.
            s = _status_in(hosts[0], f"{hosts[1].ip}:7070", peers[0].credentials)
            assert s["peer_id"] == peers[1].peer_id and len(s["peers"]) == 2
    finally:
        ctx.__exit__(None, None, None)
