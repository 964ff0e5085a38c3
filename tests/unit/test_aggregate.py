"""Aggregation rules on literal tensors (pure): mean, trimmed mean, centered clipping, caps."""

from __future__ import annotations

import math

import pytest
import torch

from peer.sync.aggregate import (aggregate, cap_weights, centered_clip, l2_norm, norm_outliers, trimmed_mean,
                                 weighted_mean, weighted_mean_iter, weighted_mean_pieces)

T = torch.tensor


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    parts = [T([1.0, 10.0]), T([2.0, 20.0]), T([3.0, 30.0]), T([4.0, -1000.0]), T([1000.0, 40.0])]
    # n=5, trim 0.2: one value cut at each end, per coordinate
    got = trimmed_mean(parts, [1.0] * 5, 0.2)
    assert torch.allclose(got, T([3.0, 20.0]))  # (2+3+4)/3, (10+20+30)/3


def test_trimmed_mean_weights_the_kept_values_and_skips_zero_weight():
    parts = [T([1.0]), T([2.0]), T([3.0]), T([100.0])]
    # the weight-0 part takes no part; of the other three, one is cut at each end: 2 remains
    assert torch.allclose(trimmed_mean(parts, [1.0, 1.0, 1.0, 0.0], 0.34), T([2.0]))
    # too few parts to trim: the weighted mean
    assert torch.allclose(trimmed_mean([T([1.0]), T([3.0])], [1.0, 3.0], 0.4), T([2.5]))


def test_centered_clip_bounds_one_huge_part():
    honest = [T([1.0, 1.0]), T([1.1, 0.9]), T([0.9, 1.1]), T([1.0, 1.05])]
    attacker = T([-1000.0, 1000.0])
    got = centered_clip([*honest, attacker], [1.0] * 5)
    assert (got - T([1.0, 1.0])).norm() < 0.2, got
    mean = aggregate("mean", [*honest, attacker], [1.0] * 5)
    assert (mean - T([1.0, 1.0])).norm() > 100  # what the plain mean does


def test_centered_clip_of_agreeing_parts_is_their_mean():
    parts = [T([1.0, 2.0]), T([1.0, 2.0]), T([1.0, 2.0])]
    assert torch.allclose(centered_clip(parts, [1.0, 2.0, 3.0]), T([1.0, 2.0]))


def test_rules_are_deterministic():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(1000, generator=gen) for _ in range(5)]
    for rule in ("mean", "trimmed_mean", "centered_clip"):
        assert torch.equal(aggregate(rule, parts, [1.0, 2.0, 3.0, 1.0, 1.0]),
                           aggregate(rule, parts, [1.0, 2.0, 3.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate("median", parts, [1.0] * 5)


def test_a_claimed_weight_is_capped_at_a_multiple_of_the_median():
    assert cap_weights([100.0, 100.0, 1e30], 4.0) == [100.0, 100.0, 400.0]
    assert cap_weights([100.0, 0.0, 120.0, 1e9], 2.0) == [100.0, 0.0, 120.0, 240.0]
    assert cap_weights([0.0, 0.0], 4.0) == [0.0, 0.0]


def test_norm_outliers_are_found_only_with_a_median():
    parts = [T([1.0, 0.0]), T([0.0, 1.2]), T([0.9, 0.0]), T([300.0, 0.0])]
    assert norm_outliers(parts, 10.0) == [3]
    assert norm_outliers(parts[:2] + [T([300.0, 0.0])], 10.0) == [2]
    assert norm_outliers([T([1.0]), T([500.0])], 10.0) == []  # two parts: no meaningful median


def _cut(x: torch.Tensor, piece: int):
    """``(start, values)`` pieces of ``x`` through one reused scratch buffer, as a codec yields them."""
    scratch = torch.empty(piece)
    for start in range(0, x.numel(), piece):
        values = scratch[: min(piece, x.numel() - start)]
        values.copy_(x[start:start + piece])
        yield start, values


@pytest.mark.parametrize("piece", [1, 7, 1000, 1 << 16])
def test_the_mean_piece_by_piece_is_the_whole_part_mean_bit_for_bit(piece):
    # Prepare: parts of very different magnitudes, uneven weights, a part of weight 0
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(70_001, generator=g) * s for s in (1e-3, 1.0, 1e3, 5.0)]
    weights = [1.0, 3.0, 0.5, 0.0]

    # Execute
    got = weighted_mean_pieces([_cut(p, piece) for p in parts], weights, 70_001)

    # Assert
    assert torch.equal(got, weighted_mean(parts, weights))


def test_the_mean_piece_by_piece_refuses_parts_cut_differently_or_short():
    a, b = torch.ones(100), torch.ones(100)
    with pytest.raises(ValueError, match="cut differently"):
        weighted_mean_pieces([_cut(a, 10), _cut(b, 20)], [1.0, 1.0], 100)
    with pytest.raises(ValueError, match="ended"):
        weighted_mean_pieces([_cut(a, 10), _cut(b[:50], 10)], [1.0, 1.0], 100)
    with pytest.raises(ValueError, match="weights must be finite"):
        weighted_mean_pieces([_cut(a, 10)], [float("nan")], 100)
    # every weight 0: zeros, as weighted_mean
    assert torch.equal(weighted_mean_pieces([_cut(a, 10)], [0.0], 100), torch.zeros(100))


def test_the_float32_mean_is_within_a_few_roundings_of_the_float64_one():
    gen = torch.Generator().manual_seed(4)
    parts = [torch.randn(70_001, generator=gen) * s for s in (1.0, 3.0, 0.5, 2.0)]
    weights = [1.0, 2.0, 0.0, 3.5]
    exact = weighted_mean(parts, weights)
    narrow = torch.cat([v.clone() for _, v in weighted_mean_iter([_cut(p, 4096) for p in parts], weights, 70_001,
                                                                 wide=False)])
    assert narrow.dtype == torch.float32 and narrow.numel() == 70_001
    # each term's product and each sum rounds once: at most ~K roundings of the largest term
    bound = 4 * 2.0**-23 * float(max((p.abs() * w / sum(weights)).max() for p, w in zip(parts, weights)))
    assert float((narrow - exact).abs().max()) <= bound
    assert not torch.equal(narrow, exact)  # it is another summation, not the float64 one
    # every weight 0 and a ragged piece: as the wide path
    assert torch.equal(torch.cat([v for _, v in weighted_mean_iter([_cut(parts[0], 10)], [0.0], 70_001, wide=False)]),
                       torch.zeros(70_001))


def test_l2_norm_is_close_to_the_float64_norm_even_where_float32_squares_overflow():
    x = torch.randn(200_003, generator=torch.Generator().manual_seed(2)) * 1e3
    assert l2_norm(x) == pytest.approx(float(x.double().norm()), rel=1e-6)
    huge = x * 1e25  # squares beyond float32's range: that piece is summed in float64
    assert math.isinf(float(huge[:65536].dot(huge[:65536])))
    assert l2_norm(huge) == pytest.approx(float(huge.double().norm()), rel=1e-6)
    assert math.isnan(l2_norm(torch.tensor([1.0, float("nan")])))
    assert l2_norm(torch.empty(0)) == 0.0
