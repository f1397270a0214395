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
as nvfp4's scorer): 16 candidates per pass over the block, each lane's sum in order, no lane
extracts. fp4_e2m1's quotient x / s is taken by the corrected reciprocal, which gives the
encoder's codes for s in [_RCP_MIN, _RCP_MAX]; other scales, or no FMA, divide. A pass after
the first is skipped when none of its scales can win: each clips the block's largest element
to at most top * s, which alone costs more than the best error so far (`clip_bound`); the
default grid's last 5 scales (ratios 0.6 .. 0.5) are then never scored at block 32 on normal
or student-t(4) weights, and in 38-99% of blocks at block 128.

Measured (2026-11-23, a 2-vCPU Intel Xeon with AVX-512), 1024x4096 normal float32, one thread,
CPU ms of the whole search, blocks 16 / 32 / 128 (rtn's kernel 1.5-2.4): fp4_e2m1 113 / 63 /
49 with the 21 scales in one pass of two vectors, 58 / 41 / 43 with passes of 16 and the skip;
nf4 92 / 74 / 62 -> 61 / 46 / 39. E2M1 rounding with the FPU (`search_e2m1._e2m1_round_vec`)
instead of from the bits took 4096x4096 from 268 / 215 to 253 / 194 ms (blocks 32 / 128). A
vector of 16 candidates costs about 5 ns per element (about 24 512-bit operations: the
quotient, the rounding, 9 for the float64 error); the per-block work (21 scales, lanes, fold)
about 3 ns per element at block 32. The NumPy path was 790-2300x rtn's kernel.
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
from .search_e2m1 import _LANE_FMA, _e2m1_round_vec, _fold_least, _make_lane_sse, _push

_ONE = np.float32(1.0)
_ZERO_CODE = np.int32(7)  # nf4's code of 0 (the padding)
#: candidates scored per pass over a block (one vector of lanes)
_LANES = _W


def _nf4_value(builder, q):
    """<16 x float> quotients -> their NF4 codebook values (midpoints, ties to the lower code)."""
    return _nf4_value_vec(builder, _nf4_code_vec(builder, q))


_lanes_e2m1_rcp = _make_lane_sse("rcp", _e2m1_round_vec)
_lanes_e2m1_div = _make_lane_sse("div", _e2m1_round_vec)
_lanes_nf4_mul = _make_lane_sse("mul", _nf4_value)
_lanes_nf4_sel = _make_lane_sse("sel", _nf4_value)


@njit(inline="always")
def _fill_lanes(sc, g, m, ds):
    """ds[:16] = sc[g : g + 16] (the last candidate repeated past m); returns (k, rcp): how
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
    16, returned): one pass over the block."""
    k, rcp = _fill_lanes(sc, g, m, ds)
    if rcp and _LANE_FMA:
        _lanes_e2m1_rcp(xb, ds, errs)
    else:
        _lanes_e2m1_div(xb, ds, errs)
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
        _lanes_nf4_mul(xb, ds, errs)
    else:
        _lanes_nf4_sel(xb, ds, errs)
    return k


@njit(cache=True)
def clip_bound(amax, top, s):
    """A lower bound on the squared error (as `mse.squared_error` computes it) of a block whose
    largest magnitude is amax (float32) at scale s (float32), for a format whose largest decoded
    magnitude is top * s (fp4_e2m1: 6, as fl32(6 s); nf4: 1): that element's term alone is at
    least (amax - top s)^2, and the in-order float64 sum of terms >= 0 is at least any term.
    Margins (1 + 2^-23 on top * s, 1 - 2^-40 on the square) cover every rounding between."""
    t = np.float64(amax) - top * np.float64(s) * (1.0 + 2.0**-23)
    return t * t * (1.0 - 2.0**-40) if t > 0.0 else 0.0


@njit(inline="always")
def _all_worse(amax, top, sc, g, m, best_err):
    """True if none of the scales sc[g:m] can beat `best_err` (`clip_bound`). The smallest
    scales of the grid (ratios near 0.5) clip the block's largest element the most: on normal
    and student-t(4) weights their pass was never needed at block 32 and in 38-99% of blocks
    at block 128 (it is skipped then)."""
    for i in range(g, m):  # noqa: SIM110 (numba compiles no all() over a generator)
        if not clip_bound(amax, top, sc[i]) >= best_err:
            return False
    return True


@njit(inline="always")
def _best_scale(xb, sc, m, ds, errs, amax, nf4):
    """The first of the scales sc[:m] with the least squared error (nf4 or fp4_e2m1), 16 a
    pass; a pass is skipped when `_all_worse` proves none of its scales can win."""
    best, best_err = 0, np.inf
    for g in range(0, m, _LANES):
        if g > 0 and _all_worse(amax, 1.0 if nf4 else 6.0, sc, g, m, best_err):
            break
        k = _nf4_lanes(xb, sc, g, m, ds, errs) if nf4 else _fp4_lanes(xb, sc, g, m, ds, errs)
        best, best_err = _fold_least(errs[:k], g, m, best, best_err)
    return sc[best]


@njit(cache=True)
def candidate_errors(xb, sc, nf4):
    """The squared error (float64) of float32 block xb at each scale of sc, fp4_e2m1's (nf4
    False) or nf4's, as the search kernel scores it (for the tests: equal to
    `mse.squared_error`, bit for bit)."""
    m = sc.shape[0]
    out = np.empty(m)
    ds = np.empty(_LANES, np.float32)
    errs = np.empty(_LANES, np.float64)
    for g in range(0, m, _LANES):
        k = _nf4_lanes(xb, sc, g, m, ds, errs) if nf4 else _fp4_lanes(xb, sc, g, m, ds, errs)
        out[g : g + k] = errs[:k]
    return out


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
            sr[b] = _best_scale(xr[s0 : min(s0 + bs, n)], sc, m, ds, errs, amax, nf4)
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
