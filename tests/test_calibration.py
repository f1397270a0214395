"""Calibrated quantization of ONNX models: activation capture, AWQ folding, GPTQ, mixed bits."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from quantize.cli import main  # noqa: E402
from quantize.io.calibration import calibration_feeds, capture_activations  # noqa: E402
from quantize.io.onnx import quantize_onnx_model  # noqa: E402

K, H, N = 128, 256, 64


def _mlp(rng, act: str = "Relu") -> onnx.ModelProto:
    """x -> MatMul(W1) -> act -> Gemm(W2, transB) + b: the two weights quantized."""
    w1 = (rng.standard_normal((K, H)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((N, H)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(N) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node(act, ["h"], ["r"], name="act"),
        helper.make_node("Gemm", ["r", "W2", "b"], ["y"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (w2, "W2"), (b, "b"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _heavy_inputs(rng, rows: int = 384) -> np.ndarray:
    """Activations whose channels differ in scale by orders of magnitude (as LLM outliers)."""
    scale = np.exp(rng.standard_normal(K) * 1.5)
    return (rng.standard_normal((rows, K)) * scale).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    return _mlp(rng), _heavy_inputs(rng)


# --------------------------------------------------------------------------------- capture


def test_hessian_equals_xtx_by_hand(setup):
    model, x = setup
    feeds = calibration_feeds(model, {"x": x}, batch_size=50)
    assert len(feeds) == 8 and feeds[-1]["x"].shape == (34, K)
    acts = capture_activations(model, ["x", "r"], feeds, max_samples=100)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(acts["x"].hessian, x64.T @ x64, rtol=1e-10, atol=1e-10)
    w1 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    r = np.maximum(x64 @ w1, 0)
    np.testing.assert_allclose(acts["r"].hessian, r.T @ r, rtol=1e-4, atol=1e-3)
    assert acts["x"].rows == acts["r"].rows == len(x)
    # the reservoir holds at most max_samples rows, each one a real row of x
    s = acts["x"].samples
    assert s.shape == (100, K)
    assert all(np.any(np.all(x == row, axis=1)) for row in s)


def test_hessian_in_row_chunks_is_the_same(setup, monkeypatch):
    """A run's rows go to float64 a chunk at a time (memory); the sum must not change."""
    import quantize.io.calibration as cal

    model, x = setup
    monkeypatch.setattr(cal, "HESSIAN_CHUNK", 37)
    acts = capture_activations(model, ["x"], [{"x": x}], max_samples=0)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(acts["x"].hessian, x64.T @ x64, rtol=1e-10, atol=1e-10)


def test_capture_transposed_and_nd():
    """A 3-D activation is read as rows of K; a transposed (Gemm transA) one as its transpose."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 5, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["a"], ["a2"]),
            helper.make_node("Reshape", ["a2", "shape"], ["m"]),
        ],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 5, 8])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, [8, 10])],
        [numpy_helper.from_array(np.array([8, 10], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    acts = capture_activations(model, ["a2", "m"], [{"a": a}], transposed=["m"])
    flat = a.reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(acts["a2"].hessian, flat.T @ flat, rtol=1e-10, atol=1e-10)
    mt = a.reshape(8, 10).T.astype(np.float64)
    np.testing.assert_allclose(acts["m"].hessian, mt.T @ mt, rtol=1e-10, atol=1e-10)
    assert acts["m"].rows == 10


def test_input_model_is_not_modified(setup):
    model, x = setup
    before = model.SerializeToString()
    quantize_onnx_model(model, method="awq", calib={"x": x[:64]}, block_size=32)
    capture_activations(model, ["r"], [{"x": x[:4]}])
    assert model.SerializeToString() == before


# --------------------------------------------------------------------------------- AWQ folding


def test_awq_fold_keeps_the_float_model(setup):
    """The AWQ graph with the scaled weights left in float computes what the float model does."""
    model, x = setup
    q, _ = quantize_onnx_model(
        model, method="awq", calib={"x": x}, output="qdq", format="uint4", block_size=32
    )
    muls = [n for n in q.graph.node if n.op_type == "Mul" and "awq" in n.name]
    assert len(muls) == 2
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    float_w = {
        n: numpy_helper.to_array(t) for n, t in ((t.name, t) for t in model.graph.initializer)
    }
    # swap each DequantizeLinear for the float weight times s (s = 1 / the Mul's factor)
    consumer_of = {n.input[1]: n for n in q.graph.node if n.op_type in ("MatMul", "Gemm")}
    new_nodes, new_inits = [], []
    for n in q.graph.node:
        if n.op_type != "DequantizeLinear":
            new_nodes.append(n)
            continue
        reader = consumer_of[n.output[0]]
        mul = next(m for m in muls if m.output[0] == reader.input[0])
        s = 1.0 / inits[mul.input[1]].astype(np.float64)
        name = "W1" if reader.op_type == "MatMul" else "W2"
        w = float_w[name].astype(np.float64)
        scaled = w * s[:, None] if reader.op_type == "MatMul" else w * s[None, :]
        new_inits.append(numpy_helper.from_array(scaled.astype(np.float32), n.output[0]))
    del q.graph.node[:]
    q.graph.node.extend(new_nodes)
    q.graph.initializer.extend(new_inits)
    np.testing.assert_allclose(_run(q, x), _run(model, x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
def test_awq_and_gptq_beat_rtn_on_calibration_inputs(setup, fmt):
    model, x = setup
    ref = _run(model, x)
    errs = {}
    for method in ("rtn", "awq", "gptq"):
        q, rows = quantize_onnx_model(model, method=method, calib={"x": x}, format=fmt)
        errs[method] = _rel(ref, _run(q, x))
        for r in rows:
            assert r["method"] == method
            assert r["output_error"] <= r["output_error_rtn"] * (1 + 1e-9)
    assert errs["awq"] < errs["rtn"] and errs["gptq"] < errs["rtn"], errs


def test_data_free_methods_run_and_report(setup):
    model, x = setup
    for method in ("mse", "hqq"):
        q, rows = quantize_onnx_model(model, method=method, format="uint4")
        assert all(r["method"] == method and "output_error" not in r for r in rows)
        assert _rel(_run(model, x), _run(q, x)) < 0.5


def test_gptq_without_calib_uses_random_inputs(setup):
    model, _ = setup
    details: dict = {}
    _, rows = quantize_onnx_model(model, method="gptq", details=details)
    assert any("random input" in n for n in details["notes"])
    assert all(r["method"] == "gptq" for r in rows)


# --------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("output", ["matmulnbits", "qdq"])
def test_target_bits_respects_the_budget(setup, output):
    model, x = setup
    ref = _run(model, x)
    errs = []
    for target in (4.31, 5.0, 8.4):
        q, rows = quantize_onnx_model(
            model,
            format="uint4",
            block_size=128,
            method="rtn",
            calib={"x": x},
            target_bits=target,
            output=output,
        )
        n = sum(np.prod(r["shape"]) for r in rows)
        bits = sum(r["bits_per_weight"] * np.prod(r["shape"]) for r in rows) / n
        assert bits <= target + 1e-9
        # and as written: every byte the quantized weights became, padding included
        before = {t.name for t in model.graph.initializer}
        new = [t for t in q.graph.initializer if t.name not in before]
        assert all(t.raw_data for t in new)
        assert 8 * sum(len(t.raw_data) for t in new) / n <= target + 1e-9
        errs.append(_rel(ref, _run(q, x)))
        if target == 8.4:
            assert {r["choice"] for r in rows} == {"uint8/b128"}
            if output == "matmulnbits":
                assert {a.i for n in q.graph.node for a in n.attribute if a.name == "bits"} == {8}
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.02, errs
    with pytest.raises(ValueError, match="target_bits"):
        quantize_onnx_model(model, format="uint4", target_bits=2.0)


# --------------------------------------------------------------------------------- CLI, errors


def test_cli_gptq_with_calib(setup, tmp_path, capsys):
    model, x = setup
    src, dst, calib = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(src))
    np.savez(calib, x=x[:200])
    code = main(
        ["onnx", str(src), "-o", str(dst), "--method", "gptq", "--calib", str(calib),
         "--target-bits", "5"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and dst.is_file()
    assert "out err gptq" in out and "method gptq" in out and "average:" in out
    q = onnx.load(str(dst))
    assert _rel(_run(model, x), _run(q, x)) < 0.3


def test_cli_awq_without_calib_says_so(setup, tmp_path, capsys):
    model, _ = setup
    src, dst = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))
    assert main(["onnx", str(src), "-o", str(dst), "--method", "awq"]) == 0
    assert "random inputs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.zeros((4, K), np.float32)}, "no array for input 'x'"),
        ({"x": np.zeros((4, K), np.int64)}, "input 'x' is int64"),
        ({"x": np.zeros((4, K + 1), np.float32)}, "input 'x' has shape"),
        ({"x": np.zeros((4, 2, K), np.float32)}, "input 'x' has shape"),
    ],
)
def test_bad_npz_is_a_clear_error(setup, tmp_path, capsys, arrays, message):
    model, _ = setup
    src, calib = tmp_path / "m.onnx", tmp_path / "bad.npz"
    onnx.save(model, str(src))
    np.savez(calib, **arrays)
    code = main(["onnx", str(src), "-o", str(tmp_path / "q.onnx"), "--method", "gptq",
                 "--calib", str(calib)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and message in err and str(calib) in err
    with pytest.raises(ValueError, match=message):
        calibration_feeds(model, calib)


def test_pickled_or_broken_npz_is_refused(setup, tmp_path):
    model, _ = setup
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"obj\.npz"):
        calibration_feeds(model, pickled)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"broken\.npz"):
        calibration_feeds(model, broken)
    with pytest.raises(ValueError, match="no such file"):
        calibration_feeds(model, tmp_path / "missing.npz")


def test_bad_method_and_target_bits(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="method"):
        quantize_onnx_model(model, method="magic")
    with pytest.raises(ValueError, match="target_bits"):
        quantize_onnx_model(model, target_bits=-1)
    with pytest.raises(TypeError, match="target_bits"):
        quantize_onnx_model(model, target_bits="4")


# --------------------------------------------------------------------------------- awq+gptq


def test_awq_gptq_is_no_worse_than_either_alone(setup):
    model, x = setup
    errs = {}
    for method in ("awq", "gptq", "awq+gptq"):
        _, rows = quantize_onnx_model(model, method=method, calib={"x": x}, format="uint4")
        errs[method] = {r["name"]: r["output_error"] for r in rows}
        if method == "awq+gptq":
            assert all(r["picked"] in ("awq", "gptq", "awq+gptq") for r in rows)
    for name, err in errs["awq+gptq"].items():
        assert err <= min(errs["awq"][name], errs["gptq"][name]) * (1 + 1e-12), (name, errs)


def test_awq_gptq_on_a_scaled_weight_beats_plain_gptq():
    """GPTQ after AWQ's scaling, against the Hessian of x / s, on outlier channels."""
    from quantize.io.onnx import _awq, _awq_gptq, _gptq, _rel_error

    rng = np.random.default_rng(1)
    x = _heavy_inputs(rng, 512).astype(np.float64)
    w = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    h = x.T @ x
    s, _ = _awq(w, x, "uint4", 32)
    plain = _gptq(w, h, "uint4", 32).dequantize(np.float64)
    both = _awq_gptq(w, s, h, "uint4", 32).dequantize(np.float64) / s[:, None]
    assert _rel_error(w, both - w, h) < _rel_error(w, plain - w, h)


# --------------------------------------------------------------------------------- memory bound


def test_capture_groups_keep_shared_inputs_together():
    from quantize.io.onnx import _capture_groups

    acts = {
        ("q", 0): [("a", False)],
        ("k", 0): [("a", False)],
        ("o", 0): [("b", False)],
        ("up", 0): [("c", False)],
        ("down", 0): [("d", False), ("a", False)],  # joins q and k through "a"
    }
    keys = list(acts)
    cost = {"a": 10, "b": 10, "c": 10, "d": 10}
    assert _capture_groups(keys, acts, cost, None) == [keys]
    groups = _capture_groups(keys, acts, cost, 25)
    assert sorted(k for g in groups for k in g) == sorted(keys)
    for g in groups:  # within the budget unless one cluster alone is above it
        names = {n for key in g for n, _ in acts[key]}
        assert sum(cost[n] for n in names) <= 25 or names == {"a", "d"}
    (together,) = [g for g in groups if ("q", 0) in g]
    assert {("k", 0), ("down", 0)} <= set(together)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calib_memory_budget_gives_the_same_model(setup, method):
    model, x = setup
    one, _ = quantize_onnx_model(model, method=method, calib={"x": x}, calib_memory=None)
    details: dict = {}
    many, _ = quantize_onnx_model(
        model, method=method, calib={"x": x}, calib_memory=1, details=details
    )
    assert any("2 passes" in n for n in details["notes"]), details["notes"]
    assert one.SerializeToString() == many.SerializeToString()
    with pytest.raises(ValueError, match="calib_memory"):
        quantize_onnx_model(model, method=method, calib={"x": x}, calib_memory=0)
    with pytest.raises(TypeError, match="calib_memory"):
        quantize_onnx_model(model, method=method, calib={"x": x}, calib_memory=1.5)


# --------------------------------------------------------------------------------- report


def test_cli_writes_a_report_with_the_method_settings(setup, tmp_path, capsys):
    import json

    model, x = setup
    src, dst, calib = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(src))
    np.savez(calib, x=x[:64])
    argv = ["onnx", str(src), "-o", str(dst), "--format", "uint4", "--method", "awq+gptq",
            "--calib", str(calib), "--target-bits", "5.5", "--calib-memory", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "q.report.json" in out and "method awq+gptq" in out
    report = json.loads((tmp_path / "q.report.json").read_text())
    s = report["settings"]
    assert (s["method"], s["calib"], s["target_bits"]) == ("awq+gptq", str(calib), 5.5)
    assert report["totals"]["quantized"] == 2
    assert {t["picked"] for t in report["tensors"]} <= {"awq", "gptq", "awq+gptq"}
    assert "awq+gptq" in (tmp_path / "q.report.md").read_text()
    dst2 = tmp_path / "r.onnx"
    assert main(["onnx", str(src), "-o", str(dst2), "--no-report"]) == 0
    assert dst2.is_file() and not (tmp_path / "r.report.json").exists()
