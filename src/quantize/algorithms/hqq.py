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
params included, so no block ends worse than `method="rtn"` in squared error; an iterate
replaces the best only if it is lower by more than float32 decoding's rounding could make it
(`_band`), so the stored tensor, dequantized in float64, is not worse either.

Arithmetic, fixed so that the compiled twin (`quantize.kernels.hqq`: int4, uint4, int8, uint8,
int4_affine, uint4_float_zp from float32 blocks) gives the same result bit for bit: every
per-block sum runs in order of the elements (`mse.block_sse`); the lp step (r, |r|^p, the
shrunk targets) is float32 and |r|^p is `lp_power`, a polynomial in float32 arithmetic and
exact bit operations (relative error < 1e-6 near 1), not libm's or NumPy's pow, whose last ulp
differs between NumPy (SVML on AVX-512) and LLVM; |r|^(p-1) / beta is |r|^p / (|r| beta). Sums
are float64 over products of two float32 values (exact), and the zero point's least squares use
the moments of the codes (exact: they are small integers). The kernel runs for those formats
from float32 blocks of at least `kernels.MIN_KERNEL_ELEMENTS` elements (not with
QUANTIZE_KERNELS=0); `quantize_rows` is the fused path (int4, uint4) that the core takes.
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
from .mse import block_sse

_CHUNK_ELEMENTS = 1 << 19
#: formats with a compiled solver (`kernels.hqq.hqq_solve`), from float32 blocks
SOLVER_FORMATS = ("int4", "uint4", "int8", "uint8", "int4_affine", "uint4_float_zp")
# lp_power (float32): arguments outside [_TINY, _HUGE] give 0 / inf, so 2^k stays normal
_F = np.float32
_TINY = _F(2.0**-100)
_HUGE = _F(2.0**100)
_ZERO, _HALF, _ONE = _F(0.0), _F(0.5), _F(1.0)
_SQRT2 = _F(1.4142135623730951)
_LN2 = _F(0.6931471805599453)
_INV_LN2 = _F(1.4426950408889634)
_MANT = 0x007FFFFF
_ONE_BITS = 0x3F800000
# ln(m) = 2 atanh(s) series and exp(f) Taylor coefficients
_L1, _L3, _L5, _L7 = _F(2.0), _F(2.0 / 3.0), _F(2.0 / 5.0), _F(2.0 / 7.0)
_E2, _E3, _E4 = _F(1.0 / 2.0), _F(1.0 / 6.0), _F(1.0 / 24.0)
_E5, _E6, _E7 = _F(1.0 / 120.0), _F(1.0 / 720.0), _F(1.0 / 5040.0)
_E4M3_MIN = np.float32(2.0**-9)  # the smallest positive E4M3 value
_E4M3_MAX = np.float32(448.0)


def lp_power(a: np.ndarray, p: float) -> np.ndarray:
    """a^p in float32 for a >= 0: 0 below 2^-100, inf above 2^100 (and for NaN); relative error
    < 1e-6 for a in [2^-10, 2^10], < 2e-5 beyond (float32 p ln a rounds).

    exp(p ln a) from a's exponent and mantissa m in [sqrt(1/2), sqrt(2)] (exact bit operations),
    ln m by four terms of 2 atanh((m-1)/(m+1)), exp by eight Taylor terms after taking out a
    power of two; only float32 +, -, *, / and rint, so the kernel computes the same bits.
    """
    a = np.asarray(a, np.float32)
    p = _F(p)
    ok = (a >= _TINY) & (a <= _HUGE)
    b = np.where(ok, a, _ONE).view(np.int32)
    e = (b >> 23) - 127
    m = ((b & _MANT) | _ONE_BITS).view(np.float32)
    big = m > _SQRT2
    m = np.where(big, m * _HALF, m)
    e = np.where(big, e + 1, e)
    s = (m - _ONE) / (m + _ONE)
    s2 = s * s
    lnm = s * (_L1 + s2 * (_L3 + s2 * (_L5 + s2 * _L7)))
    y = p * (e.astype(np.float32) * _LN2 + lnm)
    k = np.rint(y * _INV_LN2)
    f = y - k * _LN2
    ef = _ONE + f * (_ONE + f * (_E2 + f * (_E3 + f * (_E4 + f * (_E5 + f * (_E6 + f * _E7))))))
    pw = ef * ((k.astype(np.int32) + 127) << 23).view(np.float32)
    return np.where(ok, pw, np.where(a <= _HUGE, _ZERO, _F(np.inf)))


def _shrink(r: np.ndarray, a: np.ndarray, pw: np.ndarray, beta) -> np.ndarray:
    """shrink_lp of float32 r, given a = |r|, pw = lp_power(a, p) and beta (float32)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = np.where(a >= _TINY, a - pw / (a * beta), _ZERO)
    sh = np.where(t > _ZERO, t, _ZERO)  # NaN -> 0
    return np.where(r > _ZERO, sh, np.where(r < _ZERO, -sh, _ZERO))


def shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """HQQ's generalised soft threshold, in float32: sign(x) * max(|x| - |x|^(p-1) / beta, 0)
    (0 at 0), |x|^(p-1) / beta computed as lp_power(|x|, p) / (|x| beta) (0 below 2^-100)."""
    x = np.asarray(x, np.float32)
    a = np.abs(x)
    return _shrink(x, a, lp_power(a, p), _F(beta))


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
        if solver_applies(fmt, blocks, tensor_scale):
            return self._solve_compiled(fmt, blocks, scale, zp, last_valid)
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

    def _kernel_args(self) -> tuple:
        return (self.iterations, self.p, self.beta, self.kappa, self.update_scale)

    def _solve_compiled(self, fmt, blocks, scale, zp, last_valid, num_threads=None):
        """`choose_params`' result by the numba solver (`solver_applies` said it may)."""
        from .. import kernels
        from ..kernels import hqq as khqq

        lead, (nb, bs) = blocks.shape[:-2], blocks.shape[-2:]
        x = np.ascontiguousarray(blocks).reshape(-1, nb * bs)
        if not x.flags.writeable:  # one compiled signature (numba types read-only apart)
            x = x.copy()
        n = nb * bs - (bs - last_valid if last_valid is not None and last_valid < bs else 0)
        s = np.array(scale, np.float32).reshape(-1, nb)
        z = np.zeros(s.shape, np.float32) if zp is None else zp.reshape(-1, nb).astype(np.float32)
        per_item = _blocks_per_item(s.size)
        with kernels._launch(num_threads):
            khqq.hqq_solve(
                x, n, bs, s, z, zp is not None, fmt.zero_point == "float", fmt.code_min,
                fmt.code_max, *self._kernel_args(), per_item,
            )  # fmt: skip
        zout = None if zp is None else z.astype(zp.dtype).reshape(*lead, nb)
        return s.reshape(*lead, nb), zout

    #: formats with a fused compiled quantize+pack (`quantize_rows`), which the core uses
    kernel_formats = ("int4", "uint4")

    def quantize_rows(
        self,
        fmt_name: str,
        x2d: np.ndarray,
        block_size: int,
        clip_ratio: float = 1.0,
        *,
        num_threads: int | None = None,
    ):
        """Round to nearest's params, HQQ and quantize+pack, compiled (int4, uint4): (packed,
        scales, zero points) of each row of `x2d` (float32, float16 or bfloat16), bit for bit
        `quantize_tensor(x2d, fmt_name, block_size, clip_ratio=clip_ratio, method=self)`'s NumPy
        path."""
        from .. import kernels
        from ..formats import get_format
        from ..kernels import hqq as khqq

        if fmt_name not in self.kernel_formats:
            raise ValueError(
                f"no hqq kernel for format {fmt_name!r}; kernels: {self.kernel_formats}"
            )
        x = np.asarray(x2d)
        if x.ndim != 2:
            raise ValueError(f"x2d must be 2-D (rows, n), got shape {x.shape}")
        if x.dtype not in kernels.QUANTIZE_DTYPES:
            raise TypeError(f"no kernel for {x.dtype} input; supported: float32, float16, bfloat16")
        x = np.ascontiguousarray(x, np.float32)  # exact for float16/bfloat16
        if not x.flags.writeable:  # one compiled signature (numba types read-only apart)
            x = x.copy()
        rows, n = x.shape
        if n == 0:
            raise ValueError("x2d has rows of length 0; there is nothing to quantize")
        bs = kernels._check_block(block_size, n)
        nb = -(-n // bs)
        signed = fmt_name == "int4"
        fmt = get_format(fmt_name)
        packed = np.empty((rows, -(-nb * bs // 2)), np.uint8)
        s = np.empty((rows, nb), np.float32)
        z = np.zeros((rows, nb), np.float32)
        if rows:
            ratios = np.array([clip_ratio], np.float32)
            with kernels._launch(num_threads):
                khqq.rtn_int4(x, bs, s, z, ratios, signed)
                if self.iterations:
                    khqq.hqq_solve(
                        x, n, bs, s, z, not signed, False, fmt.code_min, fmt.code_max,
                        *self._kernel_args(), _blocks_per_item(s.size),
                    )  # fmt: skip
                zu = z.astype(np.uint8)
                khqq.pack_int4(x, packed, s, zu, bs, kernels._chunk(rows, nb, bs), signed)
        else:
            zu = z.astype(np.uint8)
        return kernels.QuantizedRows(packed, s, None if signed else zu)

    def _solve(self, fmt: Format, x, s, z, ts, w, last_valid):
        kind = _kind(fmt)
        best_s, best_z = s.copy(), None if z is None else z.copy()
        best, best_abs = _errors(fmt, x, s, z, ts, last_valid)
        wsum = w.sum(axis=-1)
        amax = np.abs(x).max(axis=-1).astype(np.float64)  # padding repeats a real value
        active = np.ones(s.shape, bool)
        prev_obj = np.full(s.shape, np.inf)
        beta = self.beta
        ones = np.ones((), s.dtype)
        for _ in range(self.iterations):
            eff = effective_scale(s, ts)
            e64 = eff.astype(np.float64)[..., None]
            # the lp step in float32 (the kernel's SIMD width doubles), in units of the step
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                codes = fmt.encode(x, eff, z)
                g = fmt.decode(codes, np.broadcast_to(ones, s.shape), z).astype(np.float32)
                u = (x * (ones / eff)[..., None]).astype(np.float32)
            with np.errstate(invalid="ignore", over="ignore"):  # inf |r| (huge blocks): inf
                r = u - g
                ar = np.abs(r)
                pw = lp_power(ar, self.p)
                obj = block_sse(pw.astype(np.float64) * w)
            active &= np.isfinite(obj) & (obj < prev_obj)
            if not active.any():
                break
            prev_obj = np.where(active, obj, prev_obj)
            # what the dequantized block should reproduce; sums of products of two float32
            # values in float64 (exact products), in order
            t = (u - _shrink(r, ar, pw, np.float32(beta))).astype(np.float64)
            beta *= self.kappa
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                if kind == "zero":
                    a, znew = self._zero_step(fmt, codes, g, t, w, wsum, z)
                else:
                    g = g.astype(np.float64)
                    a = block_sse(t * g * w) / block_sse(g * g * w)
                    znew = z
                a = np.where(np.isfinite(a) & (a > 0), a, 1.0)
                snew = _project(fmt, (e64[..., 0] * a), s, ts)
            snew = np.where(active, snew, s).astype(s.dtype)
            if z is not None:
                znew = np.where(active, znew, z).astype(z.dtype)
            err, err_abs = _errors(fmt, x, snew, znew, ts, last_valid)
            band = _band(amax, err, err_abs, wsum) + _band(amax, best, best_abs, wsum)
            with np.errstate(invalid="ignore"):  # inf - inf (an overflowed error): not better,
                better = err < best - band  # as the compiled solver decides it too
            best = np.where(better, err, best)
            best_abs = np.where(better, err_abs, best_abs)
            best_s = np.where(better, snew, best_s).astype(s.dtype)
            if z is not None:
                best_z = np.where(better, znew, best_z).astype(z.dtype)
            s, z = snew, znew
        return best_s, best_z

    def _zero_step(self, fmt, codes, g, t, w, wsum, z):
        """Scale factor a and zero point for t ~ a * (q - z'), q the codes (float and int zp).

        Least squares from the moments of q and t (sums in order): the codes are small
        integers, so sum q w and sum q^2 w are exact and, for an integer zero point c,
        sum (q - c)^2 w = sum q^2 w - 2 c sum q w + c^2 sum w is too."""
        q = codes.astype(np.float64)
        zf = z.astype(np.float64)
        sq, sq2 = block_sse(q * w), block_sse(q * q * w)
        st, sqt = block_sse(t * w), block_sse(q * t * w)
        mq = sq / wsum
        mt = st / wsum
        if self.update_scale:
            var = sq2 - mq * sq
            a = (sqt - mq * st) / var
            a = np.where((var > 0) & np.isfinite(a) & (a > 0), a, 1.0)
        else:
            a = np.ones_like(mq)
        znew = mq - mt / a  # mean of q - t / a: HQQ's zero update at the refitted scale
        if fmt.zero_point == "int":
            znew = np.clip(np.rint(znew), fmt.code_min, fmt.code_max)
            if self.update_scale:  # the scale that best fits the rounded zero point
                a2 = (sqt - znew * st) / (sq2 - 2.0 * znew * sq + znew * znew * wsum)
                a = np.where(np.isfinite(a2) & (a2 > 0), a2, 1.0)
        znew = np.where(np.isfinite(znew), znew, zf)
        return a, znew


def solver_applies(fmt: Format, blocks: np.ndarray, tensor_scale=None) -> bool:
    """Does the compiled solver take these blocks? A registered SOLVER_FORMATS format, float32
    blocks of at least `kernels.MIN_KERNEL_ELEMENTS` elements, numba installed and
    QUANTIZE_KERNELS not "0"."""
    import os

    from .. import kernels
    from ..formats import available_formats, get_format

    name = getattr(fmt, "name", None)
    return (
        name in SOLVER_FORMATS
        and name in available_formats()
        and get_format(name) is fmt
        and tensor_scale is None
        and blocks.dtype == np.float32
        and blocks.ndim >= 2
        and blocks.size >= kernels.MIN_KERNEL_ELEMENTS
        and os.environ.get(kernels.ENV_SWITCH, "1") != "0"
        and kernels._numba_installed()
    )


def _blocks_per_item(n_blocks: int) -> int:
    """Blocks per parallel work item of the solver: 64 to 512 (its 32 lanes refill from them;
    more blocks, less idling at the item's end), about 64 items or more when there are enough
    blocks (both threads busy to the end)."""
    return max(64, min(512, n_blocks // 64))


def _errors(fmt, x, s, z, ts, last_valid):
    """Per block: the squared error (`mse.squared_error`, the same operations) and the sum of
    the absolute errors, both in order."""
    eff = effective_scale(s, ts)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        codes = fmt.encode(x, eff, z)
        d = fmt.decode(codes, eff, z).astype(np.float64) - x.astype(np.float64)
    if last_valid is not None and last_valid < x.shape[-1]:
        d[..., -1, last_valid:] = 0.0
    return block_sse(d * d), block_sse(np.abs(d))


def _band(amax, err, err_abs, count):
    """How far rounding can move a block's squared error: 2^-22 (amax sum|e| + sum e^2) +
    2^-46 (count amax^2 + sum e^2).

    `_errors` decodes in float32, QuantizedTensor.dequantize(np.float64) exactly; per element
    the decoded value moves by at most 2^-24 (amax + |e|), its squared error by at most half
    of the terms here. An iterate replaces the best only if it is lower by more than both
    bands, so the stored tensor is not worse than round to nearest's in float64 either.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return (amax * err_abs + err) * 2.0**-22 + (count * (amax * amax) + err) * 2.0**-46


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

__all__ = ["HQQ", "SOLVER_FORMATS", "HalfQuadratic", "lp_power", "shrink_lp", "solver_applies"]
