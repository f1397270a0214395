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


#: what `quantize_tensor(..., nan=...)` may do with NaN and +-Inf in its input
NAN_POLICIES = ("raise", "zero")


def check_nan_policy(nan: Any) -> str:
    """`nan` if it is a known policy ("raise" or "zero"), else a TypeError/ValueError naming it."""
    if not isinstance(nan, str):
        raise TypeError(f"nan must be one of {NAN_POLICIES}, got {type(nan).__name__} {nan!r}")
    if nan not in NAN_POLICIES:
        raise ValueError(f"nan must be one of {NAN_POLICIES}, got {nan!r}")
    return nan


def replace_nonfinite(arr: np.ndarray, block_size: int, axis: int) -> np.ndarray:
    """`arr` with NaN -> 0 and +Inf / -Inf -> the largest / smallest finite value of its block
    (blocks of `block_size` along `axis`, as the core cuts them; 0 for a block with no finite
    value), in `arr`'s dtype; `arr` itself when every value is finite.

    Clipping to the block's finite range leaves the block's scale what its finite values make
    it (an Inf would otherwise blow the scale up and zero every other value of the block); the
    replacements are values of `arr` or 0, so they are exact in its dtype. Only rows holding a
    non-finite value are worked on (in float32/float64); the cost is one bool mask and one copy.
    """
    if np.issubdtype(arr.dtype, np.integer):
        return arr
    finite = np.isfinite(arr if arr.dtype.kind == "f" else arr.astype(np.float32))
    if finite.all():
        return arr
    out = np.array(arr, copy=True)
    moved = np.moveaxis(out, axis, -1)  # a view: writing into it writes `out`
    fin = np.moveaxis(finite, axis, -1)
    n = moved.shape[-1]
    bad = ~fin.all(axis=-1)  # the rows with a non-finite value (0-d for a 1-D array: fine)
    work_dtype = np.float64 if arr.dtype == np.float64 else np.float32
    rows = moved[bad].astype(work_dtype)  # (k, n), a copy
    nb = -(-n // block_size)
    padded = np.full((rows.shape[0], nb * block_size), np.nan, work_dtype)
    padded[:, :n] = np.where(fin[bad], rows, np.nan)
    blocks = padded.reshape(-1, nb, block_size)
    # fmax/fmin skip NaN (and give NaN for an all-NaN block, without a warning)
    hi = np.nan_to_num(np.fmax.reduce(blocks, axis=-1), nan=0.0)
    lo = np.nan_to_num(np.fmin.reduce(blocks, axis=-1), nan=0.0)
    hi = np.repeat(hi, block_size, axis=-1)[:, :n]
    lo = np.repeat(lo, block_size, axis=-1)[:, :n]
    fixed = np.where(np.isnan(rows), 0, np.where(rows > 0, hi, lo))
    rows = np.where(fin[bad], rows, fixed)
    moved[bad] = rows.astype(arr.dtype)
    return out
