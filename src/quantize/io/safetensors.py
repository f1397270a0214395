"""Safetensors checkpoints in, quantized safetensors checkpoints out, and back.

`quantize_safetensors(src, dst, ...)` quantizes a .safetensors file, a folder of them or a
sharded checkpoint (its `*.safetensors.index.json`) tensor by tensor from a memory map, so
memory stays near the largest tensor; `load(path)` reads the result back. The layout is
documented in docs/safetensors-layout.md. The files are read and written by `._stfile`, not by
the `safetensors` package (which is not needed at run time).

Which tensors are quantized by default: floating-point weights (F16, BF16, F32, F64) with two
or more dimensions, except, by name (case-insensitive, per dot-separated part of the name):
  - norms: a part containing "norm" (layernorm, rmsnorm, ...) or GPT-2's ln_1/ln_2/ln_f;
  - input embeddings: a part containing "embed" (embed_tokens, word_embeddings, wte, wpe,
    tok_embeddings, position_embeddings), or the parts wte, wpe, shared;
  - output heads: lm_head, embed_out, and a top-level output.weight (they are often tied to
    the embeddings and are the most sensitive layer).
`embeddings=True` quantizes embeddings and heads too (heads only for compressed-tensors, whose
loaders quantize Linear layers, not Embedding ones); `all_tensors=True` drops every rule but
"floating point and not empty" (FP8 weights included). `include` patterns (fnmatch globs on
the full name) then keep only the tensors that match one; `exclude` patterns remove those that
match one. Everything else is copied byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from .._checks import is_float_dtype
from ..core import quantize_tensor, resolve_block
from ..formats import get_format
from ..formats.nf4 import DQ_BLOCK, DoubleQuant
from ..packing import pack_nibbles, unpack_nibbles
from ..report import error_stats_chunked
from ..tensor import QuantizedTensor
from . import compressed_tensors as ct
from ._stfile import DTYPES, WEIGHT_FLOATS, SafetensorsFile, SafetensorsWriter, dtype_code
from .atomic import OutputError, atomic_dir, atomic_path, check_output
from .awq_fold import AWQ_METHODS, AwqFold, build_fold, check_model

#: bump when the layout changes in a way older readers would misread
LAYOUT_VERSION = 1
#: the `__metadata__` key holding our JSON
META_KEY = "quantize"
LAYOUTS = ("quantize", "compressed-tensors")
PIECES = (".qdata", ".scales", ".zero_points", ".scales_absmax")

#: 8-bit scale encodings by format: E4M3 values as F8_E4M3, powers of two as E8M0 bytes (U8)
_SCALE_STORAGE = {"nvfp4": "e4m3", "mxfp4": "e8m0", "mxfp4_ceil": "e8m0"}
#: files of a model folder that are weights (never copied into the output folder)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

_LN = re.compile(r"ln(_?[a-z0-9]{1,4})?")


def _parts(name: str) -> list[str]:
    return name.lower().split(".")


def is_norm(name: str) -> bool:
    return any("norm" in p or _LN.fullmatch(p) for p in _parts(name))


def is_head(name: str) -> bool:
    parts = _parts(name)
    return "lm_head" in parts or "embed_out" in parts or parts == ["output", "weight"]


def is_embedding(name: str) -> bool:
    """An input embedding by name (not a head: see `is_head`)."""
    parts = _parts(name)
    if is_head(name):
        return False
    return any("embed" in p for p in parts) or any(p in ("wte", "wpe", "shared") for p in parts)


# --------------------------------------------------------------------------- the input


@dataclass
class Source:
    """A resolved input: its safetensors files, and the index and folder when there are."""

    path: Path
    files: list[Path]
    index: Path | None = None
    index_data: dict | None = None
    folder: Path | None = None  # a model folder: its other files are copied along

    @property
    def single(self) -> bool:
        return self.folder is None and self.index is None


def resolve(path: str | os.PathLike) -> Source:
    """IN as a Source: a .safetensors file, a folder of them, or a `*.safetensors.index.json`."""
    p = Path(path)
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise ValueError(f"{p}: more than one index ({', '.join(i.name for i in indexes)})")
        if indexes:
            src = _from_index(indexes[0])
            src.path = p
            return src
        files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if not files:
            raise ValueError(f"{p}: the folder holds no .safetensors file")
        return Source(p, files, folder=p)
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _from_index(p)
        return Source(p, [p])
    raise ValueError(f"{p}: no such file or folder")


def _from_index(index: Path) -> Source:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{index}: cannot read the index: {exc}") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise ValueError(f"{index}: the index has no weight_map")
    if not isinstance(data.get("metadata", {}), (dict, type(None))):
        raise ValueError(f"{index}: the index's metadata is not an object")
    names = []
    for tensor, fname in wmap.items():
        if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
            raise ValueError(f"{index}: tensor {tensor!r} maps to a bad file name {fname!r}")
        if fname not in names:
            names.append(fname)
    files = [index.parent / n for n in names]
    for f in files:
        if not f.is_file():
            raise ValueError(f"{index}: shard {f.name} does not exist")
    return Source(index, files, index=index, index_data=data, folder=index.parent)


class _Opened(contextlib.ExitStack):
    """Every file of a Source opened and validated; `where[name]` is the file of a tensor."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}

    def __enter__(self) -> _Opened:
        super().__enter__()
        try:
            for path in self.source.files:
                f = self.enter_context(SafetensorsFile(path))
                self.files.append(f)
                for name in f.tensors:
                    if name in self.where:
                        raise ValueError(
                            f"{path}: tensor {name!r} is also in {self.where[name].path}"
                        )
                    self.where[name] = f
            if self.source.index is not None:
                self._check_index()
        except BaseException:
            self.close()
            raise
        return self

    def _check_index(self) -> None:
        wmap = self.source.index_data["weight_map"]
        for name, f in self.where.items():
            if wmap.get(name) != f.path.name:
                raise ValueError(
                    f"{self.source.index}: tensor {name!r} is in {f.path.name} but the index "
                    f"says {wmap.get(name)!r}"
                )
        for name, fname in wmap.items():
            if name not in self.where:
                raise ValueError(
                    f"{self.source.index}: tensor {name!r} is listed (in {fname}) but no shard "
                    "holds it"
                )


def _our_metadata(f: SafetensorsFile) -> dict | None:
    """Our JSON from a file's `__metadata__`, validated at the top level; None if it has none."""
    text = f.metadata.get(META_KEY)
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:  # also 4300-digit numbers and deep nesting
        what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ValueError(
            f"{f.path}: __metadata__[{META_KEY!r}] is not valid JSON: {what}"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict):
        raise ValueError(f"{f.path}: __metadata__[{META_KEY!r}] has no 'tensors' object")
    version = meta.get("layout_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{f.path}: bad layout_version {version!r}")
    if version > LAYOUT_VERSION:
        raise ValueError(
            f"{f.path}: layout version {version} was written by a newer quantize "
            f"({meta.get('version')}); this one reads up to {LAYOUT_VERSION}"
        )
    if meta.get("layout") not in LAYOUTS:
        raise ValueError(f"{f.path}: unknown layout {meta.get('layout')!r}")
    return meta


def _model_config(source: Source) -> tuple[Path | None, dict | None]:
    if source.folder is None:
        return None, None
    path = source.folder / "config.json"
    if not path.is_file():
        return None, None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the model config: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the model config is not a JSON object")
    return path, config


# --------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """Which tensors to quantize; see the module docstring for the rules."""

    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    embeddings: bool = False
    all_tensors: bool = False
    layout: str = "quantize"

    def why_not(self, name: str, dtype: str, shape: tuple[int, ...]) -> str | None:
        """None if the tensor is to be quantized, else the reason it is kept as it is."""
        np_dt = DTYPES[dtype][0]
        if np_dt is None or not is_float_dtype(np_dt):
            return f"{dtype} is not a floating-point weight"
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return "empty"
        if not self.all_tensors:
            if dtype not in WEIGHT_FLOATS:
                return f"{dtype} weights are quantized only with all_tensors (--all)"
            if len(shape) < 2:
                return f"{len(shape)}-d (biases, norms, scalars stay)"
            if is_norm(name):
                return "a norm (by name)"
            if is_head(name) and not self.embeddings:
                return "the output head (by name; --embeddings quantizes it)"
            if is_embedding(name):
                if not self.embeddings:
                    return "an embedding (by name; --embeddings quantizes it)"
                if self.layout == "compressed-tensors":
                    return "an embedding: compressed-tensors quantizes Linear layers only"
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return "not matched by include"
        if self.exclude and any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return "matched by exclude"
        return None


# --------------------------------------------------------------------------- our layout


def _encode(qt: QuantizedTensor) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors (by suffix) and the metadata entry that store `qt` in our layout."""
    fmt = qt.fmt
    entry: dict[str, object] = {
        "format": qt.format,
        "block_size": int(qt.block_size),
        "axis": qt.axis,
        "shape": [int(d) for d in qt.shape],
        "dtype": dtype_code(qt.dtype),
        "scale_dtype": dtype_code(qt.scales.dtype),
        "tensor_scale": None if qt.tensor_scale is None else float(qt.tensor_scale),
    }
    pieces = {".qdata": qt.data}
    storage, scales = "float", qt.scales
    kind = _SCALE_STORAGE.get(fmt.name) if fmt.scale_bits == 8 else None
    if kind == "e4m3":
        s8 = qt.scales.astype(ml_dtypes.float8_e4m3fn)
        if np.array_equal(s8.astype(qt.scales.dtype), qt.scales):
            storage, scales = "e4m3", s8
    elif kind == "e8m0":
        m, e = np.frexp(qt.scales.astype(np.float64))
        e = e.astype(np.int64) - 1 + 127
        if (m == 0.5).all() and (e >= 0).all() and (e <= 254).all():
            storage, scales = "e8m0", e.astype(np.uint8)
    dq = qt.double_quant
    if dq is not None:  # nf4_dq: bitsandbytes' 8-bit codes, float32 absmax per 256, offset
        storage, scales = "dq8", dq.codes
        pieces[".scales_absmax"] = dq.absmax
        entry["scale_offset"] = float(dq.offset)  # float32/64: exact as a JSON number
    entry["scale_storage"] = storage
    pieces[".scales"] = scales
    zp = qt.zero_points
    if zp is None:
        entry["zero_point_storage"] = None
    elif fmt.zero_point == "int" and fmt.bits == 4:
        entry["zero_point_storage"] = "packed4"  # flat, two per byte, as QuantizedTensor counts
        pieces[".zero_points"] = pack_nibbles(zp.reshape(-1))
    elif fmt.zero_point == "int":
        entry["zero_point_storage"] = "uint8"
        pieces[".zero_points"] = zp.astype(np.uint8)
    else:
        entry["zero_point_storage"] = "float"
        entry["zero_point_dtype"] = dtype_code(zp.dtype)
        pieces[".zero_points"] = zp
    return pieces, entry


def _decode(entry: dict, piece: Callable[[str], np.ndarray | None]) -> QuantizedTensor:
    """A QuantizedTensor from our metadata entry and its pieces (`piece(suffix)`; None: absent).

    Raises ValueError/TypeError describing the first inconsistency; the caller names the file.
    """
    if not isinstance(entry, dict):
        raise ValueError("its metadata entry is not an object")
    need = ("format", "block_size", "axis", "shape", "dtype", "scale_dtype", "scale_storage")
    missing = [k for k in need if k not in entry]
    if missing:
        raise ValueError(f"its metadata lacks {', '.join(missing)}")
    fmt = get_format(entry["format"])
    shape, bs, axis = entry["shape"], entry["block_size"], entry["axis"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"bad shape {shape!r}")
    if type(bs) is not int or bs <= 0:
        raise ValueError(f"bad block_size {bs!r}")
    if axis is not None and (type(axis) is not int or not 0 <= axis < max(len(shape), 1)):
        raise ValueError(f"bad axis {axis!r} for shape {shape}")
    dtype = _np_dtype(entry["dtype"], "dtype")
    if not is_float_dtype(dtype):
        raise ValueError(f"dtype {entry['dtype']} is not a floating-point type")
    scale_dtype = _np_dtype(entry["scale_dtype"], "scale_dtype")
    data = piece(".qdata")
    scales = piece(".scales")
    zp = piece(".zero_points")
    if data is None or scales is None:
        raise ValueError(f"missing {'.qdata' if data is None else '.scales'}")
    if data.dtype != np.uint8:
        raise ValueError(f".qdata must be U8, got {data.dtype}")
    # keeps absurd sizes away from NumPy's int64 arithmetic (OverflowError, or a silent wrap);
    # QuantizedTensor then checks that every piece fits the shape
    if math.prod(max(d, 1) for d in shape) >= 2**62:
        raise ValueError(f"shape {shape} is too large for any file")
    storage = entry["scale_storage"]
    dq = None
    if (storage == "dq8") != (piece(".scales_absmax") is not None):
        raise ValueError(
            "has .scales_absmax but its scales are not dq8"
            if storage != "dq8"
            else "missing .scales_absmax (dq8 scales)"
        )
    if storage == "dq8":
        off = entry.get("scale_offset")
        if isinstance(off, bool) or not isinstance(off, (int, float)):
            raise ValueError(f"bad scale_offset {off!r}")
        if scales.dtype != np.uint8:
            raise ValueError(f".scales must be U8 (dq8 codes), got {scales.dtype}")
        absmax = piece(".scales_absmax")
        if absmax.dtype != scale_dtype:
            raise ValueError(f".scales_absmax is {absmax.dtype}, the metadata says {scale_dtype}")
        dq = DoubleQuant(np.array(scales), np.array(absmax), scale_dtype.type(off))
        if dq.codes.ndim == 0 or dq.absmax.ndim != 1:
            raise ValueError("dq8 .scales and .scales_absmax have the wrong number of dimensions")
        groups = -(-dq.codes.size // DQ_BLOCK)
        if dq.absmax.shape != (groups,):
            raise ValueError(f".scales_absmax must have shape ({groups},), got {dq.absmax.shape}")
        scales = dq.values()
    elif storage == "float":
        if scales.dtype != scale_dtype:
            raise ValueError(f".scales is {scales.dtype}, the metadata says {scale_dtype}")
        scales = np.array(scales)
    elif storage == "e4m3":
        if scales.dtype != np.dtype(ml_dtypes.float8_e4m3fn):
            raise ValueError(f".scales must be F8_E4M3, got {scales.dtype}")
        scales = scales.astype(scale_dtype)
    elif storage == "e8m0":
        if scales.dtype != np.uint8 or (scales == 255).any():
            raise ValueError(".scales must be E8M0 bytes (U8, 0..254)")
        scales = np.ldexp(np.ones(scales.shape, scale_dtype), scales.astype(np.int32) - 127)
    else:
        raise ValueError(f"unknown scale_storage {storage!r}")
    zp_storage = entry.get("zero_point_storage")
    if (zp is None) != (zp_storage is None):
        raise ValueError(
            "has .zero_points but the metadata says none"
            if zp_storage is None
            else f"missing .zero_points ({zp_storage})"
        )
    if zp_storage == "packed4":
        want = (-(-scales.size // 2),)
        if zp.dtype != np.uint8 or zp.shape != want:
            raise ValueError(f".zero_points must be U8 {want}, got {zp.dtype} {zp.shape}")
        zp = unpack_nibbles(zp, scales.size, signed=False).view(np.uint8).reshape(scales.shape)
    elif zp_storage == "uint8":
        if zp.dtype != np.uint8:
            raise ValueError(f".zero_points must be U8, got {zp.dtype}")
        zp = np.array(zp)
    elif zp_storage == "float":
        want = _np_dtype(entry.get("zero_point_dtype"), "zero_point_dtype")
        if zp.dtype != want:
            raise ValueError(f".zero_points is {zp.dtype}, the metadata says {want}")
        zp = np.array(zp)
    elif zp_storage is not None:
        raise ValueError(f"unknown zero_point_storage {zp_storage!r}")
    ts = entry.get("tensor_scale")
    if ts is not None and (
        isinstance(ts, bool)
        or not isinstance(ts, (int, float))
        or not 0 < ts <= float(np.finfo(np.float32).max)
    ):
        raise ValueError(f"bad tensor_scale {ts!r} (a float32 > 0)")
    return QuantizedTensor(
        data=np.array(data),
        scales=np.ascontiguousarray(scales),
        zero_points=None if zp is None else np.ascontiguousarray(zp),
        format=fmt.name,
        block_size=bs,
        axis=axis,
        shape=tuple(shape),
        dtype=dtype,
        tensor_scale=None if ts is None else np.float32(ts),
        double_quant=dq,
    )


def _np_dtype(code, what: str) -> np.dtype:
    entry = DTYPES.get(code) if isinstance(code, str) else None
    if entry is None or entry[0] is None:
        raise ValueError(f"bad {what} {code!r}")
    return entry[0]


# --------------------------------------------------------------------------- writing


@dataclass
class _Run:
    """Settings and results of one quantize_safetensors call."""

    format: str
    block_size: int | str | None
    axis: int | None
    clip_ratio: float
    layout: str
    selection: Selection
    progress: Callable[[dict], None] | None
    rows: list[dict] = field(default_factory=list)
    ct_ignore: list[str] = field(default_factory=list)
    ct_group: int | None = None
    done: int = 0  # tensors converted so far (by this process)
    method: str = "rtn"
    nan: str = "raise"
    calib: _Calib | None = None
    awq: AwqFold | None = None  # method awq / awq+gptq: the scales and what they fold into


def quantize_safetensors(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    format: str = "int4",
    block_size: int | str | None = "auto",
    axis: int | None = -1,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    embeddings: bool = False,
    all_tensors: bool = False,
    layout: str = "quantize",
    clip_ratio: float = 1.0,
    overwrite: bool = False,
    progress: Callable[[dict], None] | None = None,
    jobs: int = 1,
    method: str = "rtn",
    nan: str = "raise",
    calib: str | os.PathLike | dict | None = None,
    target_bits: float | None = None,
) -> list[dict]:
    """Quantize a safetensors checkpoint; returns one report row per tensor (see report.py).

    src: a .safetensors file (dst: the output file, or a folder to put it in), a folder of
    them, or a sharded checkpoint's `*.safetensors.index.json` (dst: the output folder, with
    the same file names, a rewritten index written last, and the folder's other small files
    such as config.json and the tokenizer copied). format / block_size / axis / clip_ratio:
    as `quantize_tensor`. include / exclude / embeddings / all_tensors: which tensors (module
    docstring). layout: "quantize" (NAME.qdata / .scales / .zero_points, docs/
    safetensors-layout.md) or "compressed-tensors" (pack-quantized, for vLLM/transformers;
    int4/uint4/int8/uint8, 2-d weights quantized along their last axis; config.json gets the
    quantization_config). method: how block scales are chosen ("rtn", "mse", "hqq": the
    data-free methods of `quantize.algorithms`), or "gptq" (needs calib; weights without
    calibration data get rtn, noted in their row), "awq" / "awq+gptq" (need calib's
    NAME.inputs and a Llama-style model named by config.json: scales folded into the norms
    and v_proj/up_proj, then AWQ's clipping search on each folded weight, `io/awq_fold.py`;
    rows say each group's alpha and the share of blocks clipped). nan: "raise" (a
    NaN/Inf is an error naming the tensor) or "zero" (as `quantize_tensor`'s nan=).
    calib: an .npz path or a dict of arrays: per 2-d weight NAME (out, in), `NAME.hessian`
    (in, in) = X^T X of the layer's inputs, or `NAME.inputs` (rows, in) samples of them
    (docs/safetensors-layout.md). With it, rows gain "output_error" and "output_error_rtn"
    (tr(D H D^T) / tr(W H W^T), D = W - Ŵ). target_bits: mixed precision: per weight one of
    (format, block_size), (format, 32 or 16), (8-bit, block_size), chosen to least summed
    error (output error where calib has the weight, else relative squared error) with stored
    bits (codes, scales, zero points) per quantized weight <= target_bits; layout "quantize".
    With awq / awq+gptq the options are of the folded weights (the group's scales, searched
    at format and block_size), scored by the unfolded result's error.

    The output appears whole or not at all (written to a temporary file/folder beside it,
    renamed at the end); an existing output is replaced only with `overwrite`; inputs are
    never written to. `progress(row)` is called after each tensor (with jobs > 1: after each
    shard, for its tensors). jobs: shards converted at once, in that many worker processes
    (each holds about one tensor at a time); the output is the same for any number.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int):
        raise TypeError(f"jobs must be an int >= 1, got {jobs!r}")
    if jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    fmt = get_format(format)
    if layout == "compressed-tensors":
        ct.scheme(fmt.name)
        if axis not in (-1, 1):
            raise ValueError(
                f"the compressed-tensors layout quantizes along the input dimension (axis=-1), "
                f"got axis={axis!r}"
            )
    resolve_block(1, block_size, fmt)  # TypeError/ValueError for a bad one, before any work
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        raise TypeError(f"axis must be an int or None, got {axis!r}")
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)):
        raise TypeError(f"clip_ratio must be a number in (0, 1], got {clip_ratio!r}")
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be a number in (0, 1], got {clip_ratio!r}")
    if method in AWQ_METHODS:
        # the architecture names the operators that take the scales (io/awq_fold.py)
        check_model(resolve(src), method)
    if method in ("gptq", *AWQ_METHODS):
        if calib is None:
            raise ValueError(
                f"method {method!r} needs calib= (--calib FILE.npz; docs/safetensors-layout.md)"
            )
    else:
        from ..algorithms import get_method

        get_method(method)  # ValueError listing the methods, before any work
    if nan not in ("raise", "zero"):
        raise ValueError(f"nan must be 'raise' or 'zero', got {nan!r}")
    if (calib is not None or target_bits is not None) and axis not in (-1, 1):
        raise ValueError(
            f"calib and target_bits quantize 2-d weights along their input dimension "
            f"(axis=-1), got axis={axis!r}"
        )
    if target_bits is not None:
        if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)):
            raise TypeError(f"target_bits must be a number > 0, got {target_bits!r}")
        if not (math.isfinite(target_bits) and target_bits > 0):
            raise ValueError(f"target_bits must be a finite number > 0, got {target_bits!r}")
        if layout != "quantize":
            raise ValueError(
                "target_bits needs layout 'quantize' (compressed-tensors has one scheme for "
                "the whole model)"
            )
    if isinstance(include, str):
        include = [include]
    if isinstance(exclude, str):
        exclude = [exclude]
    source = resolve(src)
    run = _Run(
        format=fmt.name,
        block_size=block_size,
        axis=axis,
        clip_ratio=clip_ratio,
        layout=layout,
        method=method,
        nan=nan,
        calib=None if calib is None else _Calib.open(calib),
        selection=Selection(
            include=list(include) if include else None,
            exclude=list(exclude) if exclude else None,
            embeddings=embeddings,
            all_tensors=all_tensors,
            layout=layout,
        ),
        progress=progress,
    )
    if layout == "compressed-tensors" and not (block_size is None or block_size == -1):
        run.ct_group = resolve_block(0, block_size, fmt)
    out = _output_path(source, Path(dst), overwrite)
    with _Opened(source) as opened:
        _refuse_quantized(opened)
        plan = _plan(opened, run)
        if run.calib is not None:
            run.calib.check(opened, plan)
        if method in AWQ_METHODS:
            run.awq = build_fold(opened, plan, run)
        if target_bits is not None:
            _plan_bits(opened, plan, run, float(target_bits))
        if source.single:
            with atomic_path(out) as tmp:
                _convert_file(opened.files[0], tmp, plan, run, out.name)
                _test_pause(run)
        else:
            with atomic_dir(out) as tmp:
                names: dict[str, str] = {}
                total = 0
                if jobs > 1 and len(opened.files) > 1:
                    results = _convert_parallel(opened, tmp, plan, run, jobs)
                else:
                    results = (
                        (f, _convert_file(f, tmp / f.path.name, plan, run, f.path.name))
                        for f in opened.files
                    )
                for f, written in results:
                    names.update(dict.fromkeys(written, f.path.name))
                    total += sum(written.values())
                _copy_companions(source, tmp, run)
                if source.index is not None:  # last: its presence marks a complete folder
                    index = dict(source.index_data)
                    index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
                    index["weight_map"] = dict(sorted(names.items()))
                    (tmp / source.index.name).write_text(
                        json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
                    )
                _test_pause(run)
    return run.rows


#: test hook (tests/test_interrupt.py): QUANTIZE_TEST_PAUSE_AFTER=N makes a process that has
#: converted N tensors (and not started the next) say "quantize-test: paused after N tensors"
#: on stderr and sleep QUANTIZE_TEST_PAUSE_SECONDS (default 60), so a test can signal it at a
#: known point; N equal to the number of tensors pauses a run just before its output is
#: renamed into place (index written). With jobs > 1 each worker counts its own shard.
PAUSE_ENV = "QUANTIZE_TEST_PAUSE_AFTER"


def _test_pause(run: _Run) -> None:
    wanted = os.environ.get(PAUSE_ENV)
    if wanted is None or wanted.strip() != str(run.done):
        return
    import sys

    print(f"quantize-test: paused after {run.done} tensors", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("QUANTIZE_TEST_PAUSE_SECONDS", "60")))


def _worker_init(threads: int) -> None:
    """Worker processes: Ctrl-C goes to the parent, which stops them; no oversubscribed cores."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..kernels import ENV_THREADS

    os.environ.setdefault(ENV_THREADS, str(threads))


def _convert_shard(
    path: str, dest: str, plan: dict[str, _Plan], run: _Run, out_name: str
) -> tuple[list[dict], dict[str, int]]:
    """One shard in a worker process: (its report rows, the bytes of each tensor written)."""
    with SafetensorsFile(path) as f:
        written = _convert_file(f, Path(dest), plan, run, out_name)
    return run.rows, written


def _convert_parallel(opened: _Opened, tmp: Path, plan, run: _Run, jobs: int):
    """Convert the shards in `jobs` processes; yields (file, written) in file order.

    Any exception or interruption here kills the workers before it propagates, so the
    caller's cleanup of `tmp` never races a worker still writing into it.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = min(jobs, len(opened.files))
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),  # no fork of a numba-threaded parent
        initializer=_worker_init,
        initargs=(threads,),
    )
    try:
        futures = {}
        for f in opened.files:
            sub = {n: plan[n] for n in f.tensors}
            shard_run = _Run(
                format=run.format,
                block_size=run.block_size,
                axis=run.axis,
                clip_ratio=run.clip_ratio,
                layout=run.layout,
                method=run.method,
                nan=run.nan,
                calib=None if run.calib is None else run.calib.subset(f.tensors),
                awq=run.awq,
                selection=run.selection,
                progress=None,
                ct_ignore=run.ct_ignore,
                ct_group=run.ct_group,
            )
            fut = pool.submit(
                _convert_shard, str(f.path), str(tmp / f.path.name), sub, shard_run, f.path.name
            )
            futures[fut] = f
        results: dict[SafetensorsFile, tuple[list[dict], dict[str, int]]] = {}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                results[futures[fut]] = fut.result()  # a worker's ValueError is raised here
                if run.progress is not None:
                    for row in results[futures[fut]][0]:
                        run.progress(row)
        pool.shutdown()
        for f in opened.files:  # rows in file order, whichever shard finished first
            run.rows.extend(results[f][0])
            run.done += len(results[f][0])
    except BaseException:
        # a worker has no signal handler of ours: stop them all before the folder goes
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    return [(f, results[f][1]) for f in opened.files]


def _output_path(source: Source, dst: Path, overwrite: bool) -> Path:
    inputs = [*source.files, *([source.index] if source.index else [])]
    if source.single:
        if dst.is_dir():
            dst = dst / source.files[0].name
        out = check_output(dst, *inputs)
        if out.exists() and not overwrite:
            raise OutputError(f"{out}: already exists (--force, or overwrite=True, replaces it)")
        return out
    out = check_output(dst, *inputs, *([source.folder] if source.folder else []))
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out}: the input is a checkpoint folder, so the output is too")
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"{out}: already exists (--force, or overwrite=True, replaces it)")
        for p in inputs:
            if out.resolve() in p.resolve().parents:
                raise OutputError(f"{out}: replacing it would delete the input {p}")
    return out


def _refuse_quantized(opened: _Opened) -> None:
    for f in opened.files:
        if META_KEY in f.metadata:
            raise ValueError(f"{f.path}: already quantized by quantize; use quantize.load")
    path, config = _model_config(opened.source)
    if config is not None and config.get("quantization_config"):
        method = config["quantization_config"]
        method = method.get("quant_method") if isinstance(method, dict) else method
        raise ValueError(f"{path}: the model is already quantized ({method})")


@dataclass
class _Plan:
    quantize: bool
    note: str | None = None
    choice: tuple[str, str, int | str | None] | None = None  # target_bits: label, format, block


def _plan(opened: _Opened, run: _Run) -> dict[str, _Plan]:
    """For every tensor: quantize or keep (and why); refuses output names that collide."""
    plan: dict[str, _Plan] = {}
    for name, f in opened.where.items():
        info = f.tensors[name]
        why = run.selection.why_not(name, info.dtype, info.shape)
        if why is None and run.layout == "compressed-tensors":
            why = ct.representable(info.shape, run.ct_group)
            if why is None and not (name == "weight" or name.endswith(".weight")):
                why = "compressed-tensors stores module weights (NAME.weight) only"
        elif why is None and run.axis is not None and info.shape:
            ax = run.axis if run.axis >= 0 else run.axis + len(info.shape)
            if not 0 <= ax < len(info.shape):
                why = f"axis {run.axis} is out of range for shape {list(info.shape)}"
        plan[name] = _Plan(why is None, why)
    outputs: dict[str, str] = {n: n for n, p in plan.items() if not p.quantize}
    for name, p in plan.items():
        if not p.quantize:
            continue
        if run.layout == "quantize":
            new = [name + s for s in PIECES]
        else:
            base = name[: -len("weight")]
            new = [base + s for s in ct.SUFFIXES]
        for n in new:
            if n in opened.where or n in outputs:
                raise ValueError(
                    f"{opened.where[name].path}: tensor {name!r} would be stored as {n!r}, "
                    f"which is taken by {outputs.get(n, n)!r}"
                )
            outputs[n] = name
    if run.layout == "compressed-tensors":
        run.ct_ignore = sorted(
            name[: -len(".weight")]
            for name, p in plan.items()
            if not p.quantize
            and name.endswith(".weight")
            and len(opened.where[name].tensors[name].shape) == 2
            and not is_embedding(name)
        )
    return plan


def _convert_file(
    f: SafetensorsFile, dest: Path, plan: dict[str, _Plan], run: _Run, out_name: str
) -> dict[str, int]:
    """Write `f` quantized to `dest`; returns the bytes of every tensor written."""
    from .. import __version__

    entries: dict[str, dict] = {}
    with SafetensorsWriter(dest) as w:
        for name, info in f.tensors.items():
            _test_pause(run)
            p = plan[name]
            if not p.quantize:
                note = p.note
                if run.awq is not None and run.awq.touches(name):  # a norm (or bias) AWQ divides
                    w.add(name, run.awq.fold(name, f.array(name)))
                    note = "; ".join(filter(None, (note, run.awq.describe(name))))
                else:
                    w.add_raw(name, info.dtype, info.shape, f.raw(name))
                f.release(name)
                _emit(run, _kept_row(name, info, out_name, note))
                continue
            arr = arr0 = f.array(name)
            start = time.perf_counter()
            h = h0 = None if run.calib is None else run.calib.hessian(name)
            fmt_name, bs = (run.format, run.block_size) if p.choice is None else p.choice[1:]
            clipped = None
            if run.awq is not None:  # quantize the folded weight; errors against the original
                arr, h = run.awq.fold(name, arr0), run.awq.hessian(name, h0)
            try:
                if run.awq is None:
                    qt, used = _quantize_one(arr, run, fmt_name, bs, h)
                else:  # with AWQ's clipping search (io/awq_fold.py)
                    qt, used, clipped = run.awq.quantize(name, arr, h, run, fmt_name, bs)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{f.path}: tensor {name!r}: {exc}") from None
            if run.awq is None:
                extras = _calib_fields(arr, qt, used, run, fmt_name, bs, h)
            else:
                rtn = None if h0 is None else _quantize_one(arr0, run, fmt_name, bs, None)[0]
                extras = run.awq.fields(name, arr0, h0, qt, used, rtn, clipped)
            if p.choice is not None:
                extras["choice"] = p.choice[0]
            if run.layout == "quantize":
                pieces, entry = _encode(qt)
                stored, written = qt, {name + s: a for s, a in pieces.items()}
                # kept in the header: nvfp4's tensor scale, nf4_dq's offset
                extra = (qt.tensor_scale is not None) * 4 + (qt.double_quant is not None) * 4
            else:
                scale_dtype = arr.dtype if info.dtype in WEIGHT_FLOATS else np.float32
                pieces, stored = ct.encode(qt, scale_dtype)
                base = name[: -len("weight")]
                written = {base + s: a for s, a in pieces.items()}
                entry = {
                    "format": qt.format,
                    "block_size": int(qt.block_size),
                    "axis": qt.axis,
                    "shape": [int(d) for d in qt.shape],
                    "dtype": dtype_code(qt.dtype),
                }
                extra = 0
            for n, a in written.items():
                w.add(n, a)
            seconds = time.perf_counter() - start
            entries[name] = entry
            nbytes = sum(a.nbytes for a in written.values()) + extra
            row = _quantized_row(name, arr, stored, info, out_name, nbytes, seconds, run)
            note = extras.pop("note", None)
            if note:
                row["note"] = note if not row["note"] else f"{row['note']}; {note}"
            row.update(extras)
            _emit(run, row)
            del arr, qt, stored, pieces, written, h
            f.release(name)
        meta = dict(f.metadata)
        meta.setdefault("format", "pt")  # transformers refuses files whose metadata lacks it
        ours: dict[str, object] = {
            "layout": run.layout,
            "layout_version": LAYOUT_VERSION,
            "library": "quantize",
            "version": __version__,
            "tensors": entries,
        }
        if run.layout == "compressed-tensors":
            ours["quantization_config"] = ct.quantization_config(
                run.format, run.ct_group, run.ct_ignore
            )
        meta[META_KEY] = json.dumps(ours, separators=(",", ":"), sort_keys=True)
        w.metadata = meta
        written_bytes = w.nbytes
    return written_bytes


def _emit(run: _Run, row: dict) -> None:
    run.rows.append(row)
    run.done += 1
    if run.progress is not None:
        run.progress(row)


def _kept_row(name: str, info, out_name: str, note: str | None) -> dict:
    bits = DTYPES[info.dtype][1]
    return {
        "name": name,
        "quantized": False,
        "format": None,
        "dtype": info.dtype,
        "shape": list(info.shape),
        "block_size": None,
        "bits_per_weight": float(bits),
        "bytes_before": info.nbytes,
        "bytes_after": info.nbytes,
        "file": out_name,
        "note": note,
    }


def _quantized_row(name, arr, stored, info, out_name, nbytes, seconds, run) -> dict:
    row = {
        "name": name,
        "quantized": True,
        "format": stored.format,
        "dtype": info.dtype,
        "shape": list(info.shape),
        "block_size": int(stored.block_size),
        "bits_per_weight": 8.0 * nbytes / info.size,
        "bytes_before": info.nbytes,
        "bytes_after": int(nbytes),
        "file": out_name,
        "seconds": seconds,
        "note": None,
    }
    restored = stored.dequantize(np.float32)
    finite = np.isfinite(arr) if run.nan == "zero" else np.ones((), bool)  # else checked
    if not finite.all():  # nan="zero": a replaced NaN/Inf counts as its replacement (exact)
        row["nonfinite"] = int(finite.size - np.count_nonzero(finite))
        row["note"] = f"{row['nonfinite']} NaN/Inf replaced (--nan zero)"
        arr = np.where(finite, arr, restored)
    row.update(error_stats_chunked(arr, restored))
    return row


def _copy_companions(source: Source, dest: Path, run: _Run) -> None:
    """Copy the model folder's other top-level files; config.json gets the CT config."""
    if source.folder is None:
        return
    for p in sorted(source.folder.iterdir()):
        if (
            not p.is_file()
            or p.name.startswith(".")
            or p.name.endswith(_WEIGHT_SUFFIXES)
            or p.name.endswith(".index.json")
        ):
            continue
        if p.name == "config.json" and run.layout == "compressed-tensors":
            _, config = _model_config(source)
            config["quantization_config"] = ct.quantization_config(
                run.format, run.ct_group, run.ct_ignore
            )
            (dest / p.name).write_text(
                json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        else:
            shutil.copy2(p, dest / p.name)


# --------------------------------------------------------------------------- calibration


#: GPTQ as io/onnx.py runs it (its GPTQ_OPTIONS, measured best there): rows in decreasing
#: activation order, every group's params fixed up front by the mse search
GPTQ_OPTIONS = {"act_order": True, "method": "mse"}
#: the keys of a calib file: NAME.hessian (in, in) = X^T X, or NAME.inputs (rows, in) = X
CALIB_KINDS = (".hessian", ".inputs")
#: the 8-bit option of mixed precision, per 4-bit format (int8 for the others)
_EIGHT_BIT = {"uint4": "uint8", "uint4_float_zp": "uint8", "int4_affine": "uint8"}
#: rows of NAME.inputs turned into X^T X at once (float64: memory 8 * rows * in bytes)
_H_ROWS = 4096


def _npz_names(path: Path) -> list[str]:
    """The array names of an .npz, without reading any array."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise ValueError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    for n in names:
        if not n.endswith(".npy"):
            raise ValueError(f"{path}: not a readable .npz: member {n!r} is not an .npy array")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: not a readable .npz: a member name appears twice")
    return [n[: -len(".npy")] for n in names]


def _npz_array(path: Path, key: str) -> np.ndarray:
    """One array of an .npz, read as `npz.load_npz` reads each (no pickles, no blind allocation);
    one at a time, so a calib file of every layer's Hessian never sits in memory whole."""
    from .npz import load_npz_member

    return load_npz_member(path, key)


@dataclass
class _Calib:
    """Calibration data by weight name: an .npz read one key at a time when needed, or a dict."""

    label: str
    path: Path | None
    arrays: dict[str, np.ndarray] | None
    keys: dict[str, str]  # weight name -> its key, NAME.hessian or NAME.inputs

    @classmethod
    def open(cls, calib) -> _Calib:
        """From an .npz path or a dict of arrays; ValueError for keys of no known kind."""
        if isinstance(calib, dict):
            bad = [k for k in calib if not isinstance(k, str)]
            if bad:
                raise TypeError(f"calib keys must be str (NAME.hessian / NAME.inputs): {bad[0]!r}")
            label, path, arrays, names = "calib", None, dict(calib), list(calib)
        elif isinstance(calib, (str, os.PathLike)):
            path = Path(calib)
            label, arrays, names = str(path), None, _npz_names(path)
        else:
            raise TypeError(f"calib must be an .npz path or a dict of arrays, got {calib!r}")
        keys: dict[str, str] = {}
        for key in names:
            kind = next((k for k in CALIB_KINDS if key.endswith(k)), None)
            if kind is None or key == kind:
                raise ValueError(
                    f"{label}: key {key!r} is neither NAME.hessian nor NAME.inputs "
                    "(NAME: a weight of the checkpoint)"
                )
            name = key[: -len(kind)]
            if name in keys:
                raise ValueError(f"{label}: key {key!r}: {keys[name]!r} is given too; give one")
            keys[name] = key
        return cls(label, path, arrays, keys)

    def subset(self, names: Iterable[str]) -> _Calib:
        """Only these weights' data (what one shard's worker needs)."""
        keys = {n: self.keys[n] for n in names if n in self.keys}
        arrays = None if self.arrays is None else {k: self.arrays[k] for k in keys.values()}
        return _Calib(self.label, self.path, arrays, keys)

    def _array(self, key: str) -> np.ndarray:
        if self.arrays is not None:
            return np.asarray(self.arrays[key])
        return _npz_array(self.path, key)

    def check(self, opened: _Opened, plan: dict[str, _Plan]) -> None:
        """Every key names a 2-d weight and holds finite float data of its shape (H symmetric,
        diagonal >= 0); else ValueError naming the file and the key. Reads each key once."""
        for name, key in self.keys.items():
            where = f"{self.label}: key {key!r}"
            if name not in opened.where:
                raise ValueError(f"{where}: the checkpoint has no tensor {name!r}")
            shape = tuple(opened.where[name].tensors[name].shape)
            if len(shape) != 2:
                raise ValueError(
                    f"{where}: {name!r} has shape {list(shape)}; calibration data is for 2-d "
                    "weights (out, in)"
                )
            _check_calib_array(self._array(key), key.endswith(".hessian"), shape[1], where)

    def hessian(self, name: str) -> np.ndarray | None:
        """H = X^T X (in, in) float64 of a weight's inputs, or None without data for it."""
        key = self.keys.get(name)
        if key is None:
            return None
        arr = self._array(key)
        if key.endswith(".hessian"):
            h = arr.astype(np.float64)
            return (h + h.T) / 2  # symmetric to rounding (checked): exactly, for GPTQ
        h = np.zeros((arr.shape[1], arr.shape[1]))
        for i in range(0, arr.shape[0], _H_ROWS):
            x = arr[i : i + _H_ROWS].astype(np.float64)
            h += x.T @ x
        return h


def _check_calib_array(arr: np.ndarray, hessian: bool, k: int, where: str) -> None:
    if not is_float_dtype(arr.dtype) or np.iscomplexobj(arr):
        raise ValueError(f"{where}: must be floating point, got {arr.dtype}")
    if hessian and arr.shape != (k, k):
        raise ValueError(f"{where}: a Hessian X^T X must have shape ({k}, {k}), got {arr.shape}")
    if not hessian and (arr.ndim != 2 or arr.shape[1] != k or arr.shape[0] == 0):
        raise ValueError(f"{where}: inputs must have shape (rows > 0, {k}), got {arr.shape}")
    a = arr.astype(np.float64) if hessian else arr
    if not np.isfinite(a).all():
        raise ValueError(f"{where}: holds NaN or Inf")
    if hessian:
        top = float(np.abs(a).max())
        if float(np.abs(a - a.T).max()) > 1e-5 * top:  # sums in float32 are symmetric to rounding
            raise ValueError(f"{where}: a Hessian X^T X must be symmetric; it is not")
        d = np.diagonal(a)
        if (d < 0).any():
            i = int(np.argmin(d))
            raise ValueError(
                f"{where}: a Hessian X^T X has no negative diagonal; ({i}, {i}) is {d[i]:g}"
            )


def _quantize_one(arr, run: _Run, fmt_name: str, block_size, h) -> tuple[QuantizedTensor, str]:
    """`arr` quantized at (fmt_name, block_size) with the run's method (gptq where H is given,
    else rtn for gptq), and the method used."""
    if run.method in ("gptq", "awq+gptq") and h is not None:
        from ..algorithms.gptq import gptq_quantize

        k = arr.shape[1]
        bs = None if block_size is None else resolve_block(k, block_size, get_format(fmt_name))
        qt = gptq_quantize(arr.T, h, fmt_name, bs, clip_ratio=run.clip_ratio, **GPTQ_OPTIONS)
        # GPTQ works on the (in, out) MatMul layout along axis 0; its rows are `out`, its
        # blocks run along `in`: the same stored bytes as (out, in) along axis 1
        return dataclasses.replace(qt, shape=tuple(qt.shape[::-1]), axis=1 - qt.axis), "gptq"
    method = "rtn" if run.method in ("gptq", *AWQ_METHODS) else run.method
    qt = quantize_tensor(
        arr, fmt_name, block_size, run.axis, clip_ratio=run.clip_ratio, method=method, nan=run.nan
    )
    return qt, method


def _as_float64(arr: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """arr in float64, a NaN/Inf (replaced under nan="zero") counted as its replacement."""
    w = arr.astype(np.float64)
    finite = np.isfinite(w)
    return w if finite.all() else np.where(finite, w, recon)


def _h_error(w: np.ndarray, recon: np.ndarray, h: np.ndarray | None) -> float:
    """tr(D H D^T) / tr(W H W^T) for (out, in) W and D = W - recon; H = I without data."""
    d = w - recon
    if h is None:
        num, den = float(np.sum(d * d)), float(np.sum(w * w))
    else:
        num, den = float(np.sum((d @ h) * d)), float(np.sum((w @ h) * w))
    return num / den if den > 0 else (0.0 if num <= 0 else math.inf)


def _calib_fields(arr, qt, used: str, run: _Run, fmt_name: str, block_size, h) -> dict:
    """The row's method, note and (with H) output errors of qt and of rtn at the same option."""
    out: dict[str, object] = {"method": used}
    if run.method == "gptq" and h is None:
        out["note"] = "no calibration data: gptq -> rtn"
    if h is None:
        return out
    recon = qt.dequantize(np.float64)
    w = _as_float64(arr, recon)
    out["output_error"] = err = _h_error(w, recon, h)
    if used == "rtn":
        out["output_error_rtn"] = err
    else:
        ref = quantize_tensor(
            arr, fmt_name, block_size, run.axis, clip_ratio=run.clip_ratio, nan=run.nan
        )
        out["output_error_rtn"] = _h_error(w, ref.dequantize(np.float64), h)
    return out


def _bit_options(fmt_name: str, block_size, k: int) -> list[tuple[str, str, int | None]]:
    """target_bits' options (label, format, block): the format at the block size and at 32 (16
    when the block is <= 32), and its 8-bit sibling at the block size; duplicates dropped."""
    fmt = get_format(fmt_name)
    base = resolve_block(k, block_size, fmt)
    b0 = None if block_size is None or block_size == -1 else base
    eight = fmt.name if fmt.bits == 8 else _EIGHT_BIT.get(fmt.name, "int8")
    out: dict[str, tuple[str, str, int | None]] = {}
    for f, b in ((fmt.name, b0), (fmt.name, 32 if base > 32 else 16), (eight, b0)):
        label = f"{f}/b{resolve_block(k, b, get_format(f))}"
        out.setdefault(label, (label, f, b))
    return list(out.values())


def _stored_bytes(qt: QuantizedTensor) -> int:
    """Bytes our layout stores for qt: codes, scales, zero points, and header floats."""
    pieces, _ = _encode(qt)
    extra = (qt.tensor_scale is not None) * 4 + (qt.double_quant is not None) * 4
    return sum(a.nbytes for a in pieces.values()) + extra


def _plan_bits(opened: _Opened, plan: dict[str, _Plan], run: _Run, target: float) -> None:
    """target_bits' first pass: every option of every weight quantized, its stored bits and
    error noted and the tensor dropped (one tensor held at a time); `plan_mixed` then sets
    each weight's `choice`, which the writing pass quantizes again (deterministically). Under
    AWQ each option is of the folded weight, as the writing pass makes it, and its error that
    of the unfolded result against the float model's weight."""
    from ..algorithms.mixed import LayerChoice, plan_mixed

    layers = []
    options: dict[str, dict[str, tuple]] = {}
    for name, p in plan.items():
        if not p.quantize:
            continue
        f = opened.where[name]
        arr = f.array(name)
        h = None if run.calib is None else run.calib.hessian(name)
        if run.awq is not None:
            arr_f, h_f = run.awq.fold(name, arr), run.awq.hessian(name, h)
        opts = []
        options[name] = {}
        for i, (label, fmt_name, bs) in enumerate(
            _bit_options(run.format, run.block_size, arr.shape[-1])
        ):
            try:
                if run.awq is None:
                    qt, _ = _quantize_one(arr, run, fmt_name, bs, h)
                else:
                    qt = run.awq.quantize(name, arr_f, h_f, run, fmt_name, bs)[0]
            except (TypeError, ValueError) as exc:
                if i == 0:  # the format itself fails: as without target_bits
                    raise ValueError(f"{f.path}: tensor {name!r}: {exc}") from None
                continue  # e.g. mxfp4 has no block 16
            recon = qt.dequantize(np.float64)
            if run.awq is not None:
                recon = run.awq.unfold(name, recon)
            err = _h_error(_as_float64(arr, recon), recon, h)
            opts.append((label, 8 * _stored_bytes(qt) / arr.size, err))
            options[name][label] = (label, fmt_name, bs)
            del qt, recon
        layers.append(LayerChoice(name, int(arr.size), opts))
        del arr
        if run.awq is not None:
            del arr_f, h_f
        f.release(name)
    if not layers:
        return
    for name, label in plan_mixed(layers, target).items():
        plan[name].choice = options[name][label]


# --------------------------------------------------------------------------- reading


def load(path: str | os.PathLike) -> dict[str, QuantizedTensor | np.ndarray]:
    """Read a checkpoint back: quantized tensors as QuantizedTensor, the rest as arrays.

    path: a .safetensors file, a folder, or a `*.safetensors.index.json`. Reads our layout,
    and compressed-tensors pack-quantized checkpoints (ours, or others' with a config.json
    beside them saying pack-quantized, 4 or 8 bits). Everything is checked; any inconsistency
    (unknown format, shapes or dtypes that do not fit, a missing piece) is a ValueError naming
    the file and the tensor. Arrays are copies: nothing stays mapped.
    """
    source = resolve(path)
    out: dict[str, QuantizedTensor | np.ndarray] = {}
    with _Opened(source) as opened:
        metas = {f.path: _our_metadata(f) for f in opened.files}
        consumed: dict[str, str] = {}  # piece -> the tensor it belongs to
        ct_bits = None
        foreign_ct = any(n.endswith(".weight_packed") for n in opened.where) and not any(
            metas.values()
        )
        if foreign_ct:
            cpath, config = _model_config(source)
            qc = (config or {}).get("quantization_config")
            if isinstance(qc, dict):
                try:
                    ct_bits, _ = ct.config_scheme(qc)
                except ValueError as exc:
                    raise ValueError(f"{cpath}: {exc}") from None
        for f in opened.files:
            meta = metas[f.path]
            if meta is not None:
                for name, entry in meta["tensors"].items():
                    _load_entry(opened, f, meta["layout"], name, entry, out, consumed)
                _check_strays(f, meta, consumed)
        if foreign_ct:
            for name, f in opened.where.items():
                if name.endswith(".weight_packed"):
                    base = name[: -len("weight_packed")]
                    pieces = {s: base + s for s in ct.SUFFIXES if base + s in opened.where}

                    def get(n, f=f):
                        return opened.where[n].array(n)

                    out[base + "weight"] = _ct_tensor(f, base + "weight", pieces, get, ct_bits, {})
                    consumed.update(dict.fromkeys(pieces.values(), base + "weight"))
        for name, f in opened.where.items():
            if name in consumed:
                continue
            if name in out:
                raise ValueError(f"{f.path}: tensor {name!r} is stored both quantized and plain")
            try:
                out[name] = np.array(f.array(name))
            except ValueError as exc:
                raise ValueError(f"{exc}; load cannot return it") from None
        order = dict.fromkeys(consumed.get(name, name) for name in opened.where)
    return {name: out[name] for name in order}


def _load_entry(opened, f, layout, name, entry, out, consumed) -> None:
    if name in out:
        raise ValueError(f"{f.path}: tensor {name!r} is described twice")
    if layout == "quantize":
        names = {s: name + s for s in PIECES if name + s in f.tensors}

        def piece(suffix):
            n = names.get(suffix)
            return None if n is None else f.array(n)

        try:
            out[name] = _decode(entry, piece)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{f.path}: tensor {name!r}: {exc}") from None
        consumed.update(dict.fromkeys(names.values(), name))
    else:
        if not name.endswith("weight"):
            raise ValueError(f"{f.path}: tensor {name!r}: not a module weight")
        base = name[: -len("weight")]
        pieces = {s: base + s for s in ct.SUFFIXES if base + s in f.tensors}
        if not isinstance(entry, dict):
            raise ValueError(f"{f.path}: tensor {name!r}: its metadata entry is not an object")
        try:
            if not isinstance(entry.get("format"), str):
                raise ValueError(f"bad format {entry.get('format')!r}")
            bits = ct.scheme(entry["format"])[0]
        except ValueError as exc:
            raise ValueError(f"{f.path}: tensor {name!r}: {exc}") from None
        out[name] = _ct_tensor(f, name, pieces, f.array, bits, entry)
        consumed.update(dict.fromkeys(pieces.values(), name))


def _ct_tensor(f, name, pieces, get, bits, entry) -> QuantizedTensor:
    try:
        arrays = {s: np.array(get(n)) for s, n in pieces.items()}  # copies: nothing stays mapped
        dtype = None if "dtype" not in entry else _np_dtype(entry["dtype"], "dtype")
        qt = ct.decode(arrays, bits, entry.get("block_size"), dtype)
        if "format" in entry and entry["format"] != qt.format:
            raise ValueError(f"the metadata says {entry['format']}, the tensors hold {qt.format}")
        if "shape" in entry and list(qt.shape) != entry["shape"]:
            raise ValueError(f"the metadata says shape {entry['shape']}, weight_shape {qt.shape}")
        return qt
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{f.path}: tensor {name!r}: {exc}") from None


def _check_strays(f: SafetensorsFile, meta: dict, consumed: dict[str, str]) -> None:
    """A piece of our layout with no metadata entry means a damaged or edited file."""
    suffixes = PIECES if meta["layout"] == "quantize" else tuple("." + s for s in ct.SUFFIXES)
    for name in f.tensors:
        if name not in consumed and name.endswith(suffixes):
            raise ValueError(f"{f.path}: tensor {name!r} looks quantized but has no metadata entry")


def report_base(dst: str | os.PathLike) -> Path:
    """Where the reports of an output go: OUT.safetensors -> OUT.report(.json/.md), beside it."""
    p = Path(dst)
    name = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(name + ".report")


def describe(path: str | os.PathLike) -> dict:
    """What a checkpoint holds, for `quantize inspect`: files, metadata, tensors, our entries."""
    source = resolve(path)
    files = []
    with _Opened(source) as opened:
        for f in opened.files:
            meta = _our_metadata(f)
            files.append(
                {
                    "path": str(f.path),
                    "metadata": {k: v for k, v in f.metadata.items() if k != META_KEY},
                    "quantize": meta,
                    "tensors": [
                        {"name": n, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                        for n, t in f.tensors.items()
                    ],
                }
            )
    return {"source": str(source.path), "index": str(source.index or ""), "files": files}
