"""The 4-bit float and codebook formats: fp4_e2m1, mxfp4, mxfp4_ceil, nvfp4, nf4.

Known answers come from the defining specs and libraries: ml_dtypes.float4_e2m1fn for E2M1 (OCP
MX v1.0), the OCP MX v1.0 shared-exponent rule, ModelOpt's NVFP4 chain as
`quant_utils` reproduces it, and bitsandbytes' NF4 table and decision tree. Property tests run
every format through `quantize_tensor` on any axis, block size, and float dtype.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantize import available_formats, get_format, quantize_tensor
from quantize import quant_utils as qu
from quantize.blocking import from_blocks, to_blocks
from quantize.formats.base import effective_scale
from quantize.formats.fp4 import E2M1_VALUES, e2m1_decode, e2m1_encode
from quantize.formats.mx import e8m0_exponent, e8m0_scale
from quantize.formats.nf4 import NF4_MIDPOINTS, NF4_VALUES, nf4_encode

FP4 = ml_dtypes.float4_e2m1fn
E2M1_FORMATS = ["fp4_e2m1", "mxfp4", "mxfp4_ceil", "nvfp4"]
NEW_FORMATS = [*E2M1_FORMATS, "nf4"]
GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

# bitsandbytes: bitsandbytes/backends/utils.py _NF4_QUANT_TABLE (= functional.get_4bit_type)
BNB_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
# bitsandbytes: csrc/kernels.cu dQuantizeNF4, the `x > t` thresholds of its decision tree
BNB_NF4_THRESHOLDS = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
]


def ml_e2m1(x) -> np.ndarray:
    """ml_dtypes' E2M1 codes for `x` (cast via float32)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(x, np.float32).astype(FP4).view(np.uint8)


def tensor_codes(qt) -> np.ndarray:
    """The codes in the tensor's own layout (padding dropped)."""
    if qt.axis is None:
        return from_blocks(qt.codes(), qt.size, 0).reshape(qt.shape)
    return from_blocks(qt.codes(), qt.shape[qt.axis], qt.axis)


def tensor_eff(qt) -> np.ndarray:
    """Each element's effective scale (as `encode` got it), float64, in the tensor's layout."""
    eff = effective_scale(qt.scales, qt.tensor_scale).astype(np.float64)
    per_elem = np.repeat(eff[..., None], qt.block_size, axis=-1)
    if qt.axis is None:
        return from_blocks(per_elem, qt.size, 0).reshape(qt.shape)
    return from_blocks(per_elem, qt.shape[qt.axis], qt.axis)


# --- registry ---------------------------------------------------------------------------------


def test_new_formats_are_registered_with_unsigned_nibbles():
    assert set(NEW_FORMATS) <= set(available_formats())
    for name in NEW_FORMATS:
        fmt = get_format(name)
        assert (fmt.bits, fmt.code_min, fmt.code_max, fmt.zero_point) == (4, 0, 15, None)
        assert not fmt.signed_codes and fmt.description
    assert [get_format(n).scale_bits for n in NEW_FORMATS] == [None, 8, 8, 8, None]
    assert get_format("mxfp4").default_block_size == 32
    assert get_format("nvfp4").default_block_size == 16
    assert get_format("nf4").default_block_size == 64


def test_bits_per_weight_counts_8_bit_scales():
    w = np.ones((4, 64), np.float32)
    assert quantize_tensor(w, "mxfp4", 32).bits_per_weight == 4.25
    assert quantize_tensor(w, "nvfp4", 16).bits_per_weight == 4.5 + 32 / w.size
    assert quantize_tensor(w, "fp4_e2m1", 32).bits_per_weight == 5.0
    assert quantize_tensor(w, "nf4", 64).bits_per_weight == 4.5


# --- E2M1 against ml_dtypes -------------------------------------------------------------------


def test_e2m1_decode_all_16_codes_bit_for_bit():
    codes = np.arange(16, dtype=np.uint8)
    ours = e2m1_decode(codes)
    theirs = codes.view(FP4).astype(np.float32)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # -0.0 too
    np.testing.assert_array_equal(E2M1_VALUES[:8], GRID)
    np.testing.assert_array_equal(e2m1_decode(codes | 0xF0), ours)  # only the low nibble


def test_e2m1_encode_equals_ml_dtypes_on_random_bit_patterns():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)  # every kind of float32: NaN, Inf, subnormal, huge
    np.testing.assert_array_equal(e2m1_encode(x), ml_e2m1(x))
    y = rng.uniform(-8, 8, 1 << 20).astype(np.float32)  # dense where the grid is
    np.testing.assert_array_equal(e2m1_encode(y), ml_e2m1(y))


MIDPOINTS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
MIDPOINT_CODES = [0, 2, 2, 4, 4, 6, 6]  # ties to the even code (mantissa bit 0)


def test_e2m1_midpoints_round_to_even_and_match_ml_dtypes():
    m = np.array(MIDPOINTS, np.float32)
    np.testing.assert_array_equal(e2m1_encode(m), MIDPOINT_CODES)
    np.testing.assert_array_equal(e2m1_encode(-m), np.array(MIDPOINT_CODES) | 8)
    up, down = np.nextafter(m, np.float32(np.inf)), np.nextafter(m, np.float32(0))
    np.testing.assert_array_equal(e2m1_encode(up), np.arange(1, 8))
    np.testing.assert_array_equal(e2m1_encode(down), np.arange(0, 7))
    for x in (m, up, down):
        for s in (x, -x):
            np.testing.assert_array_equal(e2m1_encode(s), ml_e2m1(s))


def test_e2m1_zeros_saturation_and_specials():
    x = np.array(
        [0.0, -0.0, 0.1, -0.1, 1e-45, -1e-45, 6.0, 6.5, 7.0, 8.0, 1e30, -7.0, -1e30, np.inf,
         -np.inf, np.nan, -np.nan],
        np.float32,
    )  # fmt: skip
    want = [0, 8, 0, 8, 0, 8, 7, 7, 7, 7, 7, 15, 15, 7, 15, 8, 0]
    np.testing.assert_array_equal(e2m1_encode(x), want)
    np.testing.assert_array_equal(e2m1_encode(x), ml_e2m1(x))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_e2m1_encode_narrow_floats(dtype):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-8, 8, 4096), MIDPOINTS, np.negative(MIDPOINTS)]).astype(dtype)
    np.testing.assert_array_equal(e2m1_encode(x), ml_e2m1(x.astype(np.float32)))


def test_e2m1_float64_rounds_directly():
    # ml_dtypes casts float64 via float32: 0.25 + 2^-40 becomes 0.25, a tie, and goes to 0.
    x = np.array([0.25 + 2**-40, 5.0 + 2**-40, 2.5 - 2**-40, 0.75 - 2**-40], np.float64)
    np.testing.assert_array_equal(e2m1_encode(x), [1, 7, 4, 1])
    # float64 values that are float32 values: the same codes as ml_dtypes
    y = np.random.default_rng(2).uniform(-8, 8, 4096).astype(np.float32)
    np.testing.assert_array_equal(e2m1_encode(y.astype(np.float64)), ml_e2m1(y))


# --- NF4 against bitsandbytes -----------------------------------------------------------------


def test_nf4_table_is_bitsandbytes():
    np.testing.assert_array_equal(NF4_VALUES, np.array(BNB_NF4, np.float32))
    assert NF4_VALUES.dtype == np.float32 and len(NF4_VALUES) == 16
    assert NF4_VALUES[0] == -1.0 and NF4_VALUES[7] == 0.0 and NF4_VALUES[15] == 1.0
    assert NF4_VALUES[8] == np.float32(0.07958029955625534)
    assert (np.diff(NF4_VALUES) > 0).all()
    np.testing.assert_array_equal(
        NF4_MIDPOINTS.astype(np.float32), np.array(BNB_NF4_THRESHOLDS, np.float32)
    )


def test_nf4_hand_encodings():
    x = np.array([1.0, -1.0, 0.0, 0.5, 0.6, 0.04, 0.039, -0.05, -0.04, -0.8, -0.9], np.float32)
    want = [15, 0, 7, 12, 13, 8, 7, 6, 7, 1, 0]
    np.testing.assert_array_equal(nf4_encode(x), want)
    np.testing.assert_array_equal(nf4_encode(x.astype(np.float64)), want)
    np.testing.assert_array_equal(nf4_encode(np.array([2.0, -3.0])), [15, 0])  # beyond +-1


def test_nf4_ties_go_to_the_lower_code():
    t = np.array(BNB_NF4_THRESHOLDS, np.float32)
    np.testing.assert_array_equal(nf4_encode(t), np.arange(15))  # x > t is False on t
    np.testing.assert_array_equal(nf4_encode(np.nextafter(t, np.float32(2))), np.arange(1, 16))
    np.testing.assert_array_equal(nf4_encode(NF4_MIDPOINTS), np.arange(15))  # float64: exact


def test_nf4_scale_is_absmax_and_normalises_as_bitsandbytes():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((8, 128)) * rng.uniform(0.01, 10, (8, 1))).astype(np.float32)
    w[3, 64:] = 0
    qt = quantize_tensor(w, "nf4", 64)
    amax = np.abs(w).reshape(8, 2, 64).max(axis=-1)
    np.testing.assert_array_equal(qt.scales, np.where(amax == 0, 1, amax))
    # bitsandbytes: x * (1 / absmax) in float32, then the dQuantizeNF4 threshold tree
    scaled = w.reshape(8, 2, 64) * (np.float32(1) / qt.scales)[..., None]
    want = (scaled[..., None] > np.array(BNB_NF4_THRESHOLDS, np.float32)).sum(axis=-1)
    np.testing.assert_array_equal(qt.codes(), want)
    np.testing.assert_array_equal(
        qt.dequantize(), (NF4_VALUES[want] * qt.scales[..., None]).reshape(8, 128)
    )


def test_nf4_subnormal_absmax_still_encodes():
    q = np.float32(1e-45)  # the smallest subnormal; 1 / (3 * q) overflows float32
    x = np.array([3 * q, -3 * q, 0.0, q], np.float32)
    qt = quantize_tensor(x, "nf4", 4)
    np.testing.assert_array_equal(qt.codes().reshape(-1), [15, 0, 7, 11])  # 1/3 -> 0.3379
    np.testing.assert_array_equal(qt.dequantize(), x)


# --- MXFP4: OCP MX v1.0 shared exponent ------------------------------------------------------


@pytest.mark.parametrize(
    ("amax", "exp"),
    [(6.0, 0), (7.0, 0), (7.99, 0), (8.0, 1), (4.0, 0), (3.99, -1), (1.0, -2), (0.75, -3),
     (448.0, 6), (2.0**-100, -102), (2.0**-126, -127), (2.0**-140, -127), (0.0, 0)],
)  # fmt: skip
def test_mxfp4_scale_exponent_hand_examples(amax, exp):
    # shared_exp = floor(log2(amax)) - emax_elem, emax_elem = 2 for E2M1; clamped to >= -127;
    # an all-zero block gets 2^0 (the library's convention)
    block = np.array([amax, -amax / 3, 0.0], np.float32)
    qt = quantize_tensor(block, "mxfp4", 3)
    assert qt.scales[0] == np.float32(2.0**exp)


def test_mxfp4_clips_above_six_as_the_spec_does():
    qt = quantize_tensor(np.array([7.0, -7.5, 6.0, 1.0], np.float32), "mxfp4", 4)
    assert qt.scales[0] == 1.0  # floor(log2 7.5) - 2 = 0
    np.testing.assert_array_equal(qt.codes().reshape(-1), [7, 15, 7, 2])
    np.testing.assert_array_equal(qt.dequantize(), [6.0, -6.0, 6.0, 1.0])
    qt = quantize_tensor(np.array([8.0, 7.0, 0.5], np.float32), "mxfp4", 3)
    np.testing.assert_array_equal([qt.scales[0], *qt.dequantize()], [2.0, 8.0, 8.0, 0.0])


def test_mxfp4_e8m0_top_clamp_for_float64():
    x = np.array([2.0**200, 2.0**129, -1.0])  # E8M0 tops out at 2^127
    for name in ("mxfp4", "mxfp4_ceil"):
        qt = quantize_tensor(x, name, 3)
        assert qt.scales.dtype == np.float64 and qt.scales[0] == 2.0**127
        np.testing.assert_array_equal(qt.dequantize(), [6 * 2.0**127, 2.0**129, -0.0])


@pytest.mark.parametrize(
    ("amax", "exp"),
    [(6.0, 0), (7.0, 1), (float(np.nextafter(np.float32(6), np.float32(7))), 1), (12.0, 1),
     (3.0, -1), (1.0, -2), (0.0, 0), (2.0**-140, -127)],
)  # fmt: skip
def test_mxfp4_ceil_scale_exponent_hand_examples(amax, exp):
    # shared_exp = ceil(log2(amax / 6)): the smallest power of two that fits amax in 6
    qt = quantize_tensor(np.array([amax, 0.0], np.float32), "mxfp4_ceil", 2)
    assert qt.scales[0] == np.float32(2.0**exp)
    assert amax <= 6 * 2.0**exp and (exp in (-127, 0) or amax > 3 * 2.0**exp)


def test_mxfp4_ceil_equals_modelopt_compute_e8m0_fp4():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((16, 256)) * np.exp(rng.normal(0, 8, (16, 8))).repeat(32, 1)).astype(
        np.float32
    )
    w[2, :32] = 0
    qt = quantize_tensor(w, "mxfp4_ceil", 32)
    e8m0 = qu.compute_e8m0(qu.get_amax(w, 1, 32), w.shape, 1, 32, elem_max=6.0)
    ours = np.log2(qt.scales.astype(np.float64)) + 127
    assert e8m0[2, 0] == 0 and ours[2, 0] == 127  # all-zero block: 2^-127 there, 2^0 here
    ours[2, 0] = 0
    np.testing.assert_array_equal(ours, e8m0)


def test_e8m0_exponent_rules():
    a = np.array([0.0, 1.0, 6.0, 6.000001, 447.0, 448.0, 449.0, 2.0**-130, 3e38])
    np.testing.assert_array_equal(
        e8m0_exponent(a, 6.0, "floor"), [-127, -2, 0, 0, 6, 6, 6, -127, 125]
    )
    np.testing.assert_array_equal(
        e8m0_exponent(a, 6.0, "ceil"), [-127, -2, 0, 1, 7, 7, 7, -127, 126]
    )
    np.testing.assert_array_equal(  # MXFP8 E4M3: emax_elem = 8
        e8m0_exponent(a, 448.0, "floor"), [-127, -8, -6, -6, 0, 0, 0, -127, 119]
    )
    np.testing.assert_array_equal(
        e8m0_exponent(a, 448.0, "ceil"), [-127, -8, -6, -6, 0, 0, 1, -127, 120]
    )
    # just above a power of two times elem_max, where float log2 rounds to the power itself
    above = np.nextafter(np.array([6 * 2.0**100, 448 * 2.0**-100]), np.inf)
    np.testing.assert_array_equal(e8m0_exponent(above, 6.0, "ceil"), [101, -93])
    np.testing.assert_array_equal(e8m0_exponent(above, 448.0, "ceil"), [94, -99])
    assert e8m0_exponent(np.array([1e300]), 6.0, "ceil")[0] == 127
    with pytest.raises(ValueError, match="E8M0"):
        e8m0_exponent(np.array([1e300]), 6.0, "ceil", saturate=False)
    with pytest.raises(ValueError, match="rule"):
        e8m0_exponent(np.ones(1), 6.0, "round")
    np.testing.assert_array_equal(e8m0_scale(np.array([-127, 0, 127])), [2.0**-127, 1, 2.0**127])


@given(
    st.floats(0, 1e300, allow_subnormal=True),
    st.sampled_from([6.0, 448.0, 7.5, 0.75, 57344.0]),
)
@settings(max_examples=300, deadline=None)
def test_e8m0_exponent_definitions(a, elem_max):
    fl = int(e8m0_exponent(np.array([a]), elem_max, "floor")[0])
    ce = int(e8m0_exponent(np.array([a]), elem_max, "ceil")[0])
    assert -127 <= fl <= 127 and -127 <= ce <= 127
    # ceil: the smallest exponent that fits
    if ce < 127:
        assert a <= elem_max * 2.0**ce
    assert ce == -127 or a > elem_max * 2.0 ** (ce - 1)
    if a > 0:
        k = int(np.floor(np.log2(a)))  # fix float log2 by exact comparisons
        k += (2.0 ** (k + 1) <= a) - (2.0**k > a)
        j = int(np.floor(np.log2(elem_max)))
        assert fl == min(max(k - j, -127), 127)


# --- NVFP4 against ModelOpt's chain (quant_utils) ---------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nvfp4_equals_the_modelopt_chain_bit_for_bit(dtype):
    rng = np.random.default_rng(5)
    # block scales far apart, but all normal E4M3 values (where no nudge can fire)
    mag = np.exp(rng.normal(0, 1.2, (32, 16))).repeat(16, axis=1)
    w = (rng.standard_normal((32, 256)) * mag).astype(dtype)
    w[5, 32:48] = 0
    s2 = qu.get_weights_scaling_factor_2(w)
    s = qu.get_weights_scaling_factor(w, 16, s2)
    s_e4m3 = s.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    want = ml_e2m1(qu.quantize(w, 16, s_e4m3, s2))

    qt = quantize_tensor(w, "nvfp4", 16)
    assert qt.tensor_scale.dtype == np.float32 and qt.tensor_scale == s2
    np.testing.assert_array_equal(qt.scales, s_e4m3)
    assert qt.scales[5, 2] == 1.0
    np.testing.assert_array_equal(tensor_codes(qt), want)


def test_nvfp4_encode_equals_quantize_for_any_e4m3_scales():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 64)).astype(np.float32) * 5
    s = rng.uniform(0.01, 448, (8, 4)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    ts = np.float32(0.0123)
    fmt = get_format("nvfp4")
    codes = fmt.encode(w.reshape(8, 4, 16), effective_scale(s, ts), None)
    np.testing.assert_array_equal(codes.reshape(8, 64), ml_e2m1(qu.quantize(w, 16, s, ts)))


def test_nvfp4_tiny_blocks_get_a_covering_e4m3_scale():
    w = np.zeros((1, 48), np.float32)
    w[0, :16] = 1000.0
    w[0, 16] = 1e-5  # raw block scale ~1e-5 / (6 * ts): rounds to 0 in E4M3
    w[0, 32] = 0.006  # raw ~1.38 * 2^-9: E4M3 subnormal, rounds to 2^-9: 0.006 = 8.3 steps
    qt = quantize_tensor(w, "nvfp4", 16)
    eff = qt.scales * qt.tensor_scale
    assert (qt.scales > 0).all() and (np.array([1000, 1e-5, 0.006]) <= 6.5 * eff).all()
    back = qt.dequantize()
    assert abs(back[0, 32] - 0.006) <= eff[0, 2] / 2  # 0.006 / eff ~ 4.1 -> 4
    assert qt.scales[0, 0] == 448


def test_nvfp4_subnormal_tensor_scale_is_nudged():
    # 5e-42 / 2688 rounds to the float32 subnormal 2^-149 (1.4e-45); 2688 * that is 3.8e-42
    x = np.array([5e-42, -3e-42, 0.0, 2e-42], np.float32)
    qt = quantize_tensor(x, "nvfp4", 4)
    eff = float(qt.scales[0]) * float(qt.tensor_scale)
    assert (
        qt.tensor_scale > qu.get_weights_scaling_factor_2(x)
        and 6.5 * eff >= x[0]
        and qt.scales[0] <= 448
    )
    assert np.abs(qt.dequantize().astype(np.float64) - x).max() <= eff


def test_nvfp4_rejects_float64_beyond_float32_range():
    with pytest.raises(ValueError, match="float32's range"):
        quantize_tensor(np.array([1e300, 1.0]), "nvfp4", 2)
    qt = quantize_tensor(np.array([3e38, -1.0]), "nvfp4", 2)  # float32's range is fine
    assert qt.scales[0] == 448 and abs(qt.dequantize()[0] - 3e38) <= 3e38 * 1e-6


def test_all_zero_tensor_scales():
    z = np.zeros((2, 32), np.float32)
    z[1, 3] = -0.0
    for name in NEW_FORMATS:
        qt = quantize_tensor(z, name, 16)
        np.testing.assert_array_equal(qt.scales, 1.0)
        assert qt.tensor_scale == (1.0 if name == "nvfp4" else None)
        np.testing.assert_array_equal(qt.dequantize(), 0)
        zero_code = 7 if name == "nf4" else 0
        codes = tensor_codes(qt)
        assert codes[1, 3] == (zero_code if name == "nf4" else 8)  # -0 keeps its sign in E2M1
        codes[1, 3] = zero_code
        np.testing.assert_array_equal(codes, zero_code)


def test_fp4_e2m1_scale_is_amax_over_6_and_covers_subnormal_blocks():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    qt = quantize_tensor(w, "fp4_e2m1", 32)
    np.testing.assert_array_equal(qt.scales, np.abs(w).reshape(4, 2, 32).max(-1) / np.float32(6))
    x = np.array([1e-45, -1e-45, 0], np.float32)  # amax / 6 underflows to 0
    qt = quantize_tensor(x, "fp4_e2m1", 3)
    assert qt.scales[0] > 0 and 6.5 * qt.scales[0] >= x[0]
    np.testing.assert_array_equal(qt.dequantize(), x)


@pytest.mark.parametrize("name", NEW_FORMATS)
def test_clip_ratio_shrinks_the_range_and_saturates(name):
    x = np.array([[10.0, 1.0, -2.0, 0.5]], np.float32)
    full = quantize_tensor(x, name, 4)
    clip = quantize_tensor(x, name, 4, clip_ratio=0.5)
    assert clip.scales[0, 0] == full.scales[0, 0] / 2  # the scale covers 5, not 10
    assert clip.tensor_scale == full.tensor_scale  # NVFP4's tensor scale is not clipped
    assert 5 * (1 - 1e-6) <= clip.dequantize()[0, 0] <= 6  # 10 saturates


# --- properties through quantize_tensor --------------------------------------------------------

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
# float32 stops short of its max: there mxfp4_ceil can round an element up to 2^128 (inf)
LIMIT = {np.float16: 6e4, ml_dtypes.bfloat16: 1e38, np.float32: 1e38, np.float64: 1e38}


@st.composite
def tensors(draw):
    """(array, axis, block_size): any rank 1-3, axis (or None), block size (or None), dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
    lim = float(np.float32(LIMIT[dtype]))  # hypothesis wants float32-exact bounds
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3, 1e-30]))
    elems = st.floats(-lim, lim, allow_nan=False, allow_infinity=False, width=32)
    x = draw(hnp.arrays(np.float64 if dtype == np.float64 else np.float32, shape, elements=elems))
    x = x * min(scale, lim / max(1.0, np.abs(x).max()))
    if draw(st.booleans()):  # some exact zeros, signed
        mask = draw(hnp.arrays(np.bool_, shape))
        x[mask] = draw(st.sampled_from([0.0, -0.0]))
    axis = draw(st.sampled_from([None, *range(-len(shape), len(shape))]))
    block = draw(st.sampled_from([None, 1, 2, 3, 4, 5, 7, 8, 16, 32]))
    with np.errstate(over="ignore"):
        arr = x.astype(dtype)
    return arr, axis, block


def _e2m1_half_step(a: np.ndarray) -> np.ndarray:
    """Half the E2M1 grid spacing around a = |value| / scale: 0.25 up to 2, 0.5 to 4, then 1."""
    return np.select([a < 2, a < 4], [0.25, 0.5], 1.0)


def _nf4_half_gap(v: np.ndarray) -> np.ndarray:
    """Half the gap between the two NF4 values around v = value / scale."""
    t = NF4_VALUES.astype(np.float64)
    i = np.clip(np.searchsorted(t, v), 1, 15)
    return (t[i] - t[i - 1]) / 2


@pytest.mark.parametrize("name", NEW_FORMATS)
@given(case=tensors())
@settings(max_examples=200, deadline=None)
def test_round_trip_within_half_a_step(name, case):
    arr, axis, block = case
    qt = quantize_tensor(arr, name, block, axis)
    x = arr.astype(np.float64)
    back = qt.dequantize(np.float64)
    assert back.shape == arr.shape
    eff = tensor_eff(qt)
    v = x / eff
    a = np.abs(v)
    err = np.abs(back - x)
    atol = 8 * np.finfo(np.float64 if arr.dtype == np.float64 else np.float32).smallest_subnormal
    slack = 1e-6 * eff + atol
    if name == "nf4":
        assert (a <= 1 + 1e-6).all()
        assert (err <= _nf4_half_gap(v) * eff + slack).all()
        return
    if name == "mxfp4":  # the spec's floor rule: amax / 2^e in [4, 8), (6, 8) clips to 6
        assert (a < 8).all()
        clipped = a > 6
        np.testing.assert_array_equal(back[clipped], np.sign(x[clipped]) * 6 * eff[clipped])
        a = np.where(clipped, 6.0, a)
        err = np.where(clipped, 0.0, err)
    else:  # never saturates by more than half the top step
        assert (a <= (6.0 if name == "mxfp4_ceil" else 6.5) * (1 + 1e-6)).all()
    assert (err <= _e2m1_half_step(a) * eff + slack).all()


def _grid_case(name, rng, dtype, shape):
    """(values, per-block scale): block values are scale * grid point, each block has +-max."""
    rows, nb, bs = shape
    idx = rng.integers(0, 16, (rows, nb, bs))
    idx[..., 0] = rng.choice([7, 15] if name != "nf4" else [0, 15], (rows, nb))
    table = NF4_VALUES.astype(np.float64) if name == "nf4" else E2M1_VALUES.astype(np.float64)
    k = rng.integers(-20, 20, (rows, nb)).astype(np.float64)
    if name in ("mxfp4", "mxfp4_ceil"):
        s = 2.0**k
    elif name == "fp4_e2m1":
        s = rng.choice([1.0, 1.25, 1.5, 1.75], (rows, nb)) * 2.0**k
    elif name == "nf4":
        s = rng.uniform(0.5, 2, (rows, nb)).astype(dtype).astype(np.float64) * 2.0**k
    else:  # nvfp4: tensor scale 2^k0 exact when the tensor amax is 6 * 448 * 2^k0
        m = rng.integers(1, 126, (rows, nb)).astype(np.uint8).view(ml_dtypes.float8_e4m3fn)
        s = m.astype(np.float64)
        s[0, 0] = 448.0
        s = s * 2.0 ** rng.integers(-20, 20)
    return (table[idx] * s[..., None]).astype(dtype), s


@pytest.mark.parametrize("name", NEW_FORMATS)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
@settings(max_examples=60, deadline=None)
def test_grid_points_come_back_exactly(name, seed, dtype):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.choice([1, 4, 16])))
    vals, s = _grid_case(name, rng, dtype, shape)
    qt = quantize_tensor(vals.reshape(shape[0], -1), name, shape[2])
    np.testing.assert_array_equal(qt.dequantize(), vals.reshape(shape[0], -1))
    np.testing.assert_array_equal(effective_scale(qt.scales, qt.tensor_scale).astype(np.float64), s)


@pytest.mark.parametrize("name", E2M1_FORMATS)
@given(case=tensors())
@settings(max_examples=120, deadline=None)
def test_e2m1_formats_are_sign_symmetric(name, case):
    arr, axis, block = case
    pos, neg = quantize_tensor(arr, name, block, axis), quantize_tensor(-arr, name, block, axis)
    np.testing.assert_array_equal(pos.scales, neg.scales)
    assert pos.tensor_scale == neg.tensor_scale
    np.testing.assert_array_equal(tensor_codes(neg), tensor_codes(pos) ^ 8)


@given(case=tensors())
@settings(max_examples=200, deadline=None)
def test_nf4_sign_and_order_are_kept(case):
    # The table is not symmetric (7 negative values, 8 positive), so codes(-x) is no mirror of
    # codes(x). What holds: the scales agree, signs are kept (0 -> code 7), codes are monotone
    # in the value within a block, and +-absmax map to the ends of the table exactly.
    arr, axis, block = case
    qt = quantize_tensor(arr, "nf4", block, axis)
    np.testing.assert_array_equal(qt.scales, quantize_tensor(-arr, "nf4", block, axis).scales)
    x, codes, back = arr.astype(np.float64), tensor_codes(qt), qt.dequantize(np.float64)
    assert (back * x >= 0).all()
    assert (codes[x > 0] >= 7).all() and (codes[x < 0] <= 7).all()
    np.testing.assert_array_equal(codes[x == 0], 7)
    top = np.abs(x) == tensor_eff(qt)
    np.testing.assert_array_equal(codes[top & (x > 0)], 15)
    np.testing.assert_array_equal(codes[top & (x < 0)], 0)
    work, ax = (x.reshape(-1), 0) if qt.axis is None else (x, qt.axis)
    xb = to_blocks(work, qt.block_size, ax)
    pad = xb.shape[-2] * qt.block_size - work.shape[ax]
    if pad:  # the core stores the padding as the code of 0
        xb[..., -1, qt.block_size - pad :] = 0
    order = np.argsort(xb, axis=-1, kind="stable")
    assert (np.diff(np.take_along_axis(qt.codes(), order, -1).astype(int), axis=-1) >= 0).all()


@pytest.mark.parametrize("name", NEW_FORMATS)
@given(case=tensors())
@settings(max_examples=80, deadline=None)
def test_all_zero_blocks_are_exact(name, case):
    arr, axis, block = case
    arr = arr.copy()
    flat = arr.reshape(-1)
    flat[: flat.size // 2] = 0  # zero a prefix: whole blocks along some axes
    qt = quantize_tensor(arr, name, block, axis)
    back = qt.dequantize(np.float64)
    np.testing.assert_array_equal(back[arr == 0], 0)
    eff = tensor_eff(qt)
    assert (eff > 0).all() and np.isfinite(eff).all()
