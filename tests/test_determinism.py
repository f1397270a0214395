"""The same input and options give byte-identical output files: across runs, across kernel
thread counts (QUANTIZE_NUM_THREADS 1 and 2, tensors big enough for the kernels) and across
`jobs` (shards converted in worker processes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from quantize import kernels
from quantize.io._stfile import SafetensorsWriter
from quantize.io.safetensors import quantize_safetensors

ROWS, COLS = 512, 1024  # 2^19 elements: past kernels.MIN_KERNEL_ELEMENTS


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    assert ROWS * COLS >= kernels.MIN_KERNEL_ELEMENTS
    d = tmp_path_factory.mktemp("det") / "ckpt"
    d.mkdir()
    rng = np.random.default_rng(7)
    weight_map = {}
    for s, dtype in enumerate([np.float16, np.float32]):
        fname = f"model-{s + 1:05d}-of-00002.safetensors"
        with SafetensorsWriter(d / fname, {"format": "pt"}) as w:
            for i in range(2):
                name = f"layers.{s}.proj{i}.weight"
                w.add(name, (rng.standard_t(4, (ROWS, COLS)) * 0.02).astype(dtype))
                weight_map[name] = fname
            w.add(f"layers.{s}.norm.weight", np.ones(COLS, dtype))
            weight_map[f"layers.{s}.norm.weight"] = fname
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


@pytest.mark.parametrize("fmt", ["int4", "uint4", "nf4", "mxfp4", "nvfp4"])
def test_safetensors_output_is_byte_identical(ckpt, tmp_path, monkeypatch, fmt):
    digests = []
    for run, threads in enumerate(["1", "2", "2"]):
        monkeypatch.setenv(kernels.ENV_THREADS, threads)
        out = tmp_path / f"out{run}"
        quantize_safetensors(ckpt, out, format=fmt)
        digests.append(_digest(out))
    assert digests[0] == digests[1] == digests[2]


def test_jobs_do_not_change_the_output(ckpt, tmp_path):
    quantize_safetensors(ckpt, tmp_path / "one", format="uint4")
    rows = quantize_safetensors(ckpt, tmp_path / "two", format="uint4", jobs=2)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    assert [r["name"] for r in rows] == [
        "layers.0.proj0.weight",
        "layers.0.proj1.weight",
        "layers.0.norm.weight",
        "layers.1.proj0.weight",
        "layers.1.proj1.weight",
        "layers.1.norm.weight",
    ]  # file order, whichever shard finished first


onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    w = numpy_helper.from_array((rng.standard_normal((COLS, ROWS)) * 0.02).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, COLS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, ROWS])],
        [w],
    )
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


@pytest.mark.parametrize(("fmt", "output"), [("int4", "matmulnbits"), ("uint4", "qdq")])
def test_onnx_output_is_byte_identical(onnx_model, tmp_path, monkeypatch, fmt, output):
    from quantize.io.onnx import quantize_onnx_file

    digests = []
    for run, threads in enumerate(["1", "2", "2"]):
        monkeypatch.setenv(kernels.ENV_THREADS, threads)
        out = tmp_path / f"m{run}.onnx"
        quantize_onnx_file(onnx_model, out, format=fmt, block_size=32, output=output)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1] == digests[2]
