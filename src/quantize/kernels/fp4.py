"""Numba kernels for the E2M1-element formats: fp4_e2m1, mxfp4, mxfp4_ceil and nvfp4.

Importing this module imports numba (`quantize.kernels` imports it only on first use). Every
kernel is compiled on its first call for the argument types it gets, with `cache=True`; the four
formats share one quantize kernel (a `mode` argument picks the scale rule), one dequantize
kernel and nvfp4's `block_amax`, so a process compiles few signatures.

The kernels reproduce the NumPy path (`quantize.formats.fp4`, `.mx`, `.nvfp4`, `quantize.packing`,
`QuantizedTensor.dequantize`) bit for bit; `quantize.kernels.reference` is the twin the tests hold
them to. Quantize, per work item (a run of blocks in one row, as in `int4`), in two passes:

1. The block amaxes, as int32 maxima of `bits & 0x7fffffff` (which orders like |x| for finite
   floats): lane-wise over each block's 16-element units, then 16 blocks at a time folded by a
   tree of shuffles into one vector of 16 block maxima (`_amax_blocks`). nvfp4 runs this pass
   over the whole tensor first (`block_amax`: its tensor scale needs the tensor's amax, which
   the caller turns into the tensor scale with the format's own `NVFP4.tensor_scale`), so it
   reads its input twice. Then the scale rule, in a loop LLVM vectorises across blocks:
   * fp4_e2m1 (MODE_FP4): amax / 6 in float32, 1 for an all-zero block; `integer._cover`'s
     nudge (up by ulps while scale * 6.5 < amax in float64) only for subnormal amax / 6.
   * mxfp4 / mxfp4_ceil (MODE_MX_FLOOR / MODE_MX_CEIL): `mx.e8m0_exponent` from the bits of the
     float32 amax, no log2: floor(log2 amax) is the biased exponent - 127 (a subnormal amax
     gives less than -127, clamped), e = that - 2, plus 1 for "ceil" when the mantissa exceeds
     1.5 (amax > 6 * 2^e); clamped to [-127, 127]; 0 for an all-zero block. 2^e (2^-127 is a
     float32 subnormal) and 2^-e are exact, so x * 2^-e is the quotient x / 2^e rounded once.
   * nvfp4 (MODE_NVFP4): `NVFP4.choose_params` given the tensor scale ts: raw = amax / (6 * ts)
     (float32, the product rounded first), 1 where raw == 0, min(raw, 448), rounded to E4M3
     (nearest, ties to even: the float32 mantissa rounded to 3 bits at bit 20, or a multiple of
     2^-9 below 2^-6; checked against ml_dtypes for every float32 in [0, 448]); the nudge to
     the next E4M3 value while amax > 6.5 * scale * ts (float64) and scale < 448 is taken, by
     the exact scalar rule, only in items where some block needs it.
2. The codes of x / d (IEEE division, d = the scale, or for nvfp4 the effective scale
   fl32(scale * ts) as `effective_scale` computes it) or x * 2^-e, 16 elements at a time in
   LLVM vector IR (`_codes_blocks`), with the next item's input prefetched. The E2M1 code of a
   quotient q, as `fp4.e2m1_encode` (nearest, ties to even, saturating at 6; the sign bit is
   q's, so -0 and negatives that round to zero give code 8), from q's bits: rint(2|q|) below 2,
   the mantissa rounded to one bit (an integer add) from 2 up; this equals `e2m1_encode`'s
   midpoint counting for every non-NaN float32 (checked exhaustively). Only nvfp4 can divide
   by 0 (an effective scale that underflows in float32; the NumPy path does the same: x / 0 is
   inf, 0 / 0 NaN); such blocks are encoded with `e2m1_encode`'s NaN rule too.
Two codes per byte, element 2i in the low nibble (as `int4` and `pack_nibbles`); blocks whose
size is not a multiple of 16 and a padded last block go nibble by nibble by scalar code (the
padding holds code 0, the code of +0; an odd total is padded with a zero nibble).

Dequantize: the E2M1 value (from the nibble's bits) * scale, for nvfp4 (value * block scale,
exact in float32 for E4M3 block scales) * ts; rounded once to the output dtype and saturating,
16 at a time (`_vstore_out`, the vector twin of `int4._store`: float16 through a round-to-odd
float32 product, bfloat16 through float32 as ml_dtypes casts), as `QuantizedTensor.dequantize`
does from the exact float64 product: mxfp4_ceil's 4 * 2^126 = 2^128 comes back as float32's
(float16's, bfloat16's) largest finite value. nvfp4 block scales with more than 22 significant
bits (not E4M3 values: made by hand) or a tensor scale that is not a float32 are computed in
float64, as the NumPy path computes them.

No fast-math flags; divisions are IEEE `fdiv` (no zero-division checks, no reciprocals but the
exact 2^-e). The vector IR is generic LLVM (legalised for the host: one 16-lane op with
AVX-512, two 8-lane ones with AVX2); the nibble order assumes a little-endian host, as every
numba target is. numba's on-disk cache keys on this file only: after editing helpers in
`int4.py`, clear `__pycache__` (the same holds for `nf4.py`, which uses helpers from here).
"""

from __future__ import annotations

import inspect
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .int4 import (
    _F32,
    _I32,
    _abs_key,
    _bits,
    _c32,
    _close_row,
    _f16_product_sat,
    _f32_sat,
    _f32_to_bf16_sat,
    _from_bits,
    _load,
    _put_nibble,
    _store,
    _work_item,
)

MODE_FP4 = 0
MODE_MX_FLOOR = 1
MODE_MX_CEIL = 2
MODE_NVFP4 = 3

_ONE = np.float32(1.0)
_SIX = np.float32(6.0)
_E4M3_MAX = np.float32(448.0)
_E4M3_MIN_NORMAL = np.float32(2.0**-6)
_E4M3_STEP_SUB = np.float32(2.0**-9)

# E2M1 rounding boundaries and whether a value exactly on one goes up (to the even code)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_GOES_UP = (False, True, False, True, False, True, False)


# --- scalar float32 arithmetic without numba's zero-division checks -----------------------------


@intrinsic
def _div32(typingctx, a, b):
    """a / b in float32, IEEE (b == 0 gives inf/NaN, as NumPy does)."""

    def codegen(context, builder, sig, args):
        return builder.fdiv(args[0], args[1])

    return types.float32(types.float32, types.float32), codegen


@intrinsic
def _mul32(typingctx, a, b):
    """a * b in float32."""

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return types.float32(types.float32, types.float32), codegen


# --- E2M1 encode / decode -------------------------------------------------------------------------


def _e2m1_code_ir(builder, q):
    """The E2M1 nibble of float32 q, not NaN (`fp4.e2m1_encode`), as i32, by rounding its bits:
    below 2 the grid step is 0.5 everywhere (the subnormal 0.5 included), so the magnitude code
    is rint(2|q|) (ties to even); from 2 up it is the exponent and the one mantissa bit after
    rounding the mantissa to one bit (nearest, ties to even: an integer add at bit 22), 7 at
    most (saturating). The sign bit is q's. Equal to `_e2m1_code_nan_ir` for every float32 but
    NaN (checked exhaustively)."""
    x = builder.bitcast(q, _I32)
    a = builder.and_(x, _c32(0x7FFFFFFF))
    rint = builder.module.declare_intrinsic("llvm.rint", [_F32])
    twice = builder.fmul(builder.bitcast(a, _F32), ir.Constant(_F32, 2.0))
    low = builder.fptosi(builder.call(rint, [twice]), _I32)
    odd = builder.and_(builder.lshr(a, _c32(22)), _c32(1))
    rounded = builder.lshr(builder.add(builder.add(a, _c32(0x1FFFFF)), odd), _c32(22))
    high = builder.sub(rounded, _c32((128 << 1) - 4))  # 2.0 -> 4, 3.0 -> 5, 4.0 -> 6, 6.0 -> 7
    high = builder.select(builder.icmp_signed(">", high, _c32(7)), _c32(7), high)
    mag = builder.select(builder.icmp_signed("<", a, _c32(0x40000000)), low, high)
    return builder.or_(mag, builder.and_(builder.lshr(x, _c32(28)), _c32(8)))


def _e2m1_code_nan_ir(builder, q):
    """`fp4.e2m1_encode` for any float32 q, NaN included, as i32: the magnitude code is the
    count of the midpoints below |q| (>= at those whose upper neighbour has an even code: ties
    to even; NaN: 0), the sign bit is q's, flipped for NaN (as ml_dtypes does)."""
    x = builder.bitcast(q, _I32)
    a = builder.bitcast(builder.and_(x, _c32(0x7FFFFFFF)), _F32)
    mag = _c32(0)
    for m, up in zip(_MIDPOINTS, _TIE_GOES_UP, strict=True):
        hit = builder.fcmp_ordered(">=" if up else ">", a, ir.Constant(_F32, m))
        mag = builder.add(mag, builder.zext(hit, _I32))
    neg = builder.xor(builder.icmp_signed("<", x, _c32(0)), builder.fcmp_unordered("uno", q, q))
    return builder.or_(mag, builder.shl(builder.zext(neg, _I32), _c32(3)))


@intrinsic
def _e2m1_div_any(typingctx, v, d):
    """The E2M1 nibble of v / d for any d >= 0 (d = 0: +-inf, or NaN for v = +-0), in int32."""

    def codegen(context, builder, sig, args):
        return _e2m1_code_nan_ir(builder, builder.fdiv(args[0], args[1]))

    return types.int32(types.float32, types.float32), codegen


def _e2m1_value_ir(builder, c, vector=False):
    """E2M1 nibble (i32, low 4 bits) -> its float32 value (-0.0 for code 8); with `vector`,
    <16 x i32> codes -> <16 x float>."""
    n = _splat if vector else _c32
    k = builder.and_(c, n(7))
    # k >= 2: exponent k >> 1 (bias 1), mantissa k & 1: bits (k << 22) + (126 << 23);
    # k = 1: 0.5; k = 0: 0
    normal = builder.add(builder.shl(k, n(22)), n(126 << 23))
    small = builder.select(builder.icmp_unsigned("==", k, n(1)), n(0x3F000000), n(0))
    mag = builder.select(builder.icmp_unsigned("<", k, n(2)), small, normal)
    sign = builder.shl(builder.and_(c, n(8)), n(28))
    return builder.bitcast(builder.or_(mag, sign), _VF if vector else _F32)


def nibble_value_intrinsics(value_ir, what: str):
    """(low, high): numba intrinsics giving the float32 value (`value_ir(builder, code)`) of a
    byte's low and high nibble; `what` names the format in their docstrings."""

    def make(high: bool):
        def nibble(typingctx, byte):
            def codegen(context, builder, sig, args):
                code = builder.zext(args[0], _I32)
                return value_ir(builder, builder.lshr(code, _c32(4)) if high else code)

            return types.float32(types.uint8), codegen

        nibble.__doc__ = f"The {what} value of a byte's {'high' if high else 'low'} nibble."
        return intrinsic(nibble)

    return make(False), make(True)


_e2m1_low, _e2m1_high = nibble_value_intrinsics(_e2m1_value_ir, "E2M1")


# --- 16-element units in LLVM vector IR ---------------------------------------------------------
# Whole blocks whose size is a multiple of 16 are processed 16 elements at a time by the
# intrinsics below, each a loop over a run of blocks written in IR: one vector load (converted
# to float32), the codes of 16 elements packed into 8 bytes with 64-bit lane shifts (no
# deinterleaving shuffles). Loops in numba with a runtime trip count as short as a block (16 or
# 32) leave LLVM's vectoriser little to work with and cost more in overhead than the work: with
# the loops in IR the quantize kernels ran 1.7-2.4x faster for blocks of 16-32 (measured here).

_W = 16
_V32 = ir.VectorType(_I32, _W)
_VF = ir.VectorType(_F32, _W)
_V64 = ir.VectorType(ir.IntType(64), _W // 2)


def _target_has(feature: str) -> bool:
    """Does numba compile for a CPU with `feature` (an LLVM name: "f16c", "avx512f")? numba's
    own target setting (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES or the host), which its cache also
    keys on."""
    from numba.core.registry import cpu_target

    features = getattr(cpu_target.target_context.codegen(), "_tm_features", "") or ""
    return f"+{feature}" in features.split(",")


def _splat(v, ty=_I32):
    return ir.Constant(ir.VectorType(ty, _W), [v] * _W)


def _vsplat(builder, scalar):
    """A runtime float32 in all 16 lanes."""
    undef = ir.Constant(_VF, ir.Undefined)
    v = builder.insert_element(undef, scalar, _c32(0))
    return builder.shuffle_vector(v, undef, ir.Constant(_V32, [0] * _W))


def _vfunc(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _ptr(context, builder, arrty, arr, off):
    """Address of element `off` of a C-contiguous 1-D array."""
    return builder.gep(context.make_array(arrty)(context, builder, arr).data, [off])


def _vload(context, builder, arrty, arr, off):
    """16 elements of `arr` from `off` as <16 x float>, exactly (float16 as uint16 bits, bfloat16
    as int16 bits)."""
    ptr = _ptr(context, builder, arrty, arr, off)
    if arrty.dtype == types.float32:
        return builder.load(builder.bitcast(ptr, _VF.as_pointer()), align=4)
    half = ir.VectorType(ir.IntType(16), _W)
    h = builder.load(builder.bitcast(ptr, half.as_pointer()), align=2)
    if arrty.dtype == types.uint16:  # float16 -> float32 is exact, subnormals included
        if _target_has("f16c"):
            return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), _W)), _VF)
        # as `int4._f16_to_f32`: rebias the exponent by a multiply by 2**112
        h32 = builder.zext(h, _V32)
        mag = builder.shl(builder.and_(h32, _splat(0x7FFF)), _splat(13))
        f = builder.fmul(builder.bitcast(mag, _VF), _splat(2.0**112, _F32))
        sign = builder.shl(builder.and_(h32, _splat(0x8000)), _splat(16))
        return builder.bitcast(builder.or_(builder.bitcast(f, _V32), sign), _VF)
    return builder.bitcast(builder.shl(builder.zext(h, _V32), _splat(16)), _VF)  # bfloat16


def _vstore_packed(context, builder, arrty, arr, off, codes):
    """16 nibble codes (<16 x i32>, 0..15) -> 8 bytes at `off`, element 2i in the low nibble."""
    v = builder.bitcast(codes, _V64)  # lane i: code 2i in bits 0-3, code 2i+1 in bits 32-35
    v = builder.or_(v, builder.lshr(v, ir.Constant(_V64, [28] * (_W // 2))))
    b = builder.trunc(v, ir.VectorType(ir.IntType(8), _W // 2))
    ptr = _ptr(context, builder, arrty, arr, off)
    builder.store(b, builder.bitcast(ptr, b.type.as_pointer()), align=1)


def _fold(builder, a, b, width):
    """Two vectors whose lanes come in groups of `width` (one group per block) -> one vector
    with groups of width / 2: the max of each group's two halves; a's groups first."""
    lo, hi = [], []
    for g in range(0, 2 * _W, width):
        lo += range(g, g + width // 2)
        hi += range(g + width // 2, g + width)
    pick = lambda idx: builder.shuffle_vector(a, b, ir.Constant(_V32, idx))  # noqa: E731
    x, y = pick(lo), pick(hi)
    return builder.select(builder.icmp_signed(">", x, y), x, y)


@intrinsic
def _amax_blocks(typingctx, xr, sr, b0, b1, bs):
    """sr[b] = max |x| over the whole blocks b0..b1-1 of a row (float32; bs % 16 == 0); returns
    the bits of the largest. Lane-wise maxima over each block's 16-element units, then, for
    16 blocks at a time, a tree of 2-input shuffles that leaves the 16 block maxima in one
    vector (45 vector ops instead of 16 separate reductions)."""

    def codegen(context, builder, sig, args):
        xty, sty = sig.args[:2]
        xa, sa, b0v, b1v, bsv = args
        intp = b0v.type
        units = builder.udiv(bsv, intp(_W))
        sdata = context.make_array(sty)(context, builder, sa).data
        gmax = cgutils.alloca_once_value(builder, _splat(0))

        def vmax(x, y):
            return builder.select(builder.icmp_signed(">", x, y), x, y)

        def block_keys(b):
            """<16 x i32>: lane-wise max of bits & 0x7fffffff over block b's units."""
            s0 = builder.mul(b, bsv)

            def key(o):
                v = _vload(context, builder, xty, xa, o)
                return builder.and_(builder.bitcast(v, _V32), _splat(0x7FFFFFFF))

            acc = cgutils.alloca_once_value(builder, key(s0))
            with cgutils.for_range_slice(builder, intp(1), units, intp(1), intp=intp) as (u, _):
                o = builder.add(s0, builder.mul(u, intp(_W)))
                builder.store(vmax(builder.load(acc), key(o)), acc)
            return builder.load(acc)

        # groups of 16 blocks
        n16 = builder.udiv(builder.sub(b1v, b0v), intp(_W))
        with cgutils.for_range(builder, n16) as loop:
            g = builder.add(b0v, builder.mul(loop.index, intp(_W)))
            vs = [block_keys(builder.add(g, intp(i))) for i in range(_W)]
            width = _W
            while len(vs) > 1:
                vs = [_fold(builder, vs[i], vs[i + 1], width) for i in range(0, len(vs), 2)]
                width //= 2
            z = vs[0]  # lane i: block g + i
            ptr = builder.bitcast(builder.gep(sdata, [g]), _V32.as_pointer())
            builder.store(z, ptr, align=4)
            builder.store(vmax(builder.load(gmax), z), gmax)
        # the rest, one block at a time
        smax = _vfunc(builder, "llvm.vector.reduce.smax.v16i32", _I32, [_V32])
        first = builder.add(b0v, builder.mul(n16, intp(_W)))
        best = cgutils.alloca_once_value(builder, builder.call(smax, [builder.load(gmax)]))
        with cgutils.for_range_slice(builder, first, b1v, intp(1), intp=intp) as (b, _):
            m = builder.call(smax, [block_keys(b)])
            builder.store(builder.bitcast(m, _F32), builder.gep(sdata, [b]))
            cur = builder.load(best)
            builder.store(builder.select(builder.icmp_signed(">", m, cur), m, cur), best)
        return builder.load(best)

    return types.int32(xr, sr, types.intp, types.intp, types.intp), codegen


def _e2m1_code_vec(builder, q, nan_aware=False):
    """`_e2m1_code_ir` on <16 x float>; with `nan_aware`, `_e2m1_code_nan_ir`'s NaN rule too
    (magnitude 0, sign flipped)."""
    x = builder.bitcast(q, _V32)
    a = builder.and_(x, _splat(0x7FFFFFFF))
    rint = _vfunc(builder, "llvm.rint.v16f32", _VF, [_VF])
    twice = builder.fmul(builder.bitcast(a, _VF), _splat(2.0, _F32))
    low = builder.fptosi(builder.call(rint, [twice]), _V32)
    odd = builder.and_(builder.lshr(a, _splat(22)), _splat(1))
    rounded = builder.lshr(builder.add(builder.add(a, _splat(0x1FFFFF)), odd), _splat(22))
    high = builder.sub(rounded, _splat((128 << 1) - 4))
    high = builder.select(builder.icmp_signed(">", high, _splat(7)), _splat(7), high)
    mag = builder.select(builder.icmp_signed("<", a, _splat(0x40000000)), low, high)
    sign = builder.and_(builder.lshr(x, _splat(28)), _splat(8))
    if nan_aware:
        nan = builder.fcmp_unordered("uno", q, q)
        mag = builder.select(nan, _splat(0), mag)
        sign = builder.xor(sign, builder.select(nan, _splat(8), _splat(0)))
    return builder.or_(mag, sign)


def _prefetch_ir(builder, ptr):
    i8p = ir.IntType(8).as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, i8p), _c32(0), _c32(3), _c32(1)])


def _rows_intrinsic(name, codegen, rows, tail):
    """A numba intrinsic `name`(*rows, *tail) -> None lowered by `codegen`: `rows` names the
    row arguments (typed as passed: arrays), `tail` maps the other arguments' names to the
    types they are converted to. (numba reads an intrinsic's arity from its Python signature,
    so the parameter list is given as one.)"""
    fixed = tuple(tail.values())

    def typer(typingctx, *args):
        return types.void(*args[: len(rows)], *fixed), codegen

    param = inspect.Parameter
    names = ("typingctx", *rows, *tail)
    typer.__signature__ = inspect.Signature([param(n, param.POSITIONAL_OR_KEYWORD) for n in names])
    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


#: scales in [2**-60, 2**60] take kind "rcp" of `_codes_blocks`: every intermediate of a quotient
#: that can round to a different integer stays normal there (see its docstring)
_RCP_MIN, _RCP_MAX = 2.0**-60, 2.0**60


def _codes_blocks(kind, encode, zero_points=False, store=_vstore_packed):
    """An intrinsic (x_row, packed_row, scales_row, b0, b1, bs, t, ahead) -> None: the codes of
    the whole blocks b0..b1-1 of a row (bs % 16 == 0), 16 elements at a time, every line of
    each block's input prefetched `ahead` elements further on (loads past the array's end
    are only prefetches: they never fault), written by `store` (two codes a byte). Per block,
    from its scale s:

    kind "div": x / d with d = s * t (fp4_e2m1: t = 1; nvfp4: t = ts, d rounded to float32 as
        `effective_scale` does); a block whose d underflowed to 0 is encoded NaN-aware;
    kind "mul": x * (1 / s) (mx: 1 / s exact);
    kind "inv": x * (1 / s), or x / s where 1 / s overflows (NF4.encode's rule);
    kind "rcp": x / s (int4, uint4: t unused), not by a division (`vdivps` bound those kernels:
        10 cycles per 16 elements) but by the reciprocal with one correction: inv = 1 / s,
        y = x * inv, r = fma(-y, s, x) (the residual), q = fma(r, inv, y), each rounded once.
        y is within 2 ulps of x / s, so q = (x / s + e) rounded once with |e| <= 4.01 * 2**-48
        * |x / s|: q is x / s rounded, or its neighbour when x / s lies within e of a rounding
        boundary. rint(q) can then differ from rint(x / s rounded) only if one of the two is a
        half-integer h, that is for x within 2 ulps of s * h. Checked exhaustively
        (tests/test_kernels_intspeed.py has the script): for every float32 mantissa of s,
        h = 0.5 .. 16.5 and x within 8 ulps of s * h (2.4e9 pairs), q equals x / s rounded; a
        plain x * inv differs in rint for 1.6% of them. The operations scale exactly with s
        while every intermediate is normal, which holds for s in [_RCP_MIN, _RCP_MAX] and
        |x / s| >= 2**-8 (below that every path gives rint 0); other scales, and targets
        without FMA, divide. So only for codes that are rint(q) of |q| <= 16.5.
    `encode(builder, q, nan_aware)` -> <16 x i32> codes. With `zero_points` the intrinsic takes
    the row's uint8 zero points after its scales and calls `encode(builder, q, nan_aware, zp)`,
    zp the block's as an i32.
    """
    rcp = kind == "rcp" and _target_has("fma")

    def codegen(context, builder, sig, args):
        xty, pty, sty = sig.args[:3]
        xa, pa, sa = args[:3]
        if zero_points:
            zty, za = sig.args[3], args[3]
        b0v, b1v, bsv, tv, aheadv = args[-5:]
        intp = b0v.type
        one = ir.Constant(_F32, 1.0)
        units = builder.udiv(bsv, intp(_W))
        line = intp(max(1, 64 // context.get_abi_sizeof(context.get_data_type(xty.dtype))))
        xdata = context.make_array(xty)(context, builder, xa).data
        sdata = context.make_array(sty)(context, builder, sa).data
        fma = _vfunc(builder, "llvm.fma.v16f32", _VF, [_VF, _VF, _VF])

        def divide(d):
            dv = _vsplat(builder, d)
            return lambda v: builder.fdiv(v, dv)

        def multiply(f):
            fv = _vsplat(builder, f)
            return lambda v: builder.fmul(v, fv)

        def corrected(s, inv):
            sv, iv = _vsplat(builder, s), _vsplat(builder, inv)

            def q(v):
                y = builder.fmul(v, iv)
                r = builder.call(fma, [builder.fneg(y), sv, v])
                return builder.call(fma, [r, iv, y])

            return q

        def run(s0, quotient, nan_aware, zp):
            with cgutils.for_range(builder, units) as loop:
                o = builder.add(s0, builder.mul(loop.index, intp(_W)))
                q = quotient(_vload(context, builder, xty, xa, o))
                c = encode(builder, q, nan_aware, *zp)
                store(context, builder, pty, pa, builder.udiv(o, intp(2)), c)

        def one_unit():
            """Blocks of 16 (nvfp4's): one unit each, straight through. The general loop's
            per-block inner loops (prefetch lines, units) cost 6-8% of this loop's time at
            block 16 (one thread, input in L2; 2% of a whole nvfp4 quantize from memory)."""
            with cgutils.for_range_slice(builder, b0v, b1v, intp(1), intp=intp) as (b, _):
                s0 = builder.mul(b, intp(_W))
                _prefetch_ir(builder, builder.gep(xdata, [builder.add(s0, aheadv)]))
                d = builder.fmul(builder.load(builder.gep(sdata, [b])), tv)
                q = builder.fdiv(_vload(context, builder, xty, xa, s0), _vsplat(builder, d))
                zero = builder.fcmp_ordered("==", d, ir.Constant(_F32, 0.0))
                out = builder.udiv(s0, intp(2))
                with builder.if_else(zero, likely=False) as (then, otherwise):
                    with then:
                        store(context, builder, pty, pa, out, encode(builder, q, True))
                    with otherwise:
                        store(context, builder, pty, pa, out, encode(builder, q, False))

        if kind == "div" and not zero_points:
            sixteen = builder.icmp_unsigned("==", bsv, intp(_W))
            with builder.if_then(sixteen):
                one_unit()
            b1v = builder.select(sixteen, b0v, b1v)  # then nothing is left for the loop below
        with cgutils.for_range_slice(builder, b0v, b1v, intp(1), intp=intp) as (b, _):
            s0 = builder.mul(b, bsv)
            with cgutils.for_range_slice(builder, intp(0), bsv, line, intp=intp) as (j, _):
                _prefetch_ir(builder, builder.gep(xdata, [builder.add(s0, builder.add(aheadv, j))]))
            scale = builder.load(builder.gep(sdata, [b]))
            zp = ()
            if zero_points:
                zdata = context.make_array(zty)(context, builder, za).data
                zp = (builder.zext(builder.load(builder.gep(zdata, [b])), _I32),)

            def either(cond, likely, if_true, if_false, nan_aware=(False, False)):
                with builder.if_else(cond, likely=likely) as (then, otherwise):
                    with then:
                        run(s0, if_true(), nan_aware[0], zp)
                    with otherwise:
                        run(s0, if_false(), nan_aware[1], zp)

            if kind == "div":
                d = builder.fmul(scale, tv)
                zero = builder.fcmp_ordered("==", d, ir.Constant(_F32, 0.0))
                either(zero, False, lambda: divide(d), lambda: divide(d), (True, False))
            elif kind == "mul":
                run(s0, multiply(builder.fdiv(one, scale)), False, zp)
            elif kind == "inv":
                inv = builder.fdiv(one, scale)
                big = builder.fcmp_ordered("==", inv, ir.Constant(_F32, float("inf")))
                either(big, False, lambda: divide(scale), lambda: multiply(inv))
            elif not rcp:
                run(s0, divide(scale), False, zp)
            else:
                ok = builder.and_(
                    builder.fcmp_ordered(">=", scale, ir.Constant(_F32, _RCP_MIN)),
                    builder.fcmp_ordered("<=", scale, ir.Constant(_F32, _RCP_MAX)),
                )
                inv = lambda: corrected(scale, builder.fdiv(one, scale))  # noqa: E731
                either(ok, True, inv, lambda: divide(scale))
        return context.get_dummy_value()

    rows = ("xr", "pr", "sr", "zr") if zero_points else ("xr", "pr", "sr")
    tail = {"b0": types.intp, "b1": types.intp, "bs": types.intp, "t": types.float32}
    return _rows_intrinsic("codes_blocks", codegen, rows, {**tail, "ahead": types.intp})


#: E2M1 codes of whole blocks by division (fp4_e2m1, nvfp4) and by 2^-e (mxfp4, mxfp4_ceil)
_e2m1_codes_div = _codes_blocks("div", _e2m1_code_vec)
_e2m1_codes_mul = _codes_blocks("mul", _e2m1_code_vec)


def _vload_codes(context, builder, arrty, arr, off):
    """8 bytes at `off` -> their 16 nibbles as <16 x i32>, element 2i from the low nibble."""
    ptr = _ptr(context, builder, arrty, arr, off)
    b = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), _W // 2).as_pointer()))
    w = builder.zext(b, _V64)
    lo = builder.and_(w, ir.Constant(_V64, [0xF] * (_W // 2)))
    hi = builder.shl(
        builder.and_(w, ir.Constant(_V64, [0xF0] * (_W // 2))), ir.Constant(_V64, [28] * (_W // 2))
    )
    return builder.bitcast(builder.or_(lo, hi), _V32)


def _e2m1_value_vec(builder, c):
    """`_e2m1_value_ir` on <16 x i32> codes -> <16 x float>."""
    return _e2m1_value_ir(builder, c, vector=True)


def _vstore_out(context, builder, arrty, arr, off, c, s, stream=False):
    """arr[off:off + 16] = c * s (<16 x float> values, float32 scale) rounded once to the
    array's type and saturating, as the scalar `int4._store` does: float32 (the float32
    product, +-inf -> +-max), float64 (the exact product), float16 as uint16 bits (the float32
    product made round-to-odd with an fma residual, then rounded to half; past the range
    +-65504), bfloat16 as int16 bits (the float32 product rounded, past the range +-max).
    `stream` (float32 only; the address must be 16-byte aligned): a non-temporal store."""
    dt = arrty.dtype
    ptr = _ptr(context, builder, arrty, arr, off)
    if dt == types.float64:
        v64 = ir.VectorType(ir.DoubleType(), _W)
        p = builder.fmul(builder.fpext(c, v64), builder.fpext(_vsplat(builder, s), v64))
        builder.store(p, builder.bitcast(ptr, v64.as_pointer()), align=8)
        return
    sv = _vsplat(builder, s)
    p = builder.fmul(c, sv)
    x = builder.bitcast(p, _V32)
    sign = builder.and_(x, _splat(-0x80000000))
    a = builder.and_(x, _splat(0x7FFFFFFF))
    if dt == types.float32:
        inf = builder.icmp_unsigned("==", a, _splat(0x7F800000))
        r = builder.select(inf, builder.or_(sign, _splat(0x7F7FFFFF)), x)
        st = builder.store(r, builder.bitcast(ptr, _V32.as_pointer()), align=16 if stream else 4)
        if stream:
            st.set_metadata("nontemporal", builder.module.add_metadata([_c32(1)]))
        return
    v16 = ir.VectorType(ir.IntType(16), _W)
    if dt == types.int16:  # bfloat16
        bias = builder.add(builder.and_(builder.lshr(a, _splat(16)), _splat(1)), _splat(0x7FFF))
        r = builder.lshr(builder.add(a, bias), _splat(16))
        r = builder.select(builder.icmp_unsigned(">", r, _splat(0x7F7F)), _splat(0x7F7F), r)
        r = builder.or_(r, builder.lshr(sign, _splat(16)))
        builder.store(builder.trunc(r, v16), builder.bitcast(ptr, v16.as_pointer()), align=2)
        return
    # float16: round-to-odd float32 product, then one rounding to half
    fma = _vfunc(builder, "llvm.fma.v16f32", _VF, [_VF, _VF, _VF])
    err = builder.bitcast(builder.call(fma, [c, sv, builder.fneg(p)]), _V32)
    inexact = builder.icmp_unsigned("!=", builder.and_(err, _splat(0x7FFFFFFF)), _splat(0))
    even = builder.icmp_unsigned("==", builder.and_(a, _splat(1)), _splat(0))
    finite = builder.icmp_unsigned("<", a, _splat(0x7F800000))
    away = builder.icmp_signed(">=", builder.xor(err, x), _splat(0))  # |exact| > |p|
    step = builder.select(away, _splat(1), _splat(-1))
    nonzero = builder.icmp_unsigned("!=", a, _splat(0))  # +-0: far below half's range anyway
    fix = builder.and_(builder.and_(builder.and_(inexact, even), finite), nonzero)
    a = builder.select(fix, builder.add(a, step), a)
    if _target_has("f16c"):  # nearest even; past the range inf, clamped below
        half = ir.VectorType(ir.HalfType(), _W)
        h = builder.bitcast(builder.fptrunc(builder.bitcast(a, _VF), half), v16)
        h = builder.zext(h, _V32)
    else:  # as `int4._f16_product_sat`, in integers (no half conversion instructions)
        odd = builder.and_(builder.lshr(a, _splat(13)), _splat(1))
        nrm = builder.add(builder.add(a, _splat(-(112 << 23) + 0xFFF)), odd)
        nrm = builder.lshr(nrm, _splat(13))
        d = builder.fadd(builder.bitcast(a, _VF), _splat(0.5, _F32))
        sub = builder.sub(builder.bitcast(d, _V32), _splat(0x3F000000))
        h = builder.select(builder.icmp_unsigned("<", a, _splat(113 << 23)), sub, nrm)
        big = builder.icmp_unsigned(">=", a, _splat(143 << 23))
        h = builder.select(big, _splat(0x7BFF), h)
    h = builder.select(builder.icmp_unsigned(">", h, _splat(0x7BFF)), _splat(0x7BFF), h)
    h = builder.or_(h, builder.lshr(sign, _splat(16)))
    builder.store(builder.trunc(h, v16), builder.bitcast(ptr, v16.as_pointer()), align=2)


def _dequant_blocks(decode, zero_points=False, stream=False):
    """An intrinsic (packed_row, scales_row, out_row, b0, b1, bs, ts, two_level) -> None: the
    whole blocks b0..b1-1 of a row (bs % 16 == 0), 16 elements at a time: value = decode(code)
    (<16 x i32> -> <16 x float>), then value * scale, or (value * scale) * ts if `two_level`
    (value * scale exact), rounded once to the output's type (`_vstore_out`). With
    `zero_points` the intrinsic takes the row's uint8 zero points after its scales and calls
    `decode(builder, codes, zp)`, zp the block's as an i32. With `stream` (float32 output
    whose row starts are 16-byte aligned), non-temporal stores: the output goes to memory
    without first reading every line into the cache (which a plain store does), and an sfence
    orders them before the work item ends."""

    def codegen(context, builder, sig, args):
        pty, sty = sig.args[:2]
        oty = sig.args[-6]
        pa, sa = args[:2]
        oa, b0v, b1v, bsv, tsv, two = args[-6:]
        intp = b0v.type
        units = builder.udiv(bsv, intp(_W))
        sdata = context.make_array(sty)(context, builder, sa).data
        if zero_points:
            zdata = context.make_array(sig.args[2])(context, builder, args[2]).data
        with cgutils.for_range_slice(builder, b0v, b1v, intp(1), intp=intp) as (b, _):
            s0 = builder.mul(b, bsv)
            scale = builder.load(builder.gep(sdata, [b]))
            zp = ()
            if zero_points:
                zp = (builder.zext(builder.load(builder.gep(zdata, [b])), _I32),)
            m = builder.select(two, scale, ir.Constant(_F32, 1.0))
            sc = builder.select(two, tsv, scale)
            mv = _vsplat(builder, m)
            with cgutils.for_range(builder, units) as loop:
                o = builder.add(s0, builder.mul(loop.index, intp(_W)))
                codes = _vload_codes(context, builder, pty, pa, builder.udiv(o, intp(2)))
                c = builder.fmul(decode(builder, codes, *zp), mv)
                _vstore_out(context, builder, oty, oa, o, c, sc, stream)
        if stream and platform.machine().lower() in ("x86_64", "amd64"):  # weakly ordered
            builder.call(_vfunc(builder, "llvm.x86.sse.sfence", ir.VoidType(), []), [])
        return context.get_dummy_value()

    rows = ("pr", "sr", "zr", "orow") if zero_points else ("pr", "sr", "orow")
    tail = {"b0": types.intp, "b1": types.intp, "bs": types.intp, "ts": types.float32}
    return _rows_intrinsic("dequant_blocks", codegen, rows, {**tail, "two_level": types.boolean})


_e2m1_dequant_blocks = _dequant_blocks(_e2m1_value_vec)


# --- per-block scale rules ------------------------------------------------------------------------


@njit(inline="always")
def _block_key(xb):
    """bits & 0x7fffffff of the block's largest |x| (0 for an all-zero block)."""
    m = np.int32(0)
    for i in range(xb.shape[0]):
        m = max(m, _abs_key(_load(xb, i)))
    return m


@njit(inline="always")
def _fp4_scale(key):
    if key == 0:
        return _ONE
    amax = _from_bits(key)
    scale = _div32(amax, _SIX)
    while np.float64(scale) * 6.5 < np.float64(amax):  # `_cover`: only subnormal amax
        scale = _from_bits(_bits(scale) + np.int32(1))
    return scale


@njit(inline="always")
def _pow2(e):
    """2^e in float32 for e in [-127, 127] (2^-127 is the subnormal 0x00400000)."""
    if e < -126:
        return _from_bits(np.int32(0x00400000))
    return _from_bits(np.int32((e + 127) << 23))


@njit(inline="always")
def _mx_exponent(key, ceil):
    """`mx.e8m0_exponent(amax, 6, rule)` for float32 amax with bits `key`; 0 for amax == 0."""
    if key == 0:
        return np.int32(0)
    biased = key >> 23
    if biased == 0:  # subnormal amax: floor(log2) <= -127, so e < -127
        return np.int32(-127)
    e = biased - np.int32(127 + 2)  # floor(log2(amax)) - floor(log2(6))
    if ceil and (key & np.int32(0x7FFFFF)) > np.int32(0x400000):  # amax > 6 * 2^e
        e += np.int32(1)
    return max(e, np.int32(-127))  # at most 126 from a float32 amax


@intrinsic
def _rint32(typingctx, x):
    """rint (nearest, ties to even) of a float32, as float32."""

    def codegen(context, builder, sig, args):
        return builder.call(builder.module.declare_intrinsic("llvm.rint", [_F32]), [args[0]])

    return types.float32(types.float32), codegen


@njit(inline="always")
def _e4m3_round(x):
    """float32 x in [0, 448] -> the nearest E4M3 value (ties to even) as float32. Branch-free:
    below 2^-6 (E4M3 subnormals) a multiple of 2^-9, else the mantissa rounded to 3 bits."""
    b = _bits(x)
    sub = _rint32(x * np.float32(512.0)) * _E4M3_STEP_SUB
    nrm = _from_bits(np.int32((b + np.int32(0x7FFFF) + ((b >> 20) & 1)) & np.int32(-0x100000)))
    return sub if b < np.int32(0x3C800000) else nrm


@njit(inline="always")
def _e4m3_next(s):
    """The next E4M3 value above s (an E4M3 value in [0, 448))."""
    if s < _E4M3_MIN_NORMAL:
        return s + _E4M3_STEP_SUB
    return _from_bits(_bits(s) + np.int32(1 << 20))


@njit(inline="always")
def _nvfp4_first(amax, six_ts):
    """E4M3(min(raw, 448)), raw = amax / (6 * ts) or 1 where that is 0: before any nudge."""
    raw = _div32(amax, six_ts)
    raw = _ONE if raw == 0 else raw
    raw = _E4M3_MAX if raw > _E4M3_MAX else raw
    return _e4m3_round(raw)


@njit(inline="always")
def _nvfp4_short(amax, scale, t64):
    """NVFP4's nudge condition: amax > 6.5 * scale * ts (float64, exact) and scale < 448."""
    return (np.float64(amax) > 6.5 * np.float64(scale) * t64) & (scale < _E4M3_MAX)


@njit(inline="always")
def _nvfp4_scale(key, ts, six_ts):
    """`NVFP4.choose_params` for one block (clip_ratio 1) given the tensor scale."""
    amax = _from_bits(key)
    scale = _nvfp4_first(amax, six_ts)
    t64 = np.float64(ts)
    while _nvfp4_short(amax, scale, t64):
        scale = _e4m3_next(scale)
    return scale


@njit(inline="always")
def _scale_from_key(key, mode, ts, six_ts):
    """The block scale of `mode` for a block whose amax has bits `key` (the exact scalar rule)."""
    if mode == MODE_FP4:
        return _fp4_scale(key)
    if mode == MODE_NVFP4:
        return _nvfp4_scale(key, ts, six_ts)
    return _pow2(_mx_exponent(key, mode == MODE_MX_CEIL))


@njit(inline="always")
def _scales_from_amax(sb, mode, ts, six_ts):
    """Block amaxes in `sb` -> block scales, in place, in loops LLVM vectorises (no nudges).
    True if some block needs the nudges of the exact rule (`_scale_from_key`): only blocks with
    subnormal amax / 6 (fp4_e2m1) or E4M3-subnormal block scales (nvfp4); mx never does."""
    bad = False
    if mode == MODE_FP4:
        for i in range(sb.shape[0]):
            a = sb[i]
            scale = _ONE if a == 0 else _div32(a, _SIX)
            bad |= np.float64(scale) * 6.5 < np.float64(a)
            sb[i] = scale
    elif mode == MODE_NVFP4:
        t64 = np.float64(ts)
        for i in range(sb.shape[0]):
            a = sb[i]
            scale = _nvfp4_first(a, six_ts)
            bad |= _nvfp4_short(a, scale, t64)
            sb[i] = scale
    else:
        ceil = mode == MODE_MX_CEIL
        for i in range(sb.shape[0]):
            sb[i] = _pow2_branchless(_mx_exponent_branchless(_bits(sb[i]), ceil))
    return bad


@njit(inline="always")
def _mx_exponent_branchless(key, ceil):
    """`_mx_exponent` as selects (0 for key 0; subnormal amax gives <= -128, clamped)."""
    e = (key >> 23) - np.int32(127 + 2)
    e = e + np.int32(1) if ceil and (key & np.int32(0x7FFFFF)) > np.int32(0x400000) else e
    e = e if (key >> 23) != 0 else np.int32(-128)
    e = max(e, np.int32(-127))
    return e if key != 0 else np.int32(0)


@njit(inline="always")
def _pow2_branchless(e):
    return _from_bits(np.int32(0x00400000) if e < -126 else np.int32((e + 127) << 23))


# --- nvfp4 dequantize with scales that are not E4M3 values -------------------------------------


def _store64(a, i, p):
    """a[i] = p (a float64 holding the exact value) rounded once to a's type, saturating, as
    `QuantizedTensor.dequantize` casts (bfloat16 through float32, as ml_dtypes does)."""


@overload(_store64, inline="always")
def _store64_impl(a, i, p):
    dt = a.dtype
    if dt == types.float64:

        def store_f64(a, i, p):
            a[i] = p

        return store_f64
    if dt == types.float32:

        def store_f32(a, i, p):
            a[i] = _f32_sat(np.float32(p))

        return store_f32
    if dt == types.int16:

        def store_bf16(a, i, p):
            a[i] = _f32_to_bf16_sat(np.float32(p))

        return store_bf16
    if dt == types.uint16:  # float16 straight from p: float32 made round-to-odd, then rounded

        def store_f16(a, i, p):
            p32 = np.float32(p)
            r = p - np.float64(p32)
            if r != 0 and p32 != 0 and not np.isinf(p32) and (_bits(p32) & 1) == 0:
                step = np.int32(1) if (r > 0) == (p32 > 0) else np.int32(-1)
                p32 = _from_bits(_bits(p32) + step)
            a[i] = _f16_product_sat(p32, _ONE)

        return store_f16
    return None


@njit(inline="always")
def _exact_products(sb):
    """True if value * scale is exact in float32 for every E2M1 value and every scale in `sb`:
    scales with at most 22 significant bits (E4M3 values have 4) within 2^-100 .. 2^100."""
    ok = True
    for i in range(sb.shape[0]):
        b = _bits(sb[i])
        ok &= ((b & 3) == 0) & (b >= np.int32(27 << 23)) & (b <= np.int32(227 << 23))
    return ok


# --- quantize + pack ------------------------------------------------------------------------------


@njit(inline="always")
def _row_amax(xr, sr, b0, b1, bs, n):
    """sr[b] = max |x| over block b of the row, b0 <= b < b1 (float32); returns the bits of the
    largest. Whole blocks of a multiple of 16 by `_amax_blocks`, the others one by one."""
    fast_end = max(b0, min(b1, n // bs)) if bs % _W == 0 else b0
    m = _amax_blocks(xr, sr, b0, fast_end, bs) if fast_end > b0 else np.int32(0)
    for b in range(fast_end, b1):
        k = _block_key(xr[b * bs : min(b * bs + bs, n)])
        sr[b] = _from_bits(k)
        m = max(m, k)
    return m


@njit(parallel=True, nogil=True, cache=True)
def block_amax(x, scales, bs, chunk):
    """scales[r, b] = max |x| over block b of row r (float32); returns the bits of the largest
    (nvfp4's tensor amax). Same work items as the quantize kernels."""
    rows, n = x.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    part = np.zeros(rows * nchunks, np.int32)
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        part[item] = _row_amax(x[r], scales[r], b0, b1, bs, n)
    m = np.int32(0)
    for i in range(part.shape[0]):
        m = max(m, part[i])
    return m


@njit(parallel=True, nogil=True, cache=True)
def quantize_e2m1(x, packed, scales, bs, chunk, mode, ts, have_amax):
    """x (rows, n) -> packed (rows, ceil(nb*bs/2)) uint8, scales (rows, nb) float32.

    `mode`: MODE_FP4, MODE_MX_FLOOR, MODE_MX_CEIL or MODE_NVFP4 (then `ts` is the float32 tensor
    scale; ignored otherwise). `have_amax`: `scales` already holds the block amaxes
    (`block_amax`), which are not computed again. `chunk` blocks per parallel work item;
    chunk * bs must be even unless chunk >= nb.
    """
    rows, n = x.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    six_ts = _mul32(_SIX, ts)
    mx = MODE_MX_FLOOR <= mode <= MODE_MX_CEIL
    vec = bs % _W == 0
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        xr = x[r]
        pr = packed[r]
        sr = scales[r]
        # pass 1: every block's scale (their latency chains overlap): the amax, then the rule
        if not have_amax:
            _row_amax(xr, sr, b0, b1, bs, n)
        if _scales_from_amax(sr[b0:b1], mode, ts, six_ts):  # rare: redo with the exact rule
            for b in range(b0, b1):
                s0 = b * bs
                sr[b] = _scale_from_key(_block_key(xr[s0 : min(s0 + bs, n)]), mode, ts, six_ts)
        # pass 2: the codes. Whole blocks of a multiple of 16: 16 at a time; the next item's
        # input is prefetched meanwhile
        fast_end = max(b0, min(b1, n // bs)) if vec else b0
        ahead = (b1 - b0) * bs
        if mx:  # x * 2^-e == x / 2^e, both rounded once
            _e2m1_codes_mul(xr, pr, sr, b0, fast_end, bs, _ONE, ahead)
        else:
            _e2m1_codes_div(xr, pr, sr, b0, fast_end, bs, _ONE if mode == MODE_FP4 else ts, ahead)
        # other block sizes and the padded last block: nibble by nibble (items start on a byte)
        low = np.int32(0)  # the pending low nibble
        for b in range(fast_end, b1):
            s0 = b * bs
            xb = xr[s0 : min(s0 + bs, n)]
            d = sr[b] if mode != MODE_NVFP4 else _mul32(sr[b], ts)
            for j in range(bs):
                c = _e2m1_div_any(_load(xb, j), d) if s0 + j < n else np.int32(0)
                low = _put_nibble(pr, s0 + j, c, low)
        _close_row(pr, b1 * bs, low)


# --- unpack + dequantize --------------------------------------------------------------------------


@njit(parallel=True, nogil=True, cache=True)
def dequantize_e2m1(packed, scales, out, bs, chunk, ts64, two_level):
    """packed (rows, ceil(nb*bs/2)), scales (rows, nb) float32 -> out (rows, n), n <= nb*bs.

    x = value * scale, or if `two_level` (nvfp4) value * (scale * ts64), ts64 the tensor scale
    (a float64): in float32 as (value * scale) * ts where that is exact (ts a float32, scales
    of at most 22 significant bits, as E4M3 values are), else in float64 as the NumPy path does.
    """
    rows, n = out.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    ts = np.float32(ts64)
    ts_exact = np.float64(ts) == ts64
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        pr = packed[r]
        orow = out[r]
        sr = scales[r]
        if two_level and not (ts_exact and _exact_products(sr[b0:b1])):  # hand-made: float64
            for b in range(b0, b1):
                s0 = b * bs
                ob = orow[s0 : min(s0 + bs, n)]
                m = np.float64(sr[b]) * ts64  # as `effective_scale` computes it in float64
                for j in range(ob.shape[0]):
                    p = s0 + j
                    v = _e2m1_high(pr[p // 2]) if p % 2 else _e2m1_low(pr[p // 2])
                    _store64(ob, j, np.float64(v) * m)
        else:
            # whole blocks of a multiple of 16: 16 at a time
            vec_end = max(b0, min(b1, n // bs)) if bs % _W == 0 else b0
            _e2m1_dequant_blocks(pr, sr, orow, b0, vec_end, bs, ts, two_level)
            # other even block sizes: whole bytes
            fast_end = max(vec_end, min(b1, n // bs)) if bs % 2 == 0 else vec_end
            for b in range(vec_end, fast_end):
                s0 = b * bs
                ob = orow[s0 : s0 + bs]
                pb = pr[s0 // 2 : s0 // 2 + bs // 2]
                m = sr[b] if two_level else _ONE
                s = ts if two_level else sr[b]
                for k in range(bs // 2):
                    _store(ob, 2 * k, _e2m1_low(pb[k]) * m, s)
                    _store(ob, 2 * k + 1, _e2m1_high(pb[k]) * m, s)
            for b in range(fast_end, b1):  # odd block sizes, the last block: nibble by nibble
                s0 = b * bs
                ob = orow[s0 : min(s0 + bs, n)]
                m = sr[b] if two_level else _ONE
                s = ts if two_level else sr[b]
                for j in range(ob.shape[0]):
                    p = s0 + j
                    v = _e2m1_high(pr[p // 2]) if p % 2 else _e2m1_low(pr[p // 2])
                    _store(ob, j, v * m, s)
