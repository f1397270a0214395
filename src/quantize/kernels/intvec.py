"""16-lane kernels of the integer formats: int4_ort quantize, int4 and uint4 dequantize.

Importing this module imports numba (`quantize.kernels` imports it only on first use). These
kernels run whole blocks of a multiple of 16 elements through `fp4`'s LLVM vector IR loops
(`_codes_blocks`, `_dequant_blocks`: one 16-lane op where numba's own loops deinterleave the
nibbles with 512-bit permutes and then work in 8-lane halves); `fp4` builds on the scalar helpers
of `int4`, so they live here, apart from both. int4 and uint4 quantize stay in `int4` (numba
loops: there the IEEE division per element bounds the speed, and they vectorise it as well), and
are re-exported here so that this module holds every integer kernel.

int4_ort (ONNX Runtime's MatMulNBits rule, `formats.integer.OrtInt4`, bit for bit), per block:
the extreme e by int32 max-reductions over the float32 bits (`int4._range_keys`), scale =
|e| / 8 (`int4._cover`'s nudge for subnormal blocks), zero point 7 if e > 0 else 8; codes
clamp(roundf(x * (1 / s) + 8), 0, 15), s = ORT's signed scale (-scale where the zero point is 7;
x * (1 / -scale) is -(x * (1 / scale)) exactly), x / s where 1 / s overflows, roundf as floor
plus the exact fraction (ties up), then 15 - code where the zero point is 7. Its values decode
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
from numba import njit, prange

from .fp4 import _V32, _VF, _W, _codes_blocks, _dequant_blocks, _splat, _vfunc
from .int4 import (
    _F32,
    _ONE,
    _c32,
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
    _pack2,
    _prefetch_ahead,
    _store,
    _uint4_params,
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


def _int4_code_vec(builder, q, nan_aware):
    """int4 codes of q = x / scale: rint (ties to even) clipped to [-8, 7], as 4-bit two's
    complement (|q| <= 7.5 for the scales the kernels choose: the conversion is exact)."""
    return builder.and_(_clamp(builder, _rint_i32(builder, q), -8, 7), _splat(15))


def _uint4_code_vec(builder, q, nan_aware, zp):
    """uint4 codes of q = x / scale: rint(q) + zero point clipped to [0, 15]."""
    return _clamp(builder, builder.add(_rint_i32(builder, q), _isplat(builder, zp)), 0, 15)


def _int4_value_vec(builder, c):
    """The signed value of 4-bit two's complement codes (<16 x i32>, 0..15), float32."""
    return builder.sitofp(builder.ashr(builder.shl(c, _splat(28)), _splat(28)), _VF)


def _uint4_value_vec(builder, c, zp):
    """code - zero point, float32."""
    return builder.sitofp(builder.sub(c, _isplat(builder, zp)), _VF)


#: the `fmt` argument of `quantize_int` (and how `quantize.kernels` picks the rule)
INT4, UINT4, INT4_ORT = 0, 1, 2

_int4_codes = _codes_blocks("div", _int4_code_vec)
_uint4_codes = _codes_blocks("div", _uint4_code_vec, zero_points=True)
_ort_codes = _codes_blocks("inv", _ort_code_vec, zero_points=True)
_int4_values = _dequant_blocks(_int4_value_vec)
_uint4_values = _dequant_blocks(_uint4_value_vec, zero_points=True)
_int4_values_nt = _dequant_blocks(_int4_value_vec, stream=True)
_uint4_values_nt = _dequant_blocks(_uint4_value_vec, zero_points=True, stream=True)


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
        r = item // nchunks
        b0 = (item - r * nchunks) * chunk
        b1 = min(b0 + chunk, nb)
        xr = x[r]
        pr = packed[r]
        sr = scales[r]
        zr = zero_points[min(r, zero_points.shape[0] - 1)]
        # pass 1: every block's scale (their latency chains overlap), prefetching the row ahead
        for b in range(b0, b1):
            s0 = b * bs
            e = min(s0 + bs, n)
            _prefetch_ahead(x, r * n + s0, e - s0, total)
            scale, zp = _block_params(xr[s0:e], fmt)
            sr[b] = scale
            if fmt != INT4:
                zr[b] = np.uint8(zp)
        # pass 2: the codes of whole blocks of a multiple of 16, 16 at a time (the input is in
        # L1/L2 by now: no prefetch)
        fast_end = max(b0, min(b1, n // bs)) if bs % _W == 0 else b0
        if fmt == INT4:
            _int4_codes(xr, pr, sr, b0, fast_end, bs, _ONE, 0)
        elif fmt == UINT4:
            _uint4_codes(xr, pr, sr, zr, b0, fast_end, bs, _ONE, 0)
        else:
            _ort_codes(xr, pr, sr, zr, b0, fast_end, bs, _ONE, 0)
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
                p = s0 + j
                if p % 2 == 0:
                    low = c
                else:
                    pr[p // 2] = _pack2(low, c)
        end = b1 * bs
        if end % 2 == 1:  # odd total: a zero high nibble pads the row's last byte
            pr[end // 2] = _pack2(low, np.int32(0))


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
        r = item // nchunks
        b0 = (item - r * nchunks) * chunk
        b1 = min(b0 + chunk, nb)
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
