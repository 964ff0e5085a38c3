"""DiLoCo outer-step math, pure and deterministic (CPU, float32).

The outer optimizer is SGD with Nesterov momentum applied to the averaged pseudo-gradient
``g = theta_global - theta_local`` (averaged over the group). It matches
``torch.optim.SGD(lr, momentum, nesterov=True)`` exactly, with the momentum buffer starting at
zero (so that the first step's buffer is ``g``, as in torch).
"""

from __future__ import annotations

import hashlib
import math

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
    # Two fresh tensors (the state is immutable: donors and checkpoints may still hold the old
    # one) and three passes, no temporary: at 10M parameters each allocation costs about as
    # much in page faults as a pass of arithmetic. theta - lr*g - lr*momentum*buf' is the
    # Nesterov step written as two fused multiply-adds; every peer runs these same ops.
    buf = torch.add(grad, momentum_buf, alpha=momentum)
    new_params = torch.add(params, grad, alpha=-lr)
    new_params.add_(buf, alpha=-lr * momentum)
    return new_params, buf


OUTER_CHUNK = 1 << 18
"""Elements per chunk of ``outer_step_hashed`` (1 MiB of float32: the chunk stays in cache
between the step, the finiteness check and the hash)."""


def outer_step_hashed(
    params: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, *, lr: float, momentum: float
) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
    """``outer_step`` (the same ops, so the same bits), the sha256 hex of the new parameters
    (``tensor_sha256(new_params)``) and whether the new parameters and buffer are all finite,
    in one sweep over memory: chunk by chunk, each new chunk is checked and hashed while it is
    still in cache, instead of four more passes over the whole state. Inputs are not modified.
    Any thread."""
    if not (params.shape == grad.shape == momentum_buf.shape) or params.dim() != 1:
        raise ValueError(f"shape mismatch: params {tuple(params.shape)}, grad {tuple(grad.shape)}, "
                         f"buf {tuple(momentum_buf.shape)}")
    n = params.numel()
    new_params, buf = torch.empty_like(params), torch.empty_like(momentum_buf)
    h = hashlib.sha256()
    finite = True
    bytes_of = memoryview(new_params.numpy()).cast("B")
    for start in range(0, n, OUTER_CHUNK):
        stop = min(n, start + OUTER_CHUNK)
        g, b, p = grad[start:stop], buf[start:stop], new_params[start:stop]
        torch.add(g, momentum_buf[start:stop], alpha=momentum, out=b)
        torch.add(params[start:stop], g, alpha=-lr, out=p)
        p.add_(b, alpha=-lr * momentum)
        if finite:
            # min/max are NaN when a NaN is present; an Inf shows as an infinite extreme.
            lo, hi = torch.aminmax(p)
            blo, bhi = torch.aminmax(b)
            finite = all(math.isfinite(float(v)) for v in (lo, hi, blo, bhi))
        h.update(bytes_of[4 * start:4 * stop])
    return new_params, buf, h.hexdigest(), finite


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 hex of the raw float32 bytes of the given tensors, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(memoryview(t.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B"))
    return h.hexdigest()
