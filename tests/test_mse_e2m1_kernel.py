"""The compiled mse search for mxfp4 / mxfp4_ceil / nvfp4 (`kernels.search_e2m1`), and for
fp4_e2m1 / nf4 (`kernels.search_codebook`) in the property, grid and never-worse tests, equals
the NumPy path.

Bit for bit (packed codes, scales): every kind of test matrix (heavy tails, ties, all-zero,
subnormal, near float32's largest, where the widened candidate's amax * 2 overflows), float16
and bfloat16 input, block sizes that are and are not multiples of 16, padded last blocks, other
ratio grids and clip ratios, any thread count. Objectives other than plain squared error
(dc_weight or gain_weight > 0) stay on the NumPy path.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _matrices import MATRIX_KINDS, matrix, same_bytes
from quantize import quantize_tensor
from quantize.algorithms import get_method
from quantize.algorithms.mse import MSESearch
from quantize.formats import get_format

pytest.importorskip("numba")

FORMATS = ["mxfp4", "mxfp4_ceil"]
#: the float-scale formats of `kernels.search_codebook` (their own tests: test_mse_codebook_kernel)
CODEBOOK = ["fp4_e2m1", "nf4"]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
GRIDS = {
    "steps5-lowest0.3": MSESearch(steps=5, lowest=0.3),
    "steps1": MSESearch(steps=1),
    "steps40-lowest0.05": MSESearch(steps=40, lowest=0.05),
    "weights0": MSESearch(dc_weight=0.0, gain_weight=0.0),
}


def _check(method, fmt, x, bs, clip=1.0):
    """The kernel's (packed, scales) equal the NumPy path's (a small x stays on it)."""
    got = method.quantize_rows(fmt, x, bs, clip)
    want = quantize_tensor(x, fmt, bs, clip_ratio=clip, method=method)
    assert same_bytes(got[0], want.data) and same_bytes(got[1], want.scales)
    assert got[2] is None and want.zero_points is None
    if fmt == "nvfp4":
        assert got.tensor_scale == want.tensor_scale
    else:
        assert got.tensor_scale is None and want.tensor_scale is None


@pytest.mark.parametrize("fmt", [*FORMATS, "nvfp4", *CODEBOOK])
@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(MATRIX_KINDS),
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 4),
    n=st.integers(1, 140),
    bs=st.sampled_from([32, 16, 64, 8, 33, 1, 48, None]),
    dtype=st.sampled_from(DTYPES),
    clip=st.sampled_from([1.0, 1.0, 0.7, 1e-3]),
)
def test_kernel_equals_numpy(fmt, kind, seed, rows, n, bs, dtype, clip):
    x = matrix(kind, seed, rows, n)
    if dtype is not np.float32:  # (kept finite in the narrower type)
        lim = 6e4 if dtype is np.float16 else 3.3e38
        x = np.clip(x, -lim, lim).astype(dtype)
    _check(get_method("mse"), fmt, x, bs, clip)


@pytest.mark.parametrize("fmt", [*FORMATS, *CODEBOOK])
@pytest.mark.parametrize("search", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (NumPy path, huge)
@pytest.mark.parametrize("kind", ["normal", "student-t", "ties", "huge", "tiny"])
def test_other_grids_equal_numpy(fmt, search, kind):
    """Any ratio grid is searched exactly: the distinct exponents of all its ratios (a grid
    down to 0.05 gives more than three per block); for fp4_e2m1 / nf4 1, 5 and 40 scales (one
    to three passes of 16 lanes)."""
    assert fmt in search.kernel_formats
    x = matrix(kind, 5, 6, 200)
    for bs in (32, 33, 16):
        _check(search, fmt, x, bs)
        _check(search, fmt, x, bs, 0.6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_widening_overflow_and_extremes(fmt):
    """Blocks whose amax * 2 overflows float32 (the NumPy path's exponent for an inf amax),
    float32's largest and smallest values, exact powers of two, all-zero blocks."""
    big = np.float32(3.4028235e38)
    rows = [
        [big, -big, 1.0, 2.0**127],
        [2.0**127, 1.5 * 2.0**127, -3.5 * 2.0**126, 0.0],
        [1e-45, -1e-45, 0.0, 1e-45],
        [2.0**-126, 2.0**-127, 0.0, 0.0],
        [0.0, -0.0, 0.0, 0.0],
        [4.0, 6.0, 7.0, 8.0],
        [3.0, -5.0, 5.0, 6.5],
        [1.75, 3.5, 7.0, 14.0],
    ]
    x = np.array([r * 8 for r in rows], np.float32)
    for bs in (4, 16, 32, 3):
        _check(get_method("mse"), fmt, x, bs)


def test_objectives_with_weights_stay_on_numpy(monkeypatch):
    """dc_weight or gain_weight > 0 on MX: no kernel (core dispatch and quantize_rows), and the
    core's answer is the NumPy path's."""
    for m in (MSESearch(dc_weight=1.0), MSESearch(gain_weight=0.5)):
        assert "mxfp4" not in m.kernel_formats and "mxfp4_ceil" not in m.kernel_formats
        assert "int4" in m.kernel_formats
        with pytest.raises(ValueError, match="no mse kernel"):
            m.quantize_rows("mxfp4", np.ones((1, 32), np.float32), 32)
    assert "mxfp4" in get_method("mse").kernel_formats
    # large enough for a kernel: the core still answers by the NumPy path
    x = matrix("normal", 2, 128, 2100)
    m = MSESearch(dc_weight=1.0)
    on = quantize_tensor(x, "mxfp4", 32, method=m)
    monkeypatch.setenv("QUANTIZE_KERNELS", "0")
    off = quantize_tensor(x, "mxfp4", 32, method=m)
    assert same_bytes(on.data, off.data) and same_bytes(on.scales, off.scales)


@pytest.mark.parametrize("fmt", FORMATS)
def test_core_dispatch_threads_and_half_input(fmt, monkeypatch):
    """Large enough for the core to take the kernel (`kernels.wanted`); the same bytes as with
    the kernels off, for any thread count and float16 input."""
    from quantize import kernels

    x = matrix("student-t", 11, 128, 2100)  # 268,800 elements: a padded last block at 32
    assert kernels.wanted(get_format(fmt), np.float32, x.size)
    assert x.size >= kernels.MIN_KERNEL_ELEMENTS
    on = quantize_tensor(x, fmt, 32, method="mse")
    monkeypatch.setenv("QUANTIZE_KERNELS", "0")
    off = quantize_tensor(x, fmt, 32, method="mse")
    monkeypatch.delenv("QUANTIZE_KERNELS")
    assert same_bytes(on.data, off.data) and same_bytes(on.scales, off.scales)
    m = get_method("mse")
    one = m.quantize_rows(fmt, x, 32, num_threads=1)
    two = m.quantize_rows(fmt, x, 32, num_threads=2)
    assert all(same_bytes(a, b) for a, b in zip(one, two, strict=True))
    monkeypatch.setenv("QUANTIZE_NUM_THREADS", "1")
    env = m.quantize_rows(fmt, x, 32)
    assert all(same_bytes(a, b) for a, b in zip(one, env, strict=True))
    monkeypatch.delenv("QUANTIZE_NUM_THREADS")
    h = x[:6].astype(np.float16)
    got, want = m.quantize_rows(fmt, h, 32), m.quantize_rows(fmt, h.astype(np.float32), 32)
    assert all(same_bytes(a, b) for a, b in zip(got, want, strict=True))
    # and along another axis: the core moves it last before the kernel
    t = quantize_tensor(x.T, fmt, 32, axis=0, method="mse")
    assert same_bytes(t.data, on.data) and same_bytes(t.scales, on.scales)


def test_mse_never_worse_than_rtn():
    """The search's own guarantee, through the kernel: per block no more squared error than
    round to nearest (ratio 1 is a candidate and wins ties)."""
    from quantize.algorithms.mse import search_error
    from quantize.blocking import to_blocks

    x = matrix("student-t", 3, 64, 4096)
    for fmt in [*FORMATS, *CODEBOOK]:
        f = get_format(fmt)
        blocks = to_blocks(x, 32, -1)
        got = get_method("mse").quantize_rows(fmt, x, 32)
        rtn, _ = f.choose_params(blocks)
        e_mse = search_error(f, blocks, got[1], None, dc_weight=0.0)
        e_rtn = search_error(f, blocks, rtn, None, dc_weight=0.0)
        assert (e_mse <= e_rtn).all() and (e_mse < e_rtn).mean() > 0.05


@pytest.mark.parametrize("fmt", FORMATS)
def test_widening_past_float32_range(fmt):
    """amax * 2 beyond the dtype's range still gives the exponent one up (float64 input can
    hold 4 * 2^126 = 2^128, so there 2^126 wins for elements at 1.9 * 2^127, which the floor
    rule's 2^125 clips from 7.6 to 6)."""
    f = get_format(fmt)
    blocks = np.array([[[1.9 * 2.0**127] * 32]], np.float32)
    e1 = np.log2(f.choose_params(blocks, 1.0)[0])
    assert np.log2(f.choose_params(blocks, 2.0)[0]) == e1 + 1  # not a wrapped-around exponent
    x = np.full((1, 32), 1.9 * 2.0**127)  # float64
    got = quantize_tensor(x, fmt, 32, method="mse")
    assert np.log2(got.scales[0, 0]) == 126  # floor: 125 -> 126; ceil: 126 already
    err = np.abs(got.dequantize(np.float64) - x).max()
    assert err <= np.abs(quantize_tensor(x, fmt, 32).dequantize(np.float64) - x).max()
    assert np.isfinite(f.choose_params(np.array([[[1e308, 1.0]]]), 2.0)[0]).all()


# --------------------------------------------------------------------------------- nvfp4


@pytest.mark.parametrize("search", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("kind", ["normal", "student-t", "ties", "huge", "tiny", "sparse"])
def test_nvfp4_other_grids_and_e4m3_subnormal_scales(search, kind):
    """Other grids; and blocks far below the tensor's largest (E4M3-subnormal block scales,
    where the nudge of the exact rule fires)."""
    x = matrix(kind, 5, 6, 200)
    x[0, :100] *= np.float32(2.0**-14)  # block scales below 2^-6: E4M3 subnormals
    for bs in (16, 32, 33):
        _check(search, "nvfp4", x, bs)


def test_nvfp4_core_dispatch_threads_and_half_input(monkeypatch):
    from quantize import kernels

    x = matrix("student-t", 12, 128, 2100)
    assert kernels.wanted(get_format("nvfp4"), np.float32, x.size, tensor_scale=True)
    on = quantize_tensor(x, "nvfp4", 16, method="mse")
    monkeypatch.setenv("QUANTIZE_KERNELS", "0")
    off = quantize_tensor(x, "nvfp4", 16, method="mse")
    monkeypatch.delenv("QUANTIZE_KERNELS")
    assert same_bytes(on.data, off.data) and same_bytes(on.scales, off.scales)
    assert on.tensor_scale == off.tensor_scale
    m = get_method("mse")
    one = m.quantize_rows("nvfp4", x, 16, num_threads=1)
    two = m.quantize_rows("nvfp4", x, 16, num_threads=2)
    assert all(same_bytes(a, b) for a, b in zip(one[:3], two[:3], strict=True))
    assert one.tensor_scale == two.tensor_scale
    h = x[:6].astype(np.float16)
    got, want = m.quantize_rows("nvfp4", h, 16), m.quantize_rows("nvfp4", h.astype(np.float32), 16)
    assert all(same_bytes(a, b) for a, b in zip(got[:3], want[:3], strict=True))
    e_mse = ((on.dequantize(np.float64) - x) ** 2).sum()
    e_rtn = ((quantize_tensor(x, "nvfp4", 16).dequantize(np.float64) - x) ** 2).sum()
    assert e_mse < 0.95 * e_rtn


def test_nvfp4_scales_rising_where_raw_underflows():
    """Blocks so far below the tensor's largest that amax * ratio / (6 ts) underflows to 0 for
    the smaller ratios only: the rule's scale 1 there is a rise in the grid's otherwise falling
    scales, which the kernel's scan for distinct scales (it drops repeats of the last one
    only) must keep without changing the answer."""
    f = get_format("nvfp4")
    big = np.float32(2.0**100)
    ts = f.tensor_scale(np.array([[[big]]], np.float32))
    edge = np.float32(2.0**-149) * np.float32(6.0) * np.float32(ts)  # raw(1) at the smallest
    x = np.zeros((2, 16 * 12), np.float32)
    x[0, 0] = big
    for b, k in enumerate([0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 1e3, 1e6, 1e9]):
        x[1, 16 * b : 16 * b + 16] = np.float32(k) * edge * np.linspace(-1, 1, 16, dtype=np.float32)
    blocks = x.reshape(2, 12, 16)
    s_top, s_half = f.choose_params(blocks, 1.0)[0], f.choose_params(blocks, 0.5)[0]
    assert (s_half > s_top).any()  # the rise this test is about
    for search in (get_method("mse"), *GRIDS.values()):
        _check(search, "nvfp4", x, 16)
        _check(search, "nvfp4", x, 32)
