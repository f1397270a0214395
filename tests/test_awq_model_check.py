"""AWQ's scale family chosen on the whole model's calibration outputs (awq_check=True)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import quantize.io.calibration as calibration  # noqa: E402
import quantize.io.onnx as qonnx  # noqa: E402
from quantize.io.calibration import calibration_feeds, output_errors  # noqa: E402
from quantize.io.onnx import quantize_onnx_model  # noqa: E402

K, H, N = 64, 96, 48


def _model(rng, softmax: bool = True) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Relu -> MatMul(W2) [-> Softmax]: a small classifier."""
    w1 = (rng.standard_normal((K, H)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((H, N)) * 0.2).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["z" if softmax else "y"], name="mm2"),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["y"], name="softmax", axis=-1))
    graph = helper.make_graph(
        nodes,
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((256, K)) * np.exp(rng.standard_normal(K))).astype(np.float32)
    return _model(rng), x


def _one_pass(model, x, powers, method="awq", family=None):
    """One pass of the check on a copy of `model`, AWQ searching with these betas (None: its
    own) afresh, or as `family` says."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if family is None and powers is not None:
        family = qonnx._AwqFamily(tuple(powers), record=False)
    rows = qonnx._quantize_pass(
        m, format="uint4", block_size=32, method=method, calib={"x": x}, awq=family
    )
    return m, rows


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_the_activation_only_pass_reuses_the_first_passes_search(setup, method):
    """The weight-factor pass records each weight's activation-only result; the second pass
    takes it (no search of its own) and makes the same model as a fresh search would."""
    from quantize.algorithms.awq import WEIGHT_POWERS

    model, x = setup
    first = qonnx._AwqFamily(tuple(WEIGHT_POWERS), record=True)
    full, _ = _one_pass(model, x, None, method, first)
    assert len(first.shared) == 2  # both weights
    plain, _ = _one_pass(model, x, WEIGHT_POWERS, method)
    assert full.SerializeToString() == plain.SerializeToString()
    second = qonnx._AwqFamily((0.0,), record=False, shared=first.shared)
    act, _ = _one_pass(model, x, None, method, second)
    assert not first.shared  # taken, not searched again
    fresh, _ = _one_pass(model, x, (0.0,), method)
    assert act.SerializeToString() == fresh.SerializeToString()


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_the_kept_model_has_the_smaller_calibration_output_error(setup, method):
    from quantize.algorithms.awq import WEIGHT_POWERS

    model, x = setup
    details: dict = {}
    kept, rows = quantize_onnx_model(
        model, format="uint4", block_size=32, method=method, calib={"x": x}, details=details
    )
    full, _ = _one_pass(model, x, WEIGHT_POWERS, method)
    act, _ = _one_pass(model, x, (0.0,), method)
    feeds = calibration_feeds(model, {"x": x})
    e_full, e_act = output_errors(model, [full, act], feeds)
    want = act if e_act < e_full else full
    assert kept.SerializeToString() == want.SerializeToString()
    (note,) = [n for n in details["notes"] if "AWQ scales" in n]
    assert ("activation-only kept" in note) == (e_act < e_full), note
    assert f"{e_full:.3g}" in note and f"{e_act:.3g}" in note
    assert len(rows) == 2 and all(r["method"] == method for r in rows)


@pytest.mark.parametrize("errors, pick", [([1.0, 0.5], 1), ([0.5, 1.0], 0), ([0.5, 0.5], 0)])
def test_the_choice_follows_the_errors(setup, monkeypatch, errors, pick):
    """Whichever pass has the smaller error is returned whole (ties keep the weight factor)."""
    from quantize.algorithms.awq import WEIGHT_POWERS

    model, x = setup
    monkeypatch.setattr(calibration, "output_errors", lambda ref, models, feeds: errors)
    kept, _ = quantize_onnx_model(
        model, format="uint4", block_size=32, method="awq", calib={"x": x}
    )
    want, _ = _one_pass(model, x, (WEIGHT_POWERS, (0.0,))[pick])
    assert kept.SerializeToString() == want.SerializeToString()


def test_no_check_without_calibration_data_or_when_turned_off(setup, monkeypatch):
    model, x = setup
    calls = []
    monkeypatch.setattr(calibration, "output_errors", lambda *a: calls.append(a) or [0.0, 0.0])
    details: dict = {}
    quantize_onnx_model(model, format="uint4", method="awq", details=details)
    assert not calls and not any("AWQ scales" in n for n in details["notes"])
    off, _ = quantize_onnx_model(
        model, format="uint4", method="awq", calib={"x": x}, awq_check=False
    )
    full, _ = _one_pass(model, x, None)
    assert not calls and off.SerializeToString() == full.SerializeToString()
    quantize_onnx_model(model, format="uint4", method="gptq", calib={"x": x})
    assert not calls


def test_output_errors_known_answer(setup):
    _, x = setup
    rng = np.random.default_rng(0)
    plain = _model(rng, softmax=False)
    other = onnx.ModelProto()
    other.CopyFrom(plain)
    w2 = numpy_helper.to_array(other.graph.initializer[1])
    other.graph.initializer[1].CopyFrom(numpy_helper.from_array(w2 * 1.5, "W2"))
    feeds = [{"x": x[:100]}, {"x": x[100:]}]
    same, scaled = output_errors(plain, [plain, other], feeds)
    assert same == 0.0
    assert scaled == pytest.approx(0.25, rel=1e-6)  # ||1.5 y - y||^2 / ||y||^2


def test_output_errors_bad_input(setup):
    model, x = setup
    with pytest.raises(ValueError, match="lacks input 'x'"):
        output_errors(model, [model], [{"z": x}])
    ints = onnx.ModelProto()
    ints.CopyFrom(model)
    ints.graph.node.append(helper.make_node("ArgMax", ["y"], ["k"], name="argmax", axis=-1))
    del ints.graph.output[:]
    ints.graph.output.append(helper.make_tensor_value_info("k", TensorProto.INT64, None))
    with pytest.raises(ValueError, match="no float outputs"):
        output_errors(ints, [ints], [{"x": x}])
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(ValueError, match="cannot run the quantized model"):
        output_errors(model, [broken], [{"x": x}])
    nan = onnx.ModelProto()
    nan.CopyFrom(_model(np.random.default_rng(0), softmax=False))
    w = numpy_helper.to_array(nan.graph.initializer[0]).copy()
    w[0, 0] = np.inf
    nan.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W1"))
    plain = _model(np.random.default_rng(0), softmax=False)
    (err,) = output_errors(plain, [nan], [{"x": np.abs(x)}])
    assert err == np.inf


def test_progress_counts_both_passes(setup):
    model, x = setup
    calls = []
    quantize_onnx_model(
        model, format="uint4", method="awq", calib={"x": x}, progress=lambda *a: calls.append(a)
    )
    assert calls == [
        ("W1 (weight factor)", 4),
        ("W2 (weight factor)", 4),
        ("W1 (activation-only)", 4),
        ("W2 (activation-only)", 4),
    ]


def test_external_data_output_skips_the_check_and_says_so(setup, tmp_path, monkeypatch):
    from quantize.io.onnx import quantize_onnx_file

    model, x = setup
    calls = []
    monkeypatch.setattr(calibration, "output_errors", lambda *a: calls.append(a) or [0.0, 0.0])
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    res = quantize_onnx_file(
        src, tmp_path / "q.onnx", external_data=True, method="awq", calib={"x": x}
    )
    assert not calls
    assert any("kept unchecked" in n for n in res["notes"]), res["notes"]
    assert (tmp_path / "q.onnx").exists()
    off = quantize_onnx_file(
        src, tmp_path / "q2.onnx", external_data=True, method="AWQ", calib={"x": x},
        awq_check=False,
    )  # fmt: skip
    assert not calls and not any("unchecked" in n for n in off["notes"]), off["notes"]


def test_awq_check_argument_and_cli_flag(setup, tmp_path, monkeypatch):
    from quantize.cli import main

    model, x = setup
    with pytest.raises(TypeError, match="awq_check"):
        quantize_onnx_model(model, method="awq", calib={"x": x}, awq_check="no")
    calls = []
    monkeypatch.setattr(calibration, "output_errors", lambda *a: calls.append(a) or [0.0, 0.0])
    src, npz = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(src))
    np.savez(npz, x=x)
    args = ["onnx", str(src), "-o", str(tmp_path / "q.onnx"), "--format", "uint4"]
    args += ["--method", "awq", "--calib", str(npz), "--quiet"]
    assert main([*args, "--no-awq-check"]) == 0 and not calls
    assert main([*args, "--force"]) == 0 and len(calls) == 1
