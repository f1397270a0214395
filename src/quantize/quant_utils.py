"""Block-wise quantization utilities with the signatures of NVIDIA ModelOpt's ONNX `quant_utils`.

Every function is a thin door into `quantize.core` (formats, block machinery, packers). On the
inputs where ModelOpt (nvidia-modelopt 0.47) is right, results equal its results element for
element: shapes, dtypes, half-to-even ties, layouts, 2-D and 3-D weights, both axes, zero-point
mode, 4 and 8 bits (tests/test_modelopt_parity.py, against vectors generated from ModelOpt).

Where ModelOpt is wrong, we are right; each deviation has a test (tests/test_quant_utils.py):

1. get_amax(quant_axis=0) on 2-D weights: ModelOpt reshapes to (block_size, -1), which puts rows
   i, i+nb, i+2nb, ... of a column into one "block". We take the max of each contiguous run of
   block_size rows, flattened row-major over (d0 // block_size, d1), the layout compute_e8m0
   reshapes to.
2. find_scales clips scales at 1e-5 (CLIP_MIN): every block with amax below about 5e-6 comes out
   all zeros. We only keep scales from being 0 (an all-zero block gets scale 1) and nudge a
   scale up by ulps where float rounding would clip a block's extreme; tiny blocks survive.
3. Zero-point mode: ModelOpt uses the block's own [min, max], so a block that does not contain
   0 (say all in [10, 11]) gets a zero point clipped to 0 and its values clip to 15 * scale
   (error ~10). We extend the range to include 0, as ONNX Runtime does; blocks that already
   straddle 0 are unchanged. We also apply `alpha` in zero-point mode (ModelOpt ignores it).
4. rtn with zero points and num_bits=8 casts codes 128..255 to int8, wrapping them negative. We
   return uint8 codes there (int8 everywhere else, as ModelOpt).
5. compute_e8m0 always divides by 448, the FP8 E4M3 maximum: right for MXFP8, wrong for FP4
   (MXFP4) blocks, whose elements top out at 6. `elem_max=6.0` gives the FP4 exponent. The
   exponent is also computed exactly (the smallest e with amax <= elem_max * 2^e) rather than as
   ceil(float32 log2), which can land one short just above a power of two, and 255 (the E8M0
   NaN code) is rejected.
6. float16/bfloat16 weights: ModelOpt divides in float16, which double-rounds near ties. We
   divide in float32 by the float16 scale that is returned (so dequantizing with it matches).
7. pack_float32_to_4bit_cpp_based: ModelOpt's C++ extension rounds ties away from zero while
   its Python fallback (used when the build fails) rounds them to even, so its answer depends on
   the machine. Ours always rounds to even, as `_optimized` and ONNX's own helper do.
8. quantize_axis may be negative, any rank is accepted by find_scales/rtn/dq_tensor/quant_tensor
   (ModelOpt mis-blocks 3-D weights on axis 1), and bad input raises ValueError/TypeError
   naming the argument instead of failing an assert or returning garbage (NaN codes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._checks import (
    as_bool,
    as_int,
    as_positive_float,
    as_real_array,
    check_block_size,
    check_codes,
    check_finite,
    is_float_dtype,
    normalize_axis,
)
from .blocking import from_blocks, n_blocks, params_from_axis, params_to_axis, to_blocks
from .core import compute_dtype, prepare
from .formats import nvfp4
from .formats.integer import integer_format
from .formats.mx import E8M0_BIAS, e8m0_exponent
from .packing import pack_nibbles

INT4_MIN, INT4_MAX = -8, 7
UINT4_MIN, UINT4_MAX = 0, 15


# --- argument checks shared by the block-wise doors -------------------------------------------


def _num_bits(num_bits: Any) -> int:
    b = as_int(num_bits, "num_bits")
    if not 2 <= b <= 8:
        raise ValueError(f"num_bits must be between 2 and 8, got {b}")
    return b


def _block_args(w: np.ndarray, block_size: Any, quantize_axis: Any) -> tuple[int, int]:
    if w.ndim == 0:
        raise ValueError("w must have at least one dimension, got a 0-d array")
    return check_block_size(block_size), normalize_axis(quantize_axis, w.ndim, "quantize_axis")


def _params(p: Any, name: str, w: np.ndarray, block_size: int, axis: int) -> np.ndarray:
    """A scale/zero-point array in ModelOpt's layout: w's shape with nb at `axis`."""
    arr = as_real_array(p, name)
    want = list(w.shape)
    want[axis] = n_blocks(w.shape[axis], block_size)
    if arr.shape != tuple(want):
        raise ValueError(
            f"{name} has shape {arr.shape}; for w of shape {w.shape}, block_size={block_size} "
            f"and quantize_axis={axis} it must be {tuple(want)}"
        )
    check_finite(arr, name)
    return arr


def _scales(s: Any, w: np.ndarray, block_size: int, axis: int) -> np.ndarray:
    arr = _params(s, "s", w, block_size, axis)
    if arr.size and not (arr > 0).all():
        raise ValueError("s must hold scales > 0; found a zero or negative scale")
    return arr


def _out_dtype(*dtypes: np.dtype) -> np.dtype:
    """float64 if any input is float64, the input's float16/bfloat16, else float32."""
    if any(d == np.float64 for d in dtypes):
        return np.dtype(np.float64)
    for d in dtypes:
        if is_float_dtype(d) and d != np.float32:
            return d
    return np.dtype(np.float32)


def _round_up_to(dtype: np.dtype, scale: np.ndarray) -> np.ndarray:
    """`scale` stored in a narrower float dtype, rounded up so it still covers its block."""
    out = scale.astype(dtype)
    low = out.astype(scale.dtype) < scale
    if low.any():
        out = np.where(low, np.nextafter(out.astype(np.float32), np.float32(np.inf)), out)
        out = out.astype(dtype)
    return out


# --- the block-wise integer doors -------------------------------------------------------------


def find_scales(
    w: np.ndarray,
    block_size: int,
    quantize_axis: int = 0,
    alpha: float = 1.0,
    use_zero_point: bool = False,
    num_bits: int = 4,
):
    """Find scale factors for `w` via `s = max(w.block(block_size)) / 7`.

    Symmetric: s = alpha * amax / (2^(b-1) - 1). Zero point: s = alpha * (hi - lo) / (2^b - 1)
    over [min(lo, 0), max(hi, 0)], z = clip(-rint(lo / s), 0, 2^b - 1). Returns (s, z) with
    w's shape but ceil(n / block_size) at `quantize_axis`; z is None without zero points.
    """
    w = prepare(w, "w")
    bs, ax = _block_args(w, block_size, quantize_axis)
    a = as_positive_float(alpha, "alpha")
    fmt = integer_format(_num_bits(num_bits), as_bool(use_zero_point, "use_zero_point"))
    cd = compute_dtype(w.dtype)
    scale, zp = fmt.choose_params(to_blocks(w.astype(cd, copy=False), bs, ax), a)
    out = _out_dtype(w.dtype)
    scale = _round_up_to(out, scale) if out != cd else scale
    s = params_to_axis(scale, ax)
    z = None if zp is None else params_to_axis(zp.astype(out), ax)
    return s, z


def rtn(
    w: np.ndarray,
    s: np.ndarray,
    block_size: int,
    quantize_axis: int = 0,
    zp: np.ndarray = None,
    num_bits: int = 4,
) -> np.ndarray:
    """Quantizes `w` with scale factors `s` via Round-to-Nearest.

    Ties are broken by rounding to the nearest even number. codes = clip(rint(w / s) [+ zp]);
    int8 codes, except uint8 for zero-point codes that need 8 bits (ModelOpt wraps them).
    """
    w = prepare(w, "w")
    bs, ax = _block_args(w, block_size, quantize_axis)
    bits = _num_bits(num_bits)
    s = _scales(s, w, bs, ax)
    fmt = integer_format(bits, zp is not None)
    if zp is not None:
        zp = check_codes(_params(zp, "zp", w, bs, ax), fmt.code_min, fmt.code_max, "zp")
    cd = np.dtype(np.float64) if np.float64 in (w.dtype, s.dtype) else np.dtype(np.float32)
    blocks = to_blocks(w.astype(cd, copy=False), bs, ax)
    scale = params_from_axis(s.astype(cd, copy=False), ax)
    zero = None if zp is None else params_from_axis(zp, ax)
    codes = from_blocks(fmt.encode(blocks, scale, zero), w.shape[ax], ax)
    wraps = fmt.code_max > np.iinfo(np.int8).max
    return np.ascontiguousarray(codes.astype(np.uint8 if wraps else np.int8))


def dq_tensor(
    w: np.ndarray,
    s: np.ndarray,
    block_size: int,
    quantize_axis: int = 0,
    zp: np.ndarray = None,
) -> np.ndarray:
    """Dequantizes `w` with scale factors `s`: w * s, or (w - zp) * s with zero points.

    The result's dtype is the scales' float dtype (float64 if either input is float64).
    """
    codes = check_codes(w, -128, 255, "w")
    if codes.size == 0:
        raise ValueError("w is empty; there is nothing to dequantize")
    bs, ax = _block_args(codes, block_size, quantize_axis)
    s = _scales(s, codes, bs, ax)
    if zp is not None:
        zp = check_codes(_params(zp, "zp", codes, bs, ax), 0, 255, "zp")
    out = _out_dtype(codes.dtype, s.dtype)
    fmt = integer_format(8, zp is not None)
    int_codes = to_blocks(codes.astype(np.int16), bs, ax)
    zero = None if zp is None else params_from_axis(zp.astype(np.int16), ax)
    values = fmt.decode(int_codes, params_from_axis(s.astype(out, copy=False), ax), zero)
    return np.ascontiguousarray(from_blocks(values, codes.shape[ax], ax))


def quant_tensor(
    w: np.ndarray,
    block_size: int,
    quantize_axis: int = 0,
    alpha: float = 1.0,
    use_zero_point: bool = False,
    num_bits: int = 4,
):
    """Quantize a tensor using alpha etc. and return the quantized tensor.

    Returns:
        (wq, scale, zp): the codes (as `rtn`), the scales and zero points (as `find_scales`;
        zp is None without zero points).
    """
    scale, zp = find_scales(w, block_size, quantize_axis, alpha, use_zero_point, num_bits)
    return rtn(w, scale, block_size, quantize_axis, zp, num_bits), scale, zp


# --- packers ----------------------------------------------------------------------------------


def pack_float32_to_4bit_optimized(array: np.ndarray | Sequence, signed: bool) -> np.ndarray:
    """Convert an array of float32 value to a 4bit data-type and pack every two consecutive elements in a byte.

    Values are clipped to [-8, 7] (signed) or [0, 15], rounded half to even, and packed low
    nibble first in C order; an odd count gets a 0 nibble. Returns uint8 of ceil(size / 2).
    """
    signed = as_bool(signed, "signed")
    arr = prepare(array, "array")
    lo, hi = (INT4_MIN, INT4_MAX) if signed else (UINT4_MIN, UINT4_MAX)
    flat = arr.reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer):
        flat = np.rint(np.clip(flat.astype(compute_dtype(flat.dtype), copy=False), lo, hi))
    codes = np.clip(flat, lo, hi).astype(np.int8)
    return pack_nibbles(codes)


def pack_float32_to_4bit_cpp_based(array: np.ndarray | Sequence, signed: bool) -> np.ndarray:
    """Convert an array of float32 value to a 4bit data-type and pack every two consecutive elements in a byte.

    ModelOpt runs this through a C++ extension it builds at run time; ours needs no build and
    gives the same bytes as `pack_float32_to_4bit_optimized`, with the same vectorized path.
    """
    return pack_float32_to_4bit_optimized(array, signed)


def pack_weights_to_int4(weight: np.ndarray) -> np.ndarray:
    """Converts ONNX model weights from high precision to INT4 precision.

    Rounds half to even, clips to [-8, 7], packs consecutive C-order pairs (low nibble first)
    and returns uint8 of shape (d0 // 2, *rest); d0 must be even.
    """
    w = prepare(weight, "weight")
    if w.ndim == 0 or w.shape[0] % 2:
        raise ValueError(f"weight's first dimension must be even, got shape {w.shape}")
    packed = pack_float32_to_4bit_optimized(w, signed=True)
    return packed.reshape(w.shape[0] // 2, *w.shape[1:])


# --- NVFP4 scaling --------------------------------------------------------------------------


def get_weights_scaling_factor_2(input: np.ndarray):
    """Returns per tensor weight scaling factor: float32 amax / (6 * 448), 1.0 if all zero."""
    return nvfp4.per_tensor_scale(prepare(input, "input"))


def _tensor_scale(x: Any, name: str = "weights_scaling_factor_2") -> np.ndarray:
    """A one-element positive scale; NumPy scalars/arrays keep their dtype, Python floats -> f32."""
    if isinstance(x, (np.ndarray, np.generic)):
        arr = np.asarray(x)
        if arr.size != 1:
            raise ValueError(f"{name} must hold one value, got shape {arr.shape}")
        as_positive_float(arr.reshape(()).item(), name)
        return arr.reshape(())
    return np.float32(as_positive_float(x, name))


def _nvfp4_blocks(x: np.ndarray, block_size: Any) -> tuple[np.ndarray, int]:
    bs = check_block_size(block_size)
    if x.ndim != 2:
        raise ValueError(f"input must be 2-D [n, k], got shape {x.shape}")
    if x.shape[-1] % bs:
        raise ValueError(
            f"input's last dimension {x.shape[-1]} is not divisible by block_size {bs}"
        )
    return x.reshape(x.shape[0], -1, bs), bs


def get_weights_scaling_factor(
    input: np.ndarray,
    block_size: int,
    weights_scaling_factor_2: np.float32,
):
    """Returns quantized per block weight scaling factor: block amax / (6 * scale_2), float32.

    [n, k] -> [n, k // block_size]; 1.0 for all-zero blocks. As in ModelOpt the values are not
    yet rounded to E4M3: that happens when they are stored.
    """
    blocks, _ = _nvfp4_blocks(prepare(input, "input"), block_size)
    return nvfp4.block_scales(blocks, _tensor_scale(weights_scaling_factor_2))


def quantize(
    input: np.ndarray,
    block_size: int,
    weights_scaling_factor: np.ndarray,
    weights_scaling_factor_2: np.ndarray,
):
    """Converting a tensor to a quantized format based on NVFP4 quantization.

    Divides each block by (its block scale * the tensor scale): the values FP4 E2M1 rounding is
    applied to next. [n, k] in, [n, k] out.
    """
    x = prepare(input, "input")
    blocks, _ = _nvfp4_blocks(x, block_size)
    sf = _params(weights_scaling_factor, "weights_scaling_factor", x, blocks.shape[-1], 1)
    if not (sf > 0).all():
        raise ValueError("weights_scaling_factor must hold scales > 0")
    scaled = blocks / (np.expand_dims(sf, axis=-1) * _tensor_scale(weights_scaling_factor_2))
    return scaled.reshape(scaled.shape[0], -1)


# --- MX (E8M0) helpers ------------------------------------------------------------------------


_AMAX_LAYOUTS = {  # (rank, axis) -> output shape of get_amax, as ModelOpt returns it
    (2, 1): lambda s, nb: (s[0] * nb,),
    (2, 0): lambda s, nb: (nb * s[1],),
    (3, 2): lambda s, nb: (s[0], s[1] * nb),
    (3, 1): lambda s, nb: (s[0] * nb, s[2]),
}


def _mx_axis(rank: int, quant_axis: Any) -> int:
    if rank not in (2, 3):
        raise ValueError(f"weight must be 2-D or 3-D, got {rank}-D")
    ax = normalize_axis(quant_axis, rank, "quant_axis")
    if (rank, ax) not in _AMAX_LAYOUTS:
        raise ValueError(f"quant_axis {quant_axis} is not supported for {rank}-D weights")
    return ax


def get_amax(weight: np.ndarray, quant_axis: int, block_size: int) -> np.ndarray:
    """Returns the amax of the weight tensor along the specified axis for a given block size.

    Only 2D and 3D tensors are supported (axes 0/1 for 2-D, 1/2 for 3-D; -1 is the last).
    Blocks are contiguous runs of block_size along quant_axis, which must divide evenly.
    """
    w = prepare(weight, "weight")
    ax = _mx_axis(w.ndim, quant_axis)
    bs = check_block_size(block_size)
    if w.shape[ax] % bs:
        raise ValueError(
            f"weight dimension {w.shape[ax]} (axis {ax}) is not divisible by block_size {bs}"
        )
    amax = params_to_axis(np.abs(to_blocks(w, bs, ax)).max(axis=-1), ax)
    nb = w.shape[ax] // bs
    return np.ascontiguousarray(amax).reshape(_AMAX_LAYOUTS[(w.ndim, ax)](w.shape, nb))


def compute_e8m0(
    amax: np.ndarray,
    weight_shape: tuple[int, ...],
    quant_axis: int,
    block_size: int,
    *,
    elem_max: float = 448.0,
) -> np.ndarray:
    """Computes the e8m0 value for the weight tensor.

    e8m0 = 127 + the smallest e >= -127 with amax <= elem_max * 2^e, in amax's float dtype
    (float32 unless amax is float64; cast to uint8 to store), shaped like
    the weight with weight_shape[quant_axis] // block_size at quant_axis. elem_max is the
    element format's largest value: 448 for FP8 E4M3 (MXFP8, ModelOpt's only choice), 6 for
    FP4 E2M1 (MXFP4).
    """
    a = prepare(amax, "amax")
    if (a < 0).any():
        raise ValueError("amax must be >= 0")
    shape = tuple(as_int(d, "weight_shape") for d in weight_shape)
    ax = _mx_axis(len(shape), quant_axis)
    bs = check_block_size(block_size)
    emax = as_positive_float(elem_max, "elem_max")
    if shape[ax] % bs:
        raise ValueError(f"weight_shape[{ax}]={shape[ax]} is not divisible by block_size {bs}")
    out_shape = list(shape)
    out_shape[ax] = shape[ax] // bs
    if a.size != int(np.prod(out_shape)):
        raise ValueError(
            f"amax has {a.size} values; weight_shape {shape} needs {np.prod(out_shape)}"
        )
    e8m0 = e8m0_exponent(a, emax, "ceil", saturate=False) + E8M0_BIAS
    out = np.float64 if a.dtype == np.float64 else np.float32  # ModelOpt keeps amax's dtype
    return e8m0.astype(out).reshape(out_shape)


# --- per-layer configuration ------------------------------------------------------------------


def get_num_bits(precision_info: dict[str, int] | None = None, name: str | None = None) -> int:
    """Determine the number of bits for quantization from precision_info (name -> bits); default 4.

    An entry may also be a dict with a "precision" key (ModelOpt >= 0.39's layer_info).
    """
    if not precision_info or name not in precision_info:
        return 4
    entry = precision_info[name]
    bits = entry.get("precision", 4) if isinstance(entry, dict) else entry
    return _num_bits(bits)


def update_block_size(
    num_bits: int, block_size: int, quantize_axis: int = 0, w: np.ndarray = None
) -> int:
    """Update the block size for quantization: -1 (per-channel) becomes w.shape[quantize_axis].

    Any other block_size is returned unchanged. num_bits is checked (2..8) and does not change
    the answer.
    """
    _num_bits(num_bits)
    bs = as_int(block_size, "block_size")
    if bs == -1:
        if w is None:
            raise ValueError("w is required to resolve block_size=-1 (per-channel)")
        arr = np.asarray(w)
        return int(arr.shape[normalize_axis(quantize_axis, arr.ndim, "quantize_axis")])
    return check_block_size(bs)


def reshape_scales_for_per_channel_nodes(
    scales_map: dict[str, np.ndarray],
    block_size: int,
    precision_info: dict[str, int] | None = None,
):
    """Update the scale map for per-channel nodes. For per channel quantization the scale needs to be 1D.

    A tensor is per-channel when its block size is -1: `block_size`, or the "block_size" of its
    entry in precision_info when that entry is a dict (ModelOpt >= 0.39's layer_info). The map
    is updated in place and returned, as in ModelOpt.
    """
    if not isinstance(scales_map, dict):
        raise TypeError(f"scales_map must be a dict of arrays, got {type(scales_map).__name__}")
    default = as_int(block_size, "block_size")
    for name, scale in scales_map.items():
        entry = (precision_info or {}).get(name)
        bs = entry.get("block_size", default) if isinstance(entry, dict) else default
        if bs == -1:
            scales_map[name] = np.asarray(scale).reshape(-1)
    return scales_map
