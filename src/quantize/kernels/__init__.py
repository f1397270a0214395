"""Fused compiled kernels for int4/uint4: quantize+pack and unpack+dequantize, one pass over memory.

They work on the core's 2-D layout, a C-contiguous (rows, n) array with the quantized axis last,
and return exactly what the NumPy path returns (`quantize.kernels.reference`, bit for bit):

    packed, scales, zero_points = quantize_rows("uint4", x2d, 128)
    x = dequantize_rows("uint4", packed, scales, zero_points, n, 128, np.float32)

Supported: formats "int4" and "uint4" with clip_ratio 1 (the round-to-nearest rule);
quantize from float32, float16 or bfloat16 (float32 scales; other dtypes stay on the NumPy path,
or cast them to float32 first, which is what the NumPy path does); dequantize from float32
scales to float32, float16, bfloat16 or float64, rounded and saturating exactly as
`QuantizedTensor.dequantize` does (once from the exact value; bfloat16 through float32, as
ml_dtypes casts). `available(fmt, dtype, op)` says which.

Importing this package does not import numba: the first call does, and compiles (or loads from
numba's on-disk cache) the kernel for its argument types. Threads: the `num_threads` argument,
else the QUANTIZE_NUM_THREADS environment variable, else numba's default (all cores); capped at
numba's thread pool size. Results do not depend on the thread count.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np

FORMATS = ("int4", "uint4")
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
#: elements per parallel work item (a run of blocks in one row), fewer when there is little work
_ITEM_ELEMENTS = 4096
_MIN_ITEMS = 64

_module: ModuleType | None = None
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
    return fmt_name in FORMATS and dt in dtypes and _numba_installed()


ENV_SWITCH = "QUANTIZE_KERNELS"
#: below this many elements the NumPy path is as fast as a kernel's first call costs
MIN_KERNEL_ELEMENTS = 1 << 18


def wanted(fmt: Any, dtype: Any, size: int, op: str = "quantize") -> bool:
    """Should the core hand this job to a kernel? The registered int4/uint4 rule, a dtype the
    kernels take, at least MIN_KERNEL_ELEMENTS elements, and QUANTIZE_KERNELS not "0"."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or size < MIN_KERNEL_ELEMENTS:
        return False
    from ..formats import available_formats, get_format

    name = getattr(fmt, "name", None)
    registered = name in available_formats() and get_format(name) is fmt
    return registered and available(name, dtype, op)


def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def _kernels() -> ModuleType:
    global _module
    if _module is None:
        from . import int4  # imports numba

        _module = int4
    return _module


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize each row of `x2d` (rows, n) in blocks of `block_size` along it.

    Returns (packed uint8 (rows, ceil(nb*bs/2)), scales float32 (rows, nb), zero points uint8
    (rows, nb) for uint4 / None for int4), nb = ceil(n / block_size): the layout of
    `QuantizedTensor` for a tensor quantized along its last axis. The input must be finite (the
    NumPy path checks; the kernel does not). A non-contiguous input is copied first.
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
    zp = np.empty((rows, nb), np.uint8) if fmt_name == "uint4" else None
    if rows == 0:
        return packed, scales, zp
    xv = np.ascontiguousarray(x).view(_VIEWS[x.dtype])
    k = _kernels()
    chunk = _chunk(rows, nb, bs)
    with _launch(num_threads):
        if zp is None:
            k.quantize_int4(xv, packed, scales, bs, chunk)
        else:
            k.quantize_uint4(xv, packed, scales, zp, bs, chunk)
    return packed, scales, zp


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
) -> np.ndarray:
    """Inverse of `quantize_rows`: (rows, n) values of `out_dtype`, padding dropped.

    x = code * scale (int4) or (code - zero_point) * scale (uint4), rounded to `out_dtype` with
    values past its range clamped to its largest finite value, as `QuantizedTensor.dequantize`
    does. `out`, if given, must be a
    C-contiguous (rows, n) array of `out_dtype`; it is filled and returned.
    """
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
        raise ValueError("int4 has no zero points; pass None")
    if out is None:
        out = np.empty((rows, n), dt)
    elif out.dtype != dt or out.shape != (rows, n) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dt} array of shape {(rows, n)}")
    if rows == 0:
        return out
    packed = np.ascontiguousarray(packed)
    scales = np.ascontiguousarray(scales)
    ov = out.view(_VIEWS[dt])
    k = _kernels()
    chunk = _chunk(rows, nb, bs)
    with _launch(num_threads):
        if fmt_name == "int4":
            k.dequantize_int4(packed, scales, ov, bs, chunk)
        else:
            zp = np.ascontiguousarray(zero_points)
            k.dequantize_uint4(packed, scales, zp, ov, bs, chunk)
    return out


__all__ = [
    "DEQUANTIZE_DTYPES",
    "ENV_THREADS",
    "FORMATS",
    "QUANTIZE_DTYPES",
    "available",
    "dequantize_rows",
    "quantize_rows",
]
