"""What a format is: how codes map to numbers, and the rule that picks a block's parameters.

A format works on *blocks*: a float array of shape (..., n_blocks, block_size) in its compute
dtype (float32, or float64 for float64 input). It never sees the tensor's shape, axis or padding;
`quantize.core` does that once for every format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


def effective_scale(scale: np.ndarray, tensor_scale) -> np.ndarray:
    """Block scale times the tensor's second-level scale, in the block scales' dtype."""
    if tensor_scale is None:
        return scale
    return (scale * np.asarray(tensor_scale, scale.dtype)).astype(scale.dtype)


class Format(ABC):
    """One 4/8-bit number format. Subclasses are small: params rule, encode, decode."""

    name: str
    bits: int
    code_min: int
    code_max: int
    #: "int" zero points are stored as codes (uint8), "float" ones in the scale dtype.
    zero_point: str | None = None
    #: the block size `quantize_tensor(..., block_size="auto")` uses: the format's spec or habit.
    default_block_size: int = 128
    #: bits one stored block scale costs (8 for E8M0/E4M3 scales); None: the scale array's dtype.
    scale_bits: int | None = None
    #: range ratios above 1 that `method="mse"` tries too, after its shrinking grid: none where
    #: the round-to-nearest scale already covers the block (see MXFP4's)
    search_widen: tuple[float, ...] = ()
    description: str = ""

    @property
    def signed_codes(self) -> bool:
        return self.code_min < 0

    @abstractmethod
    def choose_params(
        self, blocks: np.ndarray, clip_ratio: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(..., nb, bs) floats -> (scale, zero_point), each (..., nb): the round-to-nearest rule.

        `clip_ratio` (0, 1] shrinks the range the scale must cover (1 = the block's whole range).
        """

    def tensor_scale(self, blocks: np.ndarray) -> np.float32 | None:
        """A second-level scale for the whole tensor (NVFP4's float32), or None.

        When there is one, `choose_params` returns the block scales as stored (e.g. E4M3 values)
        and `encode`/`decode` receive the effective scale, block scale * tensor scale.
        """
        return None

    @abstractmethod
    def encode(
        self, blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None
    ) -> np.ndarray:
        """(..., nb, bs) floats and (..., nb) effective params -> int8/uint8 codes, same shape."""

    @abstractmethod
    def decode(
        self, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None
    ) -> np.ndarray:
        """(..., nb, bs) codes and (..., nb) params -> floats in the scale's dtype."""

    def quantize_blocks(self, blocks: np.ndarray, clip_ratio: float = 1.0):
        """(codes, stored block scales, zero points, tensor scale or None) for (..., nb, bs)."""
        ts = self.tensor_scale(blocks)
        scale, zp = self.choose_params(blocks, clip_ratio)
        return self.encode(blocks, effective_scale(scale, ts), zp), scale, zp, ts

    def dequantize_blocks(self, codes, scale, zero_point, tensor_scale=None):
        return self.decode(codes, effective_scale(scale, tensor_scale), zero_point)

    def __repr__(self) -> str:
        return f"<format {self.name}: {self.description}>"
