"""Calibration data for ONNX models: run the float model, collect what the weights will see.

For each activation tensor that feeds a weight to be quantized (the A input of a MatMul or
Gemm), `capture_activations` runs the float model in onnxruntime with that tensor added as a
graph output (on a copy: the model given is never modified) and accumulates, batch by batch:

* the Hessian proxy ``H = X^T X`` (K x K, float64) over every row of the activation
  reshaped to ``(-1, K)`` (GPTQ and mixed precision weigh weight errors with it),
* the number of rows seen,
* a uniform reservoir sample of at most `max_samples` rows (float32; AWQ searches with it).

Only one run's activations are in memory at a time (plus a float64 copy of at most
HESSIAN_CHUNK rows of one of them, and per activation at most `_pending_cap(K)` rows waiting
for their X^T X), so the memory used does not grow with the amount of calibration data.
Rows are gathered across runs before X^T X is taken: a sentence gives ~15 rows, and a
product over so few rows costs about what one over hundreds does (each writes and adds a
K x K float64 matrix; on a loaded machine BLAS threads also wait for each other per call).
What does grow with the model is the state kept: 8 K^2 bytes per Hessian (0.9 GiB at
K = 11008) and 4 K bytes per kept row; `quantize_onnx_model(calib_memory=...)`
bounds it by capturing groups of activations in separate passes over the feeds.

Feeds come from `calibration_feeds`: an ``.npz`` file or a dict of arrays keyed by input name
(first axis = samples, cut into batches), a list of ready feed dicts, or, with no data,
random inputs built from the model's input types (as `check_models` builds them).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: AWQ never needs more rows than this per activation
MAX_SAMPLES = 4096
#: rows turned to float64 at a time when accumulating X^T X (bounds that copy to 8 K rows)
HESSIAN_CHUNK = 1024
#: rows gathered per activation before X^T X is taken (at least this many, see _pending_cap)
PENDING_ROWS = 256
#: random calibration: how many random input sets when none are given
RANDOM_BATCHES = 16
#: protobuf cannot serialize a model above 2 GiB: such models go to ORT through a file
_SERIALIZE_LIMIT = 2**31 - 2**27


@dataclasses.dataclass
class Activation:
    """What one activation tensor looked like over the calibration data."""

    name: str
    hessian: np.ndarray | None  # (K, K) float64: sum of x x^T over all rows x
    rows: int
    samples: np.ndarray | None  # (<= max_samples, K) float32, a uniform sample of the rows

    @property
    def k(self) -> int:
        """The activation's last dimension (the weight's K)."""
        if self.hessian is not None:
            return self.hessian.shape[0]
        return 0 if self.samples is None else self.samples.shape[1]


# --------------------------------------------------------------------------------------------
# feeds


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _model_bytes_or_path(model: onnx.ModelProto, tmp: Path) -> str | bytes:
    if model.ByteSize() < _SERIALIZE_LIMIT:
        return model.SerializeToString()
    path = tmp / "model.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
    )
    return str(path)


def _session(model: onnx.ModelProto, tmp: Path, what: str = "the float model"):
    import onnxruntime as ort

    tmp.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(
            _model_bytes_or_path(model, tmp), so, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ValueError(f"onnxruntime cannot run {what} ({exc})") from None


def _input_specs(model: onnx.ModelProto) -> list[tuple[str, np.dtype | None, list]]:
    """(name, numpy dtype or None, shape with None for dynamic dims) of each real graph input."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = None
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        specs.append((v.name, dtype, shape))
    return specs


def _load_arrays(calib: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, str]:
    if isinstance(calib, Mapping):
        return {k: np.asarray(v) for k, v in calib.items()}, "calibration data"
    where = str(calib)
    if not Path(where).is_file():
        raise ValueError(f"{where}: no such file (calibration data)")
    from .npz import load_npz  # checks each header against the bytes behind it; no pickles

    try:
        return load_npz(where), where
    except ValueError as exc:
        raise ValueError(f"{where}: not a readable .npz of input arrays ({exc})") from None


def _same_kind(have: np.dtype, want: np.dtype) -> bool:
    kinds = {"f": "f", "i": "i", "u": "i", "b": "b"}
    return kinds.get(have.kind) == kinds.get(want.kind) is not None


def _batched(
    arrays: dict[str, np.ndarray],
    where: str,
    specs: list[tuple[str, np.dtype | None, list]],
    batch_size: int,
) -> list[dict[str, np.ndarray]]:
    """Check `arrays` against the model's inputs and cut them along axis 0 into feeds."""
    names = [s[0] for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(
            f"{where}: has no array for input {missing[0]!r} (the model's inputs: "
            f"{', '.join(names)}; the file has: {', '.join(sorted(arrays)) or 'nothing'})"
        )
    checked: dict[str, np.ndarray] = {}
    n_samples = None
    fixed_batch = None
    for name, dtype, shape in specs:
        a = arrays[name]
        if dtype is not None and a.dtype != dtype:
            if not _same_kind(a.dtype, dtype):
                raise ValueError(
                    f"{where}: input {name!r} is {a.dtype}, the model wants {dtype.name}"
                )
            if np.issubdtype(dtype, np.integer) and a.size:
                info = np.iinfo(dtype)
                if a.min() < info.min or a.max() > info.max:
                    raise ValueError(f"{where}: input {name!r} has values outside {dtype.name}")
            a = a.astype(dtype)
        if shape is not None:
            if a.ndim != len(shape):
                raise ValueError(
                    f"{where}: input {name!r} has shape {list(a.shape)}, the model wants "
                    f"{len(shape)} dimensions ({_spell(shape)}; the first one counts samples)"
                )
            for i, (have, want) in enumerate(zip(a.shape, shape, strict=True)):
                if i > 0 and want not in (None, 0) and have != want:
                    raise ValueError(
                        f"{where}: input {name!r} has shape {list(a.shape)}, the model wants "
                        f"{_spell(shape)}"
                    )
            if shape and shape[0]:
                fixed_batch = shape[0] if fixed_batch is None else min(fixed_batch, shape[0])
        if a.ndim == 0:
            raise ValueError(f"{where}: input {name!r} is a scalar; the first axis counts samples")
        if n_samples is None:
            n_samples = a.shape[0]
        elif a.shape[0] != n_samples:
            raise ValueError(
                f"{where}: input {name!r} has {a.shape[0]} samples, the others {n_samples}"
            )
        checked[name] = a
    if not n_samples:
        raise ValueError(f"{where}: has no samples (first axis of length 0)")
    step = fixed_batch or batch_size
    if n_samples % step and fixed_batch:
        raise ValueError(
            f"{where}: {n_samples} samples do not split into the model's fixed batch of {step}"
        )
    return [{k: v[i : i + step] for k, v in checked.items()} for i in range(0, n_samples, step)]


def _spell(shape: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def index_limits(model: onnx.ModelProto) -> dict[str, int]:
    """Graph inputs used directly as Gather indices (axis 0) -> the table's row count."""
    g = model.graph
    rows = {t.name: t.dims[0] for t in g.initializer if len(t.dims) >= 1}
    for node in g.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and a.t.dims:
                    rows.setdefault(node.output[0], a.t.dims[0])
    limits: dict[str, int] = {}
    for node in g.node:
        axis = 0
        for a in node.attribute:
            if a.name == "axis":
                axis = helper.get_attribute_value(a)
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in rows and axis == 0:
            idx = node.input[1]
            limits[idx] = min(limits.get(idx, 1 << 62), int(rows[node.input[0]]))
    return limits


def random_feeds(
    model: onnx.ModelProto, n: int = RANDOM_BATCHES, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """`n` random input sets from the model's input types (as `check_models` makes them)."""
    from .onnx import _random_feed

    class _Inp:  # what _random_feed reads from an ORT session's inputs
        def __init__(self, name, dtype, shape):
            self.name, self.shape = name, shape
            self.type = next((k for k, v in _ORT_TYPES.items() if v == dtype), str(dtype))

    class _Session:
        def __init__(self, inputs):
            self._inputs = inputs

        def get_inputs(self):
            return self._inputs

    inputs = []
    for v in model.graph.input:
        if v.name in {t.name for t in model.graph.initializer}:
            continue
        tt = v.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = None
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        ]
        inputs.append(_Inp(v.name, dtype, shape))
    session = _Session(inputs)
    rng = np.random.default_rng(seed)
    limits = index_limits(model)
    return [_random_feed(session, limits, rng) for _ in range(max(1, int(n)))]


def calibration_feeds(
    model: onnx.ModelProto,
    calib: str | os.PathLike | Mapping[str, Any] | Iterable[Mapping[str, Any]] | None = None,
    *,
    batch_size: int = 8,
    n_random: int = RANDOM_BATCHES,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """The input sets (feeds) to calibrate `model` with.

    calib: an .npz file or a dict of arrays keyed by input name, the first axis counting
    samples (cut into batches of `batch_size`, or the model's fixed batch size); a list of
    feed dicts (used as they are); None: `n_random` random input sets. ValueError naming the
    file and the input for a missing input, a wrong dtype kind or a wrong shape.
    """
    if calib is None:
        return random_feeds(model, n_random, seed)
    specs = _input_specs(model)
    if isinstance(calib, (str, os.PathLike, Mapping)):
        arrays, where = _load_arrays(calib)
        return _batched(arrays, where, specs, batch_size)
    feeds = []
    for i, feed in enumerate(calib):
        if not isinstance(feed, Mapping):
            raise TypeError(
                "calib must be an .npz path, a dict of arrays or a list of feed dicts, "
                f"got a {type(feed).__name__} at position {i}"
            )
        arrays = {k: np.asarray(v) for k, v in feed.items()}
        feeds.extend(_batched(arrays, f"calibration feed {i}", specs, 1 << 30))
    if not feeds:
        raise ValueError("calib is an empty list of feeds")
    return feeds


# --------------------------------------------------------------------------------------------
# capture


def _pending_cap(k: int) -> int:
    """Rows of width k held back for one X^T X: PENDING_ROWS, up to k // 8 (a sixteenth of
    the Hessian's bytes in float32) but never above HESSIAN_CHUNK."""
    return min(HESSIAN_CHUNK, max(PENDING_ROWS, k // 8))


class _Accumulator:
    def __init__(self, name: str, hessian: bool, max_samples: int, rng: np.random.Generator):
        self.name = name
        self.want_h = hessian
        self.max_samples = max_samples
        self.rng = rng
        self.h: np.ndarray | None = None
        self.rows = 0
        self.samples: np.ndarray | None = None
        self.filled = 0
        self.pending: list[np.ndarray] = []  # rows not yet in h (float32 copies)
        self.n_pending = 0

    def add(self, x: np.ndarray) -> None:
        if x.ndim == 0:
            raise ValueError(f"activation {self.name!r} is a scalar")
        k = x.shape[-1]
        x = x.reshape(-1, k)
        if self.h is None and self.samples is None:
            if self.want_h:
                self.h = np.zeros((k, k), np.float64)
            if self.max_samples:
                self.samples = np.empty((self.max_samples, k), np.float32)
        elif k != (self.h.shape[0] if self.h is not None else self.samples.shape[1]):
            raise ValueError(f"activation {self.name!r} changes its last dimension between runs")
        if not np.isfinite(x).all():
            raise ValueError(f"activation {self.name!r} has NaN or Inf on the calibration inputs")
        if self.h is not None:
            cap = _pending_cap(k)
            if self.n_pending + x.shape[0] > cap:
                self.flush()
            if x.shape[0] <= cap:
                # a copy: the run's output may be a view of a larger buffer
                self.pending.append(np.array(x, np.float32 if x.dtype.itemsize <= 4 else None))
                self.n_pending += x.shape[0]
            else:
                self._add_rows(x)
        if self.samples is not None:
            self._reservoir(x)
        self.rows += x.shape[0]

    def _add_rows(self, x: np.ndarray) -> None:
        # float64 in chunks of rows: a run of batch x sequence rows at K = 11008 would
        # otherwise need a float64 copy of gigabytes next to the float32 original
        for i in range(0, x.shape[0], HESSIAN_CHUNK):
            x64 = x[i : i + HESSIAN_CHUNK].astype(np.float64)
            self.h += x64.T @ x64

    def flush(self) -> None:
        """Add the rows held back to h (one product for all of them)."""
        if self.pending:
            rows = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
            self.pending, self.n_pending = [], 0
            self._add_rows(rows)

    def _reservoir(self, x: np.ndarray) -> None:
        """Algorithm R, one batch at a time: every row seen so far is kept with equal chance."""
        cap, n = self.max_samples, x.shape[0]
        take = min(cap - self.filled, n)
        if take > 0:
            self.samples[self.filled : self.filled + take] = x[:take]
            self.filled += take
        if take < n:
            seen = self.rows + np.arange(take, n)  # the 0-based index of each remaining row
            slot = self.rng.integers(0, seen + 1)
            hit = slot < cap
            # fancy assignment keeps the last of repeated slots, as the sequential rule does
            self.samples[slot[hit]] = x[take:][hit]

    def result(self) -> Activation:
        self.flush()
        samples = None if self.samples is None else self.samples[: self.filled].copy()
        return Activation(self.name, self.h, self.rows, samples)


def capture_activations(
    model: onnx.ModelProto | str | os.PathLike,
    names: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    transposed: Iterable[str] = (),
    hessian: bool = True,
    max_samples: int = MAX_SAMPLES,
    seed: int = 0,
) -> dict[str, Activation]:
    """Run the float `model` on `feeds` and collect, per tensor in `names`, an `Activation`.

    names: tensors of the model's main graph (node outputs, graph inputs or initializers).
    transposed: those among them to take as their transpose (2-D; a Gemm's A with transA=1).
    hessian: accumulate X^T X; max_samples: rows kept for AWQ (0: none). The model is not
    changed; each feed is one onnxruntime run, and only one run's activations are held.
    """
    if isinstance(model, (str, os.PathLike)):
        from .onnx import load_model

        model, _ = load_model(model)
    names = list(dict.fromkeys(names))
    transposed = set(transposed)
    unknown = transposed - set(names)
    if unknown:
        raise ValueError(f"transposed names {sorted(unknown)} are not among names")
    max_samples = max(0, int(max_samples))
    rng = np.random.default_rng(seed)
    acc = {n: _Accumulator(n, hessian, max_samples, rng) for n in names}

    g = model.graph
    graph_inputs = {v.name for v in g.input}
    constants = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    fetch = [n for n in names if n not in graph_inputs and n not in constants]

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for n in fetch:
        if n not in outputs:
            copy.graph.output.append(helper.ValueInfoProto(name=n))
    with tempfile.TemporaryDirectory(prefix="quantize-calib.") as tmp:
        session = _session(copy, Path(tmp))
        del copy
        wanted = [i.name for i in session.get_inputs()]
        count = 0
        for feed in feeds:
            count += 1
            missing = [k for k in wanted if k not in feed]
            if missing:
                raise ValueError(f"calibration feed {count - 1} lacks input {missing[0]!r}")
            run = {k: np.asarray(feed[k]) for k in wanted}
            try:
                got = session.run(fetch, run) if fetch else []
            except Exception as exc:
                raise ValueError(
                    f"onnxruntime failed on calibration feed {count - 1} "
                    f"({type(exc).__name__}: {exc})"
                ) from None
            values = dict(zip(fetch, got, strict=True))
            for n in names:
                if n in values:
                    x = values[n]
                elif n in constants:
                    x = numpy_helper.to_array(constants[n])
                else:
                    x = np.asarray(feed[n])
                x = np.asarray(x)
                if not np.issubdtype(x.dtype, np.floating):
                    raise ValueError(f"activation {n!r} is {x.dtype}, not a float tensor")
                if n in transposed:
                    if x.ndim != 2:
                        raise ValueError(f"activation {n!r} is {x.ndim}-D; transposed needs 2-D")
                    x = x.T
                acc[n].add(x)
        if not count:
            raise ValueError("no calibration feeds")
    return {n: a.result() for n, a in acc.items()}


def output_errors(
    reference: onnx.ModelProto,
    models: Sequence[onnx.ModelProto],
    feeds: Iterable[Mapping[str, np.ndarray]],
) -> list[float]:
    """Per model in `models`, how far its outputs are from `reference`'s on `feeds`.

    Each is the mean over the float graph outputs of sum ||y - y_ref||^2 / sum ||y_ref||^2,
    the sums running over every feed (inf where an output is not finite). Only one feed's
    outputs are held at a time.
    """
    with tempfile.TemporaryDirectory(prefix="quantize-check.") as tmp:
        ref = _session(reference, Path(tmp) / "ref")
        names = [
            o.name
            for o in ref.get_outputs()
            if o.type in ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)")
        ]
        if not names:
            raise ValueError("the model has no float outputs to compare")
        sessions = []
        for i, m in enumerate(models):
            sessions.append(_session(m, Path(tmp) / str(i), "the quantized model"))
        wanted = [i.name for i in ref.get_inputs()]
        num = np.zeros((len(models), len(names)))
        den = np.zeros(len(names))
        for count, feed in enumerate(feeds):
            missing = [k for k in wanted if k not in feed]
            if missing:
                raise ValueError(f"calibration feed {count} lacks input {missing[0]!r}")
            run = {k: np.asarray(feed[k]) for k in wanted}
            want = [np.asarray(y, np.float64) for y in ref.run(names, run)]
            den += [float(np.sum(np.square(y))) for y in want]
            for i, s in enumerate(sessions):
                for j, y in enumerate(s.run(names, run)):
                    num[i, j] += float(np.sum(np.square(np.asarray(y, np.float64) - want[j])))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(num > 0, np.inf, 0.0))
    rel = np.where(np.isfinite(rel), rel, np.inf)
    return [float(np.mean(r)) for r in rel]
