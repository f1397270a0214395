"""Numba kernels for the MSE clipping search (`quantize.algorithms.mse`) on int4 and uint4.

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

Codes are clamped in float before the conversion to int, so a tiny clip_ratio (x / scale far
beyond the int32 range) still gives NumPy's clipped code.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .int4 import (
    _TINY,
    _abs_key,
    _bits,
    _close_row,
    _cover,
    _from_bits,
    _load,
    _neg_key,
    _pack2,
    _prefetch_ahead,
    _put_nibble,
    _work_item,
)

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_SEVEN = np.float32(7.0)
_FIFTEEN = np.float32(15.0)
#: candidates scored per pass over a block (the vectorised inner loop's constant trip count)
_LANES = 24


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


@njit(inline="always")
def _lane_d(v, inv, scale, zpf, signed):
    """The float32 decoding error of v at one candidate: codes rint(v * inv), clipped."""
    if signed:
        return min(max(np.rint(v * inv), np.float32(-8.0)), _SEVEN) * scale - v
    c = min(max(np.rint(v * inv) + zpf, _ZERO), _FIFTEEN)
    return (c - zpf) * scale - v


@njit(inline="always")
def _scan(xb, s_, i_, z_, a_, b_, c_, signed, gain, sumsq):
    """One pass over the block for _LANES candidates: a_ += d^2, b_ += d and, with `gain`,
    c_ += d * x (signed, gain, sumsq: constants where it is inlined, so each variant is a plain
    loop). Returns, with `sumsq`, the block's sum(x^2) (float64, in order; else 0): the gain
    factor's sum, a scalar chain that runs in the shadow of the vectorised candidates' work
    instead of in a pass of its own."""
    q = 0.0
    for j in range(xb.shape[0]):
        v = _load(xb, j)
        if sumsq:
            q += np.float64(v) * np.float64(v)
        for k in range(_LANES):
            d = _lane_d(v, i_[k], s_[k], z_[k], signed)
            a_[k] += d * d
            b_[k] += d
            if gain:
                c_[k] += d * v
    return q


@njit(inline="always")
def _approx_all(xb, sk, ik, zk, acc, acc1, acc2, score, dcw, gain, signed):
    """score[k] = `mse.approx_sse` of the block at scale sk[k] (ik[k] = 1 / sk[k], zk[k] the zero
    point, float32): codes rint(x * ik[k]), squares and sums in float32, in order of the elements
    (acc1: the sums of the differences, acc2: of the differences times x), acc + dcw * acc1^2 in
    float32 (dcw != 0), then in float64 plus gw * acc2^2, gw the block's `mse.gain_factor` for
    the weight `gain` (0: no gain term). Returns gw.

    Candidates are the inner loop: each element is loaded once and scored against _LANES of
    them, a float32 map with a constant trip count that LLVM vectorises whole (a sum over the
    elements would not vectorise without reassociation, and there is no fast-math here)."""
    for k in range(sk.shape[0]):
        acc[k] = _ZERO
        acc1[k] = _ZERO
        acc2[k] = _ZERO
    q = 0.0
    for p0 in range(0, sk.shape[0], _LANES):
        s_, i_, z_ = sk[p0:], ik[p0:], zk[p0:]
        a_, b_, c_ = acc[p0:], acc1[p0:], acc2[p0:]
        if gain == 0.0:
            _scan(xb, s_, i_, z_, a_, b_, c_, signed, False, False)
        elif p0 == 0:
            q = _scan(xb, s_, i_, z_, a_, b_, c_, signed, True, True)
        else:
            _scan(xb, s_, i_, z_, a_, b_, c_, signed, True, False)
    # `mse.gain_factor`; a block of zeros (q == 0) has sum(d x) == 0 and gets factor 0
    gw = (gain * np.float64(xb.shape[0])) / q if q > 0.0 else 0.0
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
def _exact2(xb, sa, za, sb, zb, dcw, gw, signed, da, db):
    """`mse.search_error` of the block for two candidates (scale, zero point): the format's own
    codes (a true division), decoded in float32, differences, squares and the sums (in order)
    in float64. da, db: float64 buffers of at least the block's length.

    Two loops: the differences first, a map with no loop-carried dependence that vectorises
    (the divisions above all), then the six sums, each in order of the elements, as
    independent chains in one pass; same bits as one scalar loop per candidate."""
    n = xb.shape[0]
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


@njit(inline="always")
def _choose(xb, sk, ik, zk, acc, acc1, acc2, score, dcw, gain, nr, signed, da, db):
    """Index of the chosen candidate (`mse.approx_sse` ranks them; see `mse._pick_two_stage`):
    the first least approximate error; kept outright when dcw and gain are 0 and it beats round
    to nearest's (candidate 0) by more than the approximation's error bound (`mse.sure_margin`),
    else only if its exact error is strictly below round to nearest's; otherwise 0."""
    gw = _approx_all(xb, sk, ik, zk, acc, acc1, acc2, score, dcw, gain, signed)
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
    e_best, e_rtn = _exact2(xb, sk[best], zk[best], sk[0], zk[0], dcw, gw, signed, da, db)
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
def _pack_item(xr, pr, sr, zr, b0, b1, bs, n, signed):
    """Codes of blocks b0..b1 of one row, two per byte (as int4/uint4's quantize kernels)."""
    # full blocks of an even size start on a byte: whole bytes, in a loop that vectorises
    fast_end = max(b0, min(b1, n // bs)) if bs % 2 == 0 else b0
    for b in range(b0, fast_end):
        s0 = b * bs
        xb = xr[s0 : s0 + bs]
        pb = pr[s0 // 2 : s0 // 2 + bs // 2]
        scale = sr[b]
        if signed:
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
        zpf = _ZERO if signed else np.float32(zr[b])
        for j in range(bs):
            p = s0 + j
            if p < n:
                v = _load(xr, p)
                if signed:
                    c = np.int32(_int4_code(v, scale)) & np.int32(15)
                else:
                    c = np.int32(_uint4_code(v, scale, zpf))
            else:  # padding: the code of 0
                c = np.int32(0) if signed else np.int32(zpf)
            low = _put_nibble(pr, p, c, low)
    _close_row(pr, b1 * bs, low)


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
        sk = np.empty(nk, np.float32)
        ik = np.empty(nk, np.float32)
        zk = np.zeros(nk, np.float32)
        acc = np.empty(nk, np.float32)
        acc1 = np.empty(nk, np.float32)
        acc2 = np.empty(nk, np.float32)
        score = np.empty(nk, np.float64)
        da = np.empty(bs, np.float64)
        db = np.empty(bs, np.float64)
        for b in range(b0, b1):
            s0 = b * bs
            e = min(s0 + bs, n)
            _prefetch_ahead(x, r * n + s0, e - s0, total)
            xb = xr[s0:e]
            if zero_points is None:
                _int4_candidates(_amax(xb), ratios, sk, ik)
                kb = _choose(xb, sk, ik, zk, acc, acc1, acc2, score, dcw, gain, nr, True, da, db)
            else:
                lo, hi = _lo_hi(xb)
                _uint4_candidates(lo, hi, ratios, sk, ik, zk)
                kb = _choose(xb, sk, ik, zk, acc, acc1, acc2, score, dcw, gain, nr, False, da, db)
                zero_points[r, b] = np.uint8(zk[kb])
            sr[b] = sk[kb]
        if zero_points is None:
            _pack_item(xr, packed[r], sr, sr, b0, b1, bs, n, True)
        else:
            _pack_item(xr, packed[r], sr, zero_points[r], b0, b1, bs, n, False)


def mse_rows(
    fmt_name, x2d, block_size, ratios, num_threads, kernels, dc_weight=0.0, gain_weight=0.0
):
    """Run the search kernel for `fmt_name` on (rows, n) `x2d`; a `kernels.QuantizedRows`."""
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
    zp = np.empty((rows, nb), np.uint8) if fmt_name == "uint4" else None
    if rows == 0:
        return kernels.QuantizedRows(packed, scales, zp)
    xv = np.ascontiguousarray(x).view(kernels._VIEWS[x.dtype])
    chunk = kernels._chunk(rows, nb, bs)
    ratios = np.asarray(ratios, np.float32).ravel()
    nr = ratios.shape[0]
    if nr == 0:
        raise ValueError("ratios is empty; the grid needs at least ratio 1 (round to nearest)")
    nk = -(-nr // _LANES) * _LANES  # whole passes; the extra lanes repeat the last ratio
    padded = np.concatenate([ratios, np.repeat(ratios[-1:], nk - nr)])
    dcw, gain = np.float32(dc_weight), np.float64(gain_weight)
    with kernels._launch(num_threads):
        mse_kernel(xv, packed, scales, zp, padded, nr, dcw, gain, bs, chunk)
    return kernels.QuantizedRows(packed, scales, zp)
