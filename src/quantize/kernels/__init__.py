"""Fused compiled kernels for the 4-bit formats: quantize+pack and unpack+dequantize, one pass
over memory.

They work on the core's 2-D layout, a C-contiguous (rows, n) array with the quantized axis last,
and return exactly what the NumPy path returns (`quantize.kernels.reference`, bit for bit):

    packed, scales, zero_points = quantize_rows("uint4", x2d, 128)
    x = dequantize_rows("uint4", packed, scales, zero_points, n, 128, np.float32)

    res = quantize_rows("nvfp4", x2d, 16)          # unpacks as the same three arrays
    x = dequantize_rows("nvfp4", *res, n, 16, np.float32, tensor_scale=res.tensor_scale)

Supported: formats "int4", "uint4", "int4_ort" (`intvec.py` on `int4.py`'s rules; int4_ort
dequantizes as uint4, and "nf4_dq", whose stored scales are plain float32, as nf4),
"fp4_e2m1", "mxfp4", "mxfp4_ceil", "nvfp4" (`fp4.py`) and "nf4" (`nf4.py`) with clip_ratio 1
(the round-to-nearest rule); quantize from float32, float16 or bfloat16 (float32 scales;
other dtypes stay on the NumPy path, or cast them to float32 first, which is what the NumPy
path does); dequantize from
float32 scales to float32, float16, bfloat16 or float64, rounded and saturating exactly as
`QuantizedTensor.dequantize` does (once from the exact value; bfloat16 through float32, as
ml_dtypes casts).
`available(fmt, dtype, op)` says which. nvfp4 has a second-level float32 tensor scale, computed
from the whole (rows, n) array: `quantize_rows` returns it as `.tensor_scale` of its result and
`dequantize_rows` takes it as `tensor_scale=`.

Importing this package does not import numba: the first call does, and compiles (or loads from
numba's on-disk cache) the kernel for its argument types. Threads: the `num_threads` argument,
else the QUANTIZE_NUM_THREADS environment variable, else numba's default (all cores); capped at
numba's thread pool size. Results do not depend on the thread count.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np

FORMATS = (
    "int4",
    "uint4",
    "int4_ort",
    "fp4_e2m1",
    "mxfp4",
    "mxfp4_ceil",
    "nvfp4",
    "nf4",
    "nf4_dq",
)
#: formats that dequantize with another format's kernel: their stored scales are plain float32
#: (nf4_dq's are the decoded double-quantized ones)
DEQUANTIZE_ALIASES = {"nf4_dq": "nf4", "int4_ort": "uint4"}
#: formats with a second-level tensor scale (quantize_rows returns it, dequantize_rows takes it)
TENSOR_SCALE_FORMATS = ("nvfp4",)
#: the E2M1 formats' scale rule in `fp4.quantize_e2m1` (fp4.MODE_*, without importing numba)
_E2M1_MODES = {"fp4_e2m1": 0, "mxfp4": 1, "mxfp4_ceil": 2, "nvfp4": 3}
#: the integer formats' rule in `intvec.quantize_int` (intvec.INT4, ...)
_INT_CODES = {"int4": 0, "uint4": 1, "int4_ort": 2}
_BF16 = np.dtype(ml_dtypes.bfloat16)
# how each element type reaches the kernels (numba has no CPU float16/bfloat16)
_VIEWS = {
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float16): np.dtype(np.uint16),
    _BF16: np.dtype(np.int16),
    np.dtype(np.float64): np.dtype(np.float64),
}
QUANTIZE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), _BF16)
DEQUANTIZE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), _BF16, np.dtype(np.float64))
ENV_THREADS = "QUANTIZE_NUM_THREADS"
#: results at least this large are written with non-temporal stores (int4/uint4 to float32)
_STREAM_MIN_BYTES = 64 << 20
_X86 = platform.machine().lower() in ("x86_64", "amd64")
#: elements per parallel work item (a run of blocks in one row), fewer when there is little work
_ITEM_ELEMENTS = 4096
_MIN_ITEMS = 64

_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()  # one launch at a time: numba's workqueue layer is not thread-safe


def available(fmt_name: str, dtype: Any, op: str = "quantize") -> bool:
    """True if a kernel handles `fmt_name` with `dtype`: the input dtype for op="quantize", the
    output dtype for op="dequantize" (from float32 scales). Does not import numba."""
    if op not in ("quantize", "dequantize"):
        raise ValueError(f"op must be 'quantize' or 'dequantize', got {op!r}")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return False
    dtypes = QUANTIZE_DTYPES if op == "quantize" else DEQUANTIZE_DTYPES
    if op == "dequantize":
        fmt_name = DEQUANTIZE_ALIASES.get(fmt_name, fmt_name)
    return fmt_name in FORMATS and dt in dtypes and _numba_installed()


ENV_SWITCH = "QUANTIZE_KERNELS"
#: below this many elements the NumPy path is as fast as a kernel's first call costs
MIN_KERNEL_ELEMENTS = 1 << 18


def wanted(
    fmt: Any, dtype: Any, size: int, op: str = "quantize", *, tensor_scale: bool = False
) -> bool:
    """Should the core hand this job to a kernel? A registered format with a kernel, a dtype the
    kernels take, at least MIN_KERNEL_ELEMENTS elements, and QUANTIZE_KERNELS not "0".

    Formats with a tensor scale (nvfp4) only if the caller says it handles one
    (`tensor_scale=True`: it takes `.tensor_scale` from quantize_rows' result, or passes
    `tensor_scale=` to dequantize_rows); a caller that does not would lose it.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0" or size < MIN_KERNEL_ELEMENTS:
        return False
    if not tensor_scale and getattr(fmt, "name", None) in TENSOR_SCALE_FORMATS:
        return False
    from ..formats import available_formats, get_format

    name = getattr(fmt, "name", None)
    registered = name in available_formats() and get_format(name) is fmt
    return registered and available(name, dtype, op)


def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def _kernels(fmt_name: str = "int4") -> ModuleType:
    """The module holding `fmt_name`'s kernels; importing it imports numba."""
    if fmt_name in ("int4", "uint4", "int4_ort"):
        key = "intvec"
    elif fmt_name in ("nf4", "nf4_dq"):
        key = "nf4"
    else:
        key = "fp4"
    module = _modules.get(key)
    if module is None:
        import importlib

        module = _modules[key] = importlib.import_module(f"{__name__}.{key}")
    return module


class QuantizedRows(tuple):
    """`quantize_rows`' result: the 3-tuple (packed, scales, zero_points), so it unpacks as one,
    plus `tensor_scale`: nvfp4's float32 tensor scale, None for the other formats, and
    `double_quant`: nf4_dq's `formats.nf4.DoubleQuant` of the scales (flattened in C order, as
    a tensor's), None for the others."""

    tensor_scale: np.float32 | None
    double_quant: Any

    def __new__(cls, packed, scales, zero_points, tensor_scale=None, double_quant=None):
        self = super().__new__(cls, (packed, scales, zero_points))
        self.tensor_scale = tensor_scale
        self.double_quant = double_quant
        return self

    def __getnewargs__(self):  # pickling and copying keep the tensor scale
        return (*self, self.tensor_scale, self.double_quant)

    @property
    def packed(self) -> np.ndarray:
        return self[0]

    @property
    def scales(self) -> np.ndarray:
        return self[1]

    @property
    def zero_points(self) -> np.ndarray | None:
        return self[2]


def _resolve_threads(num_threads: int | None) -> int | None:
    """The requested thread count (argument, else environment), or None for numba's default."""
    if num_threads is None:
        env = os.environ.get(ENV_THREADS, "").strip()
        if not env:
            return None
        try:
            num_threads = int(env)
        except ValueError:
            raise ValueError(f"{ENV_THREADS} must be a positive integer, got {env!r}") from None
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise TypeError(f"num_threads must be an integer, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return int(num_threads)


@contextlib.contextmanager
def _launch(num_threads: int | None) -> Iterator[None]:
    """Serialise launches and run them with `num_threads` threads, restoring numba's setting."""
    import numba

    wanted = _resolve_threads(num_threads)
    with _lock:
        before = numba.get_num_threads()
        if wanted is not None:
            numba.set_num_threads(min(wanted, numba.config.NUMBA_NUM_THREADS))
        try:
            yield
        finally:
            numba.set_num_threads(before)


def _chunk(rows: int, nb: int, bs: int) -> int:
    """Blocks per work item: about _ITEM_ELEMENTS elements, an even number of them (so no byte
    is shared by two items), and at least _MIN_ITEMS items when there are enough blocks."""
    c = max(1, min(_ITEM_ELEMENTS // bs, (rows * nb) // _MIN_ITEMS))
    if c * bs % 2:
        c += 1
    return nb if c >= nb else c


def _check_format(fmt_name: Any) -> str:
    if fmt_name not in FORMATS:
        raise ValueError(f"no kernel for format {fmt_name!r}; kernels exist for {FORMATS}")
    return fmt_name


def _check_block(block_size: Any, n: int) -> int:
    if block_size is None:
        return n
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size must be an integer, got {type(block_size).__name__}")
    if block_size == -1:
        return n
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 (or -1/None for one block), got {block_size}")
    return int(block_size)


def quantize_rows(
    fmt_name: str, x2d: np.ndarray, block_size: int | None, *, num_threads: int | None = None
) -> QuantizedRows:
    """Quantize each row of `x2d` (rows, n) in blocks of `block_size` along it.

    Returns (packed uint8 (rows, ceil(nb*bs/2)), scales float32 (rows, nb), zero points uint8
    (rows, nb) for uint4 / None for the others), nb = ceil(n / block_size): the layout of
    `QuantizedTensor` for a tensor quantized along its last axis. The result's `.tensor_scale` is
    nvfp4's float32 tensor scale (of the whole array), None for the other formats. The input
    must be finite (the NumPy path checks; the kernel does not). A non-contiguous input is copied
    first.
    """
    _check_format(fmt_name)
    x = np.asarray(x2d)
    if x.ndim != 2:
        raise ValueError(f"x2d must be 2-D (rows, n), got shape {x.shape}")
    if x.dtype not in QUANTIZE_DTYPES:
        raise TypeError(f"no kernel for {x.dtype} input; supported: float32, float16, bfloat16")
    rows, n = x.shape
    if n == 0:
        raise ValueError("x2d has rows of length 0; there is nothing to quantize")
    bs = _check_block(block_size, n)
    nb = -(-n // bs)
    packed = np.empty((rows, -(-nb * bs // 2)), np.uint8)
    scales = np.empty((rows, nb), np.float32)
    zp = np.empty((rows, nb), np.uint8) if fmt_name in ("uint4", "int4_ort") else None
    two_level = fmt_name in TENSOR_SCALE_FORMATS
    if rows == 0:
        return QuantizedRows(packed, scales, zp, np.float32(1.0) if two_level else None)
    xv = np.ascontiguousarray(x).view(_VIEWS[x.dtype])
    k = _kernels(fmt_name)
    chunk = _chunk(rows, nb, bs)
    ts = dq = None
    with _launch(num_threads):
        if fmt_name in _INT_CODES:
            zpa = np.empty((1, nb), np.uint8) if zp is None else zp  # int4: a placeholder
            k.quantize_int(xv, packed, scales, zpa, bs, chunk, _INT_CODES[fmt_name])
        elif fmt_name == "nf4":
            k.quantize_nf4(xv, packed, scales, bs, chunk, False)
        elif fmt_name == "nf4_dq":  # block amaxes, their 8-bit compression, codes against it
            _kernels("fp4").block_amax(xv, scales, bs, chunk)
            dq = _double_quantize(scales)
            k.quantize_nf4(xv, packed, scales, bs, chunk, True)
        else:
            if two_level:  # block amaxes into `scales` first; their max gives the tensor scale
                key = k.block_amax(xv, scales, bs, chunk)
                ts = _nvfp4_tensor_scale(np.int32(key).view(np.float32))
            k.quantize_e2m1(
                xv,
                packed,
                scales,
                bs,
                chunk,
                _E2M1_MODES[fmt_name],
                np.float32(1.0) if ts is None else ts,
                two_level,
            )
    return QuantizedRows(packed, scales, zp, ts, dq)


def _double_quantize(scales: np.ndarray) -> Any:
    """nf4_dq's scales from the block amaxes in `scales` (overwritten with the stored scales,
    as `NF4DoubleQuant` computes them: all-zero blocks are those whose amax is 0)."""
    from ..formats.nf4 import double_quantize

    dq = double_quantize(scales, zero=scales == 0)
    scales[...] = dq.values()
    return dq


def _stream(out: np.ndarray, bs: int) -> bool:
    """Write `out` with non-temporal stores? Only a float32 result too large to stay in the
    cache (a plain store first reads every line it writes), on x86-64, with its vector stores
    16-byte aligned (row starts and blocks of a multiple of 16 elements)."""
    return (
        out.dtype == np.float32
        and out.nbytes >= _STREAM_MIN_BYTES
        and bs % 16 == 0
        and out.shape[1] % 4 == 0
        and out.ctypes.data % 16 == 0
        and _X86
    )


def _nvfp4_tensor_scale(amax: np.float32) -> np.float32:
    """NVFP4's tensor scale for a tensor whose largest magnitude is `amax` (float32), by the
    format's own rule (`NVFP4.tensor_scale` reads only the amax)."""
    from ..formats import get_format

    return np.float32(get_format("nvfp4").tensor_scale(np.array([amax], np.float32)))


def dequantize_rows(
    fmt_name: str,
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    n: int,
    block_size: int | None,
    out_dtype: Any = np.float32,
    *,
    num_threads: int | None = None,
    out: np.ndarray | None = None,
    tensor_scale: Any = None,
) -> np.ndarray:
    """Inverse of `quantize_rows`: (rows, n) values of `out_dtype`, padding dropped.

    x = code * scale (int4), (code - zero_point) * scale (uint4), grid value * scale (fp4_e2m1,
    mxfp4, mxfp4_ceil, nf4) or grid value * (scale * tensor_scale) (nvfp4, which needs its
    `tensor_scale`: the float32 quantize_rows returns, or any finite float > 0, taken as the
    NumPy path takes it; the others take None), rounded to `out_dtype` with values past its
    range clamped to its largest finite value, as `QuantizedTensor.dequantize` does. `out`, if
    given, must be a C-contiguous (rows, n) array of `out_dtype`; it is filled and returned.
    nf4_dq (decoded float32 scales) dequantizes as nf4.
    """
    fmt_name = DEQUANTIZE_ALIASES.get(fmt_name, fmt_name)
    _check_format(fmt_name)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n = int(n)
    bs = _check_block(block_size, n)
    dt = np.dtype(out_dtype)
    if dt not in DEQUANTIZE_DTYPES:
        raise TypeError(f"no kernel for {dt} output; supported: float32/16/64, bfloat16")
    packed = np.asarray(packed)
    scales = np.asarray(scales)
    nb = -(-n // bs)
    if scales.ndim != 2 or scales.shape[1] != nb or scales.dtype != np.float32:
        raise ValueError(f"scales must be float32 (rows, {nb}), got {scales.dtype} {scales.shape}")
    rows = scales.shape[0]
    width = -(-nb * bs // 2)
    if packed.dtype != np.uint8 or packed.shape != (rows, width):
        raise ValueError(f"packed must be uint8 {(rows, width)}, got {packed.dtype} {packed.shape}")
    if fmt_name == "uint4":
        if zero_points is None:
            raise ValueError("uint4 needs zero_points")
        zero_points = np.asarray(zero_points)
        if zero_points.dtype != np.uint8 or zero_points.shape != scales.shape:
            raise ValueError(
                f"zero_points must be uint8 {scales.shape}, got "
                f"{zero_points.dtype} {zero_points.shape}"
            )
    elif zero_points is not None:
        raise ValueError(f"{fmt_name} has no zero points; pass None")
    two_level = fmt_name in TENSOR_SCALE_FORMATS
    ts = np.float64(1.0)
    if two_level:
        if tensor_scale is None:
            raise ValueError(f"{fmt_name} needs its tensor_scale")
        ts = np.float64(tensor_scale)
        if not (np.isfinite(ts) and ts > 0):
            raise ValueError(f"tensor_scale must be finite and > 0, got {tensor_scale!r}")
    elif tensor_scale is not None:
        raise ValueError(f"{fmt_name} has no tensor scale; pass None")
    if out is None:
        out = np.empty((rows, n), dt)
    elif out.dtype != dt or out.shape != (rows, n) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dt} array of shape {(rows, n)}")
    if rows == 0:
        return out
    packed = np.ascontiguousarray(packed)
    scales = np.ascontiguousarray(scales)
    ov = out.view(_VIEWS[dt])
    k = _kernels(fmt_name)
    chunk = _chunk(rows, nb, bs)
    with _launch(num_threads):
        if fmt_name in ("int4", "uint4"):
            signed = fmt_name == "int4"
            zp = np.empty((1, nb), np.uint8) if signed else np.ascontiguousarray(zero_points)
            k.dequantize_int(packed, scales, zp, ov, bs, chunk, signed, _stream(out, bs))
        elif fmt_name == "nf4":
            k.dequantize_nf4(packed, scales, ov, bs, chunk)
        else:
            k.dequantize_e2m1(packed, scales, ov, bs, chunk, ts, two_level)
    return out


__all__ = [
    "DEQUANTIZE_DTYPES",
    "ENV_THREADS",
    "FORMATS",
    "QUANTIZE_DTYPES",
    "TENSOR_SCALE_FORMATS",
    "QuantizedRows",
    "available",
    "dequantize_rows",
    "quantize_rows",
]
