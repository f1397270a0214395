"""Numba kernels for the MSE clipping search (`quantize.algorithms.mse`) on mxfp4, mxfp4_ceil and
nvfp4 (the E2M1-element formats with few distinct scales per block; nvfp4's at the end).

Importing this module imports numba. The NumPy path (`MSESearch.choose_params`, `_pick_exact`)
tries `MXFP4.choose_params(blocks, r)` for every ratio r of its grid (then the widening ratio
2) and keeps, per block, the first candidate with the least `mse.search_error`; with dc_weight
and gain_weight 0 (MX's defaults) that is the block's squared error. Every candidate is an E8M0
power of two 2^e, so a block sees only a few distinct ones (2^e, 2^(e-1) and 2^(e+1) on the
default grid); equal scales give equal errors, bit for bit, so only the distinct exponents are
scored, in order of their first ratio, and the first least error wins (ties: the earlier ratio).

Per block, as the NumPy path computes it:
* the candidates: a = amax * ratio in float32, its exponent by the format's rule
  (`fp4._mx_exponent_branchless`: 0 for a == 0, clamped to [-127, 127]); where a overflows
  (the widening ratio 2 for amax >= 2^127), from the product in float64, as
  `MXFP4.choose_params` does;
* the error of 2^e: codes of x * 2^-e (equal to the encoder's x / 2^e: both are the exact
  quotient rounded once), decoded value * 2^e in float32, d = float64(decoded) - float64(x),
  sum of d * d in order of the elements (`mse.block_sse`), the padding of a row's last block not
  scored; a NaN error never wins (none arises from finite input).
Then codes and packing as `fp4.quantize_e2m1` does for mx (`_e2m1_codes_mul`, the nibble-wise
tail), so the bytes equal the NumPy path's.

The candidates are scored three at a time in one pass over the block, the map in LLVM vector IR
(`_make_sse_units`): three independent in-order float64 sums, in one kernel for the three
formats (`mse_e2m1_kernel`, a mode as `fp4.quantize_e2m1`). Measured (one thread, 1024x4096
normal float32, CPU ms, rtn's kernel 1.5 / 1.3): block 32 / 128: 21 / 14 with all 22 candidate
exponents per block and four lanes, 16.5 / 13.1 with the grid's two ends and three lanes, less
with the direct E2M1 rounding (`_e2m1_round_vec`). Scoring two blocks at a time (six chains)
gave 13.2 / 10.5 with it but took a cold compile from 8 s to 20 s: not kept.

nvfp4 (mode MODE_NVFP4): the tensor scale ts from the whole array first (`fp4.block_amax`,
as round to nearest), then per block every ratio's E4M3 scale by `NVFP4.choose_params`' rule
(amax * ratio in float32, / fl32(6 ts), E4M3 rounding, the nudge by the exact scalar rule
where needed), the distinct ones (about 9 per block on the default grid) scored in one pass
with a vector lane each (`_nv_lane_sse`, the quotient by a corrected reciprocal that gives
the encoder's codes), or where that does not apply three at a time as above with the
encoder's IEEE division by the effective scale fl32(scale * ts) (an effective scale of 0
decodes every element to 0: its error is the sum of x^2).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .fp4 import (
    _F32,
    _RCP_MAX,
    _RCP_MIN,
    _V32,
    _VF,
    _W,
    MODE_MX_CEIL,
    MODE_MX_FLOOR,
    MODE_NVFP4,
    _bits,
    _c32,
    _close_row,
    _e2m1_code_ir,
    _e2m1_codes_div,
    _e2m1_codes_mul,
    _e2m1_div_any,
    _e2m1_value_ir,
    _load,
    _mul32,
    _mx_exponent_branchless,
    _nvfp4_first,
    _nvfp4_scale,
    _nvfp4_short,
    _pow2,
    _put_nibble,
    _row_amax,
    _splat,
    _target_has,
    _vfunc,
    _vload,
    _vsplat,
    _work_item,
    block_amax,
)
from .search import rows_setup

_ONE = np.float32(1.0)
_SIX = np.float32(6.0)
#: candidates scored per pass over a block
_SLOTS = 3
_INF_BITS = np.int32(0x7F800000)


@intrinsic
def _e2m1_deq(typingctx, v, inv, scale):
    """E2M1 decode(encode(v * inv)) * scale in float32 (inv = 1 / scale, both powers of two):
    `MXFP4.decode(MXFP4.encode(...))` for one element."""

    def codegen(context, builder, sig, args):
        code = _e2m1_code_ir(builder, builder.fmul(args[0], args[1]))
        return builder.fmul(_e2m1_value_ir(builder, code), args[2])

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always")
def _sq(v, deq):
    d = np.float64(deq) - np.float64(v)
    return d * d


def _e2m1_round_vec(builder, q):
    """<16 x float> q (not NaN) -> its E2M1 value (`e2m1_decode(e2m1_encode(q))`, -0.0 for
    negatives that round to 0) by the FPU's own rounding: a = min(|q|, 8) rounded to its
    binade's E2M1 step 2^(E - 1) (E = max(0, exponent of a): step 0.5 below 2) by adding and
    subtracting c = 1.5 * 2^(E + 22), whose ulp is that step (a + c stays in c's binade), so
    the sum rounds to nearest, ties to the even multiple, which is the even code; then at most
    6 (7 -> 8 and 8 -> 6 saturate) and q's sign. Equal to `e2m1_decode(e2m1_encode(q))` for
    every non-NaN float32 (checked exhaustively); 7-10% faster in the search kernels than
    rounding the bits (rint below 2, the mantissa to one bit above)."""
    x = builder.bitcast(q, _V32)
    sign = builder.and_(x, _splat(-0x80000000))
    a = builder.bitcast(builder.and_(x, _splat(0x7FFFFFFF)), _VF)
    fmin = _vfunc(builder, "llvm.minnum.v16f32", _VF, [_VF, _VF])
    a = builder.call(fmin, [a, _splat(8.0, _F32)])
    e = builder.and_(builder.bitcast(a, _V32), _splat(0x7F800000))
    e = builder.select(builder.icmp_signed("<", e, _splat(127 << 23)), _splat(127 << 23), e)
    c = builder.bitcast(builder.add(e, _splat((22 << 23) | 0x400000)), _VF)
    r = builder.fsub(builder.fadd(a, c), c)
    r = builder.call(fmin, [r, _splat(6.0, _F32)])
    return builder.bitcast(builder.or_(builder.bitcast(r, _V32), sign), _VF)


def _make_sse_units(nblk: int, divide: bool = False):
    """An intrinsic (xr, starts, units, params) -> the squared errors (float64, each summed in
    order of the elements) of `nblk` blocks xr[start:start + 16 * units] (starts: a tuple) at
    three scales each (params: the 3 scales, then their 3 reciprocals, block after block), 16
    elements at a time: per candidate the map (decoded values, float64 differences and
    squares) as vectors, then the 3 * nblk sums taken lane by lane in order, as independent
    scalar chains (no reassociation: `mse.block_sse`'s order). A chain's adds wait on each
    other (3 cycles each). Unrolled into numba loops the map stayed scalar: 2.5x slower."""
    f64 = ir.DoubleType()
    v64 = ir.VectorType(f64, _W)

    def sse(typingctx, xr, starts, units, params):
        sig = types.UniTuple(types.float64, 3 * nblk)(xr, starts, types.intp, params)

        def codegen(context, builder, sig, args):
            xa, st, nu, pr = args
            intp = nu.type
            accs = [cgutils.alloca_once_value(builder, ir.Constant(f64, 0.0))
                    for _ in range(3 * nblk)]  # fmt: skip
            p = [_vsplat(builder, builder.extract_value(pr, i)) for i in range(6 * nblk)]
            base = [builder.extract_value(st, i) for i in range(nblk)]
            with cgutils.for_range(builder, nu) as loop:
                off = builder.mul(loop.index, intp(_W))
                sq = []
                for k in range(nblk):
                    v = _vload(context, builder, sig.args[0], xa, builder.add(base[k], off))
                    vd = builder.fpext(v, v64)
                    for c in range(3):
                        s, inv = p[6 * k + c], p[6 * k + 3 + c]
                        q = builder.fdiv(v, s) if divide else builder.fmul(v, inv)
                        deq = builder.fmul(_e2m1_round_vec(builder, q), s)
                        d = builder.fsub(builder.fpext(deq, v64), vd)
                        sq.append(builder.fmul(d, d))
                sums = [builder.load(a) for a in accs]
                for j in range(_W):
                    lane = ir.Constant(ir.IntType(32), j)
                    sums = [
                        builder.fadd(a, builder.extract_element(q, lane))
                        for a, q in zip(sums, sq, strict=True)
                    ]
                for a, t in zip(accs, sums, strict=True):
                    builder.store(t, a)
            return context.make_tuple(builder, sig.return_type, [builder.load(a) for a in accs])

        return sig, codegen

    sse.__name__ = sse.__qualname__ = f"sse_units{nblk}{'_div' if divide else ''}"
    return intrinsic(sse)


_sse_units1 = _make_sse_units(1)
#: nvfp4's: x / d, d = fl32(block scale * tensor scale), not a power of two (the encoder's IEEE
#: division; the params' reciprocal slots are unused)
_sse_units1_div = _make_sse_units(1, divide=True)


@njit(inline="always")
def _params(e0, e1, e2):
    """(2^e0, 2^e1, 2^e2, 2^-e0, 2^-e1, 2^-e2) in float32."""
    return _pow2(e0), _pow2(e1), _pow2(e2), _pow2(-e0), _pow2(-e1), _pow2(-e2)


@njit(inline="always")
def _sse3(xb, e0, e1, e2):
    """The block's squared errors (float64, in order of the elements) at 2^e0, 2^e1, 2^e2."""
    s0, s1, s2, i0, i1, i2 = _params(e0, e1, e2)
    units = xb.shape[0] // _W
    a0, a1, a2 = _sse_units1(xb, (0,), units, (s0, s1, s2, i0, i1, i2))
    for j in range(units * _W, xb.shape[0]):
        v = _load(xb, j)
        a0 += _sq(v, _e2m1_deq(v, i0, s0))
        a1 += _sq(v, _e2m1_deq(v, i1, s1))
        a2 += _sq(v, _e2m1_deq(v, i2, s2))
    return a0, a1, a2


@njit(inline="always")
def _add_distinct(vals, m, v):
    """vals[:m] holds distinct candidates in order of first appearance: add v if new; new m."""
    for i in range(m):
        if vals[i] == v:
            return m
    vals[m] = v
    return m + 1


@njit(inline="always")
def _push(vals, m, v):
    """Append v to vals[:m] unless it equals the last one; the new m."""
    if m == 0 or vals[m - 1] != v:
        vals[m] = v
        return m + 1
    return m


@njit(inline="always")
def _cand_exponent(amax, ratio, ceil):
    """`MXFP4.choose_params`' exponent at `ratio` for a block whose amax is float32 amax >= 0;
    where amax * ratio overflows float32 (the widening ratio 2 above 2^127), from the product
    in float64, as that rule takes it (`mx.e8m0_exponent`, clamped to 127)."""
    key = _bits(_mul32(amax, ratio))
    if key != _INF_BITS:
        return _mx_exponent_branchless(key, ceil)
    a = np.float64(amax) * np.float64(ratio)
    e = np.int32(math.frexp(a)[1] - 1 - 2)  # floor(log2 a) - floor(log2 6)
    if ceil and a > math.ldexp(6.0, e):
        e += 1
    return min(e, np.int32(127))


@njit(inline="always")
def _candidates(amax, ratios, ngrid, ceil, ex):
    """ex[:m] = the distinct candidate exponents of a block whose amax is float32 amax >= 0, in
    order of their first ratio (`MXFP4.choose_params` at each ratio); returns m.

    ratios[:ngrid] do not increase. When amax * ratios[ngrid - 1] > 0 and amax * ratios[0] is
    finite, so are all of the first ngrid products, and the exponent rule is monotone on them:
    their exponents run from the first's down to the last's, which (the default grid: ratios
    1 .. 0.5) are at most one apart, so the two ends are all of them. Otherwise (0 or a grid
    down past half), and for the ratios after ngrid (the widening ones), exponent by
    exponent."""
    m = 0
    start = 0
    a0 = _mul32(amax, ratios[0])
    if ngrid > 0 and _mul32(amax, ratios[ngrid - 1]) > 0 and not np.isinf(a0):
        e0 = _cand_exponent(amax, ratios[0], ceil)
        e1 = _cand_exponent(amax, ratios[ngrid - 1], ceil)
        if e0 - e1 <= 1:
            ex[0] = e0
            ex[1] = e1
            m = 1 if e1 == e0 else 2
            start = ngrid
    for k in range(start, ratios.shape[0]):
        m = _add_distinct(ex, m, _cand_exponent(amax, ratios[k], ceil))
    return m


@njit(inline="always")
def _fold_least(errs, g, m, best, best_err):
    """The running first least (index, error) over candidates g.. g + len(errs) - 1 of m with
    errors `errs` (NaN counts as +inf; candidate 0 is always taken first)."""
    for i in range(min(len(errs), m - g)):
        err = errs[i]
        if np.isnan(err):
            err = np.inf
        if (g == 0 and i == 0) or err < best_err:
            best, best_err = g + i, err
    return best, best_err


@njit(inline="always")
def _best_exponent(xb, ex, m):
    """The first of ex[:m] with the least squared error."""
    best, best_err = 0, np.inf
    top = m - 1
    for g in range(0, m, _SLOTS):
        errs = _sse3(xb, ex[g], ex[min(g + 1, top)], ex[min(g + 2, top)])
        best, best_err = _fold_least(errs, g, m, best, best_err)
    return ex[best]


def mse_mx_rows(fmt_name, x2d, block_size, ratios, num_threads, kernels):
    """Run the search kernel for mxfp4 / mxfp4_ceil on (rows, n) `x2d` with the search's
    ratios (in order); a `kernels.QuantizedRows`."""
    if fmt_name not in ("mxfp4", "mxfp4_ceil"):
        raise ValueError(f"no MX search kernel for format {fmt_name!r}")
    xv, packed, scales, _, bs, chunk, ratios = rows_setup(x2d, block_size, ratios, kernels, False)
    if xv is None:
        return kernels.QuantizedRows(packed, scales, None)
    rises = np.flatnonzero(np.diff(ratios) > 0)  # the grid: the longest non-increasing start
    ngrid = int(rises[0]) + 1 if rises.size else ratios.shape[0]
    mode = MODE_MX_CEIL if fmt_name == "mxfp4_ceil" else MODE_MX_FLOOR
    with kernels._launch(num_threads):
        mse_e2m1_kernel(xv, packed, scales, ratios, ngrid, mode, _ONE, bs, chunk)
    return kernels.QuantizedRows(packed, scales, None)


# --- nvfp4: E4M3 block scales under a float32 tensor scale ---------------------------------------


@intrinsic
def _e2m1_div_deq(typingctx, v, d):
    """E2M1 decode(encode(v / d)) * d in float32 for d > 0 (IEEE division, as `NVFP4.encode`)."""

    def codegen(context, builder, sig, args):
        code = _e2m1_code_ir(builder, builder.fdiv(args[0], args[1]))
        return builder.fmul(_e2m1_value_ir(builder, code), args[1])

    return types.float32(types.float32, types.float32), codegen


@njit(inline="always")
def _sse3_div(xb, d0, d1, d2):
    """The block's squared errors (float64, in order of the elements) at effective scales
    d0, d1, d2 > 0."""
    units = xb.shape[0] // _W
    a0, a1, a2 = _sse_units1_div(xb, (0,), units, (d0, d1, d2, d0, d1, d2))
    for j in range(units * _W, xb.shape[0]):
        v = _load(xb, j)
        a0 += _sq(v, _e2m1_div_deq(v, d0))
        a1 += _sq(v, _e2m1_div_deq(v, d1))
        a2 += _sq(v, _e2m1_div_deq(v, d2))
    return a0, a1, a2


#: the corrected-reciprocal quotient of the lane scorers needs FMA
_LANE_FMA = _target_has("fma")


def _make_lane_sse(quotient: str, value):
    """An intrinsic (xb, ds, errs): errs[c] = the squared error (float64, summed in order of
    the elements) of block xb (float32) at scale ds[c], for the 16 lanes c at once (ds:
    float32[>= 16], errs: float64[>= 16]); `value(builder, q)`: the format's decoded value of
    <16 x float> quotients q, before the scale.

    The candidates are the vector lanes and the elements the loop, so each lane's sum runs in
    order (`mse.block_sse`) with no lane extracts: one pass over the block for 16 distinct
    scales. quotient: "rcp", x / s by the corrected reciprocal of `fp4._codes_blocks`' kind
    "rcp" (y = x * inv, q = fma(fma(-y, s, x), inv, y)), x / s rounded wherever an E2M1 code
    changes (the midpoints 0.25 .. 5 are half-integers times powers of two, and that quotient's
    exhaustive check scales exactly by 2^k), so the encoder's codes: only for s in [_RCP_MIN,
    _RCP_MAX] (every intermediate normal) and with FMA (`_LANE_FMA`), which the callers check;
    "div", x / s; "mul", x * fl32(1 / s) (NF4's rule); "sel", as "mul" but x / s in the lanes
    where 1 / s overflows."""
    f64 = ir.DoubleType()
    v64 = ir.VectorType(f64, _W)

    def lane_sse(typingctx, xb, ds, errs):
        def codegen(context, builder, sig, args):
            xty = sig.args[0]
            xa, da, ea = args
            xarr = context.make_array(xty)(context, builder, xa)
            n = builder.extract_value(xarr.shape, 0)
            stride = builder.extract_value(xarr.strides, 0)
            data = lambda ty, a: context.make_array(ty)(context, builder, a).data  # noqa: E731
            dv = builder.load(builder.bitcast(data(sig.args[1], da), _VF.as_pointer()), align=4)
            iv = builder.fdiv(_splat(1.0, _F32), dv)
            big = builder.fcmp_ordered("==", iv, _splat(float("inf"), _F32))
            fma = _vfunc(builder, "llvm.fma.v16f32", _VF, [_VF, _VF, _VF])
            acc = cgutils.alloca_once_value(builder, ir.Constant(v64, [0.0] * _W))
            undef = ir.Constant(v64, ir.Undefined)
            with cgutils.for_range(builder, n) as loop:
                ptr = cgutils.get_item_pointer2(
                    context, builder, xarr.data, [n], [stride], "A", [loop.index]
                )
                v = builder.load(ptr)
                xv = _vsplat(builder, v)
                x64v = builder.shuffle_vector(
                    builder.insert_element(undef, builder.fpext(v, f64), _c32(0)),
                    undef,
                    ir.Constant(_V32, [0] * _W),
                )
                if quotient == "rcp":
                    y = builder.fmul(xv, iv)
                    r = builder.call(fma, [builder.fneg(y), dv, xv])
                    q = builder.call(fma, [r, iv, y])
                elif quotient == "div":
                    q = builder.fdiv(xv, dv)
                else:
                    q = builder.fmul(xv, iv)
                    if quotient == "sel":
                        q = builder.select(big, builder.fdiv(xv, dv), q)
                deq = builder.fmul(value(builder, q), dv)
                d = builder.fsub(builder.fpext(deq, v64), x64v)
                builder.store(builder.fadd(builder.load(acc), builder.fmul(d, d)), acc)
            ep = builder.bitcast(data(sig.args[2], ea), v64.as_pointer())
            builder.store(builder.load(acc), ep, align=8)
            return context.get_dummy_value()

        return types.void(xb, ds, errs), codegen

    lane_sse.__name__ = lane_sse.__qualname__ = f"lane_sse_{quotient}"
    return intrinsic(lane_sse)


#: nvfp4's scorer: E2M1 values of x / s, 16 scales a pass
_nv_lane_sse = _make_lane_sse("rcp", _e2m1_round_vec)


@njit(inline="always")
def _sse_zero(xb):
    """The squared error at an effective scale that underflowed to 0: every element decodes
    to +-0 (x / 0 is +-inf or NaN, any code times 0), so it is the sum of x^2 in order."""
    a = 0.0
    for j in range(xb.shape[0]):
        v = np.float64(_load(xb, j))
        a += v * v
    return a


@njit(inline="always")
def _nv_candidates(amax, ratios, ts, six_ts, t64, buf, sc):
    """sc[:m] = the block scales of `NVFP4.choose_params` at each ratio (amax * ratio in
    float32, then the E4M3 rule with its nudge), in the ratios' order, each repeat of the
    previous one dropped (on the grid: the distinct ones); returns m.
    All ratios' scales first in a loop LLVM vectorises (as `fp4._scales_from_amax`), then by
    the exact scalar rule only if some needs its nudge (E4M3-subnormal block scales)."""
    nr = ratios.shape[0]
    bad = False
    for k in range(nr):
        a = _mul32(amax, ratios[k])
        v = _nvfp4_first(a, six_ts)
        bad |= _nvfp4_short(a, v, t64)
        buf[k] = v
    if bad:
        for k in range(nr):
            buf[k] = _nvfp4_scale(_bits(_mul32(amax, ratios[k])), ts, six_ts)
    # equal scales give equal errors, and the first of equal errors wins, so only a repeat of
    # the last scale need be dropped: the grid's scales only fall (each step of the rule is
    # monotone in amax * ratio) but where raw underflows and the rule takes 1, whose repeat
    # would cost one lane, not the answer. (A search among the distinct ones for every ratio
    # cost 11 of the search's 73.7 ms on 1024x4096 at block 16, one thread: its branches
    # follow the data.)
    m = 0
    for k in range(nr):
        m = _push(sc, m, buf[k])
    return m


@njit(inline="always")
def _best_nv_scale(xb, sc, m, ts, lanes):
    """The first of sc[:m] with the least squared error at effective scale fl32(s * ts).

    Up to 16 candidates whose effective scales lie in [_RCP_MIN, _RCP_MAX] (all but tensor
    scales near float32's ends) in one pass, each a vector lane (`_nv_lane_sse`; lanes: its
    float32[16] ds and float64[16] errs scratch); otherwise three at a time (`_sse3_div`).
    Measured (one thread, 1024x4096 normal float32, CPU ms of the whole search, blocks 16 /
    32 / 128; Intel Xeon with AVX-512): 62.8 / 47.0 / 35.9 three at a time, 59.6 / 42.5 /
    30.3 in lanes (rtn's kernel: 2.1 / 2.0 / 1.9)."""
    ds, errs = lanes
    top = m - 1
    if _LANE_FMA and m <= _W:
        fits = True
        for i in range(m):
            ds[i] = _mul32(sc[i], ts)
            fits &= (ds[i] >= _RCP_MIN) & (ds[i] <= _RCP_MAX)
        ds[m:] = ds[top]
        if fits:
            _nv_lane_sse(xb, ds, errs)
            best, best_err = _fold_least(errs[:m], 0, m, 0, np.inf)
            return sc[best]
    best, best_err = 0, np.inf
    for g in range(0, m, _SLOTS):
        d0 = _mul32(sc[g], ts)
        d1 = _mul32(sc[min(g + 1, top)], ts)
        d2 = _mul32(sc[min(g + 2, top)], ts)
        if d0 > 0 and d1 > 0 and d2 > 0:
            errs = _sse3_div(xb, d0, d1, d2)
        else:  # rare (a tensor scale near float32's smallest): one by one
            e = [_sse_zero(xb) if d == 0 else _sse3_div(xb, d, d, d)[0] for d in (d0, d1, d2)]
            errs = (e[0], e[1], e[2])
        best, best_err = _fold_least(errs, g, m, best, best_err)
    return sc[best]


@njit(parallel=True, nogil=True, cache=True)
def mse_e2m1_kernel(x, packed, scales, ratios, ngrid, mode, ts, bs, chunk):
    """x (rows, n) -> packed codes (rows, ceil(nb*bs/2)) and the searched scales (rows, nb)
    float32. mode: MODE_MX_FLOOR (mxfp4), MODE_MX_CEIL (mxfp4_ceil) or MODE_NVFP4 (then
    `scales` holds the block amaxes on entry, `fp4.block_amax`, and ts is the float32 tensor
    scale; ignored otherwise). ratios: the search's float32 ratios in order (the grid, then
    the widening ones), the first ngrid of them not increasing."""
    rows, n = x.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    nv = mode == MODE_NVFP4
    ceil = mode == MODE_MX_CEIL
    six_ts = _mul32(_SIX, ts)
    t64 = np.float64(ts)
    vec = bs % _W == 0
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        xr = x[r]
        pr = packed[r]
        sr = scales[r]
        ex = np.empty(max(2, ratios.shape[0]), np.int32)  # mx: distinct exponents
        sc = np.empty(max(2, ratios.shape[0]), np.float32)  # nvfp4: distinct scales
        buf = np.empty(max(2, ratios.shape[0]), np.float32)  # nvfp4: every ratio's scale
        lanes = (np.empty(_W, np.float32), np.empty(_W, np.float64))
        if not nv:
            _row_amax(xr, sr, b0, b1, bs, n)  # sr[b] = the block's amax (real elements only)
        for b in range(b0, b1):
            s0 = b * bs
            xb = xr[s0 : min(s0 + bs, n)]
            if nv:
                m = _nv_candidates(sr[b], ratios, ts, six_ts, t64, buf, sc)
                sr[b] = sc[0] if m == 1 else _best_nv_scale(xb, sc, m, ts, lanes)
            else:
                m = _candidates(sr[b], ratios, ngrid, ceil, ex)
                sr[b] = _pow2(ex[0] if m == 1 else _best_exponent(xb, ex, m))
        fast_end = max(b0, min(b1, n // bs)) if vec else b0
        ahead = (b1 - b0) * bs
        if nv:
            _e2m1_codes_div(xr, pr, sr, b0, fast_end, bs, ts, ahead)
        else:  # x * 2^-e == x / 2^e, both rounded once
            _e2m1_codes_mul(xr, pr, sr, b0, fast_end, bs, _ONE, ahead)
        low = np.int32(0)  # other block sizes and the padded last block: nibble by nibble
        for b in range(fast_end, b1):
            s0 = b * bs
            d = _mul32(sr[b], ts) if nv else sr[b]
            for j in range(bs):
                c = _e2m1_div_any(_load(xr, s0 + j), d) if s0 + j < n else np.int32(0)
                low = _put_nibble(pr, s0 + j, c, low)
        _close_row(pr, b1 * bs, low)


def mse_nvfp4_rows(x2d, block_size, ratios, num_threads, kernels):
    """Run the nvfp4 search kernel on (rows, n) `x2d` with the search's ratios (in order); a
    `kernels.QuantizedRows` with the tensor scale (of the whole array, as the NumPy path's)."""
    xv, packed, scales, _, bs, chunk, ratios = rows_setup(x2d, block_size, ratios, kernels, False)
    if xv is None:
        return kernels.QuantizedRows(packed, scales, None, np.float32(1.0))
    with kernels._launch(num_threads):
        key = block_amax(xv, scales, bs, chunk)  # the block amaxes into `scales`
        ts = kernels._nvfp4_tensor_scale(np.int32(key).view(np.float32))
        mse_e2m1_kernel(xv, packed, scales, ratios, ratios.shape[0], MODE_NVFP4, ts, bs, chunk)
    return kernels.QuantizedRows(packed, scales, None, ts)
