"""ONNX graph shapes the quantizer meets in exported models: weights behind Identity nodes,
MatMuls inside If/Loop bodies, ORT's own int4 rule (int4_ort), lazily read external data."""

from __future__ import annotations

import logging

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from quantize import quantize_tensor  # noqa: E402
from quantize.io import onnx as qonnx  # noqa: E402

OUTPUTS = ["matmulnbits", "qdq"]
EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}
rng = np.random.default_rng(7)


def make_model(nodes, inputs, outputs, inits, opset=17):
    model = h.make_model(
        h.make_graph(nodes, "g", inputs, outputs, inits),
        opset_imports=[h.make_opsetid("", opset)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def fin(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def weights(*shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def run(model, feed):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in EXACT.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    ).run(None, feed)


def quantize(model, **kw):
    q, rows = qonnx.quantize_onnx_model(model, **kw)
    onnx.checker.check_model(q, full_check=True)
    return q, rows


def deq(w, fmt="int4", bs=32, axis=0):
    return quantize_tensor(w, fmt, bs, axis=axis).dequantize()


def close(y, ref):
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(ref).max()))


def ops(model):
    return [n.op_type for n in model.graph.node]


# ------------------------------------------------------------------------------ Identity


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("constant", [False, True])
def test_weight_behind_identity_chain_is_quantized(output, constant):
    W = weights(64, 32)
    src = [h.make_node("Constant", [], ["W"], value=nh.from_array(W, "W"))] if constant else []
    m = make_model(
        [
            *src,
            h.make_node("Identity", ["W"], ["W_id"]),
            h.make_node("Identity", ["W_id"], ["W_id2"]),
            h.make_node("MatMul", ["x", "W_id2"], ["y"], name="mm"),
        ],
        [fin("x", [2, 64])],
        [fin("y", [2, 32])],
        [] if constant else [nh.from_array(W, "W")],
    )
    q, rows = quantize(m, output=output)
    assert [r["name"] for r in rows] == ["W"] and not rows[0]["kept_float"]
    assert "Identity" not in ops(q) and "Constant" not in ops(q)  # dead chain removed
    assert "W" not in {t.name for t in q.graph.initializer}
    assert q.ByteSize() < m.ByteSize() / 4
    x = rng.standard_normal((2, 64)).astype(np.float32)
    close(run(q, {"x": x})[0], x @ deq(W))
    assert np.allclose(run(q, {"x": x})[0], run(m, {"x": x})[0], atol=0.5)


@pytest.mark.parametrize("output", OUTPUTS)
def test_weight_shared_through_identities_is_quantized_once(output):
    W = weights(64, 32)
    m = make_model(
        [
            h.make_node("Identity", ["W"], ["W_a"]),
            h.make_node("Identity", ["W"], ["W_b"]),
            h.make_node("MatMul", ["x", "W_a"], ["a"]),
            h.make_node("MatMul", ["x2", "W_b"], ["b"]),
            h.make_node("MatMul", ["x3", "W"], ["c"]),
            h.make_node("Sum", ["a", "b", "c"], ["y"]),
        ],
        [fin(n, [2, 64]) for n in ("x", "x2", "x3")],
        [fin("y", [2, 32])],
        [nh.from_array(W, "W")],
    )
    q, rows = quantize(m, output=output, include=["W"])
    assert len(rows) == 1 and rows[0]["consumers"] == 3 and not rows[0]["kept_float"]
    assert sorted(t.name for t in q.graph.initializer) == ["W_Q4", "W_scales"]
    assert "Identity" not in ops(q)
    if output == "qdq":
        assert ops(q).count("DequantizeLinear") == 1
    xs = {n: rng.standard_normal((2, 64)).astype(np.float32) for n in ("x", "x2", "x3")}
    close(run(q, xs)[0], (xs["x"] + xs["x2"] + xs["x3"]) @ deq(W))


def test_identity_with_other_readers_keeps_the_float_weight():
    """The Identity's output also feeds a ReduceSum and a graph output: both keep working."""
    W = weights(32, 16)
    m = make_model(
        [
            h.make_node("Identity", ["W"], ["W_id"]),
            h.make_node("MatMul", ["x", "W_id"], ["a"]),
            h.make_node("ReduceSum", ["W_id"], ["s"], keepdims=0),
            h.make_node("Add", ["a", "s"], ["y"]),
        ],
        [fin("x", [2, 32])],
        [fin("y", [2, 16]), fin("W_id", [32, 16])],
        [nh.from_array(W, "W")],
        opset=11,
    )
    d = {}
    q, rows = quantize(m, details=d)
    assert rows[0]["name"] == "W" and rows[0]["kept_float"]
    assert "Identity" in ops(q) and "W" in {t.name for t in q.graph.initializer}
    x = rng.standard_normal((2, 32)).astype(np.float32)
    y, w_out = run(q, {"x": x})
    close(y, x @ deq(W) + W.sum())
    np.testing.assert_array_equal(w_out, W)


def test_identity_patterns_match_either_name():
    W = weights(32, 16)
    m = make_model(
        [h.make_node("Identity", ["W"], ["tied"]), h.make_node("MatMul", ["x", "tied"], ["y"])],
        [fin("x", [2, 32])],
        [fin("y", [2, 16])],
        [nh.from_array(W, "W")],
    )
    for pattern in ("W", "tied"):
        with pytest.raises(ValueError, match="no quantizable"):
            qonnx.quantize_onnx_model(m, exclude=[pattern])
    _, rows = quantize(m, include=["tied"])
    assert [r["name"] for r in rows] == ["W"]


# ------------------------------------------------------------------------------ subgraphs


def loop_model():
    """A Loop whose body multiplies by a body-local weight and by an outer one (W_out), an
    If whose branch uses W_out, and a top-level MatMul on W_top."""
    K = 32
    W_top, W_out, W_body = weights(K, K), weights(K, K), weights(K, K)
    body = h.make_graph(
        [
            h.make_node("MatMul", ["v_in", "W_body"], ["t"]),
            h.make_node("MatMul", ["t", "W_out"], ["v_out"]),
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [fin("i", [], T.INT64), fin("cond_in", [], T.BOOL), fin("v_in", [2, K])],
        [fin("cond_out", [], T.BOOL), fin("v_out", [2, K])],
        [nh.from_array(W_body, "W_body")],
    )
    then = h.make_graph(
        [h.make_node("MatMul", ["x", "W_out"], ["tt"])], "then", [], [fin("tt", [2, K])]
    )
    other = h.make_graph([h.make_node("Neg", ["x"], ["ee"])], "else", [], [fin("ee", [2, K])])
    m = make_model(
        [
            h.make_node("MatMul", ["x", "W_top"], ["a"]),
            h.make_node("Loop", ["n", "", "a"], ["l"], body=body),
            h.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other),
            h.make_node("Add", ["l", "b"], ["y"]),
        ],
        [fin("x", [2, K]), fin("n", [], T.INT64), fin("c", [], T.BOOL)],
        [fin("y", [2, K])],
        [nh.from_array(W_top, "W_top"), nh.from_array(W_out, "W_out")],
    )
    return m, W_top, W_out, W_body


@pytest.mark.parametrize("output", OUTPUTS)
def test_subgraph_weights_are_left_float_and_reported(output):
    m, W_top, W_out, W_body = loop_model()
    d = {}
    q, rows = quantize(m, output=output, details=d)
    assert [r["name"] for r in rows] == ["W_top"] and not rows[0]["kept_float"]
    inside = [s for s in d["skipped"] if s["reason"].startswith("inside a subgraph")]
    assert sorted(s["name"] for s in inside) == ["W_body", "W_out", "W_out"]
    assert "W_out" in {t.name for t in q.graph.initializer}  # outer name still resolvable
    x = rng.standard_normal((2, 32)).astype(np.float32)
    a = x @ deq(W_top)
    for c in (True, False):
        feed = {"x": x, "n": np.array(2, np.int64), "c": np.array(c)}
        want = a @ W_body @ W_out @ W_body @ W_out + (x @ W_out if c else -x)
        close(run(q, feed)[0], want)


# ------------------------------------------------------------------------------ int4_ort


def ort_matmulnbits(W, block):
    """What onnxruntime's own MatMulNBitsQuantizer (symmetric) writes: (B, scales) arrays."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    m = make_model(
        [h.make_node("MatMul", ["x", "W"], ["y"])],
        [fin("x", [2, W.shape[0]])],
        [fin("y", [2, W.shape[1]])],
        [nh.from_array(W, "W")],
        opset=21,
    )
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True)
    quantizer = MatMulNBitsQuantizer(m, algo_config=cfg)
    logging.disable(logging.INFO)
    try:
        quantizer.process()
    finally:
        logging.disable(logging.NOTSET)
    (node,) = quantizer.model.model.graph.node
    assert len(node.input) == 3
    inits = {t.name: nh.to_array(t) for t in quantizer.model.model.graph.initializer}
    return inits[node.input[1]], inits[node.input[2]]


@pytest.mark.parametrize("block", [16, 32, 128])
def test_int4_ort_matmulnbits_equals_ort_quantizer_byte_for_byte(block):
    W = weights(256, 48)
    W[:, 0] = np.abs(W[:, 0])  # positive extremes: ORT's negative scales
    q, rows = quantize(
        make_model(
            [h.make_node("MatMul", ["x", "W"], ["y"])],
            [fin("x", [2, 256])],
            [fin("y", [2, 48])],
            [nh.from_array(W, "W")],
        ),
        format="int4_ort",
        block_size=block,
    )
    (node,) = q.graph.node
    assert node.op_type == "MatMulNBits" and len(node.input) == 3  # no zero points
    inits = {t.name: nh.to_array(t) for t in q.graph.initializer}
    b, s = inits[node.input[1]], inits[node.input[2]]
    want_b, want_s = ort_matmulnbits(W, block)
    assert (s < 0).any() and (s > 0).any()
    assert b.tobytes() == want_b.tobytes() and s.tobytes() == want_s.tobytes()
    assert rows[0]["format"] == "int4_ort"


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("K", [64, 80])
def test_int4_ort_runs_in_ort(output, K):
    W = weights(K, 24)
    m = make_model(
        [h.make_node("MatMul", ["x", "W"], ["y"])],
        [fin("x", [3, K])],
        [fin("y", [3, 24])],
        [nh.from_array(W, "W")],
    )
    q, _ = quantize(m, format="int4_ort", block_size=32, output=output)
    if output == "qdq":
        dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear")
        assert len(dq.input) == 2  # INT4 codes, signed scales, no zero point
    x = rng.standard_normal((3, K)).astype(np.float32)
    close(run(q, {"x": x})[0], x @ deq(W, "int4_ort"))


# ------------------------------------------------------------------------------ external data


@pytest.mark.parametrize("output", OUTPUTS)
def test_external_data_is_read_lazily(tmp_path, output, monkeypatch):
    """Inputs with external data are never loaded whole: each weight is read when quantized,
    untouched tensors are copied across file to file."""
    W1, W2 = weights(128, 64), weights(64, 32)
    bias = rng.standard_normal(32).astype(np.float32)
    m = make_model(
        [
            h.make_node("MatMul", ["x", "W1"], ["a"]),
            h.make_node("MatMul", ["a", "W2"], ["b"]),
            h.make_node("Add", ["b", "bias"], ["y"]),
        ],
        [fin("x", [2, 128])],
        [fin("y", [2, 32])],
        [nh.from_array(W1, "W1"), nh.from_array(W2, "W2"), nh.from_array(bias, "bias")],
    )
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(m, src, save_as_external_data=True, location="w.bin", size_threshold=0)

    def no_full_load(*a, **k):
        raise AssertionError("external data loaded whole")

    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", no_full_load)
    out = tmp_path / "q.onnx"
    res = qonnx.quantize_onnx_file(src, out, output=output, exclude=["W2"])
    assert [p.name for p in res["output_files"]] == ["q.onnx.data", "q.onnx"]
    monkeypatch.undo()
    q = onnx.load(str(out))
    onnx.checker.check_model(q)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    close(run(q, {"x": x})[0], x @ deq(W1) @ W2 + bias)


def test_lazy_external_data_checks_and_single_file_output(tmp_path):
    W = weights(64, 32)
    m = make_model(
        [h.make_node("MatMul", ["x", "W"], ["y"])],
        [fin("x", [2, 64])],
        [fin("y", [2, 32])],
        [nh.from_array(W, "W")],
    )
    src = tmp_path / "m.onnx"
    onnx.save_model(m, src, save_as_external_data=True, location="w.bin", size_threshold=0)
    model, files = qonnx.load_model(src, lazy=True)
    assert files == {tmp_path / "w.bin"} and not model.graph.initializer[0].HasField("raw_data")
    # a single-file output reads the untouched tensors in; none keeps a reference to w.bin
    out = tmp_path / "one.onnx"
    qonnx.quantize_onnx_file(src, out, external_data=False, exclude=["nothing"])
    q = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != T.EXTERNAL for t in q.graph.initializer)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    close(run(q, {"x": x})[0], x @ deq(W))

    stored = onnx.load(str(src), load_external_data=False)
    entry = next(e for e in stored.graph.initializer[0].external_data if e.key == "location")
    for loc in ("../w.bin", "/etc/passwd"):
        entry.value = loc
        onnx.save_model(stored, tmp_path / "bad.onnx")
        with pytest.raises(ValueError, match=r"bad external data location|missing"):
            qonnx.load_model(tmp_path / "bad.onnx", lazy=True)
    entry.value = "w.bin"
    stored.graph.initializer[0].dims[0] = 65  # shape needs more bytes than stored
    onnx.save_model(stored, tmp_path / "bad.onnx")
    with pytest.raises(ValueError, match="out of range or of the wrong length"):
        qonnx.load_model(tmp_path / "bad.onnx", lazy=True)


def test_command_takes_int4_ort(tmp_path):
    import argparse
    import io

    from quantize.commands import onnx as onnx_cmd

    W = weights(64, 32)
    m = make_model(
        [h.make_node("MatMul", ["x", "W"], ["y"])],
        [fin("x", [2, 64])],
        [fin("y", [2, 32])],
        [nh.from_array(W, "W")],
    )
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save_model(m, src)
    parser = argparse.ArgumentParser(prog="quantize")
    onnx_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["onnx", str(src), "-o", str(out), "--format", "int4_ort"])
    assert args.run(args, out=io.StringIO()) == 0
    q = onnx.load(str(out))
    scales = next(nh.to_array(t) for t in q.graph.initializer if t.name.endswith("_scales"))
    assert (scales < 0).any() and len(q.graph.node[0].input) == 3


@pytest.mark.parametrize("kw", [{"method": "mse"}, {"method": "gptq"}, {"target_bits": 6.0}])
def test_int4_ort_with_methods_and_mixed_precision(kw):
    W = weights(64, 32)
    m = make_model(
        [h.make_node("MatMul", ["x", "W"], ["y"])],
        [fin("x", [2, 64])],
        [fin("y", [2, 32])],
        [nh.from_array(W, "W")],
    )
    q, _ = quantize(m, format="int4_ort", **kw)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert np.corrcoef(run(q, {"x": x})[0].ravel(), (x @ W).ravel())[0, 1] > 0.98
