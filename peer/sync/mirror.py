"""The global state mirrored on the training device, advanced there by each round's answers.

With the model on a GPU, every inner phase starts from the global parameters of the round
before. Copied from the host, they cost 4 bytes a value over PCIe each round (8 before the
mirror: the trainer also copied them again as the base of its delta). The mirror instead keeps
round r's parameters and outer momentum on the device, copies the owners' averaged answers
there as they came over the wire (int8: a byte a value and a scale a block), decodes them there
(``Codec.decode_torch``) and runs the outer step there (``peer.sync.outer.step_in_place``).

The bits. The host state stays the authority: it alone is hashed, checkpointed, served to
joiners and compared between peers, and the host still runs the outer step (``RoundDriver``):
its bytes are needed on the host for all of that, and moving the step to the device would only
move the copy (8 bytes a value back to the host instead of 4 to the device). The device repeats
the same correctly rounded float32 operations on the same bytes, so it holds the same bits:
decoding is exact or one multiplication (int8: ``int8 -> float32`` is exact, then ``q * scale``
once, as on the host), and the step is written without fused multiply-adds (see
``peer.sync.outer``). That is checked, not assumed: the first advance compares every value with
the host's new state, later ones a strided sample that moves from round to round; a difference
logs an error and turns the mirror off for good (the trainer then gets the host state copied,
as before it existed). A device that computes differently can cost this peer its PCIe saving,
never its agreement with the group: what the group compares is never computed here.

Device memory: the parameters and the momentum (8 bytes a value) for as long as the daemon
runs, and the decoded delta (4) while a round is applied.

Thread: one at a time, never the event loop for a large model (``RoundDriver`` offloads it);
it runs between inner phases, never during one (with ``sync.overlap`` it is not used: each
phase then starts from the global state plus the previous phase's progress).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from peer.codec import get_codec
from peer.errors import CodecError
from peer.sync.outer import step_in_place
from peer.sync.state import GlobalState

log = logging.getLogger(__name__)

SAMPLE = 4096
"""Values of the parameters (and as many of the momentum) compared with the host after each
advance but the first (which compares all): one gather and a 32 KiB copy."""


@dataclass(frozen=True)
class Answers:
    """A round's averaged delta as the owners sent it: the codec and ``(start, stop, payload)``
    for every shard, payloads exactly as received (the same bytes the host decoded)."""

    codec: str
    shards: tuple[tuple[int, int, bytes], ...]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 values as int32 bit patterns (so -0.0 differs from 0.0, and NaN equals itself)."""
    return t.contiguous().view(torch.int32)


class DeviceMirror:
    """Round r's parameters and outer momentum on ``device``, moved to round r+1 by the answers.

    ``lr``, ``momentum``, ``param_numel`` and ``int_slices`` are the outer step's (as the driver
    runs it on the host). Not thread safe: one thread at a time.
    """

    def __init__(self, device: torch.device | str, *, lr: float, momentum: float, param_numel: int | None = None,
                 int_slices: tuple[tuple[int, int], ...] = ()) -> None:
        self.device = torch.device(device)
        self._lr = lr
        self._momentum = momentum
        self._param_numel = param_numel
        self._int_slices = int_slices
        self._tag: tuple[int, str] | None = None  # (round, global hash) of the state held
        self._params: torch.Tensor | None = None
        self._buf: torch.Tensor | None = None
        self._verified = False  # whether an advance was compared with the host in full
        self.enabled = True
        self.off_reason = ""  # why it turned off: "error" (a failed device step) or "bits" (other bits)
        self.copies = 0  # host states copied in (the first, and after a resync or failure)
        self.advances = 0  # rounds applied on the device

    def start(self, state: GlobalState) -> torch.Tensor:
        """``state``'s parameters on the device, for the next inner phase: the mirror's own when
        it holds ``state``, else ``state`` (parameters and momentum) copied in and held from
        now. ``state.params`` itself (the host's) once the mirror is off. The caller must not
        modify the tensor; it changes in place at the next ``advance``."""
        if not self.enabled:
            return state.params
        if self._params is None or self._tag != (state.round, state.global_hash):
            self._drop()
            # copy=True: on device "cpu" too, the host state must never be stepped in place.
            self._params = state.params.to(self.device, copy=True)
            self._buf = state.momentum.to(self.device, copy=True)
            self._tag = (state.round, state.global_hash)
            self.copies += 1
            log.info("global state of round %d copied to %s; its rounds are applied there from now on", state.round,
                     self.device)
        return self._params

    def advance(self, before: GlobalState, answers: Answers, after: GlobalState) -> bool:
        """Apply the round that took the host from ``before`` to ``after`` (with ``answers``) on
        the device, and check the result against ``after``. False, and nothing held, when the
        mirror does not hold ``before`` (the next ``start`` copies ``after`` in), or when the
        device's result differs from the host's or cannot be computed (then the mirror turns
        off for good, logged). Only ``before``'s round and hash are read: the host's step may
        have written ``after`` over ``before``'s tensors (``GlobalState.retire``)."""
        if not self.enabled:
            return False
        if self._params is None or self._buf is None or self._tag != (before.round, before.global_hash):
            self._drop()
            return False
        try:
            codec = get_codec(answers.codec)
            grad = torch.empty(self._params.numel(), dtype=torch.float32, device=self.device)
            covered = 0
            for start, stop, payload in answers.shards:
                # The torch-only decode, on every device alike (the path the CPU tests run).
                grad[start:stop].copy_(codec.decode_torch(payload, stop - start, self.device))
                covered += stop - start
            if covered != grad.numel():
                raise ValueError(f"the answers cover {covered} of {grad.numel()} values")
            step_in_place(self._params, self._buf, grad, lr=self._lr, momentum=self._momentum,
                          param_numel=self._param_numel, int_slices=self._int_slices)
            del grad
            differ = self._differences(after)
        except (CodecError, RuntimeError, ValueError) as exc:  # RuntimeError: out of device memory
            self._turn_off("error", f"applying round {before.round} on {self.device} failed: {exc}")
            return False
        if differ:
            self._turn_off("bits", f"round {before.round}: the outer step on {self.device} gave other bits than on the host "
                           f"({differ})")
            return False
        self._tag = (after.round, after.global_hash)
        self.advances += 1
        return True

    def _differences(self, after: GlobalState) -> str:
        """'' when the device's state has ``after``'s bits (all of them the first time, then a
        sample); else what differs."""
        assert self._params is not None and self._buf is not None
        n = self._params.numel()
        if not self._verified:
            index = None
        else:
            stride = max(1, n // SAMPLE)
            index = torch.arange(after.round % stride, n, stride)
        found = []
        for name, mine, host in (("parameters", self._params, after.params), ("momentum", self._buf, after.momentum)):
            ours = (mine if index is None else mine[index.to(self.device)]).cpu()
            theirs = host if index is None else host[index]
            wrong = int((_bits(ours) != _bits(theirs)).sum())
            if wrong:
                found.append(f"{wrong} of {ours.numel()} {'sampled ' if index is not None else ''}{name} values")
        self._verified = True
        return ", ".join(found)

    def _turn_off(self, reason: str, why: str) -> None:
        log.error("%s; the trainer gets the host's state copied from now on", why)
        self.enabled = False
        self.off_reason = reason
        self._drop()

    def _drop(self) -> None:
        self._params = self._buf = None
        self._tag = None
