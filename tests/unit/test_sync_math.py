"""Outer step, aggregation, shard bounds and the state format: pure math against references."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from blake3 import blake3

import peer.sync.state as state_mod
from peer.errors import StateError
from peer.sync.aggregate import weighted_mean
from peer.sync.outer import (
    OUTER_CHUNK, finite_bound, magnitude, outer_step, outer_step_hashed, step_hashed_into, step_in_place,
    tensor_digest, tensor_sha256,
)
from peer.sync.round import shard_bounds
from peer.sync.state import (
    MAX_HEADER, GlobalState, decode_state, encode_state, max_blob_bytes, read_checkpoint, state_header,
    write_checkpoint,
)


def test_outer_step_against_hand_computed_values():
    # Prepare: lr 0.5, momentum 0.9, two steps
    theta = torch.tensor([1.0, -2.0])
    g1, g2 = torch.tensor([0.2, 0.4]), torch.tensor([-0.1, 0.0])
    buf = torch.zeros(2)
    # Execute
    theta1, buf1 = outer_step(theta, g1, buf, lr=0.5, momentum=0.9)
    theta2, buf2 = outer_step(theta1, g2, buf1, lr=0.5, momentum=0.9)
    # Assert: buf1 = g1; theta1 = theta - 0.5 * (g1 + 0.9 * g1) = theta - 0.95 g1
    assert torch.allclose(buf1, g1)
    assert torch.allclose(theta1, torch.tensor([1.0 - 0.19, -2.0 - 0.38]))
    # buf2 = 0.9 * g1 + g2 = [0.08, 0.36]; update = g2 + 0.9 buf2 = [-0.028, 0.324]
    assert torch.allclose(buf2, torch.tensor([0.08, 0.36]))
    assert torch.allclose(theta2, theta1 - 0.5 * torch.tensor([-0.028, 0.324]))


def test_outer_step_matches_torch_sgd_nesterov():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(1000, generator=gen)
    param = torch.nn.Parameter(theta.clone())
    opt = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    buf = torch.zeros_like(theta)
    for _ in range(5):
        g = torch.randn(1000, generator=gen)
        theta, buf = outer_step(theta, g, buf, lr=0.7, momentum=0.9)
        param.grad = g.clone()
        opt.step()
    assert torch.allclose(theta, param.detach(), atol=1e-6)


def test_outer_step_leaves_inputs_alone_and_is_deterministic():
    theta, g, buf = torch.ones(4), torch.full((4,), 0.5), torch.full((4,), 0.1)
    a = outer_step(theta, g, buf, lr=0.3, momentum=0.9)
    b = outer_step(theta, g, buf, lr=0.3, momentum=0.9)
    assert torch.equal(theta, torch.ones(4)) and torch.equal(buf, torch.full((4,), 0.1))
    assert tensor_digest(*a) == tensor_digest(*b)
    with pytest.raises(ValueError, match="shape"):
        outer_step(theta, torch.ones(3), buf, lr=0.3, momentum=0.9)


@pytest.mark.parametrize("n", [1, 1000, OUTER_CHUNK, 2 * OUTER_CHUNK + 3])
def test_outer_step_hashed_is_outer_step_bit_for_bit_with_its_digest(n):
    # Prepare
    gen = torch.Generator().manual_seed(n)
    theta, g, buf = torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    kept = (theta.clone(), g.clone(), buf.clone())
    # Execute
    p1, b1 = outer_step(theta, g, buf, lr=0.7, momentum=0.9)
    p2, b2, digest, finite = outer_step_hashed(theta, g, buf, lr=0.7, momentum=0.9)
    # Assert
    assert torch.equal(p1, p2) and torch.equal(b1, b2)
    assert digest == tensor_digest(p1) and finite
    assert all(torch.equal(a, b) for a, b in zip(kept, (theta, g, buf)))


@pytest.mark.parametrize("where", ["params", "buf"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_outer_step_hashed_reports_nonfinite_results(where, bad):
    # Prepare: a bad value late in the second chunk, in the step's result or its momentum
    n = 2 * OUTER_CHUNK + 3
    theta, g, buf = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    (theta if where == "params" else buf)[OUTER_CHUNK + 7] = bad
    # Execute
    *_, finite = outer_step_hashed(theta, g, buf, lr=0.7, momentum=0.9)
    # Assert
    assert not finite


def _exact_inputs(n: int = 5003) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parameters, averaged delta and momentum of closed form (integers times powers of two):
    the same bytes on every machine and torch version, unlike a random generator's."""
    i = torch.arange(n, dtype=torch.int64)

    def field(mult: int, shift: int) -> torch.Tensor:
        return (((i * mult + shift) % (1 << 24)) - (1 << 23)).to(torch.float32) * 2.0**-20

    return field(2654435761, 1), field(40503, 7) * 2.0**-6, field(2246822519, 3) * 2.0**-6


# sha256 of the parameters' bits after one outer step of _exact_inputs() (lr 0.7, momentum 0.9, the
# last 13 values buffers, 3 of them integer). Every peer of a run must compute exactly this: a
# change of the step's operations changes the bits peers agree on (old and new versions would
# no longer agree), so it must be deliberate.
GOLDEN_STEP = "2769075c927a69887320f47e8a417a6fb371d1ffd0fce2141e5cd628d6009a38"


def test_outer_step_bits_are_pinned():
    p, g, b = _exact_inputs()
    new_p, _, digest, finite = outer_step_hashed(p, g, b, lr=0.7, momentum=0.9, param_numel=4990,
                                                 int_slices=((5000, 5003),))
    assert finite and tensor_sha256(new_p) == GOLDEN_STEP and digest == tensor_digest(new_p)


def test_outer_step_rounds_once_per_operation():
    # Prepare: float64 gives every float32 product and sum exactly or rounds it so that the
    # rounding to float32 after it is the correct one (53 >= 2 * 24 + 2): the reference below is
    # the step as single IEEE float32 operations, with nothing fused.
    p, g, b = _exact_inputs()
    gen = torch.Generator().manual_seed(5)
    p, g, b = p * 1e3, g + torch.randn(g.shape, generator=gen) * 1e-30, b * 1e-3  # wide exponents
    lr, m = 0.7, 0.9

    def f32(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).double()

    m32, a32, c32 = (float(torch.tensor(v, dtype=torch.float32)) for v in (m, -lr, -lr * m))
    # Execute
    new_p, new_b = outer_step(p, g, b, lr=lr, momentum=m)
    # Assert
    ref_b = f32(f32(b.double() * m32) + g.double())
    ref_p = f32(f32(p.double() + f32(g.double() * a32)) + f32(ref_b * c32))
    assert torch.equal(new_b.double(), ref_b) and torch.equal(new_p.double(), ref_p)


def test_outer_step_bits_do_not_depend_on_the_cpu_kernels():
    # torch picks its CPU kernels by what the CPU offers; ATEN_CPU_CAPABILITY=default picks the
    # kernels of a CPU without AVX2, which do not fuse a multiply-add where the AVX2/AVX-512 ones
    # do (an outer step written with add(alpha=...) gave other bits under the two). Peers on
    # different machines must agree, so the step must not depend on it. (On a CPU without AVX2
    # both sides run the default kernels.)
    script = textwrap.dedent("""
        import torch
        from peer.sync.outer import outer_step_hashed
        from tests.unit.test_sync_math import _exact_inputs
        p, g, b = _exact_inputs(100_003)
        print(torch.backends.cpu.get_cpu_capability(),
              outer_step_hashed(p, g, b, lr=0.7, momentum=0.9, param_numel=100_000)[2])
    """)
    p, g, b = _exact_inputs(100_003)
    here = outer_step_hashed(p, g, b, lr=0.7, momentum=0.9, param_numel=100_000)[2]
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
                         capture_output=True, text=True, timeout=120, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    used, there = out.stdout.split()
    assert used == "DEFAULT"
    assert there == here, f"{torch.backends.cpu.get_cpu_capability()} kernels: {here}, default kernels: {there}"


def test_step_in_place_is_outer_step():
    p, g, b = _exact_inputs()
    want_p, want_b = outer_step(p, g, b, lr=0.5, momentum=0.8, param_numel=4990, int_slices=((5000, 5003),))
    step_in_place(p, b, g, lr=0.5, momentum=0.8, param_numel=4990, int_slices=((5000, 5003),))
    assert torch.equal(p.view(torch.int32), want_p.view(torch.int32))
    assert torch.equal(b.view(torch.int32), want_b.view(torch.int32))


def test_weighted_mean_weights_by_samples_and_skips_zero_weight():
    parts = [torch.tensor([1.0, 1.0]), torch.tensor([4.0, 0.0]), torch.tensor([float("nan"), 5.0])]
    # The third part has weight 0: its values (even NaN) must not matter.
    out = weighted_mean(parts, [3.0, 1.0, 0.0])
    assert torch.allclose(out, torch.tensor([1.75, 0.75]))
    assert torch.equal(weighted_mean(parts[:1], [0.0]), torch.zeros(2))
    with pytest.raises(ValueError):
        weighted_mean(parts[:2], [1.0, -1.0])


@pytest.mark.parametrize("numel, k", [(10, 3), (3, 4), (1_000_003, 7), (0, 2), (5, 1)])
def test_shard_bounds_cover_everything_once(numel, k):
    bounds = shard_bounds(numel, k)
    assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1


def _state(n=100, rnd=3) -> GlobalState:
    gen = torch.Generator().manual_seed(rnd)
    return GlobalState(rnd, torch.randn(n, generator=gen), torch.randn(n, generator=gen))


def test_state_roundtrip_is_exact():
    state = _state()
    back, extra = decode_state(encode_state(state, {"inner": torch.arange(6.0).reshape(2, 3)}), 100)
    assert back.round == 3 and torch.equal(back.params, state.params) and torch.equal(back.momentum, state.momentum)
    assert torch.equal(extra["inner"], torch.arange(6.0).reshape(2, 3))
    assert back.global_hash == state.global_hash


@pytest.mark.parametrize("mutate, needle", [
    (lambda b: b[:20], "header length"),
    (lambda b: b"X" + b[1:], "magic"),
    (lambda b: b[:-4], "does not fit"),
])
def test_state_blob_damage_is_detected(mutate, needle):
    with pytest.raises(StateError, match=needle):
        decode_state(mutate(encode_state(_state())), 100)


@pytest.mark.parametrize("n", [0, 1, 100, 4097])
def test_a_served_state_fits_the_bound_a_joiner_puts_on_it(n):
    blob = encode_state(_state(n))
    assert len(blob) <= max_blob_bytes(n) < len(blob) + MAX_HEADER + 64
    assert max_blob_bytes(n) - max_blob_bytes(0) == 8 * n  # 8 bytes a value, no more


def test_state_for_another_model_is_refused():
    with pytest.raises(StateError, match="this model has 99"):
        decode_state(encode_state(_state()), 99)


def test_a_donor_header_hashes_the_parameters_and_the_rest_apart():
    state = _state()
    blob = encode_state(state)

    header = state_header(state, blob)

    start, end = header.params_offset, header.params_offset + header.params_bytes
    assert header.params_bytes == 400 and bytes(blob[start:end]) == state.params.numpy().tobytes()
    assert header.global_hash == blake3(blob[start:end]).hexdigest() == state.global_hash
    assert header.digest == blake3(blob[:start] + blob[end:]).hexdigest()
    assert header.total_bytes == len(blob) and header.round == state.round


def test_a_checked_header_spares_the_parameter_hash_only_where_it_covers_the_parameters(monkeypatch):
    # Prepare: the transport checked this header's range against its hash (get_state).
    state = _state()
    blob = encode_state(state)
    header = state_header(state, blob)
    calls = []
    monkeypatch.setattr(state_mod, "tensor_digest", lambda *t: calls.append(t) or tensor_digest(*t))

    # Execute / Assert: the range is the parameters': not hashed again.
    back, _ = decode_state(bytearray(blob), 100, header)
    assert back.global_hash == state.global_hash and calls == []
    # A range that is not the parameters' (or of another size, or another hash): hashed again,
    # so a header cannot vouch for parameters it did not cover.
    for lie in (replace(header, params_offset=header.params_offset + 4), replace(header, params_bytes=396),
                replace(header, global_hash="0" * 64)):
        decode_state(bytearray(blob), 100, lie)
    assert len(calls) == 3
    tampered = bytearray(blob)
    tampered[header.params_offset + 8] ^= 0x01
    with pytest.raises(StateError, match="hash"):
        decode_state(tampered, 100, replace(header, params_offset=header.params_offset + 400))


def test_state_with_flipped_parameter_bytes_fails_the_hash():
    blob = bytearray(encode_state(_state()))
    blob[-500] ^= 0x01  # inside params, behind the header
    with pytest.raises(StateError, match="hash|NaN"):
        decode_state(bytes(blob), 100)


def test_checkpoint_is_atomic_and_torn_files_are_refused(tmp_path):
    path = tmp_path / "ckpt" / "checkpoint.safetensors"
    state = _state()
    write_checkpoint(path, state, {"task": "digits"})
    back, meta = read_checkpoint(path, 100)
    assert back.round == state.round and torch.equal(back.params, state.params)
    assert torch.equal(back.momentum, state.momentum) and meta["task"] == "digits"
    assert not (path.parent / "checkpoint.safetensors.tmp").exists()
    good = path.read_bytes()
    # Torn: the tail is missing.
    path.write_bytes(good[:-10])
    with pytest.raises(StateError, match="torn or corrupt"):
        read_checkpoint(path, 100)
    # Altered: one bit of the momentum flipped (safetensors itself has no checksum).
    altered = bytearray(good)
    altered[-3] ^= 0x01
    path.write_bytes(bytes(altered))
    with pytest.raises(StateError, match="digests in its metadata"):
        read_checkpoint(path, 100)
    path.write_bytes(good)
    with pytest.raises(StateError, match="this model's state has 99"):
        read_checkpoint(path, 99)


@pytest.mark.parametrize("n", [1, 1000, 2 * OUTER_CHUNK + 3])
def test_the_step_in_place_is_outer_step_bit_for_bit_with_its_hash_and_magnitude(n):
    # Prepare: parameters, then buffers with an integer slice, as a model with BatchNorm lays them out
    gen = torch.Generator().manual_seed(n)
    theta, g, buf = (torch.randn(n, generator=gen) for _ in range(3))
    k = max(0, n - 7)
    slices = ((k + 2, k + 4),) if n > 7 else ()
    want_p, want_b = outer_step(theta, g, buf, lr=0.7, momentum=0.9, param_numel=k, int_slices=slices)
    g_kept = g.clone()
    p_ptr, b_ptr = theta.data_ptr(), buf.data_ptr()
    # Execute
    digest, size = step_hashed_into(theta, g, buf, theta, buf, lr=0.7, momentum=0.9, param_numel=k,
                                    int_slices=slices)
    # Assert: the reference's bits, written over the inputs themselves; grad untouched
    assert (theta.data_ptr(), buf.data_ptr()) == (p_ptr, b_ptr)
    assert torch.equal(theta.view(torch.int32), want_p.view(torch.int32))
    assert torch.equal(buf.view(torch.int32), want_b.view(torch.int32))
    assert torch.equal(g.view(torch.int32), g_kept.view(torch.int32))
    assert digest == tensor_digest(want_p) and size == magnitude(want_p, want_b)


def test_the_step_in_place_checks_everything_before_writing():
    theta, buf = torch.ones(10), torch.ones(10)
    with pytest.raises(ValueError, match="integer buffer slice"):
        step_hashed_into(theta, torch.ones(10), buf, theta, buf, lr=0.5, momentum=0.9, param_numel=5,
                         int_slices=((3, 6),))
    with pytest.raises(ValueError, match="shape"):
        step_hashed_into(theta, torch.ones(10), buf, theta, torch.ones(9), lr=0.5, momentum=0.9)
    assert torch.equal(theta, torch.ones(10)) and torch.equal(buf, torch.ones(10))


@pytest.mark.parametrize(("state", "grad", "finite"), [
    (1.0, 1.0, True),
    (5e37, 5e37, False),     # near the float32 maximum: not provably finite (the caller steps into fresh tensors)
    (3e38, 1.0, False),
    (1.0, math.inf, False),
    (1.0, math.nan, False),
    (math.nan, 1.0, False),
])
def test_finite_bound_only_when_it_proves_the_step_finite(state, grad, finite):
    g = torch.full((5,), 0.5)
    g[3] = grad
    assert (finite_bound(state, g, lr=0.7, momentum=0.9) is not None) is finite


def test_finite_bound_is_never_wrong_near_the_edge():
    # Prepare: states and averages around the largest values the bound accepts
    gen = torch.Generator().manual_seed(3)
    fmax = torch.finfo(torch.float32).max
    accepted = 0
    for scale in (1e36, 3e36, 1e37, 2e37, 4e37, 8e37):
        theta = (torch.rand(1000, generator=gen) * 2 - 1) * scale
        buf = (torch.rand(1000, generator=gen) * 2 - 1) * scale
        g = (torch.rand(1000, generator=gen) * 2 - 1) * scale
        theta[0], buf[0], g[0] = scale, scale, -scale  # the worst signs in one place
        # Execute
        bound = finite_bound(magnitude(theta, buf), g, lr=1.0, momentum=0.9)
        proved = bound is not None
        new_p, new_b, _, finite = outer_step_hashed(theta, g, buf, lr=1.0, momentum=0.9)
        # Assert: a proof is never wrong (the converse need not hold), and the bound bounds
        assert finite or not proved
        if bound is not None:
            assert magnitude(new_p, new_b) <= bound
        accepted += proved
    assert 0 < accepted < 6 and fmax > 8e37


def test_the_bound_carried_in_place_of_a_measured_magnitude_bounds_many_rounds():
    # Prepare: a state stepped in place round after round, its magnitude carried as finite_bound's
    # bound (what RoundDriver._outer records) except where the bound passed REMEASURE_ABOVE
    from peer.sync.outer import REMEASURE_ABOVE

    gen = torch.Generator().manual_seed(8)
    theta, buf = torch.randn(5000, generator=gen), torch.zeros(5000)
    carried, measured = magnitude(theta, buf), 0
    for _ in range(400):
        g = torch.randn(5000, generator=gen) * 0.1
        bound = finite_bound(carried, g, lr=0.7, momentum=0.9)
        assert bound is not None
        _, size = step_hashed_into(theta, g, buf, theta, buf, lr=0.7, momentum=0.9, measure=bound > REMEASURE_ABOVE)
        # Assert: the carried figure is never below the truth
        carried = bound if size is None else size
        measured += size is not None
        assert magnitude(theta, buf) <= carried
    assert 1 <= measured <= 4  # the bound grows ~1.6x a round: it is re-measured every ~150 rounds
