"""The compiled mse search for fp4_e2m1 / nf4 (`kernels.search_codebook`) equals the NumPy path
(the property test over every matrix kind and the other grids are in test_mse_e2m1_kernel).

Bit for bit (packed codes, scales): every kind of test matrix, float16 and bfloat16 input, block
sizes that are and are not multiples of 16 (and 1), padded last blocks, other ratio grids (more
than the 16 candidates of one pass) and clip ratios, subnormal blocks (nf4: 1/scale overflows),
float32's largest values, near-ties of the encoders' division / reciprocal, any thread count.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _matrices import matrix, same_bytes
from quantize import quantize_tensor
from quantize.algorithms import get_method
from quantize.algorithms.mse import MSESearch, search_error
from quantize.formats import get_format
from test_mse_e2m1_kernel import _check

pytest.importorskip("numba")

FORMATS = ["fp4_e2m1", "nf4"]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


@pytest.mark.parametrize("fmt", FORMATS)
def test_extremes_subnormals_and_near_ties(fmt):
    """float32's largest values, subnormal blocks (nf4's 1/scale overflows there; fp4's scale
    is nudged by `_cover`), all-zero blocks, and elements one ulp around the codes' midpoints
    at the candidate scales, where x * (1/s) and x / s can round to different codes."""
    big = np.float32(3.4028235e38)
    rows = [
        [big, -big, 1.0, 2.0**127],
        [1e-45, -1e-45, 0.0, 1e-45],
        [2.0**-126, 2.0**-127, 0.0, 3e-39],
        [0.0, -0.0, 0.0, 0.0],
        [4.0, 6.0, 7.0, 8.0],
        [3.0, -5.0, 5.0, 6.5],
    ]
    x = np.array([r * 8 for r in rows], np.float32)
    for bs in (4, 16, 32, 3, 1):
        _check(get_method("mse"), fmt, x, bs)
    rng = np.random.default_rng(7)
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] if fmt == "fp4_e2m1" else _nf4_mids()
    amax = np.float32(6.0 if fmt == "fp4_e2m1" else 1.0) * np.float32(1.37)
    ratios = np.asarray(get_method("mse").ratios(), np.float32)
    f = get_format(fmt)
    y = np.empty((8, 32), np.float32)
    for i in range(8):
        s = f.choose_params(np.array([[[amax]]], np.float32), float(ratios[rng.integers(21)]))[0]
        v = np.float32(rng.choice(mids, 31)) * s.reshape(())
        v = np.nextafter(v, np.float32(rng.choice([-1, 1]) * np.inf)) * rng.choice([-1, 1], 31)
        y[i] = np.concatenate([[amax], v]).astype(np.float32)
    for bs in (32, 16, 7):
        _check(get_method("mse"), fmt, y, bs)


def _nf4_mids():
    from quantize.formats.nf4 import NF4_MIDPOINTS

    return NF4_MIDPOINTS.astype(np.float32).tolist()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("where", ["normal", "tiny", "huge"])
def test_candidate_errors_are_exact(fmt, where):
    """Each candidate's score is `squared_error`'s bit for bit, also on elements one ulp
    around a code midpoint at that scale (the encoders' division / reciprocal decides those),
    for 1..40 scales (one to three passes of 16 lanes), and scales whose reciprocal
    overflows or lies outside the corrected reciprocal's range (divided instead)."""
    from quantize.algorithms.mse import squared_error
    from quantize.kernels import search_codebook as sc

    nf4 = fmt == "nf4"
    mids = np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] if fmt == "fp4_e2m1" else _nf4_mids())
    rng = np.random.default_rng(3)
    f = get_format(fmt)
    e0 = {"normal": -4, "tiny": -140, "huge": 60}[where]
    for m in (1, 5, 16, 17, 32, 40):
        s = np.float32(2.0 ** rng.uniform(e0 - 2, e0 + 2, m))
        if where == "huge":
            s = np.minimum(s, np.float32(3e38 / 6.5))
        pick = rng.integers(m, size=61)
        x = mids[rng.integers(mids.size, size=61)] * s[pick]
        x = np.nextafter(x, np.float32(np.inf) * rng.choice([-1, 1], 61).astype(np.float32))
        x = (x * rng.choice([-1, 1], 61)).astype(np.float32)
        got = sc.candidate_errors(x, s, nf4)
        want = squared_error(f, np.broadcast_to(x, (m, 61))[:, None], s[:, None], None)[:, 0]
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_core_dispatch_threads_and_half_input(fmt, monkeypatch):
    """Large enough for the core to take the kernel; the same bytes as with the kernels off,
    for any thread count, bfloat16 input and another axis."""
    from quantize import kernels

    x = matrix("student-t", 11, 128, 2100)  # 268,800 elements: a padded last block at 32
    assert kernels.wanted(get_format(fmt), np.float32, x.size)
    on = quantize_tensor(x, fmt, 32, method="mse")
    monkeypatch.setenv("QUANTIZE_KERNELS", "0")
    off = quantize_tensor(x, fmt, 32, method="mse")
    b16 = x.astype(ml_dtypes.bfloat16)
    off16 = quantize_tensor(b16, fmt, 32, clip_ratio=0.8, method="mse")
    monkeypatch.delenv("QUANTIZE_KERNELS")
    assert same_bytes(on.data, off.data) and same_bytes(on.scales, off.scales)
    on16 = quantize_tensor(b16, fmt, 32, clip_ratio=0.8, method="mse")
    assert same_bytes(on16.data, off16.data) and same_bytes(on16.scales, off16.scales)
    m = get_method("mse")
    one = m.quantize_rows(fmt, x, 32, num_threads=1)
    two = m.quantize_rows(fmt, x, 32, num_threads=2)
    assert all(same_bytes(a, b) for a, b in zip(one, two, strict=True))
    t = quantize_tensor(x.T, fmt, 32, axis=0, method="mse")
    assert same_bytes(t.data, on.data) and same_bytes(t.scales, on.scales)


def test_nf4_dq_still_searches_on_numpy(monkeypatch):
    """nf4_dq (double-quantized scales) has no kernel: the core's answer is the NumPy path's."""
    assert "nf4_dq" not in get_method("mse").kernel_formats
    x = matrix("normal", 3, 64, 2100)
    on = quantize_tensor(x, "nf4_dq", 64, method="mse")
    monkeypatch.setenv("QUANTIZE_KERNELS", "0")
    off = quantize_tensor(x, "nf4_dq", 64, method="mse")
    assert same_bytes(on.data, off.data)
    assert np.array_equal(on.dequantize(np.float32), off.dequantize(np.float32))


def test_weighted_objectives_stay_on_numpy():
    m = MSESearch(dc_weight=1.0)
    for fmt in FORMATS:
        assert fmt not in m.kernel_formats
        with pytest.raises(ValueError, match="no mse kernel"):
            m.quantize_rows(fmt, np.ones((1, 32), np.float32), 32)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 70),
    spread=st.sampled_from([1.0, 10.0, 1e3, 1e-30]),
    ratio=st.floats(1e-3, 1.2),
)
def test_clip_bound_is_below_the_error(fmt, seed, n, spread, ratio):
    """The bound that lets the search skip a pass of candidates never exceeds a candidate's
    error (as the NumPy path computes it): heavy clipping, outliers, tiny values."""
    from quantize.kernels.search_codebook import clip_bound

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.standard_normal(n) * np.log(spread + 1)))
    x = (x * spread).astype(np.float32)
    amax = np.float32(np.abs(x).max())
    f = get_format(fmt)
    top = 6.0 if fmt == "fp4_e2m1" else 1.0
    scale = np.float32(max(float(amax) * ratio / top, 1e-38))
    err = search_error(f, x[None, None], np.array([[scale]], np.float32), None, dc_weight=0.0)
    assert err[0, 0] >= clip_bound(amax, top, scale)
