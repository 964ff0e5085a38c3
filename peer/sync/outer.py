"""DiLoCo outer-step math, pure and deterministic (float32, any device).

The outer optimizer is SGD with Nesterov momentum applied to the averaged pseudo-gradient
``g = theta_global - theta_local`` (averaged over the group). It matches
``torch.optim.SGD(lr, momentum, nesterov=True)`` exactly, with the momentum buffer starting at
zero (so that the first step's buffer is ``g``, as in torch).

The flat global state holds the model's buffers after its parameters (``param_numel`` values of
parameters first). Buffers are not optimized: they take the group's plain average,
``theta - g`` (lr 1, no momentum; their momentum stays 0), and integer buffers within it
(``int_slices``) are rounded to the nearest integer, half to even.

Bits: every peer of a group must hold the same bits after a round, whatever its hardware. So
the step is a fixed sequence of single IEEE-754 float32 operations, each correctly rounded:
multiplications by a scalar and plain additions (``_param_step``), never a multiply-add with
``alpha`` (``torch.add(a, b, alpha=c)``), ``addcmul`` or the like. Those fuse into one rounding
(FMA) on some hardware and not on others: on x86, torch's AVX2/AVX-512 kernels fuse and its
baseline kernels (CPUs without AVX2, ``ATEN_CPU_CAPABILITY=default``) do not, and nvcc fuses
``a + c * b`` in CUDA kernels by default (``--fmad=true``); the step written with ``alpha`` gave
different bits on the same machine under the two CPU capabilities (tests/unit/test_sync_math.py).
A plain add is ``fma(b, 1, a)`` where fused, the same single rounding. Products and sums of
float32 values are correctly rounded on every IEEE-754 device with subnormals kept (torch's
default on CPU unless ``torch.set_flush_denormal(True)``; torch's CUDA kernels are built without
fast math, so without flush-to-zero), so the result does not depend on vector width, chunking or
device: ``peer.sync.mirror`` runs this same step on a GPU (and checks it against the host's).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import torch

from peer.types import digest_hasher


class GradPieces(Protocol):
    """A 1-D float32 gradient the step reads in order, piece by piece, instead of a tensor: the
    averaged delta kept as its owners' encoded answers (``peer.sync.round.Averaged``), decoded
    one cache-sized piece at a time, so that no full-size averaged delta exists."""

    magnitude: float
    """An upper bound of ``|g|``, found when the pieces were checked: ``magnitude(g)``, or the
    codec's ``value_bounds`` from the scales (for int8 at most 128/127 of it)."""

    def numel(self) -> int: ...

    def pieces(self) -> Iterable[tuple[int, torch.Tensor]]:
        """``(start, values)`` for consecutive pieces covering ``[0, numel())`` in order, each a
        cache-sized scratch the next piece may reuse (read it before advancing); the same values,
        bit for bit, as the gradient decoded whole."""
        ...


def outer_step(
    params: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, *, lr: float, momentum: float,
    param_numel: int | None = None, int_slices: tuple[tuple[int, int], ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_params, new_buf)``; inputs are not modified.

    On the parameters (``[:param_numel]``, all of it when None):
    buf' = g + momentum * buf;  theta' = theta - lr * (g + momentum * buf')
    On the buffers (``[param_numel:]``): theta' = round?(theta - g), buf' = 0, rounding only the
    ``(start, stop)`` ranges of ``int_slices``.
    All tensors are 1-D float32 of equal length on one device. Every peer runs the same
    sequence of correctly rounded float32 operations (``_param_step``) on the same bytes, so the
    result is bit-identical across peers and devices.
    """
    if not (params.shape == grad.shape == momentum_buf.shape):
        raise ValueError(f"shape mismatch: params {tuple(params.shape)}, grad {tuple(grad.shape)}, "
                         f"buf {tuple(momentum_buf.shape)}")
    # Fresh tensors: the state is immutable (donors and checkpoints may still hold the old one).
    new_params, buf = params.clone(), momentum_buf.clone()
    step_in_place(new_params, buf, grad.clone(), lr=lr, momentum=momentum, param_numel=param_numel,
                  int_slices=int_slices)
    return new_params, buf


def _param_step(theta: torch.Tensor, grad: torch.Tensor, mom: torch.Tensor, *, out_theta: torch.Tensor,
                out_mom: torch.Tensor, work: torch.Tensor, lr: float, momentum: float) -> None:
    """The parameters' step, one correctly rounded float32 operation at a time (see the module
    docstring for why nothing is fused):

        out_mom   = g + (m * mom)
        out_theta = (theta + (-lr) * g) + (-lr * m) * out_mom

    ``work`` is scratch of ``g``'s size; any output may alias its input (``out_theta`` is
    ``theta``, ``out_mom`` is ``mom``, ``work`` is ``g``: the in-place step of
    ``step_in_place``), as every value is read before it is overwritten. The Python scalars
    ``-lr`` and ``-lr * m`` are rounded to float32 once, alike on every device.

    Host tensors take numpy's ufuncs (the same single correctly rounded operations, so the same
    bits; numpy never fuses two ufuncs): ~1 us a call where a torch op costs ~5, which lets the
    sweep work in L2-sized chunks (``OUTER_CHUNK``): 10M values in ~13 ms instead of ~21."""
    if theta.device.type == "cpu":
        _np_param_step(*(t.numpy() for t in (theta, grad, mom, out_theta, out_mom, work)), lr=lr, momentum=momentum)
        return
    torch.mul(mom, momentum, out=out_mom)
    out_mom.add_(grad)
    torch.mul(grad, -lr, out=work)
    torch.add(theta, work, out=out_theta)
    torch.mul(out_mom, -lr * momentum, out=work)
    out_theta.add_(work)


def _np_param_step(theta: np.ndarray, grad: np.ndarray, mom: np.ndarray, out_theta: np.ndarray,
                   out_mom: np.ndarray, work: np.ndarray, *, lr: float, momentum: float) -> None:
    """``_param_step`` with numpy on host arrays: the same operations in the same order."""
    np.multiply(mom, np.float32(momentum), out=out_mom)
    np.add(out_mom, grad, out=out_mom)
    np.multiply(grad, np.float32(-lr), out=work)
    np.add(theta, work, out=out_theta)
    np.multiply(out_mom, np.float32(-lr * momentum), out=work)
    np.add(out_theta, work, out=out_theta)


def step_in_place(params: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor, *, lr: float, momentum: float,
                  param_numel: int | None = None, int_slices: tuple[tuple[int, int], ...] = ()) -> None:
    """``outer_step`` in place on ``params`` and ``buf`` (1-D float32, one device, equal length),
    with ``grad`` as scratch (its values are destroyed): the same operations, so the same bits,
    with no temporary. Raises ``ValueError`` like ``outer_step``."""
    _check_shapes(params, grad, buf)
    n = _param_numel(params, param_numel)
    _check_slices(params.numel(), n, int_slices)
    if n < params.numel():
        _buffers_step(params, grad[n:], params, buf, n, int_slices)
    p, b, g = params[:n], buf[:n], grad[:n]
    _param_step(p, g, b, out_theta=p, out_mom=b, work=g, lr=lr, momentum=momentum)


OUTER_CHUNK = 1 << 16
"""Elements per chunk of ``outer_step_hashed`` (256 KiB of float32: the chunk's four arrays stay
in L2 between the step's six operations, the finiteness check and the hash)."""


def _param_numel(params: torch.Tensor, param_numel: int | None) -> int:
    n = params.numel() if param_numel is None else param_numel
    if not 0 <= n <= params.numel():
        raise ValueError(f"param_numel {n} outside [0, {params.numel()}]")
    return n


def _buffers_step(params: torch.Tensor, grad_tail: torch.Tensor, new_params: torch.Tensor, buf: torch.Tensor,
                  n: int, int_slices: tuple[tuple[int, int], ...]) -> None:
    """The buffers' part of the step, in place on ``new_params[n:]`` and ``buf[n:]``: the plain
    average (theta - g), no momentum, integer slices rounded. ``grad_tail`` is ``grad[n:]``."""
    torch.sub(params[n:], grad_tail, out=new_params[n:])
    buf[n:] = 0
    for start, stop in int_slices:  # checked by the caller (_check_slices)
        new_params[start:stop].round_()


def outer_step_hashed(
    params: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, *, lr: float, momentum: float,
    param_numel: int | None = None, int_slices: tuple[tuple[int, int], ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
    """``outer_step`` (the same ops, so the same bits), the digest of the new parameters
    (``tensor_digest(new_params)``) and whether the new parameters and buffer are all finite,
    in one sweep over memory (``step_hashed_into`` fresh tensors). Inputs are not modified.
    Any thread."""
    _check_shapes(params, grad, momentum_buf)
    new_params, buf = torch.empty_like(params), torch.empty_like(momentum_buf)
    digest, size = step_hashed_into(params, grad, momentum_buf, new_params, buf, lr=lr, momentum=momentum,
                                    param_numel=param_numel, int_slices=int_slices)
    return new_params, buf, digest, math.isfinite(size)


def step_hashed_into(
    params: torch.Tensor, grad: torch.Tensor | GradPieces, momentum_buf: torch.Tensor, out_params: torch.Tensor,
    out_buf: torch.Tensor, *, lr: float, momentum: float, param_numel: int | None = None,
    int_slices: tuple[tuple[int, int], ...] = (), measure: bool = True,
) -> tuple[str, float | None]:
    """The outer step of ``(params, momentum_buf)`` with ``grad`` written into ``(out_params,
    out_buf)``: the same ops as ``outer_step``, so the same bits. Returns the digest of the
    new parameters (``tensor_digest(out_params)``) and ``magnitude(out_params, out_buf)`` (inf or
    NaN when the new state is not finite), found in the same sweep: chunk by chunk, each new
    chunk is checked and hashed while it is still in cache, instead of four more passes over
    the whole state. ``grad`` is only read. Any thread; 1-D float32 CPU tensors of one length.

    The outputs may be the inputs themselves (``out_params is params``, ``out_buf is
    momentum_buf``): the step in place, with no allocation but one chunk of scratch. Fresh
    outputs cost 8 bytes a value and their page faults (most of the time of a step here: a
    fresh 40 MB tensor filled once takes ~25 ms, the whole in-place step of 10M values ~40).
    In place, the old values are gone once it starts: only for a state nothing else reads
    (``peer.sync.store.StateStore.begin_step``) and whose result is known to be finite
    (``finite_bound``), since a non-finite result cannot be undone. Every argument is
    checked (``ValueError``) before the first value is written.

    ``grad`` may also be ``GradPieces``: the sweep then goes by its pieces, each stepped where
    it was decoded (the buffers' part gathered whole: a model's buffers are few), with the same
    bits: the operations are per value, and the digest reads the bytes in order whatever the
    cut. Pieces that do not cover ``[0, numel())`` in order raise ``ValueError`` where the sweep
    meets the gap, which is past the first write: ``Averaged``'s cover it by construction (its
    shards are the group's bounds, each answer's size checked on arrival).

    ``measure=False`` skips the magnitude (two ``aminmax`` a chunk, ~12 ms for 10M values) and
    returns None for it: for a step whose result ``finite_bound`` already bounds."""
    _check_shapes(params, grad, momentum_buf)
    _check_shapes(out_params, grad, out_buf)
    total = params.numel()
    n = _param_numel(params, param_numel)
    _check_slices(total, n, int_slices)
    work = torch.empty(0, dtype=params.dtype)
    h = digest_hasher()
    size = 0.0
    bytes_of = memoryview(out_params.numpy()).cast("B")
    for start, g in _sweep(grad, n, total):
        stop = start + g.numel()
        p = out_params[start:stop]
        if start < n:
            if work.numel() < g.numel():
                work = torch.empty(g.numel(), dtype=params.dtype)
            _param_step(params[start:stop], g, momentum_buf[start:stop], out_theta=p, out_mom=out_buf[start:stop],
                        work=work[:stop - start], lr=lr, momentum=momentum)
            if measure:
                size = _max_abs(size, out_buf[start:stop])
        else:  # the buffers, whole (the last piece of the sweep)
            _buffers_step(params, g, out_params, out_buf, n, int_slices)
        if measure:
            size = _max_abs(size, p)
        h.update(bytes_of[4 * start:4 * stop])
    return h.hexdigest(), size if measure else None


def _sweep(grad: torch.Tensor | GradPieces, n: int, total: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, g)``: the gradient in the order the step sweeps it: pieces of the parameters'
    ``[0, n)`` (``OUTER_CHUNK`` values each for a tensor; a ``GradPieces``'s own pieces, used
    where they were decoded, no copy), then the buffers' ``[n, total)`` in one piece."""
    if isinstance(grad, torch.Tensor):
        yield from ((a, grad[a:min(n, a + OUTER_CHUNK)]) for a in range(0, n, OUTER_CHUNK))
        if total > n:
            yield n, grad[n:total]
        return
    tail = torch.empty(total - n, dtype=torch.float32)
    done = 0
    for start, values in grad.pieces():
        stop = start + values.numel()
        if start != done or stop > total:
            raise ValueError(f"a gradient piece at {start} of {values.numel()} values; expected one at {done}")
        if start < n:
            yield start, values[:min(stop, n) - start]
        if stop > n:  # (buffers: gathered, as their step takes them whole)
            at = max(start, n)
            tail[at - n:stop - n].copy_(values[at - start:])
        done = stop
    if done != total:
        raise ValueError(f"the gradient's pieces ended at {done} of {total} values")
    if total > n:
        yield n, tail


FINITE_MARGIN = 4.0
"""``finite_bound`` wants its bound this many times below the float32 maximum: each of the
step's roundings moves a value by at most one part in 2^24 of itself."""


def _max_abs(size: float, t: torch.Tensor) -> float:
    """max(size, max |t|), NaN once a NaN was seen (min/max are NaN when a NaN is present; an
    Inf shows as an infinite extreme)."""
    if math.isnan(size) or not t.numel():
        return size
    lo, hi = torch.aminmax(t)
    lo, hi = float(lo), float(hi)
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(size, -lo, hi)


def magnitude(*tensors: torch.Tensor) -> float:
    """The largest ``|x|`` over float32 tensors, as a Python float: inf when one holds an Inf,
    NaN when one holds a NaN. One read of each (``aminmax``: ~6 ms for 10M values here)."""
    size = 0.0
    for t in tensors:
        size = _max_abs(size, t)
    return size


def finite_bound(state_magnitude: float, grad: torch.Tensor | GradPieces, *, lr: float, momentum: float
                 ) -> float | None:
    """An upper bound of ``|x|`` over the outer step's result (parameters and momentum) from a
    state whose values are at most ``state_magnitude`` in absolute value (``magnitude``, or a
    bound this function gave for it) and ``grad``, when the bound proves the result finite;
    None (maybe finite, maybe not) otherwise, and for a NaN/Inf in either. One read of ``grad``
    (``GradPieces`` carry their magnitude: no read).

    From finite inputs, the step's products and sums can only fail by overflowing, and
    ``|buf'| <= |g| + m |buf|``, ``|theta'| <= |theta| + lr |g| + lr m |buf'|`` (buffers:
    ``|theta| + |g|``), so an exact bound ``FINITE_MARGIN`` times below the float32 maximum
    proves the result finite (each of the step's roundings moves a value by at most one part in
    2^24 of itself). The caller steps into fresh tensors when it gets None, and keeps the old
    state if the result is not finite."""
    a, c = state_magnitude, magnitude(grad) if isinstance(grad, torch.Tensor) else grad.magnitude
    if not (math.isfinite(a) and math.isfinite(c)):
        return None
    lr, m = abs(float(lr)), abs(float(momentum))
    mom = c + m * a
    bound = max(a + lr * c + lr * m * mom, a + c, mom)
    return bound if bound * FINITE_MARGIN < torch.finfo(torch.float32).max else None


REMEASURE_ABOVE = 2.0**100
"""A state's magnitude may be carried from round to round as ``finite_bound``'s bound instead of
measured (two ``aminmax`` a chunk of the step). The bound grows each round by a factor up to
``1 + lr m^2`` (~1.6 with DiLoCo's lr 0.7, m 0.9) while the values themselves need not: once it
passes this (~150 rounds from magnitude 1), the step measures again, still in place, and the
bound starts over from the measured value, far below where it would stop proving finiteness
(2^126)."""


def _check_shapes(params: torch.Tensor, grad: torch.Tensor | GradPieces, momentum_buf: torch.Tensor) -> None:
    shape = grad.shape if isinstance(grad, torch.Tensor) else torch.Size([grad.numel()])
    if not (params.shape == shape == momentum_buf.shape) or params.dim() != 1:
        raise ValueError(f"shape mismatch: params {tuple(params.shape)}, grad {tuple(shape)}, "
                         f"buf {tuple(momentum_buf.shape)}")


def _check_slices(total: int, n: int, int_slices: tuple[tuple[int, int], ...]) -> None:
    for start, stop in int_slices:
        if not n <= start <= stop <= total:
            raise ValueError(f"integer buffer slice ({start}, {stop}) outside the buffers [{n}, {total})")


def tensor_digest(*tensors: torch.Tensor) -> str:
    """The state digest (``digest_hasher``, hex) of the raw float32 bytes of the given tensors,
    in order."""
    h = digest_hasher()
    for t in tensors:
        h.update(_bytes_of(t))
    return h.hexdigest()


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 hex of the raw float32 bytes of the given tensors, in order: the digest of
    checkpoints written before the state digest was BLAKE3 (``peer.sync.state``)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(_bytes_of(t))
    return h.hexdigest()


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B")
