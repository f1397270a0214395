"""OCP Microscaling (MX) shared scales: E8M0, a bare power of two 2^e with e in [-127, 127].

E8M0 stores e + 127 in one byte; 255 is NaN, so the largest exponent is 127 (OCP MX v1.0,
E8M0 scale type). This module holds only the exponent rule, shared by the MX formats (fp4.py) and
`quant_utils.compute_e8m0`; it imports nothing from the package.
"""

from __future__ import annotations

import numpy as np

E8M0_BIAS = 127
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127


def _floor_log2(x: np.ndarray) -> np.ndarray:
    """floor(log2(x)) exactly, for float64 x > 0 (x = m * 2^e with m in [0.5, 1))."""
    _, e = np.frexp(x)
    return e.astype(np.int64) - 1


def e8m0_exponent(
    amax: np.ndarray, elem_max: float, rule: str = "floor", *, saturate: bool = True
) -> np.ndarray:
    """Shared exponents (int64, amax's shape) for blocks with absolute maximum `amax` >= 0.

    rule="floor": floor(log2(amax)) - floor(log2(elem_max)), the OCP MX v1.0 conversion rule
        (emax_elem = 2 for FP4 E2M1, 8 for FP8 E4M3): the block's largest power of two lands on
        the element format's largest power of two, and elements up to just under
        2 * 2^emax_elem * 2^e may exceed elem_max * 2^e and clip (for E2M1: (6, 8) -> 6).
    rule="ceil": the smallest e with amax <= elem_max * 2^e, i.e. ceil(log2(amax / elem_max))
        computed exactly (no float log2): nothing clips. ModelOpt's compute_e8m0 rule.

    amax == 0 gives -127 (E8M0 code 0), as does any exponent below -127 (the elements then
    underflow towards 0). Above 127: 127 if `saturate` (the elements clip), else ValueError.
    NaN/negative amax are the caller's to reject.
    """
    a = np.asarray(amax, dtype=np.float64)
    emax = float(elem_max)
    if not (np.isfinite(emax) and emax > 0):
        raise ValueError(f"elem_max must be a finite number > 0, got {elem_max!r}")
    pos = a > 0
    safe = np.where(pos, a, 1.0)
    if rule == "floor":
        e = _floor_log2(safe) - int(_floor_log2(np.float64(emax)))
    elif rule == "ceil":
        # amax / elem_max lies in (2^(d-1), 2^(d+1)) for d = floor(log2(amax)) -
        # floor(log2(elem_max)), so the answer is d or d + 1; ldexp is exact (where it neither
        # overflows nor underflows, and there the result is clamped anyway).
        e = _floor_log2(safe) - int(_floor_log2(np.float64(emax)))
        e = np.where(safe > np.ldexp(emax, e.astype(np.int32)), e + 1, e)
    else:
        raise ValueError(f"rule must be 'floor' or 'ceil', got {rule!r}")
    e = np.where(pos, e, E8M0_MIN_EXP)
    e = np.maximum(e, E8M0_MIN_EXP)
    if (e > E8M0_MAX_EXP).any():
        if not saturate:
            raise ValueError(
                f"amax too large for an E8M0 scale (max exponent {E8M0_MAX_EXP}): {a.max()}"
            )
        e = np.minimum(e, E8M0_MAX_EXP)
    return e.astype(np.int64)


def e8m0_scale(exponent: np.ndarray, dtype=np.float32) -> np.ndarray:
    """2^exponent in `dtype` (exact: 2^-127 is a float32 subnormal, 2^127 a normal)."""
    return np.ldexp(np.ones((), dtype), np.asarray(exponent, np.int32)).astype(dtype)
