"""Integer formats: x ~ (code - zero_point) * scale, codes rounded half to even (np.rint).

Scale rules are round-to-nearest defaults; algorithms may pass other scales to `encode`.
Every rule guarantees a block's extremes do not clip by more than half a step, so the error of
every element is at most scale/2 (plus float rounding), also for subnormal and huge blocks.
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
        zp = np.clip(-np.rint(lo / scale), self.code_min, self.code_max).astype(np.uint8)
        return scale, zp

    def encode(self, blocks, scale, zero_point):
        q = np.rint(blocks / scale[..., None]) + zero_point[..., None].astype(blocks.dtype)
        return np.clip(q, self.code_min, self.code_max).astype(np.uint8)

    def decode(self, codes, scale, zero_point):
        diff = codes.astype(np.int16) - zero_point[..., None].astype(np.int16)
        return diff.astype(scale.dtype) * scale[..., None]


class AffineIntFloatZero(Format):
    """Signed codes in [-8, 7] with a float zero point: the block's [min, max] maps onto [-8, 7].

    scale = (max - min)/15, zero_point = -8 - min/scale, x ~ (code - zero_point) * scale. A
    constant block c gets scale |c| (1 if c == 0), zero point 0 and code sign(c): exact.
    """

    zero_point = "float"

    def __init__(self, bits: int = 4):
        self.bits = bits
        self.name = f"int{bits}_affine"
        self.code_min, self.code_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.description = f"signed {bits}-bit, [min, max] -> [{self.code_min}, {self.code_max}]"

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
        zp = np.where(const, dt(0), dt(self.code_min) - lo / scale)
        return scale, zp.astype(blocks.dtype)

    def encode(self, blocks, scale, zero_point):
        q = np.rint(blocks / scale[..., None] + zero_point[..., None])
        return np.clip(q, self.code_min, self.code_max).astype(np.int8)

    def decode(self, codes, scale, zero_point):
        return (codes.astype(scale.dtype) - zero_point[..., None]) * scale[..., None]


def integer_format(bits: int, zero_point: bool) -> Format:
    """The integer format of `bits` (2..8): the registered one if there is one, else a new one."""
    name = f"uint{bits}" if zero_point else f"int{bits}"
    return _REGISTRY.get(name) or (AffineUInt if zero_point else SymmetricInt)(bits)


INT4 = register(SymmetricInt(4))
UINT4 = register(AffineUInt(4))
INT8 = register(SymmetricInt(8))
UINT8 = register(AffineUInt(8))
INT4_AFFINE = register(AffineIntFloatZero(4))
