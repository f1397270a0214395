"""quantize: floating-point tensors to 4-bit codes, packed two to a byte, with honest error.

from quantize import quantize_to_int4, dequantize_from_int4      # the simple API
from quantize import quantize_tensor, QuantizedTensor             # the block-wise core
"""

from __future__ import annotations

from .core import dequantize_tensor, quantize_tensor
from .formats import Format, available_formats, get_format
from .quantize import dequantize_from_int4, quantize_to_int4
from .tensor import QuantizedTensor

__version__ = "0.1.0"

__all__ = [
    "Format",
    "QuantizedTensor",
    "available_formats",
    "dequantize_from_int4",
    "dequantize_tensor",
    "get_format",
    "quantize_tensor",
    "quantize_to_int4",
]
