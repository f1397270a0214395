"""Bad input gets a clear error naming the argument; extreme but valid input gets a right answer.

Covers every public door: quantize_to_int4, dequantize_from_int4, pack_int4_to_int8,
unpack_int8_to_int4 (the seed API) and quantize_tensor, QuantizedTensor.dequantize,
dequantize_tensor, get_format (the core). The rule (quantize/_checks.py): TypeError for the
wrong kind of thing, ValueError for a bad value, and the message names the argument.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import ml_dtypes
import numpy as np
import pytest

from _bounds import check_error_bounds
from quantize import (
    QuantizedTensor,
    available_formats,
    dequantize_from_int4,
    dequantize_tensor,
    get_format,
    quantize_tensor,
    quantize_to_int4,
)
from quantize.quantize import pack_int4_to_int8, unpack_int8_to_int4

FORMATS = available_formats()
NAN, INF = float("nan"), float("inf")


def name_re(name: str) -> str:
    """The argument's name as a whole word ('values' must not match 'quantized_values')."""
    return rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"


# Every public function that takes an array, with the name of that argument.
ARRAY_DOORS = {
    "quantize_to_int4": ("values", lambda a: quantize_to_int4(a)),
    "quantize_to_int4/absmax": ("values", lambda a: quantize_to_int4(a, "absmax")),
    "dequantize_from_int4": ("quantized_values", lambda a: dequantize_from_int4(a, 1.0, 0.0)),
    "pack_int4_to_int8": ("int4_values", lambda a: pack_int4_to_int8(a)),
    "unpack_int8_to_int4": ("packed_values", lambda a: unpack_int8_to_int4(a)),
    **{
        f"quantize_tensor/{f}": ("array", lambda a, f=f: quantize_tensor(a, f, block_size=4))
        for f in FORMATS
    },
}
door_param = pytest.mark.parametrize("door", list(ARRAY_DOORS))


def call(door: str, arg):
    return ARRAY_DOORS[door][1](arg)


def arg_name(door: str) -> str:
    return ARRAY_DOORS[door][0]


# --------------------------------------------------------------------------- NaN / Inf

NON_FINITE = [
    (np.array([1.0, NAN, 2.0]), "(1,)", "nan"),
    (np.array([1.0, 2.0, -INF], np.float32), "(2,)", "-inf"),
    (np.array([[1.0, 2.0], [3.0, INF]], np.float16), "(1, 1)", "inf"),
    (np.array([[0.0, 1.0, 2.0], [NAN, 1.0, INF]], ml_dtypes.bfloat16), "(1, 0)", "nan"),
    ([0.0, 1.0, 2.0, 3.0, NAN], "(4,)", "nan"),
]


@door_param
def test_non_finite_input(door):
    name = arg_name(door)
    for bad, index, value in NON_FINITE:
        with pytest.raises(ValueError, match=name_re(name)) as info:
            call(door, bad)
        msg = str(info.value)
        assert "non-finite" in msg, msg
        assert index in msg, (index, msg)
        assert value in msg.lower(), (value, msg)


@door_param
def test_non_finite_0d_input(door):
    with pytest.raises(ValueError, match=name_re(arg_name(door))) as info:
        call(door, np.float32(NAN))
    assert "non-finite" in str(info.value)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_scale_and_zero_point(bad):
    with pytest.raises(ValueError, match=name_re("scale")):
        dequantize_from_int4(np.array([1, 2], np.int8), bad, 0.0)
    with pytest.raises(ValueError, match=name_re("zero_point")):
        dequantize_from_int4(np.array([1, 2], np.int8), 1.0, bad)


def _qt(fmt: str = "int4") -> QuantizedTensor:
    x = np.linspace(-2, 3, 24, dtype=np.float32).reshape(3, 8)
    return quantize_tensor(x, fmt, block_size=4)


@pytest.mark.parametrize("fn", ["QuantizedTensor.dequantize", "dequantize_tensor"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_quantized_tensor_with_non_finite_scales(fn, bad):
    """A hand-built QuantizedTensor (e.g. loaded from a file) with a NaN/Inf scale must not
    silently dequantize to NaN/Inf: constructing it or dequantizing it raises, naming scales."""
    for fmt in FORMATS:
        qt = _qt(fmt)
        scales = qt.scales.copy()
        scales[1, 0] = bad
        with pytest.raises(ValueError, match=name_re("scales")) as info:
            broken = dataclasses.replace(qt, scales=scales)
            broken.dequantize() if fn == "QuantizedTensor.dequantize" else dequantize_tensor(broken)
        assert "non-finite" in str(info.value)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_quantized_tensor_with_non_finite_zero_points(bad):
    qt = _qt("int4_affine")
    zp = qt.zero_points.copy()
    zp[0, 1] = bad
    with pytest.raises(ValueError, match=name_re("zero_points")) as info:
        dataclasses.replace(qt, zero_points=zp).dequantize()
    assert "non-finite" in str(info.value)


# --------------------------------------------------------------------------- empty input


@door_param
@pytest.mark.parametrize("empty", [[], np.zeros(0, np.float32), np.zeros((3, 0)), [[]]])
def test_empty_input(door, empty):
    with pytest.raises(ValueError, match=name_re(arg_name(door))) as info:
        call(door, empty)
    assert "empty" in str(info.value)


# --------------------------------------------------------------------------- wrong types

WRONG_KINDS = {
    "complex": np.array([1 + 2j, 3 + 0j]),
    "object": np.array([1.0, 2.0], dtype=object),
    "object-with-None": [1.0, None],
    "str-array": np.array(["1", "2"]),
    "bool": np.array([True, False]),
    "bool-list": [True, False, True],
    "datetime": np.array(["2024-01-01"], dtype="datetime64[D]"),
    "str": "1.0, 2.0",
    "bytes": b"\x01\x02",
    "None": None,
    "dict": {"a": 1.0},
}


@door_param
@pytest.mark.parametrize("kind", list(WRONG_KINDS))
def test_wrong_kind_of_input(door, kind):
    with pytest.raises(TypeError, match=name_re(arg_name(door))):
        call(door, WRONG_KINDS[kind])


@door_param
@pytest.mark.parametrize("ragged", [[[1, 2], [3]], [1, [2, 3]], [[1.0], [2.0, 3.0], []]])
def test_ragged_lists(door, ragged):
    with pytest.raises(TypeError, match=name_re(arg_name(door))):
        call(door, ragged)


@pytest.mark.parametrize("bad", ["1.0", None, [1.0, 2.0], True, 1 + 0j])
def test_scale_of_the_wrong_kind(bad):
    with pytest.raises(TypeError, match=name_re("scale")):
        dequantize_from_int4(np.array([1], np.int8), bad)


@pytest.mark.parametrize("bad", ["0", None, [0.0, 1.0], False])
def test_zero_point_of_the_wrong_kind(bad):
    with pytest.raises(TypeError, match=name_re("zero_point")):
        dequantize_from_int4(np.array([1], np.int8), 1.0, bad)


@pytest.mark.parametrize("bad", [None, 1, ["minmax"], b"minmax"])
def test_scale_method_of_the_wrong_kind(bad):
    with pytest.raises(TypeError, match=name_re("scale_method")):
        quantize_to_int4([1.0, 2.0], bad)


@pytest.mark.parametrize("bad", [None, 4, 4.0, ["int4"]])
def test_format_of_the_wrong_kind(bad):
    with pytest.raises(TypeError, match=r"\bformat\b"):
        get_format(bad)
    with pytest.raises(TypeError, match=r"\bformat\b"):
        quantize_tensor([1.0, 2.0], bad)


@pytest.mark.parametrize("bad", [None, "qt", np.zeros(4), {"data": b""}])
def test_dequantize_tensor_needs_a_quantized_tensor(bad):
    with pytest.raises(TypeError, match=name_re("qt")):
        dequantize_tensor(bad)


@pytest.mark.parametrize("bad", [np.complex64, object, str, bool, "float7"])
def test_dequantize_to_a_non_float_dtype(bad):
    """dequantize(dtype=...) wants a float dtype; anything else is a TypeError naming dtype."""
    qt = _qt()
    with pytest.raises(TypeError, match=name_re("dtype")):
        qt.dequantize(bad)
    with pytest.raises(TypeError, match=name_re("dtype")):
        dequantize_tensor(qt, bad)


# --------------------------------------------------------------------------- block_size / axis

X2 = np.arange(24, dtype=np.float32).reshape(4, 6)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [0, -5, -2, np.int64(0)])
def test_block_size_bad_value(fmt, bad):
    with pytest.raises(ValueError, match=name_re("block_size")):
        quantize_tensor(X2, fmt, block_size=bad)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [2.5, 4.0, True, False, "4", [4], np.float32(4)])
def test_block_size_bad_kind(fmt, bad):
    with pytest.raises(TypeError, match=name_re("block_size")):
        quantize_tensor(X2, fmt, block_size=bad)


@pytest.mark.parametrize("good", [None, -1, 1, 4, 6, 7, np.int64(3), np.uint8(5)])
def test_block_size_good_values(good):
    qt = quantize_tensor(X2, "int4", block_size=good)
    assert qt.block_size == (6 if good in (None, -1) else int(good))


@pytest.mark.parametrize("bad", [2, -3, 10, -100])
def test_axis_out_of_range(bad):
    with pytest.raises(ValueError, match=name_re("axis")):
        quantize_tensor(X2, "int4", block_size=4, axis=bad)


@pytest.mark.parametrize("bad", [1.0, "0", True, [0]])
def test_axis_bad_kind(bad):
    with pytest.raises(TypeError, match=name_re("axis")):
        quantize_tensor(X2, "int4", block_size=4, axis=bad)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, NAN, INF])
def test_clip_ratio_bad_value(bad):
    with pytest.raises(ValueError, match=name_re("clip_ratio")):
        quantize_tensor(X2, "int4", clip_ratio=bad)


@pytest.mark.parametrize("bad", ["0.5", None, True])
def test_clip_ratio_bad_kind(bad):
    with pytest.raises(TypeError, match=name_re("clip_ratio")):
        quantize_tensor(X2, "int4", clip_ratio=bad)


# --------------------------------------------------------------------------- unknown names


@pytest.mark.parametrize("bad", ["int3", "", "fp4-ish", "int4 "])
def test_unknown_format_lists_the_choices(bad):
    for raise_it in (lambda: get_format(bad), lambda: quantize_tensor(X2, bad)):
        with pytest.raises(ValueError, match=r"\bformat\b") as info:
            raise_it()
        msg = str(info.value)
        assert repr(bad) in msg
        for name in FORMATS:
            assert name in msg


def test_format_names_are_case_insensitive_and_formats_pass_through():
    assert get_format("INT4") is get_format("int4")
    fmt = get_format("uint4")
    assert get_format(fmt) is fmt


@pytest.mark.parametrize("bad", ["foo", "", "max", "min-max"])
def test_unknown_scale_method_lists_the_choices(bad):
    with pytest.raises(ValueError, match=name_re("scale_method")) as info:
        quantize_to_int4([1.0, 2.0], bad)
    msg = str(info.value)
    assert "minmax" in msg and "absmax" in msg and repr(bad) in msg


# --------------------------------------------------------------------------- codes out of range

OUT_OF_INT4 = [
    (np.array([0, 8], np.int8), "(1,)"),
    (np.array([-9, 0], np.int8), "(0,)"),
    (np.array([[1, 2], [3, 100]], np.int16), "(1, 1)"),
    (np.array([200], np.uint8), "(0,)"),
    (np.array([2**40], np.int64), "(0,)"),
    ([0, 1, 16], "(2,)"),
    (np.array([7.0, -8.0, 8.0]), "(2,)"),
]


@pytest.mark.parametrize(("bad", "index"), OUT_OF_INT4)
def test_dequantize_codes_out_of_range(bad, index):
    with pytest.raises(ValueError, match=name_re("quantized_values")) as info:
        dequantize_from_int4(bad, 1.0, 0.0)
    assert "[-8, 7]" in str(info.value) and index in str(info.value)


@pytest.mark.parametrize(("bad", "index"), OUT_OF_INT4)
def test_pack_codes_out_of_range(bad, index):
    """8 would wrap to -8 in a nibble: it must raise instead."""
    with pytest.raises(ValueError, match=name_re("int4_values")) as info:
        pack_int4_to_int8(bad)
    assert "[-8, 7]" in str(info.value) and index in str(info.value)


@pytest.mark.parametrize("bad", [[0.5, 1.0], np.array([1.0, 2.25], np.float32)])
def test_codes_must_be_whole_numbers(bad):
    with pytest.raises(ValueError, match=name_re("quantized_values")):
        dequantize_from_int4(bad, 1.0)
    with pytest.raises(ValueError, match=name_re("int4_values")):
        pack_int4_to_int8(bad)
    with pytest.raises(ValueError, match=name_re("packed_values")):
        unpack_int8_to_int4(bad)


@pytest.mark.parametrize("bad", [[256], [-129], np.array([0, 300], np.int16), [1, 2**40]])
def test_unpack_bytes_out_of_range(bad):
    with pytest.raises(ValueError, match=name_re("packed_values")):
        unpack_int8_to_int4(bad)


def test_whole_float_codes_are_accepted():
    np.testing.assert_array_equal(
        dequantize_from_int4(np.array([-8.0, 7.0]), 0.5), np.array([-4.0, 3.5], np.float32)
    )
    np.testing.assert_array_equal(pack_int4_to_int8([1.0, -1.0]), pack_int4_to_int8([1, -1]))


@pytest.mark.parametrize("bad", [0, 0.0, -0.0, -1.0, -1e-30, NAN, INF, -INF])
def test_bad_scale_value(bad):
    with pytest.raises(ValueError, match=name_re("scale")):
        dequantize_from_int4(np.array([1, -2], np.int8), bad, 0.0)


def test_scale_as_numpy_scalar_or_size_1_array_is_accepted():
    codes = np.array([1, -2], np.int8)
    for s in (np.float32(0.5), np.float64(0.5), np.array(0.5), np.array([0.5])):
        np.testing.assert_array_equal(dequantize_from_int4(codes, s), [0.5, -1.0])


# --------------------------------------------------------------------------- huge values

SEED_METHODS = ["minmax", "absmax"]


def _check_seed(x, codes, scale, zp, out=None):
    """Seed result: valid codes, finite params, (c - zp) * scale within scale/2 in float64."""
    x64 = np.asarray(x).astype(np.float64)
    assert codes.dtype == np.int8 and codes.min() >= -8 and codes.max() <= 7
    assert np.isfinite(scale) and scale > 0 and np.isfinite(zp)
    xhat = (codes.astype(np.float64) - zp) * scale
    assert np.all(np.isfinite(xhat))
    amax = float(np.max(np.abs(x64)))
    eps = float(np.finfo(np.float64).eps)
    assert np.all(np.abs(x64 - xhat) <= scale / 2 * (1 + 1e-6) + 8 * eps * amax)
    if out is not None:
        o = out.astype(np.float64)
        assert np.all(np.isfinite(o))
        tol = scale / 2 * (1 + 1e-6) + 8 * eps * amax + float(np.finfo(np.float32).eps) * np.abs(o)
        assert np.all(np.abs(x64 - o) <= tol + float(np.finfo(np.float32).smallest_subnormal))


@pytest.mark.parametrize("method", SEED_METHODS)
@pytest.mark.parametrize(
    "x",
    [
        np.array([-3e38, 1.0, 3e38], np.float32),
        np.array([3e38, 2.9e38, 1e38], np.float32),
        np.array([-3.4028235e38, 0.0, 3.4028235e38], np.float32),
    ],
    ids=["pm3e38", "positive", "float32-max"],
)
def test_seed_huge_float32(method, x):
    codes, scale, zp = quantize_to_int4(x, method)
    _check_seed(x, codes, scale, zp, dequantize_from_int4(codes, scale, zp))


@pytest.mark.parametrize("method", SEED_METHODS)
@pytest.mark.parametrize(
    "x",
    [np.array([-1e308, 0.0, 1e308]), np.array([1e308, 1.7e308]), np.array([-1.7e308, 1e308])],
    ids=["pm1e308", "positive", "pm1.7e308"],
)
def test_seed_huge_float64_quantizes(method, x):
    """quantize_to_int4 must give a finite scale; (the float32 dequantization of values beyond
    float32's range is inf by the float32 return contract, so only the codes are checked)."""
    codes, scale, zp = quantize_to_int4(x, method)
    _check_seed(x, codes, scale, zp)


def _check_core(x, qt):
    """Finite output of the input's dtype, and the error bounds of tests/_bounds.py."""
    out = qt.dequantize()
    assert out.dtype == x.dtype and out.shape == x.shape
    bad = ~np.isfinite(out.astype(np.float64))
    assert not bad.any(), f"{qt.format}: x={x[bad]} dequantizes to {out[bad]}"
    assert np.all(np.isfinite(qt.scales)) and np.all(qt.scales > 0)
    check_error_bounds(x, qt)


#: Formats whose stored scales are 8-bit (E8M0; E4M3 times a float32 tensor scale): their
#: range is about float32's, so float64 input beyond it is out of their reach.
RANGE_LIMITED = [f for f in FORMATS if get_format(f).scale_bits is not None]

HUGE = {
    "f32-pm3e38": np.array([-3e38, -1e38, 0.0, 1e38, 3e38], np.float32),
    "f32-max": np.array([-3.4028235e38, 0.0, 1.0, 3.4028235e38], np.float32),
    "f16-max": np.array([-65504.0, 0.0, 1.0, 65504.0], np.float16),
    "f64-pm1e308": np.array([-1e308, -5e307, 0.0, 1e308]),
    "f64-positive": np.array([1e308, 1.5e308, 1.7e308]),
}
HUGE_CASES = [
    (f, c) for f in FORMATS for c in HUGE if not (c.startswith("f64") and f in RANGE_LIMITED)
]


@pytest.mark.parametrize(("fmt", "case"), HUGE_CASES)
def test_core_huge_values(fmt, case):
    x = HUGE[case]
    for block in (None, 2):
        with np.errstate(all="ignore"):  # a failure should be an assertion, not a warning
            qt = quantize_tensor(x, fmt, block_size=block)
            _check_core(x, qt)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f not in RANGE_LIMITED])
def test_core_valid_huge_input_raises_no_warning(fmt):
    """[1e308, 1.7e308] is quantized exactly as it should be; it must not also emit a
    RuntimeWarning (an overflow inside a check is an implementation detail)."""
    x = HUGE["f64-positive"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        qt = quantize_tensor(x, fmt, block_size=None)
        out = qt.dequantize()
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("method", SEED_METHODS)
def test_seed_valid_huge_input_raises_no_warning(method):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        codes, scale, zp = quantize_to_int4(HUGE["f64-positive"], method)
    _check_seed(HUGE["f64-positive"], codes, scale, zp)


@pytest.mark.parametrize("fmt", RANGE_LIMITED)
@pytest.mark.parametrize("case", ["f64-pm1e308", "f64-positive"])
def test_core_beyond_the_formats_range(fmt, case):
    """float64 beyond an 8-bit-scale format's range: saturate (MX documents it) or refuse with
    a ValueError that says so, not one that blames NaN/Inf the input does not have."""
    x = HUGE[case]
    with np.errstate(all="ignore"):
        try:
            qt = quantize_tensor(x, fmt)
        except ValueError as exc:
            msg = str(exc)
            assert "nan" not in msg.lower() and "inf" not in msg.lower().replace("info", ""), msg
            return
        out = qt.dequantize()
    assert np.all(np.isfinite(out))
    assert np.all(np.sign(out[x != 0]) == np.sign(x[x != 0]))


# --------------------------------------------------------------------------- subnormals

SUBNORMAL = {
    "f32": np.array([1e-40, -2e-40, 3e-41, 0.0, 5e-42, -1e-44], np.float32),
    "f64": np.array([1e-310, -2e-310, 4e-320, 0.0, 5e-322, -1e-323]),
    "f16": np.array([1e-7, -3e-7, 6e-8, 0.0, 2e-7, -1e-7], np.float16),
}
#: The smallest magnitude a format can give back (documented underflow): MX scales stop at
#: E8M0's 2^-127 (times E2M1's 0.5); NVFP4's at E4M3's 2^-9 times a float32 tensor scale.
MIN_NONZERO = {"mxfp4": 2.0**-128, "mxfp4_ceil": 2.0**-128, "nvfp4": 2.0**-10 * 2.0**-149}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(SUBNORMAL))
def test_core_subnormal_blocks_are_not_zeroed(fmt, case):
    x = SUBNORMAL[case]
    assert np.all(np.abs(x[x != 0]) < ml_dtypes.finfo(x.dtype).tiny)  # really subnormal
    floor = MIN_NONZERO.get(fmt, 0.0)
    for block in (None, 2, 3):
        qt = quantize_tensor(x, fmt, block_size=block)
        _check_core(x, qt)
        out = qt.dequantize()
        bs = qt.block_size
        for start in range(0, x.size, bs):
            blk, rec = x[start : start + bs], out[start : start + bs]
            i = int(np.argmax(np.abs(blk)))
            if fmt == "nf4_dq":  # scales quantized together: a block far below its
                continue  # group's largest may round to 0 (bounded by the group, not itself)
            if abs(float(blk[i])) > 2 * floor:  # the block's largest value survives, signed
                assert rec[i] != 0 and np.sign(rec[i]) == np.sign(blk[i]), (start, blk, rec)


@pytest.mark.parametrize("method", SEED_METHODS)
def test_seed_subnormal_float32(method):
    x = SUBNORMAL["f32"]
    codes, scale, zp = quantize_to_int4(x, method)
    out = dequantize_from_int4(codes, scale, zp)
    _check_seed(x, codes, scale, zp, out)
    i = int(np.argmax(np.abs(x)))
    assert out[i] != 0 and np.sign(out[i]) == np.sign(x[i])


@pytest.mark.parametrize("method", SEED_METHODS)
def test_seed_subnormal_float64_quantizes(method):
    x = SUBNORMAL["f64"]
    codes, scale, zp = quantize_to_int4(x, method)
    _check_seed(x, codes, scale, zp)
    i = int(np.argmax(np.abs(x)))
    assert (codes[i] - zp) * scale != 0


# --------------------------------------------------------------------------- all-zero blocks


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_all_zero_blocks(fmt, dtype):
    x = np.array(
        [[0.0, -0.0, 0.0, 0.0, 1.0, -2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]],
        dtype=dtype,
    )
    qt = quantize_tensor(x, fmt, block_size=4)
    zero_block = [(0, 0), (1, 0), (1, 1)]
    for r, b in zero_block:
        # nf4_dq: whatever positive scale its 8-bit code gives (1 for an all-zero tensor)
        assert qt.scales[r, b] == 1.0 or (qt.double_quant is not None and qt.scales[r, b] > 0)
        if qt.zero_points is not None:  # int4_ort: 8, the code of 0 on ORT's grid -8..7
            assert qt.zero_points[r, b] == (8 if fmt == "int4_ort" else 0)
    out = qt.dequantize()
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out[:, :4].astype(np.float64), 0.0)
    np.testing.assert_array_equal(out[1].astype(np.float64), 0.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_tensor(fmt):
    x = np.zeros((3, 5), np.float32)
    for block, axis in [(None, None), (2, 0), (-1, -1)]:
        qt = quantize_tensor(x, fmt, block_size=block, axis=axis)
        assert np.all(qt.scales == 1.0)
        np.testing.assert_array_equal(qt.dequantize(), x)


@pytest.mark.parametrize("method", SEED_METHODS)
def test_seed_all_zeros(method):
    codes, scale, zp = quantize_to_int4([0.0, -0.0, 0.0], method)
    assert (scale, zp) == (1.0, 0.0)
    np.testing.assert_array_equal(dequantize_from_int4(codes, scale, zp), [0.0, 0.0, 0.0])
