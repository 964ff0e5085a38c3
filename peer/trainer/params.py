"""Pure helpers that view a model's parameters as one flat float32 vector.

The flat order is ``model.named_parameters()`` order (the schema order). Buffers are not part
of the flat vector; built-in tasks have none that matter for training.
"""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["assign_flat_params", "flatten_params", "param_count", "schema_hash", "schema_of"]


def schema_of(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of every parameter in ``named_parameters`` order;
    dtype as a string without the ``torch.`` prefix, e.g. ``"float32"``."""
    return [
        (name, tuple(int(d) for d in p.shape), str(p.dtype).removeprefix("torch."))
        for name, p in model.named_parameters()
    ]


def schema_hash(model: torch.nn.Module) -> str:
    """sha256 hex of the canonical JSON encoding of ``schema_of(model)``.

    Two peers can exchange flat vectors iff their hashes match.
    """
    canonical = json.dumps(
        [[name, list(shape), dtype] for name, shape, dtype in schema_of(model)],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def param_count(model: torch.nn.Module) -> int:
    """Number of scalar parameters (the length of the flat vector)."""
    return sum(p.numel() for p in model.parameters())


def flatten_params(model: torch.nn.Module) -> torch.Tensor:
    """A new 1-D float32 CPU tensor with all parameters concatenated in schema order."""
    params = [
        p.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for p in model.parameters()
    ]
    if not params:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat(params)


def flat_on_device(model: torch.nn.Module) -> torch.Tensor:
    """A new 1-D float32 tensor of all parameters in schema order, on the parameters' device
    (``flatten_params`` copies to the host)."""
    params = [p.detach().reshape(-1).to(torch.float32) for p in model.parameters()]
    if not params:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat(params)


def assign_flat_params(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy the 1-D vector ``flat`` (any device, float dtype) into ``model``'s parameters in place.

    Raises ``ValueError`` if ``flat`` is not 1-D or its length differs from ``param_count``.
    """
    if flat.dim() != 1:
        raise ValueError(f"flat parameters must be 1-D, got shape {tuple(flat.shape)}")
    expected = param_count(model)
    if flat.numel() != expected:
        raise ValueError(f"flat parameters have {flat.numel()} values, the model has {expected}")
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n
