"""Mixed precision (target_bits) keeps its candidates on disk, not in memory.

Every weight is quantized each way the budget may pick (4-bit at two block sizes, 8-bit) before
`plan_mixed` chooses; those arrays wait in a temporary folder beside the output (io/onnx.py
`_Stashed`) with only their written bits and errors in memory, the chosen ones are read back and
the folder is deleted on success, failure and KeyboardInterrupt. Outputs are byte for byte those
of holding the candidates in memory.
"""

from __future__ import annotations

import hashlib
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import quantize.io.onnx as qonnx
from _onnx_chain import chain_model
from quantize.io.onnx import quantize_onnx_file, quantize_onnx_model

DIM = 256


def _external_model(folder: Path, layers: int) -> Path:
    return chain_model(folder, layers, DIM, spread=True)


def _small_model(dtype=np.float32) -> onnx.ModelProto:
    """MatMuls of different widths and scales plus a Gemm with transB, weights inline."""
    rng = np.random.default_rng(0)
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    dims = [64, 96, 128, 64]
    inits, nodes = [], []
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) * (1 + 3 * (i == 1))).astype(dtype)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"h{i + 1}"]))
    inits.append(numpy_helper.from_array(rng.standard_normal((32, 64)).astype(dtype), "G"))
    nodes.append(helper.make_node("Gemm", ["h3", "G"], ["y"], transB=1))
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("h0", tp, ["b", 64])],
        [helper.make_tensor_value_info("y", tp, ["b", 32])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _digest(model: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    for t in model.graph.initializer:
        h.update(t.SerializeToString())
    for n in model.graph.node:
        h.update(n.SerializeToString())
    return h.hexdigest()


def _peak(src: Path, dst: Path, **options) -> int:
    """tracemalloc's peak bytes while quantizing `src` into `dst`."""
    tracemalloc.start()
    try:
        quantize_onnx_file(src, dst, overwrite=True, **options)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_candidates(tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    src_small, src_big = _external_model(small, 8), _external_model(big, 48)
    opts = {"target_bits": 6.5}
    quantize_onnx_file(src_small, small / "warm.onnx", **opts)  # kernels compiled
    peak_small = _peak(src_small, small / "q.onnx", **opts)
    peak_big = _peak(src_big, big / "q.onnx", **opts)
    # candidates per weight: int4/b32, int4/b16 and int8/b32 codes + float32 scales, ~2.5 bytes
    # a weight; held in memory (the old way) the 40 extra weights cost ~6.6 MiB
    held = 40 * DIM * DIM * (0.625 + 0.75 + 1.125)
    assert peak_big - peak_small < 0.25 * held, (peak_small, peak_big, held)
    assert not list(big.glob(".quantize-mixed.*")), "scratch folder left behind"


@pytest.mark.parametrize(
    "dtype, options",
    [
        (np.float32, {"target_bits": 6.5}),
        (np.float32, {"format": "uint4", "block_size": 16, "target_bits": 8.0}),
        (np.float16, {"output": "qdq", "format": "uint4", "target_bits": 6.0}),
        (np.float32, {"output": "qdq", "format": "int4_ort", "target_bits": 6.5}),
        (np.float32, {"method": "awq", "target_bits": 6.8}),
        (np.float32, {"method": "gptq", "format": "uint4", "target_bits": 6.5}),
    ],
)
def test_same_bytes_as_holding_candidates_in_memory(monkeypatch, tmp_path, dtype, options):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # in-memory calls use the system's
    spilled, rows = quantize_onnx_model(_small_model(dtype), **options)
    assert not list(tmp_path.iterdir()), "scratch folder left behind"
    monkeypatch.setattr(qonnx, "_stash_choices", lambda folder, i, choices: choices)
    held, rows_held = quantize_onnx_model(_small_model(dtype), **options)
    assert _digest(spilled) == _digest(held)
    assert rows == rows_held
    assert len({r["choice"] for r in rows}) > 1  # the budget really mixes


def test_scratch_is_beside_the_output_and_goes_on_success(tmp_path):
    src = _external_model(tmp_path, 4)
    (tmp_path / "out").mkdir()
    seen: list[tuple[Path, list[str]]] = []

    def progress(name: str, total: int) -> None:
        (folder,) = (tmp_path / "out").glob(".quantize-mixed.*.tmp")
        seen.append((folder, sorted(p.name for p in folder.iterdir())))

    quantize_onnx_file(src, tmp_path / "out" / "q.onnx", target_bits=6.5, progress=progress)
    assert len(seen) == 4 and len({folder for folder, _ in seen}) == 1
    assert [names for _, names in seen][-1] == ["0.bin", "1.bin", "2.bin", "3.bin"]
    assert not seen[0][0].exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q.onnx", "q.onnx.data"]


def test_failure_and_interrupt_remove_the_scratch(tmp_path):
    src = _external_model(tmp_path, 4)
    before = sorted(p.name for p in tmp_path.iterdir())
    # below the cheapest plan: fails in plan_mixed, after every candidate was written
    with pytest.raises(ValueError, match="target_bits"):
        quantize_onnx_file(src, tmp_path / "q.onnx", target_bits=4.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    def progress(name: str, total: int) -> None:
        if name == "W2":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_onnx_file(src, tmp_path / "q.onnx", target_bits=6.5, progress=progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
