"""ONNX models in, 4-bit ONNX models out: MatMul/Gemm weights (and optionally Gather embeddings).

The numbers come from `quantize_tensor`; this module only lays a `QuantizedTensor` out the way
the runtime reads it:

* ``output="matmulnbits"``: ONNX Runtime's ``com.microsoft.MatMulNBits`` (bits=4). B is uint8
  ``[N, n_blocks, block_size/2]``: each output column's K values, blocks along K, two codes a
  byte, low nibble first -- `QuantizedTensor.data` for a weight quantized along K, reshaped.
  ``scales`` is ``[N, n_blocks]`` in A's float type. MatMulNBits dequantizes
  ``(code - zero_point) * scale`` with unsigned codes and a default zero point of 8, so int4
  (signed, symmetric) codes are stored as ``code + 8`` (each nibble XOR 8) and no zero point is
  written; uint4 writes its zero points packed two a byte, ``[N, ceil(n_blocks/2)]``.
* ``output="qdq"``: ``DequantizeLinear`` (opset 21, blocked: ``axis`` + ``block_size``) on an
  INT4 (symmetric) or UINT4 (+ UINT4 zero point) initializer in the weight's own layout, feeding
  the unchanged MatMul/Gemm. Models below opset 21 are moved to 21 (see `ensure_opset`).
* Gather embeddings (``quantize_gather=True``, either output): DequantizeLinear (blocks along
  the embedding dimension, axis 1) feeding the unchanged Gather.

Gemm keeps its meaning exactly: QDQ leaves the Gemm node alone (alpha, beta, C, transA/B); for
MatMulNBits it becomes ``[Transpose(A)] -> MatMulNBits -> [Mul alpha] -> [Add C (Mul beta)]``.
A weight used by several nodes is quantized once and shared; a float weight that something
else still reads (a non-quantized node, a subgraph, a graph output) is kept. A weight reached
through Identity nodes (constant -> Identity -> ... -> MatMul, as exporters write tied weights)
is the constant itself: quantized once under the constant's name, and the Identity chain and
float constant are removed when nothing else reads them. If/Loop/Scan bodies are left as they
are: their MatMul/Gemm weights stay float, each listed in "skipped" ("inside a subgraph").

``format="int4_ort"`` is ONNX Runtime's own symmetric rule (`formats.integer.OrtInt4`) written
as ORT writes it: MatMulNBits gets ORT's unsigned codes and signed scales and no zero point,
byte for byte what onnxruntime's MatMulNBitsQuantizer (is_symmetric=True) writes; QDQ gets
INT4 codes (ORT's code - 8) and the signed scales (DequantizeLinear allows negative scales).

Files with external data are read lazily (`load_model(lazy=True)`, unless calibration must run
the model): each weight is read from disk when it is quantized and untouched tensors are copied
file to file when the output is written. With an external-data output, each weight's new
initializers go to a spill file beside the output as soon as they are made (`_Spill`) and are
copied into the data file at the end, so memory follows the largest tensor, not the model
(benchmarks/big_onnx.md). Mixed precision (target_bits) moves every weight's candidate arrays
to a temporary folder beside the output (the system's for in-memory calls) until the budget
picks, keeping only their bits and errors, then reads back the chosen ones (`_Stashed`).

ORT note: with its default optimizations ORT fuses DequantizeLinear(int4) -> MatMul into a
MatMulNBits with accuracy_level 4 (activations quantized to int8 on the fly; session config
``session.qdq_matmulnbits_accuracy_level``), so QDQ models run slightly less exactly than the
weights alone would suggest; MatMulNBits written here leaves accuracy_level unset (0: float A)
unless asked.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..blocking import from_blocks, params_to_axis
from ..core import quantize_tensor
from ..packing import pack_nibbles
from ..report import tensor_report
from ..tensor import QuantizedTensor
from .atomic import atomic_path, check_output

#: int4_ort: ONNX Runtime's own symmetric rule (formats.integer.OrtInt4), written as ORT writes
#: it: unsigned codes with the implicit zero point 8 and signed scales, no zero point tensor
FORMATS = ("int4", "uint4", "int4_ort")
METHODS = ("rtn", "mse", "hqq", "awq", "gptq", "awq+gptq")
#: methods that need activations from calibration runs
CALIBRATED_METHODS = ("awq", "gptq", "awq+gptq")
#: rows of each activation kept for AWQ's search
AWQ_SAMPLES = 4096
#: default bound on the calibration state held at once (Hessians + AWQ rows), bytes
CALIB_MEMORY = 2 << 30
#: why `quantize_onnx_model(awq_check=True)` quantizes twice: per weight AWQ's weight factor
#: always lowers the calibration output error, yet on the OCR recogniser's CTC head (6625
#: outputs, most never read) it made the model's held-out outputs 5x worse; only the whole
#: model shows it (benchmarks/methods_real_models.md, "Larger OCR sets; AWQ's scale family
#: chosen on the whole model")
#: the 8-bit option of mixed precision, per 4-bit format (MatMulNBits bits=8 / INT8 QDQ)
EIGHT_BIT = {"int4": "int8", "uint4": "uint8", "int4_ort": "int8"}
OUTPUTS = ("matmulnbits", "qdq")
QUANTIZABLE_OPS = ("MatMul", "Gemm", "Gather")
#: blocked DequantizeLinear with INT4/UINT4 needs opset 21, and INT4 needs IR version 10
QDQ_OPSET = 21
QDQ_IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
#: above this many tensor bytes the output is written with external data (protobuf's 2 GiB cap)
EXTERNAL_DATA_LIMIT = 2**31 - 2**27

_WEIGHT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------------------------
# the model walk


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _all_graphs(sub)


def _all_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for g in _all_graphs(model.graph):
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in (*g.input, *g.output, *g.value_info))
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
            names.add(node.name)
    names.discard("")
    return names


def _use_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """How often each name is read: node inputs and graph outputs, subgraphs included."""
    uses: dict[str, int] = {}
    for g in _all_graphs(graph):
        for node in g.node:
            for name in node.input:
                if name:
                    uses[name] = uses.get(name, 0) + 1
        for out in g.output:  # a (sub)graph may hand a weight straight out
            uses[out.name] = uses.get(out.name, 0) + 1
    return uses


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _default_opset(model: onnx.ModelProto) -> int | None:
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    return max(versions) if versions else None


# --------------------------------------------------------------------------------------------
# opset


def ensure_opset(model: onnx.ModelProto, target: int = QDQ_OPSET) -> str | None:
    """Raise the default-domain opset of `model` (in place) to `target` if it is lower.

    If no operator the model uses (subgraphs included) has a different definition at `target`
    than at its current opset, only the version number changes. Otherwise the model goes
    through `onnx.version_converter` (which adapts e.g. Squeeze/Reshape/Split across versions);
    a failure there is a ValueError. Returns what was done, or None if nothing was needed.
    Also raises the IR version to 10 (needed for INT4/UINT4 tensors).
    """
    current = _default_opset(model)
    if current is None:
        raise ValueError("the model imports no default-domain (ai.onnx) opset")
    note = None
    if current < target:
        ops = {
            n.op_type
            for g in _all_graphs(model.graph)
            for n in g.node
            if n.domain in _DEFAULT_DOMAINS
        }
        changed = sorted(op for op in ops if _since(op, current) != _since(op, target))
        if not changed:
            for o in model.opset_import:
                if o.domain in _DEFAULT_DOMAINS:
                    o.version = target
            note = f"opset {current} -> {target} (no operator the model uses differs)"
        else:
            try:
                from onnx import version_converter

                converted = version_converter.convert_version(model, target)
            except Exception as exc:
                raise ValueError(
                    f"QDQ output needs opset {target}; converting the model from opset "
                    f"{current} failed ({type(exc).__name__}: {exc}). Operators that differ: "
                    f"{', '.join(changed)}. Use output 'matmulnbits' instead."
                ) from None
            model.CopyFrom(converted)
            note = (
                f"opset {current} -> {target} with onnx.version_converter "
                f"(operators that differ: {', '.join(changed)})"
            )
    if model.ir_version < QDQ_IR_VERSION:
        model.ir_version = QDQ_IR_VERSION
    return note


def _since(op: str, version: int) -> int | None:
    try:
        return onnx.defs.get_schema(op, version, "").since_version
    except Exception:  # unknown op: treat as changed, the converter decides
        return None


# --------------------------------------------------------------------------------------------
# finding the weights


@dataclasses.dataclass
class _Site:
    """One node input that reads a constant weight we will quantize."""

    node: onnx.NodeProto
    position: int  # the node's place in graph.node
    index: int  # which input of `node`
    weight: str
    axis: int  # the axis blocks run along (K for MatMul/Gemm, the embedding dim for Gather)


@dataclasses.dataclass
class _Weight:
    """A constant: an initializer, or the output of a Constant node."""

    name: str
    tensor: TensorProto


def _weight_sources(graph: onnx.GraphProto) -> dict[str, _Weight]:
    found = {t.name: _Weight(t.name, t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    found[node.output[0]] = _Weight(node.output[0], a.t)
    # exporters write tied/shared weights as constant -> Identity (-> Identity ...) -> MatMul:
    # an Identity's output is the constant itself, under the root's name (quantized once)
    changed = True
    while changed:  # nodes are topologically sorted, so one pass normally does it
        changed = False
        for node in graph.node:
            if (
                node.op_type == "Identity"
                and node.domain in _DEFAULT_DOMAINS
                and node.input
                and node.output
                and node.input[0] in found
                and node.output[0] not in found
            ):
                found[node.output[0]] = found[node.input[0]]
                changed = True
    return found


def _matches(patterns: Sequence[str] | None, *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns or () for n in names if n)


def _find_sites(
    graph: onnx.GraphProto,
    weights: dict[str, _Weight],
    *,
    include,
    exclude,
    exclude_op_types,
    quantize_gather: bool,
    skipped: list[dict],
) -> list[_Site]:
    sites = []
    ops = [op for op in QUANTIZABLE_OPS if op != "Gather" or quantize_gather]
    for position, node in enumerate(graph.node):
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in ops:
            continue
        index = 0 if node.op_type == "Gather" else 1
        if len(node.input) <= index or node.input[index] not in weights:
            continue  # an activation, not a weight
        name = node.input[index]
        root = weights[name].name  # differs from `name` behind Identity nodes

        def skip(reason: str, node=node, name=name) -> None:
            skipped.append(
                {"name": name, "node": node.name, "op_type": node.op_type, "reason": reason}
            )

        if node.op_type in exclude_op_types:
            skip(f"op type {node.op_type} excluded")
            continue
        if include and not _matches(include, name, root, node.name):
            skip("not matched by an include pattern")
            continue
        if _matches(exclude, name, root, node.name):
            skip("matched by an exclude pattern")
            continue
        t = weights[name].tensor
        if len(t.dims) != 2:
            skip(f"weight is {len(t.dims)}-D (only 2-D weights are quantized)")
            continue
        if t.data_type not in _WEIGHT_TYPES:
            dtype = TensorProto.DataType.Name(t.data_type).lower()
            skip(f"weight type {dtype} (float32/float16/bfloat16 only)")
            continue
        if node.op_type == "Gemm":
            axis = 1 if _attr(node, "transB", 0) else 0
        elif node.op_type == "Gather":
            if _attr(node, "axis", 0) not in (0, -2):
                skip("Gather along axis 1 (only row lookups, axis 0, are quantized)")
                continue
            axis = 1
        else:
            axis = 0
        sites.append(_Site(node, position, index, root, axis))
    return sites


def _skip_subgraph_weights(
    graph: onnx.GraphProto, quantize_gather: bool, skipped: list[dict]
) -> None:
    """A "skipped" row for each MatMul/Gemm (Gather) in an If/Loop/Scan body reading a constant.

    Bodies are left float on purpose: their weights may live in the body or in any enclosing
    graph, and rewriting them (new initializers in the right scope, outer names kept
    resolvable) is not done here; the rest of the model is quantized as usual.
    """
    ops = [op for op in QUANTIZABLE_OPS if op != "Gather" or quantize_gather]

    def walk(g: onnx.GraphProto, visible: set[str], inside: bool) -> None:
        visible = visible | set(_weight_sources(g))
        for node in g.node:
            if inside and node.domain in _DEFAULT_DOMAINS and node.op_type in ops:
                index = 0 if node.op_type == "Gather" else 1
                if len(node.input) > index and node.input[index] in visible:
                    skipped.append(
                        {
                            "name": node.input[index],
                            "node": node.name,
                            "op_type": node.op_type,
                            "reason": f"inside a subgraph ({node.op_type} in an If/Loop/Scan "
                            "body is left float)",
                        }
                    )
            for sub in _subgraphs(node):
                walk(sub, visible, True)

    walk(graph, set(), False)


def _weight_array(w: _Weight) -> np.ndarray:
    t = w.tensor
    if t.data_location == TensorProto.EXTERNAL and _lazy_ref(t) is not None:
        return _read_external(t)
    if t.data_location == TensorProto.EXTERNAL:
        raise ValueError(
            f"tensor {w.name!r} has external data that is not loaded "
            "(onnx.load(..., load_external_data=True))"
        )
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:
        raise ValueError(f"tensor {w.name!r} cannot be read: {exc}") from None


# --------------------------------------------------------------------------------------------
# laying out a QuantizedTensor


def _with_scale_dtype(qt: QuantizedTensor, dtype: np.dtype) -> QuantizedTensor:
    """`qt` with its scales stored in `dtype` (the runtime's scale type = the weight's type).

    The codes stay; the QuantizedTensor returned is exactly what the runtime will compute with.
    ValueError if a scale does not survive the cast (0 or inf in float16).
    """
    if qt.scales.dtype == dtype:
        return qt
    with np.errstate(over="ignore", under="ignore"):
        scales = qt.scales.astype(dtype)
    s32 = scales.astype(np.float32)
    if not (np.isfinite(s32).all() and (s32 > 0).all()):
        raise ValueError(f"block scales do not fit in {np.dtype(dtype).name}")
    return dataclasses.replace(qt, scales=scales)


def _ort_view(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    """An int4_ort tensor as ORT stores it: (unsigned codes (rows, nb, bs), signed scales)."""
    from ..formats.integer import OrtInt4

    return OrtInt4.to_ort(qt.codes(), qt.scales, qt.zero_points)


def _int4_tensor(name: str, codes: np.ndarray, signed: bool) -> TensorProto:
    """INT4/UINT4 initializer: row-major codes, two per byte, low nibble first (ONNX layout)."""
    packed = pack_nibbles(np.ascontiguousarray(codes).reshape(-1))
    dtype = TensorProto.INT4 if signed else TensorProto.UINT4
    return helper.make_tensor(name, dtype, list(codes.shape), packed.tobytes(), raw=True)


def _nbits_tensors(qt: QuantizedTensor) -> list[tuple[str, TensorProto]]:
    """MatMulNBits' B, scales (and zero points) for `qt`, unnamed: (name suffix, tensor)."""
    n_rows, nb = qt.scales.shape
    if qt.format == "int4_ort":
        codes, scales = _ort_view(qt)
        packed = pack_nibbles(codes.reshape(n_rows, -1)).reshape(n_rows, nb, -1)
        return [
            ("_Q4", numpy_helper.from_array(packed)),
            ("_scales", numpy_helper.from_array(scales)),
        ]
    bits = qt.fmt.bits
    signed = qt.zero_points is None
    # symmetric codes are stored + 2^(bits-1), MatMulNBits' default zero point
    flip = np.uint8(0x88 if bits == 4 else 0x80)
    data = qt.data ^ flip if signed else qt.data
    out = [
        (f"_Q{bits}", numpy_helper.from_array(data.reshape(n_rows, nb, qt.block_size * bits // 8))),
        ("_scales", numpy_helper.from_array(qt.scales)),
    ]
    if not signed:
        zp = pack_nibbles(qt.zero_points) if bits == 4 else qt.zero_points
        out.append(("_zero_points", numpy_helper.from_array(zp)))
    return out


def _dq_tensors(qt: QuantizedTensor, axis: int) -> list[tuple[str, TensorProto]]:
    """DequantizeLinear's codes, scales (and zero points) for `qt` in the weight's own layout,
    unnamed: (name suffix, tensor)."""
    signed = qt.zero_points is None
    n = qt.shape[axis]
    codes = from_blocks(qt.codes(), n, axis)  # back in the weight's own layout
    scales = qt.scales_along_axis()
    if qt.format == "int4_ort":  # ORT's codes - 8 as INT4, its signed scales (legal)
        ort_codes, ort_scales = _ort_view(qt)
        codes = from_blocks(ort_codes.astype(np.int8) - 8, n, axis)
        scales = params_to_axis(ort_scales, axis)
        signed = True
    if qt.fmt.bits == 4:
        out = [("_Q4", _int4_tensor("", codes, signed))]
    else:
        out = [("_Q8", numpy_helper.from_array(np.ascontiguousarray(codes)))]
    out.append(("_scales", numpy_helper.from_array(np.ascontiguousarray(scales))))
    if not signed:
        zp = params_to_axis(qt.zero_points, axis)
        if qt.fmt.bits == 4:
            out.append(("_zero_points", _int4_tensor("", zp, signed=False)))
        else:
            out.append(("_zero_points", numpy_helper.from_array(np.ascontiguousarray(zp))))
    return out


class _Spill:
    """A temporary file that new initializers' bytes are moved to as they are made, so the
    quantized model is never held whole: each tensor keeps a lazy reference (as `load_model`
    lazy=True makes) and `save_model` copies the bytes into the output's data file."""

    def __init__(self, path: Path, f):
        self.path, self.f, self.pos = path.absolute(), f, 0

    def __call__(self, t: TensorProto) -> TensorProto:
        # below 1 KiB `_write_external` leaves a tensor inline: so does the spill
        if not t.HasField("raw_data") or len(t.raw_data) < 1024:
            return t
        length = len(t.raw_data)
        self.f.write(t.raw_data)
        t.ClearField("raw_data")
        # a new message: clearing a field does not free protobuf's arena, which goes with `t`
        light = TensorProto()
        light.CopyFrom(t)
        _set_external(light, self.path.name, self.pos, length)
        light.external_data.add(key=_LAZY_KEY, value=str(self.path))
        self.pos += length
        return light

    def put(self, a: np.ndarray) -> _Ref:
        """Append an array's bytes (mixed precision's candidates); `get` reads it back."""
        a = np.ascontiguousarray(a)
        self.f.write(a.reshape(-1).view(np.uint8).data)
        ref = _Ref(self.pos, a.dtype, a.shape)
        self.pos += a.nbytes
        return ref

    def get(self, ref: _Ref) -> np.ndarray:
        """An array `put` wrote, read from the file now into a new array."""
        if not self.f.closed:
            self.f.flush()
        a = np.empty(ref.shape, ref.dtype)
        with open(self.path, "rb") as f:
            f.seek(ref.offset)
            n = f.readinto(memoryview(a.reshape(-1).view(np.uint8)))
        if n != a.nbytes:
            raise ValueError(f"{self.path}: truncated (read {n} of {a.nbytes} bytes)")
        return a


class _Ref(NamedTuple):
    """Where `_Spill.put` wrote an array."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


def _shape_only(qt: QuantizedTensor) -> SimpleNamespace:
    """What the graph rewrite still reads of a tensor whose initializers are made."""
    return SimpleNamespace(
        shape=qt.shape,
        scales=np.broadcast_to(np.zeros((), qt.scales.dtype), qt.scales.shape),
        fmt=qt.fmt,
        block_size=qt.block_size,
        format=qt.format,
    )


class _Namer:
    def __init__(self, used: set[str]):
        self.used = used

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


# --------------------------------------------------------------------------------------------
# the public entry points


def quantize_onnx_model(
    model: onnx.ModelProto,
    *,
    format: str = "int4",
    block_size: int = 32,
    output: str = "matmulnbits",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    exclude_op_types: Iterable[str] = (),
    accuracy_level: int | None = None,
    quantize_gather: bool = False,
    method: str = "rtn",
    calib: Any = None,
    target_bits: float | None = None,
    calib_memory: int | None = CALIB_MEMORY,
    details: dict | None = None,
    progress: Callable[[str, int], None] | None = None,
    awq_check: bool = True,
) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of `model` with its MatMul/Gemm weights (and Gather tables) in 4 bits.

    format: "int4" (symmetric), "uint4" (zero point per block) or "int4_ort" (ORT's own
    symmetric rule and layout: signed scales, no zero points); block_size along K (for
    MatMulNBits a power of two >= 16); output: "matmulnbits" (ORT contrib op) or "qdq"
    (DequantizeLinear, opset 21). include/exclude: glob patterns matched against the weight's
    and the node's names; exclude_op_types: e.g. ["Gemm"]. accuracy_level: MatMulNBits'
    attribute (0-4; unset by default). quantize_gather: also quantize Gather embeddings.
    details: if a dict, gets "skipped" (what was not quantized and why) and "notes".
    progress: called as progress(weight name, number of weights) after each weight.

    method: how each weight's codes are chosen: "rtn" (round to nearest), "mse" / "hqq"
    (data-free parameter searches), or the calibrated "awq" (per-input-channel scales,
    searched on captured activations: the weight is multiplied by s and a Mul node by 1/s is
    put in front of its MatMul/Gemm, so the float model computes the same), "gptq"
    (error-compensating rounding with the Hessian X^T X of the captured activations; rows
    in decreasing activation order, block params from the mse search: `GPTQ_OPTIONS`) and
    "awq+gptq" (per weight, whichever of awq, gptq and gptq on awq's scaled weight against
    the Hessian of x / s has the smallest output error on the calibration activations; rows
    get "picked"). awq_check (awq and awq+gptq with calib data): quantize the model twice,
    with AWQ's weight-magnitude factor and with activation-only scales, and keep the model
    whose outputs on the calibration inputs are closer to the float model's (a note gives both
    errors; the second pass takes AWQ's search from the first, so it costs the capture of
    activations and the model's other work again). False: the weight factor, unchecked.
    calib: calibration inputs for the float model (see `calibration.calibration_feeds`): an
    .npz path or dict of arrays keyed by input name, first axis = samples, or a list of feed
    dicts; None: awq/gptq run on random inputs built from the model's input types (a note
    says so). With calib data every row also gets "output_error" (tr(D^T H D) / tr(W^T H W)
    on the calibration activations) and "output_error_rtn" (the same for round to nearest).
    target_bits: mixed precision: each weight gets one of the format at `block_size`, at a
    smaller block (32, or 16 if block_size <= 32) or 8 bits at `block_size`, chosen to keep
    the summed (output, or without calib weight) error smallest with the average bits per
    weight (scales included) at most `target_bits`; rows get "choice".
    calib_memory: bound, in bytes, on the calibration state held at once: a float64 K x K
    Hessian per activation (8 K^2 bytes: 0.9 GiB at K = 11008) plus, for AWQ, 4096 float32
    rows of it (16 K bytes). Above it, weights are calibrated in groups, one pass over the
    calibration inputs per group (a group of weights sharing one input is never split, so
    the peak is max(budget, the largest such group) plus one run's activations). None: one
    pass, everything at once. Default 2 GiB.

    Returns the new model and one `tensor_report` row per quantized tensor (with "op_types",
    "consumers", "kept_float" and "method"). ValueError if nothing can be quantized.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rows = _quantize_in_place(
        out,
        format=format,
        block_size=block_size,
        output=output,
        include=include,
        exclude=exclude,
        exclude_op_types=exclude_op_types,
        accuracy_level=accuracy_level,
        quantize_gather=quantize_gather,
        method=method,
        calib=calib,
        target_bits=target_bits,
        calib_memory=calib_memory,
        details=details,
        progress=progress,
        awq_check=awq_check,
    )
    return out, rows


def _check_args(format, block_size, output, accuracy_level, method="rtn", target_bits=None):
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if target_bits is not None:
        if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float, np.number)):
            raise TypeError(f"target_bits must be a number, got {target_bits!r}")
        if not (np.isfinite(target_bits) and target_bits > 0):
            raise ValueError(f"target_bits must be a number > 0, got {target_bits!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size must be an int, got {block_size!r}")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    if output == "matmulnbits" and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(
            f"block_size must be a power of two >= 16 for MatMulNBits, got {block_size}"
        )
    if accuracy_level is not None:
        if output != "matmulnbits":
            raise ValueError("accuracy_level applies to output 'matmulnbits' only")
        if isinstance(accuracy_level, bool) or accuracy_level not in range(5):
            raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level!r}")


# --------------------------------------------------------------------------------------------
# choosing the codes: methods, calibration, mixed precision


def _transposed(qt: QuantizedTensor) -> QuantizedTensor:
    """A 2-D (K, N) tensor quantized along axis 0, seen as its (N, K) transpose along axis 1.

    The stored layout (rows = N, blocks along K) is the same for both; only the recorded
    shape and axis change.
    """
    return dataclasses.replace(qt, shape=tuple(qt.shape[::-1]), axis=1 - qt.axis)


def _rel_error(
    w: np.ndarray, d: np.ndarray, h: np.ndarray | None, den: float | None = None
) -> float:
    """tr(D^T H D) / tr(W^T H W) for (K, N) weight W and error D; H = I without data.

    den: tr(W^T H W) when already known (`_rel_den`), saving a K x K x N product."""
    d64 = d.astype(np.float64)
    num = float(np.sum(d64 * d64)) if h is None else float(np.sum((h @ d64) * d64))
    if den is None:
        den = _rel_den(w, h)
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def _rel_den(w: np.ndarray, h: np.ndarray | None) -> float:
    """tr(W^T H W), `_rel_error`'s denominator."""
    w64 = w.astype(np.float64)
    return float(np.sum(w64 * w64)) if h is None else float(np.sum((h @ w64) * w64))


def _row(name: str, w: np.ndarray, qt: QuantizedTensor, recon: np.ndarray | None) -> dict:
    """A `tensor_report` row; `recon` (the weight's own layout) when it is not qt's dequant."""
    if recon is None:
        return tensor_report(name, w, qt)
    from ..report import error_stats

    row: dict[str, object] = {
        "name": name,
        "format": qt.format,
        "block_size": qt.block_size,
        "shape": list(w.shape),
        "bits_per_weight": qt.bits_per_weight,
    }
    row.update(error_stats(w, recon))
    return row


@dataclasses.dataclass
class _Choice:
    """One way to quantize a weight: the tensor as stored, and AWQ's 1/s if any."""

    qt: QuantizedTensor  # in the weight's own layout
    inv_scale: np.ndarray | None
    picked: str = ""  # the method that made it (awq+gptq keeps the best of three)
    rel_error: float | None = None  # `_rel_error` with the calibration H, when computed

    def recon_kn(self) -> np.ndarray:
        """What the runtime multiplies with, as a (K, N) float32 array (made when asked)."""
        qt = self.qt if self.qt.axis == 0 else _transposed(self.qt)
        recon = qt.dequantize(np.float32)
        return recon if self.inv_scale is None else recon * self.inv_scale[:, None]


@dataclasses.dataclass
class _Stashed:
    """A `_Choice` whose arrays (codes, scales, zero points, AWQ's 1/s) wait in a spill file:
    mixed precision keeps every option of every weight until the budget picks, and holding
    them would cost about half the float model (benchmarks/big_onnx.md)."""

    spill: _Spill
    fields: dict[str, Any]  # the QuantizedTensor's fields, each array as a `_Ref`
    inv_scale: _Ref | None
    picked: str
    rel_error: float | None

    @classmethod
    def put(cls, spill: _Spill, c: _Choice) -> _Stashed:
        """Write c's arrays to `spill` (the caller closes it) and keep the rest."""
        fields = {}
        for f in dataclasses.fields(c.qt):
            v = getattr(c.qt, f.name)
            fields[f.name] = spill.put(v) if isinstance(v, np.ndarray) else v
        inv = None if c.inv_scale is None else spill.put(c.inv_scale)
        return cls(spill, fields, inv, c.picked, c.rel_error)

    def load(self) -> _Choice:
        """The choice as it was made, its arrays read back."""
        get = self.spill.get
        fields = {k: get(v) if isinstance(v, _Ref) else v for k, v in self.fields.items()}
        inv = None if self.inv_scale is None else get(self.inv_scale)
        return _Choice(QuantizedTensor(**fields), inv, self.picked, self.rel_error)


def _stash_choices(folder: Path, index: int, choices: dict[str, _Choice]) -> dict[str, _Stashed]:
    """Every option of one weight moved to its own file in `folder` (deleted once it is
    chosen); what stays in memory is offsets and the small fields."""
    path = folder / f"{index}.bin"
    with open(path, "wb") as f:
        spill = _Spill(path, f)
        return {label: _Stashed.put(spill, c) for label, c in choices.items()}


def _activation_sources(sites: list[_Site]) -> dict[tuple[str, int], list[tuple[str, bool]]]:
    """(weight, axis) -> the activations (name, transposed) its MatMul/Gemm readers multiply."""
    acts: dict[tuple[str, int], list[tuple[str, bool]]] = {}
    for s in sites:
        if s.node.op_type in ("MatMul", "Gemm"):
            t = bool(s.node.op_type == "Gemm" and _attr(s.node, "transA", 0))
            entry = (s.node.input[0], t)
            acts.setdefault((s.weight, s.axis), [])
            if entry not in acts[(s.weight, s.axis)]:
                acts[(s.weight, s.axis)].append(entry)
    return acts


def _capture_groups(
    keys: list[tuple[str, int]],
    acts: dict[tuple[str, int], list[tuple[str, bool]]],
    cost: dict[str, int],
    budget: int | None,
) -> list[list[tuple[str, int]]]:
    """Keys cut into groups whose activations' captured state fits `budget` bytes together.

    Weights that read a common activation stay in one group (it is captured once for them);
    such a cluster above the budget is a group of its own. budget None: one group.
    """
    if budget is None:
        return [list(keys)] if keys else []
    clusters: list[list[tuple[str, int]]] = []
    where: dict[str, int] = {}
    for key in keys:  # union of keys sharing an activation, in first-seen order
        hits = sorted({where[n] for n, _ in acts.get(key, []) if n in where})
        if not hits:
            clusters.append([key])
            idx = len(clusters) - 1
        else:
            idx = hits[0]
            clusters[idx].append(key)
            for j in hits[1:]:
                clusters[idx].extend(clusters[j])
                clusters[j] = []
                for n, c in where.items():
                    if c == j:
                        where[n] = idx
        for n, _ in acts.get(key, []):
            where[n] = idx
    groups: list[list[tuple[str, int]]] = []
    used = 0
    for cl in clusters:
        if not cl:
            continue
        names = {n for key in cl for n, _ in acts.get(key, [])}
        size = sum(cost.get(n, 0) for n in names)
        if groups and used + size <= budget:
            groups[-1].extend(cl)
            used += size
        else:
            groups.append(list(cl))
            used = size
    return groups


def _written_bits(qt: QuantizedTensor, output: str, inv_scale: np.ndarray | None) -> float:
    """Bits per weight as the writer stores `qt`: what `target_bits` budgets. MatMulNBits pads
    each row's zero points to whole bytes; QDQ packs codes and zero points over the whole
    tensor without block padding; AWQ's 1/s vector (float32, one per input) counts too."""
    rows, nb = qt.scales.shape
    bits = qt.fmt.bits
    # int4_ort's zero points only carry the scale's sign: written as signed scales instead
    no_zp = qt.zero_points is None or qt.format == "int4_ort"
    if output == "matmulnbits":
        data = qt.data.nbytes
        zp = 0 if no_zp else rows * (-(-nb * bits // 8))
    else:
        data = -(-qt.size * bits // 8)
        zp = 0 if no_zp else -(-rows * nb * bits // 8)
    extra = 0 if inv_scale is None else 4 * inv_scale.size
    return 8 * (data + qt.scales.nbytes + zp + extra) / qt.size


def _quantize_weights(
    model: onnx.ModelProto,
    sites: list[_Site],
    weights: dict[str, _Weight],
    *,
    format: str,
    block_size: int,
    output: str,
    method: str,
    calib: Any,
    target_bits: float | None,
    skipped: list[dict],
    notes: list[str],
    calib_memory: int | None = None,
    progress: Callable[[str, int], None] | None = None,
    keep: Callable[[tuple[str, int], QuantizedTensor], Any] | None = None,
    scratch: str | os.PathLike | None = None,
    awq: _AwqFamily | None = None,
) -> tuple[dict, dict, dict]:
    """(quantized tensors, report rows, AWQ 1/s), each keyed by (weight, axis).

    keep(key, qt), if given, is what is held for a weight once its tensor is chosen (the
    writer lays it out and spills it to disk, so the quantized model is not held whole).
    Without target_bits each weight is chosen as soon as it is quantized; with it, every
    option's arrays go to a temporary folder in `scratch` (None: the system's) until the
    budget picks, with only their written bits and errors in memory; the chosen ones are read
    back and the folder is deleted whatever happens.
    Calibration state (a float64 K x K Hessian and up to AWQ_SAMPLES float32 rows of K per
    activation) is captured for groups of weights whose state fits `calib_memory` bytes, one
    pass over the calibration inputs per group; each group's weights are quantized, and its
    state dropped, before the next group is captured.
    """
    from ..algorithms import get_method

    if method not in CALIBRATED_METHODS:
        get_method(method)  # unknown (not registered) data-free methods fail early
    acts = _activation_sources(sites)
    want_h = method in ("gptq", "awq+gptq") or target_bits is not None or calib is not None
    want_x = method in ("awq", "awq+gptq")
    n_samples = AWQ_SAMPLES if want_x else 0
    calibrated = (calib is not None or method in CALIBRATED_METHODS) and bool(acts)
    calibrated = calibrated and (want_h or want_x)
    names: list[str] = []
    flips: set[str] = set()
    feeds: list = []
    if calibrated:
        from .calibration import calibration_feeds

        names = list(dict.fromkeys(n for entries in acts.values() for n, _ in entries))
        flips = {n for entries in acts.values() for n, t in entries if t}
        both = flips & {n for entries in acts.values() for n, t in entries if not t}
        if both:  # read straight and transposed: not worth the bookkeeping, use neither
            names = [n for n in names if n not in both]
            flips -= both
            notes.append(f"no calibration for weights reading {sorted(both)} transposed too")
        feeds = calibration_feeds(model, calib)
        if calib is None:
            notes.append(
                f"{method}: no calibration data given; calibrated on {len(feeds)} random input "
                "sets built from the model's input types (pass calib for real activations)"
            )

    eight = EIGHT_BIT[format]
    small = 32 if block_size > 32 else 16
    if target_bits is not None:
        options = [(format, block_size), (format, small), (eight, block_size)]
        if output == "matmulnbits" and small == block_size:
            options = [options[0], options[2]]
    else:
        options = [(format, block_size)]

    keys = list(dict.fromkeys((s.weight, s.axis) for s in sites))
    node_of = {}
    for s in sites:
        node_of.setdefault((s.weight, s.axis), s.node)
    # what one activation's captured state costs: K from the weight that reads it
    cost: dict[str, int] = {}
    for key in keys:
        k = int(weights[key[0]].tensor.dims[key[1]])
        for n, _ in acts.get(key, []):
            cost[n] = max(cost.get(n, 0), (8 * k * k if want_h else 0) + 4 * k * n_samples)
    groups = _capture_groups(keys, acts, cost, calib_memory if calibrated else None)
    if calibrated and len(groups) > 1:
        notes.append(
            f"calibration state above the memory budget ({calib_memory / 2**20:.0f} MiB): "
            f"captured in {len(groups)} passes over the calibration inputs"
        )

    quantized: dict[tuple[str, int], QuantizedTensor] = {}
    rows: dict[tuple[str, int], dict] = {}
    awq_scales: dict[tuple[str, int], np.ndarray] = {}
    plans: dict[tuple[str, int], dict] = {}

    def finish(key, plan: dict, label: str) -> None:
        """Record option `label` of a weight: its tensor (or what `keep` makes of it), AWQ's
        1/s and the report row; the options not taken go."""
        c = plan["choices"][label]
        plan["choices"] = None
        if isinstance(c, _Stashed):
            path = c.spill.path
            c = c.load()
            path.unlink()  # the other options' bytes go with it
        w = _weight_array(weights[key[0]])
        if c.inv_scale is not None:
            awq_scales[key] = c.inv_scale
        recon = None
        if c.inv_scale is not None:
            recon_kn = c.recon_kn()
            recon = recon_kn if key[1] == 0 else recon_kn.T
        row = _row(key[0], w, c.qt, recon)
        row["bytes_before"], row["bytes_after"] = int(w.nbytes), int(c.qt.nbytes)
        if c.qt.format == "int4_ort":  # written without zero points (signed scales instead)
            row["bytes_after"] -= c.qt._zero_point_bytes()
        if c.inv_scale is not None:  # AWQ's 1/s is stored too
            row["bytes_after"] += int(c.inv_scale.size * w.dtype.itemsize)
        row["method"] = plan["method"]
        if plan["method"] == "awq+gptq":
            row["picked"] = c.picked
        if target_bits is not None:
            row["choice"] = label
        if label in plan["output_error"]:
            row["output_error"], row["output_error_rtn"] = plan["output_error"][label]
        rows[key] = row
        quantized[key] = c.qt if keep is None else keep(key, c.qt)

    folder = None
    if target_bits is not None:
        folder = Path(tempfile.mkdtemp(prefix=".quantize-mixed.", suffix=".tmp", dir=scratch))
    try:
        for group in groups:
            captured: dict[str, Any] = {}
            if calibrated:
                from .calibration import capture_activations

                wanted = set()
                for key in group:
                    wanted.update(n for n, _ in acts.get(key, []))
                group_names = [n for n in names if n in wanted]
                if group_names:
                    captured = capture_activations(
                        model,
                        group_names,
                        feeds,
                        transposed=flips & set(group_names),
                        hessian=want_h,
                        max_samples=n_samples,
                    )
            for key in group:
                plan = _plan_weight(
                    key,
                    node_of[key],
                    weights,
                    acts,
                    captured,
                    options,
                    method=method,
                    want_h=want_h,
                    want_x=want_x,
                    target_bits=target_bits,
                    skipped=skipped,
                    notes=notes,
                    awq=awq,
                )
                if plan is not None:
                    if target_bits is None:  # one option: final now, nothing held but its row
                        finish(key, plan, next(iter(plan["choices"])))
                    else:  # what planning needs stays; the arrays wait on disk
                        choices = plan["choices"]
                        plan["bits"] = {
                            lb: _written_bits(c.qt, output, c.inv_scale)
                            for lb, c in choices.items()
                        }
                        plan["choices"] = _stash_choices(folder, len(plans), choices)
                        del choices
                        plans[key] = plan
                if progress is not None:
                    progress(key[0], len(keys))
            del captured

        if not plans:
            return quantized, rows, awq_scales

        if target_bits is not None:
            from ..algorithms.mixed import LayerChoice, plan_mixed

            layers = []
            for i, plan in enumerate(plans.values()):
                opts = [
                    (label, plan["bits"][label], plan["errors"][label])
                    for label in plan["choices"]
                ]
                layers.append(LayerChoice(str(i), int(plan["n"]), opts))
            picked = plan_mixed(layers, float(target_bits))
            chosen = {key: picked[str(i)] for i, key in enumerate(plans)}
        for key, plan in plans.items():
            finish(key, plan, chosen[key])
        return quantized, rows, awq_scales
    finally:
        if folder is not None:  # on success, failure and KeyboardInterrupt alike
            shutil.rmtree(folder, ignore_errors=True)


def _plan_weight(
    key,
    node,
    weights,
    acts,
    captured,
    options,
    *,
    method,
    want_h,
    want_x,
    target_bits,
    skipped,
    notes,
    awq: _AwqFamily | None = None,
) -> dict | None:
    """Quantize one weight every way in `options`, with its output errors while H is at hand."""
    name, axis = key
    w = _weight_array(weights[name])
    k = w.shape[axis]
    h = x = None
    sources = [captured[n] for n, _ in acts.get(key, []) if n in captured]
    if sources and len(sources) == len(acts.get(key, [])):
        if any(a.k != k for a in sources):
            notes.append(f"{name}: activation width differs from K={k}; no data")
            sources = []
    else:
        sources = []
    if sources and want_h:
        h = sum(a.hessian for a in sources)
    if sources and want_x:
        x = np.concatenate([a.samples for a in sources])
    own = method
    if (want_h and h is None and method in ("gptq", "awq+gptq")) or (
        want_x and x is None and method in ("awq", "awq+gptq")
    ):
        own = "rtn"
        if node.op_type != "Gather":
            notes.append(f"{name}: no activations captured; {method} -> rtn")
    try:
        choices = {
            f"{f}/b{b}": _quantize_one(w, axis, f, b, own, h, x, awq, key) for f, b in options
        }
    except ValueError as exc:
        skipped.append(
            {"name": name, "node": node.name, "op_type": node.op_type, "reason": str(exc)}
        )
        return None
    w_kn = w if axis == 0 else w.T
    # shared by every error below (the same value each would compute); data-free: none asked
    den = _rel_den(w_kn, h) if target_bits is not None or h is not None else None

    def error(c: _Choice) -> float:
        if c.rel_error is not None and h is not None:  # awq+gptq measured it already
            return c.rel_error
        return _rel_error(w_kn, c.recon_kn() - w_kn, h, den)

    errors = {}
    if target_bits is not None:  # the option's error now, while w and H are at hand
        errors = {lb: error(c) for lb, c in choices.items()}
    output_error = {}
    if h is not None:  # (own method's, round to nearest's) relative output error per option
        for lb, c in choices.items():
            err = errors[lb] if lb in errors else error(c)
            if own == "rtn":
                ref = err
            else:
                f, b = lb.split("/b")
                r = _quantize_one(w, axis, f, int(b), "rtn", None, None)
                ref = _rel_error(w_kn, r.recon_kn() - w_kn, h, den)
            output_error[lb] = (err, ref)
    return {
        "method": own,
        "choices": choices,
        "errors": errors,
        "output_error": output_error,
        "n": w.size,
    }


#: GPTQ as the ONNX path runs it: rows in decreasing-activation order with every group's
#: params fixed up front by the mse search (act_order implies static groups, so the layout is
#: the standard one). On all-MiniLM-L6-v2 (uint4, block 32) this took the output cosine from
#: 0.9835 (natural order, rtn params) to 0.9867 and ran 2-5x faster (no per-group searches
#: while rows are being updated); see benchmarks/methods_real_models.md.
GPTQ_OPTIONS = {"act_order": True, "method": "mse"}


def _gptq(w_kn: np.ndarray, h: np.ndarray, format: str, block_size: int) -> QuantizedTensor:
    from ..algorithms.gptq import gptq_quantize

    return gptq_quantize(w_kn.astype(np.float32), h, format, block_size, **GPTQ_OPTIONS)


@dataclasses.dataclass
class _AwqFamily:
    """One pass of `_quantize_in_place`'s AWQ check: the weight factor's betas to search, and
    the activation-only results of every weight, which the weight-factor pass records (its
    search scores their candidates anyway: `awq_scan(activation_only=True)`) and the
    activation-only pass takes instead of searching again, the same bytes."""

    powers: tuple
    record: bool
    #: (weight, axis, format, block size) -> (s, quantized) of the activation-only search
    shared: dict = dataclasses.field(default_factory=dict)


def _awq(
    w_kn, x, format, block_size, family: _AwqFamily | None = None, key=None
) -> tuple[np.ndarray, QuantizedTensor]:
    """AWQ's scales s for w_kn (K, N) and the scaled weight quantized plainly; family: the
    check's pass (None: awq_scan's own betas), key: the weight's (name, axis) in it."""
    from ..algorithms.awq import awq_apply, awq_scan

    def result(res) -> tuple[np.ndarray, QuantizedTensor]:
        s = np.asarray(res.scales, np.float32)
        # the search quantized awq_apply(w32, s) this very way already
        qt = res.quantized
        if qt is None:
            qt = quantize_tensor(awq_apply(w32, s), format, block_size, axis=0)
        return s, qt

    w32 = w_kn.astype(np.float32)
    shared_key = (key, format, block_size)
    if family is not None and not family.record and shared_key in family.shared:
        return family.shared.pop(shared_key)
    kw = {} if family is None else {"weight_powers": family.powers}
    record = family is not None and family.record and key is not None
    res = awq_scan(w32, x, format, block_size, activation_only=record, **kw)
    if record:
        family.shared[shared_key] = result(res.activation_only)
    return result(res)


def _awq_gptq(w_kn, s, h, format, block_size) -> QuantizedTensor:
    """GPTQ of diag(s) W against the Hessian of the scaled input x / s: S^-1 H S^-1."""
    from ..algorithms.awq import awq_apply

    s64 = s.astype(np.float64)
    h_s = h / s64[:, None] / s64[None, :]
    return _gptq(awq_apply(w_kn.astype(np.float32), s), h_s, format, block_size)


def _quantize_one(
    w: np.ndarray,
    axis: int,
    format: str,
    block_size: int,
    method: str,
    h: np.ndarray | None,
    x: np.ndarray | None,
    awq: _AwqFamily | None = None,
    key: tuple[str, int] | None = None,
) -> _Choice:
    """Quantize one 2-D weight (blocks along `axis`) with `method`; scales in w's dtype. awq,
    key: the AWQ check's pass and the weight's (name, axis) (`_AwqFamily`).

    "awq+gptq" tries AWQ, GPTQ and GPTQ on AWQ's scaled weight and keeps whichever has the
    smallest output error tr(D^T H D) on the calibration activations (so, on those, it is
    never worse than either alone); `_Choice.picked` says which.
    """
    w_kn = w if axis == 0 else w.T

    def finish(qt: QuantizedTensor, inv: np.ndarray | None, picked: str) -> _Choice:
        if qt.shape != w_kn.shape:
            raise ValueError(f"{method} returned shape {qt.shape}, expected {w_kn.shape}")
        qt = _with_scale_dtype(qt, w.dtype)
        return _Choice(_transposed(qt) if axis == 1 else qt, inv, picked)

    if method == "gptq":
        return finish(_gptq(w_kn, h, format, block_size), None, "gptq")
    if method == "awq":
        s, qt = _awq(w_kn, x, format, block_size, awq, key)
        return finish(qt, (1.0 / s).astype(np.float32), "awq")
    if method == "awq+gptq":
        s, qt = _awq(w_kn, x, format, block_size, awq, key)
        inv = (1.0 / s).astype(np.float32)
        tried = [
            finish(qt, inv, "awq"),
            finish(_gptq(w_kn, h, format, block_size), None, "gptq"),
            finish(_awq_gptq(w_kn, s, h, format, block_size), inv, "awq+gptq"),
        ]
        den = _rel_den(w_kn, h)
        errs = [_rel_error(w_kn, c.recon_kn() - w_kn, h, den) for c in tried]
        best = tried[int(np.argmin(errs))]  # ties keep the earlier (simpler) one
        return dataclasses.replace(best, rel_error=errs[int(np.argmin(errs))])
    qt = quantize_tensor(w, format, block_size, axis=axis, method=method)
    return finish(_transposed(qt) if axis == 1 else qt, None, method)


def _quantize_in_place(
    model: onnx.ModelProto,
    *,
    method: str = "rtn",
    calib: Any = None,
    details: dict | None = None,
    spill: _Spill | None = None,
    awq_check: bool = True,
    **options,
) -> list[dict]:
    """quantize_onnx_model's work on `model` itself (`_quantize_pass`), with AWQ's scale family
    chosen on the whole model (`awq_check`)."""
    if not isinstance(awq_check, (bool, np.bool_)):
        raise TypeError(f"awq_check must be True or False, got {awq_check!r}")
    wanted = (
        awq_check
        and isinstance(method, str)
        and method.lower() in ("awq", "awq+gptq")
        and calib is not None
    )
    if not wanted or spill is not None:
        rows = _quantize_pass(
            model, method=method, calib=calib, details=details, spill=spill, **options
        )
        if wanted and details is not None:  # only the spill stopped it
            details["notes"].append(
                f"{method}: AWQ's weight factor kept unchecked (the whole-model check is "
                "skipped for external-data models, which are not held in memory twice)"
            )
        return rows
    from ..algorithms.awq import WEIGHT_POWERS
    from .calibration import calibration_feeds, output_errors

    float_model = onnx.ModelProto()
    float_model.CopyFrom(model)
    progress = options.pop("progress", None)
    runs = []
    first = _AwqFamily(tuple(WEIGHT_POWERS), record=True)
    second = _AwqFamily((0.0,), record=False, shared=first.shared)
    for family, tag in ((first, "weight factor"), (second, "activation-only")):
        m = model if not runs else onnx.ModelProto()
        if runs:
            m.CopyFrom(float_model)
        d: dict = {}
        step = None
        if progress is not None:  # one bar over both passes

            def step(name: str, total: int, tag: str = tag) -> None:
                progress(f"{name} ({tag})", 2 * total)

        rows = _quantize_pass(
            m, method=method, calib=calib, details=d, awq=family, progress=step, **options
        )
        runs.append((m, rows, d))
    feeds = calibration_feeds(float_model, calib)
    errors = output_errors(float_model, [m for m, _, _ in runs], feeds)
    best = int(np.argmin(errors))  # ties keep the weight factor (the first)
    m, rows, d = runs[best]
    if best:
        model.CopyFrom(m)
    names = ("with the weight factor", "activation-only")
    d.setdefault("notes", []).append(
        f"{method}: AWQ scales {names[best]} kept: calibration output error "
        f"{errors[0]:.3g} with the weight factor, {errors[1]:.3g} activation-only"
    )
    if details is not None:
        details.update(d)
    return rows


def _quantize_pass(
    model: onnx.ModelProto,
    *,
    format: str = "int4",
    block_size: int = 32,
    output: str = "matmulnbits",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    exclude_op_types: Iterable[str] = (),
    accuracy_level: int | None = None,
    quantize_gather: bool = False,
    method: str = "rtn",
    calib: Any = None,
    target_bits: float | None = None,
    calib_memory: int | None = CALIB_MEMORY,
    details: dict | None = None,
    progress: Callable[[str, int], None] | None = None,
    spill: _Spill | None = None,
    scratch: str | os.PathLike | None = None,
    awq: _AwqFamily | None = None,
) -> list[dict]:
    """quantize_onnx_model's work on `model` itself, one way. awq: the AWQ check's pass (None:
    AWQ's own betas, `awq.WEIGHT_POWERS`). spill: each weight's new initializers are
    laid out as soon as its tensor is chosen and their bytes moved to that file. scratch: the
    folder for mixed precision's candidates (None: the spill file's, else the system's)."""
    _check_args(format, block_size, output, accuracy_level, method, target_bits)
    if calib_memory is not None:
        if isinstance(calib_memory, bool) or not isinstance(calib_memory, (int, np.integer)):
            raise TypeError(f"calib_memory must be an int (bytes) or None, got {calib_memory!r}")
        if calib_memory <= 0:
            raise ValueError(f"calib_memory must be > 0 bytes, got {calib_memory}")
    method = method.lower()
    exclude_op_types = set(exclude_op_types or ())
    skipped: list[dict] = []
    notes: list[str] = []
    if details is not None:
        details["skipped"] = skipped
        details["notes"] = notes

    def find() -> list[_Site]:
        skipped.clear()
        found = _find_sites(
            model.graph,
            _weight_sources(model.graph),
            include=include,
            exclude=exclude,
            exclude_op_types=exclude_op_types,
            quantize_gather=quantize_gather,
            skipped=skipped,
        )
        _skip_subgraph_weights(model.graph, quantize_gather, skipped)
        return found

    sites = find()
    if not sites:
        raise ValueError(
            "no quantizable weights: no MatMul/Gemm"
            + ("/Gather" if quantize_gather else "")
            + " node reads a constant 2-D float weight"
            + (f" ({len(skipped)} skipped: {skipped[0]['reason']}, ...)" if skipped else "")
        )
    if output == "qdq" or any(s.node.op_type == "Gather" for s in sites):
        note = ensure_opset(model, QDQ_OPSET)
        if note:
            notes.append(note)
            sites = find()  # the converter made new node objects

    graph = model.graph
    weights = _weight_sources(graph)
    namer = _Namer(_all_names(model))

    # what each weight becomes: MatMulNBits inputs and/or a DequantizeLinear's
    needs: dict[tuple[str, int], set[str]] = {}
    for s in sites:
        kind = "dq" if output == "qdq" or s.node.op_type == "Gather" else "nbits"
        needs.setdefault((s.weight, s.axis), set()).add(kind)
    # with a spill file, each weight's initializers are made (unnamed: names are given in node
    # order below, as without it) and their bytes spilled as soon as its tensor is chosen, so
    # the quantized model is not held whole until it is written (benchmarks/big_onnx.md)
    prepared: dict[tuple[str, int], dict[str, list[tuple[str, TensorProto]]]] = {}

    def keep(key, qt: QuantizedTensor) -> Any:
        made_now = {}
        for kind in sorted(needs[key]):
            pairs = _nbits_tensors(qt) if kind == "nbits" else _dq_tensors(qt, key[1])
            made_now[kind] = [(suffix, spill(t)) for suffix, t in pairs]
        prepared[key] = made_now
        return _shape_only(qt)

    # quantize each (weight, axis) once
    quantized, rows, awq_scales = _quantize_weights(
        model,
        sites,
        weights,
        format=format,
        block_size=block_size,
        output=output,
        method=method,
        calib=calib,
        target_bits=target_bits,
        skipped=skipped,
        notes=notes,
        calib_memory=calib_memory,
        progress=progress,
        keep=None if spill is None else keep,
        scratch=scratch if scratch is not None or spill is None else spill.path.parent,
        awq=awq,
    )
    sites = [s for s in sites if (s.weight, s.axis) in quantized]
    if not sites:
        raise ValueError("no quantizable weights: " + "; ".join(s["reason"] for s in skipped))

    # what each quantized weight becomes: names of new initializers / DQ outputs, made lazily
    new_inits: list[TensorProto] = []
    nbits_inputs: dict[tuple[str, int], list[str]] = {}
    dq_outputs: dict[tuple[str, int], str] = {}
    pending_dq: dict[tuple[str, int], onnx.NodeProto] = {}
    # once a weight's initializers are made, only its shape and types are needed: the codes
    # and scales are dropped so they are not held twice (memory: see benchmarks/big_onnx.md)

    def made(key, kind: str) -> None:
        needs[key].discard(kind)
        if not needs[key]:
            quantized[key] = _shape_only(quantized[key])

    def tensors_for(key, kind: str) -> list[tuple[str, TensorProto]]:
        if kind in prepared.get(key, {}):
            return prepared[key].pop(kind)
        qt = quantized[key]
        return _nbits_tensors(qt) if kind == "nbits" else _dq_tensors(qt, key[1])

    def nbits_for(key) -> list[str]:
        if key not in nbits_inputs:
            names = []
            for suffix, t in tensors_for(key, "nbits"):
                t.name = namer(f"{key[0]}{suffix}")
                new_inits.append(t)
                names.append(t.name)
            nbits_inputs[key] = names
            made(key, "nbits")
        return nbits_inputs[key]

    def dq_for(key) -> str:
        if key not in dq_outputs:
            name, axis = key
            inputs = []
            for suffix, t in tensors_for(key, "dq"):
                t.name = namer(f"{name}{suffix}")
                new_inits.append(t)
                inputs.append(t.name)
            dq_outputs[key] = namer(f"{name}_DQ")
            pending_dq[key] = helper.make_node(
                "DequantizeLinear",
                inputs,
                [dq_outputs[key]],
                name=namer(f"{name}_DequantizeLinear"),
                axis=axis,
                block_size=quantized[key].block_size,
            )
            made(key, "dq")
        return dq_outputs[key]

    def scalar(value: float, dtype: np.dtype, base: str) -> str:
        t = numpy_helper.from_array(np.array(value, dtype=dtype), namer(base))
        new_inits.append(t)
        return t.name

    def matmulnbits(node: onnx.NodeProto, a: str, key, out: str) -> onnx.NodeProto:
        qt = quantized[key]
        attrs = {
            "K": qt.shape[key[1]],
            "N": qt.scales.shape[0],
            "bits": qt.fmt.bits,
            "block_size": qt.block_size,
        }
        if accuracy_level is not None:
            attrs["accuracy_level"] = accuracy_level
        return helper.make_node(
            "MatMulNBits",
            [a, *nbits_for(key)],
            [out],
            name=namer(f"{node.name or key[0]}_Q{qt.fmt.bits}"),
            domain=MS_DOMAIN,
            **attrs,
        )

    def input_scale(site: _Site) -> tuple[list[onnx.NodeProto], str]:
        """AWQ: the activation times 1/s, in a Mul of its own (nothing else reads it)."""
        node, key = site.node, (site.weight, site.axis)
        a = node.input[0]
        if key not in awq_scales:
            return [], a
        inv = awq_scales[key]
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            inv = inv[:, None]  # A is (K, M): scale its rows
        dtype = quantized[key].scales.dtype
        t = numpy_helper.from_array(inv.astype(dtype), namer(f"{site.weight}_awq_inv_scale"))
        new_inits.append(t)
        out = namer(f"{a}_awq_{site.weight}")
        base = node.name or site.weight
        mul = helper.make_node("Mul", [a, t.name], [out], name=namer(f"{base}_awq_mul"))
        return [mul], out

    def rewrite(site: _Site) -> list[onnx.NodeProto]:
        node, key = site.node, (site.weight, site.axis)
        pre, a = input_scale(site)
        if output == "qdq" or node.op_type == "Gather":
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.input[site.index] = dq_for(key)
            if pre:
                new.input[0] = a
            return [*pre, new]
        if node.op_type == "MatMul":
            return [*pre, matmulnbits(node, a, key, node.output[0])]
        # Gemm: Y = alpha * A' @ B' + beta * C, spelled out around MatMulNBits
        dtype = quantized[key].scales.dtype
        alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
        c = node.input[2] if len(node.input) > 2 and node.input[2] and beta != 0 else None
        y = node.output[0]
        base = node.name or y
        nodes = pre
        if _attr(node, "transA", 0):
            t = namer(f"{base}_A_T")
            nodes.append(
                helper.make_node("Transpose", [a], [t], name=namer(f"{base}_transA"), perm=[1, 0])
            )
            a = t
        last = namer(f"{base}_matmul") if alpha != 1 or c else y
        nodes.append(matmulnbits(node, a, key, last))
        if alpha != 1:
            out = namer(f"{base}_alpha") if c else y
            nodes.append(
                helper.make_node(
                    "Mul",
                    [last, scalar(alpha, dtype, f"{base}_alpha_value")],
                    [out],
                    name=namer(f"{base}_mul_alpha"),
                )
            )
            last = out
        if c:
            if beta != 1:
                cb = namer(f"{base}_beta_C")
                nodes.append(
                    helper.make_node(
                        "Mul",
                        [c, scalar(beta, dtype, f"{base}_beta_value")],
                        [cb],
                        name=namer(f"{base}_mul_beta"),
                    )
                )
                c = cb
            nodes.append(helper.make_node("Add", [last, c], [y], name=namer(f"{base}_add_C")))
        return nodes

    # rebuild the node list
    by_position = {s.position: s for s in sites}
    new_nodes: list[onnx.NodeProto] = []
    for position, node in enumerate(graph.node):
        site = by_position.get(position)
        if site is not None:
            replacement = rewrite(site)
            key = (site.weight, site.axis)
            if key in pending_dq:
                new_nodes.append(pending_dq.pop(key))
            new_nodes.extend(replacement)
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    gone = _drop_dead_weights(graph, {s.weight for s in sites}, weights)

    # drop float weights nobody reads any more
    kept = [t for t in graph.initializer if t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new_inits])

    if model.ir_version < 4:  # IR < 4 wants every initializer listed as a graph input
        notes.append(f"IR version {model.ir_version} -> 4 (initializers need not be inputs)")
        model.ir_version = 4
    if nbits_inputs and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))

    result = []
    for key, row in rows.items():
        consumers = [s for s in sites if (s.weight, s.axis) == key]
        row["op_types"] = sorted({s.node.op_type for s in consumers})
        row["consumers"] = len(consumers)
        row["kept_float"] = key[0] not in gone
        kinds = {"qdq" if output == "qdq" or op == "Gather" else output for op in row["op_types"]}
        row["output"] = "+".join(sorted(kinds))
        result.append(row)
    for name in sorted({k[0] for k in rows} - gone):
        notes.append(f"{name}: the float weight is kept too (other nodes still read it)")
    return result


def _drop_dead_weights(
    graph: onnx.GraphProto, roots: set[str], weights: dict[str, _Weight]
) -> set[str]:
    """Remove the quantized weights' float constants, and Identity nodes passing them on, that
    nothing reads any more (subgraphs and graph outputs count as readers).

    Only those are touched; anything else unused stays as the model had it. Returns the names
    of the roots removed (their initializers are left for the caller to drop)."""
    uses = _use_counts(graph)
    aliases = {n for n, w in weights.items() if w.name in roots and n != w.name}
    dead: set[str] = set()  # names of outputs/constants that go
    changed = True
    while changed:  # an Identity chain dies from its far end back to the constant
        changed = False
        for node in graph.node:
            out = node.output[0] if node.output else ""
            if (
                out in aliases
                and out not in dead
                and node.op_type == "Identity"
                and uses.get(out, 0) == 0
            ):
                dead.add(out)
                uses[node.input[0]] = uses.get(node.input[0], 0) - 1
                changed = True
    gone = {r for r in roots if uses.get(r, 0) <= 0}
    dead |= gone
    keep = [
        n
        for n in graph.node
        if not (
            n.output
            and n.output[0] in dead
            and (n.op_type == "Identity" or n.op_type == "Constant")
        )
    ]
    del graph.node[:]
    graph.node.extend(keep)
    for field in (graph.input, graph.value_info):
        left = [v for v in field if v.name not in dead]
        del field[:]
        field.extend(left)
    return gone


# --------------------------------------------------------------------------------------------
# files


def _tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor that holds data: initializers and tensor attributes, subgraphs included."""
    for g in _all_graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors


def _external_files(model: onnx.ModelProto, base: Path) -> set[Path]:
    files = set()
    for t in _tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if isinstance(loc, bytes):  # protobuf hands out invalid UTF-8 as bytes
                raise ValueError(f"tensor {t.name!r}: its external data location is not text")
            if loc:
                files.add((base / loc).resolve())
    return files


def _bits(data_type: int) -> int | None:
    """Bits per element of a fixed-size tensor type, None if we don't know it."""
    name = TensorProto.DataType.Name(data_type)
    for n in (2, 4):
        if name.endswith((f"INT{n}", f"FLOAT{n}E2M1")):
            return n
    try:
        return 8 * helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except Exception:
        return None


def _check_lengths(model: onnx.ModelProto, path: Path) -> None:
    """Every raw tensor holds as many bytes as its shape needs (a truncated data file doesn't)."""
    for t in _tensors(model):
        if not t.HasField("raw_data") or t.data_type == TensorProto.STRING:
            continue
        bits = _bits(t.data_type)
        if bits is None:
            continue
        need = -(-int(np.prod(t.dims, dtype=np.int64)) * bits // 8)
        if len(t.raw_data) != need:
            raise ValueError(
                f"{path}: tensor {t.name!r} has {len(t.raw_data)} bytes of data, its shape "
                f"{list(t.dims)} needs {need} (truncated or corrupt file?)"
            )


#: the external_data key under which a lazily loaded tensor keeps its data file's absolute
#: path (its "location" stays as it was); never written out: `save_model` copies the bytes
_LAZY_KEY = "quantize.lazy_path"
_COPY_CHUNK = 64 << 20


def _ext_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _lazy_ref(t: TensorProto) -> tuple[Path, int, int] | None:
    """(absolute data file, offset, length) of a lazily loaded external tensor, else None."""
    info = _ext_info(t)
    if _LAZY_KEY not in info:
        return None
    return Path(info[_LAZY_KEY]), int(info.get("offset", 0)), int(info["length"])


def _read_external(t: TensorProto) -> np.ndarray:
    """A lazily loaded tensor's array, read from its data file now (nothing is cached)."""
    path, offset, length = _lazy_ref(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    count = int(np.prod(t.dims, dtype=np.int64))
    if count * dtype.itemsize != length:
        raise ValueError(f"tensor {t.name!r}: {length} bytes of data for shape {list(t.dims)}")
    with open(path, "rb") as f:
        f.seek(offset)
        a = np.fromfile(f, dtype=dtype, count=count)
    if a.size != count:
        raise ValueError(f"tensor {t.name!r}: its data file {path} is truncated")
    return a.astype(a.dtype.newbyteorder("="), copy=False).reshape(tuple(t.dims))


def _attach_lazily(model: onnx.ModelProto, base: Path, path: Path) -> None:
    """Point each external tensor at its data file (absolute, checked) without reading it.

    The same checks as loading would make: a location is relative and stays inside the
    model's folder, and offset + length lie within the file, whose length matches the shape.
    """
    for t in _tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = _ext_info(t)
        loc = info.get("location", "")
        # judged as written (not resolved: a data file may be a symlink, as in HF's cache)
        norm = os.path.normpath(loc) if loc else ""
        if not loc or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
            raise ValueError(f"{path}: tensor {t.name!r}: bad external data location {loc!r}")
        where = (base / norm).absolute()
        size = where.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            msg = f"tensor {t.name!r}: bad external data offset/length"
            raise ValueError(f"{path}: {msg}") from None
        bits = _bits(t.data_type)
        need = None if bits is None else -(-int(np.prod(t.dims, dtype=np.int64)) * bits // 8)
        if offset < 0 or length < 0 or offset + length > size or (need and length != need):
            raise ValueError(
                f"{path}: tensor {t.name!r}: external data out of range or of the wrong "
                f"length (offset {offset}, length {length}, file {size} bytes; truncated?)"
            )
        for key, value in ((_LAZY_KEY, str(where)), ("length", str(length))):
            if key in info:
                next(e for e in t.external_data if e.key == key).value = value
            else:
                t.external_data.add(key=key, value=value)


def load_model(
    path: str | os.PathLike, *, lazy: bool = False
) -> tuple[onnx.ModelProto, set[Path]]:
    """(model with all tensor data in memory, the external data files it was read from).

    lazy: external data is not read; each such tensor keeps a reference to its (checked) bytes,
    read when that weight is quantized, and `save_model` copies the untouched ones file to
    file, so memory stays near the largest tensor rather than the model. ORT cannot run a
    lazily loaded model from memory (calibration needs lazy=False).
    ValueError naming the file for a missing path, a file onnx cannot parse, a model without a
    graph or opset, and missing or truncated external data.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ValueError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})"
        ) from None
    if not model.HasField("graph") or not model.opset_import:
        raise ValueError(f"{path}: not a complete ONNX model (no graph or no opset)")
    base = path.absolute().parent  # as onnx.load does: the folder the path names
    try:
        files = _external_files(model, base)
    except (ValueError, OSError) as exc:  # also a NUL byte or a loop in a location
        raise ValueError(f"{path}: {exc}") from None
    if files:
        missing = sorted(str(f) for f in files if not f.is_file())
        if missing:
            raise ValueError(f"{path}: external data file(s) missing: {', '.join(missing)}")
        if lazy:
            _attach_lazily(model, base, path)
            _check_lengths(model, path)
            return model, files
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise ValueError(
                f"{path}: cannot read its external data ({type(exc).__name__}: {exc})"
            ) from None
    _check_lengths(model, path)
    return model, files


def _tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in _tensors(model):
        ref = _lazy_ref(t) if t.data_location == TensorProto.EXTERNAL else None
        if ref is not None:
            total += ref[2]
        else:
            total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        t.external_data.add(key=key, value=str(value))


def _materialize(model: onnx.ModelProto) -> None:
    """Read every lazily loaded tensor into the proto (for a single-file output)."""
    for t in _tensors(model):
        if t.data_location == TensorProto.EXTERNAL and _lazy_ref(t) is not None:
            src, offset, length = _lazy_ref(t)
            with open(src, "rb") as f:
                f.seek(offset)
                t.raw_data = f.read(length)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT


def _write_external(model: onnx.ModelProto, model_path: Path, data_name: str) -> bool:
    """Write the model's tensors of 1 KiB or more to `data_name` beside `model_path`, one at a
    time (in-memory ones are moved out of the proto; lazily loaded ones are copied in chunks
    from their file), then the model. Offsets are 4 KiB aligned (ORT can map them).
    Returns whether a data file was written."""
    data_path = model_path.with_name(data_name)
    pos = 0
    f = None
    try:
        for t in _tensors(model):
            ref = _lazy_ref(t) if t.data_location == TensorProto.EXTERNAL else None
            if ref is None and not (t.HasField("raw_data") and len(t.raw_data) >= 1024):
                continue
            if f is None:
                f = open(data_path, "wb")  # noqa: SIM115 (closed below)
            pos = -(-pos // 4096) * 4096
            f.seek(pos)
            if ref is None:
                length = len(t.raw_data)
                f.write(t.raw_data)
                t.ClearField("raw_data")
            else:
                src, offset, length = ref
                with open(src, "rb") as g:
                    g.seek(offset)
                    left = length
                    while left:
                        chunk = g.read(min(left, _COPY_CHUNK))
                        if not chunk:
                            raise ValueError(f"tensor {t.name!r}: {src} is truncated")
                        f.write(chunk)
                        left -= len(chunk)
            _set_external(t, data_name, pos, length)
            pos += length
    finally:
        if f is not None:
            f.close()
    onnx.save_model(model, str(model_path), format="protobuf")
    return f is not None


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """Write `model` atomically; returns the files written (the .onnx, and its data file).

    external_data None: only if the tensors would not fit protobuf's 2 GiB. With external data
    all tensors of 1 KiB or more go to ``<name>.data`` beside the model; both files are written
    completely under temporary names first, then renamed: the data file, then the model. The
    tensors of `model` are moved out to the data file in the process (the proto is changed).
    `inputs` are files that must not be overwritten (OutputError, a ValueError).
    """
    out = check_output(path, *inputs)
    if external_data is None:
        external_data = _tensor_bytes(model) > EXTERNAL_DATA_LIMIT
    if not external_data:
        _materialize(model)
        with atomic_path(out) as tmp:
            onnx.save_model(model, str(tmp), format="protobuf")
        return [out]
    data_name = f"{out.name}.data"
    data = check_output(out.with_name(data_name), *inputs)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        written = [data, out]
        if not _write_external(model, tmpdir / out.name, data_name):
            written = [out]  # every tensor was small: no data file
        for final in written:
            with atomic_path(final) as tmp:
                os.replace(tmpdir / final.name, tmp)
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _size(files: Iterable[Path]) -> int:
    return sum(Path(f).stat().st_size for f in files)


def quantize_onnx_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    /,
    *,
    external_data: bool | None = None,
    overwrite: bool = False,
    **options: Any,
) -> dict:
    """Quantize the model file `src` into `dst` (never touching `src` or its data files).

    options: as for `quantize_onnx_model`. external_data: None writes a data file if the input
    had one or the output would pass 2 GiB. An existing `dst` is replaced only with `overwrite`.
    Returns {"rows", "skipped", "notes", "input_files",
    "output_files", "input_bytes", "output_bytes"}.
    """
    src = Path(src)
    if not src.exists():
        raise ValueError(f"{src}: no such file")
    out = check_output(dst, src, overwrite=overwrite)
    # external data is read tensor by tensor unless ORT has to run the model (calibration)
    method = str(options.get("method", "rtn")).lower()
    lazy = options.get("calib") is None and method not in CALIBRATED_METHODS
    model, data_files = load_model(src, lazy=lazy)
    check_output(out, *data_files)
    details: dict = {}
    if external_data is None and data_files:
        external_data = True
    # an external-data output: new initializers wait in a spill file beside the output (deleted
    # whatever happens) rather than in memory, then are copied into the data file
    spill_path = None
    if external_data:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".spill.tmp", dir=out.parent)
        os.close(fd)
        spill_path = Path(name)
    try:
        try:
            # mixed precision's candidates wait beside the output too (the system's temp
            # folder may be small)
            if spill_path is None:
                rows = _quantize_in_place(model, details=details, scratch=out.parent, **options)
            else:
                with open(spill_path, "wb") as f:
                    rows = _quantize_in_place(
                        model,
                        details=details,
                        spill=_Spill(spill_path, f),
                        scratch=out.parent,
                        **options,
                    )
        except ValueError as exc:
            raise ValueError(f"{src}: {exc}") from None
        written = save_model(model, out, external_data=external_data, inputs=[src, *data_files])
    finally:
        if spill_path is not None:
            spill_path.unlink(missing_ok=True)
    inputs = [src, *sorted(data_files)]
    return {
        "rows": rows,
        "skipped": details["skipped"],
        "notes": details["notes"],
        "input_files": inputs,
        "output_files": written,
        "input_bytes": _size(inputs),
        "output_bytes": _size(written),
    }


# --------------------------------------------------------------------------------------------
# checking a quantized model against its float original


from .calibration import _ORT_TYPES  # noqa: E402  (onnxruntime's type names -> NumPy)


def _session(path: Path, config: dict[str, str] | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, str(v))
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValueError(f"{path}: onnxruntime cannot load it ({exc})") from None


def _index_limits(path: Path) -> dict[str, int]:
    """Graph inputs used directly as Gather indices -> the table's row count."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return {}
    g = model.graph
    rows = {t.name: t.dims[0] for t in g.initializer if len(t.dims) >= 1}
    for w in _weight_sources(g).values():
        if w.tensor.dims:
            rows.setdefault(w.name, w.tensor.dims[0])
    limits: dict[str, int] = {}
    for node in g.node:
        if (
            node.op_type == "Gather"
            and len(node.input) > 1
            and node.input[0] in rows
            and _attr(node, "axis", 0) == 0
        ):
            idx = node.input[1]
            limits[idx] = min(limits.get(idx, 1 << 62), int(rows[node.input[0]]))
    return limits


def _random_feed(session, limits: dict[str, int], rng: np.random.Generator) -> dict:
    dims: dict[str, int] = {}
    feed = {}
    for inp in session.get_inputs():
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise ValueError(f"input {inp.name!r} has type {inp.type}; pass inputs as an .npz")
        shape = []
        for i, d in enumerate(inp.shape):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            else:  # dynamic: small, and the same size wherever the same name appears
                key = d if isinstance(d, str) and d else f"{inp.name}:{i}"
                shape.append(dims.setdefault(key, 2 if i == 0 else 8))
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feed[inp.name] = rng.random(shape) < 0.5
        elif "mask" in inp.name.lower():
            feed[inp.name] = np.ones(shape, dtype)
        else:
            hi = max(1, min(limits.get(inp.name, 16), 16, int(np.iinfo(dtype).max)))
            feed[inp.name] = rng.integers(0, hi, size=shape).astype(dtype)
    return feed


def check_models(
    float_path: str | os.PathLike,
    quant_path: str | os.PathLike,
    inputs: str | os.PathLike | dict | None = None,
    n: int = 4,
    seed: int = 0,
    session_config: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Run both models in onnxruntime (CPU) on the same inputs and compare their outputs.

    inputs: an .npz (read with allow_pickle=False) or a dict of arrays, keyed by input name;
    None: `n` random input sets (normal floats; ints in [0, 16), below the table size for
    token ids that index a Gather; inputs named *mask* all ones; dynamic dims 2 (first) or 8).
    session_config: ORT session config entries for both sessions (e.g.
    {"session.qdq_matmulnbits_accuracy_level": "0"}).
    Returns {output name: {"cosine", "max_abs_err", "rel_rmse", "shape"}} over all runs.
    """
    float_path, quant_path = Path(float_path), Path(quant_path)
    for p in (float_path, quant_path):
        if not p.is_file():
            raise ValueError(f"{p}: no such file")
    ref, test = _session(float_path, session_config), _session(quant_path, session_config)
    if inputs is None:
        rng = np.random.default_rng(seed)
        limits = _index_limits(float_path)
        feeds = [_random_feed(ref, limits, rng) for _ in range(max(1, int(n)))]
    else:
        if isinstance(inputs, dict):
            given = {k: np.asarray(v) for k, v in inputs.items()}
        else:
            from .npz import load_npz  # checks sizes before allocating; never unpickles

            given = load_npz(inputs)
        needed = [i.name for i in ref.get_inputs()]
        missing = [k for k in needed if k not in given]
        if missing:
            raise ValueError(f"inputs lack {', '.join(missing)} (the model needs {needed})")
        feeds = [{k: given[k] for k in needed}]
    names = [o.name for o in ref.get_outputs()]
    got: dict[str, list] = {k: [] for k in names}
    want: dict[str, list] = {k: [] for k in names}
    shapes: dict[str, list] = {}
    for feed in feeds:
        for k, a, b in zip(names, ref.run(names, feed), test.run(names, feed), strict=True):
            if np.shape(a) != np.shape(b):
                raise ValueError(
                    f"output {k!r}: shape {np.shape(b)}, the float model gives {np.shape(a)}"
                )
            shapes[k] = list(np.shape(a))
            want[k].append(np.asarray(a, np.float64).ravel())
            got[k].append(np.asarray(b, np.float64).ravel())
    result = {}
    for k in names:
        a, b = np.concatenate(want[k]), np.concatenate(got[k])
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos = 1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0
        err = b - a
        result[k] = {
            "cosine": cos,
            "max_abs_err": float(np.abs(err).max()) if err.size else 0.0,
            "rel_rmse": float(np.linalg.norm(err) / na) if na else float(np.linalg.norm(err)),
            "shape": shapes[k],
        }
    return result
