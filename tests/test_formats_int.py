"""The integer formats' own rules: int4_ort (ONNX Runtime's symmetric int4) and uint4_float_zp.

int4_ort is held to ONNX Runtime itself, bit for bit: `MatMulNBitsQuantizer` (symmetric,
one-MatMul models built with onnx.helper) and the numpy-facing method it calls,
`DefaultWeightOnlyQuantizer.qbits_block_quant`. uint4_float_zp is int4_affine's twin on
unsigned codes. The generic properties (error bounds, layout, padding, dtypes) run over every
registered format in test_core.py and test_bad_input.py; here are the known answers.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    DefaultWeightOnlyQuantizer,
    MatMulNBitsQuantizer,
)

from _bounds import check_error_bounds, code_of_zero
from quantize import get_format, quantize_tensor
from quantize.formats.integer import OrtInt4

ORT = get_format("int4_ort")
FZP = get_format("uint4_float_zp")
BF16 = ml_dtypes.bfloat16


def ort_view(qt):
    """(ORT's unsigned codes (*rows, nb, bs), ORT's signed scales (*rows, nb)) of an int4_ort qt."""
    return OrtInt4.to_ort(qt.codes(), qt.scales, qt.zero_points)


def ours_as_ort(w: np.ndarray, block: int):
    """w (K, N) quantized along K, as ORT lays it out: codes (N, nb, bs), scales (N, nb)."""
    return ort_view(quantize_tensor(w, "int4_ort", block_size=block, axis=0))


# --------------------------------------------------------------------------- ORT itself


def unpack(b: np.ndarray) -> np.ndarray:
    """(..., m) bytes -> (..., 2m) nibbles, low nibble first (MatMulNBits' B layout)."""
    out = np.empty((*b.shape[:-1], 2 * b.shape[-1]), np.uint8)
    out[..., 0::2], out[..., 1::2] = b & 15, b >> 4
    return out


def matmul_model(w: np.ndarray):
    k, n = w.shape
    dt = TensorProto.FLOAT if w.dtype == np.float32 else TensorProto.FLOAT16
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])],
        "one_matmul",
        [helper.make_tensor_value_info("A", dt, [1, k])],
        [helper.make_tensor_value_info("Y", dt, [1, n])],
        initializer=[numpy_helper.from_array(w, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def ort_quantizer(w: np.ndarray, block: int):
    """MatMulNBitsQuantizer, symmetric: (model, codes (N, nb, bs), scales (N, nb))."""
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True)
    q = MatMulNBitsQuantizer(matmul_model(w), algo_config=cfg)
    logging.disable(logging.INFO)  # the quantizer logs every node at INFO
    try:
        q.process()
    finally:
        logging.disable(logging.NOTSET)
    model = q.model.model
    (node,) = model.graph.node
    assert node.op_type == "MatMulNBits" and len(node.input) == 3  # no zero points: symmetric
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": w.shape[0], "N": w.shape[1], "bits": 4, "block_size": block}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return model, unpack(inits[node.input[1]]), inits[node.input[2]]


def ort_numpy(w: np.ndarray, block: int):
    """The quantizer's numpy-facing step (what it runs on B): codes (N, nb, bs), scales (N, nb)."""
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True)
    quantizer = DefaultWeightOnlyQuantizer(cfg)
    step = getattr(quantizer, "qbits_block_quant", None) or quantizer.int4_block_quant  # < 1.21
    packed, scales, _ = step(w)
    return unpack(packed), scales


def assert_same_as_ort(w, block, ort_codes, ort_scales):
    """Codes equal on the K real elements; scales equal bit for bit (ORT's dtype), but all-zero
    blocks, where ORT stores -0.0 and we 1 (both code 8)."""
    k = w.shape[0]
    codes, scales = ours_as_ort(w, block)
    nb = codes.shape[1]
    assert ort_codes.shape == codes.shape and ort_scales.shape == scales.shape
    real = np.arange(nb * block).reshape(nb, block) < k
    np.testing.assert_array_equal(codes[:, real], ort_codes[:, real])
    padded = np.concatenate([np.abs(w.astype(np.float64)), np.zeros((nb * block - k, w.shape[1]))])
    zero = padded.reshape(nb, block, -1).max(axis=1).T == 0  # all-zero blocks, (N, nb)
    ours = scales.astype(ort_scales.dtype)
    bits = np.uint16 if ort_scales.dtype == np.float16 else np.uint32
    np.testing.assert_array_equal(ours[~zero].view(bits), ort_scales[~zero].view(bits))
    assert np.all(ort_scales[zero] == 0) and np.all(scales[zero] == 1)
    assert np.all(codes[zero[..., None] & real] == 8)


def tie_matrix() -> np.ndarray:
    """(64, 8): per column an extreme e (both signs), then every half step k + 1/2 of |e|/8,
    its float32 neighbours, and for the last two columns -e too (the |max| = |min| tie)."""
    exts = [8.0, -8.0, 3.0, -3.0, 1e-3, -7.7, 8.0, -8.0]
    w = np.zeros((64, 8), np.float32)
    for j, e in enumerate(exts):
        half = ((np.arange(-8, 8) + 0.5) * (abs(e) / 8)).astype(np.float32)
        up = np.nextafter(half, np.float32(np.inf))
        down = np.nextafter(half, np.float32(-np.inf))
        vals = np.concatenate([half, up, down])
        vals = vals[np.abs(vals) <= abs(e)][:62]
        w[: len(vals), j] = vals
        w[63, j] = e
        if j >= 6:
            w[62, j] = -e
    return w


def ort_cases():
    rng = np.random.default_rng(0)
    halves = (rng.integers(-16, 17, (96, 40)) / 2).astype(np.float32)
    wide = rng.standard_normal((128, 32)) * 10.0 ** rng.integers(-30, 30, (1, 32))
    const = np.zeros((64, 4), np.float32)
    const[:, 1], const[:, 2], const[:32, 3] = 2.0, -2.0, 5.0
    return {
        "normal": (rng.standard_normal((256, 64)).astype(np.float32), 32),
        "K_not_divisible": (rng.standard_normal((100, 33)).astype(np.float32), 32),
        "K_odd": (rng.standard_normal((77, 16)).astype(np.float32), 16),
        "block_128": (rng.standard_normal((300, 8)).astype(np.float32), 128),
        "ties": (tie_matrix(), 32),
        "ties_block_64": (tie_matrix(), 64),
        "halves": (halves, 32),
        "wide_range": (wide.astype(np.float32), 32),
        "zero_and_constant_blocks": (const, 32),
        "float16": (rng.standard_normal((200, 24)).astype(np.float16), 32),
    }


@pytest.mark.parametrize("case", list(ort_cases()))
def test_int4_ort_equals_matmul_nbits_quantizer(case):
    w, block = ort_cases()[case]
    _, codes, scales = ort_quantizer(w, block)
    assert scales.dtype == w.dtype
    assert_same_as_ort(w, block, codes, scales)


def test_the_tie_cases_tell_ort_from_round_half_to_even():
    """The tie matrix is a real test: there, rint (int4's rounding) would give other codes."""
    w, block = tie_matrix(), 32
    codes, scales = ours_as_ort(w, block)
    blocks = w.T.reshape(8, 2, 32).astype(np.float32)
    rint = np.clip(np.rint(blocks / scales[..., None]) + 8, 0, 15)
    assert (rint != codes).sum() >= 30
    # and the |max| = |min| columns took the negative extreme: scale > 0, +e clipped at 7 steps
    assert np.all(scales[6:, 1] > 0)


def test_int4_ort_matmul_nbits_runs_our_values():
    """ORT's MatMulNBits on its own quantized model computes A @ our dequantized B."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((100, 24)).astype(np.float32)
    model, _, _ = ort_quantizer(w, 32)
    a = rng.standard_normal((1, 100)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"A": a})
    ours = a.astype(np.float64) @ quantize_tensor(w, "int4_ort", 32, axis=0).dequantize(np.float64)
    np.testing.assert_allclose(y, ours, rtol=1e-5, atol=1e-5)


@st.composite
def ort_weights(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k, n = draw(st.integers(1, 300)), draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["normal", "wide", "halves", "sparse"]))
    if kind == "normal":
        w = rng.standard_normal((k, n)) * 10.0 ** draw(st.integers(-20, 20))
    elif kind == "wide":
        w = rng.standard_normal((k, n)) * 10.0 ** rng.integers(-30, 30, (k, n))
    elif kind == "halves":  # many exact ties at half steps
        w = rng.integers(-16, 17, (k, n)) / 2 * 2.0 ** draw(st.integers(-60, 60))
    else:
        w = rng.standard_normal((k, n)) * (rng.random((k, n)) < 0.1)
    return w.astype(np.float32), draw(st.sampled_from([16, 32, 64, 128, 256]))


@given(case=ort_weights())
@settings(max_examples=150, deadline=None)
def test_int4_ort_equals_ort_on_any_weight(case):
    w, block = case
    codes, scales = ort_numpy(w, block)
    assert_same_as_ort(w, block, codes, scales)


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 200), e=st.integers(-3, 3))
@settings(max_examples=50, deadline=None)
def test_int4_ort_equals_ort_for_float16_weights(seed, k, e):
    """ORT keeps float16 scales for float16 weights: the same values as ours while |e| >= 2^-11
    (below, e/8 is a float16 subnormal and ORT's scale rounds)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, 6)) * 10.0**e).astype(np.float16)
    w[np.abs(w) < 2.0**-11] = np.float16(2.0**-11)
    codes, scales = ort_numpy(w, 32)
    assert scales.dtype == np.float16
    assert_same_as_ort(w, 32, codes, scales)


def test_ort_pads_odd_k_with_stale_codes_which_we_do_not_copy():
    """ORT writes only the K real codes (its padding bytes stay 0, and for odd K the last
    byte's high nibble repeats an earlier code); ours hold the code of 0, the zero point."""
    w = np.random.default_rng(2).standard_normal((77, 16)).astype(np.float32)
    ort_codes, _ = ort_numpy(w, 16)
    qt = quantize_tensor(w, "int4_ort", 16, axis=0)
    assert np.all(qt.codes()[:, -1, 77 - 64 :] == qt.zero_points[:, -1:])
    assert len(np.unique(ort_codes[:, -1, 77 - 64 :])) > 1


# --------------------------------------------------------------------------- int4_ort rule


def test_int4_ort_is_registered_as_unsigned_codes_with_a_sign_zero_point():
    assert isinstance(ORT, OrtInt4)
    assert (ORT.name, ORT.bits, ORT.code_min, ORT.code_max, ORT.zero_point) == (
        "int4_ort",
        4,
        0,
        15,
        "int",
    )
    assert not ORT.signed_codes and ORT.description
    qt = quantize_tensor(np.ones((4, 64), np.float32), "int4_ort", 32)
    assert qt.bits_per_weight == 5.125  # 4 + 32/32 scale + 4/32 zero point


def test_int4_ort_known_answer():
    x = np.array([1.0, -1.0, 0.0, 3.0, 0.5, 2.5, -2.5, 1.0], np.float32)
    qt = quantize_tensor(x, "int4_ort", 8)
    # extreme +3 -> ORT scale 3 / -8 = -0.375 (stored: 0.375, zero point 7)
    assert qt.scales.tolist() == [0.375] and qt.zero_points.tolist() == [7]
    codes, scales = ort_view(qt)
    assert scales.tolist() == [-0.375]
    # x / -0.375 + 8 = 5.33, 10.67, 8, 0, 6.67, 1.33, 14.67, 5.33 -> roundf
    assert codes.reshape(-1).tolist() == [5, 11, 8, 0, 7, 1, 15, 5]
    np.testing.assert_array_equal(
        qt.dequantize(), [1.125, -1.125, 0.0, 3.0, 0.375, 2.625, -2.625, 1.125]
    )
    # the same block negated: extreme -3, ORT scale +0.375, the same ORT codes
    neg = quantize_tensor(-x, "int4_ort", 8)
    assert neg.scales.tolist() == [0.375] and neg.zero_points.tolist() == [8]
    c2, s2 = ort_view(neg)
    assert s2.tolist() == [0.375] and c2.reshape(-1).tolist() == codes.reshape(-1).tolist()
    np.testing.assert_array_equal(neg.dequantize(), -qt.dequantize())


def test_int4_ort_ties_round_up_on_ort_codes():
    """roundf(x/s + 8): a half step rounds toward +inf in units of ORT's (signed) scale."""
    x = np.array([-8.0, 2.5, -2.5, 0.5, -0.5, 1.5, 7.5], np.float32)  # scale 1
    qt = quantize_tensor(x, "int4_ort", None)
    assert qt.scales.tolist() == [1.0] and qt.zero_points.tolist() == [8]
    np.testing.assert_array_equal(qt.dequantize(), [-8, 3, -2, 1, 0, 2, 7])  # int4: 2, -2, 0...
    # positive extreme: scale_ort = -1, so the same ties go the other way in x
    qt = quantize_tensor(-x, "int4_ort", None)
    np.testing.assert_array_equal(qt.dequantize(), [8, -3, 2, -1, 0, -2, -7])


def test_int4_ort_clips_the_far_end_by_up_to_one_step():
    # |max| = |min|: ORT takes the negative min, so +3 clips to 7 steps: error one full step
    for x in ([-3.0, 3.0], [3.0, -3.0]):
        qt = quantize_tensor(np.array(x, np.float32), "int4_ort", None)
        assert qt.scales.tolist() == [0.375] and qt.zero_points.tolist() == [8]
        out = qt.dequantize()
        assert sorted(out.tolist()) == [-3.0, 2.625]
    # a positive extreme: scale 1 (ORT: -1), the negative end clips at -7 steps
    out = quantize_tensor(np.array([8.0, -7.9, -7.6, 7.6], np.float32), "int4_ort", None)
    assert out.zero_points.tolist() == [7]
    np.testing.assert_array_equal(out.dequantize(), [8.0, -7.0, -7.0, 8.0])


@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
@settings(max_examples=60, deadline=None)
def test_int4_ort_error_bound(seed, dtype):
    """The extreme is exact; |x - x̂| <= scale/2 inside the grid, <= scale at the clipped end."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((5, 96)) * 10.0 ** rng.integers(-5, 5)).astype(dtype)
    qt = quantize_tensor(x, "int4_ort", 32)
    back = qt.dequantize(np.float64)
    s = np.repeat(qt.scales.astype(np.float64), 32, axis=-1)
    zp = np.repeat(qt.zero_points.astype(np.float64), 32, axis=-1)
    err = np.abs(back - x)
    assert np.all(err <= s * (1 + 1e-6))
    beyond = np.maximum(np.maximum((-zp) * s - x, x - (15 - zp) * s), 0)
    assert np.all(err <= np.where(beyond > 0, s, s / 2) * (1 + 1e-5))
    blocks = x.reshape(5, 3, 32)
    i = np.argmax(np.abs(blocks), axis=-1)
    ext = np.take_along_axis(blocks, i[..., None], -1)[..., 0]
    assert np.all(np.take_along_axis(back.reshape(5, 3, 32), i[..., None], -1)[..., 0] == ext)
    np.testing.assert_array_equal(qt.scales, np.abs(ext) / 8)
    np.testing.assert_array_equal(qt.zero_points, np.where(ext > 0, 7, 8))
    check_error_bounds(x, qt)


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_int4_ort_negation_swaps_the_zero_point_and_keeps_ort_codes(seed):
    """Without a |max| = |min| tie, -x has ORT scale -s and the same ORT codes: x̂ negates."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    a, b = quantize_tensor(x, "int4_ort", 16), quantize_tensor(-x, "int4_ort", 16)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.zero_points.astype(int) + b.zero_points, 15)
    (ca, sa), (cb, sb) = ort_view(a), ort_view(b)
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_array_equal(sa, -sb)
    np.testing.assert_array_equal(b.dequantize(), -a.dequantize())


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
def test_int4_ort_grid_points_are_exact_in_every_dtype(dtype):
    rng = np.random.default_rng(3)
    steps = rng.integers(-8, 8, (6, 4, 16)).astype(np.float64)
    steps[..., 0] = np.where(rng.random((6, 4)) < 0.5, -8, 8)  # the extreme, either sign
    flip = steps[..., :1] > 0
    steps = np.where(flip & (steps == -8), -7, steps)  # a +8 block has no -8
    s = 2.0 ** rng.integers(-6, 6, (6, 4, 1))
    x = (steps * s).reshape(6, 64).astype(dtype)
    qt = quantize_tensor(x, "int4_ort", 16)
    assert qt.scales.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert qt.dequantize().dtype == np.dtype(dtype)
    np.testing.assert_array_equal(qt.dequantize(), x)
    np.testing.assert_array_equal(qt.scales, s[..., 0])
    np.testing.assert_array_equal(qt.zero_points, np.where(flip[..., 0], 7, 8))


@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_int4_ort_narrow_floats_equal_their_float32_values(dtype):
    x = np.random.default_rng(4).standard_normal((7, 50)).astype(dtype)
    a = quantize_tensor(x, "int4_ort", 16)
    b = quantize_tensor(x.astype(np.float32), "int4_ort", 16)
    assert a.data.tobytes() == b.data.tobytes() and a.scales.tobytes() == b.scales.tobytes()
    np.testing.assert_array_equal(a.zero_points, b.zero_points)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
def test_int4_ort_padding_is_the_code_of_zero(dtype):
    x = np.array([[1.0, -2.0, 0.5, 3.0, -1.0], [-4.0, 1.0, 2.0, -1.0, 0.25]], dtype)
    qt = quantize_tensor(x, "int4_ort", 4)  # last block: 1 real element, 3 of padding
    assert qt.zero_points[:, -1].tolist() == [8, 7]  # last blocks [-1] and [0.25]
    pad = qt.codes()[:, -1, 1:]
    np.testing.assert_array_equal(pad, np.broadcast_to(code_of_zero(qt)[:, -1:], pad.shape))
    check_error_bounds(x, qt)


def test_int4_ort_zero_and_tiny_blocks():
    x = np.zeros((2, 8), np.float32)
    x[1, :4] = np.linspace(-1, 1, 4) * 1e-39  # subnormal: ORT's 1/scale would be inf
    qt = quantize_tensor(x, "int4_ort", 4)
    assert qt.scales[0].tolist() == [1.0, 1.0] and qt.zero_points[0].tolist() == [8, 8]
    np.testing.assert_array_equal(qt.codes()[0], 8)
    back = qt.dequantize(np.float64)
    np.testing.assert_array_equal(back[0], 0.0)
    np.testing.assert_array_equal(back[1, 4:], 0.0)
    assert qt.zero_points[1, 0] == 8  # |max| = |min|: the negative extreme, as ORT picks
    assert np.all(np.abs(back[1, :4] - x[1, :4]) <= qt.scales[1, 0])  # within one step
    assert back[1, 0] < 0 < back[1, 3]  # not flushed to zero
    check_error_bounds(x, qt)


def test_int4_ort_clip_ratio_shrinks_the_extreme():
    x = np.array([-8.0, 4.0, 6.0, -2.0], np.float32)
    qt = quantize_tensor(x, "int4_ort", None, clip_ratio=0.5)
    assert qt.scales.tolist() == [0.5] and qt.zero_points.tolist() == [8]
    np.testing.assert_array_equal(qt.dequantize(), [-4.0, 3.5, 3.5, -2.0])


# --------------------------------------------------------------------------- uint4_float_zp


def test_uint4_float_zp_is_registered():
    assert (FZP.name, FZP.bits, FZP.code_min, FZP.code_max, FZP.zero_point) == (
        "uint4_float_zp",
        4,
        0,
        15,
        "float",
    )
    assert not FZP.signed_codes and FZP.description
    qt = quantize_tensor(np.ones((4, 64), np.float32), "uint4_float_zp", 32)
    assert qt.bits_per_weight == 6.0  # 4 + float32 scale + float32 zero point per 32
    assert type(FZP) is type(get_format("int4_affine"))  # one class, two code ranges


def test_uint4_float_zp_known_answer():
    x = np.array([-3.0, 12.0, 0.0, 1.4, 1.5, 2.5, -2.6], np.float32)  # s = 15/15 = 1, z = 3
    qt = quantize_tensor(x, "uint4_float_zp", None)
    assert qt.scales.tolist() == [1.0] and qt.zero_points.tolist() == [3.0]
    # rint(x + 3), ties to even: 4.4 -> 4, 4.5 -> 4, 5.5 -> 6, 0.4 -> 0
    assert qt.codes().reshape(-1).tolist() == [0, 15, 3, 4, 4, 6, 0]
    np.testing.assert_array_equal(qt.dequantize(), [-3, 12, 0, 1, 1, 3, -3])


def test_uint4_float_zp_maps_min_and_max_onto_0_and_15():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((50, 40)) + rng.normal(0, 3, (50, 1))).astype(np.float32)
    qt = quantize_tensor(x, "uint4_float_zp", 40)
    codes = qt.codes()[:, 0]
    np.testing.assert_array_equal(codes[np.arange(50), x.argmin(axis=1)], 0)
    np.testing.assert_array_equal(codes[np.arange(50), x.argmax(axis=1)], 15)
    lo, hi = x.min(axis=1), x.max(axis=1)
    np.testing.assert_array_equal(qt.scales[:, 0], (hi - lo) / np.float32(15))
    np.testing.assert_array_equal(qt.zero_points[:, 0], -lo / qt.scales[:, 0])
    back = qt.dequantize(np.float64)
    s = qt.scales.astype(np.float64)
    assert np.all(np.abs(back - x) <= s / 2 * (1 + 1e-5))
    # min and max come back to within float32 rounding of the zero point arithmetic
    for sel, edge in ((x.argmin(axis=1), lo), (x.argmax(axis=1), hi)):
        got = back[np.arange(50), sel]
        np.testing.assert_allclose(got, edge, rtol=0, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
def test_uint4_float_zp_grid_points_are_exact_in_every_dtype(dtype):
    rng = np.random.default_rng(6)
    codes = rng.integers(0, 16, (6, 4, 16))
    codes[..., 0], codes[..., 1] = 0, 15
    z = rng.integers(0, 16, (6, 4, 1))
    s = 2.0 ** rng.integers(-6, 4, (6, 4, 1))
    x = ((codes - z) * s).reshape(6, 64).astype(dtype)
    qt = quantize_tensor(x, "uint4_float_zp", 16)
    assert qt.dequantize().dtype == np.dtype(dtype)
    np.testing.assert_array_equal(qt.dequantize(), x)
    np.testing.assert_array_equal(qt.scales, s[..., 0])
    np.testing.assert_array_equal(qt.zero_points, z[..., 0])
    np.testing.assert_array_equal(qt.codes(), codes)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
def test_uint4_float_zp_constant_blocks_are_exact(dtype):
    x = np.array([[2.5] * 4 + [-2.5] * 4 + [0.0] * 4 + [-0.0] * 4], dtype)
    qt = quantize_tensor(x, "uint4_float_zp", 4)
    assert qt.scales.tolist() == [[2.5, 2.5, 1.0, 1.0]]
    assert qt.zero_points.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert qt.codes()[0, :, 0].tolist() == [1, 0, 0, 0]
    np.testing.assert_array_equal(qt.dequantize(), x)


def test_uint4_float_zp_is_int4_affine_on_codes_plus_8():
    """The same scales, bit for bit; zero point + 8 and codes + 8, up to float rounding."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((30, 64)) * 3 + 1).astype(np.float32)
    u = quantize_tensor(x, "uint4_float_zp", 32)
    s = quantize_tensor(x, "int4_affine", 32)
    assert u.scales.tobytes() == s.scales.tobytes()
    np.testing.assert_allclose(u.zero_points, s.zero_points.astype(np.float64) + 8, atol=1e-5)
    same = u.codes().astype(int) == s.codes().astype(int) + 8
    assert same.mean() > 0.999
    np.testing.assert_allclose(u.dequantize(), s.dequantize(), rtol=0, atol=1e-5)


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_uint4_float_zp_negation_mirrors_the_range(seed):
    """-x has the same scale and zero point 15 - z (to float rounding); x̂ negates but where
    a value sits on a half step (ties to even go the other way)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 48)) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
    a, b = quantize_tensor(x, "uint4_float_zp", 16), quantize_tensor(-x, "uint4_float_zp", 16)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_allclose(b.zero_points, 15 - a.zero_points.astype(np.float64), atol=1e-5)
    ha, hb = a.dequantize(np.float64), b.dequantize(np.float64)
    s = np.repeat(a.scales.astype(np.float64), 16, axis=-1)
    mirrored = np.abs(ha + hb) <= 1e-5 * s
    assert mirrored.mean() >= 0.99 and np.all(np.abs(ha + hb) <= s * (1 + 1e-5))


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
def test_uint4_float_zp_padding_is_the_code_of_zero(dtype):
    x = np.array([[1.0, -2.0, 0.5, 3.0, -1.0, 2.0], [-4.0, 1.0, 2.0, -1.0, 5.0, 9.0]], dtype)
    qt = quantize_tensor(x, "uint4_float_zp", 4)
    pad = qt.codes()[:, -1, 2:]
    expected = np.clip(np.rint(qt.zero_points[:, -1:].astype(np.float64)), 0, 15)
    np.testing.assert_array_equal(pad, np.broadcast_to(expected, pad.shape))
    np.testing.assert_array_equal(pad, np.broadcast_to(code_of_zero(qt)[:, -1:], pad.shape))
    check_error_bounds(x, qt)


@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_uint4_float_zp_narrow_floats_equal_their_float32_values(dtype):
    x = np.random.default_rng(8).standard_normal((7, 50)).astype(dtype)
    a = quantize_tensor(x, "uint4_float_zp", 16)
    b = quantize_tensor(x.astype(np.float32), "uint4_float_zp", 16)
    assert a.data.tobytes() == b.data.tobytes() and a.scales.tobytes() == b.scales.tobytes()
    assert a.zero_points.tobytes() == b.zero_points.tobytes()


def test_uint4_float_zp_clip_ratio_shrinks_about_the_centre():
    x = np.array([-2.0, 0.0, 13.0], np.float32)  # centre 5.5, half-range 7.5 -> 3.75
    qt = quantize_tensor(x, "uint4_float_zp", None, clip_ratio=0.5)
    assert qt.scales.tolist() == [0.5]
    np.testing.assert_array_equal(qt.dequantize(), [1.75, 1.75, 9.25])
