"""What a format is: how codes map to numbers, and the rule that picks a block's parameters.

A format works on *blocks*: a float array of shape (..., n_blocks, block_size) in its compute
dtype (float32, or float64 for float64 input). It never sees the tensor's shape, axis or padding;
`quantize.core` does that once for every format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Format(ABC):
    """One 4/8-bit number format. Subclasses are small: params rule, encode, decode."""

    name: str
    bits: int
    code_min: int
    code_max: int
    #: "int" zero points are stored as codes (uint8), "float" ones in the scale dtype.
    zero_point: str | None = None
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

    @abstractmethod
    def encode(
        self, blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None
    ) -> np.ndarray:
        """(..., nb, bs) floats and (..., nb) params -> int8/uint8 codes of the same shape."""

    @abstractmethod
    def decode(
        self, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None
    ) -> np.ndarray:
        """(..., nb, bs) codes and (..., nb) params -> floats in the scale's dtype."""

    def quantize_blocks(self, blocks: np.ndarray, clip_ratio: float = 1.0):
        scale, zp = self.choose_params(blocks, clip_ratio)
        return self.encode(blocks, scale, zp), scale, zp

    def dequantize_blocks(self, codes, scale, zero_point):
        return self.decode(codes, scale, zero_point)

    def __repr__(self) -> str:
        return f"<format {self.name}: {self.description}>"
