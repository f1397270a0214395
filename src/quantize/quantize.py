"""The simple API of the seed documents: one scale for a whole array, int4 codes stored as int8.

These functions are thin doors into `quantize.core`; their names, arguments, defaults and return
types are a public contract. Where the seed docs were vague or their sample wrong, they do what
is mathematically right, and say so below.
"""

from __future__ import annotations

from typing import List, Tuple, Union  # noqa: UP035  (the seed's documented signature)

import numpy as np

from ._checks import as_finite_float, as_positive_float, check_codes
from .core import prepare, quantize_prepared
from .formats.integer import INT4_AFFINE
from .packing import pack_nibbles, unpack_nibbles

INT4_MIN, INT4_MAX = -8, 7
_SCALE_METHODS = {"minmax": "int4_affine", "absmax": "int4"}
EXAMPLE_VALUES = (0.1, 0.5, -1.3, 2.7, 3.9, -0.8, 5.2, -4.7)


def quantize_to_int4(
    values: Union[List[float], np.ndarray],  # noqa: UP006,UP007
    scale_method: str = "minmax",
) -> Tuple[np.ndarray, float, float]:  # noqa: UP006
    """Quantize floating point values to int4 values (4-bit integers, -8..7), one scale for all.

    Args:
        values: list or array of any shape (float16/32/64, bfloat16 or integers); finite.
        scale_method: "minmax" (default) maps [min, max] onto [-8, 7] with a real (float) zero
            point; "absmax" is symmetric (zero_point 0) with scale = max|x| / 7, so neither end
            of the range clips.

    Returns:
        (quantized_values, scale, zero_point): int8 codes in [-8, 7] with the input's shape, and
        two Python floats, with x ~ (code - zero_point) * scale and every element within
        scale/2 of its reconstruction. Pass all three to `dequantize_from_int4`: with "minmax"
        the zero point is usually not 0, and leaving it out (as the seed docs' "Complete
        Example" does) shifts every value by zero_point * scale. A constant input c is exact:
        scale |c| (1 for zeros), zero_point 0, codes sign(c).
    """
    if not isinstance(scale_method, str):
        raise TypeError(f"scale_method must be a str, got {type(scale_method).__name__}")
    if scale_method not in _SCALE_METHODS:
        raise ValueError(
            f"scale_method must be one of {sorted(_SCALE_METHODS)}, got {scale_method!r}"
        )
    arr = prepare(values, "values")
    if arr.dtype != np.float64:  # the seed API returns Python floats: compute them in float64
        arr = arr.astype(np.float64)
    qt = quantize_prepared(arr, _SCALE_METHODS[scale_method], block_size=None, axis=None)
    codes = qt.codes().reshape(-1)[: arr.size].reshape(arr.shape).astype(np.int8)
    zero_point = 0.0 if qt.zero_points is None else float(qt.zero_points.reshape(-1)[0])
    return codes, float(qt.scales.reshape(-1)[0]), zero_point


def dequantize_from_int4(
    quantized_values: np.ndarray, scale: float, zero_point: float = 0
) -> np.ndarray:
    """Dequantize int4 codes back to floating point: (code - zero_point) * scale, as float32.

    Args:
        quantized_values: codes in [-8, 7] (int8, any integer dtype, or whole floats), any shape.
            Codes outside [-8, 7] raise ValueError rather than wrap.
        scale: the scale from `quantize_to_int4`; finite and > 0.
        zero_point: the zero point from `quantize_to_int4`; 0 for "absmax".

    Returns:
        float32 array of the codes' shape.
    """
    codes = check_codes(quantized_values, INT4_MIN, INT4_MAX, "quantized_values")
    if codes.size == 0:
        raise ValueError("quantized_values is empty; there is nothing to dequantize")
    s = np.array([as_positive_float(scale, "scale")])
    zp = np.array([as_finite_float(zero_point, "zero_point")])
    values = INT4_AFFINE.decode(codes.reshape(1, -1), s, zp)
    return values.reshape(codes.shape).astype(np.float32)


def pack_int4_to_int8(int4_values: np.ndarray) -> np.ndarray:
    """Pack two int4 codes into each byte: element 2i in the low nibble, 2i+1 in the high one.

    This is the ONNX INT4 layout. Any shape is flattened in C order; an odd count is padded
    with a 0 code. Returns int8 of length ceil(n/2) (the byte's bits read as a signed number).
    """
    codes = check_codes(int4_values, INT4_MIN, INT4_MAX, "int4_values")
    if codes.size == 0:
        raise ValueError("int4_values is empty; there is nothing to pack")
    return pack_nibbles(codes.reshape(-1).astype(np.int8)).view(np.int8)


def unpack_int8_to_int4(packed_values: np.ndarray) -> np.ndarray:
    """Unpack bytes into int4 codes: low nibble first, sign-extended, int8 of length 2n.

    Accepts int8 or uint8 bytes (or integers in [-128, 255]), any shape (flattened in C order).
    If the packed count was odd, the last code is the padding 0: trim to your length.
    """
    arr = check_codes(packed_values, -128, 255, "packed_values")
    if arr.size == 0:
        raise ValueError("packed_values is empty; there is nothing to unpack")
    raw = (arr.reshape(-1).astype(np.int16) & 0xFF).astype(np.uint8)
    return unpack_nibbles(raw, 2 * raw.size, signed=True)


def example() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: UP006
    """Quantize the docs' sample values with "minmax" and back.

    Returns:
        (original float64 values, int8 codes, float32 dequantized values); the dequantization
        honours the zero point, so every value is within scale/2 of the original.
    """
    original = np.array(EXAMPLE_VALUES, dtype=np.float64)
    quantized, scale, zero_point = quantize_to_int4(original)
    return original, quantized, dequantize_from_int4(quantized, scale, zero_point)
