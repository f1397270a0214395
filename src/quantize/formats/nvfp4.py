"""NVFP4 scale rules: FP4 E2M1 elements (max 6) in blocks of 16, E4M3 block scales (max 448)
and a float32 per-tensor scale, amax / (6 * 448), so the largest block scale is 448.

The NVFP4 format class itself (codes, packing, kernels) arrives with the formats issue; these
two rules are what `quant_utils` exposes today.
"""

from __future__ import annotations

import numpy as np

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
