"""The rules of int4 (symmetric), uint4 (zero point) and int4_ort (ONNX Runtime's), and the
scalar and bit-level helpers every kernel module builds on; the integer kernels themselves are
in `intvec` (on `fp4`'s 16-lane IR, which builds on this module).

Importing this module imports numba (`quantize.kernels` imports it only on first use).

The rules reproduce the NumPy path (`quantize.formats.integer`, `quantize.packing`,
`QuantizedTensor.dequantize`) bit for bit; `quantize.kernels.reference` is the twin the tests
hold the kernels to. Quantize, per block:

* amax (int4), or the block's max and min (uint4, int4_ort), as int32 max-reductions over the
  float32 bit patterns (`bits & 0x7fffffff` orders like |x| for finite floats), which LLVM
  vectorises; a float max-reduction stays scalar without fast-math (shared/notes/kernels.md).
* the scale in float32 exactly as the format computes it: amax / 7, (hi - lo) / 15 with the
  span in float64 where it overflows float32, or |extreme| / 8; then `_cover`: an all-zero block
  gets 1, a scale whose steps + 1/2 steps do not cover the span (subnormal blocks) is nudged up
  one ulp at a time.
* codes: rint(x / scale) of the IEEE quotient, ties to even, clipped (the vector loops get that
  quotient from a reciprocal and one FMA correction, proven equal where rint can tell; int4_ort:
  roundf(x * (1 / ORT's signed scale) + 8), ties up), two per byte, element 2i in the low
  nibble; the padding of a last block holds the code of 0 and an odd total is padded with a
  zero nibble, as `pack_nibbles` does.

Dequantize: (code - zero point) * scale is exact in float64; like `QuantizedTensor.dequantize`
the kernels round it once to the output dtype and clamp values past its range to its largest
finite value (float32: the float32 product; float64: the exact product; float16: the float32
product made round-to-odd with an fma residual, then rounded to half; bfloat16: through float32,
as ml_dtypes casts float64).

No fast-math flags anywhere: `arcp` would turn the divisions into plain reciprocal multiplies,
which round some quotients differently.

Element types reach the kernels as: float32 and float64 arrays as they are, float16 as a uint16
view and bfloat16 as an int16 view of the same bytes (numba has no CPU float16/bfloat16),
converted exactly in the kernel.

Rows of a C-contiguous (rows, n) array are independent; the parallel loop runs over (row, run
of blocks) work items, so one long row and many short rows both use every thread. An item
starts on a byte, so no byte is shared between threads, and the results do not depend on the
thread count. Quantize makes two passes over an item (a few KiB, so the second reads L1): the
scales first, then the codes, prefetching the next item's input. numba's on-disk cache keys on each
kernel's own file: after editing helpers here, clear `__pycache__`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_I32 = ir.IntType(32)
_I16 = ir.IntType(16)
_F32 = ir.FloatType()


def _c32(v: int) -> ir.Constant:
    return ir.Constant(_I32, v)


# --- bit-level helpers, written in LLVM IR so that every integer op stays 32-bit ----------------


@intrinsic
def _bits(typingctx, v):
    """float32 -> its int32 bit pattern."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)

    return types.int32(types.float32), codegen


@intrinsic
def _from_bits(typingctx, b):
    """int32 bit pattern -> float32."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _F32)

    return types.float32(types.int32), codegen


@intrinsic
def _abs_key(typingctx, v):
    """float32 -> bits & 0x7fffffff: for finite floats it orders like |v|."""

    def codegen(context, builder, sig, args):
        return builder.and_(builder.bitcast(args[0], _I32), _c32(0x7FFFFFFF))

    return types.int32(types.float32), codegen


@intrinsic
def _neg_key(typingctx, v):
    """float32 -> bits ^ 0x80000000: > 0 exactly for v < 0, and then it orders like -v."""

    def codegen(context, builder, sig, args):
        return builder.xor(builder.bitcast(args[0], _I32), _c32(-0x80000000))

    return types.int32(types.float32), codegen


@intrinsic
def _f16_to_f32(typingctx, h):
    """float16 bits (uint16) -> float32, exact for finite values (subnormals included)."""

    def codegen(context, builder, sig, args):
        h32 = builder.zext(args[0], _I32)
        mag = builder.shl(builder.and_(h32, _c32(0x7FFF)), _c32(13))
        # exponent rebias 15 -> 127 by a multiply by 2**112: exact, also for subnormal halves
        f = builder.fmul(builder.bitcast(mag, _F32), ir.Constant(_F32, 2.0**112))
        sign = builder.shl(builder.and_(h32, _c32(0x8000)), _c32(16))
        return builder.bitcast(builder.or_(builder.bitcast(f, _I32), sign), _F32)

    return types.float32(types.uint16), codegen


@intrinsic
def _bf16_to_f32(typingctx, h):
    """bfloat16 bits (int16) -> float32: the bits moved to the top half."""

    def codegen(context, builder, sig, args):
        b = builder.shl(builder.zext(args[0], _I32), _c32(16))
        return builder.bitcast(b, _F32)

    return types.float32(types.int16), codegen


@intrinsic
def _f16_product_sat(typingctx, c, s):
    """c * s (float32 code and scale) rounded once to float16 bits (uint16), nearest even;
    past float16's range -> +-65504. NumPy casts the exact float64 product straight to float16,
    so rounding the float32 product again could differ (a double rounding, about 1 product in
    2**14). Instead the float32 product is made round-to-odd, exact for a second rounding to
    fewer bits: where it was inexact (fma gives the exact residual) and its last bit is even, it
    moves one ulp towards the exact value."""

    def codegen(context, builder, sig, args):
        c, sc = args
        p = builder.fmul(c, sc)
        fma = builder.module.declare_intrinsic(
            "llvm.fma", [_F32], ir.FunctionType(_F32, [_F32] * 3)
        )
        err = builder.call(fma, [c, sc, builder.fsub(ir.Constant(_F32, -0.0), p)])
        x = builder.bitcast(p, _I32)
        sign = builder.and_(builder.lshr(x, _c32(16)), _c32(0x8000))
        a = builder.and_(x, _c32(0x7FFFFFFF))
        e = builder.bitcast(err, _I32)
        inexact = builder.icmp_unsigned("!=", builder.and_(e, _c32(0x7FFFFFFF)), _c32(0))
        even = builder.icmp_unsigned("==", builder.and_(a, _c32(1)), _c32(0))
        away = builder.icmp_signed(">=", builder.xor(e, x), _c32(0))  # same sign: |exact| > |p|
        step = builder.select(away, _c32(1), _c32(-1))
        nonzero = builder.icmp_unsigned("!=", a, _c32(0))  # +-0: far below half's range anyway
        fix = builder.and_(builder.and_(inexact, even), nonzero)
        a = builder.select(fix, builder.add(a, step), a)
        # float32 (round-to-odd) -> float16, round to nearest even
        odd = builder.and_(builder.lshr(a, _c32(13)), _c32(1))
        nrm = builder.add(builder.add(a, _c32(-(112 << 23) + 0xFFF)), odd)
        nrm = builder.lshr(nrm, _c32(13))
        # subnormal halves: adding 0.5 rounds |v| to a multiple of 2**-24 (the half's quantum)
        d = builder.fadd(builder.bitcast(a, _F32), ir.Constant(_F32, 0.5))
        sub = builder.sub(builder.bitcast(d, _I32), _c32(0x3F000000))
        r = builder.select(builder.icmp_unsigned("<", a, _c32(113 << 23)), sub, nrm)
        big = builder.icmp_unsigned(">=", a, _c32(143 << 23))  # |p| >= 65536, inf included
        r = builder.select(big, _c32(0x7BFF), r)
        r = builder.select(builder.icmp_unsigned(">", r, _c32(0x7BFF)), _c32(0x7BFF), r)
        return builder.trunc(builder.or_(r, sign), _I16)

    return types.uint16(types.float32, types.float32), codegen


@intrinsic
def _f32_to_bf16_sat(typingctx, v):
    """float32 -> bfloat16 bits (int16), round to nearest even; past the range (or inf) ->
    +-bfloat16's largest finite value: ml_dtypes' cast plus `QuantizedTensor`'s saturation."""

    def codegen(context, builder, sig, args):
        x = builder.bitcast(args[0], _I32)
        sign = builder.and_(builder.lshr(x, _c32(16)), _c32(0x8000))
        a = builder.and_(x, _c32(0x7FFFFFFF))
        bias = builder.add(builder.and_(builder.lshr(a, _c32(16)), _c32(1)), _c32(0x7FFF))
        r = builder.lshr(builder.add(a, bias), _c32(16))
        r = builder.select(builder.icmp_unsigned(">", r, _c32(0x7F7F)), _c32(0x7F7F), r)
        return builder.trunc(builder.or_(r, sign), _I16)

    return types.int16(types.float32), codegen


@intrinsic
def _f32_sat(typingctx, v):
    """+-inf -> +-float32's largest finite value; everything else unchanged."""

    def codegen(context, builder, sig, args):
        x = builder.bitcast(args[0], _I32)
        a = builder.and_(x, _c32(0x7FFFFFFF))
        top = builder.or_(builder.and_(x, _c32(-0x80000000)), _c32(0x7F7FFFFF))
        r = builder.select(builder.icmp_unsigned("==", a, _c32(0x7F800000)), top, x)
        return builder.bitcast(r, _F32)

    return types.float32(types.float32), codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Prefetch (for reading, into all cache levels) the cache line of flat element `idx`."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), _c32(0), _c32(3), _c32(1)])
        return context.get_dummy_value()

    return types.void(arr, types.intp), codegen


@intrinsic
def _low_s4(typingctx, byte):
    """The low nibble of a byte as a signed 4-bit code, in float32."""

    def codegen(context, builder, sig, args):
        c = builder.ashr(builder.shl(builder.zext(args[0], _I32), _c32(28)), _c32(28))
        return builder.sitofp(c, _F32)

    return types.float32(types.uint8), codegen


@intrinsic
def _high_s4(typingctx, byte):
    """The high nibble of a byte as a signed 4-bit code, in float32."""

    def codegen(context, builder, sig, args):
        c = builder.ashr(builder.shl(builder.zext(args[0], _I32), _c32(24)), _c32(28))
        return builder.sitofp(c, _F32)

    return types.float32(types.uint8), codegen


@intrinsic
def _low_u4(typingctx, byte, zp):
    """(low nibble - zero point) in float32."""

    def codegen(context, builder, sig, args):
        c = builder.and_(builder.zext(args[0], _I32), _c32(15))
        return builder.sitofp(builder.sub(c, builder.zext(args[1], _I32)), _F32)

    return types.float32(types.uint8, types.uint8), codegen


@intrinsic
def _high_u4(typingctx, byte, zp):
    """(high nibble - zero point) in float32."""

    def codegen(context, builder, sig, args):
        c = builder.lshr(builder.zext(args[0], _I32), _c32(4))
        return builder.sitofp(builder.sub(c, builder.zext(args[1], _I32)), _F32)

    return types.float32(types.uint8, types.uint8), codegen


# --- element access by storage type --------------------------------------------------------------


def _load(a, i):
    """a[i] as float32 (a: float32, float16 as uint16, bfloat16 as int16)."""


def _store(a, i, c, s):
    """a[i] = c * s (code, scale: float32) rounded once to a's type, saturating (float32,
    float64, float16 as uint16, bfloat16 as int16), as `QuantizedTensor.dequantize` does."""


@overload(_load, inline="always")
def _load_impl(a, i):
    dt = a.dtype
    if dt == types.float32:
        return lambda a, i: a[i]
    if dt == types.uint16:
        return lambda a, i: _f16_to_f32(a[i])
    if dt == types.int16:
        return lambda a, i: _bf16_to_f32(a[i])
    return None


@overload(_store, inline="always")
def _store_impl(a, i, c, s):
    # c * s is exact in float64 (a 5-bit integer times a 24-bit mantissa), so:
    dt = a.dtype
    if dt == types.float32:  # float32 multiply = the exact product rounded once

        def store_f32(a, i, c, s):
            a[i] = _f32_sat(c * s)

        return store_f32
    if dt == types.float64:  # the exact product

        def store_f64(a, i, c, s):
            a[i] = np.float64(c) * np.float64(s)

        return store_f64
    if dt == types.uint16:  # float16: rounded once from the exact product

        def store_f16(a, i, c, s):
            a[i] = _f16_product_sat(c, s)

        return store_f16
    if dt == types.int16:  # bfloat16: ml_dtypes casts float64 through float32, and so do we

        def store_bf16(a, i, c, s):
            a[i] = _f32_to_bf16_sat(c * s)

        return store_bf16
    return None


# --- per-block scale rules (formats.integer, bit for bit) ----------------------------------------

_ONE = np.float32(1.0)
_SEVEN = np.float32(7.0)
_FIFTEEN = np.float32(15.0)
_ZERO = np.float32(0.0)
_PREFETCH_BYTES = 2048  # how far ahead of the block being quantized its row is prefetched


@njit(inline="always")
def _cover(scale, span64, steps_and_half):
    """`_cover` for one block with span > 0: nudge up by ulps until steps + 1/2 cover the span."""
    while np.float64(scale) * steps_and_half < span64:
        scale = _from_bits(_bits(scale) + np.int32(1))  # nextafter(scale, inf) for scale >= 0
    return scale


@njit(inline="always")
def _int4_scale(xb):
    m = np.int32(0)
    for i in range(xb.shape[0]):
        m = max(m, _abs_key(_load(xb, i)))
    if m == 0:
        return _ONE
    amax = _from_bits(m)
    return _cover(amax / _SEVEN, np.float64(amax), 7.5)


@njit(inline="always")
def _range_keys(xb):
    """(bits of the block's largest positive value, bits of -(its most negative value)); 0 for
    none. Both order like magnitudes, as int32 max-reductions (which vectorise)."""
    hk = np.int32(0)
    lk = np.int32(0)
    for i in range(xb.shape[0]):
        v = _load(xb, i)
        hk = max(hk, _bits(v))
        lk = max(lk, _neg_key(v))
    return hk, lk


_TINY = np.float32(np.finfo(np.float32).tiny)


@njit(inline="always")
def _uint4_params(xb):
    hk, lk = _range_keys(xb)
    hi = _from_bits(hk)
    lo = -_from_bits(lk) if lk > 0 else np.float32(0.0)
    span = hi - lo
    if span == 0:
        return _ONE, np.int32(0)
    if np.isinf(span):  # [-3e38, 3e38]: the span overflows float32, span / 15 does not
        span64 = np.float64(hi) - np.float64(lo)
        scale = np.float32(span64 / 15.0)
    else:
        span64 = np.float64(span)
        scale = span / _FIFTEEN
    scale = _cover(scale, span64, 15.5)
    if scale < _TINY:  # subnormal: cover the span in 15 steps (see AffineUInt.choose_params)
        scale = _cover(scale, span64, 15.0)
    zp = np.int32(min(max(-np.rint(lo / scale), _ZERO), _FIFTEEN))
    return scale, zp


def _rounded_code(builder, v, scale, zp, lo, hi):
    """clip(int(rint(v / scale)) + zp, lo, hi) in i32: IEEE division, rint ties to even."""
    q = builder.fdiv(v, scale)
    rint = builder.module.declare_intrinsic("llvm.rint", [_F32])
    c = builder.add(builder.fptosi(builder.call(rint, [q]), _I32), zp)
    c = builder.select(builder.icmp_signed("<", c, _c32(lo)), _c32(lo), c)
    return builder.select(builder.icmp_signed(">", c, _c32(hi)), _c32(hi), c)


@intrinsic
def _code_int4(typingctx, v, scale):
    """The int4 code of v (rint(v / scale) clipped to [-8, 7]) as its low 4 bits, in int32.

    |v / scale| <= 7.5 for the scales the kernels choose, so the float -> int conversion is exact.
    """

    def codegen(context, builder, sig, args):
        c = _rounded_code(builder, args[0], args[1], _c32(0), -8, 7)
        return builder.and_(c, _c32(15))

    return types.int32(types.float32, types.float32), codegen


@intrinsic
def _code_uint4(typingctx, v, scale, zp):
    """The uint4 code of v: rint(v / scale) + zp clipped to [0, 15], in int32."""

    def codegen(context, builder, sig, args):
        return _rounded_code(builder, args[0], args[1], args[2], 0, 15)

    return types.int32(types.float32, types.float32, types.int32), codegen


@intrinsic
def _pack2(typingctx, low, high):
    """Two 4-bit codes (int32) -> one byte, `low` in the low nibble."""

    def codegen(context, builder, sig, args):
        b = builder.or_(args[0], builder.shl(args[1], _c32(4)))
        return builder.trunc(b, ir.IntType(8))

    return types.uint8(types.int32, types.int32), codegen


@njit(inline="always")
def _work_item(item, nchunks, chunk, nb):
    """Parallel work item -> (row, first block, end block): runs of `chunk` blocks per row."""
    r = item // nchunks
    b0 = (item - r * nchunks) * chunk
    return r, b0, min(b0 + chunk, nb)


@njit(inline="always")
def _put_nibble(packed, p, c, low):
    """Code `c` of element p into `packed` (element 2i low nibble); returns the pending low."""
    if p % 2 == 0:
        return c
    packed[p // 2] = _pack2(low, c)
    return low


@njit(inline="always")
def _close_row(packed, end, low):
    """An odd element count `end`: the pending low nibble goes out with a zero high nibble."""
    if end % 2 == 1:
        packed[end // 2] = _pack2(low, np.int32(0))


@njit(inline="always")
def _prefetch_ahead(x, flat0, length, total):
    line = 64 // x.itemsize
    ahead = _PREFETCH_BYTES // x.itemsize
    for j in range(0, length, line):
        k = flat0 + ahead + j
        if k < total:
            _prefetch(x, k)


# --- int4_ort's rule (ONNX Runtime's MatMulNBits, formats.integer.OrtInt4) ---------------------

_EIGHT = np.float32(8.0)


@njit(inline="always")
def _ort_params(xb):
    """(scale, zero point) of `OrtInt4.choose_params` for one block: the extreme e (max if
    |max| > |min|, else min: a tie picks min), scale = |e| / 8 nudged up while scale * 8 <
    |e|, 1 if e == 0; zero point 7 when e > 0 (ORT's scale negative), else 8. With max and min
    clamped to 0 (`_range_keys`) e is the same: an all-positive block's extreme is its max."""
    hk, lk = _range_keys(xb)
    if hk > lk:
        return _cover(_from_bits(hk) / _EIGHT, np.float64(_from_bits(hk)), 8.0), np.int32(7)
    if lk == 0:
        return _ONE, np.int32(8)
    return _cover(_from_bits(lk) / _EIGHT, np.float64(_from_bits(lk)), 8.0), np.int32(8)


def _ort_code_ir(builder, q, flip):
    """clamp(roundf(q + 8), 0, 15) ^ flip in i32 (roundf by floor and the exact fraction: ties
    up, as `integer._round_half_up`). q + 8 is clamped to [-1, 16] first: q can be far beyond
    the int32 range (a tiny clip ratio's scale; even inf), where the conversion is undefined."""
    q = builder.fadd(q, ir.Constant(_F32, 8.0))
    lo, hi = ir.Constant(_F32, -1.0), ir.Constant(_F32, 16.0)
    q = builder.select(builder.fcmp_ordered("<", q, lo), lo, q)
    q = builder.select(builder.fcmp_ordered(">", q, hi), hi, q)
    floor = builder.module.declare_intrinsic("llvm.floor", [_F32])
    t = builder.call(floor, [q])
    up = builder.fcmp_ordered(">=", builder.fsub(q, t), ir.Constant(_F32, 0.5))
    c = builder.add(builder.fptosi(t, _I32), builder.zext(up, _I32))
    c = builder.select(builder.icmp_signed("<", c, _c32(0)), _c32(0), c)
    c = builder.select(builder.icmp_signed(">", c, _c32(15)), _c32(15), c)
    return builder.xor(c, flip)


@intrinsic
def _code_ort(typingctx, v, rcp, flip):
    """The int4_ort code of v: from v * rcp (rcp = 1 / ORT's signed scale), `flip` 15 or 0."""

    def codegen(context, builder, sig, args):
        return _ort_code_ir(builder, builder.fmul(args[0], args[1]), args[2])

    return types.int32(types.float32, types.float32, types.int32), codegen


@intrinsic
def _code_ort_div(typingctx, v, s, flip):
    """As `_code_ort` from v / s, for the blocks whose 1 / s overflows (OrtInt4.encode divides)."""

    def codegen(context, builder, sig, args):
        return _ort_code_ir(builder, builder.fdiv(args[0], args[1]), args[2])

    return types.int32(types.float32, types.float32, types.int32), codegen


@intrinsic
def _recip(typingctx, s):
    """1 / s in float32, IEEE (no zero-division check: s > 0 here)."""

    def codegen(context, builder, sig, args):
        return builder.fdiv(ir.Constant(_F32, 1.0), args[0])

    return types.float32(types.float32), codegen


@njit(inline="always")
def _ort_signed(scale, zp):
    """(ORT's signed scale, its reciprocal, whether that overflowed, the code's xor mask)."""
    flip = np.int32(15) if zp == 7 else np.int32(0)
    s = -scale if flip else scale
    rcp = _recip(s)
    return s, rcp, np.isinf(rcp), flip
