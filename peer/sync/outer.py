"""DiLoCo outer-step math, pure and deterministic (CPU, float32).

The outer optimizer is SGD with Nesterov momentum applied to the averaged pseudo-gradient
``g = theta_global - theta_local`` (averaged over the group). It matches
``torch.optim.SGD(lr, momentum, nesterov=True)`` exactly, with the momentum buffer starting at
zero (so that the first step's buffer is ``g``, as in torch).
"""

from __future__ import annotations

import hashlib

import torch


def outer_step(
    params: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, *, lr: float, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_params, new_buf)``; inputs are not modified.

    buf' = g + momentum * buf;  theta' = theta - lr * (g + momentum * buf')
    All tensors are 1-D float32 CPU of equal length. Every peer runs the same sequence of
    float32 operations on the same bytes, so the result is bit-identical across peers.
    """
    if not (params.shape == grad.shape == momentum_buf.shape):
        raise ValueError(f"shape mismatch: params {tuple(params.shape)}, grad {tuple(grad.shape)}, "
                         f"buf {tuple(momentum_buf.shape)}")
    # Two fresh tensors instead of three: at 10M parameters each allocation costs more page
    # faults than its arithmetic.
    buf = torch.add(grad, momentum_buf, alpha=momentum)
    new_params = torch.add(grad, buf, alpha=momentum)          # the Nesterov update ...
    new_params.mul_(-lr).add_(params)                          # ... becomes theta - lr * update
    return new_params, buf


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 hex of the raw float32 bytes of the given tensors, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(memoryview(t.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B"))
    return h.hexdigest()
