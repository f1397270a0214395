"""`QuantizedTensor`: packed codes plus everything needed to turn them back into numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from .blocking import from_blocks, params_to_axis
from .formats import Format, get_format
from .packing import unpack_nibbles


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

    def dequantize(self, dtype: DTypeLike | None = None) -> np.ndarray:
        """The tensor back in `dtype` (default: the input's float dtype, float32 for int input)."""
        _, n, axis = self._work_shape
        values = self.fmt.dequantize_blocks(
            self.codes(), self.scales, self.zero_points, self.tensor_scale
        )
        out = from_blocks(values, n, axis)
        if self.axis is None:
            out = out.reshape(self.shape)
        target = np.dtype(dtype) if dtype is not None else self.float_dtype
        return np.ascontiguousarray(out.astype(target, copy=False))

    @property
    def float_dtype(self) -> np.dtype:
        from ._checks import is_float_dtype

        return self.dtype if is_float_dtype(self.dtype) else np.dtype(np.float32)

    def scales_along_axis(self) -> np.ndarray:
        """Scales in the tensor's own layout, nb at `axis` (ONNX block-wise DequantizeLinear)."""
        return self.scales if self.axis is None else params_to_axis(self.scales, self.axis)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes as stored: codes, scales (at the format's width), zero points, tensor scale."""
        bits = self.fmt.scale_bits
        scales = self.scales.nbytes if bits is None else -(-self.scales.size * bits // 8)
        zp = 0 if self.zero_points is None else self._zero_point_bytes()
        ts = 0 if self.tensor_scale is None else 4
        return int(self.data.nbytes + scales + zp + ts)

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
