"""The round driver, leader and follower side, with in-memory peers: no sockets, no processes.

Each node has a real StateStore, Matchmaker, Reducer and owner side; the in-memory client routes
calls straight to the target node's driver, as the gRPC service would. Peers vanish, lie about
leadership or do not know us, and the driver must still finish, fail or resync as designed.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import pytest
import torch
from prometheus_client import CollectorRegistry

from peer.codec import get_codec
from peer.config import Settings, load_config
from peer.errors import PeerUnavailable, RoundError
from peer.membership import Attested
from peer.metrics import Metrics
from peer.sync import driver as driver_module
from peer.sync.confirm import AnswerChecks
from peer.sync.driver import Deadlines, RoundDriver
from peer.sync.mirror import DeviceMirror
from peer.sync.outer import outer_step, tensor_digest
from peer.sync.state import GlobalState, decode_state, read_checkpoint, state_header
from peer.sync.store import StateStore
from peer.types import JoinOutcome, JoinReply, JoinRequest

NUMEL = 600
SETTINGS = Settings(inner_steps=1, batch_size=1, inner_lr=0.1, outer_lr=0.5, outer_momentum=0.9)


@dataclass
class Result:
    delta: torch.Tensor
    samples: int
    mean_loss: float = 1.0
    nonfinite: bool = False


class FakeInner:
    """A deterministic inner phase: delta = (rank + 1) * 0.01 everywhere."""

    def __init__(self, rank: int, nan_rounds: tuple[int, ...] = ()) -> None:
        self.rank = rank
        self.nan_rounds = nan_rounds
        self.starts: list[torch.Tensor] = []  # what each phase started from (a copy)

    async def run(self, rnd, start, should_stop):
        self.starts.append(start.clone())
        delta = torch.full((NUMEL,), (self.rank + 1) * 0.01)
        if rnd in self.nan_rounds:
            return Result(torch.full((NUMEL,), math.nan), 10, nonfinite=True)
        return Result(delta, 10)

    async def evaluate(self, params):
        return {"loss": float(params.abs().mean())}


@dataclass
class FakeMembers:
    """The live set as one node sees it; ``net`` gives every node's round for donors."""

    me: str
    net: dict
    view: set[str] = field(default_factory=set)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    introduced: list[str] = field(default_factory=list)
    split_to: Attested | None = None  # what ``split`` names (peer.membership's rule has its own tests)

    def live(self):
        return {p: p for p in self.view}

    def is_member(self, peer_id):
        return peer_id in self.view

    def attested(self):
        # as peer.membership does: the state more than half of the reachable members report
        reachable = [p for p in self.view if not self.net[p].down]
        tally: dict = {}
        for p in reachable:
            state = self.net[p].store.state
            tally.setdefault((state.round, state.global_hash), []).append(p)
        for (rnd, digest), backers in tally.items():
            if 2 * len(backers) > len(reachable):
                return Attested(rnd, digest, tuple((p, p) for p in sorted(backers)))
        return None

    def round_of(self, peer_id):
        return self.net[peer_id].store.state.round if peer_id in self.view else -1

    def majority_round(self):
        rounds = sorted((self.net[p].store.state.round for p in self.view if not self.net[p].down), reverse=True)
        return rounds[len(rounds) // 2] if rounds else -1

    def split(self):
        return self.split_to

    def settled(self):
        return bool(self.view)

    def drop(self, peer_id, why):
        self.view.discard(peer_id)
        self.dropped.append((peer_id, why))

    def introduce(self, address, hint):
        # A handshake: both sides learn each other.
        self.introduced.append(address)
        self.net[address].members.view.add(self.me)
        self.view.add(address)


class Client:
    """Routes the PeerClient calls to the target node, as the gRPC service does."""

    def __init__(self, net: dict) -> None:
        self.net = net

    def _node(self, address):
        node = self.net[address]
        if node.down:
            raise PeerUnavailable(f"{address} is down", "UNAVAILABLE")
        return node

    async def join_round(self, address, req, timeout_s):
        return await asyncio.wait_for(self._node(address).driver.join(req), timeout_s)

    async def reduce(self, address, header, payload, timeout_s):
        async def call():
            owner = self._node(address).driver.owner
            expected = await owner.expect(header)
            if expected != len(payload):
                raise RoundError("bad_size", "size")
            return await owner.contribute(header, payload)

        try:
            return await asyncio.wait_for(call(), timeout_s)
        except TimeoutError:
            raise PeerUnavailable(f"{address} timed out", "DEADLINE_EXCEEDED") from None

    async def get_state(self, address, run_id, peer_id, schema_hash, timeout_s):
        return await self._node(address).store.async_snapshot()


class Node:
    def __init__(self, pid: str, rank: int, net: dict, tmp, pool, mirror: bool = False, **cfg) -> None:
        self.pid, self.down = pid, False
        self.cfg = load_config({"run_id": "r", "matchmaking_timeout_s": 1.0, "reduce_deadline_s": 2.0,
                                "startup_grace_s": 0.2, "chunk_idle_timeout_s": 1.0, "heartbeat_interval_s": 0.1,
                                "heartbeat_misses": 2, "checkpoint_interval_s": 0, "eval_every_rounds": 1,
                                # (confirm before applying; the tests of late confirmation set it)
                                "confirm_late_max_numel": 0,
                                "codec": "int8", **cfg}, env={})
        self.metrics = Metrics(CollectorRegistry())
        params = torch.linspace(-1, 1, NUMEL)
        self.store = StateStore(GlobalState(0, params, torch.zeros(NUMEL)), tmp / pid, pool,
                                checkpoint_interval_s=0)
        self.members = FakeMembers(pid, net)
        self.inner = FakeInner(rank)
        # A model "on a device": the mirror's code path with device="cpu" (peer.sync.mirror).
        self.mirror = DeviceMirror("cpu", lr=SETTINGS.outer_lr, momentum=SETTINGS.outer_momentum) if mirror else None
        self.driver = RoundDriver(self.cfg, SETTINGS, peer_id=pid, schema_hash="s", members=self.members,
                                  client=Client(net), store=self.store, inner=self.inner, executor=pool,
                                  metrics=self.metrics, address=lambda: pid, mirror=self.mirror)

    def metric(self, name, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2, thread_name_prefix="test-codec") as executor:
        yield executor


# Peer ids in the order of leader_for at round 0 (the leader rotates by sha256(round, id)): the
# first leads any group it is in, the second leads without the first.
NAMES = ("p15", "p22", "p17")


def _swarm(tmp, pool, k: int, mirrored: tuple[str, ...] = (), **cfg) -> dict[str, Node]:
    net: dict[str, Node] = {}
    for i in range(k):
        net[NAMES[i]] = Node(NAMES[i], i, net, tmp, pool, mirror=NAMES[i] in mirrored, **cfg)
    for node in net.values():
        node.members.view = {p for p in net if p != node.pid}
    return net


def _delta(node: Node) -> torch.Tensor:
    return torch.full((NUMEL,), (node.inner.rank + 1) * 0.01)


async def _round(nodes):
    return await asyncio.gather(*(n.driver.round(_delta(n), 1.0) for n in nodes))


async def test_a_round_leaves_every_member_with_the_same_state(tmp_path, pool):
    # Prepare
    net = _swarm(tmp_path, pool, 3)
    # Execute
    avgs = [a if a is None else a.tensor() for a in await _round(net.values())]
    # Assert: same average, same new state, round advanced, counted
    assert all(a is not None and torch.equal(a, avgs[0]) for a in avgs)
    assert torch.allclose(avgs[0], torch.full((NUMEL,), 0.02), atol=1e-3)
    hashes = {n.store.state.global_hash for n in net.values()}
    assert len(hashes) == 1 and all(n.store.state.round == 1 for n in net.values())
    assert all(n.metric("peer_rounds_total", outcome="completed") == 1 for n in net.values())


async def test_a_small_models_round_is_applied_at_once_and_counted_once_its_leader_confirms(tmp_path, pool):
    # Prepare: a model within confirm_late_max_numel
    net = _swarm(tmp_path, pool, 3, confirm_late_max_numel=NUMEL)
    before = {pid: n.store.state for pid, n in net.items()}
    # Execute: the rounds, then their confirmations (the next round would settle them first)
    avgs = await _round(net.values())
    applied = {(n.store.state.round, n.store.state.global_hash) for n in net.values()}
    settled = await asyncio.gather(*(n.driver.settle() for n in net.values()))
    # Assert: applied before the confirmation (the round returned before anyone awaited it),
    # counted once confirmed; the state each started from is intact (no in-place step: it is
    # what a rollback would restore)
    assert all(a is not None for a in avgs) and len(applied) == 1 and applied.pop()[0] == 1
    assert settled == [True, True, True]
    assert all(n.metric("peer_rounds_total", outcome="completed") == 1 for n in net.values())
    assert all(n.metric("peer_sync_invalid_claims_total", reason="owner_mismatch") == 0 for n in net.values())
    assert all(tensor_digest(s.params) == s.global_hash and s.params is not net[pid].store.state.params
               for pid, s in before.items())


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("late", [0, NUMEL])
async def test_only_a_group_of_three_or_more_confirms_its_answers(tmp_path, pool, monkeypatch, k, late):
    # Prepare: every confirmation a leader receives, its own included, is seen
    seen = []
    real = AnswerChecks.confirm

    async def confirm(self, req):
        seen.append(req.peer_id)
        return await real(self, req)

    monkeypatch.setattr(AnswerChecks, "confirm", confirm)
    net = _swarm(tmp_path, pool, k, confirm_late_max_numel=late)
    # Execute
    avgs = await _round(net.values())
    await asyncio.gather(*(n.driver.settle() for n in net.values()))
    # Assert: one new state; a pair completed the round with no confirmation (nothing to
    # compare), a trio with one from each member
    assert all(a is not None for a in avgs)
    assert len({(n.store.state.round, n.store.state.global_hash) for n in net.values()}) == 1
    assert sorted(seen) == (sorted(net) if k == 3 else [])
    assert all(n.metric("peer_rounds_total", outcome="completed") == 1 for n in net.values())


def _split_answers(liar: str, victim: str):
    """A Client.reduce whose owner ``liar`` answers ``victim`` with other valid bytes (one int8
    value one step off)."""
    honest = Client.reduce

    async def split(self, address, header, payload, timeout_s):
        reply, result = await honest(self, address, header, payload, timeout_s)
        if address == liar and header.peer_id == victim:
            result = result[:-1] + bytes([result[-1] ^ 1])
        return reply, result

    return split


async def _split_round(tmp_path, pool, monkeypatch) -> dict[str, Node]:
    """Three nodes confirming late after round 0, in which owner p17 answered p22 differently
    (p15 leads round 0 and compares the digests); every node applied, nobody settled yet."""
    net = _swarm(tmp_path, pool, 3, confirm_late_max_numel=NUMEL)
    with monkeypatch.context() as m:
        m.setattr(Client, "reduce", _split_answers("p17", "p22"))
        await _round(net.values())
    return net


async def test_a_member_that_applied_other_answers_rolls_back_and_resyncs_when_its_round_settles(tmp_path, pool,
                                                                                                 monkeypatch):
    # Prepare
    net = await _split_round(tmp_path, pool, monkeypatch)
    applied = net["p22"].store.state.global_hash
    # Execute
    settled = await asyncio.gather(*(n.driver.settle() for n in net.values()))
    # Assert: the victim had applied other bytes; it is told so, counts it, rolls back and
    # fetches the majority's state; the others complete the round; the leader counts it too.
    assert applied != net["p15"].store.state.global_hash
    assert settled == [True, False, True]  # p15, p22, p17
    assert {(n.store.state.round, n.store.state.global_hash) for n in net.values()} == \
        {(1, net["p15"].store.state.global_hash)}
    assert net["p22"].metric("peer_rounds_total", outcome="failed") == 1
    assert net["p22"].metric("peer_rounds_total", outcome="completed") == 0
    assert net["p22"].metric("peer_sync_invalid_claims_total", reason="owner_mismatch") == 1
    assert net["p15"].metric("peer_sync_invalid_claims_total", reason="owner_mismatch") == 1
    assert net["p15"].metric("peer_rounds_total", outcome="completed") == 1


async def test_the_next_round_settles_a_member_outside_the_majority_before_it_sends_anything(tmp_path, pool,
                                                                                             monkeypatch):
    # Prepare: round 0's confirmations still in flight
    net = await _split_round(tmp_path, pool, monkeypatch)
    majority_1 = (1, net["p15"].store.state.global_hash)
    # Execute: round 1, which settles round 0 first
    avgs = dict(zip(net, await _round(net.values())))
    await asyncio.gather(*(n.driver.settle() for n in net.values()))
    # Assert: the victim gave round 1 up and holds the majority's state (resynced); the two
    # others completed rounds 0 and 1 together, with one state; no group disagrees.
    assert avgs["p22"] is None and avgs["p15"] is not None
    assert torch.equal(avgs["p15"].tensor(), avgs["p17"].tensor())
    assert net["p15"].store.state.round == net["p17"].store.state.round == 2
    assert net["p15"].store.state.global_hash == net["p17"].store.state.global_hash
    victim = net["p22"].store.state
    assert (victim.round, victim.global_hash) in {majority_1, (2, net["p15"].store.state.global_hash)}
    assert net["p22"].metric("peer_sync_invalid_claims_total", reason="owner_mismatch") == 1
    assert net["p15"].metric("peer_rounds_total", outcome="completed") == 2
    assert net["p22"].metric("peer_rounds_total", outcome="completed") == 0


async def test_a_state_adopted_during_a_round_gets_no_average_applied(tmp_path, pool, monkeypatch):
    # Prepare: while p22 waits for an owner's answer, its store adopts another state (as the
    # previous round's rollback and catch-up did, concurrently, with late confirmation)
    net = _swarm(tmp_path, pool, 3)
    other = GlobalState(5, torch.linspace(0, 1, NUMEL), torch.zeros(NUMEL))
    honest = Client.reduce

    async def reduce(self, address, header, payload, timeout_s):
        out = await honest(self, address, header, payload, timeout_s)
        if header.peer_id == "p22" and net["p22"].store.state.round == 0:
            net["p22"].store.adopt(other)
        return out

    monkeypatch.setattr(Client, "reduce", reduce)
    # Execute
    avgs = dict(zip(net, await _round(net.values())))
    # Assert: the group's average (of deltas trained from round 0) is not stepped onto the
    # other state: p22's round fails and it holds that state untouched; the others complete
    assert avgs["p22"] is None and net["p22"].store.state is other
    assert tensor_digest(other.params) == other.global_hash
    assert net["p22"].metric("peer_rounds_total", outcome="failed") == 1
    assert avgs["p15"] is not None and net["p15"].store.state.round == net["p17"].store.state.round == 1


async def test_a_vanished_leader_is_dropped_and_the_next_lowest_leads(tmp_path, pool):
    net = _swarm(tmp_path, pool, 3)
    net["p15"].down = True
    # p0 still looks live to p1 and p2: their first JoinRound to it fails with UNAVAILABLE
    avgs = await _round([net["p22"], net["p17"]])
    assert all(a is not None for a in avgs)
    assert net["p22"].store.state.global_hash == net["p17"].store.state.global_hash
    assert ("p15", "its address refuses connections") in net["p17"].members.dropped
    assert torch.allclose(avgs[0].tensor(), torch.full((NUMEL,), 0.025), atol=1e-3)  # mean of p1 and p2


async def test_a_not_leader_answer_is_followed_to_the_real_leader(tmp_path, pool):
    net = _swarm(tmp_path, pool, 3)
    net["p17"].members.view = {"p22"}  # p2 does not know p0; p1 will point it there
    avgs = await _round(net.values())
    assert net["p17"].members.introduced == ["p15"]  # met it before joining its group
    assert all(a is not None for a in avgs)
    assert len({n.store.state.global_hash for n in net.values()}) == 1
    assert net["p15"].metric("peer_round_group_size_peers") == 3


async def test_a_leader_that_does_not_know_us_is_introduced_to_and_asked_again(tmp_path, pool):
    net = _swarm(tmp_path, pool, 3)
    net["p15"].members.view = {"p22"}  # the leader has not met p2 yet: it refuses p2's join

    async def later(node):
        await asyncio.sleep(0.1)
        return await node.driver.round(_delta(node), 1.0)

    avgs = await asyncio.gather(net["p17"].driver.round(_delta(net["p17"]), 1.0), later(net["p15"]), later(net["p22"]))
    assert net["p17"].members.introduced == ["p15"]
    assert all(a is not None for a in avgs)
    assert len({n.store.state.global_hash for n in net.values()}) == 1


async def test_a_stopping_leader_is_dropped(tmp_path, pool):
    net = _swarm(tmp_path, pool, 2)
    net["p15"].driver.request_stop()
    reply = await net["p15"].driver.join(_req(net["p22"]))
    assert reply.outcome == JoinOutcome.REFUSED and reply.message.startswith("leaving")
    group = await net["p22"].driver.form_group(0, 1.0)
    assert ("p15", "it is leaving") in net["p22"].members.dropped
    # alone now: it leads a group of one
    assert not isinstance(group, JoinReply) and [m.peer_id for m in group.members] == ["p22"]


def _req(node: Node):
    from peer.types import JoinRequest

    return JoinRequest(run_id="r", peer_id=node.pid, round=0, global_hash=node.store.state.global_hash,
                       weight=1.0, address=node.pid)


async def test_a_vanished_owner_fails_the_round_without_changing_the_state(tmp_path, pool):
    net = _swarm(tmp_path, pool, 3)
    groups = await asyncio.gather(*(n.driver.form_group(0, 1.0) for n in net.values()))
    net["p17"].down = True  # owns the last shard; gone after the group formed
    with pytest.raises(RoundError) as err:
        await asyncio.gather(*(n.driver.reducer.run(g, _delta(n), 1.0)
                               for n, g in zip([net["p15"], net["p22"]], groups)))
    assert err.value.reason == "shard_missing"
    # the driver's own path: counted as failed, abandoned (nobody completed it), state unchanged
    net2 = _swarm(tmp_path / "b", pool, 3)

    async def vanish(group, delta, weight, **pair):
        net2["p17"].down = True
        raise RoundError("gone", "p2 died")

    net2["p17"].driver.reducer.run = vanish
    results = await _round(net2.values())
    assert results[0] is None and results[1] is None
    for p in ("p15", "p22"):
        assert net2[p].store.state.round == 0
        assert net2[p].metric("peer_rounds_total", outcome="failed") == 1
        assert net2[p].driver.progress.failed == 1


async def test_a_member_that_falls_behind_resyncs_from_a_donor(tmp_path, pool):
    net = _swarm(tmp_path, pool, 3)
    await _round([net["p15"], net["p22"], net["p17"]])
    net["p17"].down = True  # p2 misses round 1
    net["p15"].members.view.discard("p17")
    net["p22"].members.view.discard("p17")
    await _round([net["p15"], net["p22"]])
    net["p17"].down = False
    lagging = net["p17"]
    assert lagging.members.attested().round == 2 and lagging.store.state.round == 1
    # Execute
    ok = await lagging.driver.resync(lagging.members.attested().round, 2.0)
    # Assert: adopted the donors' state, bit for bit
    assert ok
    assert lagging.store.state.round == 2
    assert lagging.store.state.global_hash == net["p15"].store.state.global_hash
    assert torch.equal(lagging.store.state.momentum, net["p15"].store.state.momentum)
    assert lagging.metric("peer_state_transfers_total", direction="received", outcome="ok") == 1


async def test_a_split_is_followed_only_after_three_matchmaking_timeouts_without_progress(tmp_path, pool):
    # Prepare: p15 and p22 complete a round without p17; then p17 sees nothing attested (its view
    # is empty) and a split that names p15's state
    net = _swarm(tmp_path, pool, 3, matchmaking_timeout_s=1.0)
    lagging = net["p17"]
    lagging.members.view.clear()
    net["p15"].members.view.discard("p17")
    net["p22"].members.view.discard("p17")
    await _round([net["p15"], net["p22"]])
    donor = net["p15"].store.state
    lagging.members.split_to = Attested(donor.round, donor.global_hash, (("p15", "p15"),))
    # Execute and assert: a peer that made progress lately does not take one peer's word...
    assert not await lagging.driver.resync(1, 0.5)
    assert lagging.store.state.round == 0 and lagging.metric("peer_sync_split_adoptions_total") == 0
    # ...one that made none for 3 x 1.0 s does, bit for bit, counted
    assert await lagging.driver.resync(1, 4.0)
    assert lagging.store.state.global_hash == donor.global_hash
    assert lagging.metric("peer_sync_split_adoptions_total") == 1


async def test_a_peer_ahead_only_by_rounds_alone_goes_back_to_the_majoritys_state(tmp_path, pool):
    # Prepare: a partition left p17 on a side of its own; its groups of one got it to round 3
    # while p15 and p22 completed one round together
    net = _swarm(tmp_path, pool, 3, matchmaking_timeout_s=0.3)
    alone = net["p17"]
    for n in net.values():
        n.members.view.clear()
    net["p15"].members.view.add("p22")
    net["p22"].members.view.add("p15")
    for _ in range(3):
        await alone.driver.round(_delta(alone), 1.0)
    await _round([net["p15"], net["p22"]])
    majority = net["p15"].store.state
    assert (alone.store.state.round, majority.round) == (3, 1)
    # Execute: the link returns
    alone.members.view = {"p15", "p22"}
    # Assert: only after 3 x 0.3 s without a round with another peer...
    alone.driver._together_at = time.monotonic()
    assert not alone.driver._alone_ahead(alone.members.attested())
    await asyncio.sleep(0.95)
    assert alone.driver._alone_ahead(alone.members.attested())
    # (and only for a state two or more report: one member's word does not take rounds back)
    alone.members.view = {"p15"}
    assert not alone.driver._alone_ahead(alone.members.attested())
    alone.members.view = {"p15", "p22"}
    # ...it takes the majority's state, bit for bit, though its round is lower
    assert alone.driver._resync_round() == majority.round  # (what the run loop resyncs to)
    assert await alone.driver.resync(alone.driver._resync_round(), 2.0)
    assert (alone.store.state.round, alone.store.state.global_hash) == (majority.round, majority.global_hash)
    assert not alone.driver._alone_ahead(alone.members.attested())
    # and a member of the majority, behind no one, is never moved back
    assert not net["p15"].driver._alone_ahead(net["p15"].members.attested())


async def test_a_minority_hash_is_told_to_resync_and_does(tmp_path, pool):
    net = _swarm(tmp_path, pool, 3)
    odd = net["p17"]
    odd.store.adopt(GlobalState(0, torch.zeros(NUMEL), torch.zeros(NUMEL)))  # diverged parameters
    results = await _round(net.values())
    assert results[2] is None and results[0] is not None
    # the majority completed round 0; the odd one fetched round 1 from them
    assert odd.store.state.round == 1
    assert odd.store.state.global_hash == net["p15"].store.state.global_hash
    assert odd.metric("peer_rounds_total", outcome="failed") == 1


async def test_error_feedback_is_reset_after_a_resync(tmp_path, pool):
    net = _swarm(tmp_path, pool, 2, codec="sign1")
    await _round(net.values())
    ef = net["p22"].driver.reducer.feedback
    assert ef is not None and ef.residual.abs().sum() > 0
    # p0 goes ahead alone (p1 not in its view); p1 resyncs to it
    net["p15"].members.view = set()
    await net["p15"].driver.round(_delta(net["p15"]), 1.0)
    assert await net["p22"].driver.resync(2, 2.0)
    assert ef.residual.abs().sum() == 0


@pytest.mark.parametrize("late", [0, NUMEL])
async def test_run_trains_the_configured_rounds_and_withholds_a_nan_phase(tmp_path, pool, late):
    net = _swarm(tmp_path, pool, 2, rounds=3, confirm_late_max_numel=late)
    net["p22"].inner.nan_rounds = (1,)
    # Execute: both loops end by themselves after 3 completed rounds
    await asyncio.wait_for(asyncio.gather(*(n.driver.run() for n in net.values())), 30)
    # Assert
    assert all(n.driver.progress.completed == 3 for n in net.values())
    assert net["p15"].store.state.global_hash == net["p22"].store.state.global_hash
    assert net["p22"].metric("peer_train_nonfinite_total") == 1
    assert net["p15"].driver.progress.eval["loss"] > 0


@pytest.mark.parametrize("k", [3, 2])  # owners' answers; a pair's swapped deltas
@pytest.mark.parametrize("codec", ["int8", "sign1"])
async def test_a_peer_applying_rounds_on_its_device_holds_the_groups_bits(tmp_path, pool, codec, k):
    # Prepare: p22's model is "on a device" (the mirror's path, on the CPU here); sign1 with
    # error feedback, int8 without
    net = _swarm(tmp_path, pool, k, rounds=3, mirrored=("p22",), codec=codec, error_feedback=codec == "sign1")
    # Execute
    await asyncio.wait_for(asyncio.gather(*(n.driver.run() for n in net.values())), 30)
    # Assert: one state everywhere; every phase of p22 started from its mirror, which holds the
    # group's state bit for bit, copied in once and advanced by each round's answers since
    assert all(n.driver.progress.completed == 3 for n in net.values())
    assert len({n.store.state.global_hash for n in net.values()}) == 1
    mirrored = net["p22"]
    state = mirrored.store.state
    assert (mirrored.mirror.copies, mirrored.mirror.advances, mirrored.mirror.enabled) == (1, 3, True)
    start = mirrored.mirror.start(state)
    assert start is not state.params and torch.equal(start.view(torch.int32), state.params.view(torch.int32))
    assert torch.equal(mirrored.mirror._buf.view(torch.int32), state.momentum.view(torch.int32))
    plain = net["p15"].inner.starts
    assert len(mirrored.inner.starts) == len(plain) == 3
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(mirrored.inner.starts, plain))


async def test_a_mirror_catches_up_by_copying_after_a_resync(tmp_path, pool):
    # Prepare: p22 (mirrored) misses a round that the others complete, then resyncs
    net = _swarm(tmp_path, pool, 3, mirrored=("p22",))
    mirror = net["p22"].mirror
    mirror.start(net["p22"].store.state)
    await _round(net.values())
    net["p15"].members.view = {"p17"}
    net["p17"].members.view = {"p15"}
    await _round([net["p15"], net["p17"]])
    # Execute
    assert await net["p22"].driver.resync(2, 2.0)
    start = mirror.start(net["p22"].store.state)
    # Assert: the round it missed was never applied on the device; the donor's state was copied in
    assert (mirror.copies, mirror.advances, mirror.enabled) == (2, 1, True)
    assert torch.equal(start, net["p15"].store.state.params)


async def test_a_mirror_that_switches_itself_off_is_shown_in_the_metrics(tmp_path, pool):
    # Prepare: p22's device copy goes wrong after one good round (as a device whose arithmetic
    # differed would leave it)
    net = _swarm(tmp_path, pool, 3, mirrored=("p22",))
    node, mirror = net["p22"], net["p22"].mirror
    assert node.metric("peer_sync_device_mirror_active") == 1 and net["p15"].metric("peer_sync_device_mirror_active") == 0
    mirror.start(node.store.state)
    await _round(net.values())
    mirror.start(node.store.state)[5] += 1.0
    # Execute
    await _round(net.values())
    # Assert: the round still completed alike for all; the mirror is off, and says why
    assert len({n.store.state.global_hash for n in net.values()}) == 1 and node.store.state.round == 2
    assert not mirror.enabled and mirror.off_reason == "bits"
    assert node.metric("peer_sync_device_mirror_active") == 0
    assert node.metric("peer_sync_device_mirror_off_total", reason="bits") == 1


def test_deadlines_adapt_between_margin_and_cap():
    d = Deadlines(matchmaking_cap_s=10, reduce_cap_s=30, factor=4, margin_s=1, smoothing=0.5)
    assert (d.matchmaking_timeout(), d.reduce_deadline()) == (10, 30)  # no observation: the caps
    d.observe_reduce(1.0)
    assert d.reduce_deadline() == 5.0
    d.observe_reduce(3.0)
    assert d.reduce_deadline() == 4 * 2.0 + 1  # smoothed: 0.5 * 1 + 0.5 * 3
    d.observe_reduce(100.0)
    assert d.reduce_deadline() == 30  # capped
    d.observe_formation(5.0, complete=False)
    assert d.matchmaking_timeout() == 10  # a timeout says nothing about arrival times
    d.observe_formation(0.5, complete=True)
    assert d.matchmaking_timeout() == 3.0


async def test_a_lying_leader_fails_the_round_counted_and_moves_nobody(tmp_path, pool):
    # (three peers: in a pair, the leader holds its partner's delta from the join and completes
    # its own round with it, however it lied; its partner then meets it a round ahead)
    net = _swarm(tmp_path, pool, 3)
    followers = [net["p22"], net["p17"]]
    honest = net["p15"].driver.join

    async def evil_group(req):
        reply = await honest(req)
        return replace(reply, group=replace(reply.group, codec="evil", reduce_deadline_s=1e9))

    net["p15"].driver.join = evil_group
    resyncs = []

    async def resync(target, timeout_s):
        resyncs.append(target)

    for follower in followers:
        follower.driver.resync = resync
    results = await asyncio.gather(*(n.driver.round(_delta(n), 1.0) for n in net.values()))
    assert results == [None, None, None] and all(n.store.state.round == 0 for n in net.values())
    # every honest member refuses such a group: nobody completes the round to catch up with
    assert resyncs == []
    for follower in followers:
        assert follower.metric("peer_sync_invalid_claims_total", reason="bad_group") == 1
        # ... and that leader is skipped: the followers' next round does not go through it
        assert follower.metric("peer_sync_excluded_total", reason="failing_leader") == 1
    assert all(r is not None for r in await asyncio.gather(*(f.driver.round(_delta(f), 1.0) for f in followers)))
    assert all(f.metric("peer_round_group_size_peers") == 2 for f in followers)


async def test_a_leader_claiming_a_round_far_ahead_moves_nobody(tmp_path, pool):
    net = _swarm(tmp_path, pool, 2)
    follower = net["p22"]

    async def far_ahead(req):
        return JoinReply(JoinOutcome.WRONG_ROUND, "I am far ahead", leader_round=10**9)

    net["p15"].driver.join = far_ahead
    t0 = asyncio.get_running_loop().time()
    assert await follower.driver.round(_delta(follower), 1.0) is None
    assert follower.store.state.round == 0  # no majority attests round 10**9: nothing adopted
    assert asyncio.get_running_loop().time() - t0 < 10  # and the wait for one is bounded


async def test_a_leader_whose_rounds_keep_failing_is_skipped(tmp_path, pool):
    net = _swarm(tmp_path, pool, 3, leader_failure_limit=1)
    leader, follower = net["p15"], net["p22"]

    async def vanish(group, delta, weight, **pair):
        raise RoundError("gone", "an owner vanished")

    for n in net.values():
        n.driver.reducer.run = vanish
    await _round(net.values())  # a round formed by p15 fails for everyone
    assert follower.metric("peer_sync_excluded_total", reason="failing_leader") == 1
    # the others now agree on the next leader without p15 (it may still join as a member)
    assert "p15" not in follower.driver._candidates() and "p15" not in net["p17"].driver._candidates()
    groups = await asyncio.gather(*(n.driver.form_group(0, 1.0) for n in (net["p22"], net["p17"])))
    assert all(not isinstance(g, JoinReply) for g in groups) and groups[0].group_id == groups[1].group_id
    assert leader.driver.progress.failed == 1


def test_leader_failures_are_counted_in_a_row(tmp_path, pool):
    node = _swarm(tmp_path, pool, 1, leader_failure_limit=3)[NAMES[0]]
    d = node.driver
    for ok in (False, False, True, False, False):  # a success in between resets the count
        d._leader_outcome("x", ok)
    assert "x" not in d._suspects
    d._leader_outcome("x", False)
    assert "x" in d._suspects and node.metric("peer_sync_excluded_total", reason="failing_leader") == 1


@pytest.mark.parametrize("offered", [True, False])
async def test_a_pair_swaps_deltas_applies_one_mean_and_keeps_nothing_registered(tmp_path, pool, offered):
    # Prepare: a pair (peer.sync.round.swaps); its members offer their deltas with the join, or
    # (a member that expected a larger group) do not, and send them on the Session stream
    net = _swarm(tmp_path, pool, 2)
    if not offered:
        async def no_offer(delta, codec):
            return None
        net["p22"].driver.reducer.offer = no_offer
    calls = []
    honest = Client.reduce

    async def recorded(self, address, header, payload, timeout_s):
        calls.append((header.peer_id, header.shard_start, header.shard_end))
        return await honest(self, address, header, payload, timeout_s)

    # Execute
    Client.reduce = recorded
    try:
        avgs = [a.tensor() for a in await _round(net.values())]
        await asyncio.sleep(0.05)  # (each partner's reply to the other's call)
    finally:
        Client.reduce = honest
    # Assert: the join carried both deltas (nothing else was sent), or each went whole in one call
    assert sorted(calls) == ([] if offered else [("p15", 0, NUMEL), ("p22", 0, NUMEL)])
    # one mean, one state, each delta sent whole once (int8: 600 values + a scale a block)
    assert torch.equal(avgs[0], avgs[1]) and torch.allclose(avgs[0], torch.full((NUMEL,), 0.015), atol=1e-4)
    assert len({n.store.state.global_hash for n in net.values()}) == 1
    assert all(n.store.state.round == 1 for n in net.values())
    size = get_codec("int8").encoded_size(NUMEL)
    for n in net.values():
        assert n.metric("peer_net_sent_bytes_total", codec="int8") == size
        assert n.metric("peer_rounds_total", outcome="completed") == 1
        assert not n.driver.registry._shards  # answered: the partner's call removed it


async def test_a_pair_member_offering_a_lying_delta_fails_its_partners_round_counted(tmp_path, pool):
    # Prepare: fp32; p22 offers a delta of NaNs with its join, then one of the wrong size
    from peer.sync.round import SwapOffer

    net = _swarm(tmp_path, pool, 2, codec="fp32")
    leader, liar = net["p15"], net["p22"]
    size = get_codec("fp32").encoded_size(NUMEL)

    async def nan_offer(delta, codec):
        return SwapOffer(b"\xff" * size, None)

    liar.driver.reducer.offer = nan_offer
    # Execute
    results = await _round(net.values())
    # Assert: the leader refuses it where its round takes it (counted), and keeps its state
    assert results[0] is None and leader.store.state.round == 0
    assert leader.metric("peer_sync_rejected_contributions_total", reason="corrupt") == 1
    assert leader.metric("peer_rounds_total", outcome="failed") == 1

    # a delta of the wrong size is refused with the join itself
    reply = await leader.driver.join(JoinRequest(run_id="r", peer_id="p22", round=0, global_hash="h", weight=1.0,
                                                 address="p22", swap_delta=b"\0" * (size - 4)))
    assert reply.outcome == JoinOutcome.REFUSED and "whole delta" in reply.message
    assert leader.metric("peer_sync_invalid_claims_total", reason="bad_join") == 1


async def test_a_pair_leader_relaying_a_lying_delta_fails_its_partners_round_counted(tmp_path, pool):
    # Prepare: the leader's GROUP reply carries NaNs (fp32), then bytes of the wrong size, as its delta
    for lie in (b"\xff" * get_codec("fp32").encoded_size(NUMEL), b"\0" * 7):
        net = _swarm(tmp_path / str(len(lie)), pool, 2, codec="fp32")
        leader, follower = net["p15"], net["p22"]
        honest = leader.driver.join

        async def lying_reply(req):
            reply = await honest(req)
            return replace(reply, swap_delta=lie) if reply.swap_delta else reply

        leader.driver.join = lying_reply
        # Execute
        await _round(net.values())
        # Assert: the follower refuses it where its round takes it, counted; the leader (which
        # took the follower's delta from the join) completed the round, and the follower catches
        # up with the leader's state instead of applying anything of the lie
        assert follower.metric("peer_sync_rejected_contributions_total", reason="corrupt") == 1
        assert follower.metric("peer_rounds_total", outcome="failed") == 1
        assert follower.metric("peer_rounds_total", outcome="completed") == 0
        assert follower.store.state.round == leader.store.state.round == 1
        assert follower.store.state.global_hash == leader.store.state.global_hash


async def test_an_owner_answering_garbage_fails_the_round_as_bad_reply(tmp_path, pool):
    net = _swarm(tmp_path, pool, 3, codec="fp32")  # (a pair swaps deltas: nobody answers it)
    honest = Client.reduce

    async def nan_answer(self, address, header, payload, timeout_s):
        reply, result = await honest(self, address, header, payload, timeout_s)
        return reply, b"\xff" * len(result)  # NaN floats, the right size

    groups = await asyncio.gather(*(n.driver.form_group(0, 1.0) for n in net.values()))
    Client.reduce = nan_answer
    try:
        outcomes = await asyncio.gather(*(n.driver.reducer.run(g, _delta(n), 1.0)
                                          for n, g in zip(net.values(), groups)), return_exceptions=True)
    finally:
        Client.reduce = honest
    assert all(isinstance(o, RoundError) and o.reason == "bad_reply" for o in outcomes), outcomes


async def test_a_nonfinite_outer_step_is_never_adopted(tmp_path, pool):
    net = _swarm(tmp_path, pool, 1)
    node = net["p15"]
    # a finite but huge outer momentum: with a huge delta, momentum * buf + delta overflows
    node.store.adopt(GlobalState(0, node.store.state.params, torch.full((NUMEL,), 3e38)))
    before = node.store.state
    huge = torch.full((NUMEL,), 3e38)
    # alone, the group is of one: its own average is its delta; the outer step overflows
    assert await node.driver.round(huge, 1.0) is None
    assert node.store.state is before
    assert node.metric("peer_sync_invalid_claims_total", reason="nonfinite_outer") == 1


async def test_a_state_being_served_is_never_overwritten_and_the_step_is_in_place_once_it_is_not(tmp_path, pool):
    # Prepare: a donor streams round 0 to a joiner (pinned) while this peer completes rounds
    node = _swarm(tmp_path, pool, 1)["p15"]
    served = await node.store.async_serve()
    round0 = node.store.state
    blob0 = served.tobytes()
    # Execute: round 0 -> 1 while round 0 is being served
    await node.driver.round(_delta(node), 1.0)
    round1 = node.store.state
    # Assert: a fresh state; the served bytes are still round 0's, whole (its sha256 holds)
    assert round1.round == 1 and round1.params.data_ptr() != round0.params.data_ptr()
    assert served.tobytes() == blob0 and served.header == state_header(round0, blob0)
    assert decode_state(blob0, NUMEL)[0].global_hash == round0.global_hash == served.header.global_hash
    served.release()
    # Execute: round 1 -> 2, nothing pins round 1
    want_p, want_b = outer_step(round1.params, _delta(node), round1.momentum, lr=SETTINGS.outer_lr,
                                momentum=SETTINGS.outer_momentum)
    where = (round1.params.data_ptr(), round1.momentum.data_ptr())
    await node.driver.round(_delta(node), 1.0)
    round2 = node.store.state
    # Assert: written over round 1's memory, the reference's bits, hashed; round 1's object retired
    assert round2.round == 2 and (round2.params.data_ptr(), round2.momentum.data_ptr()) == where
    assert torch.equal(round2.params.view(torch.int32), want_p.view(torch.int32))
    assert torch.equal(round2.momentum.view(torch.int32), want_b.view(torch.int32))
    assert round2.global_hash == tensor_digest(want_p)
    assert round1.params is None and round1.momentum is None and round1.round == 1


async def test_a_state_being_checkpointed_is_never_overwritten(tmp_path, pool):
    # Prepare: a checkpoint write that is still reading the state when the next round ends
    node = _swarm(tmp_path, pool, 1)["p15"]
    store = node.store
    writing, finish = threading.Event(), threading.Event()
    write = store.write

    def slow_write(state):
        writing.set()
        finish.wait(10)
        return write(state)

    store.write = slow_write
    round0 = store.state
    kept = (round0.params.clone(), round0.momentum.clone())
    checkpoint = asyncio.ensure_future(store.async_checkpoint())
    await asyncio.get_running_loop().run_in_executor(None, writing.wait, 10)
    # Execute: a round while the checkpoint of round 0 is being written (the store's executor is
    # busy with it: the step runs on the driver's)
    await node.driver.round(_delta(node), 1.0)
    finish.set()
    assert await checkpoint
    # Assert: round 0's tensors untouched, the file holds round 0 whole, nothing pinned after
    assert store.state.round == 1 and store.state.params.data_ptr() != round0.params.data_ptr()
    assert torch.equal(round0.params, kept[0]) and torch.equal(round0.momentum, kept[1])
    saved, _ = read_checkpoint(store.checkpoint_path, NUMEL)
    assert saved.round == 0 and torch.equal(saved.params, kept[0])
    assert store.pinned(round0) == 0


async def test_an_in_place_step_is_adopted_even_if_its_round_is_cancelled(tmp_path, pool, monkeypatch):
    # Prepare: the step on the executor (as for a large model), held there until released
    monkeypatch.setattr(driver_module, "runs_inline", lambda numel: False)
    node = _swarm(tmp_path, pool, 1)["p15"]
    started, go = threading.Event(), threading.Event()
    outer = node.driver._outer

    def held(*args):
        started.set()
        go.wait(10)
        return outer(*args)

    node.driver._outer = held
    before = node.store.state
    # Execute: cancel the round while its step writes; a donor asks meanwhile
    task = asyncio.ensure_future(node.driver.round(_delta(node), 1.0))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    asking = asyncio.ensure_future(node.store.async_serve())
    await asyncio.sleep(0.05)
    waited = not asking.done()
    go.set()
    served = await asyncio.wait_for(asking, 10)
    # Assert: the donor waited for the step, which was adopted: the bytes served are round 1's
    assert waited and node.store.state.round == 1 and before.params is None
    assert served.header.round == 1
    assert decode_state(served.tobytes(), NUMEL)[0].global_hash == served.header.global_hash
    served.release()


async def test_a_member_that_keeps_missing_the_deadline_is_left_out(tmp_path, pool):
    net = _swarm(tmp_path, pool, 3, exclude_after_misses=2)
    owner = net["p15"]
    # as an owner, p15 saw p17's part miss its cut-off twice in a row (a success in between resets)
    owner.driver._delivery(["p15", "p22"], ["p17"])
    owner.driver._delivery(["p15", "p22", "p17"], [])
    owner.driver._delivery(["p15", "p22"], ["p17"])
    assert not owner.driver._is_excluded("p17")
    owner.driver._delivery(["p15", "p22"], ["p17"])
    assert owner.driver._is_excluded("p17") and "p17" not in owner.driver._candidates()
    assert owner.metric("peer_sync_excluded_total", reason="missed_deadline") == 1
    # p15 leads round 0: it forms without waiting for p17 and turns its join away
    *results, late = await asyncio.gather(net["p15"].driver.round(_delta(net["p15"]), 1.0),
                                          net["p22"].driver.round(_delta(net["p22"]), 1.0),
                                          net["p17"].driver.form_group(0, 1.0))
    assert all(r is not None for r in results) and owner.metric("peer_round_group_size_peers") == 2
    assert isinstance(late, JoinReply) and late.outcome == JoinOutcome.TOO_LATE and "left out" in late.message
