"""Numba kernels for NF4 (QLoRA NormalFloat4): quantize+pack, unpack+dequantize.

Importing this module imports numba (`quantize.kernels` imports it only on first use). Every
kernel is compiled on its first call for the argument types it gets, with `cache=True`.

The kernels reproduce the NumPy path (`quantize.formats.nf4`, `quantize.packing`,
`QuantizedTensor.dequantize`) bit for bit; `quantize.kernels.reference` is the twin the tests
hold them to. They share their structure and the vector IR helpers with `fp4.py`. Quantize, per
work item, in two passes:

1. scale = the block amax (`fp4._row_amax`: int32 maxima of `bits & 0x7fffffff`), 1.0 for an
   all-zero block (`NF4.choose_params`).
2. The codes, 16 elements at a time for whole blocks of a multiple of 16: normalised as
   `NF4.encode` does, v = x * inv with inv = 1 / scale in float32, or v = x / scale where inv
   overflows (a subnormal scale); code = the number of float32 midpoints (`nf4.NF4_MIDPOINTS`
   rounded to float32: bitsandbytes' thresholds) strictly below v, as `nf4_encode`'s
   searchsorted(side="left") (ties to the lower code), found by a binary search over the sorted
   midpoints: four comparisons, each midpoint picked by a vpermps on AVX-512, else by selects.
   Other block sizes and a padded last block go nibble by nibble (the padding holds code 7, the
   code of 0; an odd total is padded with a zero nibble, as `pack_nibbles` does).

Dequantize: NF4_VALUES[code] (float32; a vpermps from the 16 values on AVX-512, else a select
tree) * scale, rounded once to the output dtype and saturating (`fp4._vstore_out`, and the
`int4` store helpers for the scalar paths), as `QuantizedTensor.dequantize` does from the exact
float64 product.

No fast-math flags; divisions are IEEE `fdiv`. Whether the host has AVX-512 is numba's own
target setting (the CPU features it compiles for, which its cache also keys on).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..formats.nf4 import NF4_MIDPOINTS, NF4_VALUES
from .fp4 import (
    _V32,
    _VF,
    _W,
    _codes_blocks,
    _dequant_blocks,
    _div32,
    _row_amax,
    _splat,
    _target_has,
    _vfunc,
    nibble_value_intrinsics,
)
from .int4 import _F32, _I32, _c32, _close_row, _load, _put_nibble, _store, _work_item

_ONE = np.float32(1.0)
_ZERO_CODE = np.int32(7)
_THRESHOLDS = [float(t) for t in NF4_MIDPOINTS.astype(np.float32)]
_VALUES = [float(v) for v in NF4_VALUES]


def _nf4_code_ir(builder, v):
    """The number of float32 midpoints strictly below v, as i32."""
    code = _c32(0)
    for t in _THRESHOLDS:
        hit = builder.fcmp_ordered(">", v, ir.Constant(_F32, t))
        code = builder.add(code, builder.zext(hit, _I32))
    return code


@intrinsic
def _nf4_mul(typingctx, x, inv):
    """The NF4 code of x * inv (float32)."""

    def codegen(context, builder, sig, args):
        return _nf4_code_ir(builder, builder.fmul(args[0], args[1]))

    return types.int32(types.float32, types.float32), codegen


@intrinsic
def _nf4_div(typingctx, x, scale):
    """The NF4 code of x / scale (float32, IEEE division)."""

    def codegen(context, builder, sig, args):
        return _nf4_code_ir(builder, builder.fdiv(args[0], args[1]))

    return types.int32(types.float32, types.float32), codegen


def _nf4_value_ir(builder, c):
    """NF4_VALUES[c & 15] as float32: a 4-level select tree over the constants."""
    vals = [ir.Constant(_F32, v) for v in _VALUES]
    for bit in range(4):
        on = builder.icmp_unsigned("!=", builder.and_(c, _c32(1 << bit)), _c32(0))
        vals = [builder.select(on, vals[i + 1], vals[i]) for i in range(0, len(vals), 2)]
    return vals[0]


_nf4_low, _nf4_high = nibble_value_intrinsics(_nf4_value_ir, "NF4")


def _nf4_code_vec(builder, v, nan_aware=False):
    """`_nf4_code_ir` on <16 x float>, as a binary search: four comparisons, each against the
    midpoint that the bits found so far select (an exact count of the midpoints below v, as
    they are sorted). On AVX-512 each midpoint is picked by one vpermps, else by selects."""
    if _has_avx512():
        perm = _vfunc(builder, "llvm.x86.avx512.permvar.sf.512", _VF, [_VF, _V32])
        table = ir.Constant(_VF, [*_THRESHOLDS, _THRESHOLDS[-1]])
        code = _splat(0)
        for level in range(4):
            half = 8 >> level  # the midpoint between code + half - 1 and code + half
            idx = builder.add(code, _splat(half - 1))
            thr = _splat(_THRESHOLDS[7], _F32) if level == 0 else builder.call(perm, [table, idx])
            hit = builder.fcmp_ordered(">", v, thr)
            code = builder.add(code, builder.select(hit, _splat(half), _splat(0)))
        return code
    t = [_splat(x, _F32) for x in _THRESHOLDS]  # t[k]: between codes k and k + 1
    bits = []  # comparison results, most significant first
    for level in range(4):
        step = 8 >> level  # the midpoint index: 7, then +-4, +-2, +-1 around it
        cands = {}
        for path in range(1 << level):
            idx = step - 1
            for i in range(level):
                if (path >> (level - 1 - i)) & 1:
                    idx += 16 >> (i + 1)
            cands[path] = t[idx]
        # select the candidate for the path taken so far
        vals = [cands[p] for p in range(1 << level)]
        for i in range(level - 1, -1, -1):  # fold by the least significant bit found last
            vals = [builder.select(bits[i], vals[j + 1], vals[j]) for j in range(0, len(vals), 2)]
        bits.append(builder.fcmp_ordered(">", v, vals[0]))
    code = _splat(0)
    for i, b in enumerate(bits):
        code = builder.add(code, builder.select(b, _splat(8 >> i), _splat(0)))
    return code


#: NF4 codes of whole blocks: x * (1 / scale), or x / scale where 1 / scale overflows
_nf4_codes = _codes_blocks("inv", _nf4_code_vec)


def _has_avx512() -> bool:
    """Does numba compile for a CPU with AVX-512F (vpermps on 16 lanes)?"""
    return _target_has("avx512f")


def _nf4_value_vec(builder, c):
    """NF4_VALUES[c] for <16 x i32> codes 0..15: one vpermps from the 16 constants on AVX-512,
    else a 4-level select tree over them."""
    if _has_avx512():
        perm = _vfunc(builder, "llvm.x86.avx512.permvar.sf.512", _VF, [_VF, _V32])
        return builder.call(perm, [ir.Constant(_VF, _VALUES), c])
    vals = [_splat(v, _F32) for v in _VALUES]
    for bit in range(4):
        on = builder.icmp_unsigned("!=", builder.and_(c, _splat(1 << bit)), _splat(0))
        vals = [builder.select(on, vals[i + 1], vals[i]) for i in range(0, len(vals), 2)]
    return vals[0]


#: NF4 values of whole blocks times their scales
_nf4_dequant_blocks = _dequant_blocks(_nf4_value_vec)


@njit(parallel=True, nogil=True, cache=True)
def quantize_nf4(x, packed, scales, bs, chunk, have_scales):
    """x (rows, n) -> packed (rows, ceil(nb*bs/2)) uint8, scales (rows, nb) float32.

    `have_scales`: `scales` already holds the (positive) scales to encode against (nf4_dq's
    double-quantized ones), which are kept. `chunk` blocks per parallel work item; chunk * bs
    must be even unless chunk >= nb.
    """
    rows, n = x.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        xr = x[r]
        pr = packed[r]
        sr = scales[r]
        # pass 1: every block's scale, the amax (1 for an all-zero block)
        if not have_scales:
            _row_amax(xr, sr, b0, b1, bs, n)
            for b in range(b0, b1):
                sr[b] = _ONE if sr[b] == 0 else sr[b]
        # pass 2: the codes. Whole blocks of a multiple of 16: 16 at a time; the next item's
        # input is prefetched meanwhile
        fast_end = max(b0, min(b1, n // bs)) if bs % _W == 0 else b0
        _nf4_codes(xr, pr, sr, b0, fast_end, bs, _ONE, (b1 - b0) * bs)
        low = np.int32(0)  # the pending low nibble
        for b in range(fast_end, b1):
            s0 = b * bs
            xb = xr[s0 : min(s0 + bs, n)]
            scale = sr[b]
            inv = _div32(_ONE, scale)
            big = np.isinf(inv)
            for j in range(bs):
                if s0 + j >= n:
                    c = _ZERO_CODE
                elif big:
                    c = _nf4_div(_load(xb, j), scale)
                else:
                    c = _nf4_mul(_load(xb, j), inv)
                low = _put_nibble(pr, s0 + j, c, low)
        _close_row(pr, b1 * bs, low)


# --- unpack + dequantize --------------------------------------------------------------------------


@njit(parallel=True, nogil=True, cache=True)
def dequantize_nf4(packed, scales, out, bs, chunk):
    """packed (rows, ceil(nb*bs/2)), scales (rows, nb) float32 -> out (rows, n), n <= nb*bs."""
    rows, n = out.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        pr = packed[r]
        orow = out[r]
        sr = scales[r]
        # whole blocks of a multiple of 16: 16 at a time
        vec_end = max(b0, min(b1, n // bs)) if bs % _W == 0 else b0
        _nf4_dequant_blocks(pr, sr, orow, b0, vec_end, bs, _ONE, False)
        # other even block sizes: whole bytes
        fast_end = max(vec_end, min(b1, n // bs)) if bs % 2 == 0 else vec_end
        for b in range(vec_end, fast_end):
            s0 = b * bs
            ob = orow[s0 : s0 + bs]
            pb = pr[s0 // 2 : s0 // 2 + bs // 2]
            scale = sr[b]
            for k in range(bs // 2):
                _store(ob, 2 * k, _nf4_low(pb[k]), scale)
                _store(ob, 2 * k + 1, _nf4_high(pb[k]), scale)
        for b in range(fast_end, b1):  # odd block sizes, the last block: nibble by nibble
            s0 = b * bs
            ob = orow[s0 : min(s0 + bs, n)]
            scale = sr[b]
            for j in range(ob.shape[0]):
                p = s0 + j
                v = _nf4_high(pr[p // 2]) if p % 2 else _nf4_low(pr[p // 2])
                _store(ob, j, v, scale)
