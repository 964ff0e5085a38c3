"""DiLoCo outer-step math, pure and deterministic (CPU, float32).

The outer optimizer is SGD with Nesterov momentum applied to the averaged pseudo-gradient
``g = theta_global - theta_local`` (averaged over the group). It matches
``torch.optim.SGD(lr, momentum, nesterov=True)`` exactly, with the momentum buffer starting at
zero (so that the first step's buffer is ``g``, as in torch).

The flat global state holds the model's buffers after its parameters (``param_numel`` values of
parameters first). Buffers are not optimized: they take the group's plain average,
``theta - g`` (lr 1, no momentum; their momentum stays 0), and integer buffers within it
(``int_slices``) are rounded to the nearest integer, half to even.
"""

from __future__ import annotations

import hashlib

import torch


def outer_step(
    params: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, *, lr: float, momentum: float,
    param_numel: int | None = None, int_slices: tuple[tuple[int, int], ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_params, new_buf)``; inputs are not modified.

    On the parameters (``[:param_numel]``, all of it when None):
    buf' = g + momentum * buf;  theta' = theta - lr * (g + momentum * buf')
    On the buffers (``[param_numel:]``): theta' = round?(theta - g), buf' = 0, rounding only the
    ``(start, stop)`` ranges of ``int_slices``.
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
    n = params.numel() if param_numel is None else param_numel
    if not 0 <= n <= params.numel():
        raise ValueError(f"param_numel {n} outside [0, {params.numel()}]")
    if n < params.numel():
        new_params[n:] = params[n:] - grad[n:]
        buf[n:] = 0
        for start, stop in int_slices:
            if not n <= start <= stop <= params.numel():
                raise ValueError(f"integer buffer slice ({start}, {stop}) outside the buffers [{n}, {params.numel()})")
            new_params[start:stop].round_()
    return new_params, buf


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 hex of the raw float32 bytes of the given tensors, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(memoryview(t.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B"))
    return h.hexdigest()
