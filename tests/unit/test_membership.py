"""Membership with an in-memory client and discovery: admit, refuse, heartbeat, drop, leave."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from peer.config import load_config
from peer.discovery.base import EventStream, PeerEvent, PeerRecord
from peer.errors import PeerUnavailable
from peer.membership import Membership
from peer.metrics import Metrics
from peer.types import PROTOCOL_VERSION, HandshakeReply, PeerInfo, StatusInfo


def _info(pid: str, run: str = "r", schema: str = "s", rnd: int = 0, digest: str = "") -> PeerInfo:
    return PeerInfo(peer_id=pid, run_id=run, protocol_version=PROTOCOL_VERSION, schema_hash=schema, round=rnd,
                    global_hash=digest, address=f"{pid}:1")


class Remote:
    def __init__(self, info: PeerInfo) -> None:
        self.info = info
        self.up = True
        self.leaving = False
        self.hold: asyncio.Event | None = None  # a handshake reply waits for it


class Client:
    def __init__(self) -> None:
        self.remotes: dict[str, Remote] = {}
        self.left: list[str] = []
        self.forgotten: list[str] = []
        self.bound: dict[str, str] = {}

    def _get(self, address):
        remote = self.remotes.get(address)
        if remote is None or not remote.up:
            raise PeerUnavailable(f"{address} down", "UNAVAILABLE")
        return remote

    def bind(self, address, peer_id):
        self.bound[address] = peer_id

    async def handshake(self, address, me, timeout_s, expect_id=""):
        remote = self._get(address)
        if remote.hold is not None:
            await remote.hold.wait()
        if remote.leaving:
            return HandshakeReply(False, "leaving", "this peer is leaving the run", remote.info)
        return HandshakeReply(True, "", "", remote.info)

    async def status(self, address, timeout_s):
        return StatusInfo(peer=self._get(address).info)

    async def leave(self, address, run_id, peer_id, timeout_s):
        self._get(address)
        self.left.append(address)

    async def forget(self, address):
        self.forgotten.append(address)


class Discovery:
    def __init__(self) -> None:
        self.stream = EventStream()
        self.records: list[PeerRecord] = []

    def events(self):
        return self.stream.iterate()

    def current(self):
        return list(self.records)


def _membership(me=lambda: _info("me"), **cfg):
    config = load_config({"run_id": "r", "heartbeat_interval_s": 0.05, "heartbeat_misses": 2,
                          "state_transfer_timeout_s": 0.1, "reduce_deadline_s": 0.1, **cfg}, env={})
    client, disc, metrics = Client(), Discovery(), Metrics(CollectorRegistry())
    dropped: list[str] = []
    m = Membership(config, me, client, disc, metrics, on_drop=dropped.append)
    return m, client, disc, metrics, dropped


def _metric(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_compatible_peer_is_admitted_and_an_incompatible_one_refused():
    m, client, _, metrics, _ = _membership()
    client.remotes["a:1"] = Remote(_info("a", rnd=3))
    client.remotes["b:1"] = Remote(_info("b", schema="other"))
    await m.handshake("a:1", "a")
    await m.handshake("b:1", "b")
    assert m.live() == {"a": "a:1"} and m.attested().round == 3 and m.is_member("a")
    assert _metric(metrics, "peer_handshake_refusals_total", reason="schema_mismatch") == 1
    assert _metric(metrics, "peer_swarm_live_peers") == 1


async def test_answering_a_handshake_admits_at_the_observed_host_or_refuses():
    m, _, _, metrics, _ = _membership()
    ok = m.answer_handshake(_info("a"), "10.0.0.9")
    assert ok.accepted and m.live() == {"a": "10.0.0.9:1"}
    refused = m.answer_handshake(_info("x", run="other"), "10.0.0.8")
    assert not refused.accepted and refused.reason == "run_mismatch" and "x" not in m.live()
    assert _metric(metrics, "peer_handshake_refusals_total", reason="run_mismatch") == 1
    itself = m.answer_handshake(_info("me"), "10.0.0.7")
    assert itself.reason == "self" and _metric(metrics, "peer_handshake_refusals_total", reason="self") == 0


async def test_heartbeat_drops_a_silent_peer_and_refreshes_rounds():
    m, client, _, _, dropped = _membership()
    client.remotes["a:1"] = Remote(_info("a"))
    client.remotes["b:1"] = Remote(_info("b"))
    await m.handshake("a:1", "a")
    await m.handshake("b:1", "b")
    m.start()
    try:
        client.remotes["a:1"].info = _info("a", rnd=9)
        client.remotes["b:1"].up = False  # kill -9: no goodbye
        for _ in range(100):
            if not m.is_member("b") and getattr(m.attested(), "round", -1) == 9:
                break
            await asyncio.sleep(0.02)
    finally:
        await m.stop()
    assert dropped == ["b"] and m.live() == {"a": "a:1"} and m.attested().round == 9


async def test_leave_and_discovery_goodbye_drop_and_events_handshake():
    m, client, disc, _, dropped = _membership()
    client.remotes["a:1"] = Remote(_info("a"))
    client.remotes["c:1"] = Remote(_info("c"))
    m.start()
    try:
        disc.stream.put(PeerEvent("join", PeerRecord("a", "r", PROTOCOL_VERSION, "a", 1, 0)))
        for _ in range(100):
            if m.is_member("a"):
                break
            await asyncio.sleep(0.02)
        assert m.is_member("a")
        m.said_leave("other-run", "a")  # another run's Leave names nobody here
        assert m.is_member("a")
        m.said_leave("r", "a")
        assert dropped == ["a"]
        await asyncio.sleep(0.3)  # channels of departed peers are closed after their calls' deadlines
        assert client.forgotten == ["a:1"]
    finally:
        await m.stop()


async def test_leave_all_tells_every_member_and_survives_dead_ones():
    m, client, _, _, _ = _membership()
    client.remotes["a:1"] = Remote(_info("a"))
    m.admit(_info("a"), "a:1")
    m.admit(_info("b"), "b:1")  # gone already
    await m.leave_all(0.5)
    assert client.left == ["a:1"]


async def test_a_leaving_peer_refuses_handshakes_and_is_not_readmitted_or_counted():
    m, client, _, metrics, _ = _membership()
    client.remotes["a:1"] = Remote(_info("a"))
    m.admit(_info("a"), "a:1")
    await m.leave_all(0.5)
    # After its goodbye, a peer's discovery record lingers: a handshake from a member that still
    # sees it must not make the two members again.
    late = m.answer_handshake(_info("b"), "10.0.0.9")
    assert not late.accepted and late.reason == "leaving" and not m.is_member("b")

    other, client2, _, metrics2, _ = _membership()
    client2.remotes["x:1"] = Remote(_info("x"))
    client2.remotes["x:1"].leaving = True
    await other.handshake("x:1", "x")
    assert not other.is_member("x")
    assert _metric(metrics2, "peer_handshake_refusals_total", reason="leaving") == 0
    client2.remotes["x:1"].leaving = False  # it restarted: the next try admits it, no back-off
    await other.handshake("x:1", "x")
    assert other.is_member("x")

    # Its welcome crossed its goodbye: the handshake began before the Leave, the reply came after.
    client2.remotes["x:1"].hold = asyncio.Event()
    welcome = asyncio.create_task(other.handshake("x:1", "x"))
    await asyncio.sleep(0.01)
    other.said_leave("r", "x")
    client2.remotes["x:1"].hold.set()
    await welcome
    assert not other.is_member("x")


async def test_goodbyes_are_remembered_only_as_long_as_a_handshake_can_last():
    # 5 tries of 0.01 s and a 0.01 s back-off each: a goodbye older than 0.1 s crosses no handshake
    m, _, _, _, _ = _membership(handshake_timeout_s=0.01, reconnect_wait_s=0.01)
    m.admit(_info("x"), "x:1")
    m.said_leave("r", "x")
    await asyncio.sleep(0.15)
    m.admit(_info("y"), "y:1")
    m.said_leave("r", "y")
    assert set(m._goodbye_at) == {"y"}  # bounded with churn: not one entry per member that ever left


async def test_only_a_state_the_majority_reports_is_attested():
    m, _, _, _, _ = _membership()
    m.admit(_info("a", rnd=2), "a:1")
    assert m.attested().donors == (("a", "a:1"),) and m.attested().round == 2  # one other member: its word
    m.admit(_info("b", rnd=5), "b:1")
    assert m.attested() is None  # 1 of 2 is not more than half
    m.admit(_info("c", rnd=5), "c:1")
    found = m.attested()
    assert (found.round, found.donors) == (5, (("b", "b:1"), ("c", "c:1")))
    # a liar far ahead does not move anyone, and a member that stopped answering does not vote
    m.admit(_info("d", rnd=5), "d:1")
    m.admit(_info("liar", rnd=10**6), "liar:1")
    assert m.attested().round == 5  # 3 of 5
    m.known["b"].misses = 1
    # 2 of the 4 reachable is not more than half; with no majority, the state strictly more of
    # them report than any other, if at least two do (a fork must be able to heal)
    assert m.attested().donors == (("c", "c:1"), ("d", "d:1"))
    m.admit(_info("e", rnd=7), "e:1")
    m.admit(_info("f", rnd=7), "f:1")
    assert m.attested() is None  # two forks of two: no plurality
    m.known["e"].misses = m.known["f"].misses = m.known["c"].misses = 1
    assert m.attested() is None  # one member each (d and the liar): a single claim moves nobody


async def test_a_split_into_as_many_states_as_peers_names_the_highest_round_and_nothing_else_does():
    own = [_info("me", rnd=11, digest="b")]
    m, _, _, _, _ = _membership(me=lambda: own[0])
    assert m.split() is None  # nobody else
    m.admit(_info("p2", rnd=10, digest="c"), "p2:1")
    assert m.split() is None  # this peer holds the highest round
    m.admit(_info("p0", rnd=13, digest="a"), "p0:1")
    # Three peers at three states (the restart test's deadlock): nothing is attested, ever...
    assert m.attested() is None
    # ...so the highest round's state is named, with its one reporter as donor
    found = m.split()
    assert (found.round, found.global_hash, found.donors) == (13, "a", (("p0", "p0:1"),))
    # at equal rounds, the smallest hash; a member that stopped answering does not count
    m.admit(_info("q", rnd=13, digest="0"), "q:1")
    assert m.split().donors == (("q", "q:1"),)
    m.known["q"].misses = 1
    assert m.split().donors == (("p0", "p0:1"),)
    # Two that share a state (here: a member and this peer) are no split: a liar far ahead of
    # honest peers that agree moves none of them
    m.admit(_info("liar", rnd=10**6, digest="f"), "liar:1")
    m.admit(_info("twin", rnd=11, digest="b"), "twin:1")
    assert m.split() is None
    own[0] = _info("me", rnd=12, digest="d")  # this peer moved on: the twin and p2 still differ from all
    assert m.split().round == 10**6
    m.admit(_info("p3", rnd=10, digest="c"), "p3:1")  # two members share a state
    assert m.split() is None


async def test_a_discovery_goodbye_is_only_a_hint_to_ask_again():
    # No heartbeat runs here (not started): only the goodbye can make it ask.
    m, client, _, _, dropped = _membership(heartbeat_interval_s=60.0)
    client.remotes["c:1"] = Remote(_info("c"))
    m.admit(_info("c"), "c:1")
    goodbye = PeerEvent("leave", PeerRecord("c", "r", PROTOCOL_VERSION, "c", 1, 0))
    try:
        # a forged goodbye: the member still answers, so it stays
        m.on_event(goodbye)
        await asyncio.sleep(0.1)
        assert m.is_member("c") and dropped == []
        # a real one: it no longer answers, so it is dropped at once, not after heartbeat_misses
        client.remotes["c:1"].up = False
        m.on_event(goodbye)
        for _ in range(100):
            if not m.is_member("c"):
                break
            await asyncio.sleep(0.02)
        assert dropped == ["c"]
    finally:
        await m.stop()
