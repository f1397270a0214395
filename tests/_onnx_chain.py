"""A chain of MatMuls whose float32 weights sit in one external data file (memory tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def chain_model(
    folder: Path,
    layers: int,
    dim: int,
    spread: bool = False,
    weight: Callable[[int], np.ndarray] | None = None,
) -> Path:
    """`layers` MatMuls of float32 (dim, dim) weights, seeded by `layers`; `spread`: layer i's
    weights scaled by 1 + i % 3 (so the layers differ in sensitivity); `weight(i)`, if given,
    makes layer i's weights instead. Written one weight at a time (generating holds one)."""
    rng = np.random.default_rng(layers)
    inits, nodes, offset = [], [], 0
    with open(folder / "m.onnx.data", "wb") as f:
        for i in range(layers):
            if weight is not None:
                w = np.ascontiguousarray(weight(i), np.float32)
            elif spread:
                w = (rng.standard_normal((dim, dim)) * (1 + i % 3)).astype(np.float32)
            else:
                w = rng.standard_normal((dim, dim), np.float32)
            f.write(w.tobytes())
            t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", "m.onnx.data"), ("offset", offset), ("length", w.nbytes)):
                t.external_data.add(key=k, value=str(v))
            offset += w.nbytes
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"h{i + 1}"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["b", dim])],
        [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, ["b", dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(folder / "m.onnx"))
    return folder / "m.onnx"
