"""Integer formats: x ~ (code - zero_point) * scale, codes rounded half to even (np.rint).

Scale rules are round-to-nearest defaults; algorithms may pass other scales to `encode`.
Every rule guarantees a block's extremes do not clip by more than half a step, so the error of
every element is at most scale/2 (plus float rounding), also for subnormal and huge blocks;
but int4_ort, ONNX Runtime's own rule, which clips one end of the range by up to one step.
"""

from __future__ import annotations

import numpy as np

from . import _REGISTRY, register
from .base import Format


def _cover(scale: np.ndarray, span: np.ndarray, steps: int, unit=1.0) -> np.ndarray:
    """Scale nudged up (by ulps) until `steps + 1/2` steps cover `span`; 0-span blocks get 1.

    `span` is given times `unit` (a power of two, < 1 only for spans past float64's range).
    Only blocks whose scale under- or overflowed move (subnormal spans); in the normal range
    amax/steps already covers, so results equal the plain formula (ModelOpt, ORT).
    """
    scale = np.where(span == 0, np.ones((), scale.dtype), scale)
    span64 = np.asarray(span, np.float64)

    def short(s):
        with np.errstate(over="ignore"):  # an overflowing product covers anything
            return s.astype(np.float64) * unit * (steps + 0.5) < span64

    todo = short(scale)
    while todo.any():
        scale = np.where(todo, np.nextafter(scale, np.array(np.inf, scale.dtype)), scale)
        todo = short(scale)
    return scale


def _range_scale(hi: np.ndarray, lo: np.ndarray, steps: int):
    """(hi - lo) / steps in the compute dtype, and (hi - lo) * unit in float64, and unit.

    Plain compute-dtype arithmetic (as ModelOpt and ORT do) wherever hi - lo fits; where it
    overflows (float32 [-3e38, 3e38], float64 [-1e308, 1e308]) the span is taken in float64
    times unit = 2^-8, exact for numbers that large, and the scale from that.
    """
    with np.errstate(over="ignore"):
        span = hi - lo
    scale = span / span.dtype.type(steps)
    overflow = np.isinf(span)
    unit = 1.0
    if overflow.any():
        unit = np.where(overflow, 2.0**-8, 1.0)
        span = hi.astype(np.float64) * unit - lo.astype(np.float64) * unit
        scale = np.where(overflow, (span / steps / unit).astype(scale.dtype), scale)
    return scale, span, unit


class SymmetricInt(Format):
    """Signed codes in [-2^(b-1), 2^(b-1)-1]; scale = amax / (2^(b-1)-1), so -amax and amax fit."""

    zero_point = None

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"int{bits}"
        self.code_min, self.code_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.description = f"signed {bits}-bit, symmetric, scale = amax/{self.code_max}"

    def choose_params(self, blocks, clip_ratio=1.0):
        amax = np.abs(blocks).max(axis=-1)
        if clip_ratio != 1.0:
            amax = amax * blocks.dtype.type(clip_ratio)
        scale = amax / blocks.dtype.type(self.code_max)
        return _cover(scale, amax, self.code_max), None

    def encode(self, blocks, scale, zero_point):
        q = np.rint(blocks / scale[..., None])
        return np.clip(q, self.code_min, self.code_max).astype(np.int8)

    def decode(self, codes, scale, zero_point):
        return codes.astype(scale.dtype) * scale[..., None]


class AffineUInt(Format):
    """Unsigned codes in [0, 2^b-1] with an integer zero point; the range always includes 0.

    scale = (max(hi, 0) - min(lo, 0)) / (2^b-1), zero_point = clip(-rint(lo/scale)): zero is
    exact, as ONNX DequantizeLinear and ORT MatMulNBits expect.
    """

    zero_point = "int"

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"uint{bits}"
        self.code_min, self.code_max = 0, 2**bits - 1
        self.description = f"unsigned {bits}-bit, integer zero point, range includes 0"

    def choose_params(self, blocks, clip_ratio=1.0):
        zero = blocks.dtype.type(0)
        lo = np.minimum(blocks.min(axis=-1), zero)
        hi = np.maximum(blocks.max(axis=-1), zero)
        if clip_ratio != 1.0:
            lo, hi = lo * blocks.dtype.type(clip_ratio), hi * blocks.dtype.type(clip_ratio)
        scale, span, unit = _range_scale(hi, lo, self.code_max)
        scale = _cover(scale, span, self.code_max, unit)
        # the rounded zero point shifts the grid by up to half a step, so the scale must cover
        # the span in code_max steps. In the normal range it does, to within float rounding;
        # a subnormal scale can fall short by a sizeable part of a step: nudge those up.
        sub = scale < np.finfo(scale.dtype).tiny
        if sub.any():
            scale = np.where(sub, _cover(scale, span, self.code_max - 0.5, unit), scale)
        zp = np.clip(-np.rint(lo / scale), self.code_min, self.code_max).astype(np.uint8)
        return scale, zp

    def encode(self, blocks, scale, zero_point):
        q = np.rint(blocks / scale[..., None]) + zero_point[..., None].astype(blocks.dtype)
        return np.clip(q, self.code_min, self.code_max).astype(np.uint8)

    def decode(self, codes, scale, zero_point):
        diff = codes.astype(np.int16) - zero_point[..., None].astype(np.int16)
        return diff.astype(scale.dtype) * scale[..., None]


class AffineIntFloatZero(Format):
    """Codes in [code_min, code_max] with a float zero point: a block's [min, max] maps onto them.

    scale = (max - min)/steps (steps = code_max - code_min = 15 for 4 bits), zero_point =
    code_min - min/scale, x ~ (code - zero_point) * scale. Two code ranges share this rule:
    signed [-8, 7] (int4_affine) and unsigned [0, 15] (uint4_float_zp, HQQ's zero point:
    z = -min/s). A constant block c gets scale |c| (1 if c == 0) and zero point 0 (1 for a
    negative c on unsigned codes), so c is the code zero_point + sign(c): exact.
    """

    zero_point = "float"

    def __init__(self, bits: int = 4, signed: bool = True):
        self.bits = bits
        if signed:
            self.name = f"int{bits}_affine"
            self.code_min, self.code_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            kind = "signed"
        else:
            self.name = f"uint{bits}_float_zp"
            self.code_min, self.code_max = 0, 2**bits - 1
            kind = "unsigned"
        self.description = (
            f"{kind} {bits}-bit, float zero point, [min, max] -> [{self.code_min}, {self.code_max}]"
        )

    def choose_params(self, blocks, clip_ratio=1.0):
        dt = blocks.dtype.type
        steps = self.code_max - self.code_min
        lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
        if clip_ratio != 1.0:  # shrink [lo, hi] about its centre
            mid = lo / dt(2) + hi / dt(2)
            lo, hi = mid + (lo - mid) * dt(clip_ratio), mid + (hi - mid) * dt(clip_ratio)
        scale, span, unit = _range_scale(hi, lo, steps)
        const = span == 0
        scale = np.where(const, np.abs(lo), scale)
        scale = _cover(scale, np.where(const, np.abs(lo) * unit, span), steps, unit)
        const_zp = np.maximum(dt(0), dt(self.code_min) - np.sign(lo))  # 0; 1 if unsigned, c < 0
        zp = np.where(const, const_zp, dt(self.code_min) - lo / scale)
        return scale, zp.astype(blocks.dtype)

    def encode(self, blocks, scale, zero_point):
        q = np.rint(blocks / scale[..., None] + zero_point[..., None])
        codes = np.clip(q, self.code_min, self.code_max)
        return codes.astype(np.int8 if self.code_min < 0 else np.uint8)

    def decode(self, codes, scale, zero_point):
        return (codes.astype(scale.dtype) - zero_point[..., None]) * scale[..., None]


def _round_half_up(y: np.ndarray) -> np.ndarray:
    """C's roundf for y >= 0 (ties away from zero), exactly: y - floor(y) is exact in floats.

    Overwrites `y` (with its fractional part); returns the rounded values in a new array.
    """
    t = np.floor(y)
    y -= t
    t += y >= y.dtype.type(0.5)
    return t


class OrtInt4(AffineUInt):
    """ONNX Runtime's symmetric int4 rule for MatMulNBits, bit for bit (4 bits only).

    What ORT does (onnxruntime/core/mlas/lib/q4_dq.cpp, `range2scale` and
    `BlockwiseQuantizer::quantizeAndTranspose`, called by `quantize_matmul_4bits`, which
    `MatMulNBitsQuantizer` uses with is_symmetric=True): per block of K, the extreme
    e = max if |max| > |min| else min (a tie |max| = |min| picks min), scale_ort = -e/8, and

        q = clamp(roundf(x * (1/scale_ort) + 8), 0, 15)   (float32; roundf: ties up here)

    stored unsigned with the implicit zero point 8: x ~ (q - 8) * scale_ort. The extreme maps
    to -8 exactly; the other end of the range clips at +7, so elements there can be off by up
    to one step (|x - x̂| <= scale, not scale/2; e.g. a block [-3, 3]: 3 comes back as 2.625).
    Elsewhere rounding is to nearest, ties toward +inf in units of scale_ort.

    scale_ort is negative when the extreme is positive; QuantizedTensor keeps scales > 0, so
    this format stores the same grid as unsigned codes with a per-block zero point 8 or 7:
    scale = |scale_ort| and
      e <= 0: zero point 8, code = q        (grid -8..7 steps; ORT's scale > 0)
      e > 0:  zero point 7, code = 15 - q   (grid -7..8 steps; ORT's scale < 0)
    so x ~ (code - zero point) * scale is ORT's value exactly. `to_ort` gives ORT's own
    unsigned codes and signed scales back. The zero point only carries the scale's sign, yet is
    stored (and counted in nbytes) as a 4-bit zero point: 4/block_size bits per weight more
    than ORT's layout (0.125 at block 32, 0.03 at 128).

    Where this differs from ORT, on purpose: an all-zero block gets scale 1 (ORT: -0.0; both
    code 8 = zero point); a block whose 1/scale_ort overflows (|e| < 2^-125 in float32, e.g.
    subnormal weights, where ORT multiplies by inf and produces garbage codes) divides
    instead, and its scale is nudged up by ulps when e/8 rounds (subnormal); padding of the
    last block is the code of 0 (ORT does not write it: its padding bytes stay 0, and for an
    odd K the last byte's high nibble repeats an earlier code). float64 input follows the same
    steps in float64; float16/bfloat16 in float32 (ORT's float16 path stores float16 scales,
    the same values while |e| >= 2^-11; below, e/8 is float16-subnormal and ORT's rounds).
    """

    def __init__(self):
        super().__init__(4)
        self.name = "int4_ort"
        self.description = "ONNX Runtime MatMulNBits symmetric int4: extreme -> -8, +7 clips"

    def choose_params(self, blocks, clip_ratio=1.0):
        lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
        ext = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        if clip_ratio != 1.0:
            ext = ext * blocks.dtype.type(clip_ratio)
        amax = np.abs(ext)
        scale = _cover(amax / blocks.dtype.type(8), amax, 7.5)  # 7.5 + 1/2: 8 steps hold amax
        zp = np.where(ext > 0, np.uint8(7), np.uint8(8))
        return scale, zp

    def encode(self, blocks, scale, zero_point):
        flip = zero_point == 7
        s = np.where(flip, -scale, scale)[..., None]  # ORT's signed scale
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            rcp = s.dtype.type(1) / s
            v = blocks * rcp
        tiny = ~np.isfinite(rcp)
        if tiny.any():  # |scale| < 1/max: ORT's reciprocal is inf; divide instead
            v = np.where(tiny, blocks / s, v)
        v += v.dtype.type(8)
        q = _round_half_up(v)
        q = np.clip(q, 0, 15, out=q).astype(np.uint8)
        q ^= (flip * np.uint8(15)).astype(np.uint8)[..., None]  # 15 - q where flipped
        return q

    @staticmethod
    def to_ort(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray):
        """(codes, scales, zero points) of this format -> ORT's (unsigned codes, signed scales).

        ORT's value is (ort_code - 8) * ort_scale. Shapes: codes (..., nb, bs), the rest (..., nb).
        """
        flip = np.asarray(zero_point) == 7
        ort_codes = np.where(flip[..., None], 15 - codes.astype(np.uint8), codes).astype(np.uint8)
        return ort_codes, np.where(flip, -scale, scale).astype(scale.dtype)


def integer_format(bits: int, zero_point: bool) -> Format:
    """The integer format of `bits` (2..8): the registered one if there is one, else a new one."""
    name = f"uint{bits}" if zero_point else f"int{bits}"
    return _REGISTRY.get(name) or (AffineUInt if zero_point else SymmetricInt)(bits)


INT4 = register(SymmetricInt(4))
UINT4 = register(AffineUInt(4))
INT8 = register(SymmetricInt(8))
UINT8 = register(AffineUInt(8))
INT4_AFFINE = register(AffineIntFloatZero(4))
UINT4_FLOAT_ZP = register(AffineIntFloatZero(4, signed=False))
INT4_ORT = register(OrtInt4())
