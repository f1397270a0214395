"""Shared block machinery: a tensor <-> (..., n_blocks, block_size) along one axis.

The quantized axis is moved last, so rows are the other axes in their order. A length not
divisible by the block is padded at the end by repeating the row's last value (neutral for
min/max/amax statistics); `quantize.core` then quantizes the padding as 0.
"""

from __future__ import annotations

import numpy as np


def n_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def to_blocks(x: np.ndarray, block_size: int, axis: int) -> np.ndarray:
    """(..., n, ...) with n at `axis` -> (*other, ceil(n/bs), bs): a new, writable array."""
    moved = np.moveaxis(x, axis, -1)
    n = moved.shape[-1]
    nb = n_blocks(n, block_size)
    pad = nb * block_size - n
    if pad:
        moved = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)], mode="edge")
    else:
        moved = np.array(moved, copy=True)
    return moved.reshape(*moved.shape[:-1], nb, block_size)


def from_blocks(blocks: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Inverse of `to_blocks`: (*other, nb, bs) -> the tensor, padding dropped, axis put back."""
    flat = blocks.reshape(*blocks.shape[:-2], -1)[..., :n]
    return np.moveaxis(flat, -1, axis)


def params_to_axis(params: np.ndarray, axis: int) -> np.ndarray:
    """(*other, nb) block parameters -> the tensor's layout with nb at `axis` (ONNX block-wise)."""
    return np.moveaxis(params, -1, axis)


def params_from_axis(params: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(params, axis, -1)
