"""AWQ's activation-aware clipping search (quantize.algorithms.awq, clip=True)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from _matrices import awq_layers
from quantize import quantize_tensor
from quantize.algorithms.awq import (
    CLIP_PAIR_RATIOS,
    CLIP_RATIOS,
    awq_apply,
    awq_scan,
    awq_search,
)
from quantize.formats import get_format

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def output_error(w, x, s, qt) -> float:
    """||x W - (x / s) @ dq||^2 the plain way, in float64."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    deq = qt.dequantize(np.float64)
    return float(np.sum(np.square(x64 @ w64 - (x64 / s.astype(np.float64)) @ deq)))


def outlier_layer(seed, k=256, n=64, rows=256, factor=40.0):
    rng = np.random.default_rng(seed)
    w = (0.02 * rng.standard_t(4, (k, n))).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, rng.choice(k, 6, replace=False)] *= factor
    return w, x


def clamp_blocks(ws, bs, r):
    """ws (K, N) with each block of bs rows clamped to +-r * its max |value| (AutoAWQ's clip)."""
    k, n = ws.shape
    nb = -(-k // bs)
    pad = np.zeros((nb * bs, n), ws.dtype)
    pad[:k] = ws
    blocks = pad.reshape(nb, bs, n)
    m = np.abs(blocks).max(axis=1, keepdims=True) * ws.dtype.type(r)
    return np.clip(blocks, -m, m).reshape(nb * bs, n)[:k]


def clamp_ends(ws, bs, r_lo, r_hi):
    """ws (K, N) with each block clamped to [r_lo * min(min, 0), r_hi * max(max, 0)] (the
    last block's zero padding cannot move either end)."""
    k, n = ws.shape
    nb = -(-k // bs)
    pad = np.zeros((nb * bs, n), ws.dtype)
    pad[:k] = ws
    blocks = pad.reshape(nb, bs, n)
    zero = ws.dtype.type(0)
    lo = np.minimum(blocks.min(axis=1, keepdims=True), zero) * ws.dtype.type(r_lo)
    hi = np.maximum(blocks.max(axis=1, keepdims=True), zero) * ws.dtype.type(r_hi)
    return np.clip(blocks, lo, hi).reshape(nb * bs, n)[:k]


@pytest.mark.parametrize(
    ("fmt", "bs"), [("uint4", 32), ("uint4", 128), ("int4", 128), ("nf4", 64), ("nvfp4", 16)]
)
def test_clip_lowers_the_output_error(fmt, bs):
    w, x = outlier_layer(0, factor=8.0)
    plain = awq_scan(w, x, fmt, bs, clip=False)
    clipped = awq_scan(w, x, fmt, bs)
    assert np.array_equal(plain.scales, clipped.scales)  # the scale search is untouched
    assert plain.clip_ratios is None and plain.clip_loss is None
    got = output_error(w, x, clipped.scales, clipped.quantized)
    base = output_error(w, x, plain.scales, plain.quantized)
    assert got == pytest.approx(clipped.clip_loss, rel=1e-6)
    assert base == pytest.approx(plain.loss, rel=1e-6)
    assert got < base  # measured 3-27% lower on these layers
    assert (clipped.clip_ratios < 1).any()


@pytest.mark.parametrize(("fmt", "bs"), [("int4", 128), ("int4", 32), ("mxfp4", 32)])
def test_clipped_parameters_are_the_formats_own(fmt, bs):
    """Every block's (scale, zero point) is the format's rule on the block clamped at the ratio
    reported for it."""
    w, x = outlier_layer(1, k=200)  # K not a multiple of the block: a padded last block
    res = awq_scan(w, x, fmt, bs)
    qt, ratios = res.quantized, res.clip_ratios
    f = get_format(fmt)
    assert ratios.shape == qt.scales.shape
    assert set(np.unique(ratios)) <= {np.float32(r) for r in CLIP_RATIOS}
    ws = awq_apply(w, res.scales)
    scaled = quantize_tensor(ws, fmt, bs, axis=0)
    for r in np.unique(ratios):
        want = quantize_tensor(clamp_blocks(ws, bs, r), fmt, bs, axis=0)
        pick = ratios == r
        assert np.array_equal(qt.scales[pick], want.scales[pick])
        if qt.zero_points is not None:
            assert np.array_equal(qt.zero_points[pick], want.zero_points[pick])
    # the stored codes decode to what the format itself gives for those parameters
    assert qt.data.shape == scaled.data.shape and qt.format == f.name
    assert np.isfinite(qt.dequantize(np.float32)).all()


@pytest.mark.parametrize("bs", [32, 128])
def test_zero_point_formats_clip_each_end_on_its_own(bs):
    """uint4: every block's parameters are the format's rule on the block clamped to
    [r_lo * min, r_hi * max], (r_lo, r_hi) the pair reported for it."""
    w, x = outlier_layer(1, k=200, factor=8.0)
    res = awq_scan(w, x, "uint4", bs)
    qt, ratios = res.quantized, res.clip_ratios
    assert ratios.shape == (*qt.scales.shape, 2)
    grid = {np.float32(r) for r in CLIP_PAIR_RATIOS}
    assert set(np.unique(ratios)) <= grid
    assert (ratios[..., 0] != ratios[..., 1]).any()  # the two ends did move apart somewhere
    ws = awq_apply(w, res.scales)
    pairs = {tuple(p) for p in ratios.reshape(-1, 2)}
    for r_lo, r_hi in pairs:
        want = quantize_tensor(clamp_ends(ws, bs, r_lo, r_hi), "uint4", bs, axis=0)
        pick = (ratios[..., 0] == r_lo) & (ratios[..., 1] == r_hi)
        assert np.array_equal(qt.scales[pick], want.scales[pick])
        assert np.array_equal(qt.zero_points[pick], want.zero_points[pick])


@SETTINGS
@given(case=awq_layers())
def test_clip_never_worse_than_plain_awq(case):
    w, x, fmt, bs = case
    plain = awq_scan(w, x, fmt, bs, grid=4, clip=False)
    clipped = awq_scan(w, x, fmt, bs, grid=4)
    assert clipped.clip_loss <= plain.loss
    got = output_error(w, x, clipped.scales, clipped.quantized)
    assert got <= plain.loss * (1 + 1e-9) + 1e-9


def test_no_gain_keeps_the_unclipped_weight():
    """Channels 40x larger make the damping (a share of H's mean diagonal) dominate the other
    channels' scores, so no clip wins (or lowers the whole objective): plain AWQ is kept."""
    w, x = outlier_layer(0, factor=40.0)
    plain = awq_scan(w, x, "int4", 128, clip=False)
    res = awq_scan(w, x, "int4", 128)
    assert (res.clip_ratios == 1).all() and res.clip_loss == plain.loss
    assert np.array_equal(res.quantized.data, plain.quantized.data)
    assert np.array_equal(res.quantized.scales, plain.quantized.scales)


def test_clip_is_deterministic():
    w, x = outlier_layer(2)
    a, b = awq_scan(w, x, "uint4", 32), awq_scan(w, x, "uint4", 32)
    assert np.array_equal(a.clip_ratios, b.clip_ratios)
    assert np.array_equal(a.quantized.data, b.quantized.data)
    assert np.array_equal(a.quantized.scales, b.quantized.scales)
    assert np.array_equal(a.quantized.zero_points, b.quantized.zero_points)
    assert np.array_equal(awq_search(w, x, "uint4", 32), a.scales)


def test_clip_argument_is_checked():
    w, x = outlier_layer(3, k=32, n=4, rows=8)
    with pytest.raises(TypeError, match="clip"):
        awq_scan(w, x, "int4", 32, clip="yes")


def test_awq_clip_checks_its_arguments():
    from quantize.algorithms.awq import awq_clip

    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    h = np.eye(64)
    with pytest.raises(ValueError, match="h must have shape"):
        awq_clip(w, h[:10], "int4", 16)
    with pytest.raises(ValueError, match="h"):
        awq_clip(w, np.full((64, 64), np.nan), "int4", 16)
    with pytest.raises(ValueError, match="col_weights must have shape"):
        awq_clip(w, h, "int4", 16, col_weights=np.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        awq_clip(w[0], h, "int4", 16)
    qt, ratios, loss = awq_clip(w, np.zeros((64, 64)), "uint4", 16)
    assert qt.shape == (64, 8)
    assert ratios.shape == (8, 4, 2) and (ratios == 1).all() and loss == 0.0
