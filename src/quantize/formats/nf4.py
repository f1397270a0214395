"""NF4, QLoRA's 4-bit NormalFloat (Dettmers et al. 2023), exactly as bitsandbytes defines it.

The codebook is bitsandbytes' table of 16 float32 values (bitsandbytes/functional.py
`get_4bit_type("nf4")`, backends/utils.py `_NF4_QUANT_TABLE`, csrc/kernels.cu
`dDequantizeNF4`): quantiles of N(0, 1) normalised to [-1, 1], 7 negative, an exact 0 at
index 7 and 8 positive ones (the asymmetric construction of the QLoRA paper).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    the scale. Scales are stored as plain floats; `nf4_dq` stores them double-quantized.
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


# --------------------------------------------------------------------------- double quantization


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), float32.

    Dettmers' dynamic tree type with 7 exponent bits: for k = 0..6, the 2^k midpoints of 2^k + 1
    points spaced evenly over [0.1, 1], times 10^(k-6), both signs; plus 0 and 1; sorted (127
    negatives, 0 at index 127, 128 positives up to 1.0). The points are computed as torch's
    float32 linspace does (start + step * i rounded once, from the end for the upper half), the
    rest in float32, so every value equals bitsandbytes' own table.
    """
    values = [np.float32(0.0), np.float32(1.0)]
    for k in range(7):
        steps = 2**k + 1
        lo, hi = np.float32(0.1), np.float32(1.0)
        step = (hi - lo) / np.float32(steps - 1)
        # start + step * i with one rounding: the float64 sum of these float32 terms is exact
        pts = np.array(
            [
                float(lo) + float(step) * i
                if i < steps // 2
                else float(hi) - float(step) * (steps - 1 - i)
                for i in range(steps)
            ]
        ).astype(np.float32)
        means = (pts[:-1] + pts[1:]) / np.float32(2.0)
        scaled = np.float32(10.0 ** (k - 6)) * means
        values += list(scaled) + list(-scaled)
    return np.sort(np.array(values, np.float32))


#: DYNAMIC_MAP[code]: bitsandbytes' signed dynamic 8-bit map, float32, ascending (0.0 at 127,
#: -0.99296875 at 0, 1.0 at 255), the code book of its `quantize_blockwise`
DYNAMIC_MAP = _dynamic_map()
#: its decision thresholds, float32 midpoints as bitsandbytes computes them (ties go down)
DYNAMIC_MIDPOINTS = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / np.float32(2.0)
#: scales per second-level block (bitsandbytes' `quantize_blockwise(..., blocksize=256)`)
DQ_BLOCK = 256
#: the largest |dequantized - exact| of a second-level value, in units of its group's absmax,
#: when no nudge was needed: half the widest gap of the map (0.9/64, in the top decade), which
#: is also the gap from -1 to the map's lowest value, -0.99296875
DQ_MAX_ERROR = float(np.max(np.diff(DYNAMIC_MAP.astype(np.float64)))) / 2


@dataclass(frozen=True, eq=False)
class DoubleQuant:
    """A tensor's block scales, double-quantized as bitsandbytes' `compress_statistics=True`.

    scale = DYNAMIC_MAP[codes] * absmax[i // 256] + offset, in the absmax's dtype (product
    rounded, then sum rounded, as bitsandbytes' dequantize_blockwise and `absmax += offset`),
    where i is the scale's index in the flattened (C order) scales array.
      codes:  uint8, the shape of the scales
      absmax: (ceil(n_scales / 256),) the largest |scale - offset| of each group; float32 as
              bitsandbytes stores it (float64 for float64 input, whose scales are float64)
      offset: the mean of the first-level scales, a 0-d scalar of the absmax's dtype
    """

    codes: np.ndarray
    absmax: np.ndarray
    offset: np.floating
    block_size: int = DQ_BLOCK

    def values(self) -> np.ndarray:
        """The scales this state stands for: shape of `codes`, dtype of `absmax`."""
        dt = self.absmax.dtype
        group = np.repeat(self.absmax, self.block_size)[: self.codes.size].reshape(self.codes.shape)
        with np.errstate(over="ignore"):
            return DYNAMIC_MAP.astype(dt)[self.codes] * group + dt.type(self.offset)

    @property
    def extra_nbytes(self) -> int:
        """Bytes beyond the one-byte codes: the group absmaxes and the offset."""
        return int(self.absmax.nbytes + self.absmax.itemsize)

    def check(self, scales: np.ndarray) -> None:
        """ValueError unless this state is well formed and stands for exactly `scales`."""
        groups = -(-scales.size // DQ_BLOCK)
        if self.block_size != DQ_BLOCK:
            raise ValueError(f"double_quant.block_size must be {DQ_BLOCK}, got {self.block_size}")
        codes, absmax = np.asarray(self.codes), np.asarray(self.absmax)
        if codes.dtype != np.uint8 or codes.shape != scales.shape:
            raise ValueError(
                f"double_quant.codes must be uint8 {scales.shape}, got {codes.dtype} {codes.shape}"
            )
        if absmax.dtype != scales.dtype or absmax.shape != (groups,):
            raise ValueError(
                f"double_quant.absmax must be {scales.dtype} ({groups},), got "
                f"{absmax.dtype} {absmax.shape}"
            )
        if not (np.isfinite(absmax).all() and (absmax >= 0).all()):
            raise ValueError("double_quant.absmax must be finite and >= 0")
        off = np.asarray(self.offset)
        if off.shape != () or off.dtype != scales.dtype or not np.isfinite(off):
            raise ValueError(
                f"double_quant.offset must be a finite {scales.dtype} scalar, got {self.offset!r}"
            )
        if not np.array_equal(self.values(), scales):
            raise ValueError("scales are not the values double_quant stands for")


def double_quantize(scales: np.ndarray, zero: np.ndarray | None = None) -> DoubleQuant:
    """First-level block scales (..., nb) -> their 8-bit double quantization (bitsandbytes'
    layout: the result decodes as its dequantize_blockwise + offset does).

    Computed in the scales' dtype (float32; float64 scales of float64 input stay float64).
    offset = mean of the scales (summed in float64, then rounded; bitsandbytes takes torch's
    float32 mean), v = scale - offset, groups of 256 (flattened, C order) with absmax = max
    |v|, first code = the map value nearest v * (1 / absmax) clipped to [-1, 1] (midpoints,
    ties to the lower code), as bitsandbytes' quantize_blockwise. Then, unlike bitsandbytes, a
    code whose decoded scale a' falls below the first-level scale a moves up to the next map
    value until a' >= a (a' is at most one map gap above a: <= 2 * DQ_MAX_ERROR times the
    group absmax), so no element of the block clips; bitsandbytes keeps the nearest code, which
    can clip a block's extreme by half a gap and, for a block far below the mean, gives a
    scale <= 0. Blocks marked in `zero` (all-zero blocks) count as scale 0, as bitsandbytes'
    absmax does, and get the first code with a' > 0 (stored scales must be > 0; any serves a
    zero block); an all-zero tensor gets scale 1 throughout.
    """
    dt = np.dtype(np.float64) if np.asarray(scales).dtype == np.float64 else np.dtype(np.float32)
    a = np.array(scales, dt)
    if zero is not None:
        a[np.asarray(zero)] = 0
    if not a.any():
        a[...] = 1
    flat = a.reshape(-1)
    offset = dt.type(np.mean(flat, dtype=np.float64))
    v = flat - offset
    groups = -(-flat.size // DQ_BLOCK)
    padded = np.zeros(groups * DQ_BLOCK, dt)
    padded[: flat.size] = v
    absmax = np.abs(padded.reshape(groups, DQ_BLOCK)).max(axis=-1)
    # code 255 (1.0) must cover the group's largest scale: absmax + offset >= it, which the
    # rounding of scale - offset can miss by an ulp; such absmaxes go up by ulps
    top = np.zeros(groups * DQ_BLOCK, dt)
    top[: flat.size] = flat
    top = top.reshape(groups, DQ_BLOCK).max(axis=-1)
    with np.errstate(over="ignore"):
        short = absmax + offset < top
        while short.any():
            absmax = np.where(short, np.nextafter(absmax, dt.type(np.inf)), absmax)
            short = absmax + offset < top
    per = np.repeat(absmax, DQ_BLOCK)[: flat.size]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = dt.type(1.0) / per
        normed = v * inv
        # a subnormal group absmax, whose reciprocal overflows: divide (bitsandbytes clamps
        # the absmax to 1e-38 there; the code is ours to choose, any reader decodes it alike)
        tiny = ~np.isfinite(inv)
        if tiny.any():
            normed[tiny] = v[tiny] / per[tiny]
    normed = np.clip(np.nan_to_num(normed), dt.type(-1), dt.type(1))
    midpoints = DYNAMIC_MIDPOINTS if dt == np.float32 else DYNAMIC_MIDPOINTS.astype(dt)
    codes = np.searchsorted(midpoints, normed, side="left").astype(np.uint8).reshape(a.shape)
    while True:  # up to the first code that covers a (about half the codes move one step)
        values = DoubleQuant(codes, absmax, offset).values()
        up = ((values < a) | (values <= 0)) & (codes < 255)
        if not up.any():
            break
        codes = codes + up.astype(np.uint8)
    while True:  # scales past the dtype's range (a near its max, a large offset): step back
        values = DoubleQuant(codes, absmax, offset).values()
        down = np.isinf(values) & (codes > 0)
        if not down.any():
            return DoubleQuant(codes, absmax, offset)
        codes = codes - down.astype(np.uint8)


class NF4DoubleQuant(NF4):
    """NF4 with QLoRA's double quantization of the block scales (bitsandbytes'
    `quantize_4bit(..., compress_statistics=True)`): each block's absmax becomes an 8-bit code of
    the dynamic map, with a float32 absmax per 256 scales and one float32 offset (`DoubleQuant`).

    `QuantizedTensor.scales` hold the scales the runtime computes from those codes (exact
    float32; float64 for float64 input, whose absmaxes and offset are then float64 too), and
    `QuantizedTensor.double_quant` the codes, group absmaxes and offset; bits per weight count
    8 bits per block scale + 32 per 256 of them + 32 for the offset (about 4.127 at block 64,
    not 4.5). The layout is bitsandbytes' when the blocks run over the flattened
    tensor (axis=-1 with shape[-1] a multiple of the block size, or axis=None).

    Two differences, on purpose (same layout: any reader decodes the result alike):
    * the 8-bit code of a block's scale is the nearest one that covers its absmax a
      (`double_quantize`: a <= a' <= a + 2 * DQ_MAX_ERROR * the group's absmax), where
      bitsandbytes takes the nearest one (which can clip the block's extreme, or make a' <= 0
      for a block far below the others);
    * the 4-bit codes are picked against the a' the runtime will use; bitsandbytes picks them
      against a, then dequantizes with a'.
    So nothing clips, each element gets the nearest code for a' (up to float rounding at exact
    ties), and its error is at most the plain nf4 error (half the codebook gap around x / a,
    times a) plus a' - a, which is at most 0.0141 (two DQ_MAX_ERROR) times the group absmax
    (rounding aside). Blocks far below their group's largest scales pay most: their
    error is bounded by that, not by their own absmax.
    """

    name = "nf4_dq"
    scale_bits = 8
    #: the core asks `compress_scales` for the stored scales and keeps their state
    double_quant = True
    description = "NF4 with 8-bit double-quantized block scales (bitsandbytes, QLoRA)"

    def compress_scales(self, scale: np.ndarray, blocks: np.ndarray) -> DoubleQuant:
        """`double_quantize` of the first-level `scale` (..., nb) of `blocks` (..., nb, bs)."""
        return double_quantize(scale, zero=~blocks.any(axis=-1))


NF4_DQ_FORMAT = register(NF4DoubleQuant())
