"""Conversion between generated protobuf messages and domain types (``peer.types``)."""

from __future__ import annotations

from peer.transport.gen import peer_pb2 as pb
from peer.types import (
    Group, HandshakeReply, JoinOutcome, JoinReply, JoinRequest, LocalRank, Member, PeerInfo, ReduceHeader,
    StateHeader, StatusInfo,
)


def info_to_pb(i: PeerInfo) -> pb.PeerInfo:
    return pb.PeerInfo(peer_id=i.peer_id, run_id=i.run_id, protocol_version=i.protocol_version,
                       schema_hash=i.schema_hash, codecs=list(i.codecs), round=i.round, global_hash=i.global_hash,
                       address=i.address, metrics_port=i.metrics_port, task=i.task)


def info_from_pb(m: pb.PeerInfo) -> PeerInfo:
    return PeerInfo(peer_id=m.peer_id, run_id=m.run_id, protocol_version=m.protocol_version,
                    schema_hash=m.schema_hash, codecs=tuple(m.codecs), round=m.round, global_hash=m.global_hash,
                    address=m.address, metrics_port=m.metrics_port, task=m.task)


def handshake_reply_to_pb(r: HandshakeReply) -> pb.HandshakeResponse:
    return pb.HandshakeResponse(accepted=r.accepted, reason=r.reason, message=r.message,
                                peer=info_to_pb(r.peer) if r.peer else None)


def handshake_reply_from_pb(m: pb.HandshakeResponse) -> HandshakeReply:
    return HandshakeReply(accepted=m.accepted, reason=m.reason, message=m.message,
                          peer=info_from_pb(m.peer) if m.HasField("peer") else None)


_STATUS_FIELDS = ("inner_step", "loss", "eval_loss", "eval_accuracy", "bytes_sent", "bytes_received",
                  "last_round_s", "phase", "samples", "rounds_completed", "rounds_failed", "codec")


_RANK_FIELDS = ("rank", "pid", "device", "alive", "samples")


def status_to_pb(s: StatusInfo) -> pb.StatusResponse:
    return pb.StatusResponse(peer=info_to_pb(s.peer), peers=list(s.peers),
                             local_ranks=[pb.LocalRank(**{f: getattr(r, f) for f in _RANK_FIELDS})
                                          for r in s.local_ranks],
                             **{f: getattr(s, f) for f in _STATUS_FIELDS})


def status_from_pb(m: pb.StatusResponse) -> StatusInfo:
    return StatusInfo(peer=info_from_pb(m.peer), peers=tuple(m.peers),
                      local_ranks=tuple(LocalRank(**{f: getattr(r, f) for f in _RANK_FIELDS})
                                        for r in m.local_ranks),
                      **{f: getattr(m, f) for f in _STATUS_FIELDS})


def join_request_to_pb(r: JoinRequest) -> pb.JoinRoundRequest:
    return pb.JoinRoundRequest(run_id=r.run_id, peer_id=r.peer_id, round=r.round, global_hash=r.global_hash,
                               weight=r.weight, address=r.address, confirm_group=r.confirm_group,
                               answer_digests=list(r.answer_digests), swap_delta=r.swap_delta)


def join_request_from_pb(m: pb.JoinRoundRequest) -> JoinRequest:
    return JoinRequest(run_id=m.run_id, peer_id=m.peer_id, round=m.round, global_hash=m.global_hash,
                       weight=m.weight, address=m.address, confirm_group=m.confirm_group,
                       answer_digests=tuple(m.answer_digests), swap_delta=m.swap_delta)


def group_to_pb(g: Group) -> pb.Group:
    return pb.Group(group_id=g.group_id, round=g.round, global_hash=g.global_hash, codec=g.codec, numel=g.numel,
                    reduce_deadline_s=g.reduce_deadline_s,
                    members=[pb.Member(peer_id=m.peer_id, address=m.address, shard_start=m.shard_start,
                                       shard_end=m.shard_end, weight=m.weight) for m in g.members])


def group_from_pb(m: pb.Group) -> Group:
    return Group(group_id=m.group_id, round=m.round, global_hash=m.global_hash, codec=m.codec, numel=m.numel,
                 reduce_deadline_s=m.reduce_deadline_s,
                 members=tuple(Member(x.peer_id, x.address, x.shard_start, x.shard_end, x.weight) for x in m.members))


def join_reply_to_pb(r: JoinReply) -> pb.JoinRoundResponse:
    return pb.JoinRoundResponse(outcome=int(r.outcome), message=r.message,
                                group=group_to_pb(r.group) if r.group else None,
                                leader_hint=r.leader_hint, leader_round=r.leader_round, swap_delta=r.swap_delta)


def join_reply_from_pb(m: pb.JoinRoundResponse) -> JoinReply:
    try:
        outcome = JoinOutcome(m.outcome)
    except ValueError:
        outcome = JoinOutcome.REFUSED
    return JoinReply(outcome=outcome, message=m.message, group=group_from_pb(m.group) if m.HasField("group") else None,
                     leader_hint=m.leader_hint, leader_round=m.leader_round, swap_delta=m.swap_delta)


_REDUCE_FIELDS = ("run_id", "group_id", "round", "peer_id", "shard_start", "shard_end", "codec", "numel",
                  "total_bytes", "crc32", "weight", "contributors")


def reduce_header_to_pb(h: ReduceHeader) -> pb.ReduceHeader:
    return pb.ReduceHeader(**{f: getattr(h, f) for f in _REDUCE_FIELDS})


def reduce_header_from_pb(m: pb.ReduceHeader) -> ReduceHeader:
    return ReduceHeader(**{f: getattr(m, f) for f in _REDUCE_FIELDS})


def state_header_to_pb(h: StateHeader) -> pb.StateHeader:
    return pb.StateHeader(round=h.round, global_hash=h.global_hash, total_bytes=h.total_bytes, digest=h.digest,
                          format=h.format, params_offset=h.params_offset, params_bytes=h.params_bytes)


def state_header_from_pb(m: pb.StateHeader) -> StateHeader:
    return StateHeader(round=m.round, global_hash=m.global_hash, total_bytes=m.total_bytes, digest=m.digest,
                       format=m.format, params_offset=m.params_offset, params_bytes=m.params_bytes)
