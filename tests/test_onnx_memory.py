"""Quantizing an external-data ONNX model holds one weight at a time, not the quantized model.

New initializers are moved to a spill file beside the output as each weight is quantized
(io/onnx.py `_Spill`), then copied into the output's data file: memory does not grow with the
number of weights, the output is byte for byte what the in-memory path writes, and a failure
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import onnx
import pytest

from _onnx_chain import chain_model
from quantize.io.onnx import quantize_onnx_file, quantize_onnx_model, save_model

DIM = 256


def _model(folder: Path, layers: int) -> Path:
    return chain_model(folder, layers, DIM)


def _peak(src: Path, dst: Path, **options) -> tuple[int, int]:
    """(tracemalloc peak bytes while quantizing `src`, output bytes)."""
    tracemalloc.start()
    try:
        res = quantize_onnx_file(src, dst, overwrite=True, **options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, res["output_bytes"]


@pytest.mark.parametrize("output", ["matmulnbits", "qdq"])
def test_memory_does_not_grow_with_the_model(tmp_path, output):
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    src_small, src_big = _model(small, 8), _model(big, 64)
    quantize_onnx_file(src_small, small / "warm.onnx", output=output)  # kernels compiled
    peak_small, _ = _peak(src_small, small / "q.onnx", output=output)
    peak_big, out_big = _peak(src_big, big / "q.onnx", output=output)
    # holding the quantized initializers until the end (the old way) costs the whole output,
    # 2.5 MiB here on top of the 8-weight run; one weight at a time, ~0.3 MiB of protos/rows
    assert peak_big - peak_small < 0.4 * out_big, (peak_small, peak_big, out_big)


def _digests(files) -> list[str]:
    return [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]


@pytest.mark.parametrize(
    "options",
    [
        {"output": "matmulnbits"},
        {"output": "matmulnbits", "format": "uint4"},
        {"output": "qdq", "format": "uint4"},
        {"output": "qdq", "format": "int4_ort"},
        {"output": "matmulnbits", "target_bits": 6.0},
    ],
)
def test_spilled_output_is_byte_identical(tmp_path, options):
    src = _model(tmp_path, 6)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    res = quantize_onnx_file(src, tmp_path / "a" / "q.onnx", **options)
    model, _ = quantize_onnx_model(onnx.load(str(src)), **options)  # all in memory
    written = save_model(model, tmp_path / "b" / "q.onnx", external_data=True)
    assert [f.name for f in res["output_files"]] == [f.name for f in written]
    assert _digests(res["output_files"]) == _digests(written)


def test_interrupt_leaves_no_output_and_no_spill_file(tmp_path):
    src = _model(tmp_path, 6)
    before = sorted(p.name for p in tmp_path.iterdir())
    seen = []

    def progress(name: str, total: int) -> None:
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_onnx_file(src, tmp_path / "q.onnx", progress=progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
