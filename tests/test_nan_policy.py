"""quantize_tensor(..., nan=...): "raise" names the first bad index; "zero" replaces NaN by 0 and
+-Inf by its block's finite max / min, the same way on every path (kernels and NumPy)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize import quantize_tensor
from quantize._checks import replace_nonfinite
from quantize.kernels import MIN_KERNEL_ELEMENTS


def slow_replace(x: np.ndarray, bs: int, axis: int) -> np.ndarray:
    """The rule, one block at a time, in float64."""
    moved = np.moveaxis(np.asarray(x, np.float64), axis, -1).copy()
    n = moved.shape[-1]
    for row in moved.reshape(-1, n):
        for s in range(0, n, bs):
            blk = row[s : s + bs]
            fin = blk[np.isfinite(blk)]
            hi, lo = (fin.max(), fin.min()) if fin.size else (0.0, 0.0)
            blk[np.isnan(blk)] = 0.0
            blk[np.isposinf(blk)] = hi
            blk[np.isneginf(blk)] = lo
    return np.moveaxis(moved, -1, axis).astype(x.dtype)


def same_qt(a, b) -> None:
    assert a.format == b.format and a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a.data, b.data)
    assert a.scales.dtype == b.scales.dtype
    assert np.array_equal(a.scales.view(np.uint8), b.scales.view(np.uint8))
    if a.zero_points is None:
        assert b.zero_points is None
    else:
        assert np.array_equal(a.zero_points, b.zero_points)


def test_raise_is_the_default_and_names_argument_and_index():
    x = np.zeros((3, 8), np.float32)
    x[2, 5] = np.inf
    x[2, 6] = np.nan
    msg = r"array contains a non-finite value \(inf\) at index \(2, 5\)"
    with pytest.raises(ValueError, match=msg):
        quantize_tensor(x, "int4", 4)
    with pytest.raises(ValueError, match=r"index \(2, 5\)"):
        quantize_tensor(x, "int4", 4, nan="raise")


@pytest.mark.parametrize("bad", ["Zero", "propagate", "", "clip"])
def test_unknown_policy_is_a_value_error_naming_nan(bad):
    with pytest.raises(ValueError, match="nan must be one of"):
        quantize_tensor(np.ones(4, np.float32), nan=bad)


@pytest.mark.parametrize("bad", [None, 0, True, np.nan])
def test_policy_must_be_a_string(bad):
    with pytest.raises(TypeError, match="nan must be one of"):
        quantize_tensor(np.ones(4, np.float32), nan=bad)


def test_known_answer():
    nan, inf = np.nan, np.inf
    x = np.array([[1.0, nan, inf, -2.0, 0.5, inf], [3.0, -inf, nan, nan, -inf, 4.0]], np.float32)
    want = np.array([[1.0, 0.0, -2.0, -2.0, 0.5, 0.5], [3.0, 3.0, 0.0, 0.0, 4.0, 4.0]], np.float32)
    got = replace_nonfinite(x, 2, 1)
    assert np.array_equal(got, want)
    assert np.isnan(x[0, 1])  # the input is left alone
    same_qt(quantize_tensor(x, "int4", 2, nan="zero"), quantize_tensor(want, "int4", 2))


def test_finite_input_is_not_copied():
    x = np.ones((4, 6), np.float32)
    assert replace_nonfinite(x, 3, 1) is x


def test_inf_does_not_inflate_the_scale():
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    x[10] = np.inf
    qt = quantize_tensor(x, "int4", 64, nan="zero")
    assert qt.scales[0] == np.float32(1.0) / np.float32(7.0)
    out = qt.dequantize()
    fin = np.isfinite(x)
    assert np.all(np.abs(out[fin] - x[fin]) <= qt.scales[0] / 2 * (1 + 1e-6))
    assert out[10] == out.max()


@pytest.mark.parametrize("axis", [0, 1, None])
@pytest.mark.parametrize("bs", [3, 4, 16, None])
def test_axes_and_padded_blocks_follow_the_core_blocking(axis, bs):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 10)).astype(np.float32)
    x.flat[rng.choice(x.size, 9, replace=False)] = rng.choice([np.nan, np.inf, -np.inf], 9)
    flat = x.reshape(-1) if axis is None else x
    ax = 0 if axis is None else axis
    n = flat.shape[ax]
    want = slow_replace(flat, n if bs is None else bs, ax).reshape(x.shape)
    for fmt in ("int4", "uint4", "nf4", "int4_affine"):
        same_qt(quantize_tensor(x, fmt, bs, axis, nan="zero"), quantize_tensor(want, fmt, bs, axis))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_other_dtypes(dtype):
    x = np.array([[1.5, np.nan, -np.inf, 2.0], [np.inf, np.inf, 0.25, -1.0]], np.float32)
    x = x.astype(dtype)
    got = replace_nonfinite(x, 2, 1)
    assert got.dtype == x.dtype
    want = np.array([[1.5, 0.0, 2.0, 2.0], [0.0, 0.0, 0.25, -1.0]], np.float32).astype(dtype)
    assert np.array_equal(got.astype(np.float64), want.astype(np.float64))


def test_integers_pass_through():
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert replace_nonfinite(x, 2, 1) is x
    quantize_tensor(x, "int4", 2, nan="zero")


@pytest.mark.parametrize("fmt", ["int4", "uint4", "nf4", "fp4_e2m1", "nvfp4", "int4_ort"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kernels_and_numpy_agree_under_the_policy(fmt, dtype, monkeypatch):
    rows = MIN_KERNEL_ELEMENTS // 256 + 3
    rng = np.random.default_rng(7)
    x = rng.standard_normal((rows, 256)).astype(dtype)
    idx = rng.choice(x.size, 500, replace=False)
    x.flat[idx] = rng.choice([np.nan, np.inf, -np.inf], idx.size)
    x[5, :64] = np.inf  # a whole block with no finite value
    monkeypatch.setenv("QUANTIZE_KERNELS", "1")
    fast = quantize_tensor(x, fmt, 64, nan="zero")
    monkeypatch.setenv("QUANTIZE_KERNELS", "0")
    slow = quantize_tensor(x, fmt, 64, nan="zero")
    same_qt(fast, slow)
    assert np.isfinite(fast.dequantize().astype(np.float32)).all()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 40),
    bs=st.integers(1, 17),
    seed=st.integers(0, 2**32 - 1),
    share=st.floats(0, 1),
)
def test_policy_equals_the_slow_rule(rows, n, bs, seed, share):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
    mask = rng.random(x.shape) < share
    x[mask] = rng.choice([np.nan, np.inf, -np.inf], int(mask.sum()))
    want = slow_replace(x, bs, 1)
    got = replace_nonfinite(x, bs, 1)
    assert np.array_equal(got, want)
    assert np.isfinite(got).all()
    same_qt(quantize_tensor(x, "uint4", bs, nan="zero"), quantize_tensor(want, "uint4", bs))
