"""The int4_ort kernel (ONNX Runtime's MatMulNBits rule) equals OrtInt4's NumPy path bit for bit:
codes, scales and zero points (7/8), ties rounded up by roundf, the reciprocal multiply and
its divide fallback for tiny scales; dequantize runs uint4's kernel on the same layout."""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("numba")

from quantize import get_format, quantize_tensor
from quantize import kernels as K
from quantize.kernels import reference as R
from test_kernels import MAKERS, SHAPES, same

BF16 = np.dtype(ml_dtypes.bfloat16)


def check(x: np.ndarray, bs) -> tuple:
    got = K.quantize_rows("int4_ort", x, bs)
    want = R.quantize_rows("int4_ort", x, bs)
    for name, g, w in zip(("packed", "scales", "zero_points"), got, want, strict=True):
        assert same(g, w), f"{name} differ (shape {x.shape}, block {bs})"
    n = x.shape[1]
    for dt in (np.float32, np.float16, BF16, np.float64):
        fast = K.dequantize_rows("int4_ort", *got, n, bs, dt)
        slow = R.dequantize_rows("int4_ort", *want, n, bs, dt)
        assert same(fast, slow), f"dequantize to {np.dtype(dt)} differs"
    return got


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize(("rows", "n", "bs"), SHAPES)
def test_matches_reference(kind, rows, n, bs):
    rng = np.random.default_rng(zlib.crc32(repr(("ort", kind, rows, n, bs)).encode()))
    check(MAKERS[kind](rng, rows, n), bs)


@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_half_inputs(dtype):
    x = np.random.default_rng(3).standard_normal((7, 300)).astype(dtype)
    x[0, :40] = 0
    check(x, 32)


@pytest.mark.parametrize("sign", [1, -1])
def test_ties_go_up_as_roundf(sign):
    """Blocks whose ORT scale is 2^e exactly (extreme -8 * 2^e, or +8 * 2^e: scale negative) and
    elements on half steps: roundf(v + 8) rounds them up, where rint would go to even."""
    rng = np.random.default_rng(11)
    rows, nb, bs = 6, 8, 32
    e = np.exp2(rng.integers(-20, 20, (rows, nb, 1))).astype(np.float32)
    k = rng.integers(-7, 7, (rows, nb, bs))
    x = (k + 0.5).astype(np.float32) * e
    x[..., 0] = -8 * sign * e[..., 0]  # the extreme: |x| = 8 * 2^e
    x = x.reshape(rows, nb * bs)
    packed, scales, zp = check(x, bs)
    assert (zp == (8 if sign == 1 else 7)).all()
    v = x.reshape(rows, nb, bs) / np.where(zp == 7, -scales, scales)[..., None] + 8
    assert np.mean(v % 1 == 0.5) > 0.8  # really ties
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(rows, nb, bs).astype(int)
    ort = np.where((zp == 7)[..., None], 15 - codes, codes)
    tie = v % 1 == 0.5
    assert np.array_equal(ort[tie], np.floor(v[tie]).astype(int) + 1)


def test_tiny_scales_divide():
    """|extreme| < 2^-125: 1/scale overflows float32, ORT would multiply by inf; both paths
    divide instead."""
    x = (np.random.default_rng(5).standard_normal((4, 64)) * 1e-39).astype(np.float32)
    x[1] *= 1e-5
    _, scales, _ = check(x, 16)
    with np.errstate(over="ignore"):  # the overflow is the point
        assert np.isinf(np.float32(1) / scales.min())


def test_core_dispatches_the_kernel(monkeypatch):
    x = np.random.default_rng(6).standard_normal((K.MIN_KERNEL_ELEMENTS // 128, 128))
    x = x.astype(np.float32)
    monkeypatch.setenv("QUANTIZE_KERNELS", "1")
    assert K.wanted(get_format("int4_ort"), np.float32, x.size)
    fast = quantize_tensor(x, "int4_ort", 64)
    out_fast = fast.dequantize()
    monkeypatch.setenv("QUANTIZE_KERNELS", "0")
    slow = quantize_tensor(x, "int4_ort", 64)
    assert same(fast.data, slow.data) and same(fast.scales, slow.scales)
    assert same(fast.zero_points, slow.zero_points)
    assert same(out_fast, slow.dequantize())
