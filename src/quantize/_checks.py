"""Argument checks shared by every public door: one place decides what bad input is.

Each check raises TypeError (wrong kind of thing) or ValueError (right kind, bad value) with a
message that starts with the argument's name, so the user knows which argument to fix.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any

import ml_dtypes
import numpy as np

# float dtypes we accept as input besides NumPy's own floats.
_EXTRA_FLOATS = tuple(
    np.dtype(getattr(ml_dtypes, n))
    for n in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")
    if hasattr(ml_dtypes, n)
)


def is_float_dtype(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype in _EXTRA_FLOATS


def as_real_array(x: Any, name: str) -> np.ndarray:
    """`x` as an ndarray of real numbers (float or int), or a TypeError naming `name`."""
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}")
    if hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
        # not exportable to CPU memory: np.asarray below gets its chance
        with contextlib.suppress(TypeError, RuntimeError, BufferError):
            x = np.from_dlpack(x)
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of numbers: {exc}") from None
    dt = arr.dtype
    if dt == np.bool_ or not (np.issubdtype(dt, np.integer) or is_float_dtype(dt)):
        raise TypeError(f"{name} must hold real numbers (float or int), got dtype {dt}")
    return arr


def check_finite(arr: np.ndarray, name: str) -> None:
    """ValueError naming `name` and the first NaN/Inf index, if there is one."""
    if np.issubdtype(arr.dtype, np.integer):
        return
    finite = np.isfinite(arr if arr.dtype.kind == "f" else arr.astype(np.float32))
    if not finite.all():
        bad = np.unravel_index(int(np.argmin(finite)), arr.shape) if arr.ndim else ()
        value = arr[bad] if arr.ndim else arr[()]
        where = tuple(int(i) for i in bad)
        raise ValueError(f"{name} contains a non-finite value ({float(value)}) at index {where}")


def check_nonempty(arr: np.ndarray, name: str) -> None:
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); there is nothing to quantize")


def as_int(x: Any, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(x).__name__} {x!r}")
    return int(x)


def as_bool(x: Any, name: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(x).__name__} {x!r}")
    return bool(x)


def as_finite_float(x: Any, name: str) -> float:
    """A finite real number (one-element arrays too), or a TypeError/ValueError naming `name`."""
    if isinstance(x, np.ndarray) and x.size == 1 and x.dtype.kind in "fiu":
        x = x.reshape(()).item()
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
    v = float(x)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def as_positive_float(x: Any, name: str) -> float:
    """A finite number > 0 (a scale, a multiplier), or a TypeError/ValueError naming `name`."""
    v = as_finite_float(x, name)
    if v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {v}")
    return v


def normalize_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    a = as_int(axis, name)
    if not -ndim <= a < ndim:
        raise ValueError(f"{name}={a} is out of range for an array with {ndim} dimension(s)")
    return a % ndim


def check_block_size(block_size: Any, name: str = "block_size") -> int:
    b = as_int(block_size, name)
    if b <= 0:
        raise ValueError(f"{name} must be > 0 (or -1/None for one block per row), got {b}")
    return b


def check_codes(arr: Any, lo: int, hi: int, name: str) -> np.ndarray:
    """Integer codes in [lo, hi] (floats allowed only if integral), as an ndarray."""
    a = as_real_array(arr, name)
    if a.size == 0:
        return a
    if not np.issubdtype(a.dtype, np.integer):
        check_finite(a, name)
        if not np.array_equal(a, np.round(a)):
            raise ValueError(f"{name} must hold whole numbers (quantized codes)")
    mn, mx = a.min(), a.max()
    if mn < lo or mx > hi:
        bad = int(np.argmax((a < lo) | (a > hi)))
        idx = np.unravel_index(bad, a.shape)
        raise ValueError(
            f"{name} must lie in [{lo}, {hi}]; found {a[idx]} at index {tuple(int(i) for i in idx)}"
        )
    return a
