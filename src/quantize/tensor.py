"""`QuantizedTensor`: packed codes plus everything needed to turn them back into numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from . import kernels
from ._checks import check_finite, is_float_dtype
from .blocking import from_blocks, params_to_axis
from .formats import Format, get_format
from .formats.nf4 import DoubleQuant
from .packing import unpack_nibbles


def _saturating_cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` in `dtype`, clamping overflow to the dtype's largest finite value.

    Inputs were finite, so an inf here is a grid point past the output dtype's range (a float16
    near 65504, or mxfp4_ceil's 2^128 in float32); the largest finite value is closer to the
    original than inf, and within the format's half-step bound.
    """
    with np.errstate(over="ignore"):
        out = values.astype(dtype, copy=False)
    if np.issubdtype(out.dtype, np.integer):
        return out
    bad = np.isinf(out)
    if bad.any():
        top = np.array(
            np.finfo(dtype).max if np.issubdtype(dtype, np.floating) else _ml_max(dtype),
            dtype=dtype,
        )
        out = np.where(bad, np.where(out > 0, top, -top), out).astype(dtype)
    return out


def _ml_max(dtype: np.dtype):
    import ml_dtypes

    return ml_dtypes.finfo(dtype).max


def _float_dtype(dtype: DTypeLike) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a float dtype, got {dtype!r}") from None
    if not is_float_dtype(dt):
        raise TypeError(f"dtype must be a float dtype (float16/32/64, bfloat16), got {dt}")
    return dt


def _check_fields(qt: QuantizedTensor) -> None:
    """A QuantizedTensor built by hand or read from a file must still make sense."""
    fmt = get_format(qt.format)
    shape = tuple(qt.shape)
    if any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        raise ValueError(f"shape must be a tuple of sizes >= 0, got {qt.shape}")
    if qt.axis is not None and not 0 <= qt.axis < max(len(shape), 1):
        raise ValueError(f"axis {qt.axis} is out of range for shape {shape}")
    rows, n, _ = qt._work_shape
    if not isinstance(qt.block_size, (int, np.integer)) or qt.block_size <= 0:
        raise ValueError(f"block_size must be an int > 0, got {qt.block_size!r}")
    nb = -(-n // qt.block_size)
    if qt.scales.shape != (*rows, nb):
        raise ValueError(f"scales has shape {qt.scales.shape}; this tensor needs {(*rows, nb)}")
    if not is_float_dtype(qt.scales.dtype):
        raise TypeError(f"scales must be floats, got {qt.scales.dtype}")
    check_finite(qt.scales, "scales")
    if not (qt.scales > 0).all():
        raise ValueError("scales must be > 0")
    per_row = -(-nb * qt.block_size // 2) if fmt.bits == 4 else nb * qt.block_size
    if qt.data.dtype != np.uint8 or qt.data.shape != (*rows, per_row):
        raise ValueError(
            f"data must be uint8 of shape {(*rows, per_row)}, got {qt.data.dtype} {qt.data.shape}"
        )
    zp = qt.zero_points
    if (zp is None) != (fmt.zero_point is None):
        raise ValueError(f"format {fmt.name} {'needs' if zp is None else 'has no'} zero points")
    if zp is not None:
        if zp.shape != qt.scales.shape:
            raise ValueError(f"zero_points has shape {zp.shape}; it must be {qt.scales.shape}")
        check_finite(zp, "zero_points")
        if fmt.zero_point == "int" and (zp.min() < fmt.code_min or zp.max() > fmt.code_max):
            raise ValueError(f"zero_points must lie in [{fmt.code_min}, {fmt.code_max}]")
    if qt.tensor_scale is not None:
        ts = float(qt.tensor_scale)
        if not (np.isfinite(ts) and ts > 0):
            raise ValueError(f"tensor_scale must be finite and > 0, got {ts}")
    dq = qt.double_quant
    if (dq is None) == getattr(fmt, "double_quant", False):
        raise ValueError(
            f"format {fmt.name} {'needs' if dq is None else 'has no'} double_quant "
            "(double-quantized scales)"
        )
    if dq is not None:
        if not isinstance(dq, DoubleQuant):
            raise TypeError(f"double_quant must be a DoubleQuant, got {type(dq).__name__}")
        dq.check(qt.scales)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A tensor quantized block-wise along one axis.

    Layout (the quantized axis moved last, as ORT MatMulNBits stores B):
      data:        uint8 (*rows, ceil(nb*bs/2)) for 4-bit formats (low nibble first),
                   (*rows, nb*bs) for 8-bit ones; the padding of the last block holds the code of 0.
      scales:      (*rows, nb) float32 (float64 for float64 input), the values the format stores
                   (E8M0/E4M3 values for MX/NVFP4, held exactly in float32).
      zero_points: (*rows, nb) uint8 codes, or floats for float-zero-point formats, or None.
    `rows` are the original shape without `axis`; nb = ceil(shape[axis] / block_size).
    `axis` is None when the tensor was flattened (per-tensor: one block of all elements).
    """

    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    format: str
    block_size: int
    axis: int | None
    shape: tuple[int, ...]
    dtype: np.dtype
    #: second-level float32 scale of two-level formats (NVFP4); effective scale = scales * it.
    tensor_scale: np.float32 | None = None
    #: the 8-bit codes, group absmaxes and offset of double-quantized scales (nf4_dq), which
    #: `scales` hold decoded (`DoubleQuant.values()`); None for every other format.
    double_quant: DoubleQuant | None = None

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    @property
    def _work_shape(self) -> tuple[tuple[int, ...], int, int]:
        """(rows, n, axis) of the array the blocks were cut from."""
        if self.axis is None:
            return (), int(np.prod(self.shape, dtype=np.int64)), 0
        n = self.shape[self.axis]
        rows = self.shape[: self.axis] + self.shape[self.axis + 1 :]
        return rows, n, self.axis

    def codes(self) -> np.ndarray:
        """Unpacked codes, (*rows, nb, bs): int8 for signed formats, uint8 for unsigned ones."""
        rows, _, _ = self._work_shape
        nb = self.scales.shape[-1]
        fmt = self.fmt
        if fmt.bits == 4:
            c = unpack_nibbles(self.data, nb * self.block_size, fmt.signed_codes)
            if not fmt.signed_codes:
                c = c.view(np.uint8)
        else:
            c = self.data.view(np.int8 if fmt.signed_codes else np.uint8)
        return c.reshape(*rows, nb, self.block_size)

    def __post_init__(self) -> None:
        _check_fields(self)

    def dequantize(self, dtype: DTypeLike | None = None) -> np.ndarray:
        """The tensor back in `dtype` (default: the input's float dtype, float32 for int input).

        Each value is the stored one (grid point * scales) rounded once to `dtype`. Values past
        the dtype's range (a grid point just beyond float16's 65504, say) come back as its
        largest finite value, never inf.
        """
        target = self.float_dtype if dtype is None else _float_dtype(dtype)
        if (
            self.scales.dtype == np.float32
            and kernels.wanted(self.fmt, target, self.size, "dequantize", tensor_scale=True)
        ):
            return self._dequantize_with_kernel(target)
        _, n, axis = self._work_shape
        # code * scale (* tensor scale) is exact in float64 for every format here, so computing
        # there and casting once gives the correctly rounded value in any output dtype
        scales = self.scales.astype(np.float64)
        zp = self.zero_points
        if zp is not None and self.fmt.zero_point == "float":
            zp = zp.astype(np.float64)
        with np.errstate(over="ignore"):
            values = self.fmt.dequantize_blocks(self.codes(), scales, zp, self.tensor_scale)
        out = from_blocks(values, n, axis).reshape(self.shape)
        return np.asarray(_saturating_cast(out, target), order="C")

    @property
    def float_dtype(self) -> np.dtype:
        return self.dtype if is_float_dtype(self.dtype) else np.dtype(np.float32)

    def _dequantize_with_kernel(self, target: np.dtype) -> np.ndarray:
        rows, n, axis = self._work_shape
        nb = self.scales.shape[-1]
        zp = None if self.zero_points is None else self.zero_points.reshape(-1, nb)
        out = kernels.dequantize_rows(
            self.format,
            self.data.reshape(-1, self.data.shape[-1]),
            self.scales.reshape(-1, nb),
            zp,
            n,
            self.block_size,
            target,
            tensor_scale=self.tensor_scale,
        ).reshape(*rows, n)
        if self.axis is None:
            return out.reshape(self.shape)
        return np.ascontiguousarray(np.moveaxis(out, -1, axis))

    def scales_along_axis(self) -> np.ndarray:
        """Scales in the tensor's own layout, nb at `axis` (ONNX block-wise DequantizeLinear)."""
        return self.scales if self.axis is None else params_to_axis(self.scales, self.axis)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes as stored: codes, scales (at the format's width), zero points, tensor scale, and
        a double quantization's group absmaxes and offset."""
        bits = self.fmt.scale_bits
        scales = self.scales.nbytes if bits is None else -(-self.scales.size * bits // 8)
        zp = 0 if self.zero_points is None else self._zero_point_bytes()
        ts = 0 if self.tensor_scale is None else 4
        dq = 0 if self.double_quant is None else self.double_quant.extra_nbytes
        return int(self.data.nbytes + scales + zp + ts + dq)

    def _zero_point_bytes(self) -> int:
        zp = self.zero_points
        if zp.dtype == np.uint8 and self.fmt.bits == 4:
            return -(-zp.size // 2)  # stored packed, two per byte, as ONNX/ORT do
        return zp.nbytes

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per original element, scales and zero points included."""
        return 8.0 * self.nbytes / self.size

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(format={self.format!r}, shape={self.shape}, dtype={self.dtype}, "
            f"block_size={self.block_size}, axis={self.axis}, "
            f"bits_per_weight={self.bits_per_weight:.3f})"
        )
