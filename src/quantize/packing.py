"""Nibble packing: two 4-bit codes per byte, element 2i in the low nibble, 2i+1 in the high.

This is the ONNX INT4/UINT4 layout and ORT MatMulNBits' layout along K. An odd count is padded
with a zero nibble. All functions work on the last axis, so a (rows, n) code matrix packs to
(rows, ceil(n/2)) bytes, each row on its own.
"""

from __future__ import annotations

import numpy as np


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(..., n) int codes in [-8, 15] -> (..., ceil(n/2)) uint8; low nibble = even element."""
    n = codes.shape[-1]
    c = codes.astype(np.uint8, copy=False) & np.uint8(0x0F)  # two's complement low 4 bits
    if n % 2:
        c = np.concatenate([c, np.zeros((*c.shape[:-1], 1), np.uint8)], axis=-1)
    return c[..., 0::2] | (c[..., 1::2] << np.uint8(4))


def unpack_nibbles(packed: np.ndarray, n: int, signed: bool) -> np.ndarray:
    """(..., m) bytes -> (..., n) int8 codes, n <= 2m; sign-extended from bit 3 if `signed`."""
    p = packed.view(np.uint8) if packed.dtype == np.int8 else packed.astype(np.uint8, copy=False)
    out = np.empty((*p.shape[:-1], 2 * p.shape[-1]), np.uint8)
    out[..., 0::2] = p & np.uint8(0x0F)
    out[..., 1::2] = p >> np.uint8(4)
    out = out[..., :n].view(np.int8)
    if signed:
        # (x ^ 8) - 8 maps 0..7 -> 0..7 and 8..15 -> -8..-1.
        out = ((out ^ np.int8(8)) - np.int8(8)).astype(np.int8, copy=False)
    return out
