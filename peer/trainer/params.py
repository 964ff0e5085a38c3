"""Pure helpers that view a model's whole state (parameters and buffers) as one flat float32 vector.

The flat global state is, in order:

1. every parameter, in ``model.named_parameters()`` order (tied parameters once);
2. every *persistent* buffer (those ``state_dict`` holds), in ``model.named_buffers()`` order:
   BatchNorm running statistics, ``num_batches_tracked`` and the like.

Buffers travel as float32 whatever their dtype. Floating buffers (BatchNorm's running mean and
variance) are averaged each round like a parameter but without outer momentum. Integer and bool
buffers (``num_batches_tracked``, index tables) keep the global state's value: each member sends
no change for them (``InnerTrainer.run_inner`` zeroes their slice of the delta), so they stay as
initialised or as a checkpoint holds them, and constant ones stay intact. Why not their average:
a counter's change of H per round, next to the float statistics in one block of a lossy codec,
sets the block's scale and swamps them (int8 made running variances negative: NaN evaluation).
The outer step still rounds them (``peer.sync.outer.outer_step``), so a member that sends a
change cannot make them fractional. Within one inner phase they count as usual (BatchNorm with
``momentum=None`` then averages the phase's own batches). Integers are exact in float32 up to
2**24. Non-persistent buffers stay local: they are not state.

``state_layout`` describes the vector; ``flatten_state`` and ``assign_flat_state`` convert a
model to and from it (``peer.Swarm`` and ``peer export`` use these too).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

__all__ = [
    "LAYOUT_VERSION",
    "StateEntry",
    "StateLayout",
    "assign_flat_state",
    "flat_on_device",
    "flatten_state",
    "param_count",
    "schema_hash",
    "schema_of",
    "state_layout",
]

LAYOUT_VERSION = 2
"""Version of the flat layout, part of the schema hash: 1 held parameters only, 2 adds buffers.
Peers whose layouts differ refuse each other at the handshake (schema mismatch)."""

PARAM, FLOAT_BUFFER, INT_BUFFER = "param", "float_buffer", "int_buffer"


@dataclass(frozen=True)
class StateEntry:
    """One tensor of the model's state: its ``state_dict`` name, shape, dtype, kind (``"param"``,
    ``"float_buffer"`` or ``"int_buffer"``) and its slice ``[offset, offset + numel)`` of the
    flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    offset: int
    numel: int


@dataclass(frozen=True)
class StateLayout:
    """The flat vector's layout. Parameters come first: ``flat[:param_numel]``; buffers follow."""

    entries: tuple[StateEntry, ...]
    numel: int
    param_numel: int

    @property
    def int_slices(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` of every integer (or bool) buffer: rounded after each outer step."""
        return tuple((e.offset, e.offset + e.numel) for e in self.entries if e.kind == INT_BUFFER)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)


def _state_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, str]]:
    persistent = model.state_dict(keep_vars=True).keys()
    out = [(name, p, PARAM) for name, p in model.named_parameters()]
    for name, b in model.named_buffers():
        if name not in persistent:
            continue  # non-persistent: local scratch, not state
        if b.is_floating_point():
            kind = FLOAT_BUFFER
        elif b.is_complex():
            raise ValueError(f"buffer {name!r} is complex ({b.dtype}); complex buffers are not supported")
        else:
            kind = INT_BUFFER
        out.append((name, b, kind))
    return out


def state_layout(model: torch.nn.Module) -> StateLayout:
    """The layout of ``model``'s flat state (parameters, then persistent buffers).

    Raises ``ValueError`` for a complex buffer."""
    entries, offset, param_numel = [], 0, 0
    for name, t, kind in _state_tensors(model):
        n = t.numel()
        entries.append(StateEntry(name, tuple(int(d) for d in t.shape), t.dtype, kind, offset, n))
        offset += n
        if kind == PARAM:
            param_numel = offset
    return StateLayout(tuple(entries), offset, param_numel)


def schema_of(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str, str]]:
    """``(name, shape, dtype, kind)`` of every state tensor in flat order; dtype as a string
    without the ``torch.`` prefix, e.g. ``"float32"``."""
    return [(e.name, e.shape, str(e.dtype).removeprefix("torch."), e.kind) for e in state_layout(model).entries]


def schema_hash(model: torch.nn.Module) -> str:
    """sha256 hex of the canonical JSON encoding of ``LAYOUT_VERSION`` and ``schema_of(model)``.

    Two peers can exchange flat vectors iff their hashes match.
    """
    canonical = json.dumps(
        {"layout": LAYOUT_VERSION,
         "tensors": [[name, list(shape), dtype, kind] for name, shape, dtype, kind in schema_of(model)]},
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def param_count(model: torch.nn.Module) -> int:
    """Number of scalar parameters (tied ones once); buffers not included."""
    return sum(p.numel() for p in model.parameters())


def flatten_state(model: torch.nn.Module) -> torch.Tensor:
    """A new 1-D float32 CPU tensor: parameters then persistent buffers, in layout order."""
    parts = [t.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for _, t, _ in _state_tensors(model)]
    if not parts:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat(parts)


def flat_on_device(model: torch.nn.Module) -> torch.Tensor:
    """A new 1-D float32 tensor of the flat state (parameters, then persistent buffers), on the
    model's device (``flatten_state`` copies to the host)."""
    parts = [t.detach().reshape(-1).to(torch.float32) for _, t, _ in _state_tensors(model)]
    if not parts:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat(parts)


def assign_flat_state(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy the 1-D vector ``flat`` (any device, float dtype) into ``model``'s parameters and
    persistent buffers in place (integer buffers get ``flat``'s values rounded to the nearest
    integer).

    Raises ``ValueError`` if ``flat`` is not 1-D or its length differs from the layout's.
    """
    if flat.dim() != 1:
        raise ValueError(f"flat state must be 1-D, got shape {tuple(flat.shape)}")
    tensors = _state_tensors(model)
    expected = sum(t.numel() for _, t, _ in tensors)
    if flat.numel() != expected:
        raise ValueError(f"flat state has {flat.numel()} values, the model has {expected} "
                         "(parameters and buffers)")
    offset = 0
    with torch.no_grad():
        for _, t, kind in tensors:
            n = t.numel()
            part = flat[offset : offset + n].view(t.shape)
            if kind == INT_BUFFER:
                part = torch.round(part)
            t.copy_(part)
            offset += n
