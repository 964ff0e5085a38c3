"""What a peer is told is checked where it arrives: groups, state headers, averaged shards."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import pytest
import torch

from peer.errors import RoundError, StateError
from peer.sync.round import check_group, shard_bounds
from peer.sync.state import MAGIC, GlobalState, decode_state, encode_state
from peer.types import Group, Member

NUMEL = 1000


def _group(**kw) -> Group:
    ids = kw.pop("ids", ["a", "b", "me"])
    bounds = kw.pop("bounds", shard_bounds(NUMEL, len(ids)))
    members = tuple(Member(pid, f"{pid}:1", s, e, 1.0) for pid, (s, e) in zip(ids, bounds))
    fields = dict(group_id="g1", round=4, global_hash="h", members=members, codec="int8", numel=NUMEL,
                  reduce_deadline_s=5.0)
    fields.update(kw)
    return Group(**fields)


def _check(group: Group, known=("a", "b")) -> None:
    check_group(group, me="me", round=4, codec="int8", numel=NUMEL, max_deadline_s=30.0,
                is_member=lambda pid: pid in known)


def test_a_valid_group_passes():
    _check(_group())


@pytest.mark.parametrize("group, what", [
    (_group(codec="evil"), "codec 'evil'"),
    (_group(reduce_deadline_s=1e9), "deadline"),
    (_group(reduce_deadline_s=0.0), "deadline"),
    (_group(reduce_deadline_s=float("nan")), "deadline"),
    (_group(round=5), "round 5"),
    (_group(numel=999), "999 parameters"),
    (_group(ids=["a", "b"]), "not a member"),
    (_group(ids=["a", "a", "me"]), "unique"),
    (_group(ids=["me", "b", "a"]), "sorted"),
    (_group(bounds=[(0, 10), (10, 20), (20, NUMEL)]), "shard bounds"),
    (_group(group_id=""), "group id"),
])
def test_a_bad_group_is_refused_naming_the_claim(group, what):
    with pytest.raises(RoundError) as err:
        _check(group)
    assert err.value.reason == "bad_group" and what in str(err.value)


def test_a_group_naming_a_peer_not_met_yet_is_refused_but_not_called_a_lie():
    with pytest.raises(RoundError) as err:
        _check(_group(ids=["a", "me", "x"]))
    assert err.value.reason == "unknown_member" and "unknown here: x" in str(err.value)


def test_a_nonfinite_member_weight_is_refused():
    g = _group()
    bad = replace(g, members=(replace(g.members[0], weight=float("inf")), *g.members[1:]))
    with pytest.raises(RoundError, match="weight"):
        _check(bad)


def _blob(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(raw)) + raw + body


def _good_header() -> dict:
    state = GlobalState(3, torch.ones(4), torch.zeros(4))
    blob = encode_state(state)
    (hlen,) = struct.unpack_from("<Q", blob, len(MAGIC))
    return json.loads(blob[len(MAGIC) + 8: len(MAGIC) + 8 + hlen]), blob[len(MAGIC) + 8 + hlen:]


@pytest.mark.parametrize("mutate, what", [
    (lambda h: h.update(round=2**64 + 5), "outside"),
    (lambda h: h.update(round=-1), "outside"),
    (lambda h: h.update(tensors=None), "not a list"),
    (lambda h: h["tensors"][0].update(shape=[-1, -4]), "invalid shape"),
    (lambda h: h["tensors"][0].update(shape="x"), "malformed"),
    (lambda h: h.update(round="many"), "malformed"),
])
def test_a_lying_state_header_is_a_state_error(mutate, what):
    header, body = _good_header()
    mutate(header)
    with pytest.raises(StateError, match=what):
        decode_state(_blob(header, body), 4)


def test_a_header_that_is_not_an_object_is_a_state_error():
    with pytest.raises(StateError):
        decode_state(MAGIC + struct.pack("<Q", 2) + b"[]", 4)
