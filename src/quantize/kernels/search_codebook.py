"""Numba kernels for the MSE clipping search (`quantize.algorithms.mse`) on fp4_e2m1 and nf4
(float32 block scales: every ratio of the grid gives its own scale, 21 per block by default).

Importing this module imports numba. The NumPy path (`MSESearch.choose_params`, `_pick_exact`)
tries `fmt.choose_params(blocks, r)` for every ratio r of its grid and keeps, per block, the
first candidate with the least `mse.search_error`; with dc_weight and gain_weight 0 (these
formats' defaults) that is the block's squared error. These kernels score every candidate
exactly as that rule does (route "exact": no approximate ranking, so the NumPy rule is
unchanged), bit for bit:

* the candidates: a = amax * ratio in float32 (amax over the block's real elements), then
  fp4_e2m1: a / 6 in float32, nudged up by ulps where it underflows (`fp4._fp4_scale`, the
  format's `_cover`), 1.0 for a == 0; nf4: a, 1.0 for a == 0. Adjacent equal scales are
  scored once (equal scales give equal errors: the first of them wins anyway);
* the error at scale s: fp4_e2m1 codes of x / s (IEEE division), nf4 codes of x * fl32(1/s)
  (x / s where 1/s overflows, a subnormal s), midpoints in float32, ties to the lower code;
  decoded value * s in float32, d = float64(decoded) - float64(x), the sum of d * d in order of
  the elements (`mse.block_sse`); the padding of a row's last block is not scored (the block
  is cut at the row's end); a NaN error never wins (the first candidate is taken first).
Then codes and packing as the rtn kernels (`fp4.quantize_e2m1`'s MODE_FP4, `nf4.quantize_nf4`).

The candidates are the vector lanes and the elements the loop (`search_e2m1._make_lane_sse`,
as nvfp4's scorer): 32 candidates (two vectors of 16, two independent chains of float64 sums)
per pass over the block, each lane's sum in order, no lane extracts. fp4_e2m1's quotient x / s
is taken by the corrected reciprocal, which gives the encoder's codes for s in [_RCP_MIN,
_RCP_MAX]; other scales, or no FMA, divide.

Measured (2026-11-23, 4096x4096 normal float32, a 2-vCPU Intel Xeon with AVX-512 shared with
other work, one thread, best of 5, rtn's kernel timed in the same run): fp4_e2m1 253 / 194 ms
at blocks 32 / 128 (rtn 7.9 / 6.8: 32x / 29x), nf4 293 / 239 ms (rtn 8.0 / 6.8: 37x / 35x);
the NumPy path was 790-2300x rtn. E2M1 rounding with the FPU (`search_e2m1._e2m1_round_vec`
now) instead of from the bits: 268 / 215 -> 253 / 194 ms. By the number of candidates
(1024x4096, block 32, fp4_e2m1, one thread): steps 1 (no search): 2.1 ms, 2: 32, 16 (one
vector of lanes): 40, 17 (two): 60, 21: 63, 32: 68. A vector of 16 candidates costs about
5 ns per element (~20 512-bit operations: the quotient, E2M1 rounding, float64 error), near
the vector units' throughput; the per-block work (21 scales, lanes, fold) about 3 ns per
element at block 32. The issue's target of 10x rtn would need cheaper scoring than one code
per candidate and element: a float32 ranking (int4's two-stage route) saves only the float64
part of it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fp4 import (
    _RCP_MAX,
    _RCP_MIN,
    _W,
    _bits,
    _close_row,
    _div32,
    _e2m1_codes_div,
    _e2m1_div_any,
    _fp4_scale,
    _load,
    _mul32,
    _put_nibble,
    _row_amax,
    _work_item,
)
from .nf4 import _nf4_code_vec, _nf4_codes, _nf4_div, _nf4_mul, _nf4_value_vec
from .search import rows_setup
from .search_e2m1 import _LANE_FMA, _e2m1_round_vec, _fold_least, _make_lane_sse

_ONE = np.float32(1.0)
_ZERO_CODE = np.int32(7)  # nf4's code of 0 (the padding)
#: candidates scored per pass over a block (two vectors of lanes)
_LANES = 2 * _W


def _nf4_value(builder, q):
    """<16 x float> quotients -> their NF4 codebook values (midpoints, ties to the lower code)."""
    return _nf4_value_vec(builder, _nf4_code_vec(builder, q))


_e2m1_rcp1 = _make_lane_sse("rcp", _e2m1_round_vec, 1)
_e2m1_rcp2 = _make_lane_sse("rcp", _e2m1_round_vec, 2)
_e2m1_div1 = _make_lane_sse("div", _e2m1_round_vec, 1)
_e2m1_div2 = _make_lane_sse("div", _e2m1_round_vec, 2)
_nf4_mul1 = _make_lane_sse("mul", _nf4_value, 1)
_nf4_mul2 = _make_lane_sse("mul", _nf4_value, 2)
_nf4_sel1 = _make_lane_sse("sel", _nf4_value, 1)
_nf4_sel2 = _make_lane_sse("sel", _nf4_value, 2)


@njit(inline="always")
def _fill_lanes(sc, g, m, ds):
    """ds[:32] = sc[g : g + 32] (the last candidate repeated past m); returns (k, rcp): how
    many are real, whether every real scale is in [_RCP_MIN, _RCP_MAX]."""
    k = min(_LANES, m - g)
    rcp = True
    for i in range(_LANES):
        d = sc[g + min(i, k - 1)]
        ds[i] = d
        rcp &= (d >= _RCP_MIN) & (d <= _RCP_MAX)
    return k, rcp


@njit(inline="always")
def _fp4_lanes(xb, sc, g, m, ds, errs):
    """errs[:k] = the squared errors of block xb at fp4_e2m1 scales sc[g : g + k] (k up to
    32, returned): one pass over the block."""
    k, rcp = _fill_lanes(sc, g, m, ds)
    if rcp and _LANE_FMA:
        if k <= _W:
            _e2m1_rcp1(xb, ds, errs)
        else:
            _e2m1_rcp2(xb, ds, errs)
    elif k <= _W:
        _e2m1_div1(xb, ds, errs)
    else:
        _e2m1_div2(xb, ds, errs)
    return k


@njit(inline="always")
def _nf4_lanes(xb, sc, g, m, ds, errs):
    """As `_fp4_lanes`, at nf4 scales."""
    k, rcp = _fill_lanes(sc, g, m, ds)
    inv_ok = rcp  # (in that range 1/s is finite; outside it, check each)
    if not rcp:
        inv_ok = True
        for i in range(k):
            inv_ok &= not np.isinf(_div32(_ONE, ds[i]))
    if inv_ok:
        if k <= _W:
            _nf4_mul1(xb, ds, errs)
        else:
            _nf4_mul2(xb, ds, errs)
    elif k <= _W:
        _nf4_sel1(xb, ds, errs)
    else:
        _nf4_sel2(xb, ds, errs)
    return k


@njit(inline="always")
def _best_fp4(xb, sc, m, ds, errs):
    """The first of the scales sc[:m] with the least squared error (fp4_e2m1)."""
    best, best_err = 0, np.inf
    for g in range(0, m, _LANES):
        k = _fp4_lanes(xb, sc, g, m, ds, errs)
        best, best_err = _fold_least(errs[:k], g, m, best, best_err)
    return sc[best]


@njit(inline="always")
def _best_nf4(xb, sc, m, ds, errs):
    """The first of the scales sc[:m] with the least squared error (nf4)."""
    best, best_err = 0, np.inf
    for g in range(0, m, _LANES):
        k = _nf4_lanes(xb, sc, g, m, ds, errs)
        best, best_err = _fold_least(errs[:k], g, m, best, best_err)
    return sc[best]


@njit(cache=True)
def fp4_candidate_errors(xb, sc):
    """The squared error (float64) of float32 block xb at each fp4_e2m1 scale of sc, as the
    search kernel scores it (for the tests: equal to `mse.squared_error`, bit for bit)."""
    m = sc.shape[0]
    out = np.empty(m)
    ds = np.empty(_LANES, np.float32)
    errs = np.empty(_LANES, np.float64)
    for g in range(0, m, _LANES):
        k = _fp4_lanes(xb, sc, g, m, ds, errs)
        out[g : g + k] = errs[:k]
    return out


@njit(cache=True)
def nf4_candidate_errors(xb, sc):
    """As `fp4_candidate_errors`, for nf4."""
    m = sc.shape[0]
    out = np.empty(m)
    ds = np.empty(_LANES, np.float32)
    errs = np.empty(_LANES, np.float64)
    for g in range(0, m, _LANES):
        k = _nf4_lanes(xb, sc, g, m, ds, errs)
        out[g : g + k] = errs[:k]
    return out


@njit(inline="always")
def _push(sc, m, v):
    """Append v to sc[:m] unless it equals the last one; the new m."""
    if m == 0 or sc[m - 1] != v:
        sc[m] = v
        return m + 1
    return m


@njit(parallel=True, nogil=True, cache=True)
def mse_codebook_kernel(x, packed, scales, ratios, bs, chunk, nf4):
    """x (rows, n) -> packed codes (rows, ceil(nb*bs/2)) and the searched scales (rows, nb)
    float32 of fp4_e2m1 (nf4 False) or nf4 (True); ratios: the search's float32 ratios in
    order."""
    rows, n = x.shape
    nb = scales.shape[1]
    nr = ratios.shape[0]
    nchunks = (nb + chunk - 1) // chunk
    vec = bs % _W == 0
    for item in prange(rows * nchunks):
        r, b0, b1 = _work_item(item, nchunks, chunk, nb)
        xr = x[r]
        pr = packed[r]
        sr = scales[r]
        sc = np.empty(nr, np.float32)
        ds = np.empty(_LANES, np.float32)
        errs = np.empty(_LANES, np.float64)
        _row_amax(xr, sr, b0, b1, bs, n)  # sr[b] = the block's amax (real elements only)
        for b in range(b0, b1):
            s0 = b * bs
            amax = sr[b]
            m = 0
            for k in range(nr):
                a = _mul32(amax, ratios[k])
                m = _push(sc, m, (_ONE if a == 0 else a) if nf4 else _fp4_scale(_bits(a)))
            if m == 1:
                sr[b] = sc[0]
                continue
            xb = xr[s0 : min(s0 + bs, n)]
            sr[b] = _best_nf4(xb, sc, m, ds, errs) if nf4 else _best_fp4(xb, sc, m, ds, errs)
        fast_end = max(b0, min(b1, n // bs)) if vec else b0
        if nf4:
            _nf4_codes(xr, pr, sr, b0, fast_end, bs, _ONE, (b1 - b0) * bs)
        else:
            _e2m1_codes_div(xr, pr, sr, b0, fast_end, bs, _ONE, (b1 - b0) * bs)
        low = np.int32(0)  # other block sizes and the padded last block: nibble by nibble
        for b in range(fast_end, b1):
            s0 = b * bs
            scale = sr[b]
            inv = _div32(_ONE, scale)
            big = np.isinf(inv)
            for j in range(bs):
                if s0 + j >= n:
                    c = _ZERO_CODE if nf4 else np.int32(0)
                elif not nf4:
                    c = _e2m1_div_any(_load(xr, s0 + j), scale)
                elif big:
                    c = _nf4_div(_load(xr, s0 + j), scale)
                else:
                    c = _nf4_mul(_load(xr, s0 + j), inv)
                low = _put_nibble(pr, s0 + j, c, low)
        _close_row(pr, b1 * bs, low)


def mse_codebook_rows(fmt_name, x2d, block_size, ratios, num_threads, kernels):
    """Run the search kernel for fp4_e2m1 / nf4 on (rows, n) `x2d` with the search's ratios (in
    order); a `kernels.QuantizedRows`."""
    if fmt_name not in ("fp4_e2m1", "nf4"):
        raise ValueError(f"no codebook search kernel for format {fmt_name!r}")
    xv, packed, scales, _, bs, chunk, ratios = rows_setup(x2d, block_size, ratios, kernels, False)
    if xv is None:
        return kernels.QuantizedRows(packed, scales, None)
    with kernels._launch(num_threads):
        mse_codebook_kernel(xv, packed, scales, ratios, bs, chunk, fmt_name == "nf4")
    return kernels.QuantizedRows(packed, scales, None)
