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
import math

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
    # Two fresh tensors (the state is immutable: donors and checkpoints may still hold the old
    # one) and three passes, no temporary: at 10M parameters each allocation costs about as
    # much in page faults as a pass of arithmetic. theta - lr*g - lr*momentum*buf' is the
    # Nesterov step written as two fused multiply-adds; every peer runs these same ops.
    buf = torch.add(grad, momentum_buf, alpha=momentum)
    new_params = torch.add(params, grad, alpha=-lr)
    new_params.add_(buf, alpha=-lr * momentum)
    n = _param_numel(params, param_numel)
    if n < params.numel():
        _buffers_step(params, grad, new_params, buf, n, int_slices)
    return new_params, buf


OUTER_CHUNK = 1 << 18
"""Elements per chunk of ``outer_step_hashed`` (1 MiB of float32: the chunk stays in cache
between the step, the finiteness check and the hash)."""


def _param_numel(params: torch.Tensor, param_numel: int | None) -> int:
    n = params.numel() if param_numel is None else param_numel
    if not 0 <= n <= params.numel():
        raise ValueError(f"param_numel {n} outside [0, {params.numel()}]")
    return n


def _buffers_step(params: torch.Tensor, grad: torch.Tensor, new_params: torch.Tensor, buf: torch.Tensor, n: int,
                  int_slices: tuple[tuple[int, int], ...]) -> None:
    """The buffers' part of the step, in place on ``new_params[n:]`` and ``buf[n:]``: the plain
    average (theta - g), no momentum, integer slices rounded."""
    torch.sub(params[n:], grad[n:], out=new_params[n:])
    buf[n:] = 0
    for start, stop in int_slices:
        if not n <= start <= stop <= params.numel():
            raise ValueError(f"integer buffer slice ({start}, {stop}) outside the buffers [{n}, {params.numel()})")
        new_params[start:stop].round_()


def outer_step_hashed(
    params: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, *, lr: float, momentum: float,
    param_numel: int | None = None, int_slices: tuple[tuple[int, int], ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
    """``outer_step`` (the same ops, so the same bits), the sha256 hex of the new parameters
    (``tensor_sha256(new_params)``) and whether the new parameters and buffer are all finite,
    in one sweep over memory: chunk by chunk, each new chunk is checked and hashed while it is
    still in cache, instead of four more passes over the whole state. Inputs are not modified.
    Any thread."""
    if not (params.shape == grad.shape == momentum_buf.shape) or params.dim() != 1:
        raise ValueError(f"shape mismatch: params {tuple(params.shape)}, grad {tuple(grad.shape)}, "
                         f"buf {tuple(momentum_buf.shape)}")
    total = params.numel()
    n = _param_numel(params, param_numel)
    new_params, buf = torch.empty_like(params), torch.empty_like(momentum_buf)
    if n < total:
        _buffers_step(params, grad, new_params, buf, n, int_slices)
    h = hashlib.sha256()
    finite = True
    bytes_of = memoryview(new_params.numpy()).cast("B")
    chunks = [(a, min(n, a + OUTER_CHUNK)) for a in range(0, n, OUTER_CHUNK)]
    chunks += [(a, min(total, a + OUTER_CHUNK)) for a in range(n, total, OUTER_CHUNK)]
    for start, stop in chunks:
        if start >= n:  # the buffers, already stepped: check and hash only
            p = new_params[start:stop]
            if finite:
                lo, hi = torch.aminmax(p)
                finite = math.isfinite(float(lo)) and math.isfinite(float(hi))
            h.update(bytes_of[4 * start:4 * stop])
            continue
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
