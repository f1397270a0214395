"""quant_utils: the seed 003 signatures, the deviations from ModelOpt, and bad input.

Parity with ModelOpt on ordinary inputs is in test_modelopt_parity.py; here each documented
deviation is shown against an independent computation of the right answer.
"""

from __future__ import annotations

import inspect

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize import quant_utils as qu

SEED_SIGNATURES = {
    "compute_e8m0": "(amax, weight_shape, quant_axis, block_size)",
    "dq_tensor": "(w, s, block_size, quantize_axis=0, zp=None)",
    "find_scales": "(w, block_size, quantize_axis=0, alpha=1.0, use_zero_point=False, num_bits=4)",
    "get_amax": "(weight, quant_axis, block_size)",
    "get_num_bits": "(precision_info=None, name=None)",
    "get_weights_scaling_factor": "(input, block_size, weights_scaling_factor_2)",
    "get_weights_scaling_factor_2": "(input)",
    "pack_float32_to_4bit_cpp_based": "(array, signed)",
    "pack_float32_to_4bit_optimized": "(array, signed)",
    "pack_weights_to_int4": "(weight)",
    "quant_tensor": "(w, block_size, quantize_axis=0, alpha=1.0, use_zero_point=False, num_bits=4)",
    "quantize": "(input, block_size, weights_scaling_factor, weights_scaling_factor_2)",
    "reshape_scales_for_per_channel_nodes": "(scales_map, block_size, precision_info=None)",
    "rtn": "(w, s, block_size, quantize_axis=0, zp=None, num_bits=4)",
    "update_block_size": "(num_bits, block_size, quantize_axis=0, w=None)",
}


def _params(fn) -> str:
    """The signature without annotations and without our keyword-only extras."""
    parts = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY:
            continue
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return "(" + ", ".join(parts) + ")"


@pytest.mark.parametrize("name", sorted(SEED_SIGNATURES))
def test_seed_signature(name):
    assert _params(getattr(qu, name)) == SEED_SIGNATURES[name]


# --- deviation 1: get_amax on axis 0 takes contiguous rows --------------------------------------


def test_get_amax_axis0_blocks_are_contiguous_rows():
    w = np.zeros((8, 3), np.float32)
    w[1, 0] = 5.0  # rows 0-3 are block 0, rows 4-7 block 1 (block_size 4)
    w[6, 2] = -7.0
    amax = qu.get_amax(w, 0, 4)
    # ModelOpt's reshape(4, -1) would put w[1, 0] into block (1, 0): here it stays in block 0.
    expected = np.abs(w).reshape(2, 4, 3).max(axis=1).reshape(-1)
    np.testing.assert_array_equal(amax, expected)
    np.testing.assert_array_equal(amax.reshape(2, 3), [[5, 0, 0], [0, 0, 7]])


# --- deviation 2: tiny blocks are not zeroed ----------------------------------------------------


@pytest.mark.parametrize("use_zero_point", [False, True])
def test_tiny_blocks_survive(use_zero_point):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((4, 32)) * 1e-7).astype(np.float32)
    w[:, 0] = -1e-7  # every block straddles zero, so zero-point mode is not the issue here
    w[:, 1] = 1e-7
    wq, s, z = qu.quant_tensor(w, 16, 1, use_zero_point=use_zero_point)
    assert np.count_nonzero(wq - (0 if z is None else z.repeat(16, axis=1))) > w.size // 2
    back = qu.dq_tensor(wq, s, 16, 1, z)
    step = s.repeat(16, axis=1)
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5))


def test_all_zero_block_gets_scale_one():
    w = np.zeros((2, 8), np.float32)
    w[1] = np.arange(8)
    s, _ = qu.find_scales(w, 8, 1)
    assert s[0, 0] == 1.0 and s[1, 0] == np.float32(7) / 7
    np.testing.assert_array_equal(qu.rtn(w, s, 8, 1)[0], 0)


def test_subnormal_block_scale_never_clips_more_than_half_a_step():
    w = np.array([[1e-44, -3e-44, 5e-45, 2e-45]], np.float32)  # subnormals: amax/7 rounds
    s, _ = qu.find_scales(w, 4, 1)
    assert s[0, 0] > 0
    back = qu.dq_tensor(qu.rtn(w, s, 4, 1), s, 4, 1)
    assert np.all(np.abs(back - w) <= s[0, 0] / 2 * 1.0001)


# --- deviation 3: zero-point ranges include zero; alpha applies ---------------------------------


def test_zero_point_block_away_from_zero():
    w = np.linspace(10, 11, 16, dtype=np.float32).reshape(1, 16)
    wq, s, z = qu.quant_tensor(w, 16, 1, use_zero_point=True)
    back = qu.dq_tensor(wq, s, 16, 1, z)
    # ModelOpt: s = 1/15, z clipped to 0, codes clip at 15 -> values ~1.0 (error ~10).
    assert z[0, 0] == 0 and s[0, 0] == np.float32(11) / 15
    assert np.abs(back - w).max() <= s[0, 0] / 2 * (1 + 1e-6)


def test_zero_point_alpha_shrinks_the_range():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    s1, _ = qu.find_scales(w, 32, 1, 1.0, True)
    s2, _ = qu.find_scales(w, 32, 1, 0.5, True)
    np.testing.assert_allclose(s2, s1 * 0.5, rtol=1e-6)


# --- deviation 4: 8-bit zero-point codes do not wrap --------------------------------------------


def test_rtn_8bit_zero_point_codes_are_uint8():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    wq, s, z = qu.quant_tensor(w, 32, 1, use_zero_point=True, num_bits=8)
    assert wq.dtype == np.uint8 and wq.max() > 127
    back = qu.dq_tensor(wq, s, 32, 1, z)
    assert np.abs(back - w).max() <= s.max() / 2 * (1 + 1e-6)


# --- deviation 5: compute_e8m0 for FP4 and exactly ---------------------------------------------


def test_compute_e8m0_fp4_uses_the_fp4_maximum():
    w = np.full((2, 32), 3.0, np.float32)
    amax = qu.get_amax(w, 1, 32)
    fp8 = qu.compute_e8m0(amax, w.shape, 1, 32)
    fp4 = qu.compute_e8m0(amax, w.shape, 1, 32, elem_max=6.0)
    assert fp8[0, 0] == 127 - 7  # 3 / 2^-7 = 384 <= 448
    assert fp4[0, 0] == 127 - 1  # 3 / 2^-1 = 6 <= 6; with 448 the FP4 elements would be 384
    assert 3.0 / 2.0 ** (fp4[0, 0] - 127) <= 6.0


@given(st.floats(1e-30, 1e30).map(np.float32), st.sampled_from([448.0, 6.0]))
@settings(max_examples=300, deadline=None)
def test_compute_e8m0_is_the_smallest_power_that_fits(a, elem_max):
    amax = np.array([a], np.float32)
    e = int(qu.compute_e8m0(amax, (1, 32), 1, 32, elem_max=elem_max)[0, 0]) - 127
    assert float(amax[0]) <= elem_max * 2.0**e
    assert e == -127 or float(amax[0]) > elem_max * 2.0 ** (e - 1)


def test_compute_e8m0_just_above_a_power_of_two():
    # float32 log2 of 16 * (1 + 2^-23) rounds to exactly 4: ceil() gives an exponent too small.
    amax = np.array([np.nextafter(np.float32(7168.0), np.float32(np.inf))], np.float32)
    e = qu.compute_e8m0(amax, (1, 32), 1, 32)[0, 0] - 127
    assert e == 5 and amax[0] / 2.0**e <= 448


def test_compute_e8m0_zero_and_bad_amax():
    out = qu.compute_e8m0(np.zeros(2, np.float32), (2, 32), 1, 32)
    np.testing.assert_array_equal(out, 0)
    with pytest.raises(ValueError, match="amax"):
        qu.compute_e8m0(np.array([np.nan, 1], np.float32), (2, 32), 1, 32)
    with pytest.raises(ValueError, match="amax"):
        qu.compute_e8m0(np.array([-1.0, 1.0]), (2, 32), 1, 32)
    with pytest.raises(ValueError, match="amax has 3 values"):
        qu.compute_e8m0(np.ones(3), (2, 32), 1, 32)
    with pytest.raises(ValueError, match="E8M0"):
        qu.compute_e8m0(np.array([1e300, 1.0]), (2, 32), 1, 32)


# --- deviation 6: float16 weights -----------------------------------------------------------------


def test_float16_scales_cover_their_blocks():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 64)).astype(np.float16)
    wq, s, _ = qu.quant_tensor(w, 32, 1)
    assert s.dtype == np.float16 and wq.dtype == np.int8
    back = qu.dq_tensor(wq, s, 32, 1)
    assert back.dtype == np.float16
    err = np.abs(back.astype(np.float32) - w.astype(np.float32))
    # half a step, plus float16 rounding of the product
    assert np.all(err <= s.astype(np.float32).repeat(32, axis=1) * 0.5 + 1e-3 * np.abs(w))


def test_bfloat16_weights_work():
    w = (np.arange(64, dtype=np.float32).reshape(2, 32) - 30).astype(ml_dtypes.bfloat16)
    wq, s, _ = qu.quant_tensor(w, 32, 1)
    assert s.dtype == ml_dtypes.bfloat16
    assert wq.min() >= -8 and wq.max() <= 7


# --- deviation 7: any rank, negative axes, 3-D axis 1 -------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_3d_any_axis_matches_per_slice_quantization(axis):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 20, 10)).astype(np.float32)
    wq, s, _ = qu.quant_tensor(w, 4, axis)
    ax = axis % 3
    moved = np.moveaxis(w, ax, -1)  # every other index is an independent row
    rows = moved.reshape(-1, moved.shape[-1])
    for r, row in enumerate(rows[:7]):
        q_row, s_row, _ = qu.quant_tensor(row.reshape(1, -1), 4, 1)
        np.testing.assert_array_equal(np.moveaxis(wq, ax, -1).reshape(rows.shape)[r], q_row[0])
        np.testing.assert_array_equal(
            np.moveaxis(s, ax, -1).reshape(rows.shape[0], -1)[r], s_row[0]
        )


# --- round trips ----------------------------------------------------------------------------------


@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    block=st.integers(1, 48),
    axis=st.sampled_from([0, 1, -1]),
    zp=st.booleans(),
    bits=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=150, deadline=None)
def test_quant_dequant_round_trip_within_half_a_step(rows, cols, block, axis, zp, bits, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 100)).astype(np.float32)
    wq, s, z = qu.quant_tensor(w, block, axis, use_zero_point=zp, num_bits=bits)
    assert wq.shape == w.shape and s.shape[axis] == -(-w.shape[axis] // block)
    back = qu.dq_tensor(wq, s, block, axis, z)
    step = np.take(s.repeat(block, axis=axis), np.arange(w.shape[axis]), axis=axis)
    assert np.all(np.abs(back - w) <= step * 0.5 * (1 + 1e-5) + 1e-30)


@given(st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=65), st.booleans())
@settings(max_examples=150, deadline=None)
def test_pack_float32_to_4bit_matches_round_and_clip(values, signed):
    arr = np.array(values, np.float32)
    packed = qu.pack_float32_to_4bit_optimized(arr, signed)
    assert packed.dtype == np.uint8 and packed.shape == (-(-arr.size // 2),)
    np.testing.assert_array_equal(packed, qu.pack_float32_to_4bit_cpp_based(arr, signed))
    lo, hi = (-8, 7) if signed else (0, 15)
    expect = np.rint(np.clip(arr, lo, hi)).astype(np.int64) & 0xF
    got = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[: arr.size]
    np.testing.assert_array_equal(got, expect)
    if arr.size % 2:
        assert packed[-1] >> 4 == 0


def test_pack_weights_to_int4_shape_and_layout():
    w = np.array([[1.5, -2.5, 7.9], [-9.0, 0.4, 3.5]], np.float32)  # ties go to even
    out = qu.pack_weights_to_int4(w)
    assert out.shape == (1, 3) and out.dtype == np.uint8
    codes = np.array([2, -2, 7, -8, 0, 4]) & 0xF
    np.testing.assert_array_equal(out.reshape(-1), codes[0::2] | (codes[1::2] << 4))


def test_nvfp4_scaling_chain():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 64)).astype(np.float32) * 3
    w[1, :16] = 0
    s2 = qu.get_weights_scaling_factor_2(w)
    assert s2.dtype == np.float32 and s2 == np.float32(np.abs(w).max()) / np.float32(2688)
    s = qu.get_weights_scaling_factor(w, 16, s2)
    assert s.shape == (4, 4) and s[1, 0] == 1.0
    assert np.isclose(s.max(), 448, rtol=1e-6)
    scaled = qu.quantize(w, 16, s, s2)
    assert scaled.shape == w.shape and np.abs(scaled).max() <= 6 * (1 + 1e-6)
    assert qu.get_weights_scaling_factor_2(np.zeros((2, 16), np.float32)) == 1.0


# --- configuration helpers ------------------------------------------------------------------------


def test_config_helpers():
    w = np.zeros((12, 5))
    assert qu.update_block_size(4, -1, 0, w) == 12
    assert qu.update_block_size(8, -1, 1, w) == 5
    assert qu.update_block_size(4, 32, 0, w) == 32
    assert qu.get_num_bits() == 4
    assert qu.get_num_bits({"a": 8}, "a") == 8 and qu.get_num_bits({"a": 8}, "b") == 4
    assert qu.get_num_bits({"a": {"precision": 8}}, "a") == 8
    m = {"a": np.ones((3, 1)), "b": np.ones((3, 2))}
    out = qu.reshape_scales_for_per_channel_nodes(m, -1)
    assert out is m and m["a"].shape == (3,) and m["b"].shape == (6,)
    m = {"a": np.ones((3, 1)), "b": np.ones((3, 2))}
    qu.reshape_scales_for_per_channel_nodes(m, 32, {"a": {"block_size": -1}})
    assert m["a"].shape == (3,) and m["b"].shape == (3, 2)


# --- bad input --------------------------------------------------------------------------------


W = np.ones((4, 8), np.float32)
S = np.ones((4, 2), np.float32)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: qu.find_scales(np.array([[np.nan, 1.0]]), 2, 1),
            ValueError,
            "w contains a non-finite",
        ),
        (lambda: qu.find_scales(np.array([[np.inf, 1.0]]), 2, 1), ValueError, r"index \(0, 0\)"),
        (lambda: qu.find_scales(np.zeros((0, 4)), 2, 1), ValueError, "w is empty"),
        (lambda: qu.find_scales(W, 0, 1), ValueError, "block_size"),
        (lambda: qu.find_scales(W, 2.5, 1), TypeError, "block_size"),
        (lambda: qu.find_scales(W, 4, 2), ValueError, "quantize_axis"),
        (lambda: qu.find_scales(W, 4, 1, alpha=0), ValueError, "alpha"),
        (lambda: qu.find_scales(W, 4, 1, num_bits=9), ValueError, "num_bits"),
        (lambda: qu.find_scales(W, 4, 1, use_zero_point="yes"), TypeError, "use_zero_point"),
        (lambda: qu.find_scales(W.astype(complex), 4, 1), TypeError, "w must hold real"),
        (lambda: qu.find_scales(np.array([["a"]]), 4, 1), TypeError, "w must hold real"),
        (lambda: qu.rtn(W, S[:, :1], 4, 1), ValueError, "s has shape"),
        (lambda: qu.rtn(W, S * 0, 4, 1), ValueError, "s must hold scales > 0"),
        (lambda: qu.rtn(W, S * np.nan, 4, 1), ValueError, "s contains a non-finite"),
        (lambda: qu.rtn(W, S, 4, 1, zp=S * 16), ValueError, r"zp must lie in \[0, 15\]"),
        (lambda: qu.rtn(W, S, 4, 1, zp=S * 0.5), ValueError, "zp must hold whole numbers"),
        (lambda: qu.dq_tensor(W * 0.5, S, 4, 1), ValueError, "w must hold whole numbers"),
        (lambda: qu.dq_tensor(W * 300, S, 4, 1), ValueError, "w must lie in"),
        (lambda: qu.dq_tensor(W, S[:1], 4, 1), ValueError, "s has shape"),
        (lambda: qu.pack_float32_to_4bit_optimized([1.0, np.nan], True), ValueError, "array"),
        (lambda: qu.pack_float32_to_4bit_optimized([], True), ValueError, "array is empty"),
        (lambda: qu.pack_float32_to_4bit_optimized([1.0], 1), TypeError, "signed"),
        (lambda: qu.pack_weights_to_int4(np.ones((3, 2))), ValueError, "first dimension"),
        (lambda: qu.get_amax(np.ones(8), 0, 4), ValueError, "2-D or 3-D"),
        (lambda: qu.get_amax(np.ones((8, 6)), 1, 4), ValueError, "not divisible"),
        (lambda: qu.get_amax(np.ones((2, 8, 4)), 0, 4), ValueError, "quant_axis"),
        (lambda: qu.get_weights_scaling_factor(np.ones((2, 20)), 16, 1.0), ValueError, "divisible"),
        (
            lambda: qu.get_weights_scaling_factor(np.ones((2, 16)), 16, 0.0),
            ValueError,
            "weights_scaling_factor_2",
        ),
        (lambda: qu.get_weights_scaling_factor_2(np.array([np.inf])), ValueError, "input"),
        (
            lambda: qu.quantize(np.ones((2, 32)), 16, np.ones((2, 3)), 1.0),
            ValueError,
            "weights_scaling_factor has shape",
        ),
        (
            lambda: qu.quantize(np.ones((2, 32)), 16, np.zeros((2, 2)), 1.0),
            ValueError,
            "weights_scaling_factor must",
        ),
        (lambda: qu.update_block_size(4, -1), ValueError, "w is required"),
        (lambda: qu.update_block_size(4, 0, 0, W), ValueError, "block_size"),
        (lambda: qu.reshape_scales_for_per_channel_nodes([1], -1), TypeError, "scales_map"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
