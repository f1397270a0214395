"""quantize_tensor / QuantizedTensor for every registered format, by property.

The layout facts tested here are the ones QuantizedTensor's docstring documents: data is
(*rows, ceil(nb*bs/2)) uint8 for 4-bit formats, low nibble first; scales/zero points are
(*rows, nb); the padding of the last block holds the code of 0.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from _bounds import (
    check_error_bounds,
    code_of_zero,
    compute_dtype,
    expand,
    my_blocks,
    unit_grid,
    work_layout,
)
from quantize import (
    QuantizedTensor,
    available_formats,
    dequantize_tensor,
    get_format,
    quantize_tensor,
)

FORMATS = available_formats()
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = [np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64), BF16]
INT_DTYPES = [np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32)]


def test_registry_has_the_integer_formats():
    assert {"int4", "uint4", "int8", "uint8", "int4_affine"} <= set(FORMATS)
    assert sorted(FORMATS) == FORMATS
    for name in FORMATS:
        fmt = get_format(name)
        assert fmt.name == name and fmt.bits in (4, 8)
        assert fmt.code_min < fmt.code_max


# --------------------------------------------------------------------------- helpers


def limited_range(fmt: str) -> bool:
    """Formats with 8-bit stored scales (E8M0, E4M3 x float32) cover float32's range only."""
    return get_format(fmt).scale_bits is not None


def mirror_symmetric(fmt: str) -> bool:
    """The unit grid is closed under negation, but for at most one point (two's complement)."""
    qt = quantize_tensor(np.linspace(-1, 1, 8, dtype=np.float32), fmt, block_size=8)
    g = set(unit_grid(qt).reshape(-1).tolist())
    return sum(-v not in g for v in g) <= 1


# --------------------------------------------------------------------------- strategies


@st.composite
def shapes(draw, max_size: int = 800):
    ndim = draw(st.integers(1, 4))
    sides, budget = [], max_size
    for _ in range(ndim):
        side = draw(st.integers(1, max(1, min(40, budget))))
        sides.append(side)
        budget //= side
    return tuple(draw(st.permutations(sides)))


# Ranges stay clear of the output dtype's overflow (tested on its own in test_bad_input).
RANGES = {
    np.dtype(np.float16): 3e4,
    np.dtype(np.float32): 1e37,
    BF16: 1e37,
    np.dtype(np.float64): 1e300,
}
EXPONENTS = {
    np.dtype(np.float16): (-7, 3),
    np.dtype(np.float32): (-44, 35),
    BF16: (-40, 35),
    np.dtype(np.float64): (-320, 298),
}


@st.composite
def arrays(draw, dtypes=None, limited=False):
    """limited: magnitudes within float32's range (see limited_range)."""
    dtype = draw(st.sampled_from(dtypes or FLOAT_DTYPES + INT_DTYPES))
    shape = draw(shapes())
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
        return draw(hnp.arrays(dtype, shape, elements=elements))
    if draw(st.booleans()):  # hypothesis' arrays: a fill value and a few chosen elements
        r = min(RANGES[dtype], 1e37) if limited else RANGES[dtype]
        gen = np.float32 if dtype == BF16 else dtype
        width = {2: 16, 4: 32, 8: 64}[np.dtype(gen).itemsize]
        r = float(np.asarray(r, gen))
        elements = st.floats(-r, r, width=width)
        return draw(hnp.arrays(gen, shape, elements=elements)).astype(dtype)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))  # dense data, any magnitude
    lo, hi = EXPONENTS[dtype]
    e = draw(st.integers(lo, min(hi, 35) if limited else hi))
    offset = draw(st.sampled_from([0.0, 0.0, 1.0, -2.0]))
    return ((rng.standard_normal(shape) + offset) * 10.0**e).astype(dtype)


@st.composite
def cases(draw, dtypes=None, limited=False):
    x = draw(arrays(dtypes, limited))
    axis = draw(st.one_of(st.none(), st.integers(-x.ndim, x.ndim - 1)))
    block = draw(st.one_of(st.none(), st.just(-1), st.integers(1, 70)))
    return x, axis, block


def quantize_case(case, fmt):
    x, axis, block = case
    return quantize_tensor(x, fmt, block_size=block, axis=axis)


fmt_param = pytest.mark.parametrize("fmt", FORMATS)


CASES = {f: cases(limited=limited_range(f)) for f in FORMATS}
FLOAT_CASES = {f: cases(dtypes=FLOAT_DTYPES, limited=limited_range(f)) for f in FORMATS}


def draw_case(data, fmt, float_only=False):
    return data.draw((FLOAT_CASES if float_only else CASES)[fmt], label="case")


# --------------------------------------------------------------------------- checks
# Each check is one documented property; the hypothesis tests below run several on the same
# drawn case (drawing a case costs more than checking it).


def check_metadata(case, qt: QuantizedTensor) -> None:
    x, axis, block = case
    f = get_format(qt.format)
    assert isinstance(qt, QuantizedTensor)
    assert qt.shape == x.shape and qt.dtype == x.dtype and qt.size == x.size
    assert qt.axis == (None if axis is None else axis % x.ndim)
    n = x.size if axis is None else x.shape[axis]
    bs = n if block in (None, -1) else block
    assert qt.block_size == bs
    nb = -(-n // bs)
    rows = () if axis is None else tuple(np.delete(np.array(x.shape), axis % x.ndim))
    # scales / zero points: (*rows, nb), in the compute dtype; scales_along_axis: nb at axis
    assert qt.scales.shape == (*rows, nb)
    assert qt.scales.dtype == compute_dtype(x.dtype)
    along = qt.scales_along_axis()
    if axis is None:
        assert along.shape == (nb,)
    else:
        expected = list(x.shape)
        expected[axis] = nb
        assert along.shape == tuple(expected)
        np.testing.assert_array_equal(np.moveaxis(along, axis, -1), qt.scales)
    if f.zero_point is None:
        assert qt.zero_points is None
    else:
        assert qt.zero_points.shape == (*rows, nb)
    # data: uint8, packed two per byte for 4-bit formats
    assert qt.data.dtype == np.uint8
    per_row = math.ceil(nb * bs / 2) if f.bits == 4 else nb * bs
    assert qt.data.shape == (*rows, per_row)
    # codes: (*rows, nb, bs) in the format's range and signedness
    codes = qt.codes()
    assert codes.shape == (*rows, nb, bs)
    assert codes.dtype == (np.int8 if f.code_min < 0 else np.uint8)
    assert codes.min() >= f.code_min and codes.max() <= f.code_max


def check_packing(qt: QuantizedTensor) -> None:
    """Element 2i in the low nibble, 2i+1 in the high one, an odd row padded with 0."""
    codes = qt.codes()
    flat = codes.reshape(*codes.shape[:-2], -1).view(np.uint8)
    if get_format(qt.format).bits == 8:
        np.testing.assert_array_equal(qt.data, flat)
        return
    m = flat.shape[-1]
    lo, hi = qt.data & 0x0F, qt.data >> 4
    np.testing.assert_array_equal(lo, flat[..., 0::2] & 0x0F)
    np.testing.assert_array_equal(hi[..., : m // 2], flat[..., 1::2] & 0x0F)
    if m % 2:
        assert np.all(hi[..., -1] == 0)


def check_padding(case, qt: QuantizedTensor) -> None:
    """The padding of the last block holds the code of 0 (the zero point for uint formats)."""
    n = work_layout(case[0], qt).shape[-1]
    bs, nb = qt.block_size, qt.scales.shape[-1]
    pad = nb * bs - n
    if pad:
        padding = qt.codes().astype(np.int64)[..., -1, bs - pad :]
        expected = code_of_zero(qt)[..., -1:]
        np.testing.assert_array_equal(padding, np.broadcast_to(expected, padding.shape))


def check_scales(qt: QuantizedTensor) -> None:
    f = get_format(qt.format)
    assert np.all(np.isfinite(qt.scales)) and np.all(qt.scales > 0)
    if qt.tensor_scale is not None:
        assert np.isfinite(qt.tensor_scale) and qt.tensor_scale > 0
    if f.zero_point == "int":
        zp = qt.zero_points
        assert zp.dtype == np.uint8
        assert zp.min() >= 0 and zp.max() <= 2**f.bits - 1
    elif f.zero_point == "float":
        assert np.all(np.isfinite(qt.zero_points))


def check_nbytes(qt: QuantizedTensor) -> None:
    f = get_format(qt.format)
    expected = qt.data.size  # uint8
    if f.scale_bits is None:
        expected += qt.scales.size * qt.scales.itemsize
    else:
        expected += math.ceil(qt.scales.size * f.scale_bits / 8)
    if qt.zero_points is not None:
        zp = qt.zero_points
        if f.zero_point == "int" and f.bits == 4:
            expected += math.ceil(zp.size / 2)  # stored packed, two per byte
        else:
            expected += zp.size * zp.itemsize
    if qt.tensor_scale is not None:
        expected += 4
    if qt.double_quant is not None:  # nf4_dq: an absmax per 256 scales, an offset
        expected += (math.ceil(qt.scales.size / 256) + 1) * qt.scales.itemsize
    assert qt.nbytes == expected
    assert qt.bits_per_weight == pytest.approx(8 * expected / qt.size)


INTEGER_RULES = {
    "int4": "symmetric",
    "int8": "symmetric",
    "uint4": "uint",
    "uint8": "uint",
    "int4_affine": "affine",
}


def check_scale_rule(case, qt: QuantizedTensor) -> None:
    """The integer formats' documented round-to-nearest parameters (formats/integer.py):
    intN: scale = amax / (2^(b-1)-1); uintN: scale = (max(hi, 0) - min(lo, 0)) / (2^b-1),
    zero point = clip(-rint(min(lo, 0) / scale)); int4_affine: scale = (hi - lo) / 15, zero
    point = -8 - lo / scale, a constant block c: scale |c|, zero point 0; all-zero blocks: 1."""
    rule = INTEGER_RULES.get(qt.format)
    if rule is None:
        return
    f = get_format(qt.format)
    cd = compute_dtype(case[0].dtype)
    xb = my_blocks(case[0], qt, fill=np.nan)  # padding ignored by nan-reductions
    lo, hi = np.nanmin(xb, axis=-1), np.nanmax(xb, axis=-1)
    amax = np.maximum(np.abs(lo), np.abs(hi))
    if rule == "symmetric":
        ideal = amax / f.code_max
    elif rule == "uint":
        ideal = (np.maximum(hi, 0) - np.minimum(lo, 0)) / f.code_max
    else:
        ideal = np.where(hi > lo, (hi - lo) / (f.code_max - f.code_min), np.abs(lo))
    ideal = np.where(amax == 0, 1.0, ideal)
    scales = qt.scales.astype(np.float64)
    normal = ideal >= np.finfo(cd).tiny  # below: scales may move up by ulps (subnormal steps)
    np.testing.assert_allclose(scales[normal], ideal[normal], rtol=4 * float(np.finfo(cd).eps))
    if rule == "uint":
        lo_c = np.minimum(lo, 0).astype(cd)
        zp = np.clip(-np.rint(lo_c / qt.scales), 0, f.code_max)
        np.testing.assert_array_equal(qt.zero_points, zp.astype(np.uint8))
    elif rule == "affine":
        const = hi == lo
        assert np.all(qt.zero_points[const] == 0)
        expected = f.code_min - lo / scales
        zp = qt.zero_points.astype(np.float64)
        tol = 4 * float(np.finfo(cd).eps) * (np.abs(expected) + 1)
        assert np.all(np.abs(zp - expected)[~const] <= tol[~const])


def check_scale_tight(case, qt: QuantizedTensor) -> None:
    """No scale is wastefully large: each block's amax reaches at least half the grid's reach
    (formats with one scale per block; non-constant blocks well inside the float range; not
    nf4_dq, whose scales are quantized together: tests/test_nf4_double.py bounds them)."""
    if qt.tensor_scale is not None or qt.double_quant is not None:
        return
    xb = my_blocks(case[0], qt, fill=np.nan)
    amax = np.nanmax(np.abs(xb), axis=-1)
    reach = np.abs(unit_grid(qt)).max(axis=-1) * qt.scales.astype(np.float64)
    varies = np.nanmax(xb, axis=-1) > np.nanmin(xb, axis=-1)
    inside = (amax >= 1e-30) & (amax <= 1e30) & varies
    assert np.all(amax[inside] >= reach[inside] / 2), (amax[inside], reach[inside])


def check_output_dtypes(qt: QuantizedTensor, x: np.ndarray, dtype: np.dtype) -> None:
    """Default: the input's float dtype (float32 for ints), the compute result rounded once."""
    exact = qt.dequantize(np.float64)
    out = qt.dequantize()
    expected = np.dtype(np.float32) if x.dtype.kind in "iu" else x.dtype
    assert out.dtype == expected and out.shape == x.shape
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, exact.astype(expected))
    np.testing.assert_array_equal(dequantize_tensor(qt), out)
    with np.errstate(over="ignore"):  # float32 data asked for as float16 may overflow: it
        out = qt.dequantize(dtype)  # saturates to the dtype's largest finite value
        expected_values = exact.astype(dtype)
        again = dequantize_tensor(qt, dtype)
    top = float(np.finfo(dtype).max) if dtype.kind == "f" else float(ml_dtypes.finfo(dtype).max)
    expected_values = np.where(
        np.isinf(expected_values), np.sign(exact) * top, expected_values
    ).astype(dtype)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_array_equal(out, expected_values)
    np.testing.assert_array_equal(again, out)


def assert_same_result(a: QuantizedTensor, b: QuantizedTensor) -> None:
    where = f"{a.format}, input {a.dtype} vs {b.dtype}"
    assert a.scales.dtype == b.scales.dtype, f"{where}: scales {a.scales.dtype} vs {b.scales.dtype}"
    assert a.data.tobytes() == b.data.tobytes(), where
    assert a.scales.tobytes() == b.scales.tobytes(), where
    assert (a.zero_points is None) == (b.zero_points is None)
    if a.zero_points is not None:
        assert a.zero_points.dtype == b.zero_points.dtype
        assert a.zero_points.tobytes() == b.zero_points.tobytes()
    assert a.tensor_scale == b.tensor_scale
    assert (a.block_size, a.axis, a.shape) == (b.block_size, b.axis, b.shape)
    np.testing.assert_array_equal(a.dequantize(np.float64), b.dequantize(np.float64))


# --------------------------------------------------------------------------- properties


@fmt_param
@SETTINGS
@given(data=st.data())
def test_error_bounds_and_exact_zero(fmt, data):
    x, axis, block = draw_case(data, fmt)
    if data.draw(st.booleans(), label="some zeros"):
        x = x.copy()
        x[data.draw(hnp.arrays(np.bool_, x.shape), label="zero mask")] = 0
    qt = quantize_tensor(x, fmt, block_size=block, axis=axis)
    check_error_bounds(x, qt)
    if get_format(fmt).zero_point != "float":  # 0 is on the grid: it comes back exactly
        assert np.all(qt.dequantize(np.float64)[x == 0] == 0.0)


@fmt_param
@SETTINGS
@given(data=st.data())
def test_layout_parameters_and_size(fmt, data):
    case = draw_case(data, fmt)
    qt = quantize_case(case, fmt)
    assert qt.format == fmt
    check_metadata(case, qt)
    check_packing(qt)
    check_padding(case, qt)
    check_scales(qt)
    check_scale_rule(case, qt)
    check_scale_tight(case, qt)
    check_nbytes(qt)


@fmt_param
@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_dequantize_dtypes(fmt, data, dtype):
    case = draw_case(data, fmt)
    check_output_dtypes(quantize_case(case, fmt), case[0], dtype)


@fmt_param
@SETTINGS
@given(data=st.data())
def test_deterministic_and_memory_layout_blind(fmt, data):
    """Same input twice: the same bytes. A non-contiguous view: the same as its copy."""
    x, axis, block = draw_case(data, fmt)
    ref = quantize_tensor(np.ascontiguousarray(x), fmt, block_size=block, axis=axis)
    again = quantize_tensor(np.ascontiguousarray(x), fmt, block_size=block, axis=axis)
    assert_same_result(again, ref)
    assert again.dequantize().tobytes() == ref.dequantize().tobytes()
    views = [
        np.asfortranarray(x),  # transposed memory order
        np.repeat(x, 2, axis=-1)[..., ::2],  # strided
        np.flip(np.flip(x, axis=0).copy(), axis=0),  # negative stride
    ]
    for v in views:
        np.testing.assert_array_equal(v, x)
        assert_same_result(quantize_tensor(v, fmt, block_size=block, axis=axis), ref)


SIGNED_SYMMETRIC = [
    f for f in FORMATS if get_format(f).zero_point is None and get_format(f).code_min < 0
]
MIRRORED = [f for f in FORMATS if get_format(f).zero_point is None and mirror_symmetric(f)]


@pytest.mark.parametrize("fmt", SIGNED_SYMMETRIC)
@SETTINGS
@given(data=st.data())
def test_symmetric_int_codes_negate(fmt, data):
    """int4/int8: quantizing -x gives the negated codes (but where a code would be -8)."""
    x, axis, block = draw_case(data, fmt, float_only=True)
    a = quantize_tensor(x, fmt, block_size=block, axis=axis)
    b = quantize_tensor(-x, fmt, block_size=block, axis=axis)
    np.testing.assert_array_equal(a.scales, b.scales)
    ca, cb = a.codes().astype(np.int64), b.codes().astype(np.int64)
    lowest = get_format(fmt).code_min
    keep = (ca != lowest) & (cb != lowest)
    np.testing.assert_array_equal(cb[keep], -ca[keep])


@pytest.mark.parametrize("fmt", MIRRORED)
@SETTINGS
@given(data=st.data())
def test_sign_symmetry(fmt, data):
    """Formats whose grid is symmetric about 0: x -> -x gives the same scales, negated values
    (but where x̂ is a grid value without a mirror image, like int4's -8)."""
    x, axis, block = draw_case(data, fmt, float_only=True)
    a = quantize_tensor(x, fmt, block_size=block, axis=axis)
    b = quantize_tensor(-x, fmt, block_size=block, axis=axis)
    np.testing.assert_array_equal(a.scales, b.scales)
    assert a.tensor_scale == b.tensor_scale
    ha, hb = a.dequantize(np.float64), b.dequantize(np.float64)
    g = unit_grid(a).reshape(-1)
    unmirrored = np.array([v for v in g if -v not in g])
    s = expand(a.scales_along_axis().astype(np.float64), a) * (
        1.0 if a.tensor_scale is None else float(a.tensor_scale)
    )
    keep = ~np.isin(ha / s, unmirrored) & ~np.isin(hb / s, unmirrored)
    np.testing.assert_array_equal(hb[keep], -ha[keep])


@fmt_param
def test_transposed_view_equals_its_copy(fmt):
    x = np.random.default_rng(0).standard_normal((24, 10)).astype(np.float32)
    t = x.T  # (10, 24), not C-contiguous
    assert not t.flags.c_contiguous
    for axis in (0, 1, -1, None):
        assert_same_result(
            quantize_tensor(t, fmt, block_size=8, axis=axis),
            quantize_tensor(np.ascontiguousarray(t), fmt, block_size=8, axis=axis),
        )


BYTE_ORDER_DTYPES = ["f2", "f4", "f8", "i2", "i4"]


@pytest.mark.parametrize("code", BYTE_ORDER_DTYPES)
def test_big_endian_input_gives_the_native_result(code):
    rng = np.random.default_rng(1)
    native = (rng.standard_normal((5, 37)) * (100 if code[0] == "i" else 1.3)).astype(code)
    big = native.astype(">" + code)
    assert big.dtype.byteorder == ">"
    for fmt in FORMATS:
        for axis, block in [(-1, 16), (0, 2), (None, None)]:
            assert_same_result(
                quantize_tensor(big, fmt, block_size=block, axis=axis),
                quantize_tensor(native, fmt, block_size=block, axis=axis),
            )


@pytest.mark.parametrize("code", BYTE_ORDER_DTYPES)
def test_big_endian_input_dequantizes_to_native_byte_order(code):
    native = np.linspace(-3, 3, 40).astype(code)
    for fmt in FORMATS:
        qt = quantize_tensor(native.astype(">" + code), fmt, block_size=8)
        out = qt.dequantize()
        assert out.dtype.isnative, (fmt, out.dtype)
        assert out.dtype == quantize_tensor(native, fmt, block_size=8).dequantize().dtype


@pytest.mark.parametrize(
    ("fmt", "bpw"),
    [("int4", 5.0), ("uint4", 5.125), ("int8", 9.0), ("uint8", 9.25), ("int4_affine", 6.0)],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_bits_per_weight_known_values(fmt, bpw, dtype):
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(dtype)
    qt = quantize_tensor(x, fmt, block_size=32)
    # 256 weights, 8 float32 scales (32 bytes), zero points 8 uint4 (4 bytes) / 8 uint8 /
    # 8 float32
    assert qt.bits_per_weight == bpw
    assert qt.nbytes == bpw * 256 / 8


# --------------------------------------------------------------------------- specific cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_0d_input_round_trips_as_0d(dtype):
    x = np.array(2.5, dtype=dtype)
    for fmt in FORMATS:
        qt = quantize_tensor(x, fmt)
        assert qt.shape == () and qt.axis is None
        out = qt.dequantize()
        assert out.dtype == np.dtype(dtype)
        assert out.shape == (), (fmt, out.shape)
        check_error_bounds(x, qt)


@fmt_param
def test_one_scale_per_tensor(fmt):
    x = np.random.default_rng(3).standard_normal((6, 7, 5)).astype(np.float32)
    qt = quantize_tensor(x, fmt, block_size=None, axis=None)
    assert qt.scales.shape == (1,) and qt.block_size == x.size
    check_error_bounds(x, qt)


@fmt_param
@pytest.mark.parametrize("block", [None, -1])
def test_per_channel(fmt, block):
    x = np.random.default_rng(4).standard_normal((6, 9)).astype(np.float32)
    qt = quantize_tensor(x, fmt, block_size=block, axis=1)
    assert qt.scales.shape == (6, 1) and qt.block_size == 9
    qt0 = quantize_tensor(x, fmt, block_size=block, axis=0)
    assert qt0.scales.shape == (9, 1) and qt0.block_size == 6
    check_error_bounds(x, qt)
    check_error_bounds(x, qt0)


@fmt_param
def test_blocks_are_independent(fmt):
    """A block depends only on its own values (here: 1e-3 next to 1e6), but for formats with
    a tensor-wide second scale (NVFP4), whose block scales are relative to it, or with scales
    quantized together (nf4_dq)."""
    x = np.concatenate([np.linspace(-1e-3, 2e-3, 8), np.linspace(-1e6, 1e6, 8)])
    x = x.astype(np.float32)
    qt = quantize_tensor(x, fmt, block_size=8)
    check_error_bounds(x, qt)
    if qt.tensor_scale is None and qt.double_quant is None:
        alone = quantize_tensor(x[:8], fmt, block_size=8)
        assert qt.scales[0] == alone.scales[0]
        np.testing.assert_array_equal(qt.dequantize()[:8], alone.dequantize())


@fmt_param
def test_int_input_dequantizes_to_float32(fmt):
    x = np.arange(-20, 20, dtype=np.int32).reshape(4, 10)
    qt = quantize_tensor(x, fmt, block_size=5)
    assert qt.scales.dtype == np.float32 and qt.dequantize().dtype == np.float32
    check_error_bounds(x, qt)


@fmt_param
def test_input_not_modified(fmt):
    x = np.random.default_rng(5).standard_normal((3, 11)).astype(np.float32)
    before = x.copy()
    quantize_tensor(x, fmt, block_size=4)
    np.testing.assert_array_equal(x, before)


def test_int4_known_codes():
    qt = quantize_tensor(np.array([[-7.0, -3.5, 0.0, 2.5, 7.0]], np.float32), "int4", 5)
    assert qt.scales.tolist() == [[1.0]]
    # ties to even: -3.5 -> -4, 2.5 -> 2
    np.testing.assert_array_equal(qt.codes().reshape(-1), [-7, -4, 0, 2, 7])
    # packed: (-7, -4) -> 0xC9, (0, 2) -> 0x20, (7, pad 0) -> 0x07
    np.testing.assert_array_equal(qt.data, [[0xC9, 0x20, 0x07]])


def test_uint4_known_codes():
    qt = quantize_tensor(np.array([-1.0, 0.0, 2.0], np.float32), "uint4", None)
    assert qt.scales[0] == pytest.approx(0.2)
    assert qt.zero_points.tolist() == [5]
    np.testing.assert_array_equal(qt.codes().reshape(-1), [0, 5, 15])
