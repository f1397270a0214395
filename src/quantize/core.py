"""The one core: array in, `QuantizedTensor` out. Every public door ends up here."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

from . import kernels
from ._checks import (
    as_real_array,
    check_block_size,
    check_finite,
    check_nan_policy,
    check_nonempty,
    normalize_axis,
    replace_nonfinite,
)
from .algorithms import RTN, Method, get_method
from .blocking import n_blocks, to_blocks
from .formats import Format, get_format
from .formats.base import effective_scale
from .packing import pack_nibbles
from .tensor import QuantizedTensor


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays float64; everything else (float16, bfloat16, ints, float32) runs in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def prepare(array: Any, name: str = "array", nan: str = "raise") -> np.ndarray:
    """Checked input: a non-empty, finite array of real numbers (TypeError/ValueError otherwise).

    nan="zero" lets NaN/Inf through, for `quantize_prepared(..., nan="zero")` to replace."""
    arr = as_real_array(array, name)
    check_nonempty(arr, name)
    if check_nan_policy(nan) == "raise":
        check_finite(arr, name)
    if not arr.dtype.isnative:  # big-endian input: compute and answer in native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def resolve_block(n: int, block_size: int | str | None, fmt: Format) -> int:
    """ "auto": the format's default; None or -1: one block per row (per-channel); else > 0."""
    if isinstance(block_size, str):
        if block_size != "auto":
            raise TypeError(f"block_size must be an int, None or 'auto', got {block_size!r}")
        return fmt.default_block_size
    if block_size is None or (not isinstance(block_size, bool) and block_size == -1):
        return n
    return check_block_size(block_size)


def quantize_tensor(
    array: Any,
    format: str | Format = "int4",
    block_size: int | str | None = "auto",
    axis: int | None = -1,
    *,
    clip_ratio: float = 1.0,
    method: str = "rtn",
    nan: str = "raise",
) -> QuantizedTensor:
    """Quantize `array` block-wise along `axis` with `format`, codes rounded to nearest.

    block_size: elements per block along `axis`; "auto" for the format's usual size (128 for
    the integer formats, 16 nvfp4, 32 mxfp4, 64 nf4); None or -1 for one block per row. A
    length not divisible by it gets a padded last block. axis=None flattens the tensor first
    (with block_size=None: one scale for the whole tensor). clip_ratio in (0, 1] shrinks each
    block's range before the scale is chosen (values beyond it clip). method chooses each
    block's scale and zero point: "rtn" (the format's own rule), or another registered in
    `quantize.algorithms` ("mse", "hqq", ...).
    nan: what to do with NaN and +-Inf. "raise" (default): a ValueError naming the first bad
    index. "zero": NaN becomes 0, +Inf / -Inf the largest / smallest finite value of its block
    (0 if the block has none), before anything else, so the block's scale is what its finite
    values make it; every path (kernels, NumPy, methods) then quantizes the same finite array.
    """
    return quantize_prepared(
        prepare(array, nan=nan), format, block_size, axis, clip_ratio, method, nan=nan
    )


def quantize_prepared(
    arr: np.ndarray,
    format: str | Format,
    block_size: int | str | None,
    axis: int | None,
    clip_ratio: float = 1.0,
    method: str = "rtn",
    nan: str = "raise",
) -> QuantizedTensor:
    """`quantize_tensor` for an array that `prepare` has already checked (under its own name;
    with nan="zero" its NaN/Inf are replaced here, block by block, see `quantize_tensor`)."""
    fmt = get_format(format)
    algo = get_method(method)
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, numbers.Real):
        raise TypeError(f"clip_ratio must be a number in (0, 1], got {clip_ratio!r}")
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be a number in (0, 1], got {clip_ratio!r}")
    if arr.ndim == 0 and axis is not None:
        normalize_axis(axis, 1)  # a scalar has one axis to speak of: 0 or -1
    work = arr.reshape(-1) if axis is None or arr.ndim == 0 else arr
    ax = 0 if axis is None or arr.ndim == 0 else normalize_axis(axis, arr.ndim)
    n = work.shape[ax]
    bs = resolve_block(n, block_size, fmt)
    dq = kernel_dq = None  # nf4_dq's double quantization: by the NumPy path / the kernels
    if check_nan_policy(nan) == "zero":
        work = replace_nonfinite(work, bs, ax)

    if (
        algo is RTN
        and clip_ratio == 1.0
        and compute_dtype(arr.dtype) == np.float32
        and kernels.wanted(fmt, np.float32, arr.size, tensor_scale=True)
    ):
        data, scale, zp, tensor_scale, kernel_dq = _quantize_with_kernel(work, fmt.name, bs, ax)
    elif (
        fmt.name in getattr(algo, "kernel_formats", ())  # a method with its own compiled path
        and compute_dtype(arr.dtype) == np.float32
        and kernels.wanted(fmt, np.float32, arr.size, tensor_scale=True)
    ):
        rows_fn = lambda x2d: algo.quantize_rows(fmt.name, x2d, bs, clip_ratio)  # noqa: E731
        data, scale, zp, tensor_scale, kernel_dq = _quantize_with_kernel(
            work, fmt.name, bs, ax, rows_fn
        )
    else:
        if getattr(fmt, "double_quant", False):  # nf4_dq: the method's scales, compressed
            algo = dq = _DoubleQuantScales(algo)
        data, scale, zp, tensor_scale = _quantize_with_numpy(work, fmt, bs, ax, clip_ratio, algo)
    return QuantizedTensor(
        data=np.ascontiguousarray(data),
        scales=np.ascontiguousarray(scale),
        zero_points=None if zp is None else np.ascontiguousarray(zp),
        format=fmt.name,
        block_size=bs,
        axis=None if axis is None or arr.ndim == 0 else ax,
        shape=tuple(arr.shape),
        dtype=arr.dtype,
        tensor_scale=tensor_scale,
        double_quant=kernel_dq if dq is None else dq.state,
    )


class _DoubleQuantScales:
    """A method for a double-quantized format (nf4_dq): the scales `method` chooses, passed
    through `fmt.compress_scales`; the codes are then chosen against the stored scales, and
    `state` keeps the compressed form for the QuantizedTensor."""

    def __init__(self, method: Method):
        self.method = method
        self.masks_padding = getattr(method, "masks_padding", False)
        self.state = None

    def choose_params(self, fmt, blocks, tensor_scale, clip_ratio=1.0, **kw):
        scale, zp = self.method.choose_params(fmt, blocks, tensor_scale, clip_ratio, **kw)
        self.state = fmt.compress_scales(scale, blocks)
        return self.state.values(), zp


def _quantize_with_numpy(
    work: np.ndarray, fmt: Format, bs: int, ax: int, clip_ratio: float, algo: Method = RTN
):
    """The reference path: every format, dtype and method; what the kernels are held to."""
    n = work.shape[ax]
    blocks = to_blocks(work.astype(compute_dtype(work.dtype), copy=False), bs, ax)
    tensor_scale = fmt.tensor_scale(blocks)
    # to_blocks pads with the row's last value, which every range rule ignores; a method that
    # scores errors is told how much of each row's last block is real (`masks_padding`)
    pad = n_blocks(n, bs) * bs - n
    if pad and getattr(algo, "masks_padding", False):
        scale, zp = algo.choose_params(fmt, blocks, tensor_scale, clip_ratio, last_valid=bs - pad)
    else:
        scale, zp = algo.choose_params(fmt, blocks, tensor_scale, clip_ratio)
    if pad:  # the padding is stored as the code of 0, whatever value stood in for it
        blocks[..., -1, bs - pad :] = 0
    codes = fmt.encode(blocks, effective_scale(scale, tensor_scale), zp)
    flat = codes.reshape(*codes.shape[:-2], -1)
    data = pack_nibbles(flat) if fmt.bits == 4 else flat.view(np.uint8)
    return data, scale, zp, tensor_scale


def _quantize_with_kernel(work: np.ndarray, name: str, bs: int, ax: int, rows_fn=None):
    """The fused numba path (bit for bit the NumPy path's result, nvfp4's tensor scale included).

    rows_fn: a method's own kernel, (rows, n) array -> QuantizedRows; None: round to nearest."""
    moved = np.moveaxis(work, ax, -1)  # a view; C-contiguous already when ax is the last axis
    rows, n = moved.shape[:-1], moved.shape[-1]
    if not kernels.available(name, moved.dtype):  # ints, float8: widen as the NumPy path does
        moved = moved.astype(np.float32)
    x2d = np.ascontiguousarray(moved).reshape(-1, n)
    res = kernels.quantize_rows(name, x2d, bs) if rows_fn is None else rows_fn(x2d)
    packed, scale, zp = res
    zp = None if zp is None else zp.reshape(*rows, -1)
    dq = getattr(res, "double_quant", None)  # nf4_dq: its codes take the scales' shape
    if dq is not None:
        dq = dataclasses.replace(dq, codes=dq.codes.reshape(*rows, -1))
    return packed.reshape(*rows, -1), scale.reshape(*rows, -1), zp, res.tensor_scale, dq


def dequantize_tensor(qt: QuantizedTensor, dtype: Any = None) -> np.ndarray:
    """`qt` back to numbers; same as `qt.dequantize(dtype)`."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    return qt.dequantize(dtype)
