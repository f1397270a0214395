"""Data-free methods "mse" and "hqq": never worse than round to nearest on their objective.

hqq's objective is a block's squared error as `mse.squared_error` computes it (decoded in the
compute dtype, squares and sum in float64, padding not scored); mse's is `mse.search_error`, that
plus dc_weight times the square of the error's sum plus gain_weight times its gain term. Property
tests run every
registered format on random, heavy-tailed, odd-length, all-zero and constant data; the mse
kernel is held to its NumPy twin bit for bit and to thread-count independence.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _matrices import matrix, same_bytes
from quantize import quantize_tensor
from quantize.algorithms import available_methods, get_method
from quantize.algorithms.hqq import HalfQuadratic, shrink_lp
from quantize.algorithms.mse import (
    MSE,
    MSESearch,
    block_sse,
    gain_factor,
    ratio_grid,
    search_error,
    squared_error,
)
from quantize.blocking import n_blocks, to_blocks
from quantize.formats import available_formats, get_format

# nf4_dq double-quantizes the scales a method picks afterwards (core._DoubleQuantScales), so
# the per-block guarantee is about its first-level scales; it has its own, whole-tensor test
FORMATS = [f for f in available_formats() if not getattr(get_format(f), "double_quant", False)]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def per_block_sse(
    fmt_name: str, x: np.ndarray, qt, dc_weight: float = 0.0, gain_weight: float = 0.0
) -> np.ndarray:
    """The objective of each block of x (rows, n) under qt's parameters (mse's with the
    weights)."""
    fmt = get_format(fmt_name)
    bs, n = qt.block_size, x.shape[-1]
    dt = np.float64 if x.dtype == np.float64 else np.float32
    blocks = to_blocks(x.astype(dt), bs, -1)
    pad = n_blocks(n, bs) * bs - n
    valid = bs - pad if pad else None
    return search_error(
        fmt, blocks, qt.scales, qt.zero_points, qt.tensor_scale, valid, dc_weight, gain_weight
    )


KINDS = ["normal", "student-t", "zeros", "constant", "sparse", "tiny"]


# --------------------------------------------------------------------------- registry, options


def test_registered():
    assert {"rtn", "mse", "hqq"} <= set(available_methods())
    assert get_method("MSE").name == "mse"
    assert isinstance(get_method("hqq"), HalfQuadratic)


@pytest.mark.parametrize(
    "make, exc, word",
    [
        (lambda: MSESearch(steps=0), ValueError, "steps"),
        (lambda: MSESearch(steps=2.5), TypeError, "steps"),
        (lambda: MSESearch(lowest=0), ValueError, "lowest"),
        (lambda: MSESearch(lowest="0.5"), TypeError, "lowest"),
        (lambda: MSESearch(dc_weight=-1), ValueError, "dc_weight"),
        (lambda: MSESearch(dc_weight=float("inf")), ValueError, "dc_weight"),
        (lambda: MSESearch(dc_weight="1"), TypeError, "dc_weight"),
        (lambda: MSESearch(gain_weight=-0.5), ValueError, "gain_weight"),
        (lambda: MSESearch(gain_weight=float("nan")), ValueError, "gain_weight"),
        (lambda: MSESearch(gain_weight=True), TypeError, "gain_weight"),
        (lambda: HalfQuadratic(iterations=-1), ValueError, "iterations"),
        (lambda: HalfQuadratic(iterations=True), TypeError, "iterations"),
        (lambda: HalfQuadratic(p=1.5), ValueError, "p"),
        (lambda: HalfQuadratic(beta=0), ValueError, "beta"),
        (lambda: HalfQuadratic(kappa=0.5), ValueError, "kappa"),
        (lambda: HalfQuadratic(update_scale=1), TypeError, "update_scale"),
        (lambda: get_method("mse2"), ValueError, "mse2"),
        (lambda: MSESearch().quantize_rows("nf4_dq", np.ones((2, 4), np.float32), 4), ValueError,
         "nf4_dq"),
    ],
)  # fmt: skip
def test_bad_options_are_named(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


def test_grid():
    g = ratio_grid(0.8, 5, 0.5)
    assert g[0] == 0.8 and np.isclose(g[-1], 0.4) and g == sorted(g, reverse=True)
    assert ratio_grid(1.0, 1) == [1.0]


def test_search_error_adds_the_error_sum():
    fmt = get_format("int4")
    x = np.array([[[0.05, 0.3, 0.7, -0.2]]], np.float32)
    s = np.array([[0.1]], np.float32)  # codes 0 (a tie, to even), 3, 7, -2
    e = np.array([0.0, 0.3, 0.7, -0.2], np.float32).astype(np.float64) - x[0, 0].astype(np.float64)
    assert squared_error(fmt, x, s, None)[0, 0] == search_error(fmt, x, s, None, dc_weight=0)
    want = block_sse(e * e) + 2.5 * block_sse(e) ** 2
    assert search_error(fmt, x, s, None, dc_weight=2.5)[0, 0] == want
    # the last block's padding is in neither sum
    assert search_error(fmt, x, s, None, last_valid=1, dc_weight=3.0)[0, 0] == 4.0 * e[0] ** 2


def test_search_error_adds_the_gain_term():
    fmt = get_format("int4")
    x = np.array([[[0.05, 0.3, 0.7, -0.2], [0.0, 0.0, 0.0, 0.0]]], np.float32)
    s = np.array([[0.1, 0.1]], np.float32)
    x64 = x[0, 0].astype(np.float64)
    e = np.array([0.0, 0.3, 0.7, -0.2], np.float32).astype(np.float64) - x64
    g = 4 * 0.5 / block_sse(x64 * x64)  # n * gain_weight / sum(x^2)
    assert gain_factor(x, None, 0.5)[0, 0] == g and gain_factor(x, None, 0.5)[0, 1] == 0
    want = block_sse(e * e) + 2.0 * block_sse(e) ** 2 + g * block_sse(e * x64) ** 2
    got = search_error(fmt, x, s, None, dc_weight=2.0, gain_weight=0.5)
    assert got[0, 0] == want and got[0, 1] == 0  # a block of zeros: no error, no gain term
    # padding counts in neither n nor the sums: a one-element block's gain term is e^2 g
    one = search_error(fmt, x[:, :1], s[:, :1], None, last_valid=1, dc_weight=0.0, gain_weight=1.0)
    assert np.isclose(one[0, 0], 2 * e[0] ** 2, rtol=1e-12) and e[0] != 0


def test_gain_term_keeps_the_gain():
    # uint4 mse's default objective: the stored blocks keep their scalar product with x (the
    # "gain"), whereas plain squared error shrinks ranges and loses some of it (module docstring)
    x = np.random.default_rng(4).standard_t(4, (128, 512)).astype(np.float32)

    def lost_gain(m):
        d = quantize_tensor(x, "uint4", 128, method=m).dequantize(np.float64) - x
        return float(np.abs((d * x).reshape(128, 4, 128).sum(-1)).mean())

    plain = MSESearch(dc_weight=0.0, gain_weight=0.0)
    assert lost_gain("mse") < 0.8 * lost_gain(plain)
    assert MSE.gain_weight_for("uint4") == 1.0 and MSE.gain_weight_for("int4") == 0.0


def test_block_sse_is_sequential():
    e = np.array([[1e16, 1.0, -1e16, 1.0]])
    assert block_sse(e)[0] == ((1e16 + 1.0) + -1e16) + 1.0


def test_shrink_lp():
    x = np.array([-2.0, -0.1, 0.0, 0.05, 0.3, 5.0])
    y = shrink_lp(x, 10.0, 0.7)
    assert np.all(np.abs(y) <= np.abs(x)) and np.all(y * x >= 0)
    assert y[2] == 0 and y[1] == 0 and y[3] == 0  # below beta^(-1/(2-p)) ~ 0.17: zeroed
    assert y[-1] > 4.9


# --------------------------------------------------------------------------- never worse than rtn


@pytest.mark.parametrize("method", ["mse", "hqq"])
@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 3),
    n=st.integers(1, 70),
    bs=st.sampled_from([1, 3, 8, 16, 32]),
    clip=st.sampled_from([1.0, 1.0, 0.9]),
)
def test_never_worse_than_rtn(method, fmt, kind, seed, rows, n, bs, clip):
    x = matrix(kind, seed, rows, n)
    if fmt == "nvfp4" and kind == "tiny":
        x = x * np.float32(2.0**100)  # nvfp4's tensor scale needs a float32-normal amax / 2688
    rtn = quantize_tensor(x, fmt, bs, clip_ratio=clip)
    got = quantize_tensor(x, fmt, bs, clip_ratio=clip, method=method)
    dc = MSE.dc_weight_for(fmt) if method == "mse" else 0.0
    gain = MSE.gain_weight_for(fmt) if method == "mse" else 0.0
    e_rtn, e_got = per_block_sse(fmt, x, rtn, dc, gain), per_block_sse(fmt, x, got, dc, gain)
    assert np.all(e_got <= e_rtn), (e_got - e_rtn).max()
    d_rtn = ((rtn.dequantize(np.float64) - x) ** 2).sum()
    d_got = ((got.dequantize(np.float64) - x) ** 2).sum()
    if method == "hqq":  # and the stored tensor says the same, to dequantization's rounding
        assert d_got <= d_rtn * (1 + 1e-5) + 1e-300
    if kind == "zeros":
        assert d_got == 0


@pytest.mark.parametrize("method", ["mse", "hqq"])
@pytest.mark.parametrize("fmt", ["int4", "uint4", "nf4", "int4_affine", "mxfp4", "nvfp4"])
def test_float64_and_other_axes(method, fmt):
    x = matrix("student-t", 7, 6, 50, np.float64).reshape(6, 5, 10)
    # mse with plain squared error, so that the whole tensor's error can be compared
    m = MSESearch(dc_weight=0.0, gain_weight=0.0) if method == "mse" else method
    for axis in (0, 1, -1):
        rtn = quantize_tensor(x, fmt, 4, axis=axis)
        got = quantize_tensor(x, fmt, 4, axis=axis, method=m)
        assert got.scales.dtype == rtn.scales.dtype and got.scales.shape == rtn.scales.shape
        e_rtn = ((rtn.dequantize(np.float64) - x) ** 2).sum()
        e_got = ((got.dequantize(np.float64) - x) ** 2).sum()
        assert e_got <= e_rtn * (1 + 1e-9)


# --------------------------------------------------------------------------- measurable gains


def _sqnr(x, qt) -> float:
    x64 = x.astype(np.float64)
    return float(10 * np.log10((x64**2).sum() / ((qt.dequantize(np.float64) - x64) ** 2).sum()))


@pytest.mark.parametrize("fmt, method, gain", [
    ("int4", "mse", 0.5), ("uint4", "mse", 0.1), ("nf4", "mse", 0.2), ("fp4_e2m1", "mse", 0.2),
    ("nvfp4", "mse", 0.2), ("uint4_float_zp", "hqq", 0.2), ("int4_affine", "hqq", 0.2),
    ("nf4_dq", "mse", 0.2), ("mxfp4", "mse", 0.2), ("mxfp4_ceil", "mse", 0.2),
])  # fmt: skip
def test_heavy_tails_gain(fmt, method, gain):
    x = np.random.default_rng(3).standard_t(4, (256, 512)).astype(np.float32)
    bs = 16 if fmt == "nvfp4" else 32
    base = _sqnr(x, quantize_tensor(x, fmt, bs))
    # plain squared error (dc_weight, gain_weight 0): the other terms trade some SQNR for
    # smaller systematic errors
    m = MSESearch(dc_weight=0.0, gain_weight=0.0) if method == "mse" else method
    assert _sqnr(x, quantize_tensor(x, fmt, bs, method=m)) >= base + gain


@SETTINGS
@given(kind=st.sampled_from([*KINDS, "huge"]), seed=st.integers(0, 2**32 - 1))
def test_mxfp4_search_takes_the_better_exponent_per_block(kind, seed):
    """mxfp4's search widens too (`search_widen`): per block it is no worse than the spec's
    floor rule and than the ceil rule (2^(e+1) where the floor rule clips)."""
    x = matrix(kind, seed, 4, 96)
    got = per_block_sse("mxfp4", x, quantize_tensor(x, "mxfp4", 32, method="mse"))
    for rule in ("mxfp4", "mxfp4_ceil"):
        assert np.all(got <= per_block_sse("mxfp4", x, quantize_tensor(x, rule, 32)))


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(
    kind=st.sampled_from([*KINDS, "huge"]),
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 3),
    n=st.integers(1, 70),
    bs=st.sampled_from([1, 3, 16, 32]),
    weights=st.sampled_from([(0.0, 0.0), (1.0, 1.0), (0.5, 0.0)]),
)
def test_exact_pick_scores_only_changed_blocks_thesame_bytes(fmt, kind, seed, rows, n, bs, weights):
    """`_pick_exact` (which re-scores only blocks whose params changed) picks what scoring
    every candidate on every block picks."""
    from quantize.algorithms.mse import _pick_exact

    f = get_format(fmt)
    x = to_blocks(matrix(kind, seed, rows, n), bs, -1)
    pad = n_blocks(n, bs) * bs - n
    valid = bs - pad if pad else None
    ts = f.tensor_scale(x)
    cands = [f.choose_params(x, r) for r in [*MSE.ratios(), *f.search_widen]]
    s = np.stack([c[0] for c in cands])
    z = None if cands[0][1] is None else np.stack([c[1] for c in cands])
    errs = np.stack(
        [
            search_error(f, x, s[k], None if z is None else z[k], ts, valid, *weights)
            for k in range(len(cands))
        ]
    )
    errs[np.isnan(errs)] = np.inf
    got = _pick_exact(f, x, s, z, ts, valid, *weights)
    assert np.array_equal(got, np.argmin(errs, axis=0))


# --------------------------------------------------------------------------- the kernel


# None: the default objective; (0, 0): plain squared error; (1.5, 0.25): both terms, any format
@pytest.mark.parametrize("weights", [None, (0.0, 0.0), (1.5, 0.25)])
@pytest.mark.parametrize("fmt", ["int4", "uint4"])
@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from([*KINDS, "huge"]),
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 5),
    n=st.integers(1, 90),
    bs=st.sampled_from([1, 2, 5, 8, 16, 32, 33, 64, None]),
    clip=st.sampled_from([1.0, 0.7, 1e-3]),
)
def test_kernel_equals_numpy(fmt, weights, kind, seed, rows, n, bs, clip):
    pytest.importorskip("numba")
    if kind == "huge":
        x = (matrix("normal", seed, rows, n).astype(np.float64) * 1e38).clip(-3.4e38, 3.4e38)
        x = x.astype(np.float32)
    else:
        x = matrix(kind, seed, rows, n)
    if weights is None:
        m = get_method("mse")
    else:
        m = MSESearch(dc_weight=weights[0], gain_weight=weights[1])
    got = m.quantize_rows(fmt, x, bs, clip)
    want = quantize_tensor(x, fmt, bs, clip_ratio=clip, method=m)  # small: the NumPy path
    assert same_bytes(got[0], want.data) and same_bytes(got[1], want.scales)
    assert same_bytes(got[2], want.zero_points)


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
def test_kernel_dispatch_threads_and_half_input(fmt, monkeypatch):
    pytest.importorskip("numba")
    from quantize import kernels

    x = matrix("student-t", 11, 300, 1000)  # 300k elements: above the kernels' threshold
    assert kernels.wanted(get_format(fmt), np.float32, x.size)
    on = quantize_tensor(x, fmt, 32, method="mse")
    monkeypatch.setenv("QUANTIZE_KERNELS", "0")
    off = quantize_tensor(x, fmt, 32, method="mse")
    monkeypatch.delenv("QUANTIZE_KERNELS")
    assert same_bytes(on.data, off.data) and same_bytes(on.scales, off.scales)
    assert same_bytes(on.zero_points, off.zero_points)
    m = get_method("mse")
    one = m.quantize_rows(fmt, x, 32, num_threads=1)
    two = m.quantize_rows(fmt, x, 32, num_threads=2)
    assert all(same_bytes(a, b) for a, b in zip(one, two, strict=True))
    h = x[:4].astype(np.float16)
    got, want = m.quantize_rows(fmt, h, 32), m.quantize_rows(fmt, h.astype(np.float32), 32)
    assert all(same_bytes(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("fmt", ["uint4", "uint8", "int4_ort"])
def test_hqq_integer_zero_points_stay_valid(fmt):
    x = matrix("student-t", 5, 64, 256)
    f = get_format(fmt)
    qt = quantize_tensor(x, fmt, 32, method="hqq")
    rtn = quantize_tensor(x, fmt, 32)
    assert qt.zero_points.dtype == np.uint8
    assert f.code_min <= qt.zero_points.min() and qt.zero_points.max() <= f.code_max
    if fmt == "int4_ort":  # the zero point only carries the sign of the block's extreme
        assert np.array_equal(qt.zero_points, rtn.zero_points)
    assert np.all(qt.scales > 0) and np.all(np.isfinite(qt.scales))
