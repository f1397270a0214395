"""Numba kernels for the MSE clipping search (`quantize.algorithms.mse`) on int4, uint4 and
int4_ort.

Importing this module imports numba. Per block: the round-to-nearest range (amax, or min and
max), then for each ratio of the grid the format's scale rule applied to the shrunk range
(`formats.integer`, bit for bit: float32 products and quotients, `_cover`, the uint4 zero point),
the block's squared error with those params, and the params with the least error (strictly
less: ties keep the larger range); then codes and packing as `int4.quantize_int4` does.

The objective follows `algorithms.mse.search_error` exactly: the decoded value code * scale
(float32, as `decode` computes it), its difference from x, the square and the product with x in
float64, all added in order of the elements (`block_sse`), then sum(e^2) + dc_weight * sum(e)^2
+ gain * sum(e x)^2 (gain: `mse.gain_factor`). All candidates of a block are ranked in one pass
over it by `mse.approx_sse` (float32), the candidates being the inner loop: a map over small
arrays of scales and sums that LLVM vectorises (a sum over the elements would not vectorise
without reassociation; no fast-math here). One kernel serves both formats: numba compiles it
apart for zero_points None (int4) and an array (uint4), and the format branches fold away.

int4_ort (`mse_ort_kernel`, on the same helpers) scores 2 * nr candidates per block: ORT's
orientation at each ratio, then the other one (`mse._flipped_candidates`), kept as ORT's signed
scales (negative where the zero point is 7). Its grid is then int4's, -8..7 steps of the signed
scale, so the ranking lanes are int4's; only the exact check (`_exact2`) and the codes use ORT's
own rule (`_code_ort`: x * (1 / signed scale) + 8 rounded half up, its divide fallback). Twice
int4's candidates, so the parts that int4 can leave to numba are written for speed here:
the candidates' divisions without numba's zero checks (`_fdiv`, so their loops vectorise) and
the argmin as integer reductions (`_first_least`). All three formats rank in explicit IR
(`_make_scan_ir`: one AVX-512 op per 16 candidates where numba's own loop stays 8-lane; uint4's
clamp to per-lane bounds -zp, 15 - zp, two operations fewer per candidate), and skip the exact
check where its outcome is certain (`_sure`: the approximate scores far enough apart and no
element's code differing between the two roundings). Measured on one thread, 1024x4096 normal,
CPU ms: int4_ort 61 -> 56 (block 32), 50 -> 43 (block 128) from `_sure` and the first;
the IR ranking and `_sure` for int4/uint4 (uint4 with its default dc and gain weights):
int4 33 -> 31 / 23 -> 20, uint4 59 -> 42 / 42 -> 30 (blocks 32 / 128).

Codes are clamped in float before the conversion to int, so a tiny clip_ratio (x / scale far
beyond the int32 range) still gives NumPy's clipped code.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .int4 import (
    _EIGHT,
    _TINY,
    _abs_key,
    _bits,
    _close_row,
    _code_ort,
    _code_ort_div,
    _cover,
    _from_bits,
    _load,
    _neg_key,
    _pack2,
    _prefetch_ahead,
    _put_nibble,
    _recip,
    _work_item,
)

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_SEVEN = np.float32(7.0)
_FIFTEEN = np.float32(15.0)
#: candidates scored per pass over a block (the vectorised inner loop's constant trip count)
_LANES = 24
#: int4_ort's candidates per pass (`_scan_ir`: three 16-lane vectors)
_ORT_LANES = 48

#: |extreme| * ratio at least this: every candidate scale is normal, no `_cover` fix needed
_NORMAL_SAFE = np.float32(2.0**-120)

_F32 = ir.FloatType()
_F64 = ir.DoubleType()
_VW = 16


@intrinsic
def _fdiv(typingctx, a, b):
    """a / b in float32, IEEE, without numba's zero-division check (a branch per division that
    keeps a loop from vectorising; the divisors here are never 0)."""

    def codegen(context, builder, sig, args):
        return builder.fdiv(args[0], args[1])

    return types.float32(types.float32, types.float32), codegen


@njit(inline="always")
def _int4_code(v, scale):
    """rint(v / scale) clipped to [-8, 7], as float32."""
    return min(max(np.rint(v / scale), np.float32(-8.0)), _SEVEN)


@njit(inline="always")
def _uint4_code(v, scale, zpf):
    """rint(v / scale) + zp clipped to [0, 15], as float32 (the float32 add NumPy does)."""
    return min(max(np.rint(v / scale) + zpf, _ZERO), _FIFTEEN)


@njit(inline="always")
def _diff(x, deq):
    return np.float64(deq) - np.float64(x)


@njit(inline="always")
def _uint4_deq(v, scale, zpf):
    return (_uint4_code(v, scale, zpf) - zpf) * scale


def _make_scan_ir(widths: tuple, gain: bool, sumsq: bool, signed: bool = True):
    """One pass over a block for sum(widths) candidates, in explicit LLVM IR on float32 vectors
    of the given widths (lanes in order, e.g. (16, 8) for 24): per element v and lane, the
    decoding error d = clamp(rint(v * inv), lo, hi) * scale - v (signed: [-8, 7]; else
    [-zp, 15 - zp], which equals uint4's (clamp(rint(v * inv) + zp, 0, 15) - zp) exactly, in
    two operations fewer), then a += d * d, b += d and with `gain` c += d * v, in float32, in
    order of the elements, no fusing, the clamps as numba's max/min selects, the accumulators
    in registers (the sum over elements stays in order: only the candidates are vectorised).
    numba's own loop is legalised to 8-lane AVX2 operations even on AVX-512 hosts (LLVM
    prefers 256-bit vectors there); an explicit 16-lane vector becomes one AVX-512 operation,
    or two AVX2 ones, which halves the ranking pass (int4_ort: 48 lanes).

    (xb, sk, ik, zk, acc, acc1, acc2) -> float64 sum(x^2) in order with `sumsq`, else 0; sk,
    ik, zk (read only when not `signed`), acc* hold at least sum(widths) float32 lanes
    (contiguous)."""
    offs = [sum(widths[:k]) for k in range(len(widths))]

    @intrinsic
    def scan(typingctx, xb, sk, ik, zk, acc, acc1, acc2):
        sig = types.float64(xb, sk, ik, zk, acc, acc1, acc2)

        def codegen(context, builder, sig, args):
            arrs = [
                context.make_array(t)(context, builder, a)
                for t, a in zip(sig.args, args, strict=True)
            ]
            i32 = ir.IntType(32)

            def vptr(i, k):  # the k-th vector of argument i
                p = builder.gep(arrs[i].data, [ir.Constant(i32, offs[k])])
                return builder.bitcast(p, ir.VectorType(_F32, widths[k]).as_pointer())

            def splat(k, x):
                return ir.Constant(ir.VectorType(_F32, widths[k]), [x] * widths[k])

            nv = len(widths)
            s = [builder.load(vptr(1, k), align=4) for k in range(nv)]
            inv = [builder.load(vptr(2, k), align=4) for k in range(nv)]
            if signed:
                lo = [splat(k, -8.0) for k in range(nv)]
                hi = [splat(k, 7.0) for k in range(nv)]
            else:  # clamp(rint(y) + zp, 0, 15) - zp == clamp(rint(y), -zp, 15 - zp), exactly
                zp = [builder.load(vptr(3, k), align=4) for k in range(nv)]
                lo = [builder.fsub(splat(k, 0.0), zp[k]) for k in range(nv)]
                hi = [builder.fsub(splat(k, 15.0), zp[k]) for k in range(nv)]
            sums = [[cgutils.alloca_once_value(builder, splat(k, 0.0)) for k in range(nv)]
                    for _ in range(3)]  # fmt: skip
            q = cgutils.alloca_once_value(builder, ir.Constant(_F64, 0.0))
            rint = []
            for w in widths:
                vt = ir.VectorType(_F32, w)
                rint.append(cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vt, [vt]), f"llvm.rint.v{w}f32"
                ))  # fmt: skip
            n = builder.extract_value(arrs[0].shape, 0)
            with cgutils.for_range(builder, n) as loop:
                if sig.args[0].dtype == types.float32:
                    ptr = cgutils.get_item_pointer(
                        context, builder, sig.args[0], arrs[0], [loop.index]
                    )
                    v = builder.load(ptr)
                else:  # (float16, bfloat16 bits: `_load`'s conversion)
                    v = context.compile_internal(
                        builder, lambda a, i: _load(a, i),
                        types.float32(sig.args[0], types.intp), [args[0], loop.index],
                    )  # fmt: skip
                if sumsq:
                    w = builder.fpext(v, _F64)
                    builder.store(builder.fadd(builder.load(q), builder.fmul(w, w)), q)
                for k in range(nv):
                    vt = ir.VectorType(_F32, widths[k])
                    undef = ir.Constant(vt, ir.Undefined)
                    vb = builder.shuffle_vector(
                        builder.insert_element(undef, v, ir.Constant(i32, 0)), undef,
                        ir.Constant(ir.VectorType(i32, widths[k]), [0] * widths[k]),
                    )  # fmt: skip
                    c = builder.call(rint[k], [builder.fmul(vb, inv[k])])
                    # numba's max(c, lo) then min(., hi): lo if lo > c else c, ...
                    c = builder.select(builder.fcmp_ordered(">", lo[k], c), lo[k], c)
                    c = builder.select(builder.fcmp_ordered("<", hi[k], c), hi[k], c)
                    d = builder.fsub(builder.fmul(c, s[k]), vb)
                    a0, a1, a2 = sums[0][k], sums[1][k], sums[2][k]
                    builder.store(builder.fadd(builder.load(a0), builder.fmul(d, d)), a0)
                    builder.store(builder.fadd(builder.load(a1), d), a1)
                    if gain:
                        builder.store(builder.fadd(builder.load(a2), builder.fmul(d, vb)), a2)
            for i in range(3):
                for k in range(nv):
                    builder.store(builder.load(sums[i][k]), vptr(4 + i, k), align=4)
            return builder.load(q)

        return sig, codegen

    return scan


_ORT_W = (_VW,) * (_ORT_LANES // _VW)
_ort_scan = _make_scan_ir(_ORT_W, False, False)
_ort_scan_gain = _make_scan_ir(_ORT_W, True, False)
_ort_scan_gain_sumsq = _make_scan_ir(_ORT_W, True, True)
#: int4/uint4's _LANES candidates: one 16-lane vector and one 8-lane one
_W = (_VW, _LANES - _VW)
_int4_scan = _make_scan_ir(_W, False, False)
_int4_scan_gain = _make_scan_ir(_W, True, False)
_int4_scan_gain_sumsq = _make_scan_ir(_W, True, True)
_uint4_scan = _make_scan_ir(_W, False, False, False)
_uint4_scan_gain = _make_scan_ir(_W, True, False, False)
_uint4_scan_gain_sumsq = _make_scan_ir(_W, True, True, False)


@njit(inline="always")
def _approx_all(xb, sk, ik, zk, acc, acc1, acc2, score, dcw, gain, signed, ort=False):
    """score[k] = `mse.approx_sse` of the block at scale sk[k] (ik[k] = 1 / sk[k], zk[k] the zero
    point, float32): codes rint(x * ik[k]), squares and sums in float32, in order of the elements
    (acc1: the sums of the differences, acc2: of the differences times x), acc + dcw * acc1^2 in
    float32 (dcw != 0), then in float64 plus gw * acc2^2, gw the block's `mse.gain_factor` for
    the weight `gain` (0: no gain term). Returns gw.

    Candidates are the inner loop: each element is loaded once and scored against _LANES of
    them (int4_ort: _ORT_LANES) as float32 vectors, `_make_scan_ir` (a sum over the elements
    would not vectorise without reassociation, and there is no fast-math here)."""
    q = 0.0  # (the IR scans start their sums in registers and store them)
    for p0 in range(0, sk.shape[0], _ORT_LANES if ort else _LANES):
        s_, i_, z_ = sk[p0:], ik[p0:], zk[p0:]
        a_, b_, c_ = acc[p0:], acc1[p0:], acc2[p0:]
        if ort:  # (int4_ort: 48 signed lanes, `_make_scan_ir`)
            if gain == 0.0:
                _ort_scan(xb, s_, i_, z_, a_, b_, c_)
            elif p0 == 0:
                q = _ort_scan_gain_sumsq(xb, s_, i_, z_, a_, b_, c_)
            else:
                _ort_scan_gain(xb, s_, i_, z_, a_, b_, c_)
        elif signed:  # (int4, uint4: 24 lanes, 16 + 8)
            if gain == 0.0:
                _int4_scan(xb, s_, i_, z_, a_, b_, c_)
            elif p0 == 0:
                q = _int4_scan_gain_sumsq(xb, s_, i_, z_, a_, b_, c_)
            else:
                _int4_scan_gain(xb, s_, i_, z_, a_, b_, c_)
        elif gain == 0.0:
            _uint4_scan(xb, s_, i_, z_, a_, b_, c_)
        elif p0 == 0:
            q = _uint4_scan_gain_sumsq(xb, s_, i_, z_, a_, b_, c_)
        else:
            _uint4_scan_gain(xb, s_, i_, z_, a_, b_, c_)
    # `mse.gain_factor`; a block of zeros (q == 0) has sum(d x) == 0 and gets factor 0
    gw = (gain * np.float64(xb.shape[0])) / q if q > 0.0 else 0.0
    if ort:  # (`_ort_scores` finishes them, with the keys `_first_least` ranks)
        return gw
    for k in range(sk.shape[0]):
        a = acc[k]
        if dcw != _ZERO:
            a = a + dcw * (acc1[k] * acc1[k])
        score[k] = np.float64(a)
        if gw != 0.0:
            s2 = np.float64(acc2[k])
            score[k] = score[k] + gw * (s2 * s2)
    return gw


@njit(inline="always")
def _ort_q(y):
    """ORT's unsigned code of y (before the flip), as float32: clip(roundf(y + 8), 0, 15)."""
    t = y + _EIGHT
    f = np.floor(t)
    c = f + _ONE if t - f >= np.float32(0.5) else f  # (inf: inf - inf is NaN, c stays inf)
    return min(max(c, _ZERO), _FIFTEEN)


@njit(inline="always")
def _ort_deq(c, flip, s):
    """`OrtInt4.decode` of code c at ORT's signed scale s (flip: 15 where s < 0, zero point 7):
    (code - zero point) * |s|, in float32."""
    return (np.float32(c) - (_SEVEN if flip else _EIGHT)) * abs(s)


@njit(inline="always")
def _ort_lane(s):
    """(1 / s, whether it overflowed, the code's xor mask) for ORT's signed scale s."""
    rcp = _recip(s)
    return rcp, np.isinf(rcp), np.int32(15) if s < _ZERO else np.int32(0)


@njit(inline="always")
def _exact2(xb, sa, za, sb, zb, dcw, gw, signed, ort, da, db):
    """`mse.search_error` of the block for two candidates (scale, zero point; `ort`: ORT's
    signed scale, zero point unused): the format's own codes (a true division; int4_ort: its
    reciprocal rule), decoded in float32, differences, squares and the sums (in order)
    in float64. da, db: float64 buffers of at least the block's length.

    Two loops: the differences first, a map with no loop-carried dependence that vectorises
    (the divisions above all), then the six sums, each in order of the elements, as
    independent chains in one pass; same bits as one scalar loop per candidate."""
    n = xb.shape[0]
    if ort:  # sa, sb: ORT's signed scales
        ra, ta, fa = _ort_lane(sa)
        rb, tb, fb = _ort_lane(sb)
        if ta or tb:  # (subnormal scales: OrtInt4.encode divides)
            for j in range(n):
                v = _load(xb, j)
                ca = _code_ort_div(v, sa, fa) if ta else _code_ort(v, ra, fa)
                cb = _code_ort_div(v, sb, fb) if tb else _code_ort(v, rb, fb)
                da[j] = _diff(v, _ort_deq(ca, fa, sa))
                db[j] = _diff(v, _ort_deq(cb, fb, sb))
        else:  # a branch-free map that vectorises
            for j in range(n):
                v = _load(xb, j)
                da[j] = _diff(v, _ort_deq(_code_ort(v, ra, fa), fa, sa))
                db[j] = _diff(v, _ort_deq(_code_ort(v, rb, fb), fb, sb))
    else:
        for j in range(n):
            v = _load(xb, j)
            if signed:
                da[j] = _diff(v, _int4_code(v, sa) * sa)
                db[j] = _diff(v, _int4_code(v, sb) * sb)
            else:
                da[j] = _diff(v, _uint4_deq(v, sa, za))
                db[j] = _diff(v, _uint4_deq(v, sb, zb))
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    b0 = 0.0
    b1 = 0.0
    b2 = 0.0
    for j in range(n):
        a = da[j]
        b = db[j]
        a0 += a * a
        a1 += a
        b0 += b * b
        b1 += b
        if gw != 0.0:  # (a scalar loop: the branch is cheap, the products are not)
            v = np.float64(_load(xb, j))
            a2 += a * v
            b2 += b * v
    ea = a0 + np.float64(dcw) * (a1 * a1)
    eb = b0 + np.float64(dcw) * (b1 * b1)
    if gw != 0.0:
        ea = ea + gw * (a2 * a2)
        eb = eb + gw * (b2 * b2)
    return ea, eb


@intrinsic
def _bits64(typingctx, v):
    """float64 -> its int64 bit pattern."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@njit(inline="always")
def _ort_scores(acc, acc1, acc2, ik, nr, dcw, gw, score, keys):  # -> the least key
    """`_approx_all`'s scores from the sums (the same operations), with `_choose`'s rule: inf
    where 1/scale overflowed (subnormal scales), where the sums did (inf - inf: NaN) and for
    the padding lanes (k >= nr); keys[k]: score[k]'s bits for `_first_least`. One branch-free
    map (the conditions are selects) and an integer min-reduction, which vectorise: returns the
    least key."""
    dc_on = dcw != _ZERO
    gain_on = gw != 0.0
    m = np.int64(0x7FF0000000000000)  # (inf's bits)
    for k in range(score.shape[0]):
        a = acc[k]
        b = acc1[k]
        a = a + dcw * (b * b) if dc_on else a
        v = np.float64(a)
        s2 = np.float64(acc2[k])
        v = v + gw * (s2 * s2) if gain_on else v
        v = v + 0.0  # (-0.0 -> 0.0: the keys of scores >= 0 then order as the scores)
        ok = (abs(ik[k]) < np.inf) & (v == v) & (k < nr)  # (bitwise: no branches)
        v = v if ok else np.inf
        score[k] = v
        key = _bits64(v)
        keys[k] = key
        m = min(m, key)
    return m


@njit(inline="always")
def _first_least(keys, m):
    """The index of the first key equal to m, the least (`np.argmin` over the scores, which
    are >= 0 or inf and order as their int64 bits; `_ort_scores` finds m with a vectorised
    reduction instead of a compare-and-select chain through every candidate)."""
    nk = keys.shape[0]
    for k in range(nk):  # (an early exit: cheaper than a second reduction, measured)
        if keys[k] == m:
            return k
    return 0


@njit(inline="always")
def _sure(xb, sa, ia, za, sb, ib, zb, score_a, score_b, dcw, gain, gw, signed, ort):
    """True when candidate a's exact `search_error` is certainly below candidate b's, so that
    `_exact2` (whose sums are a latency-bound float64 chain) need not run: the approximate
    scores differ by more than the approximation's error bound, and no element's code differs
    between the ranking's rint(x * (1 / s)) and the format's own rounding (int4, uint4:
    rint(x / s); int4_ort: ORT's; near-ties: a different code moves sum(e) by a whole step,
    which no relative bound covers). False decides nothing.

    With equal codes the decoded values are equal, and each float32 difference is the exact
    one within 2^-24 (relative); float32 sums of n terms are then within g = (n + 8) 2^-24
    (twice that, for margin) of sum(e^2), and within g sum|e| <= g sqrt(n sum(e^2)) of sum(e),
    g sqrt(sum(e^2) sum(x^2)) of sum(e x). With score >= sum(e^2), dc sum(e)^2 and
    gw sum(e x)^2 (gw = gain n / sum(x^2)), the score's error is at most
    score * (g + 2 g sqrt(dc n) + 2 g sqrt(gain n) + g^2 n (dc + gain)), and the float64 sums
    of the exact error add far less; 1e-3 more covers the final roundings many times over.
    Scores below 2^-60 (or sum(x^2), with the gain term) are left to the exact check: there
    subnormal roundings are absolute, not relative."""
    if not (np.isfinite(score_a) and np.isfinite(score_b) and score_b >= 2.0**-60):
        return False
    if not (np.isfinite(ia) and np.isfinite(ib)):
        return False
    n = xb.shape[0]
    if gw != 0.0 and gw > gain * n * 2.0**60:  # sum(x^2) < 2^-60
        return False
    g = 2.0 * (n + 8) * 2.0**-24
    dc = np.float64(dcw)
    rel = g * (1.0 + 2.0 * np.sqrt(dc * n) + 2.0 * np.sqrt(gain * n)) + g * g * n * (dc + gain)
    rel += 1e-3
    if not score_a * (1.0 + rel) < score_b * (1.0 - rel):
        return False
    differ = False
    for j in range(n):  # (maps and an or-reduction: they vectorise)
        v = _load(xb, j)
        ya = v * ia
        yb = v * ib
        if ort:
            ca = min(max(np.rint(ya), np.float32(-8.0)), _SEVEN) + _EIGHT
            cb = min(max(np.rint(yb), np.float32(-8.0)), _SEVEN) + _EIGHT
            differ = differ | (_ort_q(ya) != ca) | (_ort_q(yb) != cb)
        elif signed:  # (`_int4_code`'s division; the scales are never 0)
            ca = min(max(np.rint(ya), np.float32(-8.0)), _SEVEN)
            cb = min(max(np.rint(yb), np.float32(-8.0)), _SEVEN)
            qa = min(max(np.rint(_fdiv(v, sa)), np.float32(-8.0)), _SEVEN)
            qb = min(max(np.rint(_fdiv(v, sb)), np.float32(-8.0)), _SEVEN)
            differ = differ | (qa != ca) | (qb != cb)
        else:  # (`_uint4_code`)
            ca = min(max(np.rint(ya) + za, _ZERO), _FIFTEEN)
            cb = min(max(np.rint(yb) + zb, _ZERO), _FIFTEEN)
            qa = min(max(np.rint(_fdiv(v, sa)) + za, _ZERO), _FIFTEEN)
            qb = min(max(np.rint(_fdiv(v, sb)) + zb, _ZERO), _FIFTEEN)
            differ = differ | (qa != ca) | (qb != cb)
    return not differ


@njit(inline="always")
def _choose(xb, sk, ik, zk, acc, acc1, acc2, score, dcw, gain, nr, signed, ort, da, db, keys):
    """Index of the chosen candidate (`mse.approx_sse` ranks them; see `mse._pick_two_stage`):
    the first least approximate error; kept outright when dcw and gain are 0 and it beats round
    to nearest's (candidate 0) by more than the approximation's error bound (`mse.sure_margin`),
    else only if its exact error is strictly below round to nearest's; otherwise 0."""
    gw = _approx_all(xb, sk, ik, zk, acc, acc1, acc2, score, dcw, gain, signed, ort)
    if ort:
        best = _first_least(keys, _ort_scores(acc, acc1, acc2, ik, nr, dcw, gw, score, keys))
    else:
        best = 0
        for k in range(nr):
            # 1/scale overflows (subnormal scales), or the sums do (inf - inf): not scored
            if not np.isfinite(ik[k]) or np.isnan(score[k]):
                score[k] = np.inf
            if k and score[k] < score[best]:
                best = k
    if best == 0:
        return 0
    ar = score[0]
    margin = 1e-3 + 8.0 * xb.shape[0] * 2.0**-24
    plain = dcw == _ZERO and gain == 0.0
    if plain and np.isfinite(ar) and score[best] < ar * (1.0 - margin):
        return best
    if _sure(xb, sk[best], ik[best], zk[best], sk[0], ik[0], zk[0], score[best], ar, dcw, gain,
             gw, signed, ort):  # fmt: skip
        return best
    e_best, e_rtn = _exact2(xb, sk[best], zk[best], sk[0], zk[0], dcw, gw, signed, ort, da, db)
    return best if e_best < e_rtn else 0


@njit(inline="always")
def _int4_candidates(amax, ratios, sk, ik):
    """sk[k] = SymmetricInt(4).choose_params at clip ratio ratios[k] (from the block's float32
    amax), ik[k] = 1 / sk[k]: the plain formula in a loop that vectorises, then the rare fixes."""
    for k in range(sk.shape[0]):
        sk[k] = (amax * ratios[k]) / _SEVEN
    for k in range(sk.shape[0]):
        a = amax * ratios[k]
        if a == 0:
            sk[k] = _ONE
        elif np.float64(sk[k]) * 7.5 < np.float64(a):  # subnormal: nudge up until it covers
            sk[k] = _cover(sk[k], np.float64(a), 7.5)
    for k in range(sk.shape[0]):
        ik[k] = _ONE / sk[k]


@njit(inline="always")
def _uint4_candidates(lo, hi, ratios, sk, ik, zk):
    """(sk[k], zk[k]) = AffineUInt(4).choose_params at clip ratio ratios[k], from min(min, 0)
    and max(max, 0); ik[k] = 1 / sk[k]. Same split: plain formula, then the rare fixes."""
    for k in range(sk.shape[0]):
        sk[k] = (hi * ratios[k] - lo * ratios[k]) / _FIFTEEN
    for k in range(sk.shape[0]):
        sk[k] = _uint4_fix(lo * ratios[k], hi * ratios[k], sk[k])
    for k in range(sk.shape[0]):
        zk[k] = min(max(-np.rint((lo * ratios[k]) / sk[k]), _ZERO), _FIFTEEN)
        ik[k] = _ONE / sk[k]


@njit(inline="always")
def _ort_candidates(lo, hi, ratios, rmin, div, cov, orient, sk, ik):
    """The signed scales sk[k] of int4_ort's candidates (ik[k] = 1 / sk[k]), from min(min, 0)
    and max(max, 0): the extreme e (max if |max| > |min|, a tie picks min, as
    `OrtInt4.choose_params`) and per lane |e| * ratios[k] / div[k], nudged up while
    scale * cov[k] < |e| * ratios[k], 1 if that is 0: ORT's rule (div 8, cov 8) or int4's
    (div 7, cov 7.5); then the sign: orient[k] 1 puts the extreme on code -8 (ORT's scale
    -e / 8), -1 on +7 (`mse._flipped_candidates`); e * ratio == 0 counts as negative (zero
    point 8, as OrtInt4 decides on the shrunk extreme).

    rmin: the least ratio. When |e| * rmin >= 2^-120 no lane needs a fix (every |e| * ratio is
    then >= 2^-120 and its quotient normal: / 8 is exact, / 7 covers 7.5 steps), and the fix
    loop, which does not vectorise, is skipped."""
    e = hi if abs(hi) > abs(lo) else lo
    ae = abs(e)
    for k in range(sk.shape[0]):
        sk[k] = _fdiv(ae * ratios[k], div[k])
    if ae * rmin < _NORMAL_SAFE:
        for k in range(sk.shape[0]):
            a = ae * ratios[k]
            if a == 0:
                sk[k] = _ONE
            elif np.float64(sk[k]) * cov[k] < np.float64(a):  # subnormal: nudge up to cover
                sk[k] = _cover(sk[k], np.float64(a), cov[k])
    for k in range(sk.shape[0]):
        # ORT's scale is negative where e * ratio > 0 (not where e > 0: it can underflow to 0)
        neg = e > _ZERO and ae * ratios[k] > _ZERO
        sk[k] = sk[k] * (-orient[k] if neg else orient[k])
        ik[k] = _fdiv(_ONE, sk[k])


@njit(inline="always")
def _uint4_fix(lo, hi, scale):
    span = hi - lo
    if span == 0:
        return _ONE
    if np.isinf(span):  # [-3e38, 3e38]: the span overflows float32, span / 15 does not
        span64 = np.float64(hi) - np.float64(lo)
        return _cover(np.float32(span64 / 15.0), span64, 15.5)
    if np.float64(scale) * 15.5 < np.float64(span):
        scale = _cover(scale, np.float64(span), 15.5)
    if scale < _TINY:  # subnormal: cover the span in 15 steps (AffineUInt.choose_params)
        scale = _cover(scale, np.float64(span), 15.0)
    return scale


@njit(inline="always")
def _amax(xb):
    m = np.int32(0)
    for i in range(xb.shape[0]):
        m = max(m, _abs_key(_load(xb, i)))
    return _from_bits(m)


@njit(inline="always")
def _lo_hi(xb):
    hk = np.int32(0)
    lk = np.int32(0)
    for i in range(xb.shape[0]):
        v = _load(xb, i)
        hk = max(hk, _bits(v))
        lk = max(lk, _neg_key(v))
    hi = _from_bits(hk)
    lo = -_from_bits(lk) if lk > 0 else _ZERO
    return lo, hi


@njit(inline="always")
def _pack_item(xr, pr, sr, zr, b0, b1, bs, n, signed, ort=False):
    """Codes of blocks b0..b1 of one row, two per byte (as int4/uint4/int4_ort's quantize
    kernels; `ort`: int4_ort's codes, sr its scales (> 0) and zr its zero points)."""
    # full blocks of an even size start on a byte: whole bytes, in a loop that vectorises
    fast_end = max(b0, min(b1, n // bs)) if bs % 2 == 0 else b0
    for b in range(b0, fast_end):
        s0 = b * bs
        xb = xr[s0 : s0 + bs]
        pb = pr[s0 // 2 : s0 // 2 + bs // 2]
        scale = sr[b]
        if ort:
            s = -scale if zr[b] == 7 else scale
            rcp, tiny, flip = _ort_lane(s)
            if tiny:  # (OrtInt4.encode divides where 1 / scale overflows)
                for k in range(bs // 2):
                    c0 = _code_ort_div(_load(xb, 2 * k), s, flip)
                    c1 = _code_ort_div(_load(xb, 2 * k + 1), s, flip)
                    pb[k] = _pack2(c0, c1)
            else:
                for k in range(bs // 2):
                    c0 = _code_ort(_load(xb, 2 * k), rcp, flip)
                    c1 = _code_ort(_load(xb, 2 * k + 1), rcp, flip)
                    pb[k] = _pack2(c0, c1)
        elif signed:
            for k in range(bs // 2):
                c0 = np.int32(_int4_code(_load(xb, 2 * k), scale)) & np.int32(15)
                c1 = np.int32(_int4_code(_load(xb, 2 * k + 1), scale)) & np.int32(15)
                pb[k] = _pack2(c0, c1)
        else:
            zpf = np.float32(zr[b])
            for k in range(bs // 2):
                c0 = np.int32(_uint4_code(_load(xb, 2 * k), scale, zpf))
                c1 = np.int32(_uint4_code(_load(xb, 2 * k + 1), scale, zpf))
                pb[k] = _pack2(c0, c1)
    low = np.int32(0)  # odd block sizes and the padded last block: nibble by nibble
    for b in range(fast_end, b1):
        s0 = b * bs
        scale = sr[b]
        zpf = _ZERO if signed and not ort else np.float32(zr[b])
        s = -scale if zpf == _SEVEN else scale  # (s, rcp, tiny, flip: int4_ort's only)
        rcp, tiny, flip = _ort_lane(s)
        for j in range(bs):
            p = s0 + j
            if p < n:
                v = _load(xr, p)
                if ort:
                    c = _code_ort_div(v, s, flip) if tiny else _code_ort(v, rcp, flip)
                elif signed:
                    c = np.int32(_int4_code(v, scale)) & np.int32(15)
                else:
                    c = np.int32(_uint4_code(v, scale, zpf))
            else:  # padding: the code of 0 (int4_ort: its zero point too)
                c = np.int32(0) if signed and not ort else np.int32(zpf)
            low = _put_nibble(pr, p, c, low)
    _close_row(pr, b1 * bs, low)


@njit(inline="always")
def _scratch(nk, bs):
    """A work item's buffers for `nk` candidates of blocks of `bs`: scales sk, their reciprocals
    ik, zero points zk (0), the sums acc, acc1, acc2, scores, int4_ort's ranking keys, and two
    blocks of errors (da, db)."""
    f32, f64 = np.float32, np.float64
    return (np.empty(nk, f32), np.empty(nk, f32), np.zeros(nk, f32), np.empty(nk, f32),
            np.empty(nk, f32), np.empty(nk, f32), np.empty(nk, f64), np.empty(nk, np.int64),
            np.empty(bs, f64), np.empty(bs, f64))  # fmt: skip


@njit(parallel=True, nogil=True, cache=True)
def mse_kernel(x, packed, scales, zero_points, ratios, nr, dcw, gain, bs, chunk):
    """x (rows, n) -> packed codes, the searched scales (rows, nb) float32 and, for uint4, zero
    points (rows, nb) uint8; zero_points None: int4 (compiled apart, the branches fold away).

    ratios: the grid, padded to a multiple of _LANES (the extra lanes are scored, never chosen);
    nr: how many of them are real; dcw: the objective's dc_weight (float32); gain: its
    gain_weight (float64)."""
    rows, n = x.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    total = rows * n
    nk = ratios.shape[0]
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        xr = x[r]
        sr = scales[r]
        sk, ik, zk, acc, acc1, acc2, score, keys, da, db = _scratch(nk, bs)
        for b in range(b0, b1):
            s0 = b * bs
            e = min(s0 + bs, n)
            _prefetch_ahead(x, r * n + s0, e - s0, total)
            xb = xr[s0:e]
            signed = zero_points is None
            if signed:
                _int4_candidates(_amax(xb), ratios, sk, ik)
            else:
                lo, hi = _lo_hi(xb)
                _uint4_candidates(lo, hi, ratios, sk, ik, zk)
            kb = _choose(xb, sk, ik, zk, acc, acc1, acc2, score, dcw, gain, nr, signed, False,
                         da, db, keys)  # fmt: skip
            if not signed:
                zero_points[r, b] = np.uint8(zk[kb])
            sr[b] = sk[kb]
        if zero_points is None:
            _pack_item(xr, packed[r], sr, sr, b0, b1, bs, n, True)
        else:
            _pack_item(xr, packed[r], sr, zero_points[r], b0, b1, bs, n, False)


@njit(parallel=True, nogil=True, cache=True)
def mse_ort_kernel(x, packed, scales, zero_points, ratios, div, cov, orient, nr, dcw, gain, bs,
                   chunk):  # fmt: skip
    """`mse_kernel` for int4_ort: per lane k, ratios[k], div[k], cov[k] and orient[k] make the
    candidate (`_ort_candidates`); nr: the real candidates (ORT's orientation at every ratio,
    then the other), the rest pad the lanes to a multiple of _LANES. Ranked as int4 at the
    signed scales; the zero point is 7 where the chosen one is negative, else 8."""
    rows, n = x.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    total = rows * n
    nk = ratios.shape[0]
    rmin = ratios.min()
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        xr = x[r]
        sr = scales[r]
        zr = zero_points[r]
        sk, ik, zk, acc, acc1, acc2, score, keys, da, db = _scratch(nk, bs)
        for b in range(b0, b1):
            s0 = b * bs
            e = min(s0 + bs, n)
            _prefetch_ahead(x, r * n + s0, e - s0, total)
            xb = xr[s0:e]
            lo, hi = _lo_hi(xb)
            _ort_candidates(lo, hi, ratios, rmin, div, cov, orient, sk, ik)
            kb = _choose(
                xb, sk, ik, zk, acc, acc1, acc2, score, dcw, gain, nr, True, True, da, db, keys
            )
            s = sk[kb]
            sr[b] = abs(s)
            zr[b] = np.uint8(7) if s < _ZERO else np.uint8(8)
        _pack_item(xr, packed[r], sr, zr, b0, b1, bs, n, True, True)


def rows_setup(x2d, block_size, ratios, kernels, zero_points: bool):
    """What every search kernel's entry checks and allocates: (x as the kernels' view, or None
    for no rows; packed; scales; zero points or None; block size; chunk; float32 ratios)."""
    x = np.asarray(x2d)
    if x.ndim != 2:
        raise ValueError(f"x2d must be 2-D (rows, n), got shape {x.shape}")
    if x.dtype not in kernels.QUANTIZE_DTYPES:
        raise TypeError(f"no kernel for {x.dtype} input; supported: float32, float16, bfloat16")
    rows, n = x.shape
    if n == 0:
        raise ValueError("x2d has rows of length 0; there is nothing to quantize")
    bs = kernels._check_block(block_size, n)
    nb = -(-n // bs)
    packed = np.empty((rows, -(-nb * bs // 2)), np.uint8)
    scales = np.empty((rows, nb), np.float32)
    zp = np.empty((rows, nb), np.uint8) if zero_points else None
    if rows == 0:
        return None, packed, scales, zp, bs, 0, None
    ratios = np.asarray(ratios, np.float32).ravel()
    if ratios.shape[0] == 0:
        raise ValueError("ratios is empty; the grid needs at least ratio 1 (round to nearest)")
    xv = np.ascontiguousarray(x).view(kernels._VIEWS[x.dtype])
    return xv, packed, scales, zp, bs, kernels._chunk(rows, nb, bs), ratios


def mse_rows(
    fmt_name, x2d, block_size, ratios, num_threads, kernels, dc_weight=0.0, gain_weight=0.0
):
    """Run the search kernel for `fmt_name` on (rows, n) `x2d`; a `kernels.QuantizedRows`."""
    zero_points = fmt_name in ("uint4", "int4_ort")
    xv, packed, scales, zp, bs, chunk, ratios = rows_setup(
        x2d, block_size, ratios, kernels, zero_points
    )
    if xv is None:
        return kernels.QuantizedRows(packed, scales, zp)
    nr = ratios.shape[0]
    dcw, gain = np.float32(dc_weight), np.float64(gain_weight)
    if fmt_name == "int4_ort":  # ORT's orientation at every ratio, then the other one
        lanes = _pad_lanes(
            _ORT_LANES,
            np.concatenate([ratios, ratios]),
            np.repeat(np.float32([8, 7]), nr),
            np.repeat(np.float32([8, 7.5]), nr),
            np.repeat(np.float32([1, -1]), nr),
        )
        with kernels._launch(num_threads):
            mse_ort_kernel(xv, packed, scales, zp, *lanes, 2 * nr, dcw, gain, bs, chunk)
        return kernels.QuantizedRows(packed, scales, zp)
    (padded,) = _pad_lanes(_LANES, ratios)
    with kernels._launch(num_threads):
        mse_kernel(xv, packed, scales, zp, padded, nr, dcw, gain, bs, chunk)
    return kernels.QuantizedRows(packed, scales, zp)


def _pad_lanes(width, *lanes):
    """Each per-candidate array padded to whole passes of `width` lanes, repeating its last
    value (the extra lanes are scored, never chosen)."""
    nk = -(-lanes[0].shape[0] // width) * width
    return tuple(np.concatenate([a, np.repeat(a[-1:], nk - a.shape[0])]) for a in lanes)
