"""Domain types shared by the round logic, the transport and the daemon (stdlib only).

``peer.transport`` converts protobuf messages to and from these at the boundary; nothing else
sees generated code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import blake3

PROTOCOL_VERSION = 9
"""Version of the peer wire protocol; announced in mDNS TXT and checked again by the handshake.
It covers what peers must compute alike, not only the messages: 2 changed the outer step's
float32 operations (``peer.sync.outer``, no fused multiply-adds), so a peer of version 1 would
hold other bits after every round; the handshake refuses it instead. 4 added ``ReduceWhole`` (a
part that fits one chunk goes in one message), which members send each other. 5 made the state digest (``global_hash``, a state's
``StateHeader.digest``, members' answer digests) BLAKE3 instead of sha256 and blake2b. 6 leaves
``ReduceHeader.crc32`` at 0 over TLS (a peer of version 5 would refuse such parts as corrupt).
7 sends JoinRound and ReduceWhole as messages on a ``Session`` stream, which a peer of version 6
does not serve. 8: a group of two sends its leader no confirmation (``peer.sync.confirm.compared``),
which a leader of version 7 would wait for until the all-reduce deadline. 9: a group of two with
a small model swaps whole deltas (``peer.sync.round.swaps``), which an owner of version 8 refuses
as a part of the wrong shard; its members offer their deltas with the join, and the leader's
GROUP reply carries its own (``JoinRequest.swap_delta``)."""


@dataclass(frozen=True)
class PeerInfo:
    peer_id: str
    run_id: str
    protocol_version: int
    schema_hash: str
    codecs: tuple[str, ...] = ()
    round: int = 0
    global_hash: str = ""
    address: str = ""
    metrics_port: int = 0
    task: str = ""


@dataclass(frozen=True)
class HandshakeReply:
    accepted: bool
    reason: str
    message: str
    peer: PeerInfo | None


@dataclass(frozen=True)
class LocalRank:
    """One local rank of a peer that spans several processes (``--local-workers``)."""

    rank: int
    pid: int
    device: str
    alive: bool
    samples: int


@dataclass(frozen=True)
class StatusInfo:
    peer: PeerInfo
    inner_step: int = 0
    loss: float = float("nan")
    eval_loss: float = float("nan")
    eval_accuracy: float = float("nan")
    peers: tuple[str, ...] = ()
    bytes_sent: int = 0
    bytes_received: int = 0
    last_round_s: float = 0.0
    phase: str = ""
    samples: int = 0
    rounds_completed: int = 0
    rounds_failed: int = 0
    codec: str = ""
    local_ranks: tuple[LocalRank, ...] = ()


@dataclass(frozen=True)
class JoinRequest:
    run_id: str
    peer_id: str
    round: int
    global_hash: str
    weight: float
    address: str
    confirm_group: str = ""  # set: a confirmation of group ``confirm_group``'s answers, not a join
    answer_digests: tuple[str, ...] = ()
    swap_delta: bytes = b""  # a pair's whole encoded delta, offered with the join (``peer.sync.round.swaps``)


@dataclass(frozen=True)
class Member:
    peer_id: str
    address: str
    shard_start: int
    shard_end: int
    weight: float


@dataclass(frozen=True)
class Group:
    group_id: str
    round: int
    global_hash: str
    members: tuple[Member, ...]
    codec: str
    numel: int
    reduce_deadline_s: float

    def member(self, peer_id: str) -> Member | None:
        return next((m for m in self.members if m.peer_id == peer_id), None)


class JoinOutcome(enum.IntEnum):
    GROUP = 1
    NOT_LEADER = 2
    WRONG_ROUND = 3
    HASH_MISMATCH = 4
    TOO_LATE = 5
    REFUSED = 6
    CONFIRMED = 7
    ANSWERS_DIFFER = 8


@dataclass(frozen=True)
class JoinReply:
    outcome: JoinOutcome
    message: str = ""
    group: Group | None = None
    leader_hint: str = ""
    leader_round: int = 0
    swap_delta: bytes = b""  # in a pair's GROUP reply: the other member's (the leader's) offered delta


@dataclass(frozen=True)
class ReduceHeader:
    """Names a payload on a Reduce stream: whose, which round and shard, how encoded."""

    run_id: str
    group_id: str
    round: int
    peer_id: str
    shard_start: int
    shard_end: int
    codec: str
    numel: int
    total_bytes: int
    crc32: int = 0  # of the payload on plain TCP, 0 over TLS (authenticated records); filled in and checked by the transport
    weight: float = 0.0
    contributors: int = 0


def digest_hasher() -> blake3.blake3:
    """A hasher of the state digest: BLAKE3-256 (hex: 64 digits), one thread. The swarm names a
    state by it (``global_hash``: attested by the majority, checked by joiners, in checkpoints and
    exports; ``StateHeader``), and members compare owners' answers by it, so it must resist collisions a liar
    could craft (a checksum would not); BLAKE3 does, at ~3x sha256's speed on this CPU with SHA
    instructions (40 MB: 12.6 vs 35.7 ms, one thread). It releases the GIL on large updates."""
    return blake3.blake3()


@dataclass(frozen=True)
class StateHeader:
    """What a donor announces before its state blob. ``global_hash`` is the digest
    (``digest_hasher``) of the ``params_bytes`` bytes at ``params_offset`` (the parameters);
    ``digest`` that of every other byte of the blob."""
    round: int
    global_hash: str
    total_bytes: int
    digest: str
    format: str
    params_offset: int = 0
    params_bytes: int = 0
