"""Error figures of a reconstruction in two passes over memory (numba), for the report.

`moments` gives per-chunk sums (x, x², e², with e = r - x) and maxima (|x|, |e|) in float64;
`spread` gives per-chunk sums of (x - mean)² and the error histogram, binned exactly as
`np.histogram(e, bins, range=(-emax, emax))` bins (same edges, same edge rule). Chunks are
fixed-size and summed in order by the caller, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: elements per partial sum
CHUNK = 1 << 14
#: reassociation lets LLVM vectorise the sums and maxima (the order within a chunk changes the
#: last bits of a float64 sum, far below the report's precision); no "nnan"/"ninf": the inputs
#: are finite, but the flags must not license assuming it
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(parallel=True, cache=True, fastmath=_FAST)
def moments(x, r):
    """(nc, 5) float64 per chunk of CHUNK: sum x, sum x², sum e², max |x|, max |e|."""
    n = x.shape[0]
    nc = (n + CHUNK - 1) // CHUNK
    out = np.zeros((nc, 5))
    for c in prange(nc):
        s = c * CHUNK
        e = min(n, s + CHUNK)
        sx = 0.0
        sxx = 0.0
        see = 0.0
        amax = 0.0
        emax = 0.0
        for i in range(s, e):
            xv = np.float64(x[i])
            ev = np.float64(r[i]) - xv
            sx += xv
            sxx += xv * xv
            see += ev * ev
            amax = max(amax, abs(xv))
            emax = max(emax, abs(ev))
        out[c, 0] = sx
        out[c, 1] = sxx
        out[c, 2] = see
        out[c, 3] = amax
        out[c, 4] = emax
    return out


@njit(parallel=True, cache=True)
def spread(x, r, mean, edges):
    """(per-chunk sum of (x - mean)², per-chunk counts of e in the bins `edges` delimit).

    `edges` are np.histogram's (np.linspace(-emax, emax, bins + 1)); a value's bin is found as
    NumPy finds it: by the scaled offset, then corrected against the edges themselves.
    """
    n = x.shape[0]
    nc = (n + CHUNK - 1) // CHUNK
    bins = edges.shape[0] - 1
    first = edges[0]
    denom = edges[bins] - first
    dd = np.zeros(nc)
    counts = np.zeros((nc, bins), np.int64)
    for c in prange(nc):
        s = c * CHUNK
        e = min(n, s + CHUNK)
        acc = 0.0
        for i in range(s, e):
            xv = np.float64(x[i])
            d = xv - mean
            acc += d * d
            ev = np.float64(r[i]) - xv
            k = int(((ev - first) / denom) * bins)
            k = min(max(k, 0), bins - 1)
            if ev < edges[k]:
                k -= 1
            elif k != bins - 1 and ev >= edges[k + 1]:
                k += 1
            counts[c, k] += 1
        dd[c] = acc
    return dd, counts
