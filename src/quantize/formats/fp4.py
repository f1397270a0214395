"""4-bit float formats built on OCP FP4 E2M1 elements: plain (float32 scale) and MXFP4 (E8M0).

E2M1 (the FP4 element type of OCP Microscaling Formats v1.0): 1 sign, 2 exponent (bias 1),
1 mantissa bit, no Inf/NaN; magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6} (0.5 is the one
subnormal). Codes are the raw nibbles, unsigned 0..15: bit 3 sign, bits 2-1 exponent, bit 0
mantissa, so the magnitude code is the index into that list and code ^ 8 negates.

Rounding (`e2m1_encode`) is to nearest, ties to even (the code with mantissa bit 0), and
saturating: magnitudes beyond 6 become 6, as OCP conversion with clamping does. A negative value
that rounds to zero keeps its sign: code 8 (-0), as ml_dtypes.float4_e2m1fn does; it decodes to
-0.0, which equals 0. For float32 (and narrower) input the codes equal ml_dtypes' cast bit for
bit, for every one of the 2^32 float32 values (NaN too: +NaN -> 8, -NaN -> 0). float64 input is
rounded directly; ml_dtypes rounds float64 via float32, so the two differ only for float64
values within half a float32 ulp of a midpoint (ml_dtypes double-rounds those).
"""

from __future__ import annotations

import numpy as np

from . import register
from .base import Format
from .integer import _cover
from .mx import e8m0_exponent, e8m0_scale

#: E2M1 values by code: E2M1_VALUES[code] (float32); codes 8..15 are the negatives, 8 is -0.0.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest normal, 6 = 1.5 * 2^2: OCP's emax_elem

# The magnitude code of |x| is the number of rounding boundaries below it. Boundary i is the
# midpoint between grid values i and i+1; a value exactly on it goes to the even code, so the
# boundary counts as "below" when code i+1 is even (i odd): >= for those, > for the others.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_GOES_UP = (False, True, False, True, False, True, False)


def e2m1_encode(x: np.ndarray) -> np.ndarray:
    """Float array -> uint8 E2M1 nibbles (0..15), same shape: nearest, ties to even, saturating.

    The reference the numba kernels are held to. float16/bfloat16/float8 input is widened to
    float32 first (exactly); float32 and float64 are compared as they are.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    a = np.abs(x)
    mag = np.zeros(x.shape, np.uint8)
    for m, up in zip(_MIDPOINTS, _TIE_GOES_UP, strict=True):
        mag += (a >= m) if up else (a > m)
    # ml_dtypes maps NaN to a zero with the NaN's sign flipped: +NaN -> 8, -NaN -> 0
    negative = np.signbit(x) ^ np.isnan(x)
    return mag | (negative.astype(np.uint8) << np.uint8(3))


def e2m1_decode(nibbles: np.ndarray) -> np.ndarray:
    """uint8 E2M1 nibbles -> float32 values (only the low 4 bits of each are read)."""
    return E2M1_VALUES[np.asarray(nibbles).astype(np.uint8) & np.uint8(0x0F)]


class E2M1Codes(Format):
    """Shared by the E2M1-element formats: nibble codes, x ~ E2M1_VALUES[code] * scale."""

    bits = 4
    code_min, code_max = 0, 15
    zero_point = None

    def encode(self, blocks, scale, zero_point):
        # nvfp4's effective scale can underflow to 0: x / 0 is +-inf or NaN, which e2m1_encode
        # maps (saturating; NaN's own rule), as the kernels do
        with np.errstate(divide="ignore", invalid="ignore"):
            return e2m1_encode(blocks / scale[..., None])

    def decode(self, codes, scale, zero_point):
        return e2m1_decode(codes).astype(scale.dtype) * scale[..., None]


class E2M1Float(E2M1Codes):
    """Nibble: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; float32 scale per block.

    x ~ E2M1_VALUES[code] * scale, scale = amax / 6 (1.0 for an all-zero block), nudged up by
    ulps only where amax / 6 underflows, so that amax <= 6.5 * scale: the largest element never
    saturates by more than half a step (the top step is 4 -> 6). Every element's error is at
    most half the grid spacing around it (0.25, 0.5 or 1 times the scale). No spec fixes a
    block size for this format.
    """

    name = "fp4_e2m1"
    description = "FP4 E2M1 elements, float32 block scale = amax/6"

    def choose_params(self, blocks, clip_ratio=1.0):
        amax = np.abs(blocks).max(axis=-1)
        if clip_ratio != 1.0:
            amax = amax * blocks.dtype.type(clip_ratio)
        scale = amax / blocks.dtype.type(E2M1_MAX)
        return _cover(scale, amax, int(E2M1_MAX)), None


class MXFP4(E2M1Codes):
    """Nibble: bit 3 sign, bits 2-1 exponent, bit 0 mantissa (E2M1); E8M0 byte e+127 per block.

    OCP MXFP4, x ~ E2M1_VALUES[code] * 2^e. The spec's block is 32 elements (OCP MX v1.0,
    k = 32); any block size is accepted.
    rule="floor" (mxfp4, the spec's conversion rule): e = floor(log2(amax)) - 2, so amax / 2^e
    lies in [4, 8): elements in (6, 8) * 2^e clip to 6 * 2^e (the spec clamps to the largest
    normal), an error of up to 2^(e+1) for the block's largest elements.
    rule="ceil" (mxfp4_ceil): e = ceil(log2(amax / 6)), exactly; nothing clips (ModelOpt's
    compute_e8m0 with elem_max=6).
    e is clamped to E8M0's [-127, 127]: blocks with amax below 2^-128 (float32 subnormals, tiny
    float64) flush towards 0, as the spec's underflow does; only float64 input beyond 6 * 2^127
    hits the top clamp (the OCP reference code, microsoft/microxcaling, makes that scale NaN;
    we saturate the elements). An all-zero block gets 2^0 = 1.0, this library's convention for
    all-zero blocks (the reference code gives 2^-127; any scale decodes zeros exactly).
    mxfp4_ceil on float32 input above 3.5 * 2^126 (~2.98e38) can round an element up to
    4 * 2^126 = 2^128, which float32 cannot hold: it dequantizes to inf.
    Scales are returned as the powers of two they encode, in the compute dtype.
    """

    scale_bits = 8
    default_block_size = 32
    #: the mse search also tries the exponent one up (ratio 2: 2^(e+1)): shrinking the range
    #: only ever gives 2^(e-1), while the floor rule's clipping of (6, 8) * 2^e is often the
    #: larger error (per block, the better of the floor and ceil rules: 6% less squared error
    #: on normal and student-t(4) weights, block 32)
    search_widen = (2.0,)

    def __init__(self, rule: str = "floor"):
        if rule not in ("floor", "ceil"):
            raise ValueError(f"rule must be 'floor' or 'ceil', got {rule!r}")
        self.rule = rule
        self.name = "mxfp4" if rule == "floor" else "mxfp4_ceil"
        self.description = (
            "OCP MXFP4: E2M1 elements, E8M0 scale 2^(floor(log2 amax) - 2)"
            if rule == "floor"
            else "MXFP4 elements and E8M0 scale 2^ceil(log2(amax/6)) (no clipping)"
        )

    def choose_params(self, blocks, clip_ratio=1.0):
        amax = np.abs(blocks).max(axis=-1)
        if clip_ratio != 1.0:
            ratio = blocks.dtype.type(clip_ratio)
            with np.errstate(over="ignore"):
                scaled = amax * ratio
                # the mse search's widening (ratio 2) can overflow the dtype: that product in
                # float64 (e8m0_exponent works in float64 and clamps to 127)
                over = np.isinf(scaled) & np.isfinite(amax)
                if over.any():
                    wide = amax.astype(np.float64) * np.float64(ratio)
                    scaled = np.where(over, np.minimum(wide, np.finfo(np.float64).max), scaled)
            amax = scaled
        e = e8m0_exponent(amax, E2M1_MAX, self.rule)
        e = np.where(amax == 0, 0, e)  # all-zero block: 2^0
        return e8m0_scale(e, blocks.dtype), None


FP4_E2M1 = register(E2M1Float())
MXFP4_FLOOR = register(MXFP4("floor"))
MXFP4_CEIL = register(MXFP4("ceil"))
