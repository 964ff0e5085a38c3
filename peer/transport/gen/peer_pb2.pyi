from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PeerInfo(_message.Message):
    __slots__ = ("peer_id", "run_id", "protocol_version", "schema_hash", "codecs", "round", "global_hash", "address", "metrics_port", "task")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_HASH_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    run_id: str
    protocol_version: int
    schema_hash: str
    codecs: _containers.RepeatedScalarFieldContainer[str]
    round: int
    global_hash: str
    address: str
    metrics_port: int
    task: str
    def __init__(self, peer_id: _Optional[str] = ..., run_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., schema_hash: _Optional[str] = ..., codecs: _Optional[_Iterable[str]] = ..., round: _Optional[int] = ..., global_hash: _Optional[str] = ..., address: _Optional[str] = ..., metrics_port: _Optional[int] = ..., task: _Optional[str] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("peer",)
    PEER_FIELD_NUMBER: _ClassVar[int]
    peer: PeerInfo
    def __init__(self, peer: _Optional[_Union[PeerInfo, _Mapping]] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("accepted", "reason", "message", "peer")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    message: str
    peer: PeerInfo
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., peer: _Optional[_Union[PeerInfo, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("peer", "inner_step", "loss", "eval_loss", "peers", "bytes_sent", "bytes_received", "last_round_s", "phase", "samples", "rounds_completed", "rounds_failed", "codec", "eval_accuracy", "local_ranks")
    PEER_FIELD_NUMBER: _ClassVar[int]
    INNER_STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_S_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FAILED_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANKS_FIELD_NUMBER: _ClassVar[int]
    peer: PeerInfo
    inner_step: int
    loss: float
    eval_loss: float
    peers: _containers.RepeatedScalarFieldContainer[str]
    bytes_sent: int
    bytes_received: int
    last_round_s: float
    phase: str
    samples: int
    rounds_completed: int
    rounds_failed: int
    codec: str
    eval_accuracy: float
    local_ranks: _containers.RepeatedCompositeFieldContainer[LocalRank]
    def __init__(self, peer: _Optional[_Union[PeerInfo, _Mapping]] = ..., inner_step: _Optional[int] = ..., loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., peers: _Optional[_Iterable[str]] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., last_round_s: _Optional[float] = ..., phase: _Optional[str] = ..., samples: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., rounds_failed: _Optional[int] = ..., codec: _Optional[str] = ..., eval_accuracy: _Optional[float] = ..., local_ranks: _Optional[_Iterable[_Union[LocalRank, _Mapping]]] = ...) -> None: ...

class LocalRank(_message.Message):
    __slots__ = ("rank", "pid", "device", "alive", "samples")
    RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    pid: int
    device: str
    alive: bool
    samples: int
    def __init__(self, rank: _Optional[int] = ..., pid: _Optional[int] = ..., device: _Optional[str] = ..., alive: _Optional[bool] = ..., samples: _Optional[int] = ...) -> None: ...

class JoinRoundRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "round", "global_hash", "weight", "address", "confirm_group", "answer_digests", "swap_delta")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_HASH_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_GROUP_FIELD_NUMBER: _ClassVar[int]
    ANSWER_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    SWAP_DELTA_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    round: int
    global_hash: str
    weight: float
    address: str
    confirm_group: str
    answer_digests: _containers.RepeatedScalarFieldContainer[str]
    swap_delta: bytes
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., round: _Optional[int] = ..., global_hash: _Optional[str] = ..., weight: _Optional[float] = ..., address: _Optional[str] = ..., confirm_group: _Optional[str] = ..., answer_digests: _Optional[_Iterable[str]] = ..., swap_delta: _Optional[bytes] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("peer_id", "address", "shard_start", "shard_end", "weight")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARD_START_FIELD_NUMBER: _ClassVar[int]
    SHARD_END_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    shard_start: int
    shard_end: int
    weight: float
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., shard_start: _Optional[int] = ..., shard_end: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class Group(_message.Message):
    __slots__ = ("group_id", "round", "global_hash", "members", "codec", "numel", "reduce_deadline_s")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_HASH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    REDUCE_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    round: int
    global_hash: str
    members: _containers.RepeatedCompositeFieldContainer[Member]
    codec: str
    numel: int
    reduce_deadline_s: float
    def __init__(self, group_id: _Optional[str] = ..., round: _Optional[int] = ..., global_hash: _Optional[str] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., codec: _Optional[str] = ..., numel: _Optional[int] = ..., reduce_deadline_s: _Optional[float] = ...) -> None: ...

class JoinRoundResponse(_message.Message):
    __slots__ = ("outcome", "message", "group", "leader_hint", "leader_round", "swap_delta")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[JoinRoundResponse.Outcome]
        GROUP: _ClassVar[JoinRoundResponse.Outcome]
        NOT_LEADER: _ClassVar[JoinRoundResponse.Outcome]
        WRONG_ROUND: _ClassVar[JoinRoundResponse.Outcome]
        HASH_MISMATCH: _ClassVar[JoinRoundResponse.Outcome]
        TOO_LATE: _ClassVar[JoinRoundResponse.Outcome]
        REFUSED: _ClassVar[JoinRoundResponse.Outcome]
        CONFIRMED: _ClassVar[JoinRoundResponse.Outcome]
        ANSWERS_DIFFER: _ClassVar[JoinRoundResponse.Outcome]
    OUTCOME_UNSPECIFIED: JoinRoundResponse.Outcome
    GROUP: JoinRoundResponse.Outcome
    NOT_LEADER: JoinRoundResponse.Outcome
    WRONG_ROUND: JoinRoundResponse.Outcome
    HASH_MISMATCH: JoinRoundResponse.Outcome
    TOO_LATE: JoinRoundResponse.Outcome
    REFUSED: JoinRoundResponse.Outcome
    CONFIRMED: JoinRoundResponse.Outcome
    ANSWERS_DIFFER: JoinRoundResponse.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LEADER_HINT_FIELD_NUMBER: _ClassVar[int]
    LEADER_ROUND_FIELD_NUMBER: _ClassVar[int]
    SWAP_DELTA_FIELD_NUMBER: _ClassVar[int]
    outcome: JoinRoundResponse.Outcome
    message: str
    group: Group
    leader_hint: str
    leader_round: int
    swap_delta: bytes
    def __init__(self, outcome: _Optional[_Union[JoinRoundResponse.Outcome, str]] = ..., message: _Optional[str] = ..., group: _Optional[_Union[Group, _Mapping]] = ..., leader_hint: _Optional[str] = ..., leader_round: _Optional[int] = ..., swap_delta: _Optional[bytes] = ...) -> None: ...

class ReduceHeader(_message.Message):
    __slots__ = ("run_id", "group_id", "round", "peer_id", "shard_start", "shard_end", "codec", "numel", "total_bytes", "crc32", "weight", "contributors")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_START_FIELD_NUMBER: _ClassVar[int]
    SHARD_END_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    group_id: str
    round: int
    peer_id: str
    shard_start: int
    shard_end: int
    codec: str
    numel: int
    total_bytes: int
    crc32: int
    weight: float
    contributors: int
    def __init__(self, run_id: _Optional[str] = ..., group_id: _Optional[str] = ..., round: _Optional[int] = ..., peer_id: _Optional[str] = ..., shard_start: _Optional[int] = ..., shard_end: _Optional[int] = ..., codec: _Optional[str] = ..., numel: _Optional[int] = ..., total_bytes: _Optional[int] = ..., crc32: _Optional[int] = ..., weight: _Optional[float] = ..., contributors: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReduceMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ReduceHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ReduceHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ReducePart(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ReduceHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ReduceHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SessionMessage(_message.Message):
    __slots__ = ("id", "join", "joined", "part", "error", "timeout_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    id: int
    join: JoinRoundRequest
    joined: JoinRoundResponse
    part: ReducePart
    error: SessionError
    timeout_s: float
    def __init__(self, id: _Optional[int] = ..., join: _Optional[_Union[JoinRoundRequest, _Mapping]] = ..., joined: _Optional[_Union[JoinRoundResponse, _Mapping]] = ..., part: _Optional[_Union[ReducePart, _Mapping]] = ..., error: _Optional[_Union[SessionError, _Mapping]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "schema_hash")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    schema_hash: str
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., schema_hash: _Optional[str] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("round", "global_hash", "total_bytes", "digest", "format", "params_offset", "params_bytes")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_HASH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PARAMS_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: int
    global_hash: str
    total_bytes: int
    digest: str
    format: str
    params_offset: int
    params_bytes: int
    def __init__(self, round: _Optional[int] = ..., global_hash: _Optional[str] = ..., total_bytes: _Optional[int] = ..., digest: _Optional[str] = ..., format: _Optional[str] = ..., params_offset: _Optional[int] = ..., params_bytes: _Optional[int] = ...) -> None: ...

class StateMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("run_id", "peer_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
