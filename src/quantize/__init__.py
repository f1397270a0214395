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


def load(path):
    """Read a checkpoint written by `quantize safetensors` (or a compressed-tensors
    pack-quantized one) into {name: QuantizedTensor or ndarray}. See docs/safetensors-layout.md.
    """
    from .io.safetensors import load as _load

    return _load(path)


__all__ = [
    "Format",
    "QuantizedTensor",
    "available_formats",
    "dequantize_from_int4",
    "dequantize_tensor",
    "get_format",
    "load",
    "quantize_tensor",
    "quantize_to_int4",
]
