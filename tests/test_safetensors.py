"""Safetensors checkpoints: quantize_safetensors, load, the compressed-tensors layout, the
report files and the safetensors/inspect/report subcommands.

Checkpoints are built here with safetensors.numpy.save_file (the reference writer), and our
output is read back with safetensors.safe_open (the reference reader) as well as with load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import quantize.io.safetensors as st  # noqa: E402
from quantize import QuantizedTensor, available_formats, quantize_tensor  # noqa: E402
from quantize.commands import inspect as inspect_cmd  # noqa: E402
from quantize.commands import report as report_cmd  # noqa: E402
from quantize.commands import safetensors as safetensors_cmd  # noqa: E402
from quantize.io import compressed_tensors as ct  # noqa: E402
from quantize.io._stfile import SafetensorsFile  # noqa: E402
from quantize.io.atomic import OutputError  # noqa: E402
from quantize.io.safetensors import load, quantize_safetensors  # noqa: E402
from quantize.report import read_report, write_reports  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
BLOCK = {"nvfp4": 16, "mxfp4": 32, "mxfp4_ceil": 32}  # the rest: 64


def block_of(fmt: str) -> int:
    return BLOCK.get(fmt, 64)


def model_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """A small transformer's worth of tensors in float32, float16 and bfloat16."""
    rng = np.random.default_rng(seed)

    def w(*shape, dtype=np.float32):
        return (rng.standard_t(4, size=shape) * 0.05).astype(dtype)

    return {
        "model.embed_tokens.weight": w(40, 64, dtype=BF16),
        "model.layers.0.input_layernorm.weight": np.ones(64, BF16),
        "model.layers.0.self_attn.q_proj.weight": w(64, 64, dtype=BF16),
        "model.layers.0.self_attn.k_proj.weight": w(32, 64, dtype=np.float16),
        "model.layers.0.self_attn.o_proj.weight": w(64, 64),
        "model.layers.0.self_attn.o_proj.bias": w(64),
        "model.layers.0.mlp.up_proj.weight": w(96, 64, dtype=BF16),
        "model.layers.0.mlp.down_proj.weight": w(64, 96, dtype=BF16),  # 96: a padded block of 64
        "model.layers.0.mlp.experts": w(2, 16, 64),  # 3-d, MoE-like
        "model.norm.weight": np.ones(64, np.float32),
        "lm_head.weight": w(40, 64),
        "rotary.step": np.array([7], np.int64),
        "model.mask": np.array([[True, False]]),
    }


QUANTIZED_BY_DEFAULT = {
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.mlp.experts",
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def single(tmp_path: Path, tensors=None) -> Path:
    path = tmp_path / "in" / "model.safetensors"
    path.parent.mkdir()
    save_file(tensors or model_tensors(), path, metadata={"format": "pt"})
    return path


def sharded(tmp_path: Path, with_index: bool = True) -> Path:
    tensors = model_tensors()
    names = list(tensors)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": names[:6],
        "model-00002-of-00002.safetensors": names[6:],
    }
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / fname, metadata={"format": "pt"})
    if with_index:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
            "weight_map": {k: f for f, ks in shards.items() for k in ks},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 40}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not copied")
    return folder


def assert_round_trip(loaded, original, fmt, block, quantized=QUANTIZED_BY_DEFAULT):
    assert list(loaded) == list(original) or set(loaded) == set(original)
    for name, arr in original.items():
        got = loaded[name]
        if name in quantized:
            assert isinstance(got, QuantizedTensor), name
            ref = quantize_tensor(arr, fmt, block, axis=-1)
            out, want = got.dequantize(), ref.dequantize()
            assert out.dtype == want.dtype == arr.dtype, name
            assert out.tobytes() == want.tobytes(), name  # bit for bit
            assert np.array_equal(got.data, ref.data)
            assert got.scales.dtype == ref.scales.dtype
            assert np.array_equal(got.scales, ref.scales)
            if ref.zero_points is None:
                assert got.zero_points is None
            else:
                assert got.zero_points.dtype == ref.zero_points.dtype
                assert np.array_equal(got.zero_points, ref.zero_points)
            assert (got.tensor_scale is None) == (ref.tensor_scale is None)
            if ref.tensor_scale is not None:
                assert np.float32(got.tensor_scale) == ref.tensor_scale
            assert (got.format, got.block_size, got.axis, got.shape) == (
                ref.format,
                ref.block_size,
                ref.axis,
                ref.shape,
            )
        else:
            assert isinstance(got, np.ndarray), name
            assert got.dtype == arr.dtype and got.shape == arr.shape, name
            assert got.tobytes() == arr.tobytes(), name  # byte-identical


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", available_formats())
def test_single_file_round_trip_is_bit_exact(tmp_path, fmt):
    src = single(tmp_path)
    before = sha(src)
    dst = tmp_path / "out.safetensors"
    rows = quantize_safetensors(src, dst, format=fmt, block_size=block_of(fmt))
    assert sha(src) == before
    original = model_tensors()
    loaded = load(dst)
    assert_round_trip(loaded, original, fmt, block_of(fmt))
    by = {r["name"]: r for r in rows}
    assert {n for n, r in by.items() if r["quantized"]} == QUANTIZED_BY_DEFAULT
    for name in QUANTIZED_BY_DEFAULT:  # the bytes in the file are what QuantizedTensor counts
        assert by[name]["bits_per_weight"] == pytest.approx(loaded[name].bits_per_weight)
        assert by[name]["sqnr_db"] > (30 if "8" in fmt else 10)
    # every tensor is aligned to its item size, as the reference writer lays them out
    (n,) = struct.unpack("<Q", dst.read_bytes()[:8])
    assert n % 8 == 0
    with SafetensorsFile(dst) as f:
        for t in f.tensors.values():
            bits = st.DTYPES[t.dtype][1]
            assert (8 + n + t.start) % max(1, bits // 8) == 0
    # the reference reader opens our file; plain tensors are unchanged there too
    with safe_open(dst, framework="numpy") as f:
        meta = f.metadata()
        assert meta["format"] == "pt"
        assert json.loads(meta["quantize"])["layout_version"] == st.LAYOUT_VERSION
        assert np.array_equal(f.get_tensor("lm_head.weight"), original["lm_head.weight"])
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight.qdata")
        assert q.dtype == np.uint8


def test_scales_are_stored_at_the_formats_width(tmp_path):
    src = single(tmp_path)
    for fmt, dtype in [("nvfp4", "F8_E4M3"), ("mxfp4", "U8"), ("nf4", "F32"), ("uint4", "F32")]:
        dst = tmp_path / f"{fmt}.safetensors"
        quantize_safetensors(src, dst, format=fmt)
        with SafetensorsFile(dst) as f:
            assert f.tensors["model.layers.0.mlp.up_proj.weight.scales"].dtype == dtype
            if fmt == "uint4":  # zero points two to a byte, as QuantizedTensor.nbytes counts
                zp = f.tensors["model.layers.0.mlp.up_proj.weight.zero_points"]
                assert zp.dtype == "U8" and zp.shape == (48,)  # 96 rows x 1 block, flat


def test_float64_and_per_channel_and_axis0(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {"a.weight": rng.standard_normal((24, 40)), "b.weight": rng.standard_normal((8, 33))}
    src = single(tmp_path, tensors)
    for block, axis in [(None, -1), (16, 0), ("auto", -1)]:
        dst = tmp_path / f"o{axis}{block}.safetensors"
        quantize_safetensors(src, dst, format="int4_affine", block_size=block, axis=axis)
        loaded = load(dst)
        for name, arr in tensors.items():
            ref = quantize_tensor(arr, "int4_affine", block, axis=axis)
            assert loaded[name].dequantize().tobytes() == ref.dequantize().tobytes()
            assert loaded[name].scales.dtype == np.float64


def test_sharded_checkpoint_round_trip(tmp_path):
    folder = sharded(tmp_path)
    index = folder / "model.safetensors.index.json"
    before = tree(folder)
    out = tmp_path / "out"
    rows = quantize_safetensors(index, out, format="uint4", block_size=32)
    assert tree(folder) == before  # inputs untouched
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    held, total = {}, 0
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(out / shard, framework="numpy") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                held[k] = shard
                total += f.get_tensor(k).nbytes
    assert new_index["weight_map"] == held
    assert new_index["metadata"]["total_size"] == total
    assert {r["file"] for r in rows} == set(held.values())
    original = model_tensors()
    assert_round_trip(load(out), original, "uint4", 32)
    assert_round_trip(load(out / "model.safetensors.index.json"), original, "uint4", 32)
    # the same checkpoint given as its folder
    rows2 = quantize_safetensors(folder, tmp_path / "out2", format="uint4", block_size=32)
    assert [r["name"] for r in rows2] == [r["name"] for r in rows]
    assert tree(tmp_path / "out2") == tree(out)


def test_folder_without_index(tmp_path):
    folder = sharded(tmp_path, with_index=False)
    out = tmp_path / "q"
    quantize_safetensors(folder, out, format="nf4")
    assert not list(out.glob("*.index.json"))
    assert_round_trip(load(out), model_tensors(), "nf4", 64)


def test_single_file_into_a_folder_keeps_its_name(tmp_path):
    src = single(tmp_path)
    (tmp_path / "dest").mkdir()
    quantize_safetensors(src, tmp_path / "dest", format="int8")
    assert (tmp_path / "dest" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- selection


def quantized_names(tmp_path, name="sel", **kw):
    rows = quantize_safetensors(single_once(tmp_path), tmp_path / f"{name}.safetensors", **kw)
    return {r["name"] for r in rows if r["quantized"]}, {r["name"]: r for r in rows}


def single_once(tmp_path):
    path = tmp_path / "in" / "model.safetensors"
    return path if path.exists() else single(tmp_path)


def test_selection_rules(tmp_path):
    names, rows = quantized_names(tmp_path, "a")
    assert names == QUANTIZED_BY_DEFAULT
    assert "embedding" in rows["model.embed_tokens.weight"]["note"]
    assert "head" in rows["lm_head.weight"]["note"]
    assert "not a floating-point" in rows["rotary.step"]["note"]
    names, _ = quantized_names(tmp_path, "b", embeddings=True)
    assert names == QUANTIZED_BY_DEFAULT | {"model.embed_tokens.weight", "lm_head.weight"}
    names, _ = quantized_names(tmp_path, "c", include=["*.self_attn.*"], exclude=["*k_proj*"])
    assert names == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    }
    names, _ = quantized_names(tmp_path, "d", all_tensors=True)
    floats = {n for n, a in model_tensors().items() if a.dtype.kind == "f" or a.dtype == BF16}
    assert names == floats
    names, _ = quantized_names(tmp_path, "e", include=["nothing*"])
    assert names == set()
    assert sha(tmp_path / "e.safetensors") != ""  # a plain copy, still valid
    assert set(load(tmp_path / "e.safetensors")) == set(model_tensors())


def test_name_heuristics():
    assert st.is_norm("model.layers.3.post_attention_layernorm.weight")
    assert st.is_norm("transformer.h.0.ln_1.weight") and st.is_norm("transformer.ln_f.weight")
    assert not st.is_norm("model.layers.0.mlp.down_proj.weight")
    assert st.is_embedding("transformer.wte.weight") and st.is_embedding("shared.weight")
    assert st.is_embedding("bert.embeddings.word_embeddings.weight")
    assert st.is_head("lm_head.weight") and st.is_head("output.weight")
    assert st.is_head("gpt_neox.embed_out.weight") and not st.is_embedding("embed_out.weight")
    assert not st.is_head("bert.encoder.layer.0.output.dense.weight")


# --------------------------------------------------------------------------- atomic writes


def failing_after_first(monkeypatch):
    calls = []
    real = st.quantize_tensor

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(st, "quantize_tensor", flaky)
    return calls


def test_failure_mid_file_leaves_nothing(tmp_path, monkeypatch):
    src = single(tmp_path)
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    calls = failing_after_first(monkeypatch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_safetensors(src, out_dir / "q.safetensors", format="int4")
    assert len(calls) == 2
    assert list(out_dir.iterdir()) == []  # no output, no temporary or scratch file
    assert list(src.parent.iterdir()) == [src]


def test_failure_in_second_shard_leaves_nothing(tmp_path, monkeypatch):
    folder = sharded(tmp_path)
    before = tree(folder)
    real = st.quantize_tensor
    seen = []

    def flaky(arr, *a, **k):
        seen.append(arr.shape)
        if arr.shape == (96, 64):  # up_proj, in the second shard
            raise RuntimeError("interrupted")
        return real(arr, *a, **k)

    monkeypatch.setattr(st, "quantize_tensor", flaky)
    with pytest.raises(RuntimeError):
        quantize_safetensors(folder, tmp_path / "out", format="int4")
    assert len(seen) > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert tree(folder) == before


def test_existing_output_is_replaced_only_when_asked(tmp_path):
    src = single(tmp_path)
    dst = tmp_path / "q.safetensors"
    dst.write_bytes(b"old")
    with pytest.raises(OutputError, match="exists"):
        quantize_safetensors(src, dst)
    assert dst.read_bytes() == b"old"
    quantize_safetensors(src, dst, overwrite=True)
    assert isinstance(load(dst)["model.layers.0.mlp.up_proj.weight"], QuantizedTensor)


def test_refuses_to_overwrite_inputs(tmp_path):
    src = single(tmp_path)
    with pytest.raises(OutputError, match="overwrite the input"):
        quantize_safetensors(src, src, overwrite=True)
    with pytest.raises(OutputError, match="overwrite the input"):
        quantize_safetensors(src, src.parent, overwrite=True)  # folder -> same file name
    folder = sharded(tmp_path)
    with pytest.raises(OutputError):
        quantize_safetensors(folder, folder, overwrite=True)
    with pytest.raises(OutputError, match="delete the input"):
        quantize_safetensors(folder, tmp_path, overwrite=True)  # the folder holding the input
    assert (folder / "model-00001-of-00002.safetensors").is_file()
    with pytest.raises(OutputError, match="does not exist"):
        quantize_safetensors(src, tmp_path / "no" / "such.safetensors")


def test_refuses_already_quantized_input(tmp_path):
    src = single(tmp_path)
    dst = tmp_path / "q.safetensors"
    quantize_safetensors(src, dst)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_safetensors(dst, tmp_path / "qq.safetensors")
    folder = sharded(tmp_path)
    (folder / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "gptq"}})
    )
    with pytest.raises(ValueError, match="gptq"):
        quantize_safetensors(folder, tmp_path / "q2")


def test_bad_arguments(tmp_path):
    src = single(tmp_path)
    with pytest.raises(ValueError, match="layout"):
        quantize_safetensors(src, tmp_path / "a.safetensors", layout="gguf")
    with pytest.raises(ValueError, match="unknown"):
        quantize_safetensors(src, tmp_path / "a.safetensors", format="int3")
    with pytest.raises(ValueError, match="block_size"):
        quantize_safetensors(src, tmp_path / "a.safetensors", block_size=0)
    with pytest.raises(ValueError, match="integer formats"):
        quantize_safetensors(
            src, tmp_path / "a.safetensors", format="nf4", layout="compressed-tensors"
        )
    with pytest.raises(ValueError, match="no such file"):
        quantize_safetensors(tmp_path / "missing.safetensors", tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


# --------------------------------------------------------------------------- corrupt input


def corruptions(good: bytes):
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")

    def with_header(h):
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + good[8 + n :]

    overlap = dict(header)
    overlap[name] = {**header[name], "data_offsets": [0, header[name]["data_offsets"][1] + 8]}
    bad_dtype = dict(header)
    bad_dtype[name] = {**header[name], "dtype": "F7"}
    bad_shape = dict(header)
    bad_shape[name] = {**header[name], "shape": [3, -1]}
    return {
        "truncated": (good[:-10], "truncated"),
        "garbage header": (good[:8] + b"\xff" * n + good[8 + n :], "not valid JSON"),
        "header longer than the file": (
            struct.pack("<Q", len(good) * 2) + good[8:],
            "larger than the file",
        ),
        "tiny file": (b"\x01\x02", "shorter than the 8-byte"),
        "empty file": (b"", "shorter than the 8-byte"),
        "header not an object": (with_header([1, 2]), "JSON object"),
        "overlapping tensors": (with_header(overlap), name),
        "unknown dtype": (with_header(bad_dtype), "unknown dtype"),
        "bad shape": (with_header(bad_shape), "shape"),
        "trailing bytes": (good + b"\0" * 16, "after the last tensor"),
    }


def test_corrupt_inputs_give_one_clear_error(tmp_path):
    good_path = single(tmp_path)
    good = good_path.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    for label, (data, words) in corruptions(good).items():
        bad = tmp_path / "in" / "bad.safetensors"
        bad.write_bytes(data)
        with pytest.raises(ValueError) as exc:
            quantize_safetensors(bad, out / "q.safetensors")
        msg = str(exc.value)
        assert msg.startswith(str(bad)), (label, msg)
        assert words in msg, (label, msg)
        with pytest.raises(ValueError, match=r"bad.safetensors"):
            load(bad)
        assert list(out.iterdir()) == [], label


def test_truncated_shard_names_the_shard(tmp_path):
    folder = sharded(tmp_path)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors: truncated"):
        quantize_safetensors(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_inconsistent_index(tmp_path):
    folder = sharded(tmp_path)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"ghost.weight"):
        quantize_safetensors(index, tmp_path / "out")
    data["weight_map"]["ghost.weight"] = "missing.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing.safetensors does not exist"):
        load(index)
    index.write_text("{not json")
    with pytest.raises(ValueError, match=r"index.json: cannot read"):
        load(folder)


def rewrite(path: Path, edit) -> None:
    """Rewrite one of our files with `edit(tensors, ours)` applied (in place; test only)."""
    with SafetensorsFile(path) as f:
        tensors = {n: np.array(f.array(n)) for n in f.tensors}
        meta = dict(f.metadata)
    ours = json.loads(meta["quantize"])
    edit(tensors, ours)
    meta["quantize"] = json.dumps(ours)
    save_file(tensors, path, metadata=meta)


UP = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda t, m: m["tensors"][UP].update(format="int3"), "format 'int3' is unknown"),
        (lambda t, m: m["tensors"][UP].update(block_size=16), "scales has shape"),
        (lambda t, m: m["tensors"][UP].update(shape=[96, 65]), "scales has shape"),
        (lambda t, m: m["tensors"][UP].update(axis=5), "bad axis"),
        (lambda t, m: m["tensors"][UP].update(scale_dtype="F16"), "metadata says"),
        (lambda t, m: m["tensors"][UP].pop("dtype"), "lacks dtype"),
        (lambda t, m: t.pop(UP + ".scales"), "missing .scales"),
        (lambda t, m: t.pop(UP + ".zero_points"), "missing .zero_points"),
        (lambda t, m: t.__setitem__(UP + ".qdata", t[UP + ".qdata"][:, :-1]), "data must be"),
        (lambda t, m: t.__setitem__(UP + ".scales", -t[UP + ".scales"]), "scales must be > 0"),
        (lambda t, m: m["tensors"].pop(UP), "no metadata entry"),
        (lambda t, m: t.__setitem__(UP, np.zeros(3, np.float32)), "both quantized and plain"),
        (lambda t, m: m.update(layout_version=99), "newer quantize"),
        (lambda t, m: m.update(tensors=[]), "'tensors' object"),
    ],
)
def test_load_validates_our_layout(tmp_path, edit, words):
    src = single(tmp_path)
    dst = tmp_path / "q.safetensors"
    quantize_safetensors(src, dst, format="uint4", block_size=32)
    rewrite(dst, edit)
    with pytest.raises(ValueError) as exc:
        load(dst)
    msg = str(exc.value)
    assert msg.startswith(str(dst)) and words in msg, msg
    if "metadata" not in words and "newer" not in words and "tensors" not in words:
        assert UP in msg


# --------------------------------------------------------------------------- compressed-tensors


def ct_pack_to_int32(value: np.ndarray, num_bits: int, packed_dim: int = 1) -> np.ndarray:
    """compressed-tensors 0.20.0 pack_to_int32 (pack_quantized/helpers.py), line for line in
    NumPy: int8 codes in [-2^(b-1), 2^(b-1)) -> dense int32 words."""
    assert value.dtype == np.int8
    offset = 1 << (num_bits - 1)
    value = value.astype(np.int32) + offset
    if packed_dim == 0:
        value = value.T
    rows, cols = value.shape
    packed_cols = math.ceil(cols * num_bits / 32)
    padded_cols = math.ceil(cols / 32) * 32
    if padded_cols > cols:
        value = np.pad(value, ((0, 0), (0, padded_cols - cols)))
    num_groups = padded_cols // 32
    rows_g = rows * num_groups
    value_g = value.reshape(rows_g, 32)
    output_g = np.zeros((rows_g, num_bits), np.int32)
    elem_i = np.arange(32, dtype=np.int32)
    bit_starts = elem_i * num_bits
    word_idx = bit_starts // 32
    bit_offset = bit_starts % 32
    rows_idx = np.arange(rows_g)[:, None]
    with np.errstate(over="ignore"):
        np.add.at(output_g, (rows_idx, word_idx[None, :]), value_g << bit_offset[None, :])
        ov = bit_offset + num_bits - 32
        ov_mask = ov > 0
        if ov_mask.any():
            ov_vals = value_g[:, ov_mask] >> (num_bits - ov[ov_mask])[None, :]
            np.add.at(output_g, (rows_idx, word_idx[ov_mask][None, :] + 1), ov_vals)
    output = output_g.reshape(rows, num_groups * num_bits)[:, :packed_cols]
    if packed_dim == 0:
        output = output.T
    return np.ascontiguousarray(output)


def ct_unpack_from_int32(value: np.ndarray, num_bits: int, shape, packed_dim: int = 1):
    """compressed-tensors 0.20.0 unpack_from_int32, general path, in NumPy -> int8 codes."""
    if packed_dim == 0:
        value = value.T
    rows, num_words = value.shape
    cols = int(shape[packed_dim])
    if num_words % num_bits:
        value = np.pad(value, ((0, 0), (0, num_bits - num_words % num_bits)))
        num_words = value.shape[1]
    value_g = value.reshape(rows * (num_words // num_bits), num_bits).astype(np.int64)
    elem_i = np.arange(32)
    bit_starts = elem_i * num_bits
    word_idx = bit_starts // 32
    bit_offset = bit_starts % 32
    lo_bits = np.minimum(32 - bit_offset, num_bits)
    output_g = (value_g[:, word_idx] >> bit_offset[None, :]) & ((1 << lo_bits) - 1)[None, :]
    output = output_g.reshape(rows, -1)[:, :cols]
    if packed_dim == 0:
        output = output.T
    return (output - (1 << (num_bits - 1))).astype(np.int8)


def test_pack_int32_by_hand():
    # eight 4-bit codes -1..6 are stored as 7..14: word 0xEDCBA987 (element 0 lowest)
    codes = np.arange(-1, 7, dtype=np.int8)[None, :]
    u = (codes.astype(np.int16) + 8).astype(np.uint8)
    word = ct.pack_int32(u, 4)
    assert word.dtype == np.int32 and word.shape == (1, 1)
    assert word[0, 0] == np.uint32(0xEDCBA987).view(np.int32)
    # three codes: the row's unused nibbles are 0 (not the offset)
    assert ct.pack_int32(np.array([[1, 2, 3]], np.uint8), 4)[0, 0] == 0x321
    # 8-bit: four bytes per word, little-endian
    assert ct.pack_int32(np.array([[1, 2, 3, 4, 5]], np.uint8), 8).tolist() == [[0x04030201, 5]]
    assert ct_pack_to_int32(codes, 4).tolist() == word.tolist()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [1, 7, 8, 31, 32, 33, 100])
def test_pack_int32_matches_compressed_tensors(bits, cols):
    rng = np.random.default_rng(cols)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = rng.integers(lo, hi, size=(5, cols), dtype=np.int8)
    u = (q.astype(np.int16) - lo).astype(np.uint8)
    ours = ct.pack_int32(u, bits)
    assert np.array_equal(ours, ct_pack_to_int32(q, bits))
    assert np.array_equal(ct.unpack_int32(ours, bits, cols), u)
    assert np.array_equal(ct_unpack_from_int32(ours, bits, q.shape), q)
    # along dim 0, as zero points are packed
    along_rows = np.ascontiguousarray(ct.pack_int32(u.T, bits).T)
    assert np.array_equal(along_rows, ct_pack_to_int32(q, bits, packed_dim=0))


@pytest.mark.parametrize("fmt", ["int4", "uint4", "int8", "uint8"])
def test_compressed_tensors_layout(tmp_path, fmt):
    folder = sharded(tmp_path)
    out = tmp_path / "ct"
    rows = quantize_safetensors(folder, out, format=fmt, block_size=32, layout="compressed-tensors")
    original = model_tensors()
    quantized = {r["name"] for r in rows if r["quantized"]}
    # 2-d Linear weights only: the 3-d experts tensor stays, with a reason
    assert quantized == QUANTIZED_BY_DEFAULT - {"model.layers.0.mlp.experts"}
    bits, symmetric = ct.SCHEMES[fmt]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    qc = config["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert qc["quantization_status"] == "compressed"
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["config_groups"]["group_0"]["weights"] == {
        "dynamic": False,
        "group_size": 32,
        "num_bits": bits,
        "strategy": "group",
        "symmetric": symmetric,
        "type": "int",
    }
    assert qc["ignore"] == ["lm_head"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name in quantized:
        base = name[: -len("weight")]
        arr = original[name]
        qt = quantize_tensor(arr, fmt, 32, axis=-1)
        rows_, cols = arr.shape
        q = qt.codes().reshape(rows_, cols)
        signed = q.astype(np.int16) - (0 if symmetric else 1 << (bits - 1))
        shard = out / index["weight_map"][base + "weight_packed"]
        with safe_open(shard, framework="numpy") as f:  # the reference reader
            packed = f.get_tensor(base + "weight_packed")
            scale = f.get_tensor(base + "weight_scale")
            shape = f.get_tensor(base + "weight_shape")
            keys = set(f.keys())
        assert name not in keys
        assert packed.dtype == np.int32
        assert np.array_equal(packed, ct_pack_to_int32(signed.astype(np.int8), bits))
        assert shape.dtype == np.int64 and shape.tolist() == [rows_, cols]
        assert scale.dtype == arr.dtype  # the weight's dtype, as llm-compressor writes
        assert np.array_equal(scale, qt.scales.astype(arr.dtype))
        zp = None
        if symmetric:
            assert base + "weight_zero_point" not in keys
        else:
            with safe_open(shard, framework="numpy") as f:
                zp_packed = f.get_tensor(base + "weight_zero_point")
            zp_signed = (qt.zero_points.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
            assert np.array_equal(zp_packed, ct_pack_to_int32(zp_signed, bits, packed_dim=0))
            zp = ct_unpack_from_int32(zp_packed, bits, zp_signed.shape, packed_dim=0)
        # compressed-tensors' dequantize: (q - zp) * scale, group by group
        q_ct = ct_unpack_from_int32(packed, bits, (rows_, cols)).astype(np.float64)
        zp_full = 0 if zp is None else np.repeat(zp.astype(np.float64), 32, axis=1)[:, :cols]
        s_full = np.repeat(scale.astype(np.float64), 32, axis=1)[:, :cols]
        theirs = (q_ct - zp_full) * s_full
        got = load(out)[name]
        assert isinstance(got, QuantizedTensor) and got.format == fmt
        assert np.array_equal(got.dequantize(np.float64), theirs)
        assert got.dequantize().dtype == arr.dtype
        assert np.array_equal(got.codes(), qt.codes())
    for name, arr in original.items():
        if name not in quantized:
            assert load(out)[name].tobytes() == arr.tobytes()


def test_compressed_tensors_without_our_metadata(tmp_path):
    """Another tool's pack-quantized checkpoint: read with the bits from config.json."""
    folder = sharded(tmp_path)
    out = tmp_path / "ct"
    quantize_safetensors(folder, out, format="uint4", block_size=32, layout="compressed-tensors")
    ours = load(out)
    for shard in out.glob("*.safetensors"):
        with SafetensorsFile(shard) as f:
            tensors = {n: np.array(f.array(n)) for n in f.tensors}
        save_file(tensors, shard, metadata={"format": "pt"})
    theirs = load(out)
    assert set(theirs) == set(ours)
    for name, a in ours.items():
        b = theirs[name]
        if isinstance(a, QuantizedTensor):
            assert b.dequantize().tobytes() == a.dequantize().tobytes()
        else:
            assert b.tobytes() == a.tobytes()


def test_compressed_tensors_per_channel_and_single_file(tmp_path):
    src = single(tmp_path)
    dst = tmp_path / "ct.safetensors"
    rows = quantize_safetensors(
        src, dst, format="int4", block_size=None, layout="compressed-tensors"
    )
    with SafetensorsFile(dst) as f:
        meta = json.loads(f.metadata["quantize"])
        scale = f.array("model.layers.0.mlp.down_proj.weight_scale")
    qc = meta["quantization_config"]  # no config.json for a single file: it is here
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] is None
    assert scale.shape == (64, 1)
    loaded = load(dst)
    for r in rows:
        if r["quantized"]:
            ref = quantize_tensor(model_tensors()[r["name"]], "int4", None)
            assert np.array_equal(loaded[r["name"]].codes(), ref.codes())


def test_compressed_tensors_keeps_what_it_cannot_store(tmp_path):
    src = single(tmp_path)
    rows = quantize_safetensors(
        src, tmp_path / "c.safetensors", format="int4", block_size=128, layout="compressed-tensors"
    )
    notes = {r["name"]: r["note"] for r in rows if not r["quantized"]}
    assert "not a multiple of the group size 128" in notes["model.layers.0.mlp.down_proj.weight"]
    assert "2-d" in notes["model.layers.0.mlp.experts"]


def test_compressed_tensors_tiny_fp16_scales_stay_positive():
    w = np.full((2, 8), 1e-7, np.float16)  # subnormal: amax / 7 rounds to 0 in float16
    qt = quantize_tensor(w, "int4", 8)
    pieces, stored = ct.encode(qt, np.float16)
    assert (pieces["weight_scale"].astype(np.float32) > 0).all()
    assert np.abs(stored.dequantize(np.float64) - w.astype(np.float64)).max() < 1e-6


# --------------------------------------------------------------------------- reports


def report_rows(n=8):
    rows = []
    for i in range(n):
        rows.append(
            {
                "name": f"layer.{i}.weight",
                "quantized": True,
                "format": "int4",
                "dtype": "F32",
                "shape": [64, 64],
                "block_size": 32,
                "bits_per_weight": 5.0,
                "bytes_before": 64 * 64 * 4,
                "bytes_after": 64 * 64 * 5 // 8,
                "seconds": 0.01,
                "rel_rmse": 0.1 + i / 100,
                "sqnr_db": 30.0 - i,
                "max_abs_err": 0.01,
                "outlier_ratio": 4.0,
            }
        )
    rows[0]["sqnr_db"] = float("inf")
    rows.append(
        {
            "name": "norm.weight",
            "quantized": False,
            "format": None,
            "dtype": "F32",
            "shape": [64],
            "bits_per_weight": 32.0,
            "bytes_before": 256,
            "bytes_after": 256,
            "note": "1-d",
        }
    )
    return rows


def test_report_files(tmp_path):
    rows = report_rows()
    json_path, md_path = write_reports(rows, tmp_path / "m.report", {"format": "int4"})
    assert (json_path.name, md_path.name) == ("m.report.json", "m.report.md")

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(json_path.read_text(), parse_constant=no_constants)
    t = data["totals"]
    assert t["worst"] == [f"layer.{i}.weight" for i in (7, 6, 5, 4, 3)]
    assert t["quantized"] == 8 and t["kept"] == 1
    assert t["bytes_before"] == 8 * 64 * 64 * 4 + 256
    assert t["bytes_after"] == 8 * 64 * 64 * 5 // 8 + 256
    assert t["bits_per_weight"] == pytest.approx(5.0)
    assert t["mean_sqnr_db"] == pytest.approx(np.mean([30.0 - i for i in range(1, 8)]))
    md = md_path.read_text()
    worst_section = md.split("## The 5 worst tensors by SQNR")[1].split("##")[0]
    for i in (7, 6, 5, 4, 3):
        assert f"layer.{i}.weight" in worst_section
        assert f"**layer.{i}.weight**" in md
    assert "**layer.1.weight**" not in md and "| norm.weight |" in md
    back = read_report(json_path)
    assert back["tensors"][0]["sqnr_db"] == float("inf")
    assert back["settings"] == {"format": "int4"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_read_report_refuses_other_files(tmp_path):
    bad = tmp_path / "x.json"
    for text in ("{", "[]", json.dumps({"kind": "quantize-report", "report_version": 1})):
        bad.write_text(text)
        with pytest.raises(ValueError, match=r"x.json"):
            read_report(bad)
    with pytest.raises(ValueError, match=r"missing.json"):
        read_report(tmp_path / "missing.json")


# --------------------------------------------------------------------------- subcommands


def parse(argv):
    parser = argparse.ArgumentParser(prog="quantize")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (safetensors_cmd, inspect_cmd, report_cmd):
        command.add_parser(sub)
    return parser.parse_args(argv)


def test_safetensors_command(tmp_path, capsys):
    src = single(tmp_path)
    out = tmp_path / "m.nf4.safetensors"
    argv = ["safetensors", str(src), "-o", str(out), "--format", "nf4", "--block-size", "64"]
    args = parse([*argv, "--exclude", "*.k_proj.*", "--quiet"])
    assert args.run(args) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight" in text and "k_proj" not in text.split("tensors:")[0]
    assert "worst by SQNR" in text and "m.nf4.report.json" in text
    report = read_report(tmp_path / "m.nf4.report.json")
    assert report["settings"]["format"] == "nf4"
    assert (tmp_path / "m.nf4.report.md").is_file()
    assert isinstance(load(out)["model.layers.0.mlp.up_proj.weight"], QuantizedTensor)
    args = parse(argv)  # OUT exists now
    with pytest.raises(OutputError):
        args.run(args)
    args = parse([*argv, "--force", "--block-size", "channel", "--layout", "compressed-tensors"])
    with pytest.raises(ValueError, match="integer formats"):
        args.run(args)


def test_safetensors_command_usage_errors(capsys):
    for argv in (["safetensors", "a", "-o", "b", "--block-size", "0"], ["safetensors", "a"]):
        with pytest.raises(SystemExit) as exc:
            parse(argv)
        assert exc.value.code == 2


def test_inspect_command(tmp_path, capsys):
    src = single(tmp_path)
    args = parse(["inspect", str(src)])
    assert args.run(args) == 0
    plain = capsys.readouterr().out
    assert "lm_head.weight" in plain and "BF16" in plain and "40x64" in plain
    out = tmp_path / "q.safetensors"
    quantize_safetensors(src, out, format="uint4", block_size=32)
    args = parse(["inspect", str(out)])
    assert args.run(args) == 0
    ours = capsys.readouterr().out
    up = next(line for line in ours.splitlines() if "mlp.up_proj.weight " in line)
    assert "uint4" in up and " 32 " in up and "5.125" in up and ".zero_points" in up
    assert "other tensors" in ours and "model.norm.weight" in ours
    args = parse(["inspect", str(out), "--json"])
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out)["files"][0]["quantize"]["layout"] == "quantize"


def test_report_command(tmp_path, capsys):
    json_path, _ = write_reports(report_rows(), tmp_path / "r", {"format": "int4"})
    args = parse(["report", str(json_path)])
    assert args.run(args) == 0
    text = capsys.readouterr().out
    assert "layer.7.weight" in text and "format: int4" in text and "mean SQNR" in text
    args = parse(["report", str(json_path), "--markdown"])
    assert args.run(args) == 0
    assert capsys.readouterr().out.startswith("# Quantization report")


def test_add_parser_imports_nothing_heavy():
    code = (
        "import argparse, sys\n"
        "from quantize.commands import safetensors, inspect, report\n"
        "sub = argparse.ArgumentParser().add_subparsers()\n"
        "for m in (safetensors, inspect, report): m.add_parser(sub)\n"
        "bad = [m for m in ('safetensors', 'quantize.io.safetensors') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_chunked_error_stats_match_error_stats():
    from quantize.report import error_stats, error_stats_chunked

    rng = np.random.default_rng(5)
    w = (rng.standard_t(3, size=(300, 70)) + 0.2).astype(np.float32)
    r = quantize_tensor(w, "int4", 32).dequantize()
    a, b = error_stats(w, r), error_stats_chunked(w, r, chunk=1000)
    for key in a.keys() - {"error_hist"}:
        assert b[key] == pytest.approx(a[key], rel=1e-12)
    assert a["error_hist"] == b["error_hist"]  # same edges, same per-element errors
    assert sum(b["error_hist"]["counts"]) == w.size
    assert error_stats_chunked(np.zeros((50, 50)), np.zeros((50, 50)), chunk=7)["sqnr_db"] == np.inf


def test_tensors_numpy_cannot_hold_pass_through(tmp_path):
    from quantize.io._stfile import SafetensorsWriter

    src = tmp_path / "m.safetensors"
    packed_fp4 = np.arange(8, dtype=np.uint8)
    e4m3 = np.linspace(-2, 2, 64).astype(ml_dtypes.float8_e4m3fn).reshape(8, 8)
    with SafetensorsWriter(src) as w:
        w.add_raw("fp4.weight", "F4", (4, 4), packed_fp4)
        w.add("fp8.weight", e4m3)
        w.add("x.weight", np.ones((8, 64), np.float32))
    dst = tmp_path / "q.safetensors"
    rows = quantize_safetensors(src, dst)
    assert [r["name"] for r in rows if r["quantized"]] == ["x.weight"]
    with SafetensorsFile(dst) as f:
        assert f.tensors["fp4.weight"].dtype == "F4"
        assert f.raw("fp4.weight").tobytes() == packed_fp4.tobytes()
        assert f.array("fp8.weight").tobytes() == e4m3.tobytes()
    with pytest.raises(ValueError, match=r"fp4\.weight"):
        load(dst)
    rows = quantize_safetensors(src, tmp_path / "all.safetensors", all_tensors=True)
    assert {r["name"] for r in rows if r["quantized"]} == {"fp8.weight", "x.weight"}


def test_through_the_cli_entry_point(tmp_path, monkeypatch, capsys):
    from quantize import cli

    monkeypatch.setattr(cli, "COMMANDS", [safetensors_cmd, inspect_cmd, report_cmd])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert cli.main(["safetensors", str(bad), "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"quantize: error: {bad}: header length 16") and "\n" not in err
    src = single(tmp_path)
    out = tmp_path / "o.safetensors"
    assert cli.main(["safetensors", str(src), "-o", str(out), "--quiet"]) == 0
    assert cli.main(["inspect", str(out)]) == 0
    assert cli.main(["report", str(tmp_path / "o.report.json")]) == 0
    with pytest.raises(SystemExit):
        cli.main(["safetensors", "--help"])
    assert "quantize safetensors model.safetensors -o" in capsys.readouterr().out


def test_outputs_get_ordinary_permissions(tmp_path):
    """mkstemp/mkdtemp make owner-only files; what we write must be readable as any file is."""
    import os
    import stat

    from quantize.io.atomic import atomic_dir, atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.bin") as p:
            p.write_bytes(b"x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "inner").write_bytes(b"y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    os.chmod(tmp_path / "f.bin", 0o640)
    with atomic_path(tmp_path / "f.bin") as p:  # a replaced file keeps its mode
        p.write_bytes(b"z")
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o640
