"""HQQ: half-quadratic optimisation of each block's zero point and scale, no data needed.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023): minimise
the lp norm (p < 1) of the quantization error, which favours a few large errors over many mid
sized ones, by splitting it with an auxiliary error W_e and alternating two easy steps:

    W_e  <- shrink_lp(W - dq(q(W)), beta)   shrink_lp(x) = sign(x) max(|x| - |x|^(p-1)/beta, 0)
    z    <- mean(q - (W - W_e) / s)          (the zero point that reproduces W - W_e best)
    beta <- kappa * beta

Here errors are measured in units of the block's step (W / s), so beta means the same for
weights of any magnitude: errors below beta^(-1/(2-p)) steps (0.17 for the defaults) shrink to 0.

Per format family:
* float zero points (uint4_float_zp, int4_affine): the paper's zero update; with
  update_scale (default) the zero point and scale are refitted together, a least-squares line
  through (q, (W - W_e) / s), the two-parameter form of the same step.
* integer zero points (uint4, uint8): the same update, the zero point then rounded and clipped
  to the code range (so 0 stays exactly representable), the scale refitted for it.
* no zero point (int4, int8, int4_ort, nf4, fp4_e2m1, mxfp4, mxfp4_ceil, nvfp4): the scale-only
  analogue, s <- <W - W_e, g> / <g, g> with g the decoded codes at unit scale, then projected to a
  scale the format stores (nearest power of two for E8M0, nearest E4M3 block scale for NVFP4).

A block stops early once its lp objective stops decreasing. The answer per block is the iterate
with the least squared error (the objective reported and guaranteed: sum over the block's real
elements of (decode(encode(x)) - x)^2, as `mse.squared_error` computes it), round to nearest's
params included, so no block ends worse than `method="rtn"` in squared error.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..formats import Format
from ..formats.base import effective_scale
from ..formats.fp4 import MXFP4
from ..formats.integer import AffineIntFloatZero, AffineUInt, OrtInt4
from ..formats.mx import E8M0_MAX_EXP, E8M0_MIN_EXP, e8m0_scale
from ..formats.nvfp4 import NVFP4, _e4m3
from . import register_method
from .mse import squared_error

_CHUNK_ELEMENTS = 1 << 19
_E4M3_MIN = np.float32(2.0**-9)  # the smallest positive E4M3 value
_E4M3_MAX = np.float32(448.0)


def shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """HQQ's generalised soft threshold: sign(x) * max(|x| - |x|^(p-1) / beta, 0) (0 at 0)."""
    a = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = a - np.power(a, p - 1.0) / beta
    return np.sign(x) * np.maximum(np.nan_to_num(t, nan=0.0, neginf=0.0), 0.0)


def _num(name: str, value, lo: float, hi: float, lo_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not (np.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return v


class HalfQuadratic:
    """HQQ's half-quadratic solver per block (zero point and scale), kept only where it helps.

    iterations: at most this many updates (>= 0; 0 is round to nearest); p: the lp norm's
    exponent, in (0, 1]; beta: the initial penalty weight (> 0, in step units), multiplied by
    kappa (>= 1) each iteration; update_scale: refit the scale with the zero point. Checked
    here (ValueError/TypeError naming them).
    """

    name = "hqq"
    description = "half-quadratic (HQQ) zero point / scale optimisation, lp loss, p < 1"
    masks_padding = True

    def __init__(
        self,
        iterations: int = 20,
        p: float = 0.7,
        beta: float = 10.0,
        kappa: float = 1.01,
        update_scale: bool = True,
    ):
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
            raise TypeError(f"iterations must be an integer >= 0, got {iterations!r}")
        if iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
        self.iterations = int(iterations)
        self.p = _num("p", p, 0.0, 1.0)
        self.beta = _num("beta", beta, 0.0, np.inf)
        self.kappa = _num("kappa", kappa, 1.0, np.inf, lo_open=False)
        if not isinstance(update_scale, bool):
            raise TypeError(f"update_scale must be a bool, got {update_scale!r}")
        self.update_scale = update_scale

    def choose_params(self, fmt, blocks, tensor_scale, clip_ratio=1.0, *, last_valid=None):
        """(scale, zero point) per block: the best HQQ iterate by squared error, rtn's included."""
        scale, zp = fmt.choose_params(blocks, clip_ratio)
        if self.iterations == 0:
            return scale, zp
        lead, (nb, bs) = blocks.shape[:-2], blocks.shape[-2:]
        flat = blocks.reshape(-1, nb, bs)
        fs = scale.reshape(-1, nb).copy()
        fz = None if zp is None else zp.reshape(-1, nb).copy()
        w = np.ones((nb, bs))
        if last_valid is not None and last_valid < bs:
            w[-1, last_valid:] = 0.0
        step = max(1, _CHUNK_ELEMENTS // max(1, nb * bs))
        for r0 in range(0, flat.shape[0], step):
            sl = slice(r0, r0 + step)
            s, z = self._solve(
                fmt, flat[sl], fs[sl], None if fz is None else fz[sl], tensor_scale, w, last_valid
            )
            fs[sl] = s
            if fz is not None:
                fz[sl] = z
        return fs.reshape(*lead, nb), None if fz is None else fz.reshape(*lead, nb)

    def _solve(self, fmt: Format, x, s, z, ts, w, last_valid):
        kind = _kind(fmt)
        best_s, best_z = s.copy(), None if z is None else z.copy()
        best = squared_error(fmt, x, s, z, ts, last_valid)
        x64 = x.astype(np.float64)
        wsum = w.sum(axis=-1)
        active = np.ones(s.shape, bool)
        prev_obj = np.full(s.shape, np.inf)
        beta = self.beta
        ones = np.ones((), s.dtype)
        for _ in range(self.iterations):
            eff = effective_scale(s, ts)
            e64 = eff.astype(np.float64)[..., None]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                codes = fmt.encode(x, eff, z)
                g = fmt.decode(codes, np.broadcast_to(ones, s.shape), z).astype(np.float64)
                u = x64 / e64
            r = u - g
            obj = (np.power(np.abs(r), self.p) * w).sum(axis=-1)
            active &= np.isfinite(obj) & (obj < prev_obj)
            if not active.any():
                break
            prev_obj = np.where(active, obj, prev_obj)
            t = u - shrink_lp(r, beta, self.p)  # what the dequantized block should reproduce
            beta *= self.kappa
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                if kind == "zero":
                    a, znew = self._zero_step(fmt, codes, g, t, w, wsum, z)
                else:
                    a = (t * g * w).sum(axis=-1) / (g * g * w).sum(axis=-1)
                    znew = z
                a = np.where(np.isfinite(a) & (a > 0), a, 1.0)
                snew = _project(fmt, (e64[..., 0] * a), s, ts)
            snew = np.where(active, snew, s).astype(s.dtype)
            if z is not None:
                znew = np.where(active, znew, z).astype(z.dtype)
            err = squared_error(fmt, x, snew, znew, ts, last_valid)
            better = err < best
            best = np.where(better, err, best)
            best_s = np.where(better, snew, best_s).astype(s.dtype)
            if z is not None:
                best_z = np.where(better, znew, best_z).astype(z.dtype)
            s, z = snew, znew
        return best_s, best_z

    def _zero_step(self, fmt, codes, g, t, w, wsum, z):
        """Scale factor a and zero point for t ~ a * (q - z'), q the codes (float and int zp)."""
        q = codes.astype(np.float64)
        zf = z.astype(np.float64)
        mq = (q * w).sum(axis=-1) / wsum
        mt = (t * w).sum(axis=-1) / wsum
        if self.update_scale:
            dq = (q - mq[..., None]) * w
            var = (dq * dq).sum(axis=-1)
            a = (dq * t).sum(axis=-1) / var
            a = np.where((var > 0) & np.isfinite(a) & (a > 0), a, 1.0)
        else:
            a = np.ones_like(mq)
        znew = mq - mt / a  # mean of q - t / a: HQQ's zero update at the refitted scale
        if fmt.zero_point == "int":
            znew = np.clip(np.rint(znew), fmt.code_min, fmt.code_max)
            if self.update_scale:  # the scale that best fits the rounded zero point
                d = (q - znew[..., None]) * w
                a2 = (d * t).sum(axis=-1) / (d * d).sum(axis=-1)
                a = np.where(np.isfinite(a2) & (a2 > 0), a2, 1.0)
        znew = np.where(np.isfinite(znew), znew, zf)
        return a, znew


def _kind(fmt: Format) -> str:
    """ "zero" for formats whose zero point the solver moves, else "scale"."""
    if isinstance(fmt, OrtInt4):  # its zero point only carries the extreme's sign
        return "scale"
    if isinstance(fmt, (AffineIntFloatZero, AffineUInt)) or fmt.zero_point in ("float", "int"):
        return "zero"
    return "scale"


def _project(fmt: Format, eff_new: np.ndarray, old: np.ndarray, ts) -> np.ndarray:
    """The stored block scale nearest the effective scale `eff_new` that the format can hold;
    `old` where there is none (not finite, not > 0)."""
    dt = old.dtype
    ok = np.isfinite(eff_new) & (eff_new > 0)
    safe = np.where(ok, eff_new, 1.0)
    if isinstance(fmt, MXFP4):
        e = np.clip(np.rint(np.log2(safe)), E8M0_MIN_EXP, E8M0_MAX_EXP)
        out = e8m0_scale(e.astype(np.int64), dt)
    elif isinstance(fmt, NVFP4):
        raw = np.clip(safe / float(ts), _E4M3_MIN, _E4M3_MAX).astype(np.float32)
        out = _e4m3(raw).astype(dt)
    else:
        with np.errstate(over="ignore", under="ignore"):
            out = safe.astype(dt)
        ok &= np.isfinite(out) & (out > 0)
    return np.where(ok, out, old).astype(dt)


HQQ = register_method(HalfQuadratic())

__all__ = ["HQQ", "HalfQuadratic", "shrink_lp"]
