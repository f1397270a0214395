"""NVFP4: FP4 E2M1 elements (max 6) in blocks of 16, E4M3 block scales (max 448) and a float32
per-tensor scale, amax / (6 * 448), so the largest block scale is 448.

`per_tensor_scale` and `block_scales` are the two rules `quant_utils` exposes (ModelOpt's
get_weights_scaling_factor_2 / get_weights_scaling_factor); `NVFP4` is the format built on them.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import register
from .fp4 import E2M1Codes

FP4_MAX = np.float32(6.0)
E4M3_MAX = np.float32(448.0)


def per_tensor_scale(x: np.ndarray) -> np.float32:
    """float32 amax / (6 * 448); 1.0 for an all-zero tensor; ValueError if not finite."""
    scale = np.float32(np.max(np.abs(x))) / np.float32(FP4_MAX * E4M3_MAX)
    if scale == 0:
        scale = np.float32(1.0)
    if not np.isfinite(scale):
        raise ValueError("NVFP4 per-tensor scale must be finite (the input has NaN/Inf)")
    return np.float32(scale)


def block_scales(blocks: np.ndarray, tensor_scale) -> np.ndarray:
    """(..., nb, bs) -> (..., nb) float32 block amax / (6 * tensor_scale); 1.0 where it is 0.

    These are the unrounded block scales; storing them as E4M3 rounds them (the exporter's job).
    """
    amax = np.max(np.abs(blocks), axis=-1).astype(np.float32)
    scale = amax / (FP4_MAX * tensor_scale)
    scale = np.asarray(scale)
    scale[scale == 0] = 1.0
    return scale.astype(np.float32)


def _e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest E4M3 value (ties to even), as float32; x must be in [0, 448]."""
    return x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _next_e4m3(x: np.ndarray) -> np.ndarray:
    """The next E4M3 value above each (non-negative, < 448) E4M3 value in float32 `x`."""
    bits = x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return (bits + np.uint8(1)).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


class NVFP4(E2M1Codes):
    """Nibble: bit 3 sign, bits 2-1 exponent, bit 0 mantissa (E2M1); E4M3 byte per block of 16.

    x ~ E2M1_VALUES[code] * block_scale * tensor_scale. tensor_scale = float32 tensor amax /
    (6 * 448) (`per_tensor_scale`); block_scale = E4M3(block amax / (6 * tensor_scale)), round
    to nearest even, 1.0 for an all-zero block: ModelOpt's chain, so the codes equal
    quant_utils.quantize(...) followed by E2M1 rounding given the same E4M3 scales. 16 is the
    spec's block size; any is accepted. Two nudges keep every element within half a grid step
    (amax <= 6.5 * effective scale) where the plain rule would not; neither can fire unless the
    tensor amax is below ~3e-35 or a block's amax is below 2^-6 / 448 of it (E4M3 subnormal
    block scales): the tensor scale moves up by ulps where amax / 2688 loses precision in
    float32 (subnormal), and a block scale moves up to the next E4M3 value where E4M3
    rounding lost too much (it also never rounds a nonzero block to a 0 scale).
    """

    name = "nvfp4"
    scale_bits = 8
    default_block_size = 16
    description = "NVFP4: E2M1 elements, E4M3 block scales, float32 tensor scale"

    def tensor_scale(self, blocks):
        amax = np.float64(np.max(np.abs(blocks)))
        if amax > np.finfo(np.float32).max:  # float64 input only
            raise ValueError(
                f"nvfp4 cannot hold values beyond float32's range (its tensor scale is a "
                f"float32 amax / 2688); the largest magnitude here is {amax:g}"
            )
        ts = per_tensor_scale(blocks)
        top = float(FP4_MAX * E4M3_MAX) + 0.5  # largest block scale * 6, plus half a step
        while np.float64(ts) * top < amax:  # only when amax / 2688 is subnormal in float32
            ts = np.nextafter(ts, np.float32(np.inf))
        return np.float32(ts)

    def choose_params(self, blocks, clip_ratio=1.0):
        ts = self.tensor_scale(blocks)
        amax = np.max(np.abs(blocks), axis=-1).astype(np.float32)
        if clip_ratio != 1.0:
            amax = amax * np.float32(clip_ratio)
        raw = amax / (FP4_MAX * ts)  # as block_scales computes it
        raw = np.where(raw == 0, np.float32(1.0), raw)
        scale = _e4m3(np.minimum(raw, E4M3_MAX))
        # amax <= 6.5 * scale * ts, checked in float64 (exact for these products)
        short = (amax.astype(np.float64) > 6.5 * scale.astype(np.float64) * float(ts)) & (
            scale < E4M3_MAX
        )
        while short.any():
            scale = np.where(short, _next_e4m3(scale), scale)
            short = (amax.astype(np.float64) > 6.5 * scale.astype(np.float64) * float(ts)) & (
                scale < E4M3_MAX
            )
        return scale.astype(blocks.dtype), None


NVFP4_FORMAT = register(NVFP4())
