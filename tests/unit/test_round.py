"""Round logic (matchmaking, butterfly all-reduce) with an in-memory PeerClient: no sockets."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from peer.codec import get_codec
from peer.errors import CodecError, PeerUnavailable, RoundError
from peer.sync.outer import OUTER_CHUNK, magnitude, step_hashed_into, tensor_digest
from peer.sync.round import (
    DEVICE_INLINE_NUMEL,
    INLINE_NUMEL,
    PAIR_SWAP_NUMEL,
    Averaged,
    Matchmaker,
    OwnedShard,
    Reducer,
    ShardRegistry,
    leader_for,
    offload,
    pair_mean,
    shard_bounds,
    swaps,
)
from peer.types import Group, JoinOutcome, JoinRequest, Member



class Node:
    """One peer of an in-memory swarm. ``timeout_s``, the leader's matchmaking wait, is long by default:
    a group of every live peer forms at once, and a short one split groups under load (tests that
    are about the timeout pass their own)."""
    def __init__(self, pid: str, net: dict, numel: int, codec: str, pool, round_: int = 0, timeout_s: float = 10.0):
        self.pid, self.net, self.round = pid, net, round_
        self.registry = ShardRegistry()
        self.down = False
        self.matchmaker = Matchmaker(peer_id=pid, numel=numel, codec=codec, live=self.live,
                                     current_round=lambda: self.round, timeout_s=lambda: timeout_s, deadline_s=lambda: 3.0)
        self.reducer = Reducer(peer_id=pid, run_id="r", client=Client(net), registry=self.registry, executor=pool,
                               error_feedback=False)

    def live(self):
        return {p: p for p, n in self.net.items() if p != self.pid and not n.down}

    def req(self, global_hash="h", weight=1.0) -> JoinRequest:
        return JoinRequest(run_id="r", peer_id=self.pid, round=self.round, global_hash=global_hash, weight=weight,
                           address=self.pid)


class Client:
    """Routes calls straight to the target node's objects (what the gRPC server would do)."""

    def __init__(self, net: dict) -> None:
        self.net = net

    def _node(self, address: str) -> Node:
        node = self.net[address]
        if node.down:
            raise PeerUnavailable(f"{address} is down")
        return node

    async def join_round(self, address, req, timeout_s):
        return await asyncio.wait_for(self._node(address).matchmaker.join(req), timeout_s)

    async def reduce(self, address, header, payload, timeout_s):
        node = self._node(address)
        owned = await node.registry.get(header.group_id, timeout_s)
        assert header.total_bytes == len(payload)
        try:
            await owned.add(header.peer_id, header.weight, payload)
        except RoundError:
            pass
        result, contributors = await asyncio.wait_for(asyncio.shield(owned.result), timeout_s)
        return replace(header, total_bytes=len(result), contributors=contributors), result

    async def get_state(self, *a, **k):  # pragma: no cover (not used here)
        raise NotImplementedError


_POOLS: list[ThreadPoolExecutor] = []


@pytest.fixture(autouse=True)
def _shut_pools():
    """Each test's codec executor (made by ``_swarm``) is shut down after it."""
    yield
    while _POOLS:
        _POOLS.pop().shutdown(wait=True)


def _swarm(k: int, numel: int, codec: str = "int8", **kw) -> dict[str, Node]:
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-codec")
    _POOLS.append(pool)
    net: dict[str, Node] = {}
    for i in range(k):
        pid = f"p{i}"
        net[pid] = Node(pid, net, numel, codec, pool, **kw)
    return net


async def _form(node: Node, global_hash="h", weight=1.0):
    leader = leader_for(node.round, [node.pid, *node.live()])
    if leader == node.pid:
        return await node.matchmaker.join(node.req(global_hash, weight))
    return await Client(node.net).join_round(leader, node.req(global_hash, weight), 5)


@pytest.mark.parametrize("codec", ["fp32", "int8", "sign1"])
async def test_butterfly_gives_every_member_the_same_weighted_mean(codec):
    # Prepare: 3 peers with different deltas and sample weights
    numel = 1001
    net = _swarm(3, numel, codec)
    gen = torch.Generator().manual_seed(1)
    deltas = {p: torch.randn(numel, generator=gen) for p in net}
    weights = {"p0": 1.0, "p1": 2.0, "p2": 3.0}
    # Execute
    replies = await asyncio.gather(*(_form(n, weight=weights[p]) for p, n in net.items()))
    groups = [r.group for r in replies]
    assert all(r.outcome == JoinOutcome.GROUP for r in replies)
    results = await asyncio.gather(*(n.reducer.run(g, deltas[p], weights[p])
                                     for (p, n), g in zip(net.items(), groups)))
    # Assert: bit-identical results, close to the reference weighted mean within the codec bound
    avgs = [avg.tensor() for avg, _ in results]
    assert all(torch.equal(avgs[0], a) for a in avgs[1:])
    # A bound of the largest value, found while checking the answers (from int8's and sign1's scales)
    assert all(magnitude(avgs[0]) <= avg.magnitude <= magnitude(avgs[0]) * 128 / 127 * (1 + 2**-19)
               for avg, _ in results)
    ref = sum(deltas[p] * weights[p] for p in net) / 6.0
    c = get_codec(codec)
    bound = sum(c.error_bound(deltas[p]) * weights[p] for p in net) / 6.0 + c.error_bound(ref) + 1e-5
    assert (avgs[0] - ref).abs().max().item() <= bound
    # every member sent (K-1) shards and got (K-1) answers
    for _, stats in results:
        assert stats.contributors == [3, 3, 3]
        assert stats.sent_bytes > 0 and stats.received_bytes > 0


def _group(k: int, numel: int, weights: tuple[float, ...] | None = None) -> Group:
    weights = weights or (1.0,) * k
    return Group("g", 0, "h", tuple(Member(f"p{i}", f"p{i}", s, e, weights[i])
                                    for i, (s, e) in enumerate(shard_bounds(numel, k))), "int8", numel, 3.0)


def test_only_a_pair_with_a_small_model_swaps_whole_deltas():
    assert swaps(_group(2, 9610)) and swaps(_group(2, PAIR_SWAP_NUMEL))
    assert not swaps(_group(2, PAIR_SWAP_NUMEL + 1))  # a large pair: owners, parts streamed
    assert not swaps(_group(3, 9610)) and not swaps(_group(1, 9610))


def test_a_pairs_mean_is_single_float32_operations_with_the_weights_shares():
    c = get_codec("int8")
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen) * 7
    px, py = c.encode(x), c.encode(y)
    dx, dy = c.decode(px, 5000), c.decode(py, 5000)
    # each decoded delta times its share rounded to float32 once, then one float32 addition
    want = (dx * torch.tensor(1 / 3, dtype=torch.float32)) + (dy * torch.tensor(2 / 3, dtype=torch.float32))
    assert torch.equal(pair_mean(c, [px, py], [1.0, 2.0], 5000), want)
    assert torch.equal(pair_mean(c, [px, py], [2.0, 2.0], 5000), dx * 0.5 + dy * 0.5)
    # a weight of 0 takes no part: the other's values exactly; no weight at all: zeros
    assert torch.equal(pair_mean(c, [px, py], [0.0, 5.0], 5000), dy)
    assert torch.equal(pair_mean(c, [px, py], [0.0, 0.0], 5000), torch.zeros(5000))
    with pytest.raises(CodecError):
        pair_mean(get_codec("fp32"), [b"\xff" * 20, b"\0" * 20], [1.0, 1.0], 5)  # NaN


@pytest.mark.parametrize("codec", ["fp32", "int8"])
async def test_a_pair_swaps_whole_deltas_in_one_message_each_and_both_hold_the_same_mean(codec):
    # Prepare: a pair, different deltas and weights; every call a member makes is recorded
    numel = 3001
    net = _swarm(2, numel, codec)
    gen = torch.Generator().manual_seed(2)
    deltas = {p: torch.randn(numel, generator=gen) for p in net}
    weights = {"p0": 1.0, "p1": 3.0}
    calls = []
    honest = Client.reduce

    async def recorded(self, address, header, payload, timeout_s):
        calls.append((header.peer_id, address, header.shard_start, header.shard_end, len(payload)))
        return await honest(self, address, header, payload, timeout_s)

    replies = await asyncio.gather(*(_form(n, weight=weights[p]) for p, n in net.items()))
    Client.reduce = recorded
    try:
        results = await asyncio.gather(*(n.reducer.run(r.group, deltas[p].clone(), weights[p])
                                         for (p, n), r in zip(net.items(), replies)))
        await asyncio.sleep(0.05)  # (the partners' replies, which a member does not wait for)
    finally:
        Client.reduce = honest
    # Assert: one call each way, of the whole encoded delta
    c = get_codec(codec)
    assert sorted(calls) == [("p0", "p1", 0, numel, c.encoded_size(numel)), ("p1", "p0", 0, numel, c.encoded_size(numel))]
    # the same bits on both: the mean of the two payloads as sent, within the codec's bound of the exact mean
    avgs = [avg.tensor() for avg, _ in results]
    assert torch.equal(avgs[0], avgs[1])
    assert torch.equal(avgs[0], pair_mean(c, [c.encode(deltas["p0"]), c.encode(deltas["p1"])], [1.0, 3.0], numel))
    ref = (deltas["p0"] + 3 * deltas["p1"]) / 4
    bound = (c.error_bound(deltas["p0"]) + 3 * c.error_bound(deltas["p1"])) / 4 + 1e-6
    assert (avgs[0] - ref).abs().max().item() <= bound
    assert all(avg.magnitude == magnitude(avgs[0]) for avg, _ in results)
    for _, stats in results:
        assert stats.contributors == [2] and stats.sent_bytes == stats.received_bytes == c.encoded_size(numel)


async def test_a_pair_member_refuses_a_partners_delta_that_lies_and_fails_its_round():
    # Prepare: p1 claims another weight than the one it joined with, then sends a NaN delta
    numel = 500
    for lie in ("weight", "nan"):
        net = _swarm(2, numel, "fp32")
        replies = await asyncio.gather(*(_form(n) for n in net.values()))
        group = replies[0].group
        honest = Client.reduce
        refused = []

        async def lying(self, address, header, payload, timeout_s):
            if header.peer_id == "p1":
                header, payload = ((replace(header, weight=50.0), payload) if lie == "weight"
                                   else (header, b"\xff" * len(payload)))
            try:
                return await honest(self, address, header, payload, timeout_s)
            except RoundError as exc:
                refused.append((header.peer_id, exc.reason))
                raise

        Client.reduce = lying
        try:
            outcomes = await asyncio.gather(*(n.reducer.run(group, torch.ones(numel), 1.0) for n in net.values()),
                                            return_exceptions=True)
            await asyncio.sleep(0.05)
        finally:
            Client.reduce = honest
        # Assert: the honest member's round fails, naming why; the liar's call was refused
        honest_outcome, liar_outcome = outcomes
        assert isinstance(honest_outcome, RoundError), (lie, honest_outcome)
        assert honest_outcome.reason == ("bad_weight" if lie == "weight" else "corrupt")
        assert refused == [("p1", honest_outcome.reason)]
        assert not isinstance(liar_outcome, BaseException)  # (it got an honest delta: the next hash check meets it)


async def test_a_pair_member_whose_partner_sends_nothing_fails_at_the_deadline_and_blames_it():
    net = _swarm(2, 400)
    delivered = []
    net["p0"].reducer._on_delivered = lambda ok, missing: delivered.append((ok, missing))
    replies = await asyncio.gather(*(_form(n) for n in net.values()))
    group = replace(replies[0].group, reduce_deadline_s=0.3)
    started = time.monotonic()
    with pytest.raises(RoundError) as err:
        await net["p0"].reducer.run(group, torch.ones(400), 1.0)  # p1 never runs its side
    assert err.value.reason == "shard_missing" and "p1" in str(err.value)
    assert 0.25 < time.monotonic() - started < 2.0
    assert delivered == [(["p0"], ["p1"])]
    # a delta that comes after the cut-off is refused as late
    late = replace(group.members[1], weight=1.0)
    with pytest.raises(RoundError, match="after the cut-off"):
        await net["p0"].registry._shards[group.group_id].add(late.peer_id, 1.0, get_codec("int8").encode(torch.ones(400)))


async def test_a_pair_leader_relays_only_its_own_delta_and_only_when_both_offered_one():
    # a pair with its leader in it: each reply carries the other's offered delta
    net = _swarm(2, 100, timeout_s=0.3)
    offers = {"p0": b"delta of p0", "p1": b"delta of p1"}
    leader = net[leader_for(0, ["p0", "p1"])]
    replies = await asyncio.gather(*(leader.matchmaker.join(replace(n.req(), swap_delta=offers[p]))
                                     for p, n in net.items()))
    assert [r.swap_delta for r in replies] == [offers["p1"], offers["p0"]]
    # one join without an offer: neither reply carries one (both members then send theirs)
    net = _swarm(2, 100)
    leader = net[leader_for(0, ["p0", "p1"])]
    replies = await asyncio.gather(leader.matchmaker.join(replace(net["p0"].req(), swap_delta=offers["p0"])),
                                   leader.matchmaker.join(net["p1"].req()))
    assert [r.swap_delta for r in replies] == [b"", b""] and all(r.outcome == JoinOutcome.GROUP for r in replies)
    # a pair formed by a leader outside it (its timeout, without its own join): it passes nothing on
    net = _swarm(3, 100, timeout_s=0.2)
    leader = net[leader_for(0, ["p0", "p1", "p2"])]
    others = [n for n in net.values() if n is not leader]
    replies = await asyncio.gather(*(leader.matchmaker.join(replace(n.req(), swap_delta=b"d" + n.pid.encode()))
                                     for n in others))
    assert all(r.outcome == JoinOutcome.GROUP and len(r.group.members) == 2 for r in replies)
    assert leader.pid not in [m.peer_id for m in replies[0].group.members]
    assert [r.swap_delta for r in replies] == [b"", b""]


async def test_group_forms_without_a_peer_that_never_joins():
    net = _swarm(3, 100, timeout_s=0.5)
    # p2 is live (known to the leader) but never joins: the leader forms after its timeout.
    replies = await asyncio.gather(_form(net["p0"]), _form(net["p1"]))
    assert [r.outcome for r in replies] == [JoinOutcome.GROUP] * 2
    assert [m.peer_id for m in replies[0].group.members] == ["p0", "p1"]
    late = await _form(net["p2"])
    assert late.outcome == JoinOutcome.TOO_LATE


async def test_a_joiner_that_stopped_waiting_is_not_in_the_group_formed_after_it():
    # Found in the partition test: a member whose JoinRound timed out was still counted in the
    # group the leader formed afterwards; its owners waited for a part that never came, blamed
    # it three rounds in a row and left it out of their groups for a minute.
    net = _swarm(3, 100, timeout_s=0.5)
    leader = net[leader_for(0, ["p0", "p1", "p2"])]
    quitter, stayer = [n for n in net.values() if n is not leader]
    own = asyncio.ensure_future(leader.matchmaker.join(leader.req()))
    with pytest.raises(TimeoutError):  # the leader waits for everyone live; this joiner gives up first
        await Client(net).join_round(leader.pid, quitter.req(), 0.1)
    later = await Client(net).join_round(leader.pid, stayer.req(), 5)
    assert later.outcome == JoinOutcome.GROUP
    assert sorted(m.peer_id for m in later.group.members) == sorted([leader.pid, stayer.pid])
    assert (await own).group == later.group


async def test_joiners_held_by_a_leader_that_joins_elsewhere_are_sent_there():
    # Found in test_swarm: a peer joined; one old member already asked the old rotation's leader
    # while that leader, seeing the new member, asked the new one. The first waited for a leader
    # that never joined its own round, and got a group of one after three timeouts: a fork.
    net = _swarm(3, 100, timeout_s=5.0)
    net["p2"].down = True  # not met yet
    rnd = next(r for r in range(100) if leader_for(r, ["p0", "p1"]) != "p2" == leader_for(r, ["p0", "p1", "p2"]))
    old = net[leader_for(rnd, ["p0", "p1"])]
    follower = net["p1" if old.pid == "p0" else "p0"]
    for n in net.values():
        n.round = rnd
    waiting = asyncio.ensure_future(old.matchmaker.join(follower.req()))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    net["p2"].down = False  # met: the old leader joins the round at p2
    old.matchmaker.redirect(rnd, "p2", "p2")
    reply = await asyncio.wait_for(waiting, 1.0)
    assert reply.outcome == JoinOutcome.NOT_LEADER and reply.leader_hint == "p2@p2"
    # A leader waiting in its own round (its join among those it holds) sends nobody away
    net["p2"].down = True
    own = asyncio.ensure_future(old.matchmaker.join(old.req()))
    await asyncio.sleep(0.05)
    old.matchmaker.redirect(rnd, "p2", "p2")
    await asyncio.sleep(0.05)
    assert not own.done()
    replies = await asyncio.wait_for(asyncio.gather(own, old.matchmaker.join(follower.req())), 1.0)
    assert [r.outcome for r in replies] == [JoinOutcome.GROUP] * 2


async def test_minority_hash_is_told_to_resync():
    net = _swarm(3, 100)
    replies = await asyncio.gather(_form(net["p0"], "good"), _form(net["p1"], "good"), _form(net["p2"], "bad"))
    assert [r.outcome for r in replies] == [JoinOutcome.GROUP, JoinOutcome.GROUP, JoinOutcome.HASH_MISMATCH]
    assert replies[0].group.global_hash == "good"
    assert len(replies[0].group.members) == 2


async def test_wrong_round_and_not_leader():
    net = _swarm(2, 100)
    net["p0"].round = 5
    stale = JoinRequest(run_id="r", peer_id="p1", round=4, global_hash="h", weight=1.0, address="p1")
    reply = await net["p0"].matchmaker.join(stale)
    assert reply.outcome == JoinOutcome.WRONG_ROUND and reply.leader_round == 5
    redirect = await net["p1"].matchmaker.join(net["p0"].req())
    assert redirect.outcome == JoinOutcome.NOT_LEADER and redirect.leader_hint == "p0@p0"


async def test_a_join_waiting_for_a_round_the_leader_gives_up_is_told_it_is_over():
    # Found in the partition test: the leader's own join for a round waited forever once
    # joins for a later round made the leader forget that round.
    net = _swarm(2, 100, timeout_s=30.0)
    rnd = next(r for r in range(100) if leader_for(r, ["p0", "p1"]) == leader_for(r + 2, ["p0", "p1"]))
    leader = net[leader_for(rnd, ["p0", "p1"])]
    other = net["p1" if leader.pid == "p0" else "p0"]
    leader.round = rnd
    waiting = asyncio.ensure_future(leader.matchmaker.join(leader.req()))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # it waits (up to 30 s) for the other live peer
    leader.round = rnd + 1  # the leader moves on, and a join for a later round arrives
    other.round = rnd + 2
    later = asyncio.ensure_future(leader.matchmaker.join(other.req()))
    reply = await asyncio.wait_for(waiting, 1.0)
    assert reply.outcome == JoinOutcome.WRONG_ROUND and reply.leader_round == rnd + 1
    leader.matchmaker.close()
    later.cancel()
    await asyncio.gather(later, return_exceptions=True)


async def test_a_leader_behind_the_round_forms_no_complete_group_from_a_partial_view():
    # Found in the chaos test: a peer restarted a moment ago knew one member, led a round, and
    # formed "everyone joined" with that one at once, while it was meeting the others: a fork.
    # And in the swarm test: a fresh peer's server took a join before the peer had met anyone
    # (no handshake in flight yet), formed a group of one member, and three peers ended at three
    # states, none attested by two, none resyncing.
    net = _swarm(3, 100, timeout_s=0.3)
    leader = net[leader_for(5, ["p0", "p1", "p2"])]
    joiners = [n for n in net.values() if n is not leader][:1]  # the one member the leader knows
    leader.net = {n.pid: n for n in [leader, *joiners]}
    leader.round = 0  # restarted from an old checkpoint: far behind the round it matches
    leader.matchmaker._swarm_round = lambda: 5
    complete = []
    leader.matchmaker._on_formed = lambda wait_s, done: complete.append(done)
    for n in joiners:
        n.round = 5
    formed = await asyncio.gather(*(leader.matchmaker.join(n.req()) for n in joiners))
    assert [r.outcome for r in formed] == [JoinOutcome.GROUP] and complete == [False]  # by the timer
    # in step with the round it matches, a leader forms at once
    pair = sorted(leader.net)
    r = next(r for r in range(6, 100) if leader_for(r, pair) == leader.pid)
    leader.round = r
    for n in joiners:
        n.round = r
    formed = await asyncio.gather(*(leader.matchmaker.join(n.req()) for n in [leader, *joiners]))
    assert [r.outcome for r in formed] == [JoinOutcome.GROUP] * 2 and complete == [False, True]


async def test_a_vanished_owner_fails_the_round_for_the_others_within_the_deadline():
    net = _swarm(3, 300)
    replies = await asyncio.gather(*(_form(n) for n in net.values()))
    group = replace(replies[0].group, reduce_deadline_s=1.0)
    net["p2"].down = True  # p2 owns the last shard and never answers
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(RoundError) as err:
        await net["p0"].reducer.run(group, torch.ones(300), 1.0)
    assert err.value.reason == "shard_missing" and "p2" in str(err.value)
    assert loop.time() - t0 < 2.5


async def test_a_withheld_delta_weight_zero_is_left_out_but_its_peer_stays_in_sync():
    net = _swarm(3, 300, "fp32")
    weights = {"p0": 10.0, "p1": 30.0, "p2": 0.0}
    replies = await asyncio.gather(*(_form(n, weight=weights[p]) for p, n in net.items()))
    group = replies[0].group
    # p2's inner phase went NaN: it joins with a zero delta of weight 0 (as the daemon does).
    results = await asyncio.gather(net["p0"].reducer.run(group, torch.full((300,), 1.0), 10.0),
                                   net["p1"].reducer.run(group, torch.full((300,), 3.0), 30.0),
                                   net["p2"].reducer.run(group, torch.zeros(300), 0.0))
    avgs = [a.tensor() for a, _ in results]
    assert all(torch.equal(avgs[0], a) for a in avgs)
    assert torch.allclose(avgs[0], torch.full((300,), 2.5))


async def test_error_feedback_residual_is_kept_only_when_the_round_completes():
    # Prepare: sign1 with error feedback, 3 peers
    net = _swarm(3, 300, "sign1")
    for n in net.values():
        n.reducer._use_ef = True
    gen = torch.Generator().manual_seed(3)
    replies = await asyncio.gather(*(_form(n) for n in net.values()))
    group = replace(replies[0].group, reduce_deadline_s=1.0)
    deltas = {p: torch.randn(300, generator=gen) for p in net}
    # Execute 1: a completed round leaves a non-zero residual
    await asyncio.gather(*(n.reducer.run(group, deltas[p], 1.0) for p, n in net.items()))
    kept = net["p0"].reducer.feedback.residual.clone()
    assert kept.abs().sum() > 0
    # Execute 2: a failed round (owner p2 gone) leaves the residual as it was
    for n in net.values():
        n.round = 1
    replies = await asyncio.gather(*(_form(n) for n in net.values()))
    failed = replace(replies[0].group, reduce_deadline_s=1.0)
    net["p2"].down = True
    with pytest.raises(RoundError):
        await net["p0"].reducer.run(failed, torch.randn(300, generator=gen), 1.0)
    # Assert
    assert torch.equal(net["p0"].reducer.feedback.residual, kept)


async def test_a_part_announcing_another_weight_than_its_join_is_left_out():
    net = _swarm(3, 300, "fp32")
    replies = await asyncio.gather(*(_form(n) for n in net.values()))  # all joined with weight 1
    group = replies[0].group
    results = await asyncio.gather(net["p0"].reducer.run(group, torch.full((300,), 1.0), 1.0),
                                   net["p1"].reducer.run(group, torch.full((300,), 3.0), 1.0),
                                   net["p2"].reducer.run(group, torch.full((300,), 1000.0), 1e30),
                                   return_exceptions=True)
    # the liar's parts are refused everywhere (the owners average without it); its own shard's
    # part from itself too, so the honest two agree on the mean of their own deltas
    assert torch.allclose(results[0][0].tensor(), torch.full((300,), 2.0))
    assert torch.equal(results[0][0].tensor(), results[1][0].tensor())


@pytest.mark.parametrize("stalled", [False, True])
async def test_an_owner_blames_a_missing_part_only_when_its_own_cut_off_was_on_time(stalled):
    codec = get_codec("int8")
    members = (Member("a", "a", 0, 50, 1.0), Member("b", "b", 50, 100, 1.0), Member("c", "c", 50, 100, 1.0))
    group = Group("g", 0, "h", members, "int8", 100, reduce_deadline_s=1.0)
    seen = []
    pool = ThreadPoolExecutor(1)
    _POOLS.append(pool)
    owned = OwnedShard(group, members[1], codec, pool, cutoff_s=0.1,
                       on_delivered=lambda delivered, missing: seen.append((delivered, missing)))
    await owned.add("b", 1.0, codec.encode(torch.ones(50)))
    await owned.add("a", 1.0, codec.encode(torch.ones(50)))
    if stalled:
        time.sleep(0.3)  # the owner's loop is blocked past its cut-off (c's part may sit in a socket)
    await asyncio.wait_for(asyncio.shield(owned.result), 2.0)
    await asyncio.sleep(0.01)
    assert seen == [(["a", "b"], [] if stalled else ["c"])]
    owned.close()


@pytest.mark.parametrize("rule, outlier_weight", [("mean", 1.0), ("mean", 0.0), ("trimmed_mean", 1.0)])
async def test_an_owner_answers_the_encoded_mean_of_the_parts_it_kept(rule, outlier_weight):
    # Prepare: four parts of a shard larger than a piece (the mean decodes them piece by piece,
    # measuring the norms on the way), one of them 1000x the others (a norm outlier, left out,
    # the mean taken again without it; with weight 0 it takes no part in the mean, and its norm
    # is measured alone), uneven weights
    from peer.sync.aggregate import aggregate
    from peer.sync.round import Aggregation

    codec = get_codec("int8")
    n = 150_001
    members = tuple(Member(p, p, 0, n, w) for p, w in zip("abcd", (1.0, 2.0, 3.0, outlier_weight)))
    group = Group("g", 0, "h", members, "int8", n, reduce_deadline_s=5.0)
    g = torch.Generator().manual_seed(3)
    deltas = {"a": torch.randn(n, generator=g), "b": torch.randn(n, generator=g),
              "c": torch.randn(n, generator=g), "d": torch.randn(n, generator=g) * 1000}
    pool = ThreadPoolExecutor(1)
    _POOLS.append(pool)
    rejected = []
    owned = OwnedShard(group, members[0], codec, pool, cutoff_s=5.0, aggregation=Aggregation(rule=rule),
                       on_rejected=lambda pid, err: rejected.append((pid, err.reason)))

    # Execute
    for m in members:
        await owned.add(m.peer_id, m.weight, codec.encode(deltas[m.peer_id]))
    payload, contributors = await asyncio.wait_for(asyncio.shield(owned.result), 5.0)

    # Assert: the bytes of encoding the rule over the decoded parts it kept, whole (the mean of
    # a lossy codec's parts accumulated in float32: acc += w_i / sum(w) * x_i in member order)
    kept = "abc"
    decoded = [codec.decode(codec.encode(deltas[p]), n) for p in kept]
    if rule == "mean":
        expected = torch.zeros(n)
        for x, w in zip(decoded, (1.0, 2.0, 3.0)):
            expected.add_(x, alpha=w / 6.0)
    else:
        expected = aggregate(rule, decoded, [1.0, 2.0, 3.0])
    assert payload == codec.encode(expected)
    assert contributors == 4 and rejected == [("d", "norm_outlier")]
    owned.close()


async def test_an_owner_refuses_a_part_that_decodes_to_non_finite_values():
    # Prepare: a part whose first block's scale is finite but overflows its values
    import struct

    codec = get_codec("int8")
    members = (Member("a", "a", 0, 1000, 1.0), Member("b", "b", 0, 1000, 1.0))
    group = Group("g", 0, "h", members, "int8", 1000, reduce_deadline_s=5.0)
    pool = ThreadPoolExecutor(1)
    _POOLS.append(pool)
    owned = OwnedShard(group, members[0], codec, pool, cutoff_s=0.2)
    bad = bytearray(codec.encode(torch.ones(1000)))
    bad[0:4] = struct.pack("<f", 3.0e38)

    # Execute / Assert: refused as corrupt; the shard still averages the good part
    with pytest.raises(RoundError) as caught:
        await owned.add("b", 1.0, bytes(bad))
    assert caught.value.reason == "corrupt"
    await owned.add("a", 1.0, codec.encode(torch.full((1000,), 2.0)))
    payload, contributors = await asyncio.wait_for(asyncio.shield(owned.result), 5.0)
    assert contributors == 1 and torch.equal(codec.decode(payload, 1000), torch.full((1000,), 2.0))
    owned.close()


@pytest.mark.parametrize("codec", ["fp32", "int8", "int4", "sign1", "fp16", "bf16"])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_the_step_from_the_encoded_answers_is_the_step_from_the_decoded_average_bit_for_bit(codec, k):
    # Prepare: an averaged delta as K owners answer it (shards that straddle the step's chunks),
    # a state with buffers (one integer slice) after its parameters
    c = get_codec(codec)
    numel = 2 * OUTER_CHUNK + 5003
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(numel, generator=gen) * 1e-2
    shards = tuple((s, e, c.encode(x[s:e])) for s, e in shard_bounds(numel, k))
    whole = torch.empty(numel)
    for s, e, p in shards:  # what the round applied before: each answer decoded into one tensor
        c.decode_into(p, whole[s:e])
    avg = Averaged(c, numel, shards, magnitude(whole))
    theta, buf = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen)
    kw = dict(lr=0.7, momentum=0.9, param_numel=numel - 1000, int_slices=((numel - 10, numel - 4),))
    want_p, want_b = torch.empty(numel), torch.empty(numel)
    want = step_hashed_into(theta, whole, buf, want_p, want_b, **kw)

    # Execute: the step read from the answers piece by piece, in place
    got = step_hashed_into(theta, avg, buf, theta, buf, **kw)

    # Assert: the same bits, hash (the next global hash) and size; the whole tensor too
    assert got == want and got[0] == tensor_digest(want_p)
    assert torch.equal(theta.view(torch.int32), want_p.view(torch.int32))
    assert torch.equal(buf.view(torch.int32), want_b.view(torch.int32))
    assert torch.equal(avg.tensor().view(torch.int32), whole.view(torch.int32))


async def test_an_owner_lets_its_shard_go_once_every_member_has_the_answer():
    # Prepare: an owner's shard of a group of three
    net = _swarm(3, 300)
    replies = await asyncio.gather(*(_form(n) for n in net.values()))
    group = replies[0].group
    me = group.members[0]
    shard = OwnedShard(group, me, get_codec("int8"), net["p0"].reducer._executor, cutoff_s=5.0)

    # Execute / Assert: True only when the last member was answered (a repeat changes nothing)
    assert shard.answered("p0") is False
    assert shard.answered("p0") is False
    assert shard.answered("p2") is False
    assert shard.answered("p1") is True
    shard.close()


async def test_after_a_round_no_owner_keeps_its_shard_until_the_deadline():
    # Prepare: three members; the in-memory client answers as ReduceOwner does
    net = _swarm(3, 3000)
    replies = await asyncio.gather(*(_form(n) for n in net.values()))
    group = replies[0].group
    gen = torch.Generator().manual_seed(5)

    async def reduce(address, header, payload, timeout_s):
        node = net[address]
        owned = await node.registry.get(header.group_id, timeout_s)
        await owned.add(header.peer_id, header.weight, payload)
        result, contributors = await asyncio.shield(owned.result)
        if owned.answered(header.peer_id):
            node.registry.remove(header.group_id)
        return replace(header, total_bytes=len(result), contributors=contributors), result

    for n in net.values():
        n.reducer._client.reduce = reduce

    # Execute
    await asyncio.gather(*(n.reducer.run(group, torch.randn(3000, generator=gen), 1.0) for n in net.values()))

    # Assert: every owner dropped its shard (its answer) at once, not at the deadline (3 s)
    for n in net.values():
        with pytest.raises(RoundError, match="unknown_group|no group"):
            await n.registry.get(group.group_id, 0.01)


class _Rewriting(Client):
    """A client whose answers from ``owner`` are rewritten by ``rewrite(answer, numel)``: an owner
    that lies with valid bytes."""

    def __init__(self, net: dict, owner: str, rewrite) -> None:
        super().__init__(net)
        self.owner, self.rewrite = owner, rewrite

    async def reduce(self, address, header, payload, timeout_s):
        reply, result = await super().reduce(address, header, payload, timeout_s)
        if address == self.owner:
            result = bytes(self.rewrite(result, header.numel))
        return reply, result


@pytest.mark.parametrize("lie", ["inflate", "spike"])
async def test_a_member_refuses_an_answer_its_own_part_cannot_explain_and_no_other(lie):
    # Prepare: p0's answer from p2 rewritten: the average times 1000 (its norm far past 4 sqrt(K)
    # x norm_outlier_factor x p0's own part), or one value 10x p0's part's norm in a shard of
    # zeros (within the limit, but its scales alone could not show it: a block's bound is 16x
    # its one value, so the answer is decoded and its norm measured)
    c = get_codec("int8")
    numel = 3 * 4096
    net = _swarm(3, numel)
    gen = torch.Generator().manual_seed(9)
    deltas = {p: torch.randn(numel, generator=gen) for p in net}
    replies = await asyncio.gather(*(_form(n) for n in net.values()))
    group = replies[0].group
    s, e = group.members[2].shard_start, group.members[2].shard_end
    own = float(deltas["p0"][s:e].norm())

    def rewrite(answer, n):
        if lie == "inflate":
            return c.encode(c.decode(answer, n) * 1000)
        spike = torch.zeros(n)
        spike[7] = 10 * own
        return c.encode(spike)

    net["p0"].reducer._client = _Rewriting(net, "p2", rewrite)

    # Execute
    results = await asyncio.gather(*(n.reducer.run(group, deltas[p].clone(), 1.0) for p, n in net.items()),
                                   return_exceptions=True)

    # Assert: the inflated answer fails p0's round, naming p2; the spike passes (and bounds the
    # averaged delta's magnitude); the other members complete either way
    if lie == "inflate":
        assert isinstance(results[0], RoundError) and results[0].reason == "answer_norm"
        assert results[0].culprits == ("p2",)
    else:
        avg, _ = results[0]
        assert avg.magnitude >= 10 * own * (1 - 2**-8)
    assert all(not isinstance(r, BaseException) for r in results[1:])


async def test_an_owner_averages_its_own_part_as_it_is_cut_like_the_decoded_ones():
    # Prepare: a codec whose pieces are not 64K values (blocks of 300), the owner's own part as a
    # float32 tensor (never encoded), the others encoded
    from peer.codec import Int8Codec

    codec = Int8Codec(block=300)
    n = 150_001
    members = tuple(Member(p, p, 0, n, 1.0) for p in "abc")
    group = Group("g", 0, "h", members, "int8", n, reduce_deadline_s=5.0)
    g = torch.Generator().manual_seed(4)
    deltas = {p: torch.randn(n, generator=g) for p in "abc"}
    pool = ThreadPoolExecutor(1)
    _POOLS.append(pool)
    owned = OwnedShard(group, members[0], codec, pool, cutoff_s=5.0)

    # Execute
    await owned.add("a", 1.0, deltas["a"])
    for p in "bc":
        await owned.add(p, 1.0, codec.encode(deltas[p]))
    payload, contributors = await asyncio.wait_for(asyncio.shield(owned.result), 5.0)

    # Assert: the encoded float32 mean of its own values as they are and the others' decoded ones
    expected = torch.zeros(n)
    for x in (deltas["a"], codec.decode(codec.encode(deltas["b"]), n), codec.decode(codec.encode(deltas["c"]), n)):
        expected.add_(x, alpha=1.0 / 3.0)
    assert payload == codec.encode(expected) and contributors == 3
    owned.close()


async def test_replies_ready_to_go_out_run_before_work_that_follows_on_the_loop():
    from peer.sync.round import let_replies_out

    sent: list[str] = []

    async def reply() -> None:
        sent.append("reply")

    task = asyncio.ensure_future(reply())  # ready, not yet run (as a server's answer task is)
    await let_replies_out()
    sent.append("outer step")
    await task
    assert sent == ["reply", "outer step"]


async def test_host_work_of_up_to_a_million_values_runs_on_the_loop_and_device_work_only_when_small():
    # Prepare: a function that says which thread ran it
    def where(_: object) -> str:
        return threading.current_thread().name

    loop_thread = threading.current_thread().name
    with ThreadPoolExecutor(1, thread_name_prefix="codec") as pool:
        # Execute / Assert: on the loop at and below the line, on the executor above it
        assert await offload(pool, INLINE_NUMEL, where, None) == loop_thread
        assert (await offload(pool, INLINE_NUMEL + 1, where, None)).startswith("codec")
        assert await offload(pool, DEVICE_INLINE_NUMEL, where, None, on_device=True) == loop_thread
        assert (await offload(pool, DEVICE_INLINE_NUMEL + 1, where, None, on_device=True)).startswith("codec")
