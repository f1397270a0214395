"""nf4_dq: NF4 with bitsandbytes' double quantization of the block scales (QLoRA)."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize import QuantizedTensor, quantize_tensor
from quantize.formats.nf4 import (
    DQ_BLOCK,
    DQ_MAX_ERROR,
    DYNAMIC_MAP,
    DoubleQuant,
    double_quantize,
)

# Values of bitsandbytes' create_dynamic_map(signed=True) as bitsandbytes prints its table
# (functional.py at commit e772a9e8), by index: every part of the construction (each decade,
# both signs, the upper half of each linspace, 0 and 1) is represented.
KNOWN = {
    0: -0.992968738079071,
    1: -0.9789062738418579,
    3: -0.9507812261581421,
    34: -0.5148437023162842,
    39: -0.44453126192092896,
    41: -0.4164062440395355,
    46: -0.3460937440395355,
    63: -0.10703125596046448,
    64: -0.09859374910593033,
    80: -0.053593751043081284,
    96: -0.009718749672174454,
    104: -0.0052187503315508366,
    112: -0.0009437500848434865,
    119: -0.00015625001105945557,
    126: -5.500000384017767e-07,
    127: 0.0,
    128: 5.500000384017767e-07,
    130: 7.749999895168003e-06,
    142: 0.0009437500848434865,
    190: 0.09859374910593033,
    191: 0.10703125596046448,
    218: 0.48671871423721313,
    224: 0.5710937976837158,
    229: 0.6414062976837158,
    234: 0.7117187976837158,
    236: 0.7398437261581421,
    254: 0.992968738079071,
    255: 1.0,
}


def test_dynamic_map_known_answers():
    assert DYNAMIC_MAP.dtype == np.float32 and DYNAMIC_MAP.shape == (256,)
    for i, v in KNOWN.items():
        assert DYNAMIC_MAP[i] == np.float32(v), i
    assert (np.diff(DYNAMIC_MAP) > 0).all()
    assert np.array_equal(DYNAMIC_MAP[:127], -DYNAMIC_MAP[128:255][::-1])
    assert abs(DQ_MAX_ERROR - 0.9 / 64 / 2) < 1e-7


def test_hand_computed_double_quantization():
    # four blocks with absmax 1, 2, 3, 4: offset 2.5, v = [-1.5, -0.5, 0.5, 1.5], group absmax
    # 1.5, normalised [-1, -1/3, 1/3, 1] -> map values -0.99296875 (code 0: -1 is not in the
    # map), -0.33203125, 0.33203125 (codes 47, 207) and 1.0 (code 255)
    x = np.zeros((4, 8), np.float32)
    x[:, 3] = [1, -2, 3, -4]
    x[:, 5] = [0.5, 1.0, -1.5, 2.0]
    qt = quantize_tensor(x, "nf4_dq", 8)
    dq = qt.double_quant
    assert dq.offset == np.float32(2.5)
    assert np.array_equal(dq.absmax, np.array([1.5], np.float32))
    assert DYNAMIC_MAP[47] == np.float32(-0.33203125)
    # the nearest codes are [0, 47, 207, 255]; 207 decodes to 2.998 < 3 and moves up one map
    # value (0.34609374: 3.019), the first whose scale covers the block's absmax
    assert dq.codes.reshape(-1).tolist() == [0, 47, 208, 255]
    want = np.float32(2.5) + DYNAMIC_MAP[[0, 47, 208, 255]] * np.float32(1.5)
    assert np.array_equal(qt.scales.reshape(-1), want)
    assert want[0] == np.float32(2.5 - 0.992968738079071 * 1.5)
    out = qt.dequantize()
    assert out[3, 3] == -4.0  # 4.0 is stored exactly
    # codes are chosen against the stored scale: -2 over 2.0019... is just above -1 -> -1 * a'
    assert out[1, 3] == -want[1]


def test_bits_per_weight_counts_the_compressed_scales():
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    qt = quantize_tensor(x, "nf4_dq")
    assert qt.block_size == 64
    nb = 64 * 1024 // 64
    want = 64 * 1024 // 2 + nb + 4 * -(-nb // DQ_BLOCK) + 4
    assert qt.nbytes == want
    assert qt.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / x.size)
    assert quantize_tensor(x, "nf4").bits_per_weight == 4.5


def test_zero_blocks_and_an_all_zero_tensor():
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32) * 1e-3
    x[2] = 0  # four zero blocks among small ones
    x[5, :64] = 30.0  # one huge block: the others sit far below the offset
    qt = quantize_tensor(x, "nf4_dq", 64)
    assert (qt.scales > 0).all()
    out = qt.dequantize()
    assert (out[2] == 0).all()
    z = quantize_tensor(np.zeros((3, 70), np.float32), "nf4_dq", 32)
    assert (z.scales == 1).all() and (z.dequantize() == 0).all()


def test_nudged_codes_keep_scales_positive():
    scales = np.full(300, 1.0, np.float32)
    scales[::7] = 1e-9
    zero = np.zeros(300, bool)
    zero[::11] = True
    dq = double_quantize(scales, zero)
    v = dq.values()
    assert (v > 0).all() and np.isfinite(v).all()
    nearest = np.abs(v - np.where(zero, 0, scales))
    group = np.repeat(dq.absmax, DQ_BLOCK)[:300]
    assert (nearest <= 2 * DQ_MAX_ERROR * group * (1 + 1e-6)).all()


@pytest.mark.parametrize(
    ("shape", "bs", "axis", "dtype"),
    [
        ((33, 200), 64, -1, np.float32),
        ((200, 33), 64, 0, np.float32),
        ((5, 7, 96), 32, None, np.float32),
        ((40, 128), 64, -1, np.float64),
        ((40, 128), 64, -1, np.float16),
    ],
)
def test_error_bound_against_plain_nf4(shape, bs, axis, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((shape, bs, axis)).encode()))
    row_scale = np.exp2(rng.integers(-6, 6, shape[:1] + (1,) * (len(shape) - 1)))
    x = (rng.standard_t(3, shape) * row_scale).astype(dtype)
    check_error_bound(x, bs, axis)


def check_error_bound(x, bs, axis):
    plain = quantize_tensor(x, "nf4", bs, axis)
    dq = quantize_tensor(x, "nf4_dq", bs, axis)
    assert np.array_equal(dq.scales.shape, plain.scales.shape)
    a = plain.scales.astype(np.float64)
    a2 = dq.scales.astype(np.float64)
    state = dq.double_quant
    group = np.repeat(state.absmax.astype(np.float64), DQ_BLOCK)[: a.size].reshape(a.shape)
    nonzero = plain.codes().astype(int).__ne__(7).any(axis=-1) | (a != 1)
    # the scale error: at most the widest map gap times the group absmax, upward (nothing
    # clips), float32 rounding aside
    slack = 4 * np.spacing(np.float32(np.max(a2))).astype(np.float64)
    assert (a2[nonzero] >= a[nonzero]).all()
    limit = 2 * DQ_MAX_ERROR * group
    assert ((a2 - a)[nonzero] <= limit[nonzero] * (1 + 1e-6) + slack).all()
    # every element: at most the plain nf4 error plus the scale error
    xf = x.astype(np.float64)
    e_plain = np.abs(plain.dequantize(np.float64) - xf)
    e_dq = np.abs(dq.dequantize(np.float64) - xf)
    d_scale = from_scale_grid(np.abs(a2 - a), dq)
    tol = d_scale + e_plain + 4 * np.spacing(np.abs(xf).max().astype(np.float32))
    assert (e_dq <= tol).all()


def from_scale_grid(per_block: np.ndarray, qt: QuantizedTensor) -> np.ndarray:
    """A (..., nb) array spread over the tensor's elements in its own layout."""
    _, n, axis = qt._work_shape
    full = np.repeat(per_block, qt.block_size, axis=-1)[..., :n]
    if qt.axis is None:
        return full.reshape(qt.shape)
    return np.moveaxis(full, -1, axis)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 300),
    bs=st.sampled_from([16, 32, 64, 7]),
    seed=st.integers(0, 2**32 - 1),
    spread=st.integers(0, 12),
)
def test_error_bound_property(rows, n, bs, seed, spread):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)) * np.exp2(rng.integers(-spread, spread + 1, (rows, 1)))
    x[rng.random(x.shape) < 0.1] = 0
    check_error_bound(x.astype(np.float32), bs, -1)


def test_quantized_tensor_checks_the_state():
    x = np.random.default_rng(2).standard_normal((4, 128)).astype(np.float32)
    qt = quantize_tensor(x, "nf4_dq", 64)
    fields = {f.name: getattr(qt, f.name) for f in dataclasses.fields(qt)}
    with pytest.raises(ValueError, match="needs double_quant"):
        QuantizedTensor(**{**fields, "double_quant": None})
    with pytest.raises(ValueError, match="has no double_quant"):
        QuantizedTensor(**{**fields, "format": "nf4"})
    with pytest.raises(ValueError, match="not the values"):
        QuantizedTensor(**{**fields, "scales": qt.scales * np.float32(1.5)})
    dq = qt.double_quant
    bad = DoubleQuant(dq.codes.astype(np.int16), dq.absmax, dq.offset)
    with pytest.raises(ValueError, match="codes must be uint8"):
        QuantizedTensor(**{**fields, "double_quant": bad})
    bad = DoubleQuant(dq.codes, dq.absmax[:0], dq.offset)
    with pytest.raises(ValueError, match="absmax must be float32"):
        QuantizedTensor(**{**fields, "double_quant": bad})
    with pytest.raises(TypeError, match="must be a DoubleQuant"):
        QuantizedTensor(**{**fields, "double_quant": (dq.codes, dq.absmax, dq.offset)})


def test_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file

    import quantize
    from quantize.io import safetensors as qst

    rng = np.random.default_rng(3)
    w = {
        "layer.0.mlp.weight": rng.standard_normal((96, 256)).astype(np.float32),
        "layer.1.mlp.weight": rng.standard_normal((64, 512)).astype(np.float32),
    }
    src = tmp_path / "m.safetensors"
    save_file(w, str(src))
    out = tmp_path / "m.nf4dq.safetensors"
    qst.quantize_safetensors(src, out, format="nf4_dq")
    back = quantize.load(out)
    for name, arr in w.items():
        qt = back[name]
        want = quantize_tensor(arr, "nf4_dq")
        assert qt.format == "nf4_dq"
        assert np.array_equal(qt.data, want.data)
        assert np.array_equal(qt.scales, want.scales)
        assert np.array_equal(qt.double_quant.codes, want.double_quant.codes)
        assert np.array_equal(qt.double_quant.absmax, want.double_quant.absmax)
        assert qt.double_quant.offset == want.double_quant.offset
        assert np.array_equal(qt.dequantize(), want.dequantize())
    # the file stores one byte per block scale, not four
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:
        assert f.get_tensor("layer.0.mlp.weight.scales").dtype == np.uint8
        assert f.get_tensor("layer.0.mlp.weight.scales_absmax").dtype == np.float32


def test_onnx_writer_refuses_nf4_dq():
    pytest.importorskip("onnx")
    from quantize.io import onnx as qonnx

    with pytest.raises(ValueError, match="format"):
        qonnx._check_args("nf4_dq", 32, "matmulnbits", 4)


def test_kernel_dequantize_matches_numpy(monkeypatch):
    pytest.importorskip("numba")
    from quantize.kernels import MIN_KERNEL_ELEMENTS

    x = np.random.default_rng(4).standard_normal((MIN_KERNEL_ELEMENTS // 512 + 1, 512))
    qt = quantize_tensor(x.astype(np.float32), "nf4_dq")
    for dtype in (np.float32, np.float16):
        monkeypatch.setenv("QUANTIZE_KERNELS", "1")
        fast = qt.dequantize(dtype)
        monkeypatch.setenv("QUANTIZE_KERNELS", "0")
        slow = qt.dequantize(dtype)
        assert np.array_equal(fast.view(np.uint8), slow.view(np.uint8))
