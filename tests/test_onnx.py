"""The ONNX adapter and `quantize onnx`: small models built with onnx.helper, run in ORT."""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from quantize import quantize_tensor  # noqa: E402
from quantize.commands import onnx as onnx_cmd  # noqa: E402
from quantize.io import onnx as qonnx  # noqa: E402
from quantize.io.atomic import OutputError  # noqa: E402

OUTPUTS = ["matmulnbits", "qdq"]
FORMATS = ["int4", "uint4"]
# ORT fuses DequantizeLinear(int4) + MatMul into MatMulNBits with accuracy_level 4 (int8
# activations) unless told otherwise; for exact comparisons the activations stay float.
EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}


# ------------------------------------------------------------------------------ helpers


def make_model(nodes, inputs, outputs, inits, opset=17, ir_version=8):
    graph = h.make_graph(nodes, "g", inputs, outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def fin(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def run(model, feed, config=EXACT):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feed)


def deq(w, fmt, bs, axis):
    return quantize_tensor(w, fmt, bs, axis=axis).dequantize()


def assert_close(y, ref):
    """Equal up to float rounding of the matmul (accumulation order differs)."""
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(ref).max()))


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def quantize(model, **kw):
    q, rows = qonnx.quantize_onnx_model(model, **kw)
    onnx.checker.check_model(q, full_check=True)
    return q, rows


def ops(model):
    return [n.op_type for n in model.graph.node]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


rng = np.random.default_rng(0)


def weights(*shape, dtype=np.float32):
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype)


def matmul_model(K=64, N=48, opset=17):
    W = weights(K, N)
    m = make_model(
        [h.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [fin("x", ["batch", K])],
        [fin("y", ["batch", N])],
        [nh.from_array(W, "W")],
        opset=opset,
    )
    return m, W


# ------------------------------------------------------------------------------ MatMul


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_initializer_matches_numpy_and_float(output, fmt):
    m, W = matmul_model()
    q, rows = quantize(m, format=fmt, block_size=32, output=output)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    y = run(q, {"x": x})[0]
    assert_close(y, x @ deq(W, fmt, 32, 0))
    assert cosine(y, x @ W) > 0.99
    names = [t.name for t in q.graph.initializer]
    assert "W" not in names  # the float weight is gone
    if output == "matmulnbits":
        assert ops(q) == ["MatMulNBits"]
        node = q.graph.node[0]
        attrs = {a.name: h.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"K": 64, "N": 48, "bits": 4, "block_size": 32}
        assert node.domain == "com.microsoft"
        b = nh.to_array(next(t for t in q.graph.initializer if t.name == node.input[1]))
        assert b.dtype == np.uint8 and b.shape == (48, 2, 16)
        # int4: no zero point input, ORT's default 8 applies; uint4: packed (N, ceil(nb/2))
        assert len(node.input) == (3 if fmt == "int4" else 4)
    else:
        assert ops(q) == ["DequantizeLinear", "MatMul"]
        assert qonnx._default_opset(q) == 21 and q.ir_version >= 10
        qw = next(t for t in q.graph.initializer if t.name == "W_Q4")
        assert qw.data_type == (T.INT4 if fmt == "int4" else T.UINT4)
        assert list(qw.dims) == [64, 48]
    (row,) = rows
    assert row["name"] == "W" and row["shape"] == [64, 48] and row["consumers"] == 1
    assert 15 < row["sqnr_db"] < 30
    assert row["bits_per_weight"] == pytest.approx(5.0 if fmt == "int4" else 5.125)


def test_int4_codes_are_stored_as_code_plus_8():
    """ORT MatMulNBits reads unsigned nibbles with zero point 8: int4 code c is stored c + 8."""
    m, W = matmul_model(K=32, N=2)
    q, _ = quantize(m, format="int4", block_size=32)
    b = nh.to_array(next(t for t in q.graph.initializer if t.name == "W_Q4"))
    qt = quantize_tensor(W, "int4", 32, axis=0)
    codes = qt.codes().reshape(2, 32).astype(np.int16)
    nibbles = np.stack([b & 15, b >> 4], axis=-1).reshape(2, 32).astype(np.int16)
    np.testing.assert_array_equal(nibbles, codes + 8)


def test_matmul_3d_activation_and_accuracy_level():
    m, W = matmul_model()
    q, _ = quantize(m, accuracy_level=4)
    node = q.graph.node[0]
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4
    x = rng.standard_normal((3, 64)).astype(np.float32)
    assert cosine(run(q, {"x": x})[0], x @ W) > 0.99  # int8 activations: close, not exact


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("K", [70, 10])
def test_k_not_divisible_by_block(output, K):
    m, W = matmul_model(K=K, N=24)
    q, _ = quantize(m, format="uint4", block_size=32, output=output)
    x = rng.standard_normal((4, K)).astype(np.float32)
    assert_close(run(q, {"x": x})[0], x @ deq(W, "uint4", 32, 0))
    if output == "matmulnbits":
        assert {a.name: a.i for a in q.graph.node[0].attribute}["K"] == K


# ------------------------------------------------------------------------------ Gemm


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize(
    "attrs",
    [
        {"transB": 1},
        {"transB": 1, "alpha": 0.5, "beta": 2.0},
        {"transB": 0, "alpha": 1.5},
        {"transA": 1, "transB": 1, "beta": 0.0},
    ],
)
def test_gemm_keeps_alpha_beta_bias(output, attrs):
    K, N = 64, 40
    tb, ta = attrs.get("transB", 0), attrs.get("transA", 0)
    W = weights(N, K) if tb else weights(K, N)
    C = rng.standard_normal(N).astype(np.float32)
    m = make_model(
        [h.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", **attrs)],
        [fin("x", [K, 3] if ta else [3, K])],
        [fin("y", [3, N])],
        [nh.from_array(W, "W"), nh.from_array(C, "C")],
    )
    q, _ = quantize(m, format="int4", block_size=32, output=output)
    x = rng.standard_normal((K, 3) if ta else (3, K)).astype(np.float32)
    a = x.T if ta else x
    wq = deq(W, "int4", 32, 1 if tb else 0)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    ref = alpha * (a @ (wq.T if tb else wq)) + beta * C
    y = run(q, {"x": x})[0]
    assert_close(y, ref)
    assert cosine(y, run(m, {"x": x})[0]) > 0.99
    if output == "qdq":
        assert ops(q) == ["DequantizeLinear", "Gemm"]
        gemm = q.graph.node[1]
        assert {a.name: h.get_attribute_value(a) for a in gemm.attribute} == pytest.approx(attrs)
    else:
        assert "Gemm" not in ops(q) and "MatMulNBits" in ops(q)
        assert ("Transpose" in ops(q)) == bool(ta)
        assert ("Add" in ops(q)) == (beta != 0)


# ------------------------------------------------------------------------------ weight sources


@pytest.mark.parametrize("output", OUTPUTS)
def test_constant_node_weight(output):
    W = weights(32, 16)
    m = make_model(
        [
            h.make_node("Constant", [], ["W"], value=nh.from_array(W, "Wc")),
            h.make_node("MatMul", ["x", "W"], ["y"]),
        ],
        [fin("x", [2, 32])],
        [fin("y", [2, 16])],
        [],
    )
    q, rows = quantize(m, block_size=16, output=output)
    assert "Constant" not in ops(q)
    x = rng.standard_normal((2, 32)).astype(np.float32)
    assert_close(run(q, {"x": x})[0], x @ deq(W, "int4", 16, 0))
    assert rows[0]["name"] == "W"


@pytest.mark.parametrize("output", OUTPUTS)
def test_shared_weight_is_quantized_once(output):
    W = weights(64, 32)
    m = make_model(
        [
            h.make_node("MatMul", ["x", "W"], ["a"]),
            h.make_node("Relu", ["a"], ["r"]),
            h.make_node("MatMul", ["x2", "W"], ["b"]),
            h.make_node("Add", ["r", "b"], ["y"]),
        ],
        [fin("x", [2, 64]), fin("x2", [2, 64])],
        [fin("y", [2, 32])],
        [nh.from_array(W, "W")],
    )
    q, rows = quantize(m, output=output)
    assert len(rows) == 1 and rows[0]["consumers"] == 2 and not rows[0]["kept_float"]
    assert sorted(t.name for t in q.graph.initializer) == sorted(
        ["W_Q4", "W_scales"]
    )  # one copy, no float weight
    if output == "qdq":
        assert ops(q).count("DequantizeLinear") == 1
    x, x2 = (rng.standard_normal((2, 64)).astype(np.float32) for _ in range(2))
    wq = deq(W, "int4", 32, 0)
    assert_close(run(q, {"x": x, "x2": x2})[0], np.maximum(x @ wq, 0) + x2 @ wq)


def test_weight_also_read_elsewhere_keeps_its_float_copy():
    W = weights(32, 32)
    m = make_model(
        [
            h.make_node("MatMul", ["x", "W"], ["a"]),
            h.make_node("ReduceSum", ["W"], ["s"], keepdims=0),  # reads W as data
            h.make_node("Add", ["a", "s"], ["y"]),
        ],
        [fin("x", [2, 32])],
        [fin("y", [2, 32])],
        [nh.from_array(W, "W")],
        opset=11,
    )
    d = {}
    q, rows = qonnx.quantize_onnx_model(m, details=d)
    assert rows[0]["kept_float"] and "W" in [t.name for t in q.graph.initializer]
    assert any("kept" in n for n in d["notes"])
    x = rng.standard_normal((2, 32)).astype(np.float32)
    assert_close(run(q, {"x": x})[0], x @ deq(W, "int4", 32, 0) + W.sum())


def test_include_exclude_and_op_types():
    W1, W2 = weights(32, 16), weights(32, 16)
    m = make_model(
        [
            h.make_node("MatMul", ["x", "attn.W"], ["a"], name="attn"),
            h.make_node("Gemm", ["x", "lm_head.W"], ["b"], name="head"),
            h.make_node("Add", ["a", "b"], ["y"]),
        ],
        [fin("x", [2, 32])],
        [fin("y", [2, 16])],
        [nh.from_array(W1, "attn.W"), nh.from_array(W2, "lm_head.W")],
    )

    def names(**kw):
        d = {}
        _, rows = qonnx.quantize_onnx_model(m, details=d, **kw)
        return [r["name"] for r in rows], {s["name"]: s["reason"] for s in d["skipped"]}

    assert names()[0] == ["attn.W", "lm_head.W"]
    got, why = names(exclude=["lm_head*"])
    assert got == ["attn.W"] and "exclude pattern" in why["lm_head.W"]
    assert names(include=["head"])[0] == ["lm_head.W"]  # node names match too
    got, why = names(exclude_op_types=["MatMul"])
    assert got == ["lm_head.W"] and "MatMul" in why["attn.W"]
    with pytest.raises(ValueError, match="no quantizable weights"):
        names(include=["nothing*"])


# ------------------------------------------------------------------------------ Gather


@pytest.mark.parametrize("output", OUTPUTS)
def test_gather_embedding(output):
    V, D = 50, 40
    E, W = weights(V, D), weights(D, 16)
    m = make_model(
        [
            h.make_node("Gather", ["E", "ids"], ["e"]),
            h.make_node("MatMul", ["e", "W"], ["y"]),
        ],
        [fin("ids", [2, 5], T.INT64)],
        [fin("y", [2, 5, 16])],
        [nh.from_array(E, "E"), nh.from_array(W, "W")],
    )
    q, rows = quantize(m, output=output, quantize_gather=True, format="uint4", block_size=16)
    assert sorted(r["name"] for r in rows) == ["E", "W"]
    row = next(r for r in rows if r["name"] == "E")
    assert row["op_types"] == ["Gather"] and row["output"] == "qdq"
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and "E" in n.input[0])
    assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": 16}
    ids = rng.integers(0, V, (2, 5))
    ref = deq(E, "uint4", 16, 1)[ids] @ deq(W, "uint4", 16, 0)
    assert_close(run(q, {"ids": ids})[0], ref)
    # without quantize_gather the table stays float
    q2, rows2 = quantize(m, output=output)
    assert [r["name"] for r in rows2] == ["W"] and "E" in [t.name for t in q2.graph.initializer]


@pytest.mark.parametrize("output", OUTPUTS)
def test_tied_embedding_shares_one_quantized_table(output):
    """Gather(E) and Gemm(transB=1) on the same [V, D] table: blocks along D for both."""
    V, D = 40, 32
    E = weights(V, D)
    m = make_model(
        [
            h.make_node("Gather", ["E", "ids"], ["e"]),
            h.make_node("Gemm", ["e", "E"], ["y"], transB=1),
        ],
        [fin("ids", [3], T.INT64)],
        [fin("y", [3, V])],
        [nh.from_array(E, "E")],
    )
    q, rows = quantize(m, output=output, quantize_gather=True, block_size=16)
    (row,) = rows
    assert row["op_types"] == ["Gather", "Gemm"] and row["consumers"] == 2
    assert row["output"] == ("qdq" if output == "qdq" else "matmulnbits+qdq")
    assert "E" not in [t.name for t in q.graph.initializer]
    ids = np.array([0, 7, 39])
    eq = deq(E, "int4", 16, 1)
    assert_close(run(q, {"ids": ids})[0], eq[ids] @ eq.T)


@pytest.mark.parametrize("output", OUTPUTS)
def test_old_model_with_initializers_as_inputs(output):
    """IR 3 models list every initializer as a graph input too; the quantized one is dropped."""
    W = weights(64, 16)
    m = make_model(
        [h.make_node("MatMul", ["x", "W"], ["y"])],
        [fin("x", [2, 64]), fin("W", [64, 16])],
        [fin("y", [2, 16])],
        [nh.from_array(W, "W")],
        opset=9,
        ir_version=3,
    )
    q, _ = quantize(m, output=output)
    assert [i.name for i in q.graph.input] == ["x"]
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert_close(run(q, {"x": x})[0], x @ deq(W, "int4", 32, 0))


# ------------------------------------------------------------------------------ subgraphs, opset


def if_model(opset):
    """Main graph MatMul on W; an If whose then-branch reads W (outer scope) with Squeeze."""
    K, N = 32, 16
    W, W2 = weights(K, N), weights(K, N)
    axes = nh.from_array(np.array([0], np.int64), "axes")
    sq = (
        h.make_node("Squeeze", ["xb", "axes"], ["xs"])
        if opset >= 13
        else h.make_node("Squeeze", ["xb"], ["xs"], axes=[0])
    )
    then = h.make_graph([h.make_node("MatMul", ["x", "W"], ["t"])], "then", [], [fin("t", [2, N])])
    other = h.make_graph(
        [h.make_node("MatMul", ["x", "W2"], ["e"])],
        "else",
        [],
        [fin("e", [2, N])],
        [nh.from_array(W2, "W2")],
    )
    nodes = [
        h.make_node("MatMul", ["x", "W"], ["a"]),
        h.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other),
        h.make_node("Add", ["a", "b"], ["s"]),
        h.make_node("Unsqueeze", ["s"], ["xb"], axes=[0])
        if opset < 13
        else h.make_node("Unsqueeze", ["s", "axes"], ["xb"]),
        sq,
        h.make_node("Identity", ["xs"], ["y"]),
    ]
    m = make_model(
        nodes,
        [fin("x", [2, K]), fin("c", [], T.BOOL)],
        [fin("y", [2, N])],
        [nh.from_array(W, "W"), *([axes] if opset >= 13 else [])],
        opset=opset,
    )
    return m, W, W2


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("opset", [11, 17])
def test_if_subgraph_left_intact(output, opset):
    m, W, W2 = if_model(opset)
    d = {}
    q, rows = quantize(m, output=output, details=d)
    assert [r["name"] for r in rows] == ["W"] and rows[0]["kept_float"]  # the branch reads W
    x = rng.standard_normal((2, 32)).astype(np.float32)
    wq = deq(W, "int4", 32, 0)
    for c, branch in [(True, x @ W), (False, x @ W2)]:
        assert_close(run(q, {"x": x, "c": np.array(c)})[0], x @ wq + branch)
    if output == "qdq":
        assert qonnx._default_opset(q) == 21
        assert "version_converter" in d["notes"][0]  # If, Squeeze... differ at 21


def test_ensure_opset_only_bumps_when_nothing_changes():
    m, _ = matmul_model(opset=13)
    assert "no operator" in qonnx.ensure_opset(m)
    assert qonnx._default_opset(m) == 21 and m.ir_version == 10
    assert qonnx.ensure_opset(m) is None


# ------------------------------------------------------------------------------ float16


@pytest.mark.parametrize("output", OUTPUTS)
def test_float16_model_gets_float16_scales(output):
    W = weights(64, 32, dtype=np.float16)
    m = make_model(
        [h.make_node("MatMul", ["x", "W"], ["y"])],
        [fin("x", [4, 64], T.FLOAT16)],
        [fin("y", [4, 32], T.FLOAT16)],
        [nh.from_array(W, "W")],
    )
    q, rows = quantize(m, output=output)
    scales = next(t for t in q.graph.initializer if t.name == "W_scales")
    assert scales.data_type == T.FLOAT16
    assert rows[0]["bits_per_weight"] == pytest.approx(4.5)  # 16-bit scales
    x = rng.standard_normal((4, 64)).astype(np.float16)
    qt = quantize_tensor(W, "int4", 32, axis=0)
    wq = qt.codes().reshape(32, 64).T.astype(np.float32) * np.repeat(
        qt.scales.astype(np.float16).astype(np.float32).T, 32, axis=0
    )
    y = run(q, {"x": x})[0].astype(np.float32)
    ref = x.astype(np.float32) @ wq
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2)
    assert cosine(y, x.astype(np.float32) @ W.astype(np.float32)) > 0.99


# ------------------------------------------------------------------------------ files


def test_file_round_trip_leaves_input_alone(tmp_path):
    m, W = matmul_model(K=128, N=64)
    src = tmp_path / "model.onnx"
    onnx.save_model(m, src)
    before = digest(src)
    out = tmp_path / "model.q4.onnx"
    res = qonnx.quantize_onnx_file(src, out, format="int4", block_size=32)
    assert digest(src) == before
    assert res["output_files"] == [out] and res["output_bytes"] < res["input_bytes"] / 3
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
    x = rng.standard_normal((3, 128)).astype(np.float32)
    assert_close(run(out, {"x": x})[0], x @ deq(W, "int4", 32, 0))
    checks = qonnx.check_models(src, out)
    assert checks["y"]["cosine"] > 0.99 and checks["y"]["shape"] == [2, 64]


@pytest.mark.parametrize("output", OUTPUTS)
def test_external_data_in_and_out(tmp_path, output):
    m, W = matmul_model(K=128, N=64)
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    outdir.mkdir()
    src = indir / "model.onnx"
    onnx.save_model(m, src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    hashes = {p.name: digest(p) for p in indir.iterdir()}
    assert set(hashes) == {"model.onnx", "weights.bin"}
    out = outdir / "q.onnx"
    res = qonnx.quantize_onnx_file(src, out, output=output)
    assert {p.name: digest(p) for p in indir.iterdir()} == hashes  # input untouched
    assert res["output_files"] == [outdir / "q.onnx.data", out]
    assert sorted(p.name for p in outdir.iterdir()) == ["q.onnx", "q.onnx.data"]
    stored = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == T.EXTERNAL for t in stored.graph.initializer)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    assert_close(run(out, {"x": x})[0], x @ deq(W, "int4", 32, 0))


def test_big_output_goes_to_external_data(tmp_path, monkeypatch):
    m, W = matmul_model(K=128, N=64)
    src = tmp_path / "model.onnx"
    onnx.save_model(m, src)
    monkeypatch.setattr(qonnx, "EXTERNAL_DATA_LIMIT", 1000)
    res = qonnx.quantize_onnx_file(src, tmp_path / "q.onnx")
    assert [p.name for p in res["output_files"]] == ["q.onnx.data", "q.onnx"]
    x = rng.standard_normal((3, 128)).astype(np.float32)
    assert_close(run(tmp_path / "q.onnx", {"x": x})[0], x @ deq(W, "int4", 32, 0))


def test_file_errors(tmp_path):
    m, _ = matmul_model()
    src = tmp_path / "model.onnx"
    onnx.save_model(m, src)
    with pytest.raises(ValueError, match=r"nosuch\.onnx: no such file"):
        qonnx.quantize_onnx_file(tmp_path / "nosuch.onnx", tmp_path / "o.onnx")
    with pytest.raises(OutputError, match="overwrite the input"):
        qonnx.quantize_onnx_file(src, src)
    with pytest.raises(OutputError, match="does not exist"):
        qonnx.quantize_onnx_file(src, tmp_path / "no" / "dir.onnx")

    data = src.read_bytes()
    for i, bad in enumerate([data[: len(data) // 2], data[:-3], b"\xff" * 64, b""]):
        p = tmp_path / f"bad{i}.onnx"
        p.write_bytes(bad)
        with pytest.raises(ValueError, match=rf"bad{i}\.onnx: not a"):
            qonnx.quantize_onnx_file(p, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()

    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(m, ext / "m.onnx", save_as_external_data=True, location="w.bin")
    (ext / "w.bin").write_bytes((ext / "w.bin").read_bytes()[:100])  # truncated data file
    with pytest.raises(ValueError, match=r"m\.onnx: .*(truncated|external data)"):
        qonnx.quantize_onnx_file(ext / "m.onnx", tmp_path / "o.onnx")
    (ext / "w.bin").unlink()
    with pytest.raises(ValueError, match=r"external data file.* missing"):
        qonnx.quantize_onnx_file(ext / "m.onnx", tmp_path / "o.onnx")


def test_no_quantizable_weights(tmp_path):
    m = make_model(
        [h.make_node("MatMul", ["a", "b"], ["y"])],
        [fin("a", [2, 8]), fin("b", [8, 4])],
        [fin("y", [2, 4])],
        [],
    )
    with pytest.raises(ValueError, match="no quantizable weights"):
        qonnx.quantize_onnx_model(m)
    onnx.save_model(m, tmp_path / "act.onnx")
    with pytest.raises(ValueError, match=r"act\.onnx: no quantizable weights"):
        qonnx.quantize_onnx_file(tmp_path / "act.onnx", tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_bad_arguments():
    m, _ = matmul_model()
    for kw, msg in [
        ({"format": "nf4"}, "format"),
        ({"output": "gguf"}, "output"),
        ({"block_size": 24}, "power of two"),
        ({"block_size": 8}, "power of two"),
        ({"block_size": 0}, "> 0"),
        ({"accuracy_level": 7}, "accuracy_level"),
        ({"accuracy_level": 4, "output": "qdq"}, "matmulnbits.? only"),
    ]:
        with pytest.raises(ValueError, match=msg):
            qonnx.quantize_onnx_model(m, **kw)
    q, _ = quantize(m, output="qdq", block_size=24)  # any block size for DequantizeLinear
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert run(q, {"x": x})[0].shape == (2, 48)


def test_check_models_with_npz_and_token_ids(tmp_path):
    V, D = 30, 32
    E, W = weights(V, D), weights(D, 8)
    m = make_model(
        [h.make_node("Gather", ["E", "ids"], ["e"]), h.make_node("MatMul", ["e", "W"], ["y"])],
        [fin("ids", ["batch", "seq"], T.INT64)],
        [fin("y", ["batch", "seq", 8])],
        [nh.from_array(E, "E"), nh.from_array(W, "W")],
    )
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save_model(m, src)
    qonnx.quantize_onnx_file(src, out, quantize_gather=True, output="qdq", block_size=16)
    checks = qonnx.check_models(src, out, n=3)
    assert checks["y"]["shape"] == [2, 8, 8] and checks["y"]["cosine"] > 0.98
    np.savez(tmp_path / "in.npz", ids=np.array([[1, 2, 29]], np.int64))
    checks = qonnx.check_models(src, out, inputs=tmp_path / "in.npz")
    assert checks["y"]["shape"] == [1, 3, 8]
    np.savez(tmp_path / "wrong.npz", tokens=np.array([[1]], np.int64))
    with pytest.raises(ValueError, match="inputs lack ids"):
        qonnx.check_models(src, out, inputs=tmp_path / "wrong.npz")


# ------------------------------------------------------------------------------ the command


def parse(argv):
    parser = argparse.ArgumentParser(prog="quantize")
    sub = parser.add_subparsers(dest="command", required=True)
    onnx_cmd.add_parser(sub)
    return parser.parse_args(argv)


def test_command_prints_table_sizes_and_check(tmp_path):
    m, _ = matmul_model(K=128, N=64)
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save_model(m, src)
    buf = io.StringIO()
    args = parse(["onnx", str(src), "-o", str(out), "--format", "uint4", "--check"])
    assert args.run(args, out=buf) == 0
    text = buf.getvalue()
    assert "SQNR dB" in text and "bits/weight" in text and "128x64" in text
    assert "size:" in text and ("MiB" in text or "KiB" in text)
    assert "cosine" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("W "))
    assert float(line.split()[-1]) == pytest.approx(4 + 32 / 32 + 4 / 32)
    assert onnx.load(str(out)).graph.node[0].op_type == "MatMulNBits"


def test_command_options_reach_the_model(tmp_path):
    m, _ = matmul_model()
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save_model(m, src)
    args = parse(["onnx", str(src), "-o", str(out), "--output-type", "qdq", "--block-size", "16"])
    assert args.run(args, out=io.StringIO()) == 0
    dq = onnx.load(str(out)).graph.node[0]
    assert dq.op_type == "DequantizeLinear" and dq.attribute[1].i == 16
    args = parse(["onnx", str(src), "-o", str(out), "--exclude", "W"])
    with pytest.raises(ValueError, match="already exists"):  # no silent replacing
        args.run(args, out=io.StringIO())
    args = parse(["onnx", str(src), "-o", str(out), "--exclude", "W", "--force"])
    with pytest.raises(ValueError, match="no quantizable weights"):
        args.run(args, out=io.StringIO())
    args = parse(["onnx", str(src), "-o", str(out), "--inputs", str(tmp_path / "no.npz")])
    out.unlink()
    with pytest.raises(ValueError, match=r"no\.npz: no such file"):
        args.run(args, out=io.StringIO())
    assert not out.exists()  # checked before anything is written
    args = parse(["onnx", str(src), "-o", str(src)])
    with pytest.raises(ValueError, match="overwrite"):
        args.run(args, out=io.StringIO())
    args = parse(["onnx", str(src), "-o", str(out), "--output-type", "qdq"])
    args.accuracy_level = 4
    with pytest.raises(ValueError, match="accuracy-level"):
        args.run(args, out=io.StringIO())


def test_add_parser_does_not_import_onnx():
    import subprocess
    import sys

    code = (
        "import sys, argparse; from quantize.commands import onnx as c; "
        "p = argparse.ArgumentParser(); c.add_parser(p.add_subparsers()); "
        "print('onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
