"""16-lane kernels of the integer formats: int4, uint4 and int4_ort quantize, int4 and uint4
dequantize.

Importing this module imports numba (`quantize.kernels` imports it only on first use). These
kernels run whole blocks of a multiple of 16 elements through LLVM vector IR loops (`fp4`'s
`_codes_blocks`, `_dequant_blocks` and `_amax_blocks`: one 16-lane
op where numba's own loops deinterleave the nibbles with 512-bit permutes and then work in
8-lane halves); the scalar rules and helpers are `int4`'s, which `fp4` also builds on.

int4, uint4 and int4_ort quantize, per work item (a run of blocks in one row, `int4`'s
layout), in two passes, both vectorised:

1. the scales (uint4, int4_ort: and zero points) of 16 whole blocks at a time: the block maxima
   of the int32 keys (`bits & 0x7fffffff`; uint4, int4_ort: bits and bits ^ 0x80000000) folded
   by a tree of shuffles into one vector (int4: `fp4._row_amax`; uint4: `_uint4_param_groups`;
   int4_ort: `_ort_param_groups`), then the format's rule on the vector. The rare blocks the
   vectorised rule leaves out (nudged or subnormal scales, a span that overflows float32) send
   the item to the exact scalar rules.
2. the codes, rint(q) clipped, from q = x / scale rounded once to float32, computed as a
   reciprocal multiply with one FMA correction, which equals the IEEE division wherever it
   matters (`fp4._codes_blocks`, kind "rcp", has the argument and its exhaustive check); the
   next item's input is prefetched meanwhile, so its memory reads overlap this pass's work.

int4_ort (ONNX Runtime's MatMulNBits rule, `formats.integer.OrtInt4`, bit for bit): the
extreme e by int32 max-reductions over the float32 bits (`int4._range_keys`), scale = |e| / 8
(`int4._cover`'s nudge for subnormal scales, by the scalar rule), zero point 7 if e > 0 else 8;
codes clamp(roundf(x * (1 / s) + 8), 0, 15), s = ORT's signed scale (-scale where the zero point
is 7; x * (1 / -scale) is -(x * (1 / scale)) exactly), x / s where 1 / s overflows, roundf as
floor plus the exact fraction (ties up), then 15 - code where the zero point is 7. Its values decode
as uint4's, so `dequantize_uint4` serves it.

Dequantize: the code (int4: the nibble sign-extended; uint4: nibble - zero point) * scale in
float32, rounded once to the output dtype and saturating (`fp4._vstore_out`), as
`QuantizedTensor.dequantize` does from the exact float64 product.

numba's on-disk cache keys on this file only: after editing helpers in `int4.py` or `fp4.py`,
clear `__pycache__`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .fp4 import (
    _V32,
    _V64,
    _VF,
    _W,
    _codes_blocks,
    _dequant_blocks,
    _div32,
    _fold,
    _ptr,
    _row_amax,
    _splat,
    _vfunc,
    _vload,
)
from .int4 import (
    _F32,
    _ONE,
    _SEVEN,
    _c32,
    _close_row,
    _code_int4,
    _code_ort,
    _code_ort_div,
    _code_uint4,
    _high_s4,
    _high_u4,
    _int4_scale,
    _load,
    _low_s4,
    _low_u4,
    _ort_params,
    _ort_signed,
    _prefetch_ahead,
    _put_nibble,
    _store,
    _uint4_params,
    _work_item,
)


def _isplat(builder, scalar):
    """A runtime i32 in all 16 lanes."""
    undef = ir.Constant(_V32, ir.Undefined)
    v = builder.insert_element(undef, scalar, _c32(0))
    return builder.shuffle_vector(v, undef, ir.Constant(_V32, [0] * _W))


def _ort_code_vec(builder, q, nan_aware, zp):
    """int4_ort codes of q = x * (1 / scale) (or x / scale) for a block with zero point zp:
    clamp(roundf(+-q + 8), 0, 15), negated and flipped (15 - code) where zp == 7."""
    neg = builder.icmp_unsigned("==", zp, _c32(7))
    sign = _isplat(builder, builder.select(neg, _c32(-0x80000000), _c32(0)))
    flip = _isplat(builder, builder.select(neg, _c32(15), _c32(0)))
    q = builder.bitcast(builder.xor(builder.bitcast(q, _V32), sign), _VF)
    q = builder.fadd(q, _splat(8.0, _F32))
    floor = _vfunc(builder, "llvm.floor.v16f32", _VF, [_VF])
    t = builder.call(floor, [q])
    up = builder.fcmp_ordered(">=", builder.fsub(q, t), _splat(0.5, _F32))
    c = builder.add(builder.fptosi(t, _V32), builder.zext(up, _V32))
    return builder.xor(_clamp(builder, c, 0, 15), flip)


def _rint_i32(builder, q):
    rint = _vfunc(builder, "llvm.rint.v16f32", _VF, [_VF])
    return builder.fptosi(builder.call(rint, [q]), _V32)


def _clamp(builder, c, lo, hi):
    c = builder.select(builder.icmp_signed("<", c, _splat(lo)), _splat(lo), c)
    return builder.select(builder.icmp_signed(">", c, _splat(hi)), _splat(hi), c)


def _int4_code_raw_vec(builder, q, nan_aware):
    """int4 codes of q = x / scale: rint (ties to even) clipped to [-8, 7], in two's complement
    with bits above the low 4 left set (`_vstore_nibbles` drops them). |q| <= 7.5 for the scales
    the kernels choose (amax <= 7.5 * scale), so the conversion is exact and rint(q) >= -8: only
    the upper clip is needed."""
    c = _rint_i32(builder, q)
    return builder.select(builder.icmp_signed(">", c, _splat(7)), _splat(7), c)


def _vstore_nibbles(context, builder, arrty, arr, off, codes):
    """16 codes (<16 x i32>; only the low 4 bits count) -> 8 bytes at `off`, element 2i in the
    low nibble: per 64-bit lane, the low nibble of the low code and the next 4 bits from the
    lane shifted right by 28 (the high code's low nibble). One op fewer than masking each code
    to 4 bits first and then packing as `fp4._vstore_packed` does."""
    v = builder.bitcast(codes, _V64)
    t = builder.lshr(v, ir.Constant(_V64, [28] * (_W // 2)))
    lo = builder.and_(v, ir.Constant(_V64, [0x0F] * (_W // 2)))
    v = builder.or_(lo, builder.and_(t, ir.Constant(_V64, [0xF0] * (_W // 2))))
    b = builder.trunc(v, ir.VectorType(ir.IntType(8), _W // 2))
    ptr = _ptr(context, builder, arrty, arr, off)
    builder.store(b, builder.bitcast(ptr, b.type.as_pointer()), align=1)


def _uint4_code_vec(builder, q, nan_aware, zp):
    """uint4 codes of q = x / scale: rint(q) + zero point clipped to [0, 15]."""
    return _clamp(builder, builder.add(_rint_i32(builder, q), _isplat(builder, zp)), 0, 15)


def _int4_value_vec(builder, c):
    """The signed value of 4-bit two's complement codes (<16 x i32>, 0..15), float32."""
    return builder.sitofp(builder.ashr(builder.shl(c, _splat(28)), _splat(28)), _VF)


def _uint4_value_vec(builder, c, zp):
    """code - zero point, float32."""
    return builder.sitofp(builder.sub(c, _isplat(builder, zp)), _VF)


def _param_groups(rule):
    """An intrinsic (x_row, scales_row, zero_points_row, b0, b1, bs) -> intp: the scales and
    zero points of the whole blocks b0..b1-1 of a row (float32 or half input, bs % 16 == 0), 16
    blocks at a time: per block the lane-wise int32 maxima of the bits and of bits ^ 0x80000000
    (`int4._range_keys`), folded by a tree of shuffles into one vector of 16 blocks' keys each,
    then `rule(builder, hk, lk) -> (scale, zero point i32, odd)` on 16 blocks at once. Returns
    the first block not done (b0 + a multiple of 16), or -1 if some block of the row's groups is
    `odd` (needs what the vector rule leaves out): the caller then applies the exact scalar rule
    to all of them."""

    def codegen(context, builder, sig, args):
        xty, sty, zty = sig.args[:3]
        xa, sa, za, b0v, b1v, bsv = args
        intp = b0v.type
        units = builder.udiv(bsv, intp(_W))
        sdata = context.make_array(sty)(context, builder, sa).data
        zdata = context.make_array(zty)(context, builder, za).data
        bad = cgutils.alloca_once_value(builder, ir.Constant(ir.IntType(1), 0))
        top = _splat(-0x80000000)

        def block_keys(b):
            s0 = builder.mul(b, bsv)

            def keys(o):
                v = builder.bitcast(_vload(context, builder, xty, xa, o), _V32)
                return v, builder.xor(v, top)

            h0, l0 = keys(s0)
            hacc = cgutils.alloca_once_value(builder, h0)
            lacc = cgutils.alloca_once_value(builder, l0)
            with cgutils.for_range_slice(builder, intp(1), units, intp(1), intp=intp) as (u, _):
                h, lw = keys(builder.add(s0, builder.mul(u, intp(_W))))
                builder.store(_vmax(builder, builder.load(hacc), h), hacc)
                builder.store(_vmax(builder, builder.load(lacc), lw), lacc)
            return builder.load(hacc), builder.load(lacc)

        def tree(vs):
            width = _W
            while len(vs) > 1:
                vs = [_fold(builder, vs[i], vs[i + 1], width) for i in range(0, len(vs), 2)]
                width //= 2
            return vs[0]

        n16 = builder.udiv(builder.sub(b1v, b0v), intp(_W))
        zero = _splat(0)
        with cgutils.for_range(builder, n16) as loop:
            g = builder.add(b0v, builder.mul(loop.index, intp(_W)))
            ks = [block_keys(builder.add(g, intp(i))) for i in range(_W)]
            hk = _vmax(builder, tree([k[0] for k in ks]), zero)  # lane i: block g + i
            lk = _vmax(builder, tree([k[1] for k in ks]), zero)
            scale, zi, odd = rule(builder, hk, lk)
            anyodd = builder.call(
                _vfunc(builder, "llvm.vector.reduce.or.v16i1", ir.IntType(1), [odd.type]), [odd]
            )
            builder.store(builder.or_(builder.load(bad), anyodd), bad)
            ptr = builder.bitcast(builder.gep(sdata, [g]), _VF.as_pointer())
            builder.store(scale, ptr, align=4)
            z8 = builder.trunc(zi, ir.VectorType(ir.IntType(8), _W))
            builder.store(
                z8, builder.bitcast(builder.gep(zdata, [g]), z8.type.as_pointer()), align=1
            )
        done = builder.add(b0v, builder.mul(n16, intp(_W)))
        return builder.select(builder.load(bad), intp(-1), done)

    @intrinsic
    def param_groups(typingctx, xr, sr, zr, b0, b1, bs):
        return types.intp(xr, sr, zr, types.intp, types.intp, types.intp), codegen

    return param_groups


def _vmax(builder, x, y):
    """Lane-wise signed int32 max."""
    return builder.select(builder.icmp_signed(">", x, y), x, y)


_TINY32 = float(np.finfo(np.float32).tiny)


def _uint4_rule(builder, hk, lk):
    """`int4._uint4_params` on 16 blocks' keys; odd: a span that overflows float32, `_cover`'s
    nudge or a subnormal scale."""
    zero = _splat(0)
    fz = _splat(0.0, _F32)
    v64 = ir.VectorType(ir.DoubleType(), _W)
    hi = builder.bitcast(hk, _VF)
    lo = builder.select(
        builder.icmp_signed(">", lk, zero), builder.fneg(builder.bitcast(lk, _VF)), fz
    )
    span = builder.fsub(hi, lo)
    flat = builder.fcmp_ordered("==", span, fz)
    scale = builder.fdiv(span, _splat(15.0, _F32))
    short = builder.fcmp_ordered(
        "<",
        builder.fmul(builder.fpext(scale, v64), _splat(15.5, ir.DoubleType())),
        builder.fpext(span, v64),
    )
    tiny = builder.fcmp_ordered("<", scale, _splat(_TINY32, _F32))
    inf = builder.fcmp_ordered("==", span, _splat(float("inf"), _F32))
    odd = builder.and_(builder.or_(builder.or_(short, tiny), inf), builder.not_(flat))
    rint = _vfunc(builder, "llvm.rint.v16f32", _VF, [_VF])
    z = builder.fneg(builder.call(rint, [builder.fdiv(lo, scale)]))
    z = builder.select(builder.fcmp_ordered(">", z, fz), z, fz)
    z = builder.select(builder.fcmp_ordered("<", z, _splat(15.0, _F32)), z, _splat(15.0, _F32))
    zi = builder.select(flat, zero, builder.fptosi(z, _V32))
    return builder.select(flat, _splat(1.0, _F32), scale), zi, odd


def _ort_rule(builder, hk, lk):
    """`int4._ort_params` on 16 blocks' keys: the extreme's key (hk if hk > lk, a tie picks the
    minimum), scale = |e| / 8 (1 for e == 0), zero point 7 if hk > lk else 8. |e| / 8 is exact
    when it is normal, so `_cover` nudges nothing there; odd: a subnormal scale (where it may),
    the scalar rule then redoes the item. NaN and inf give what the scalar rule gives (a NaN or
    inf scale, never nudged)."""
    pos = builder.icmp_signed(">", hk, lk)
    key = builder.select(pos, hk, lk)
    flat = builder.icmp_signed("==", key, _splat(0))
    scale = builder.fdiv(builder.bitcast(key, _VF), _splat(8.0, _F32))
    tiny = builder.fcmp_ordered("<", scale, _splat(_TINY32, _F32))
    odd = builder.and_(tiny, builder.not_(flat))
    zi = builder.select(pos, _splat(7), _splat(8))
    return builder.select(flat, _splat(1.0, _F32), scale), zi, odd


_uint4_param_groups = _param_groups(_uint4_rule)
_ort_param_groups = _param_groups(_ort_rule)


#: the `fmt` argument of `quantize_int` (and how `quantize.kernels` picks the rule)
INT4, UINT4, INT4_ORT = 0, 1, 2

_int4_codes = _codes_blocks("rcp", _int4_code_raw_vec, store=_vstore_nibbles)
_uint4_codes = _codes_blocks("rcp", _uint4_code_vec, zero_points=True)
_ort_codes = _codes_blocks("inv", _ort_code_vec, zero_points=True)
_int4_values = _dequant_blocks(_int4_value_vec)
_uint4_values = _dequant_blocks(_uint4_value_vec, zero_points=True)
_int4_values_nt = _dequant_blocks(_int4_value_vec, stream=True)
_uint4_values_nt = _dequant_blocks(_uint4_value_vec, zero_points=True, stream=True)


@njit(inline="always")
def _int4_scales(sb):
    """Block amaxes in `sb` -> int4 scales amax / 7 (1 for 0), in place, in a loop LLVM
    vectorises; True if some block needs `_cover`'s nudge (subnormal amax / 7: the caller then
    redoes the item by the exact rule)."""
    bad = False
    for i in range(sb.shape[0]):
        a = sb[i]
        scale = _ONE if a == 0 else _div32(a, _SEVEN)
        bad |= np.float64(scale) * 7.5 < np.float64(a)
        sb[i] = scale
    return bad


@njit(inline="always")
def _block_params(xb, fmt):
    """(scale, zero point) of one block by the format's rule (int4: zero point 0)."""
    if fmt == INT4:
        return _int4_scale(xb), np.int32(0)
    if fmt == UINT4:
        return _uint4_params(xb)
    return _ort_params(xb)


# --- quantize + pack ------------------------------------------------------------------------------


@njit(parallel=True, nogil=True, cache=True)
def quantize_int(x, packed, scales, zero_points, bs, chunk, fmt):
    """x (rows, n) -> packed (rows, ceil(nb*bs/2)) uint8, scales (rows, nb) float32 and, for
    uint4 and int4_ort, zero points (rows, nb) uint8 (int4: any (1, nb) uint8 array, unused).

    `fmt`: INT4, UINT4 or INT4_ORT. `chunk` blocks per parallel work item; chunk * bs must be
    even unless chunk >= nb. The padding of a last block holds the code of 0.
    """
    rows, n = x.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    total = rows * n
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        xr = x[r]
        pr = packed[r]
        sr = scales[r]
        zr = zero_points[min(r, zero_points.shape[0] - 1)]
        # pass 1: every block's scale (their latency chains overlap). All three formats: the
        # reductions 16 blocks at a time, then the rule across blocks (both vectorised); the
        # exact scalar rule for the rest and wherever a vectorised rule leaves something out
        fast_end = max(b0, min(b1, n // bs)) if bs % _W == 0 else b0
        done = b0
        if fmt == INT4:
            _row_amax(xr, sr, b0, b1, bs, n)
            done = b0 if _int4_scales(sr[b0:b1]) else b1
        elif fmt == UINT4:
            done = max(b0, _uint4_param_groups(xr, sr, zr, b0, fast_end, bs))
        else:
            done = max(b0, _ort_param_groups(xr, sr, zr, b0, fast_end, bs))
        for b in range(done, b1):
            s0 = b * bs
            e = min(s0 + bs, n)
            _prefetch_ahead(x, r * n + s0, e - s0, total)
            scale, zp = _block_params(xr[s0:e], fmt)
            sr[b] = scale
            if fmt != INT4:
                zr[b] = np.uint8(zp)
        # pass 2: the codes of whole blocks of a multiple of 16, 16 at a time (the input is in
        # L1/L2 by now), prefetching the next item's input meanwhile
        ahead = (b1 - b0) * bs
        if fmt == INT4:
            _int4_codes(xr, pr, sr, b0, fast_end, bs, _ONE, ahead)
        elif fmt == UINT4:
            _uint4_codes(xr, pr, sr, zr, b0, fast_end, bs, _ONE, ahead)
        else:
            _ort_codes(xr, pr, sr, zr, b0, fast_end, bs, _ONE, ahead)
        # other block sizes and the padded last block: nibble by nibble (items start on a byte)
        low = np.int32(0)  # the pending low nibble
        for b in range(fast_end, b1):
            s0 = b * bs
            xb = xr[s0 : min(s0 + bs, n)]
            scale = sr[b]
            zp = np.int32(0) if fmt == INT4 else np.int32(zr[b])
            s, rcp, tiny, flip = _ort_signed(scale, zp)
            for j in range(bs):
                if s0 + j >= n:
                    c = zp  # the code of 0
                elif fmt == INT4:
                    c = _code_int4(_load(xb, j), scale)
                elif fmt == UINT4:
                    c = _code_uint4(_load(xb, j), scale, zp)
                elif tiny:
                    c = _code_ort_div(_load(xb, j), s, flip)
                else:
                    c = _code_ort(_load(xb, j), rcp, flip)
                low = _put_nibble(pr, s0 + j, c, low)
        _close_row(pr, b1 * bs, low)


# --- unpack + dequantize --------------------------------------------------------------------------


@njit(parallel=True, nogil=True, cache=True)
def dequantize_int(packed, scales, zero_points, out, bs, chunk, signed, stream):
    """packed (rows, ceil(nb*bs/2)), scales (rows, nb) float32 -> out (rows, n), n <= nb*bs:
    code * scale (`signed`: int4) or (code - zero point) * scale (uint4, int4_ort; int4 takes
    any (1, nb) uint8 zero points, unused).

    `stream`: whole blocks of a multiple of 16 go out by non-temporal stores (float32 `out`
    with 16-byte aligned rows only).
    """
    rows, n = out.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        pr = packed[r]
        orow = out[r]
        sr = scales[r]
        zr = zero_points[min(r, zero_points.shape[0] - 1)]
        vec_end = max(b0, min(b1, n // bs)) if bs % _W == 0 else b0
        if signed and stream:
            _int4_values_nt(pr, sr, orow, b0, vec_end, bs, _ONE, False)
        elif signed:
            _int4_values(pr, sr, orow, b0, vec_end, bs, _ONE, False)
        elif stream:
            _uint4_values_nt(pr, sr, zr, orow, b0, vec_end, bs, _ONE, False)
        else:
            _uint4_values(pr, sr, zr, orow, b0, vec_end, bs, _ONE, False)
        for b in range(vec_end, b1):  # other block sizes, the last block: nibble by nibble
            s0 = b * bs
            ob = orow[s0 : min(s0 + bs, n)]
            scale = sr[b]
            zp = zr[b]
            for j in range(ob.shape[0]):
                p = s0 + j
                byte = pr[p // 2]
                if signed:
                    c = _high_s4(byte) if p % 2 else _low_s4(byte)
                else:
                    c = _high_u4(byte, zp) if p % 2 else _low_u4(byte, zp)
                _store(ob, j, c, scale)
