"""NF4, QLoRA's 4-bit NormalFloat (Dettmers et al. 2023), exactly as bitsandbytes defines it.

The codebook is bitsandbytes' table of 16 float32 values (bitsandbytes/functional.py
`get_4bit_type("nf4")`, backends/utils.py `_NF4_QUANT_TABLE`, csrc/kernels.cu
`dDequantizeNF4`): quantiles of N(0, 1) normalised to [-1, 1], 7 negative, an exact 0 at
index 7 and 8 positive ones (the asymmetric construction of the QLoRA paper).
"""

from __future__ import annotations

import numpy as np

from . import register
from .base import Format

#: NF4_VALUES[code], float32, ascending; -1.0 at 0, 0.0 at 7, 1.0 at 15.
NF4_VALUES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

#: The 15 decision thresholds: midpoints between neighbouring codebook values, exact in
#: float64. Rounded to float32 they are the literals of bitsandbytes' dQuantizeNF4 tree.
NF4_MIDPOINTS = (NF4_VALUES[:-1].astype(np.float64) + NF4_VALUES[1:].astype(np.float64)) / 2
_MIDPOINTS = {
    np.dtype(np.float32): NF4_MIDPOINTS.astype(np.float32),
    np.dtype(np.float64): NF4_MIDPOINTS,
}


def nf4_encode(normalized: np.ndarray) -> np.ndarray:
    """Values in block-scale units (nominally [-1, 1]) -> uint8 codes 0..15, same shape.

    code = the number of midpoints strictly below the value: a value exactly on a midpoint gets
    the lower code, as bitsandbytes' `x > threshold` tree does; beyond +-1 gives 15 / 0.
    float32 values are compared with float32 midpoints (bitsandbytes'), float64 with exact ones.
    """
    v = np.asarray(normalized)
    if v.dtype not in _MIDPOINTS:
        v = v.astype(np.float32)
    codes = np.searchsorted(_MIDPOINTS[v.dtype], v.reshape(-1), side="left")
    return codes.astype(np.uint8).reshape(v.shape)


class NF4(Format):
    """Nibble: index 0..15 into the NF4 codebook (0: -1, 7: 0, 15: +1); x ~ NF4[code] * scale.

    scale = block absmax (float32 as bitsandbytes stores it; 1.0 for an all-zero block);
    bitsandbytes' default blocksize is 64, any block size is accepted. Values are normalised as
    bitsandbytes does, x * (1 / absmax) in float32 (x / absmax where 1/absmax overflows), then
    mapped to the nearest codebook value by midpoints, ties to the lower code (`nf4_encode`).
    The error is at most half the gap between the two codebook values around x / scale, times
    the scale. Double quantization of the scales (QLoRA's 8-bit absmax) is not done: scales are
    stored as plain floats.
    """

    name = "nf4"
    bits = 4
    code_min, code_max = 0, 15
    zero_point = None
    default_block_size = 64
    description = "QLoRA NormalFloat4 codebook, block scale = absmax (bitsandbytes)"

    def choose_params(self, blocks, clip_ratio=1.0):
        amax = np.abs(blocks).max(axis=-1)
        if clip_ratio != 1.0:
            amax = amax * blocks.dtype.type(clip_ratio)
        return np.where(amax == 0, np.ones((), amax.dtype), amax), None

    def encode(self, blocks, scale, zero_point):
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            inv = np.ones((), scale.dtype) / scale
            normalized = blocks * inv[..., None]
        overflow = ~np.isfinite(inv)
        if overflow.any():  # subnormal absmax: 1/absmax overflows, divide instead
            normalized[overflow] = blocks[overflow] / scale[overflow][:, None]
        return nf4_encode(normalized)

    def decode(self, codes, scale, zero_point):
        return NF4_VALUES.astype(scale.dtype)[codes] * scale[..., None]


NF4_FORMAT = register(NF4())
