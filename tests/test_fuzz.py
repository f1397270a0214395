"""Hostile input: the readers of safetensors files, of our metadata, of ONNX models and of .npz
files get truncated, bit-flipped and crafted files (absurd sizes and offsets, negative dims,
wrong dtypes, headers longer than the file, non-UTF-8 or non-JSON headers, duplicate names,
overlapping data). Each must either read the file or raise one ValueError: never another
exception, a hang, or an allocation far beyond the file's size (tracemalloc watches every
example: NumPy reports its buffers to it, zero-filled ones included).

Hypothesis runs derandomized (the same examples every run); `N_CASES` counts them (see them
with -s). QUANTIZE_FUZZ_EXAMPLES=N runs N examples per test instead of 250, for a longer hunt.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantize.io import _stfile
from quantize.io.npz import load_npz
from quantize.io.safetensors import describe, load, quantize_safetensors
from quantize.tensor import QuantizedTensor

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=int(os.environ.get("QUANTIZE_FUZZ_EXAMPLES", "250")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: an allocation beyond this while reading a file of a few tens of KB is a bug
ALLOC_LIMIT = 64 << 20

N_CASES: dict[str, int] = {}


def _count(what: str) -> None:
    N_CASES[what] = N_CASES.get(what, 0) + 1


def _checked(read, path: Path, what: str) -> None:
    """Run `read(path)`: it succeeds or raises ValueError, allocating at most ALLOC_LIMIT."""
    _count(what)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # garbage codes may overflow when dequantized
            read(path)
    except ValueError as exc:
        assert str(exc).strip(), "an error must say something"
        assert "\n" not in str(exc).strip() or what == "onnx", str(exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if started:
            tracemalloc.stop()
    assert peak < ALLOC_LIMIT, f"{what}: {peak} bytes allocated reading a {path.stat().st_size}"


# --------------------------------------------------------------------------- safetensors


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "a.weight": (rng.standard_normal((24, 64)) * 0.1).astype(np.float32),
        "b.weight": (rng.standard_normal((16, 40)) * 0.1).astype(ml_dtypes.bfloat16),
        "c.weight": (rng.standard_normal((8, 32)) * 0.1).astype(np.float16),
        "norm.weight": np.ones(16, np.float32),
        "step": np.array([3], np.int64),
        "mask": np.array([True, False, True]),
    }


class _Blobs(dict):
    """Seed files by name; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"<{len(self)} seed files>"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Files written by quantize: a plain one (our writer) and quantized ones of each storage
    kind (packed4 zero points, E4M3 scales + tensor scale, E8M0 scales, float zero points),
    and one in the compressed-tensors layout."""
    d = tmp_path_factory.mktemp("seeds")
    plain = d / "plain.safetensors"
    with _stfile.SafetensorsWriter(plain, {"format": "pt"}) as w:
        for name, arr in _model().items():
            w.add(name, arr)
    out = {"plain": plain.read_bytes()}
    for fmt, block in [("uint4", 16), ("nvfp4", 16), ("mxfp4", 32), ("int4_affine", 16)]:
        dst = d / f"{fmt}.safetensors"
        quantize_safetensors(plain, dst, format=fmt, block_size=block)
        out[fmt] = dst.read_bytes()
    dst = d / "ct.safetensors"
    quantize_safetensors(plain, dst, format="int4", block_size=16, layout="compressed-tensors")
    out["ct"] = dst.read_bytes()
    return _Blobs(out)


def _read_st(path: Path) -> None:
    with _stfile.SafetensorsFile(path) as f:
        for name, info in f.tensors.items():
            raw = f.raw(name)
            assert raw.nbytes == info.nbytes
            if _stfile.DTYPES[info.dtype][0] is not None:
                np.array(f.array(name))
    describe(path)
    for value in load(path).values():
        if isinstance(value, QuantizedTensor):
            value.dequantize()


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header, data: bytes, *, extra_len: int = 0, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) + extra_len) + text + data


SEED_NAMES = st.sampled_from(["plain", "uint4", "nvfp4", "mxfp4", "int4_affine", "ct"])


def _write(tmp_path: Path, blob: bytes, name="f.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


@FUZZ
@given(seed=SEED_NAMES, cut=st.floats(0, 1, exclude_max=True))
def test_truncated(tmp_path, seeds, seed, cut):
    blob = seeds[seed]
    _checked(_read_st, _write(tmp_path, blob[: int(cut * len(blob))]), "safetensors truncated")


@FUZZ
@given(
    seed=SEED_NAMES,
    flips=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8
    ),
    in_header=st.booleans(),
)
def test_bit_flips(tmp_path, seeds, seed, flips, in_header):
    blob = bytearray(seeds[seed])
    (n,) = struct.unpack("<Q", blob[:8])
    span = 8 + n if in_header else len(blob)  # flips in the header hit more interesting paths
    for where, bit in flips:
        blob[int(where * span)] ^= 1 << bit
    _checked(_read_st, _write(tmp_path, bytes(blob)), "safetensors bit flips")


ABSURD = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-(2**65), 2**65), max_size=4),
    st.lists(
        st.sampled_from([0, 1, 2, 7, 16, 64, 2**31, 2**32, 2**62, 2**63, 2**64, 2**70]), max_size=4
    ),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FIELDS = st.sampled_from(
    [
        "dtype",
        "shape",
        "data_offsets",
        "data_offsets.0",
        "data_offsets.1",
        "shape.0",
        "entry",
        "missing",
    ]
)


@FUZZ
@given(
    seed=SEED_NAMES,
    which=st.integers(0, 1000),
    field=FIELDS,
    value=ABSURD,
)
def test_header_fields(tmp_path, seeds, seed, which, field, value):
    header, data = _split(seeds[seed])
    names = [k for k in header if k != "__metadata__"]
    entry = header[names[which % len(names)]]
    if field == "entry":
        header[names[which % len(names)]] = value
    elif field == "missing":
        entry.pop(sorted(entry)[which % len(entry)])
    elif "." in field:
        key, i = field.split(".")
        if entry[key]:
            entry[key][int(i) % len(entry[key])] = value
    else:
        entry[field] = value
    _checked(_read_st, _write(tmp_path, _join(header, data)), "safetensors header fields")


@FUZZ
@given(
    seed=SEED_NAMES,
    kind=st.sampled_from(
        [
            "overlap",
            "duplicate",
            "dtype",
            "length_over",
            "length_under",
            "non_utf8",
            "non_json",
            "not_object",
            "metadata",
            "deep",
            "bigint",
            "gap",
            "swap_shape",
            "wrap",
            "huge_dim",
            "zero_huge",
            "empty_name",
            "float_dim",
        ]
    ),
    which=st.integers(0, 1000),
    junk=st.binary(min_size=1, max_size=40),
)
def test_crafted_headers(tmp_path, seeds, seed, kind, which, junk):
    header, data = _split(seeds[seed])
    names = [k for k in header if k != "__metadata__"]
    name = names[which % len(names)]
    other = names[(which + 1) % len(names)]
    raw, extra = None, 0
    if kind == "overlap":  # two tensors share bytes
        header[name]["data_offsets"] = list(header[other]["data_offsets"])
    elif kind == "duplicate":  # the same name twice in the JSON text
        text = json.dumps(header)
        dup = json.dumps({name: header[name]})[1:-1]
        raw = (text[:-1] + ", " + dup + "}").encode()
    elif kind == "dtype":
        header[name]["dtype"] = [
            "F16",
            "F32",
            "F64",
            "U8",
            "I64",
            "BF16",
            "F4",
            "BOOL",
            "F8_E4M3",
            "X9",
        ][which % 10]
    elif kind == "length_over":
        extra = 1 + which * 997
    elif kind == "length_under":
        extra = -1 - which % 7
    elif kind == "non_utf8":
        raw = b"\xff\xfe" + junk
    elif kind == "non_json":
        raw = b"{" + junk
    elif kind == "not_object":
        raw = [b"[]", b"1", b'"x"', b"null", b"true"][which % 5]
    elif kind == "metadata":
        header["__metadata__"] = [[], 1, "x", {"a": 1}, None, {"quantize": 1}][which % 6]
    elif kind == "deep":
        raw = b"[" * (1000 + which * 100) + b"]" * (1000 + which * 100)
    elif kind == "bigint":
        text = json.dumps(header)
        raw = text.replace('"shape": [', '"shape": [' + "9" * (5000 + which), 1).encode()
    elif kind == "gap":
        header[name]["data_offsets"][1] += 1 + which % 3
    elif kind == "wrap":  # 2^32 * 2^32 elements: 0 in int64 arithmetic, so 0 bytes "fit"
        end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
        header["zz"] = {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [end, end]}
    elif kind == "huge_dim":
        header[name]["shape"] = [2**70 + which]
    elif kind == "zero_huge":  # no bytes, but NumPy cannot even describe the shape
        end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
        header["zz"] = {
            "dtype": "F16",
            "shape": [0, 2**62, 2**62 + which],
            "data_offsets": [end, end],
        }
    elif kind == "empty_name":
        header[""] = header.pop(name)
    elif kind == "float_dim":
        header[name]["shape"] = [float(d) for d in header[name]["shape"]]
    elif kind == "swap_shape":
        header[name]["shape"] = [*header[name]["shape"][::-1], 1]
    path = _write(tmp_path, _join(header, data, extra_len=extra, raw=raw))
    _checked(_read_st, path, "safetensors crafted")
    if kind in MUST_FAIL:
        with pytest.raises(ValueError, match=str(path.name)):
            _stfile.SafetensorsFile(path).close()


#: crafted headers the file reader itself must refuse
MUST_FAIL = {
    "overlap",
    "duplicate",
    "length_over",
    "non_utf8",
    "non_json",
    "not_object",
    "deep",
    "bigint",
    "gap",
    "wrap",
    "huge_dim",
    "zero_huge",
    "float_dim",
}


META_KEYS = st.sampled_from(
    [
        "format",
        "block_size",
        "axis",
        "shape",
        "dtype",
        "scale_dtype",
        "scale_storage",
        "zero_point_storage",
        "zero_point_dtype",
        "tensor_scale",
        "DELETE",
        "ENTRY",
        "TOP",
        "layout",
        "layout_version",
        "NEW",
    ]
)
#: values a real entry could hold, so that several changes together stay self-consistent
PLAUSIBLE = st.one_of(
    ABSURD,
    st.sampled_from(
        [
            "int4",
            "uint4",
            "nf4",
            "nvfp4",
            "mxfp4",
            "int8",
            "int4_affine",
            "F32",
            "F16",
            "BF16",
            "U8",
            "float",
            "e4m3",
            "e8m0",
            "packed4",
            "uint8",
            None,
            0,
            1,
            -1,
            16,
            32,
        ]
    ),
)


@FUZZ
@given(
    seed=st.sampled_from(["uint4", "nvfp4", "mxfp4", "int4_affine", "ct"]),
    changes=st.lists(st.tuples(st.integers(0, 1000), META_KEYS, PLAUSIBLE), min_size=1, max_size=3),
)
def test_our_metadata(tmp_path, seeds, seed, changes):
    header, data = _split(seeds[seed])
    meta = json.loads(header["__metadata__"]["quantize"])
    for which, key, value in changes:
        if not isinstance(meta.get("tensors"), dict) or not meta["tensors"]:
            break
        names = sorted(meta["tensors"])
        name = names[which % len(names)]
        entry = meta["tensors"][name]
        if not isinstance(entry, dict):
            break
        if key == "DELETE":
            if entry:
                entry.pop(sorted(entry)[which % len(entry)])
        elif key == "ENTRY":
            meta["tensors"][name] = value
        elif key == "TOP":
            meta["tensors"] = value
        elif key in ("layout", "layout_version"):
            meta[key] = value
        elif key == "NEW":  # an entry for a tensor that has no pieces, or for a plain tensor
            meta["tensors"][["ghost", "step", "norm.weight"][which % 3]] = dict(entry)
        else:
            entry[key] = value
    header["__metadata__"]["quantize"] = json.dumps(meta)
    _checked(_read_st, _write(tmp_path, _join(header, data)), "our metadata")


def test_counts_and_kinds(seeds, tmp_path):
    """The seeds read back (the mutations start from valid files), and every kind ran."""
    for name, blob in seeds.items():
        _read_st(_write(tmp_path, blob, f"{name}.safetensors"))


# --------------------------------------------------------------------------- ONNX


onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def onnx_seeds(tmp_path_factory) -> dict[str, tuple[bytes, bytes | None]]:
    """A small MatMul model, with its weights inside and with them in an external data file."""
    from onnx import TensorProto, helper, numpy_helper

    from quantize.io.onnx import save_model

    d = tmp_path_factory.mktemp("onnx")
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array((rng.standard_normal((64, 32)) * 0.1).astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(32, np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    inside = d / "inside.onnx"
    save_model(model, inside, external_data=False)
    outside = d / "outside.onnx"
    save_model(onnx.load(str(inside)), outside, external_data=True)
    return _Blobs(
        inside=(inside.read_bytes(), None),
        outside=(outside.read_bytes(), (d / "outside.onnx.data").read_bytes()),
    )


def _read_onnx(path: Path) -> None:
    from quantize.io.onnx import load_model

    load_model(path)


def _write_onnx(tmp_path: Path, model: bytes, data: bytes | None) -> Path:
    path = tmp_path / "outside.onnx"
    path.write_bytes(model)
    data_path = tmp_path / "outside.onnx.data"
    if data is None:
        data_path.unlink(missing_ok=True)
    else:
        data_path.write_bytes(data)
    return path


@FUZZ
@given(
    seed=st.sampled_from(["inside", "outside"]),
    target=st.sampled_from(["model", "data"]),
    cut=st.none() | st.floats(0, 1, exclude_max=True),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=6),
)
def test_onnx_files(tmp_path, onnx_seeds, seed, target, cut, flips):
    model, data = onnx_seeds[seed]
    blob = bytearray(model if target == "model" or data is None else data)
    for where, bit in flips:
        blob[int(where * len(blob))] ^= 1 << bit
    if cut is not None:
        blob = blob[: int(cut * len(blob))]
    if target == "model" or data is None:
        model = bytes(blob)
    else:
        data = bytes(blob)
    _checked(_read_onnx, _write_onnx(tmp_path, model, data), "onnx")


@FUZZ
@given(
    key=st.sampled_from(["location", "offset", "length", "checksum", "dims", "data_type"]),
    value=st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from(
            ["../../etc/passwd", "/etc/passwd", "", "nope.data", "outside.onnx", "a\x00b", "."]
        ),
    ),
)
def test_onnx_external_data_fields(tmp_path, onnx_seeds, key, value):
    from onnx import TensorProto

    model_bytes, data = onnx_seeds["outside"]
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    t = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    if key == "dims":
        if isinstance(value, int):
            t.dims[0] = value
    elif key == "data_type":
        if isinstance(value, int):
            t.data_type = value % 30
    else:
        entries = {e.key: e for e in t.external_data}
        if key not in entries:
            entries[key] = t.external_data.add()
            entries[key].key = key
        entries[key].value = str(value)
    _checked(_read_onnx, _write_onnx(tmp_path, model.SerializeToString(), data), "onnx")


# --------------------------------------------------------------------------- npz


@pytest.fixture(scope="module")
def npz_seed(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(2)
    path = d / "calib.npz"
    np.savez(path, x=rng.standard_normal((4, 16)).astype(np.float32), ids=np.arange(6))
    return path.read_bytes()


def _read_npz(path: Path) -> None:
    load_npz(path)


def _npy(header: bytes, payload: bytes) -> bytes:
    text = header + b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload


NPY_HEADERS = st.sampled_from(
    [
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }",
        b"{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (-5,), }",
        b"{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
        b"{'descr': '<f4', 'fortran_order': True, 'shape': (3, 2), }",
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
        b"{'descr': [('a', '<f4'), ('b', '|O')], 'fortran_order': False, 'shape': (1,), }",
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (2**64,), }",
        b"{'descr': 'V99999999999', 'fortran_order': False, 'shape': (1,), }",
        b"not a dict",
    ]
)


@FUZZ
@given(
    cut=st.none() | st.floats(0, 1, exclude_max=True),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=6),
    crafted=st.none() | st.tuples(NPY_HEADERS, st.binary(max_size=64), st.booleans()),
)
def test_npz(tmp_path, npz_seed, cut, flips, crafted):
    path = tmp_path / "c.npz"
    if crafted is not None:
        header, payload, compress = crafted
        mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(path, "w", mode) as z:
            z.writestr("x.npy", _npy(header, payload))
        blob = bytearray(path.read_bytes())
    else:
        blob = bytearray(npz_seed)
    for where, bit in flips:
        blob[int(where * len(blob))] ^= 1 << bit
    if cut is not None:
        blob = blob[: int(cut * len(blob))]
    path.write_bytes(bytes(blob))
    _checked(_read_npz, path, "npz")


def test_calibration_npz_reader_allocates_only_what_the_file_backs(tmp_path):
    from quantize.io import calibration

    path = tmp_path / "c.npz"
    with zipfile.ZipFile(path, "w") as z:
        head = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2147483648,), }"
        z.writestr("x.npy", _npy(head, b"abc"))
    _checked(calibration._load_arrays, path, "npz (calibration)")


def test_zz_report_counts():
    """Printed with -s: how many cases each reader ran (this module's total)."""
    print("fuzz cases:", N_CASES, "total", sum(N_CASES.values()))
    assert sum(N_CASES.values()) > 0 or not N_CASES
