"""Message conversion at the transport boundary, and the generated code is up to date."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from peer.transport import convert
from peer.transport.gen import peer_pb2 as pb
from peer.transport.server import observed_host
from peer.types import (
    Group, HandshakeReply, JoinOutcome, JoinReply, JoinRequest, LocalRank, Member, PeerInfo, ReduceHeader, StateHeader,
    StatusInfo,
)

INFO = PeerInfo(peer_id="a1", run_id="lab", protocol_version=1, schema_hash="s" * 64, codecs=("int8", "fp32"),
                round=7, global_hash="g" * 64, address="10.0.0.1:7070", metrics_port=9470, task="digits")
GROUP = Group(group_id="g1", round=3, global_hash="h", codec="int8", numel=10, reduce_deadline_s=2.5,
              members=(Member("a", "h:1", 0, 5, 32.0), Member("b", "h:2", 5, 10, 16.0)))


def _roundtrip(to_pb, from_pb, value):
    msg = to_pb(value)
    wire = msg.SerializeToString()
    return from_pb(type(msg).FromString(wire))


@pytest.mark.parametrize("to_pb, from_pb, value", [
    (convert.info_to_pb, convert.info_from_pb, INFO),
    (convert.handshake_reply_to_pb, convert.handshake_reply_from_pb,
     HandshakeReply(False, "schema_mismatch", "model schema differs", INFO)),
    (convert.handshake_reply_to_pb, convert.handshake_reply_from_pb, HandshakeReply(True, "", "", None)),
    (convert.status_to_pb, convert.status_from_pb,
     StatusInfo(peer=INFO, inner_step=5, loss=1.5, eval_loss=1.25, eval_accuracy=0.5, peers=("b", "c"),
                bytes_sent=10, bytes_received=20, last_round_s=0.5, phase="inner", samples=64,
                rounds_completed=3, rounds_failed=1, codec="int8",
                local_ranks=(LocalRank(0, 100, "cuda:0", True, 64), LocalRank(1, 101, "cuda:1", False, 32)))),
    (convert.join_request_to_pb, convert.join_request_from_pb,
     JoinRequest(run_id="lab", peer_id="a", round=4, global_hash="h", weight=320.0, address="h:1")),
    (convert.join_request_to_pb, convert.join_request_from_pb,
     JoinRequest(run_id="lab", peer_id="a", round=4, global_hash="h", weight=320.0, address="h:1",
                 swap_delta=b"\x00\x01delta")),
    (convert.join_reply_to_pb, convert.join_reply_from_pb, JoinReply(JoinOutcome.GROUP, group=GROUP)),
    (convert.join_reply_to_pb, convert.join_reply_from_pb,
     JoinReply(JoinOutcome.GROUP, group=GROUP, swap_delta=b"\xffdelta")),
    (convert.join_reply_to_pb, convert.join_reply_from_pb,
     JoinReply(JoinOutcome.NOT_LEADER, "x leads", leader_hint="x@h:3", leader_round=2)),
    (convert.reduce_header_to_pb, convert.reduce_header_from_pb,
     ReduceHeader(run_id="lab", group_id="g", round=1, peer_id="a", shard_start=0, shard_end=5, codec="int8",
                  numel=5, total_bytes=9, crc32=123, weight=2.0, contributors=3)),
    (convert.state_header_to_pb, convert.state_header_from_pb,
     StateHeader(round=9, global_hash="h", total_bytes=100, digest="s", format="peerstate1")),
])
def test_domain_types_survive_the_wire(to_pb, from_pb, value):
    assert _roundtrip(to_pb, from_pb, value) == value


def test_unknown_join_outcome_from_a_newer_peer_is_a_refusal():
    msg = pb.JoinRoundResponse(outcome=99, message="future")
    assert convert.join_reply_from_pb(msg).outcome == JoinOutcome.REFUSED


def test_every_status_field_is_converted():
    # A field added to StatusInfo but forgotten in convert would silently read as its default.
    names = {f.name for f in dataclasses.fields(StatusInfo)} - {"peer", "peers", "local_ranks"}
    assert names == set(convert._STATUS_FIELDS)
    assert {f.name for f in dataclasses.fields(LocalRank)} == set(convert._RANK_FIELDS)


def test_malformed_bytes_do_not_parse():
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        pb.ReduceMessage.FromString(b"\x0a\xff\xff\xff\xff\x0f")


@pytest.mark.parametrize("peer, host", [("ipv4:10.0.0.2:5123", "10.0.0.2"), ("ipv6:[::1]:5123", "[::1]"),
                                        ("unix:/tmp/x", "")])
def test_observed_host(peer, host):
    assert observed_host(peer) == host


def test_generated_code_is_not_stale():
    out = subprocess.run([sys.executable, "-m", "peer.transport.codegen", "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
