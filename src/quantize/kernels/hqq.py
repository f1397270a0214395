"""Numba kernel for HQQ (`quantize.algorithms.hqq`) on the integer formats: int4, int8 (no zero
point), uint4, uint8 (integer zero point), int4_affine, uint4_float_zp (float zero point); plus
the fused quantize+pack path for int4 and uint4.

Importing this module imports numba; `algorithms.hqq` imports it on first use only. The kernel
is `HalfQuadratic._solve` step for step, bit for bit:

* every per-block sum runs in order of the elements (as `mse.block_sse`, an accumulate), in
  float64 over products of two float32 values (exact), as the NumPy reference adds;
* the lp step is float32 and |r|^p is `algorithms.hqq.lp_power`, a short polynomial in float32
  +, -, *, / and exact bit operations, written out the same way here (a libm or SVML pow would
  differ in the last ulp between NumPy and LLVM); |r|^(p-1) / beta is |r|^p / (|r| beta);
* the zero point's least squares from the codes' moments, the same expressions;
* float zero points (`fzp`): codes rint(x / s + z) (not rint(x / s) + z: with a fractional z
  the sum rounds differently), no rounding of the new zero point, and the padding of a row's
  last block as the reference has it (the row's last value, weighted 0 in every sum);
* no fast-math, and `error_model="numpy"` (no ZeroDivisionError checks, 0/0 is NaN as in
  NumPy).

Vectorised across blocks, not elements: _L blocks sit side by side in (block size, _L)
buffers, so each sum is a sequential chain per block while the _L chains advance together in
SIMD lanes (a sum over one block's elements would not vectorise without reassociation). Each
lane works through its work item's blocks on its own: a block that stops improving (the
reference freezes it from then on) or has had all its iterations hands its lane to the next
block, so no lane idles while another block iterates. What a block gets depends only on its
own data, so the result does not depend on the thread count or on which lane ran it.

Cost (4096x4096 float32, block 128, shared 2-core machine): about 25x round to nearest's
kernel and 60x faster than the NumPy reference (benchmarks/bench_methods.py); int4_affine and
uint4_float_zp, whose round to nearest runs in NumPy, about 4x theirs (0.75 s against the
reference's 50 s). The helpers from
`int4` and `search` are inlined here: numba's cache keys on this file only, so after editing
them clear this module's `__pycache__` entries too.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .int4 import _bits, _from_bits, _work_item
from .search import _amax, _int4_candidates, _lo_hi, _pack_item, _uint4_candidates

#: blocks solved side by side (SIMD lanes; LLVM vectorises the constant-trip lane loops at 32,
#: at 16 or 8 it unrolls some of them into scalar code)
_L = 32
# lp_power's constants (the same values as algorithms.hqq's; a test holds them equal)
_F = np.float32
_TINY = _F(2.0**-100)
_HUGE = _F(2.0**100)
_ZERO, _HALF, _ONE, _INF = _F(0.0), _F(0.5), _F(1.0), _F(np.inf)
_SQRT2 = _F(1.4142135623730951)
_LN2 = _F(0.6931471805599453)
_INV_LN2 = _F(1.4426950408889634)
_MANT = np.int32(0x007FFFFF)
_ONE_BITS = np.int32(0x3F800000)
_L1, _L3, _L5, _L7 = _F(2.0), _F(2.0 / 3.0), _F(2.0 / 5.0), _F(2.0 / 7.0)
_E2, _E3, _E4 = _F(1.0 / 2.0), _F(1.0 / 6.0), _F(1.0 / 24.0)
_E5, _E6, _E7 = _F(1.0 / 120.0), _F(1.0 / 720.0), _F(1.0 / 5040.0)
_I23 = np.int32(23)
_I127 = np.int32(127)


@njit(inline="always", error_model="numpy")
def _powp(a, p):
    """`algorithms.hqq.lp_power` for one float32 a >= 0 (or NaN), float32 p: the same
    operations in the same order."""
    ok = a >= _TINY and a <= _HUGE
    b = _bits(a if ok else _ONE)
    e = (b >> _I23) - _I127
    m = _from_bits((b & _MANT) | _ONE_BITS)
    big = m > _SQRT2
    m = m * _HALF if big else m
    e = e + np.int32(1) if big else e
    s = (m - _ONE) / (m + _ONE)
    s2 = s * s
    lnm = s * (_L1 + s2 * (_L3 + s2 * (_L5 + s2 * _L7)))
    y = p * (np.float32(e) * _LN2 + lnm)
    k = np.rint(y * _INV_LN2)
    f = y - k * _LN2
    ef = _ONE + f * (_ONE + f * (_E2 + f * (_E3 + f * (_E4 + f * (_E5 + f * (_E6 + f * _E7))))))
    pw = ef * _from_bits((np.int32(k) + _I127) << _I23)
    return pw if ok else (_ZERO if a <= _HUGE else _INF)


@njit(inline="always", error_model="numpy")
def _lp_elem(X32, C, j, k, z, ie, p, bet):
    """One element's lp step (float32): |r|^p and the shrunk target t."""
    g = C[j, k] - z[k]
    u = X32[j, k] * ie[k]
    r = u - g
    a = abs(r)
    pw = _powp(a, p)
    tt = a - pw / (a * bet[k]) if a >= _TINY else _ZERO
    sh = tt if tt > _ZERO else _ZERO
    t = u - (sh if r > _ZERO else (-sh if r < _ZERO else _ZERO))
    return pw, t


@njit(inline="always", error_model="numpy")
def _pass(
    X32, W, C, PW, TT, s, z, ie, err, eab, obj, A, B, Q, Q2, S, QT, p, bet, bs, zero, fzp, lo, hi
):
    """One pass over the lanes' blocks at their current params (s, z): the codes, then per
    lane, in order of the elements, in float64 with every term exact (a float64 difference
    squared, or a product of two float32 values):

    err = sum e^2 (`mse.squared_error`), eab = sum |e| (e = decoded - x), obj = sum |r|^p;
    with a zero point Q = sum q, Q2 = sum q q, S = sum t, QT = sum q t (q the codes); without
    one A = sum t g, B = sum g g (g = the codes at unit scale). A float zero point (fzp) rounds
    x / s + z, and its sums weigh each term by W (1, 0 on padding) as the reference does (so a
    non-finite padding term gives NaN there too); its errors are 0 on padding.

    Separate loops (codes and errors; the float32 lp map into PW, TT; its sums): LLVM
    vectorises each across the lanes, but not them fused."""
    for k in range(_L):
        err[k] = 0.0
        eab[k] = 0.0
        obj[k] = 0.0
        A[k] = 0.0
        B[k] = 0.0
        Q[k] = 0.0
        Q2[k] = 0.0
        S[k] = 0.0
        QT[k] = 0.0
    if fzp:  # AffineIntFloatZero's encode and decode
        for j in range(bs):
            for k in range(_L):
                v = X32[j, k]
                c = min(max(np.rint(v / s[k] + z[k]), lo), hi)
                C[j, k] = c
                d = np.float64((c - z[k]) * s[k]) - np.float64(v)
                d = d if W[j, k] > 0.0 else 0.0
                err[k] += d * d
                eab[k] += abs(d)
    else:  # the format's encode and decode (z = 0 without a zero point)
        for j in range(bs):
            for k in range(_L):
                v = X32[j, k]
                c = min(max(np.rint(v / s[k]) + z[k], lo), hi)
                C[j, k] = c
                d = np.float64((c - z[k]) * s[k]) - np.float64(v)
                err[k] += d * d
                eab[k] += abs(d)
    for j in range(bs):
        for k in range(_L):
            pw, t = _lp_elem(X32, C, j, k, z, ie, p, bet)
            PW[j, k] = pw
            TT[j, k] = t
    if fzp:  # the reference's products, times the weight
        for j in range(bs):
            for k in range(_L):
                t64 = np.float64(TT[j, k])
                q = np.float64(C[j, k])
                w = W[j, k]
                obj[k] += np.float64(PW[j, k]) * w
                Q[k] += q * w
                Q2[k] += q * q * w
                S[k] += t64 * w
                QT[k] += q * t64 * w
    elif zero:
        for j in range(bs):
            for k in range(_L):
                t64 = np.float64(TT[j, k])
                q = np.float64(C[j, k])
                obj[k] += np.float64(PW[j, k])
                Q[k] += q
                Q2[k] += q * q
                S[k] += t64
                QT[k] += q * t64
    else:
        for j in range(bs):
            for k in range(_L):
                t64 = np.float64(TT[j, k])
                g64 = np.float64(C[j, k] - z[k])
                obj[k] += np.float64(PW[j, k])
                A[k] += t64 * g64
                B[k] += g64 * g64


@njit(inline="always", error_model="numpy")
def _band(amax, err, err_abs, count):
    """`algorithms.hqq._band`: how far float32 decoding's rounding can move a squared error."""
    return (amax * err_abs + err) * 2.0**-22 + (count * (amax * amax) + err) * 2.0**-46


@njit(inline="always", error_model="numpy")
def _load_lane(k, blk, x, n, bs, nb, scales, zps, zero, fzp, X32, W, s, z):
    """Block `blk` (C order over (rows, nb)) into lane k: its elements, then 0 past its end
    (the padding of a row's last block; with a float zero point the row's last value, as
    `blocking.to_blocks` pads, and weight 0 in W), and round to nearest's params; returns its
    length and its largest |x|.

    Without a float zero point, zeros make the padding drop out with no weights: x = 0 has
    code z and decodes to exactly 0, so its error, residual, |r|^p and target are exact zeros,
    which leave the sums as the reference's zero-weighted terms leave them; only the codes' own
    sums (sum q, sum q q) gain z and z^2 per padded element, exact integers that the zero point
    step takes out again. (A float z is not a code: there x = 0 would leave r = rint(z) - z.)"""
    r = blk // nb
    b = blk - r * nb
    s0 = b * bs
    m = min(bs, n - s0)
    s[k] = scales[r, b]
    z[k] = zps[r, b] if zero else np.float32(0.0)
    pad = x[r, n - 1] if fzp else np.float32(0.0)
    amax = 0.0
    for j in range(bs):
        v = x[r, s0 + j] if j < m else pad
        X32[j, k] = v
        W[j, k] = 1.0 if j < m else 0.0
        amax = max(amax, abs(np.float64(v)))
    return np.float64(m), amax


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def hqq_solve(x, n, bs, scales, zps, zero, fzp, cmin, cmax, iters, p, beta0, kappa, upd, per_item):
    """HQQ in place on round to nearest's params: scales (rows, nb) float32, zps (rows, nb)
    float32 (ignored unless `zero`) for the blocks of x (rows, >= n) float32, whose first n
    columns are the row (the rest is not read). zero: the format has a zero point, integer in
    [cmin, cmax] or, with fzp, a float (`AffineIntFloatZero`: codes in [cmin, cmax]); upd:
    HalfQuadratic.update_scale; per_item: blocks per work item.

    One pass per step and lane (`_pass`) at the lane's current params gives both the squared
    error of the params the previous step chose (the reference's best-so-far check, or round
    to nearest's error on a block's first step) and the lp step from them; so a block takes
    one pass more than it has updates. Each of the _L lanes works through the item's blocks on
    its own: when its block stops (no longer improving, or `iters` done and scored) its best
    params are written and the next block loaded."""
    rows = x.shape[0]
    nb = scales.shape[1]
    total = rows * nb if iters > 0 else 0  # 0 iterations: round to nearest's params stay
    nitems = (total + per_item - 1) // per_item
    cminf = np.float32(cmin)
    cmaxf = np.float32(cmax)
    p32 = np.float32(p)
    for item in prange(nitems):
        b_hi = min(total, (item + 1) * per_item)
        nxt = item * per_item
        X32 = np.zeros((bs, _L), np.float32)
        W = np.ones((bs, _L))
        C = np.zeros((bs, _L), np.float32)
        PW = np.zeros((bs, _L), np.float32)
        TT = np.zeros((bs, _L), np.float32)
        err = np.zeros(_L)
        eab = np.zeros(_L)
        obj = np.zeros(_L)
        A = np.zeros(_L)
        B = np.zeros(_L)
        Q = np.zeros(_L)
        Q2 = np.zeros(_L)
        S = np.zeros(_L)
        QT = np.zeros(_L)
        s = np.ones(_L, np.float32)
        z = np.zeros(_L, np.float32)
        best_s = np.ones(_L, np.float32)
        best_z = np.zeros(_L, np.float32)
        best = np.zeros(_L)
        best_ab = np.zeros(_L)
        prev = np.zeros(_L)
        wsum = np.ones(_L)
        amx = np.zeros(_L)
        ie = np.ones(_L, np.float32)
        bet = np.ones(_L)
        bet32 = np.ones(_L, np.float32)
        lane_blk = np.full(_L, -1, np.int64)
        it = np.zeros(_L, np.int64)  # updates made; -1: none scored yet (a fresh block)
        live = 0
        for k in range(_L):
            if nxt < b_hi:
                wsum[k], amx[k] = _load_lane(
                    k, nxt, x, n, bs, nb, scales, zps, zero, fzp, X32, W, s, z
                )
                lane_blk[k] = nxt
                prev[k] = np.inf
                bet[k] = beta0
                it[k] = -1
                nxt += 1
                live += 1
        while live > 0:
            for k in range(_L):
                ie[k] = _ONE / s[k]
                bet32[k] = np.float32(bet[k])
            _pass(
                X32, W, C, PW, TT, s, z, ie, err, eab, obj, A, B, Q, Q2, S, QT, p32, bet32, bs,
                zero, fzp, cminf, cmaxf,
            )  # fmt: skip
            for k in range(_L):
                if lane_blk[k] < 0:
                    continue
                if it[k] < 0:  # a fresh block: round to nearest's error is the first best
                    best[k] = err[k]
                    best_ab[k] = eab[k]
                    best_s[k] = s[k]
                    best_z[k] = z[k]
                    it[k] = 0
                else:  # the previous step's params, scored
                    band = _band(amx[k], err[k], eab[k], wsum[k]) + _band(
                        amx[k], best[k], best_ab[k], wsum[k]
                    )
                    if err[k] < best[k] - band:
                        best[k] = err[k]
                        best_ab[k] = eab[k]
                        best_s[k] = s[k]
                        best_z[k] = z[k]
                going = it[k] < iters and np.isfinite(obj[k]) and obj[k] < prev[k]
                if going:
                    prev[k] = obj[k]
                    e64 = np.float64(s[k])
                    if zero:  # algorithms.hqq.HalfQuadratic._zero_step, from the moments
                        # integer zero point: padding (x = 0) has code z, residual 0: it added
                        # z and z^2 to the integer sums of q and q^2 (exactly; take them out),
                        # zeros elsewhere; a float zero point's sums weighed it 0 already
                        zk = np.float64(z[k])
                        npad = 0.0 if fzp else np.float64(bs) - wsum[k]
                        sq, sq2 = Q[k] - npad * zk, Q2[k] - npad * (zk * zk)
                        st, sqt, wsk = S[k], QT[k], wsum[k]
                        mq = sq / wsk
                        mt = st / wsk
                        a = 1.0
                        if upd:
                            var = sq2 - mq * sq
                            a = (sqt - mq * st) / var
                            if not (var > 0.0 and np.isfinite(a) and a > 0.0):
                                a = 1.0
                        znew = mq - mt / a
                        if np.isfinite(znew) and not fzp:  # rint, clip (NaN stays, as np.clip)
                            znew = min(max(np.rint(znew), np.float64(cmin)), np.float64(cmax))
                        if upd and not fzp:
                            a2 = (sqt - znew * st) / (sq2 - 2.0 * znew * sq + znew * znew * wsk)
                            a = a2 if (np.isfinite(a2) and a2 > 0.0) else 1.0
                        if np.isfinite(znew):
                            z[k] = np.float32(znew)
                    else:
                        a = A[k] / B[k]
                    if not (np.isfinite(a) and a > 0.0):
                        a = 1.0
                    eff = e64 * a
                    ok = np.isfinite(eff) and eff > 0.0
                    out = np.float32(eff if ok else 1.0)
                    if ok and np.isfinite(out) and out > np.float32(0.0):
                        s[k] = out
                    bet[k] *= kappa
                    it[k] += 1
                    continue  # its new params are scored by the next pass
                # this block is done: its best params out, the next block in (or the lane idles)
                blk = lane_blk[k]
                r = blk // nb
                scales[r, blk - r * nb] = best_s[k]
                if zero:
                    zps[r, blk - r * nb] = best_z[k]
                if nxt < b_hi:
                    wsum[k], amx[k] = _load_lane(
                        k, nxt, x, n, bs, nb, scales, zps, zero, fzp, X32, W, s, z
                    )
                    lane_blk[k] = nxt
                    prev[k] = np.inf
                    bet[k] = beta0
                    it[k] = -1
                    nxt += 1
                else:
                    lane_blk[k] = -1
                    live -= 1
                    for j in range(bs):  # an idle lane computes on zeros
                        X32[j, k] = np.float32(0.0)
                    s[k] = np.float32(1.0)
                    z[k] = np.float32(0.0)


@njit(parallel=True, nogil=True, cache=True)
def rtn_int4(x, bs, scales, zps, ratios, signed):
    """Round to nearest's params of int4 (signed) or uint4 at clip ratio ratios[0], as
    `SymmetricInt(4)` / `AffineUInt(4).choose_params` compute them (`kernels.search`'s rules)."""
    rows, n = x.shape
    nb = scales.shape[1]
    for r in prange(rows):
        sk = np.empty(1, np.float32)
        ik = np.empty(1, np.float32)
        zk = np.zeros(1, np.float32)
        for b in range(nb):
            s0 = b * bs
            xb = x[r, s0 : min(s0 + bs, n)]
            if signed:
                _int4_candidates(_amax(xb), ratios, sk, ik)
            else:
                lo, hi = _lo_hi(xb)
                _uint4_candidates(lo, hi, ratios, sk, ik, zk)
            scales[r, b] = sk[0]
            zps[r, b] = zk[0]


@njit(parallel=True, nogil=True, cache=True)
def pack_int4(x, packed, scales, zps, bs, chunk, signed):
    """Codes of x (rows, n) float32 at the given params, two per byte (`search._pack_item`)."""
    rows, n = x.shape
    nb = scales.shape[1]
    nchunks = (nb + chunk - 1) // chunk
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        if signed:
            _pack_item(x[r], packed[r], scales[r], scales[r], b0, b1, bs, n, True)
        else:
            _pack_item(x[r], packed[r], scales[r], zps[r], b0, b1, bs, n, False)
