"""mse on int4_ort: the search tries both orientations of ONNX Runtime's symmetric grid.

ORT's symmetric int4 puts a block's largest-magnitude value on code -8 (a signed scale,
-extreme / 8) and lets the other side reach 7 steps. Our int4 cannot hold that orientation
choice: its scales must be positive (`QuantizedTensor` refuses others, and the compressed-tensors
writer could not store them), so int4's grid is the symmetric -7..7 (plus -8 for the negative
side). int4_ort carries the sign in a 4-bit zero point (8: grid -8..7, 7: grid -7..8), written
to ONNX as ORT's signed scales without zero points, the same bytes as ORT's own; there `mse`
scores, at every ratio, ORT's orientation and the other one (extreme on the 7-step side), and
keeps per block the one with the least objective (round to nearest's, ORT's, first).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from quantize import QuantizedTensor, quantize_tensor
from quantize.algorithms.mse import MSE, search_error
from quantize.blocking import to_blocks
from quantize.formats import get_format
from quantize.io.onnx import quantize_onnx_model

ORT4 = get_format("int4_ort")


def _block_err(x: np.ndarray, qt) -> np.ndarray:
    """Per-block mse objective (its default weights for int4_ort) of x (rows, n), n a multiple
    of the block size."""
    blocks = to_blocks(x, qt.block_size, -1)
    dc, gain = MSE.dc_weight_for(ORT4), MSE.gain_weight_for(ORT4)
    return search_error(ORT4, blocks, qt.scales, qt.zero_points, None, None, dc, gain)


def test_negative_scales_are_not_a_quantized_tensor():
    """Why int4 itself gets no flip: a QuantizedTensor's scales must be > 0."""
    qt = quantize_tensor(np.linspace(-1, 1, 32, dtype=np.float32), "int4", 32)
    with pytest.raises(ValueError, match="scales"):
        QuantizedTensor(
            data=qt.data,
            scales=-qt.scales,
            zero_points=None,
            format="int4",
            block_size=32,
            axis=qt.axis,
            shape=qt.shape,
            dtype=qt.dtype,
        )


def test_int4_ort_objective_weights():
    # the zero point only carries the sign: light weights (see mse's docstring)
    assert MSE.dc_weight_for("int4_ort") == 0.25 and MSE.gain_weight_for("int4_ort") == 0.25
    assert MSE.dc_weight_for("int4") == 0.0 and MSE.gain_weight_for("int4") == 0.0
    assert MSE.dc_weight_for("uint4") == 1.0 and MSE.gain_weight_for("uint4") == 1.0


def test_the_flip_is_taken_where_it_is_better():
    # extreme -1 alone; ORT puts it on -8 (scale 1/8) and clips the 0.99s to 0.875; the other
    # orientation (scale 1/7, -1 on -7) holds everything within 0.01
    x = np.array([[-1.0] + [0.99] * 15, [1.0] + [-0.99] * 15], np.float32)
    rtn = quantize_tensor(x, "int4_ort", 16)
    got = quantize_tensor(x, "int4_ort", 16, method="mse")
    assert rtn.zero_points.tolist() == [[8], [7]]
    assert got.zero_points.tolist() == [[7], [8]]  # the other orientation, both signs
    np.testing.assert_allclose(got.scales, np.float32(1 / 7), rtol=1e-6)
    assert np.abs(got.dequantize() - x).max() < 0.011


def test_ort_orientation_kept_where_it_is_better():
    # a block filling both sides: ORT's own rule (and ratio 1) is the best
    x = (np.arange(-8, 8, dtype=np.float32) / 8)[None]
    got = quantize_tensor(x, "int4_ort", 16, method="mse")
    assert got.zero_points.tolist() == [[8]] and np.array_equal(got.dequantize(), x)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 4),
    nb=st.integers(1, 4),
    bs=st.sampled_from([4, 16, 32]),
    df=st.sampled_from([2.0, 4.0, 30.0]),
)
def test_never_worse_than_ort_per_block(seed, rows, nb, bs, df):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(df, (rows, nb * bs)) * np.exp2(rng.integers(-8, 8))).astype(np.float32)
    rtn = quantize_tensor(x, "int4_ort", bs)
    got = quantize_tensor(x, "int4_ort", bs, method="mse")
    e_got, e_rtn = _block_err(x, got), _block_err(x, rtn)
    assert np.all(e_got <= e_rtn)


def _matmul(w: np.ndarray):
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])],
        "one_matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, n])],
        initializer=[numpy_helper.from_array(w, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("output", ["matmulnbits", "qdq"])
def test_onnx_runs_the_flipped_blocks(output):
    """Both writers store the chosen orientation as ORT's signed scale; ORT computes A @ W_q."""
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, (96, 24)).astype(np.float32)
    qt = quantize_tensor(w, "int4_ort", 32, axis=0, method="mse")
    rtn = quantize_tensor(w, "int4_ort", 32, axis=0)
    assert (qt.zero_points != rtn.zero_points).any()  # some blocks did flip
    model, _ = quantize_onnx_model(
        _matmul(w), format="int4_ort", block_size=32, method="mse", output=output
    )
    a = rng.standard_normal((2, 96)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT fuses DequantizeLinear(int4) + MatMul into MatMulNBits with int8 activations unless
    # told otherwise (as tests/test_onnx.py does): keep them float for the comparison
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"A": a})
    want = a.astype(np.float64) @ qt.dequantize(np.float64)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_safetensors_round_trip(tmp_path):
    """Our layout keeps the sign zero points; compressed-tensors has no int4_ort scheme."""
    from safetensors.numpy import save_file

    import quantize
    from quantize.io.safetensors import quantize_safetensors

    w = np.random.default_rng(4).standard_t(3, (16, 64)).astype(np.float32)
    save_file({"layer.weight": w}, str(tmp_path / "m.safetensors"))
    quantize_safetensors(
        tmp_path / "m.safetensors", tmp_path / "q.safetensors", format="int4_ort",
        block_size=32, method="mse",
    )  # fmt: skip
    got = quantize.load(tmp_path / "q.safetensors")["layer.weight"]
    want = quantize_tensor(w, "int4_ort", 32, method="mse")
    assert np.array_equal(got.zero_points, want.zero_points)
    assert np.array_equal(got.dequantize(), want.dequantize())
    with pytest.raises(ValueError, match="compressed-tensors"):
        quantize_safetensors(
            tmp_path / "m.safetensors", tmp_path / "c.safetensors", format="int4_ort",
            block_size=32, method="mse", layout="compressed-tensors",
        )  # fmt: skip
