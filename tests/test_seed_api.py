"""The seed API's contract: quantize_to_int4 / dequantize_from_int4 and the packing helpers.

Names, defaults and return types come from the seed docs (seeds 000, 001, 004); the numbers
(min -> -8, max -> 7, every element within scale/2) from the docstrings in quantize/quantize.py.
"""

from __future__ import annotations

import inspect

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quantize
from quantize import dequantize_from_int4, quantize_to_int4
from quantize.quantize import example, pack_int4_to_int8, unpack_int8_to_int4

SETTINGS = settings(max_examples=120, deadline=None)
EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
TINY32 = float(np.finfo(np.float32).smallest_subnormal)
METHODS = ["minmax", "absmax"]
EXAMPLE_VALUES = [0.1, 0.5, -1.3, 2.7, 3.9, -0.8, 5.2, -4.7]


# --------------------------------------------------------------------------- helpers


def as_f64(values) -> np.ndarray:
    """The input as exact float64 numbers (every dtype used here converts exactly)."""
    return np.asarray(values).astype(np.float64)


def error_bound(x64: np.ndarray, xhat32: np.ndarray, scale: float) -> np.ndarray:
    """Per element: scale/2, plus the float slack of the computation.

    quantize_to_int4 works in float64 and dequantize_from_int4 returns float32, so the slack is
    a few float64 ulps of the array's largest magnitude (the zero point is of that size), one
    float32 ulp of the element itself (the final rounding to float32), and one float32
    subnormal step (values below float32's normal range). None of these grows with the scale:
    for the docs' example the bound is 0.33 + 1e-6, not a free pass.
    """
    amax = float(np.max(np.abs(x64))) if x64.size else 0.0
    mag = np.maximum(np.abs(x64), np.abs(xhat32.astype(np.float64)))
    return scale / 2 * (1 + 1e-6) + 8 * EPS64 * amax + EPS32 * mag + TINY32


def assert_within_bound(values, codes, scale, zero_point):
    x64 = as_f64(values)
    xhat = dequantize_from_int4(codes, scale, zero_point)
    err = np.abs(x64 - xhat.astype(np.float64))
    bound = error_bound(x64, xhat, scale)
    worst = np.unravel_index(int(np.argmax(err - bound)), err.shape) if err.ndim else ()
    assert np.all(err <= bound), (
        f"error {err[worst]} > bound {bound[worst]} at {worst}: x={x64[worst]!r}, "
        f"code={codes[worst]}, scale={scale!r}, zero_point={zero_point!r}"
    )


# --------------------------------------------------------------------------- strategies

SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=12)
# float64 stays below float32's range: dequantize_from_int4 returns float32 by contract.
FLOAT_ELEMENTS = {
    np.float64: st.floats(-1e38, 1e38, allow_nan=False, allow_infinity=False, width=64),
    np.float32: st.floats(allow_nan=False, allow_infinity=False, width=32),
    np.float16: st.floats(allow_nan=False, allow_infinity=False, width=16),
}
INT_ELEMENTS = {
    np.int8: st.integers(-128, 127),
    np.int16: st.integers(-(2**15), 2**15 - 1),
    np.int32: st.integers(-(2**31), 2**31 - 1),
    np.int64: st.integers(-(2**53), 2**53),  # exact in float64
}


@st.composite
def dense_arrays(draw):
    """Normal-looking data at any magnitude (hypothesis' own arrays are mostly one fill value)."""
    dtype = draw(st.sampled_from([np.float64, np.float32, np.float16]))
    shape = draw(SHAPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lo_exp, hi_exp = {np.float64: (-320, 35), np.float32: (-44, 35), np.float16: (-7, 3)}[dtype]
    e = draw(st.integers(lo_exp, hi_exp))
    offset = draw(st.sampled_from([0.0, 1.0, -3.0]))
    x = (rng.standard_normal(shape) + offset) * 10.0**e
    return x.astype(dtype)


@st.composite
def seed_inputs(draw):
    """Arrays of float64/32/16 and ints of any shape (0-d included), and plain lists."""
    kind = draw(st.sampled_from(["float", "int", "dense", "list_float", "list_int"]))
    if kind == "float":
        dtype = draw(st.sampled_from(list(FLOAT_ELEMENTS)))
        return draw(hnp.arrays(dtype, SHAPES, elements=FLOAT_ELEMENTS[dtype]))
    if kind == "int":
        dtype = draw(st.sampled_from(list(INT_ELEMENTS)))
        return draw(hnp.arrays(dtype, SHAPES, elements=INT_ELEMENTS[dtype]))
    if kind == "dense":
        return draw(dense_arrays())
    if kind == "list_float":
        return draw(st.lists(FLOAT_ELEMENTS[np.float64], min_size=1, max_size=30))
    return draw(st.lists(st.integers(-(2**31), 2**31), min_size=1, max_size=30))


# --------------------------------------------------------------------------- signatures


def test_public_names_import():
    assert quantize.quantize_to_int4 is quantize_to_int4
    assert quantize.dequantize_from_int4 is dequantize_from_int4
    for fn in (quantize_to_int4, dequantize_from_int4, pack_int4_to_int8, unpack_int8_to_int4):
        assert callable(fn)
    assert callable(example)


def _params(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
EMPTY = inspect.Parameter.empty


def test_signatures_match_the_seed_docs():
    assert _params(quantize_to_int4) == [("values", EMPTY, POS), ("scale_method", "minmax", POS)]
    assert _params(dequantize_from_int4) == [
        ("quantized_values", EMPTY, POS),
        ("scale", EMPTY, POS),
        ("zero_point", 0, POS),
    ]
    assert _params(pack_int4_to_int8) == [("int4_values", EMPTY, POS)]
    assert _params(unpack_int8_to_int4) == [("packed_values", EMPTY, POS)]
    assert _params(example) == []


def test_arguments_work_by_keyword():
    codes, scale, zp = quantize_to_int4(values=[1.0, 2.0, 3.0], scale_method="absmax")
    out = dequantize_from_int4(quantized_values=codes, scale=scale, zero_point=zp)
    np.testing.assert_allclose(out, [1, 2, 3], atol=scale / 2)
    packed = pack_int4_to_int8(int4_values=codes)
    np.testing.assert_array_equal(unpack_int8_to_int4(packed_values=packed)[:3], codes)


# --------------------------------------------------------------------------- return types


@SETTINGS
@given(values=seed_inputs(), method=st.sampled_from(METHODS))
def test_return_types_and_shapes(values, method):
    codes, scale, zp = quantize_to_int4(values, method)
    assert isinstance(codes, np.ndarray)
    assert codes.dtype == np.int8
    assert codes.shape == np.shape(values)
    assert codes.min() >= -8 and codes.max() <= 7
    assert type(scale) is float and type(zp) is float  # Python floats, not NumPy scalars
    assert np.isfinite(scale) and scale > 0 and np.isfinite(zp)
    out = dequantize_from_int4(codes, scale, zp)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == codes.shape


def test_scalar_input_gives_0d_codes():
    codes, scale, zp = quantize_to_int4(np.float32(-2.5))
    assert codes.shape == () and codes.dtype == np.int8
    assert dequantize_from_int4(codes, scale, zp).shape == ()
    assert dequantize_from_int4(codes, scale, zp)[()] == np.float32(-2.5)


# --------------------------------------------------------------------------- error bound


@SETTINGS
@given(values=seed_inputs(), method=st.sampled_from(METHODS))
def test_every_element_within_half_a_step(values, method):
    codes, scale, zp = quantize_to_int4(values, method)
    assert_within_bound(values, codes, scale, zp)


def test_bound_is_not_vacuous():
    """Leaving out the zero point (the seed's sample code) breaks the bound on the docs' data."""
    x = np.array(EXAMPLE_VALUES)
    codes, scale, zp = quantize_to_int4(x)
    assert abs(zp * scale) > scale / 2
    wrong = dequantize_from_int4(codes, scale)  # zero_point defaults to 0
    err = np.abs(x - wrong.astype(np.float64))
    assert np.any(err > error_bound(x, wrong, scale))


# --------------------------------------------------------------------------- minmax / absmax


def _well_conditioned(x64: np.ndarray) -> bool:
    """Non-constant, and the step is a normal float64 not lost against the magnitude."""
    lo, hi = float(x64.min()), float(x64.max())
    span, amax = hi - lo, float(np.max(np.abs(x64)))
    return span > 0 and span / 15 >= np.finfo(np.float64).tiny and span >= amax * 2.0**-20


@SETTINGS
@given(values=seed_inputs())
def test_minmax_maps_min_to_minus8_and_max_to_7(values):
    x64 = as_f64(values)
    assume(_well_conditioned(x64))
    codes, scale, _zp = quantize_to_int4(values, "minmax")
    flat = codes.reshape(-1)
    assert flat[int(np.argmin(x64))] == -8
    assert flat[int(np.argmax(x64))] == 7
    assert scale == pytest.approx((x64.max() - x64.min()) / 15, rel=1e-12)


@SETTINGS
@given(values=seed_inputs())
def test_minmax_zero_point_is_honoured(values):
    codes, scale, zp = quantize_to_int4(values, "minmax")
    c = codes.astype(np.float64)
    np.testing.assert_allclose(
        dequantize_from_int4(codes, scale, zp), ((c - zp) * scale).astype(np.float32), rtol=1e-6
    )
    # the default zero point is 0: plain codes * scale
    np.testing.assert_allclose(
        dequantize_from_int4(codes, scale), (c * scale).astype(np.float32), rtol=1e-6
    )


def test_minmax_known_values():
    codes, scale, zp = quantize_to_int4([-1.0, 0.0, 2.0])
    assert scale == pytest.approx(3.0 / 15)
    assert zp == pytest.approx(-8 + 1.0 / 0.2)  # -3
    np.testing.assert_array_equal(codes, [-8, -3, 7])


@SETTINGS
@given(values=seed_inputs())
def test_absmax_is_symmetric_and_never_clips(values):
    x64 = as_f64(values)
    amax = float(np.max(np.abs(x64)))
    assume(amax / 7 >= np.finfo(np.float64).tiny)
    codes, scale, zp = quantize_to_int4(values, "absmax")
    assert zp == 0.0 and type(zp) is float
    assert scale == pytest.approx(amax / 7, rel=1e-15)
    assert np.all(np.abs(codes.astype(int)) <= 7)  # -8 is never needed: no clipping below
    flat, xf = codes.reshape(-1), x64.reshape(-1)
    i = int(np.argmax(np.abs(xf)))
    assert flat[i] == (7 if xf[i] > 0 else -7)  # nor above


def test_absmax_known_values():
    codes, scale, zp = quantize_to_int4([-3.5, 0.25, 7.0], "absmax")
    assert (scale, zp) == (1.0, 0.0)
    np.testing.assert_array_equal(codes, [-4, 0, 7])  # -3.5 rounds half to even


# --------------------------------------------------------------------------- exact cases

CONSTANT_64 = st.floats(-1e38, 1e38, allow_nan=False, allow_infinity=False, width=64)
CONSTANT_32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@SETTINGS
@given(c=CONSTANT_64, shape=SHAPES)
def test_minmax_constant_input_is_exact(c, shape):
    x = np.full(shape, c, dtype=np.float64)
    codes, scale, zp = quantize_to_int4(x, "minmax")
    assert np.isfinite(scale) and scale > 0
    assert scale == (abs(c) if c != 0 else 1.0)
    assert zp == 0.0
    np.testing.assert_array_equal(codes, np.full(shape, np.sign(c), dtype=np.int8))
    out = dequantize_from_int4(codes, scale, zp)
    np.testing.assert_array_equal(out, x.astype(np.float32))


@SETTINGS
@given(
    c=CONSTANT_32,
    shape=SHAPES,
    method=st.sampled_from(METHODS),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_constant_and_single_element_inputs_are_exact(c, shape, method, dtype):
    for x in (np.full(shape, c, dtype=dtype), np.array([c], dtype=dtype), [float(c)]):
        codes, scale, zp = quantize_to_int4(x, method)
        assert np.isfinite(scale) and scale > 0
        out = dequantize_from_int4(codes, scale, zp)
        np.testing.assert_array_equal(out, np.asarray(x, dtype=np.float32))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 4)])
def test_all_zeros(method, shape):
    codes, scale, zp = quantize_to_int4(np.zeros(shape, np.float32), method)
    assert (scale, zp) == (1.0, 0.0)
    np.testing.assert_array_equal(codes, np.zeros(shape, np.int8))
    out = dequantize_from_int4(codes, scale, zp)
    assert out.shape == shape
    np.testing.assert_array_equal(out, np.zeros(shape, np.float32))


# --------------------------------------------------------------------------- packing

ALL_BYTES_INT8 = np.arange(-128, 128, dtype=np.int8)


def sign_extend(nibble: np.ndarray) -> np.ndarray:
    return ((nibble.astype(np.int16) ^ 8) - 8).astype(np.int8)


def test_unpack_then_pack_all_256_bytes():
    codes = unpack_int8_to_int4(ALL_BYTES_INT8)
    assert codes.dtype == np.int8 and codes.shape == (512,)
    u = ALL_BYTES_INT8.view(np.uint8)
    np.testing.assert_array_equal(codes[0::2], sign_extend(u & 0x0F))  # low nibble first
    np.testing.assert_array_equal(codes[1::2], sign_extend(u >> 4))
    packed = pack_int4_to_int8(codes)
    assert packed.dtype == np.int8
    np.testing.assert_array_equal(packed, ALL_BYTES_INT8)


def test_uint8_bytes_unpack_like_their_int8_view():
    u = np.arange(256, dtype=np.uint8)
    codes = unpack_int8_to_int4(u)
    np.testing.assert_array_equal(codes, unpack_int8_to_int4(u.view(np.int8)))
    np.testing.assert_array_equal(pack_int4_to_int8(codes), u.view(np.int8))


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([1, -1], [np.uint8(0xF1).view(np.int8)]),  # 1 low, -1 (0xF) high
        ([-8, 7], [0x78]),
        ([7, -8], [np.uint8(0x87).view(np.int8)]),
        ([0, 0], [0]),
        ([3], [0x03]),  # odd length: padded with a 0 code in the high nibble
        ([-1], [0x0F]),
        ([1, 2, 3, 4, 5], [0x21, 0x43, 0x05]),
    ],
)
def test_pack_known_bytes(codes, expected):
    packed = pack_int4_to_int8(np.array(codes, dtype=np.int8))
    assert packed.dtype == np.int8
    np.testing.assert_array_equal(packed, np.array(expected, dtype=np.int8))


def test_pack_of_the_doc_example():
    assert pack_int4_to_int8([1, -1]).tolist() == [np.int8(-15)]
    assert np.uint8(pack_int4_to_int8([1, -1]).view(np.uint8)[0]) == 0xF1


CODES = st.integers(-8, 7)


@SETTINGS
@given(
    codes=hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=CODES)
)
def test_pack_then_unpack_gives_the_codes_back(codes):
    packed = pack_int4_to_int8(codes)
    n = codes.size
    assert packed.dtype == np.int8 and packed.shape == ((n + 1) // 2,)
    u = packed.view(np.uint8)
    flat = codes.reshape(-1)  # C order
    np.testing.assert_array_equal(u & 0x0F, flat[0::2].view(np.uint8) & 0x0F)
    np.testing.assert_array_equal((u >> 4)[: n // 2], flat[1::2].view(np.uint8) & 0x0F)
    if n % 2:
        assert u[-1] >> 4 == 0
    unpacked = unpack_int8_to_int4(packed)
    assert unpacked.dtype == np.int8 and unpacked.shape == (2 * packed.size,)
    expected = np.concatenate([flat, np.zeros(n % 2, np.int8)])
    np.testing.assert_array_equal(unpacked, expected)


@SETTINGS
@given(data=hnp.arrays(np.int8, st.integers(1, 64), elements=st.integers(-128, 127)))
def test_unpack_then_pack_round_trip(data):
    np.testing.assert_array_equal(pack_int4_to_int8(unpack_int8_to_int4(data)), data)


@SETTINGS
@given(codes=st.lists(CODES, min_size=1, max_size=40))
def test_pack_accepts_lists_and_wider_ints(codes):
    ref = pack_int4_to_int8(np.array(codes, dtype=np.int8))
    np.testing.assert_array_equal(pack_int4_to_int8(codes), ref)
    np.testing.assert_array_equal(pack_int4_to_int8(np.array(codes, dtype=np.int64)), ref)


# --------------------------------------------------------------------------- example()


def test_example():
    result = example()
    assert isinstance(result, tuple) and len(result) == 3
    original, quantized, dequantized = result
    np.testing.assert_array_equal(original, np.array(EXAMPLE_VALUES))
    assert quantized.dtype == np.int8 and quantized.shape == (8,)
    assert dequantized.dtype == np.float32 and dequantized.shape == (8,)
    codes, scale, zp = quantize_to_int4(np.array(EXAMPLE_VALUES))
    np.testing.assert_array_equal(quantized, codes)
    assert scale == pytest.approx((5.2 + 4.7) / 15)
    assert quantized[6] == 7 and quantized[7] == -8  # max 5.2, min -4.7
    err = np.abs(original - dequantized.astype(np.float64))
    assert np.all(err <= scale / 2 * (1 + 1e-6))
    np.testing.assert_array_equal(dequantized, dequantize_from_int4(codes, scale, zp))


# --------------------------------------------------------------------------- the seed's usage


def test_usage_complete_example_runs(capsys):
    """Seed 004's "Complete Example", word for word except that the zero point is passed."""
    import numpy as np

    from quantize import dequantize_from_int4, quantize_to_int4
    from quantize.quantize import pack_int4_to_int8, unpack_int8_to_int4

    # Example floating point values
    float_values = np.array([0.1, 0.5, -1.3, 2.7, 3.9, -0.8, 5.2, -4.7])
    print("Original values:", float_values)

    # Quantize to int4
    quantized, scale, zero_point = quantize_to_int4(float_values)
    print("Quantized values (int4):", quantized)
    print("Scale factor:", scale)

    # Pack int4 values into int8 for storage efficiency
    packed = pack_int4_to_int8(quantized)
    print("Packed values (int8):", packed)
    print("Memory usage reduced by 50%")

    # Unpack back to int4
    unpacked = unpack_int8_to_int4(packed)
    print("Unpacked values (int4):", unpacked[: len(float_values)])  # Trim any padding

    # Dequantize back to floating point
    dequantized = dequantize_from_int4(quantized, scale, zero_point)
    print("Dequantized values:", dequantized)

    # Calculate error
    error = float_values - dequantized
    print("Quantization error:", error)
    print("Mean absolute error:", np.mean(np.abs(error)))

    out = capsys.readouterr().out
    assert "Mean absolute error:" in out
    assert packed.shape == (4,) and packed.dtype == np.int8
    np.testing.assert_array_equal(unpacked[: len(float_values)], quantized)
    assert np.max(np.abs(error)) <= scale / 2 * (1 + 1e-6)
    assert np.mean(np.abs(error)) < scale / 2


def test_usage_basic_snippets_run():
    float_values = [0.1, 0.5, -1.3, 2.7, 3.9, -0.8]
    quantized_values, scale, zero_point = quantize_to_int4(float_values)
    dequantized_values = dequantize_from_int4(quantized_values, scale, zero_point)
    assert np.all(np.abs(np.array(float_values) - dequantized_values) <= scale / 2 + 1e-6)
    for method in METHODS:
        quantized_values, scale, zero_point = quantize_to_int4(float_values, scale_method=method)
        assert quantized_values.shape == (6,)


# --------------------------------------------------------------------------- other inputs


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_input(method):
    x = np.array([0.1, 0.5, -1.3, 2.7, 3.9, -0.8, 5.2, -4.7], dtype=ml_dtypes.bfloat16)
    codes, scale, zp = quantize_to_int4(x, method)
    assert codes.dtype == np.int8 and codes.shape == (8,)
    assert type(scale) is float and type(zp) is float
    assert_within_bound(x, codes, scale, zp)
    x64 = x.astype(np.float64)
    if method == "minmax":
        assert codes[np.argmin(x64)] == -8 and codes[np.argmax(x64)] == 7
    else:
        assert scale == pytest.approx(np.max(np.abs(x64)) / 7, rel=1e-15)


@SETTINGS
@given(
    x=hnp.arrays(np.float32, SHAPES, elements=st.floats(-(2.0**100), 2.0**100, width=32)),
    method=st.sampled_from(METHODS),
)
def test_bfloat16_arrays_match_their_float64_values(x, method):
    b = x.astype(ml_dtypes.bfloat16)
    codes, scale, zp = quantize_to_int4(b, method)
    codes64, scale64, zp64 = quantize_to_int4(b.astype(np.float64), method)
    np.testing.assert_array_equal(codes, codes64)
    assert (scale, zp) == (scale64, zp64)
    assert_within_bound(b, codes, scale, zp)


@pytest.mark.parametrize("method", METHODS)
def test_python_lists_of_ints(method):
    values = [3, -7, 0, 12, 5]
    codes, scale, zp = quantize_to_int4(values, method)
    assert codes.dtype == np.int8 and codes.shape == (5,)
    assert_within_bound(values, codes, scale, zp)
    np.testing.assert_array_equal(codes, quantize_to_int4(np.array(values, np.int64), method)[0])


def test_list_and_array_give_the_same_result():
    values = [0.1, 0.5, -1.3, 2.7]
    a = quantize_to_int4(values)
    b = quantize_to_int4(np.array(values))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1:] == b[1:]


def test_input_is_not_modified():
    x = np.array([0.1, -2.0, 3.0], dtype=np.float32)
    before = x.copy()
    quantize_to_int4(x)
    quantize_to_int4(x, "absmax")
    np.testing.assert_array_equal(x, before)
