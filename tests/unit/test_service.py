"""The service (the transport's Handler): thin calls into membership, store and the round."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from peer.errors import HandshakeRefused
from peer.metrics import Metrics
from peer.service import Service
from peer.sync.state import decode_state
from peer.types import JoinOutcome, JoinRequest
from tests.unit.test_driver import NAMES, NUMEL, _swarm, pool  # noqa: F401 (the fixture)
from tests.unit.test_membership import _info, _membership


def _service(tmp_path, pool):
    node = _swarm(tmp_path, pool, 1)[NAMES[0]]
    membership, *_ = _membership()
    metrics = Metrics(CollectorRegistry())
    hooked = []

    async def hook(phase, rnd):
        hooked.append((phase, rnd))

    me = lambda: _info("me")  # noqa: E731
    return Service(node.cfg, me, membership, node.driver, node.store, metrics, phase_hook=hook), membership, hooked


async def test_status_reports_the_round_progress_and_members(tmp_path, pool):
    service, membership, _ = _service(tmp_path, pool)
    membership.admit(_info("b"), "b:1")
    membership.admit(_info("a"), "a:1")
    s = service.status()
    assert s.peer.peer_id == "me" and s.peers == ("a", "b") and s.phase == "starting" and s.codec == "int8"


async def test_a_join_from_a_non_member_is_refused(tmp_path, pool):
    service, _, _ = _service(tmp_path, pool)
    reply = await service.join_round(JoinRequest("r", "stranger", 0, "h", 1.0, "x:1"))
    assert reply.outcome == JoinOutcome.REFUSED and "not a known peer" in reply.message


async def test_state_is_served_only_for_this_run_and_model(tmp_path, pool):
    service, _, hooked = _service(tmp_path, pool)
    with pytest.raises(HandshakeRefused):
        await service.state_snapshot("other", "x", "s")
    with pytest.raises(HandshakeRefused):
        await service.state_snapshot("r", "x", "another-schema")
    served = await service.state_snapshot("r", "x", "s")
    state, _ = decode_state(served.tobytes(), NUMEL)
    served.release()
    assert served.header.global_hash == state.global_hash
    await service.serving_state(0)
    assert hooked == [("serve_state", 0)]


async def test_leave_drops_the_member(tmp_path, pool):
    service, membership, _ = _service(tmp_path, pool)
    membership.admit(_info("a"), "a:1")
    service.leave("r", "a")
    assert not membership.is_member("a")
