"""Fault injection for tests: a plan of faults that production code consults at named points.

A plan is a comma-separated list of ``action@round[:phase]`` entries, set with ``--faults`` or
``PEER_FAULTS`` (tests only). Actions:

  crash        SIGKILL this process (as ``kill -9``) when it reaches ``phase`` of ``round``
  stall        stop making progress at ``phase`` of ``round`` (sleeps until cancelled)
  corrupt      flip a byte of each part sent in ``round`` after its crc32 was computed (plain TCP;
               over TLS there is no crc32, and the flipped part is a lie like any other)
  wrong_size   send parts of the wrong size (header and crc consistent with the wrong size)
  nan          make this peer's delta of ``round`` NaN (it must be withheld, not sent)

A rogue member (it holds valid credentials and lies; the honest peers must survive it):

  inflate      claim 1e12 times the samples it trained on (its weight)
  scale        send its delta times -10 (a sign-flipped, amplified update)
  huge         send a delta of finite values near float32's maximum
  claim_ahead  report a round 1,000,000 ahead of its own in Status and Handshake
  bad_group    as leader, hand followers a group with a deadline of 1e9 s and an unknown codec
  owner_split  as owner, answer the first member that calls in each group with different (valid) bytes
  owner_inflate  as owner, answer every member with the average times 1000 (valid bytes)
  bad_state    as donor, serve a state whose header claims round 2^64 + 5 and a shape [-1, -4]
               (framed and checksummed consistently)

The daemon wires a plan in through hooks, so the round code never imports this module: the
phase hook (``FaultPlan.at``), a ``PeerClient`` wrapper (``FaultyClient``), the transport's
tamper hook (``FaultPlan.tamper``), an inner-phase wrapper (``FaultyInner``) and a wrapper of
the transport's handler (``FaultyService``, for what this peer answers others).

Phases: ``inner`` (before the inner phase), ``join`` (before group formation), ``reduce`` (after
the group formed, before parts are sent), ``owner`` (after this peer's owned shard was averaged,
before answering), ``outer`` (before the outer step), ``serve_state`` (while serving GetState).
A fault whose round is ``*`` fires in every round.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import struct
from dataclasses import dataclass, replace
from typing import Any

import torch
from blake3 import blake3

from peer.codec import get_codec
from peer.errors import ConfigError
from peer.sync.state import StateSnapshot

log = logging.getLogger(__name__)

ACTIONS = ("crash", "stall", "corrupt", "wrong_size", "nan", "inflate", "scale", "huge", "claim_ahead", "bad_group",
           "owner_split", "owner_inflate", "bad_state")
PHASES = ("inner", "join", "reduce", "owner", "outer", "serve_state")


@dataclass(frozen=True)
class Fault:
    action: str
    round: int | None  # None: every round
    phase: str


class FaultPlan:
    def __init__(self, faults: tuple[Fault, ...] = ()) -> None:
        self.faults = faults

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        faults = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            try:
                action, rest = item.split("@", 1)
                rnd, _, phase = rest.partition(":")
                fault = Fault(action, None if rnd == "*" else int(rnd), phase or "reduce")
            except ValueError:
                raise ConfigError(f"fault {item!r}: expected action@round[:phase]") from None
            if fault.action not in ACTIONS or fault.phase not in PHASES:
                raise ConfigError(f"fault {item!r}: actions {ACTIONS}, phases {PHASES}")
            faults.append(fault)
        return cls(tuple(faults))

    def _match(self, action: str, rnd: int, phase: str | None = None) -> bool:
        return any(f.action == action and f.round in (None, rnd) and (phase is None or f.phase == phase)
                   for f in self.faults)

    async def at(self, phase: str, rnd: int) -> None:
        """Called by production code at ``phase`` of round ``rnd``; may never return."""
        if self._match("crash", rnd, phase):
            log.warning("fault injection: crash at round %d phase %s", rnd, phase)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._match("stall", rnd, phase):
            log.warning("fault injection: stall at round %d phase %s", rnd, phase)
            await asyncio.Event().wait()

    def __bool__(self) -> bool:
        return bool(self.faults)

    def tamper(self, header: Any, payload: bytes) -> bytes:
        """The transport's tamper hook: flip a byte of parts sent in a ``corrupt`` round."""
        return corrupt_bytes(payload) if self._match("corrupt", header.round) else payload

    def wrong_size(self, rnd: int) -> bool:
        return self._match("wrong_size", rnd)

    def nan(self, rnd: int) -> bool:
        return self._match("nan", rnd)

    def claim(self, info: Any) -> Any:
        """This peer as it presents itself: with ``claim_ahead``, a million rounds ahead."""
        return replace(info, round=info.round + 1_000_000) if self._match("claim_ahead", info.round) else info


class FaultyClient:
    """A ``PeerClient`` that sends parts of the wrong size in ``wrong_size`` rounds (the
    transport frames and checksums them consistently, so only the size is wrong)."""

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self._inner = inner
        self._plan = plan

    async def join_round(self, address, req, timeout_s):
        return await self._inner.join_round(address, req, timeout_s)

    async def reduce(self, address, header, payload, timeout_s):
        if self._plan.wrong_size(header.round):
            payload = payload[: len(payload) // 2]
            header = replace(header, total_bytes=len(payload))
        return await self._inner.reduce(address, header, payload, timeout_s)

    async def get_state(self, address, run_id, peer_id, schema_hash, timeout_s):
        return await self._inner.get_state(address, run_id, peer_id, schema_hash, timeout_s)


class FaultyInner:
    """An inner phase whose delta turns NaN in ``nan`` rounds (it must be withheld)."""

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self._inner = inner
        self._plan = plan

    async def run(self, rnd, start, should_stop):
        result = await self._inner.run(rnd, start, should_stop)
        if result is None:
            return None
        plan = self._plan
        if plan.nan(rnd):
            result = replace(result, delta=torch.full_like(result.delta, float("nan")))
        if plan._match("scale", rnd):
            result = replace(result, delta=result.delta * -10.0)
        if plan._match("huge", rnd):
            result = replace(result, delta=torch.full_like(result.delta, 3e38))
        if plan._match("inflate", rnd):
            result = replace(result, samples=result.samples * 10**12)
        return result

    async def evaluate(self, params):
        return await self._inner.evaluate(params)


class FaultyService:
    """The transport's handler, lying in what it answers: a bad group to followers
    (``bad_group``), different averaged bytes to one member (``owner_split``)."""

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self._inner = inner
        self._plan = plan
        self._split: set[str] = set()  # groups in which one member got other bytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def join_round(self, req):
        reply = await self._inner.join_round(req)
        if reply.group is not None and self._plan._match("bad_group", req.round):
            reply = replace(reply, group=replace(reply.group, reduce_deadline_s=1e9, codec="int3"))
        return reply

    async def state_snapshot(self, run_id, peer_id, schema_hash):
        state = await self._inner.state_snapshot(run_id, peer_id, schema_hash)
        if not self._plan._match("bad_state", state.header.round):
            return state
        try:
            blob = lying_state(state.tobytes())
        finally:
            state.release()
        # A header that fits the lie (the whole blob under ``digest``, no parameter range):
        # the transport passes it, so the joiner's checks of the content are what refuse it.
        header = replace(state.header, total_bytes=len(blob), digest=blake3(blob).hexdigest(), params_offset=0,
                         params_bytes=0)
        return StateSnapshot(header, (blob,))

    async def reduce_part(self, header, payload):
        answer_header, answer = await self._inner.reduce_part(header, payload)
        if self._plan._match("owner_split", header.round) and header.group_id not in self._split:
            if len(self._split) > 1000:
                self._split.clear()
            self._split.add(header.group_id)
            # Valid bytes (the transport frames and checksums them), different values.
            answer = corrupt_bytes(answer)
        if self._plan._match("owner_inflate", header.round):
            codec = get_codec(answer_header.codec)
            answer = codec.encode(codec.decode(answer, header.numel) * 1000.0)
            answer_header = replace(answer_header, total_bytes=len(answer))
        return answer_header, answer


def lying_state(blob: bytes | bytearray) -> bytes:
    """A state blob (``peer.sync.state`` format) whose header claims a round above 2^64 and a
    negative shape, with the same tensor bytes."""
    from peer.sync.state import MAGIC

    (hlen,) = struct.unpack_from("<Q", blob, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(bytes(blob[start:start + hlen]))
    header["round"] = 2**64 + 5
    header["tensors"][0]["shape"] = [-1, -4]
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(text)) + text + bytes(blob[start + hlen:])


def corrupt_bytes(payload: bytes) -> bytes:
    """The payload with its middle byte flipped."""
    if not payload:
        return payload
    data = bytearray(payload)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)
