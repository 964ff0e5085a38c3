"""The state a donor serves and a checkpoint holds: the global state, outer momentum, round.

The global state is the flat float32 vector of the model's parameters and buffers (see
``peer.trainer.params``); ``GlobalState.params`` holds all of it.

Two formats, no pickle in either:

- The wire (``GetState``): ``MAGIC``, an 8-byte little-endian header length, a JSON header
  (round, numel, global_hash, tensor table) and the raw little-endian float32 tensors. Every
  size is validated against the header and the expected numel before anything is allocated.
- Checkpoint files: safetensors (``safetensors.torch.load_file`` opens them) holding the
  tensors ``global`` and ``momentum`` (1-D float32) and string metadata: ``format``, ``round``,
  ``numel``, ``global_hash`` and ``momentum_hash`` (their state digests, BLAKE3: the integrity
  check, a torn or altered file fails it), plus what the writer adds (run id, task, schema
  hash). Written atomically. ``peer export`` turns one into a file of the model's own
  ``state_dict`` names. Files of the previous format (``peer-checkpoint-2``, the same with
  ``global_sha256`` and ``momentum_sha256``) are read and checked by their sha256.

Older versions wrote checkpoint files in the wire format followed by its sha256
(``read_legacy_checkpoint``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.codec import all_finite
from peer.errors import StateError
from peer.sync.outer import digest_hasher, magnitude, tensor_digest, tensor_sha256
from peer.types import StateHeader

MAGIC = b"PEERSTATE1\n"
FORMAT = "peerstate1"
MAX_HEADER = 1 << 20
CHECKPOINT_FORMAT = "peer-checkpoint-3"
SHA256_CHECKPOINT_FORMAT = "peer-checkpoint-2"
"""The previous checkpoint format: the same, with sha256 digests (``global_sha256``,
``momentum_sha256``); still read."""


@dataclass(frozen=True)
class GlobalState:
    """One round's global state. Its tensors are never modified while it is the store's
    current state or pinned (``peer.sync.store.StateStore``): hold on to it for the span of one
    round, and pin it (``StateStore.async_pin``) to read its bytes beyond that. Once the outer
    step wrote the next round over these very tensors (in place, when nothing pinned them), the
    store retires this object: ``params`` and ``momentum`` become None, so that a late reader
    fails loudly instead of reading the next round's values under this round's label."""

    round: int
    params: torch.Tensor      # 1-D float32 CPU
    momentum: torch.Tensor    # 1-D float32 CPU, same length

    @functools.cached_property
    def global_hash(self) -> str:
        # Cached: the tensors of a GlobalState are not modified while anyone may ask (see
        # above), and peers ask for the hash on every status and join.
        return tensor_digest(self.params)

    @functools.cached_property
    def magnitude(self) -> float:
        """The largest |value| of the parameters and momentum (``peer.sync.outer.magnitude``), or
        an upper bound of it (an in-place outer step records ``finite_bound``'s instead of
        measuring): what lets the next step write in place (``finite_bound``)."""
        return magnitude(self.params, self.momentum)

    def with_hash(self, digest: str, size: float | None = None) -> GlobalState:
        """Record ``global_hash`` (and ``magnitude``, ``size``) computed elsewhere (the outer step
        finds both as it writes the state, ``step_hashed_into``); ``digest`` must be
        ``tensor_digest(params)``. Returns self."""
        self.__dict__["global_hash"] = digest  # where cached_property keeps its value
        if size is not None:
            self.__dict__["magnitude"] = size
        return self

    def retire(self) -> None:
        """Drop the tensors (``StateStore.adopt`` after an in-place step wrote the next round
        over them). The round and the hash stay, if the hash was cached before the step (the
        driver's ``_outer`` makes sure): they name what this state was."""
        object.__setattr__(self, "params", None)
        object.__setattr__(self, "momentum", None)


def max_blob_bytes(numel: int) -> int:
    """The largest blob a donor may announce for a state of ``numel`` values: what
    ``encode_state`` writes (the state and its momentum, 8 bytes a value) with the longest header
    ``decode_state`` accepts. A joiner bounds the announced size by it before allocating."""
    return len(MAGIC) + 8 + MAX_HEADER + 8 * numel


def state_prefix(state: GlobalState, tensors: dict[str, torch.Tensor]) -> bytes:
    """The wire blob's bytes before its tensors: ``MAGIC``, the header length and the JSON
    header (round, numel, global_hash, the table of ``tensors``, which follow in order), padded
    so that the tensors start 64-byte aligned in the blob (a joiner's tensors use the received
    blob's memory as they are; JSON allows trailing spaces)."""
    table, offset = [], 0
    for name, t in tensors.items():
        table.append({"name": name, "offset": offset, "nbytes": 4 * t.numel(), "shape": list(t.shape)})
        offset += 4 * t.numel()
    header = json.dumps({
        "format": FORMAT, "round": state.round, "numel": state.params.numel(),
        "global_hash": state.global_hash, "tensors": table,
    }).encode()
    header += b" " * (-(len(MAGIC) + 8 + len(header)) % 64)
    return MAGIC + struct.pack("<Q", len(header)) + header


def state_parts(state: GlobalState) -> tuple[bytes, memoryview, memoryview]:
    """The wire blob of ``state`` (what ``encode_state(state)`` writes) as three consecutive
    pieces: the prefix, then views of the parameters' and the momentum's own memory, not
    copies. A donor streams them as they are (``StateStore.async_serve``): the views are valid
    only while ``state`` is pinned."""
    tensors = {"params": state.params, "momentum": state.momentum}
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise StateError(f"state tensor {name!r} is not contiguous float32 on the host")
    return (state_prefix(state, tensors), *(memoryview(t.numpy()).cast("B") for t in tensors.values()))


@dataclass
class StateSnapshot:
    """What a donor streams for one GetState: ``header`` (its digests cover the whole blob)
    and the blob as consecutive ``parts`` (``state_parts``, or one bytes object), read in place.
    ``release()`` once the stream is done (ended, failed or cancelled): it unpins the state whose
    memory the parts are (idempotent; any thread)."""

    header: StateHeader
    parts: tuple[bytes | bytearray | memoryview, ...]
    release: Callable[[], None] = lambda: None

    def tobytes(self) -> bytes:
        """The whole blob in one bytes object (a copy: for tests and fault injection)."""
        return b"".join(bytes(p) for p in self.parts)


def encode_state(state: GlobalState, extra: dict[str, torch.Tensor] | None = None) -> bytearray:
    """Serialize ``state`` (and optional named float32 tensors, e.g. inner optimizer state) into
    one new buffer, each tensor copied in once. A donor does not: it streams ``state_parts``."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous()
               for name, t in {"params": state.params, "momentum": state.momentum, **(extra or {})}.items()}
    prefix = state_prefix(state, tensors)
    blob = bytearray(len(prefix) + sum(4 * t.numel() for t in tensors.values()))
    blob[: len(prefix)] = prefix
    start = len(prefix)
    for t in tensors.values():
        blob[start : start + 4 * t.numel()] = memoryview(t.numpy()).cast("B")
        start += 4 * t.numel()
    return blob


def params_span(blob: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(offset, nbytes)`` of the parameters inside a blob that ``encode_state`` wrote."""
    view = memoryview(blob)
    (hlen,) = struct.unpack_from("<Q", view, len(MAGIC))
    start = len(MAGIC) + 8
    entry = next(e for e in json.loads(bytes(view[start : start + hlen]))["tensors"] if e["name"] == "params")
    return start + hlen + entry["offset"], entry["nbytes"]


def state_header(state: GlobalState, blob: bytes | bytearray | memoryview) -> StateHeader:
    """The header a donor sends before ``blob`` (``encode_state(state)``). Each byte is hashed
    once: the parameters' digest is ``global_hash`` (already known; the joiner checks the bytes
    against it as they arrive, and it is the hash the swarm attests), and ``digest`` covers the
    rest of the blob (header, momentum). Any thread."""
    offset, nbytes = params_span(blob)
    view = memoryview(blob)
    rest = digest_hasher()
    rest.update(view[:offset])
    rest.update(view[offset + nbytes :])
    return StateHeader(round=state.round, global_hash=state.global_hash, total_bytes=len(view),
                       digest=rest.hexdigest(), format=FORMAT, params_offset=offset, params_bytes=nbytes)


def parts_header(state: GlobalState, parts: tuple[bytes, memoryview, memoryview]) -> StateHeader:
    """``state_header`` for the blob as ``state_parts(state)`` lays it out (prefix, parameters,
    momentum), without joining it: the parameters are the second part, and ``digest`` covers the
    prefix and the momentum (one read of the momentum). Any thread; ``state`` pinned."""
    prefix, params, momentum = parts
    rest = digest_hasher()
    rest.update(prefix)
    rest.update(momentum)
    return StateHeader(round=state.round, global_hash=state.global_hash,
                       total_bytes=len(prefix) + len(params) + len(momentum), digest=rest.hexdigest(), format=FORMAT,
                       params_offset=len(prefix), params_bytes=len(params))


def decode_state(blob: bytes | bytearray | memoryview, numel: int, checked: StateHeader | None = None,
                 *, sha256: bool = False) -> tuple[GlobalState, dict[str, torch.Tensor]]:
    """Parse a state blob for a model of ``numel`` parameters; raise StateError if it does not fit.
    The tensors share a writable ``blob``'s memory (the caller must not reuse it), and copy a
    read-only one.

    ``checked``: the header the blob came with, once the transport has checked that the bytes
    at ``params_offset`` hash to its ``global_hash`` (``GrpcPeerClient.get_state``). When the
    parameters are exactly those bytes, their hash is not computed again.

    ``sha256``: the blob's ``global_hash`` is the parameters' sha256 (a ``PEERSTATE1`` checkpoint
    file, written before the state digest was BLAKE3)."""
    view = memoryview(blob)
    if len(view) < len(MAGIC) + 8 or bytes(view[: len(MAGIC)]) != MAGIC:
        raise StateError("not a peer state blob (bad magic)")
    (hlen,) = struct.unpack_from("<Q", view, len(MAGIC))
    start = len(MAGIC) + 8
    if hlen > MAX_HEADER or start + hlen > len(view):
        raise StateError(f"state header length {hlen} does not fit a blob of {len(view)} bytes")
    try:
        header = json.loads(bytes(view[start : start + hlen]))
        rnd, table, want_hash = int(header["round"]), header["tensors"], str(header["global_hash"])
        if header.get("format") != FORMAT or int(header["numel"]) != numel:
            raise StateError(f"state is for {header.get('numel')} parameters in format "
                             f"{header.get('format')!r}; this model has {numel}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateError(f"state header is malformed: {exc}") from None
    if not 0 <= rnd < (1 << 63):
        raise StateError(f"state round {rnd} is outside [0, 2^63)")
    if not isinstance(table, list) or len(table) > 64:
        raise StateError("state tensor table is not a list of at most 64 entries")
    body = view[start + hlen :]
    tensors: dict[str, torch.Tensor] = {}
    for entry in table:
        try:
            name, off, nbytes = str(entry["name"]), int(entry["offset"]), int(entry["nbytes"])
            shape = [int(s) for s in entry["shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"state tensor table is malformed: {exc}") from None
        if len(shape) > 8 or any(s < 0 for s in shape):
            raise StateError(f"state tensor {name[:32]!r} has an invalid shape {shape[:8]}")
        count = 1
        for s in shape:
            count *= s
        if off < 0 or nbytes != 4 * count or off + nbytes > len(body):
            raise StateError(f"state tensor {name!r} ({nbytes} bytes at {off}) does not fit the blob")
        piece = body[off : off + nbytes]
        # A writable blob (a donor's stream reassembled into a bytearray) is not used again:
        # the tensors take its memory as it is. A read-only one (bytes) is copied.
        tensors[name] = torch.frombuffer(piece if not piece.readonly else bytearray(piece),
                                         dtype=torch.float32).reshape(shape) if nbytes else torch.empty(shape)
    params, momentum = tensors.pop("params", None), tensors.pop("momentum", None)
    if params is None or momentum is None or params.numel() != numel or momentum.numel() != numel:
        raise StateError("state lacks params/momentum of the model's size")
    state = GlobalState(round=rnd, params=params, momentum=momentum)
    body_at = len(view) - len(body)
    if (checked is not None and checked.params_bytes == 4 * numel and checked.global_hash == want_hash
            and checked.params_offset == body_at + int(next(e for e in table if e["name"] == "params")["offset"])):
        state.with_hash(want_hash)
    if (tensor_sha256(params) if sha256 else state.global_hash) != want_hash:
        raise StateError("state parameters do not match the hash in their header")
    if not (all_finite(params) and all_finite(momentum)):
        raise StateError("state holds NaN or Inf")
    return state, tensors


def write_atomic(path: Path, data: bytes | bytearray | memoryview | tuple) -> None:
    """Atomic: write a temp file beside ``path``, fsync it, rename it over ``path``, fsync the dir.
    ``data``: the bytes, or a tuple of pieces written one after the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        for piece in data if isinstance(data, tuple) else (data,):
            fh.write(piece)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_parts(state: GlobalState, meta: dict[str, str] | None = None) -> tuple[bytes, memoryview, memoryview]:
    """``state`` as a safetensors file with its metadata (``meta`` adds string entries such as
    run_id, task, schema_hash; it cannot override the format, round or hashes), in three
    pieces: the safetensors header, then views of the parameters' and momentum's own memory
    (``safetensors.torch.save`` would first copy both into one new buffer, 8 bytes a value). The
    layout is safetensors': an 8-byte little-endian header length, the JSON header padded with
    spaces to a multiple of 8 bytes, the tensors' raw little-endian bytes in the order of their
    ``data_offsets``. The views are valid while ``state`` is pinned (``StateStore``)."""
    parts = state_parts(state)[1:]
    metadata = {**(meta or {}), "format": CHECKPOINT_FORMAT, "round": str(state.round),
                "numel": str(state.params.numel()), "global_hash": state.global_hash,
                "momentum_hash": tensor_digest(state.momentum)}
    table: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, part in zip(("global", "momentum"), parts):
        table[name] = {"dtype": "F32", "shape": [len(part) // 4], "data_offsets": [offset, offset + len(part)]}
        offset += len(part)
    header = json.dumps(table, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return (struct.pack("<Q", len(header)) + header, *parts)


def encode_checkpoint(state: GlobalState, meta: dict[str, str] | None = None) -> bytes:
    """``checkpoint_parts`` joined into one bytes object (a copy of the state: for tests)."""
    return b"".join(bytes(p) for p in checkpoint_parts(state, meta))


def write_checkpoint(path: Path, state: GlobalState, meta: dict[str, str] | None = None) -> None:
    """Write ``state`` to ``path`` as a safetensors checkpoint, atomically, from the state's own
    memory (``checkpoint_parts``: no serialized copy)."""
    write_atomic(path, checkpoint_parts(state, meta))


def checkpoint_metadata(data: bytes | memoryview) -> dict[str, str]:
    """The string metadata of safetensors bytes; StateError if the header is not safetensors."""
    view = memoryview(data)
    if len(view) < 8:
        raise StateError("not a safetensors file (shorter than its header length)")
    (hlen,) = struct.unpack_from("<Q", view, 0)
    if hlen > MAX_HEADER or 8 + hlen > len(view):
        raise StateError(f"not a safetensors file, or torn (header of {hlen} bytes in a file of {len(view)})")
    try:
        header = json.loads(bytes(view[8 : 8 + hlen]))
        meta = header.get("__metadata__") or {}
    except (ValueError, AttributeError) as exc:
        raise StateError(f"safetensors header is malformed: {exc}") from None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise StateError("safetensors metadata is not a map of strings")
    return meta


def decode_checkpoint(data: bytes, numel: int) -> tuple[GlobalState, dict[str, str]]:
    """Parse checkpoint bytes for a state of ``numel`` values; return the state and its
    metadata. Raises StateError for another format, a torn or altered file (hash check), a
    state of another size or non-finite values."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    meta = checkpoint_metadata(data)
    if meta.get("format") not in (CHECKPOINT_FORMAT, SHA256_CHECKPOINT_FORMAT):
        raise StateError(f"not a peer checkpoint (format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    sha256 = meta["format"] == SHA256_CHECKPOINT_FORMAT
    try:
        rnd, size = int(meta["round"]), int(meta["numel"])
        want_global, want_momentum = ((meta["global_sha256"], meta["momentum_sha256"]) if sha256
                                      else (meta["global_hash"], meta["momentum_hash"]))
    except (KeyError, ValueError) as exc:
        raise StateError(f"checkpoint metadata is incomplete: {exc}") from None
    if size != numel:
        raise StateError(f"checkpoint holds a state of {size} values; this model's state has {numel} "
                         "(parameters and buffers)")
    if not 0 <= rnd < (1 << 63):
        raise StateError(f"checkpoint round {rnd} is outside [0, 2^63)")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise StateError(f"checkpoint is torn or corrupt: {exc}") from None
    params, momentum = tensors.get("global"), tensors.get("momentum")
    for name, t in (("global", params), ("momentum", momentum)):
        if t is None or t.dtype != torch.float32 or t.dim() != 1 or t.numel() != numel:
            raise StateError(f"checkpoint tensor {name!r} is missing or not a float32 vector of {numel} values")
    state = GlobalState(round=rnd, params=params, momentum=momentum)
    # (the parameters' digest is the state's own global hash, cached, unless the file names them by sha256)
    got = (tensor_sha256(params), tensor_sha256(momentum)) if sha256 else (state.global_hash, tensor_digest(momentum))
    if got != (want_global, want_momentum):
        raise StateError("checkpoint is torn or corrupt: its tensors do not match the digests in its metadata")
    if not (all_finite(params) and all_finite(momentum)):
        raise StateError("checkpoint holds NaN or Inf")
    return state, meta


def read_checkpoint(path: Path, numel: int) -> tuple[GlobalState, dict[str, str]]:
    """Read and verify a checkpoint file (``decode_checkpoint``); StateError names the file."""
    try:
        return decode_checkpoint(path.read_bytes(), numel)
    except StateError as exc:
        raise StateError(f"checkpoint {path}: {exc}") from None


def read_legacy_checkpoint(path: Path, numel: int) -> GlobalState:
    """Read a checkpoint file of the older ``PEERSTATE1`` kind (wire format + sha256), which held
    the parameters only. Raises StateError when it is torn or does not fit this model's state
    (any model with buffers: those were not saved)."""
    data = path.read_bytes()
    if len(data) < 32 or hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise StateError(f"old PEERSTATE1 checkpoint {path} is torn or corrupt (checksum mismatch)")
    try:
        state, _ = decode_state(data[:-32], numel, sha256=True)
    except StateError as exc:
        raise StateError(f"{path} is an old PEERSTATE1 checkpoint (parameters only, no buffers) that does not "
                         f"fit this model's state of {numel} values ({exc}); move it away to start fresh") from None
    return state
