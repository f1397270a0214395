"""The safetensors file format itself, read and written without the `safetensors` package.

A file is an 8-byte little-endian header length N, N bytes of JSON header, then the data:

    {"__metadata__": {str: str}, NAME: {"dtype": "F32", "shape": [..], "data_offsets": [s, e]}}

Offsets are relative to the end of the header; the tensors must tile the data exactly (no
gaps, no overlaps, nothing after the last one), as the reference implementation requires.

Reading maps the file (`mmap`, read-only) and hands out tensors as NumPy views, so memory stays
near the tensor being worked on. BF16 and the FP8 types become ml_dtypes arrays whatever the
installed `safetensors` version does with them (0.4-0.5's NumPy API cannot read BF16 at all).
Everything read is validated; every problem is a ValueError that starts with the file's path.

Writing streams: each tensor goes to a scratch file for its alignment class as soon as it is
added (8-, 4-, 2- and 1-byte types), and `close` writes header + the classes in that order, so
every tensor is aligned to its item size (the reference writer sorts the same way) and only
one tensor is ever held in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

#: the reference implementation refuses headers beyond 100 MB
MAX_HEADER = 100_000_000


#: no tensor's size in bits (counting zero dims as 1) reaches this: NumPy could not describe it
_MAX_BITS = 1 << 66


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a name given twice is an error, not "the last one wins"."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _ml(name: str):
    t = getattr(ml_dtypes, name, None)
    return None if t is None else np.dtype(t)


#: safetensors dtype -> (NumPy dtype or None, bits per element). None: no NumPy type holds it
#: (sub-byte floats, packed); such tensors are copied as raw bytes and never decoded.
DTYPES: dict[str, tuple[np.dtype | None, int]] = {
    "BOOL": (np.dtype(np.bool_), 8),
    "U8": (np.dtype(np.uint8), 8),
    "I8": (np.dtype(np.int8), 8),
    "F8_E5M2": (_ml("float8_e5m2"), 8),
    "F8_E4M3": (_ml("float8_e4m3fn"), 8),
    "F8_E8M0": (_ml("float8_e8m0fnu"), 8),
    "I16": (np.dtype("<i2"), 16),
    "U16": (np.dtype("<u2"), 16),
    "F16": (np.dtype("<f2"), 16),
    "BF16": (_ml("bfloat16"), 16),
    "I32": (np.dtype("<i4"), 32),
    "U32": (np.dtype("<u4"), 32),
    "F32": (np.dtype("<f4"), 32),
    "I64": (np.dtype("<i8"), 64),
    "U64": (np.dtype("<u8"), 64),
    "F64": (np.dtype("<f8"), 64),
    "C64": (np.dtype("<c8"), 64),
    "F4": (None, 4),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
}

#: the float dtypes a plain model's weights come in (what the default selection quantizes)
WEIGHT_FLOATS = ("F16", "BF16", "F32", "F64")


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors name of a NumPy dtype (ValueError if the format has none)."""
    dt = np.dtype(dtype)
    for code, (np_dt, _) in DTYPES.items():
        if np_dt is not None and (np_dt == dt or np_dt == dt.newbyteorder("<")):
            return code
    raise ValueError(f"dtype {dt} has no safetensors equivalent")


def numpy_dtype(code: str) -> np.dtype:
    """The NumPy dtype of a safetensors dtype name (ValueError if unknown or sub-byte)."""
    entry = DTYPES.get(code)
    if entry is None or entry[0] is None:
        raise ValueError(f"safetensors dtype {code!r} has no NumPy equivalent")
    return entry[0]


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """A validated safetensors file, memory-mapped read-only; use as a context manager.

    `tensors` maps names to TensorInfo in file order; `metadata` is the `__metadata__` dict
    (empty when there is none). `array(name)` is a read-only NumPy view of the tensor,
    `raw(name)` its bytes as a uint8 view.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None
        self._map: mmap.mmap | None = None
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed in close())
        except OSError as exc:
            raise ValueError(f"{self.path}: cannot open: {exc.strerror or exc}") from None
        try:
            self.metadata, self.tensors, self._data_start = self._read_header()
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what}")

    def _read_header(self):
        f = self._file
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise self._fail(
                f"not a safetensors file: {size} bytes, shorter than the 8-byte header length"
            )
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise self._fail(
                f"header length {n} is larger than the file ({size} bytes): the file is "
                "truncated or not a safetensors file"
            )
        if n > MAX_HEADER:
            raise self._fail(f"header length {n} exceeds the format's limit of {MAX_HEADER}")
        raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise self._fail(f"the header names {exc.args[0]!r} twice") from None
        except RecursionError:
            raise self._fail("the header is not valid JSON (nested too deeply)") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, 4300-digit numbers
            raise self._fail(f"the header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail(f"the header must be a JSON object, got {type(header).__name__}")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._fail("__metadata__ must map strings to strings")
        tensors = {name: self._tensor_info(name, entry) for name, entry in header.items()}
        tensors = dict(sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)))
        data_len = size - 8 - n
        pos = 0
        for name, t in tensors.items():
            if t.start != pos:
                what = "overlaps the tensor before it" if t.start < pos else "leaves a gap"
                raise self._fail(
                    f"tensor {name!r}: data_offsets {[t.start, t.end]} {what} (expected start "
                    f"{pos})"
                )
            pos = t.end
        if pos > data_len:
            raise self._fail(
                f"truncated: the header describes {pos} bytes of tensor data, the file holds "
                f"{data_len}"
            )
        if pos < data_len:
            raise self._fail(
                f"{data_len - pos} bytes after the last tensor that no tensor describes"
            )
        return metadata, tensors, 8 + n

    def _tensor_info(self, name: str, entry) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"tensor {name!r}: header entry must be an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise self._fail(f"tensor {name!r}: shape must be a list of sizes >= 0, got {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise self._fail(f"tensor {name!r}: bad data_offsets {offsets!r}")
        # Python ints: NumPy's int64 product wraps ([2**32, 2**32] gives 0, which "fits" in 0
        # bytes) and overflows on dims past 2**63
        if math.prod(max(d, 1) for d in shape) * DTYPES[dtype][1] >= _MAX_BITS:
            raise self._fail(f"tensor {name!r}: shape {shape} is too large for any file")
        bits = math.prod(shape) * DTYPES[dtype][1]
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise self._fail(
                f"tensor {name!r}: {dtype} {shape} needs {bits / 8:g} bytes, data_offsets "
                f"{offsets} give {offsets[1] - offsets[0]}"
            )
        return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise self._fail(f"no tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        t = self.info(name)
        if t.nbytes == 0:
            return np.zeros(0, np.uint8)
        return np.frombuffer(self._map, np.uint8, t.nbytes, self._data_start + t.start)

    def array(self, name: str) -> np.ndarray:
        t = self.info(name)
        dt = DTYPES[t.dtype][0]
        if dt is None:
            raise self._fail(f"tensor {name!r}: dtype {t.dtype} cannot be read as a NumPy array")
        if t.size == 0:
            return np.zeros(t.shape, dt)
        return np.frombuffer(self._map, dt, t.size, self._data_start + t.start).reshape(t.shape)

    def release(self, name: str) -> None:
        """Let the OS drop the tensor's pages from this process (a hint; they reload on use).

        Pages of a read-only file map cost no memory the OS cannot take back, but they count
        in the resident size; dropping them keeps that near the tensor being worked on.
        """
        t = self.info(name)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if self._map is None or advice is None or t.nbytes == 0:
            return
        page = mmap.PAGESIZE
        start = (self._data_start + t.start) // page * page
        end = self._data_start + t.end
        with contextlib.suppress(OSError, ValueError):
            self._map.madvise(advice, start, end - start)

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # views still alive: the GC closes it
                self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _alignment(dtype: str) -> int:
    bits = DTYPES[dtype][1]
    return bits // 8 if bits in (16, 32, 64) else 1


class SafetensorsWriter:
    """Writes one safetensors file at `path`, tensor by tensor; use as a context manager.

    `add(name, array)` or `add_raw(name, dtype, shape, bytes)` streams each tensor to a scratch
    file beside `path`; leaving the `with` block normally writes the file, leaving it by an
    exception writes nothing. Scratch files are removed either way.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._bodies: dict[int, tuple] = {}  # alignment -> (file object, path, bytes so far)
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int, int]] = {}

    @property
    def nbytes(self) -> dict[str, int]:
        """Bytes of data of each tensor added so far."""
        return {name: e[4] for name, e in self._entries.items()}

    def _body(self, align: int):
        if align not in self._bodies:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=f".{align}.part", dir=self.path.parent
            )
            self._bodies[align] = [os.fdopen(fd, "wb"), Path(tmp), 0]
        return self._bodies[align]

    def add(self, name: str, array: np.ndarray) -> None:
        arr = np.asarray(array)
        code = dtype_code(arr.dtype)
        if arr.dtype.byteorder == ">":  # the format is little-endian
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        self.add_raw(name, code, arr.shape, arr.reshape(-1).view(np.uint8))

    def add_raw(self, name: str, dtype: str, shape, data) -> None:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"{self.path}: bad tensor name {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.path}: tensor {name!r} is written twice")
        shape = tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * DTYPES[dtype][1] // 8
        buf = memoryview(data).cast("B")
        if buf.nbytes != nbytes:
            raise ValueError(
                f"{self.path}: tensor {name!r}: {dtype} {list(shape)} needs {nbytes} bytes, "
                f"got {buf.nbytes}"
            )
        align = _alignment(dtype)
        body = self._body(align)
        body[0].write(buf)
        self._entries[name] = (dtype, shape, align, body[2], nbytes)
        body[2] += nbytes

    def _write(self) -> None:
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        base, order = {}, sorted(self._bodies, reverse=True)
        pos = 0
        for align in order:
            base[align] = pos
            pos += self._bodies[align][2]
        entries = sorted(self._entries.items(), key=lambda kv: base[kv[1][2]] + kv[1][3])
        for name, (dtype, shape, align, off, nbytes) in entries:
            start = base[align] + off
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [start, start + nbytes],
            }
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the reference pads
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for align in order:
                f, tmp, _ = self._bodies[align]
                f.close()
                with open(tmp, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)

    def _cleanup(self) -> None:
        for f, tmp, _ in self._bodies.values():
            f.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._bodies.clear()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._write()
        finally:
            self._cleanup()
