"""AWQ: scale a MatMul weight's input rows by activation magnitude before quantizing it.

Activation-aware weight quantization (Lin et al., 2023): inputs with large activations matter
more, so their weight rows are multiplied by s > 0 before rounding (a larger share of the grid)
and the layer input is divided by s, which leaves the float product unchanged:

    (x / s) @ (diag(s) W) == x @ W

`awq_search` picks s = mean|x|^alpha / m_w^beta (normalised so sqrt(max(s) * min(s)) = 1),
minimising the calibration output error ||x W - (x / s) @ dq(Q(diag(s) W))||^2 over a grid:
alpha = i/grid in [0, 1] with beta = 0 (the paper's activation-only family), and alpha on every
second of those points for each beta in `WEIGHT_POWERS` (0.25 .. 1). m_w is the weight's own
size per input row: the mean over output columns of |w| / (its block's max |w|), the weight
factor of AutoAWQ's "duo scaling" (there tied as beta = 1 - alpha; here a 2-D grid). Rows whose
weights are small relative to their block gain grid resolution from a larger s without widening
the block's range; mean|x| alone cannot see that. alpha = beta = 0 gives s = 1 exactly, which
is plain round-to-nearest, and it is on the grid: the chosen s is never worse than rtn (nor
than the activation-only search) on that objective.

The graph side: `awq_apply(weight, s)` is the weight to quantize (and to store), and the MatMul
input must be multiplied by 1/s: a Mul node before the MatMul, or folded into whatever produces
the input (a LayerNorm's gamma and beta, a preceding MatMul's output columns). Done so, the
float model's outputs are unchanged before quantization (up to float rounding).

Activation-aware clipping (AWQ's second step, `clip=True`, the default): with s chosen, each
block of the scaled weight (one output column, block_size input rows) may take a smaller range:
the block clamped to +-r * max|block|, r in `CLIP_RATIOS` (1 down to 0.55), then given the
format's own parameters by `fmt.choose_params` (as the mse search does), so every scale and zero
point is one the format stores. (For formats without a zero point that is the plain range
ratio r; with one, each end moves on its own: the block clamped to [r_lo * min, r_hi * max],
(r_lo, r_hi) on `CLIP_PAIR_RATIOS` x itself (1 down to 0.7, 49 pairs).) Per block the
ratio with the least error of that block's share of the output,
d_b^T H_bb d_b (H = X^T X over the calibration rows, d_b the block's weight error), wins, ties
going to the larger range. The blocks' errors interact through H's off-diagonal blocks, which
the per-block choice ignores, so the clipped weight is kept only if the whole objective
||x W - (x / s) @ dq||^2 is lower than without clipping.

The per-block scores use H + damp * I, damp = `_CLIP_DAMP` (1) times H's mean diagonal: the
calibration sets here are small, and with H alone the search chose clips that lowered the
calibration error of every OCR-recogniser weight by 25-60% yet lost held-out accuracy. A gain
term like mse's (the error along each block's own output) was tried and was no better there
(`_CLIP_GAIN`, 0 = off). Figures: benchmarks/methods_real_models.md, "AWQ clipping search".

The weight factor and the two-ended clip were chosen on a split of the calibration set (each
weight fitted on the first half of its calibration rows, scored on the second; MiniLM, uint4,
block 128: mean relative output error 0.00558 activation-only with AutoAWQ's one-sided clamp,
0.00533 with the weight factor, 0.00494 with both; a finer alpha grid, clip ratios below 0.7
and re-searching the scales with the chosen clips changed it by under 0.1%); held-out figures:
benchmarks/methods_real_models.md, "AWQ: weight factor and two-ended clip".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .._checks import as_finite_float, as_int, as_real_array, check_finite
from ..core import compute_dtype, prepare, quantize_tensor
from ..formats import get_format
from ..tensor import QuantizedTensor
from . import get_method

__all__ = [
    "CLIP_PAIR_RATIOS",
    "CLIP_RATIOS",
    "WEIGHT_POWERS",
    "AwqSearch",
    "awq_apply",
    "awq_clip",
    "awq_scan",
    "awq_search",
]

#: channels whose mean |x| is below this fraction of the largest are treated as this small, so
#: a silent channel gets a small but finite scale rather than 0
_FLOOR = 1e-4
#: bytes of candidate errors (K x N float64 each) whose losses are taken in one product
_BATCH_BYTES = 32 << 20
#: the range ratios the clipping search tries, 1 (the method's own choice) first; AutoAWQ's
#: auto_clip shrinks by up to half on a 20-step grid, of which it tries the first 10 steps
CLIP_RATIOS = 1.0 - np.arange(10) / 20
#: formats with a zero point (uint4, ...): the clipping search clamps each end of a block on its
#: own, the low end to r_lo * min and the high end to r_hi * max, r_lo and r_hi on this grid
#: (7 x 7 pairs, (1, 1) first); deeper ratios were never chosen on MiniLM (module doc)
CLIP_PAIR_RATIOS = 1.0 - np.arange(7) / 20
#: the powers beta of the weight-magnitude factor the scale search tries (module doc)
WEIGHT_POWERS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: for beta > 0 the scale search tries every this-many-th alpha of its grid (cost; a finer
#: alpha grid there lowered no held-back calibration error, module doc)
_WEIGHT_ALPHA_STEP = 2
#: bytes of per-block candidate errors (N x n_blocks x block float64) handled in one product
_CLIP_BYTES = 16 << 20
#: the clipping search scores blocks on H + damp * mean(diag H) * I, a prior against fitting the
#: few calibration rows (measured on the OCR recogniser, module doc)
_CLIP_DAMP = 1.0
#: weight of the gain term (the error along a block's own output), see `_block_errors`
_CLIP_GAIN = 0.0


@dataclass(frozen=True)
class AwqSearch:
    """What `awq_scan` tried: scales (K,) float32, the chosen alpha (and beta), and the losses.

    alphas / losses: the alpha grid with beta = 0 (s = mean|x|^alpha) and its losses;
    betas / grid_losses: every (beta, alpha) tried, (len(betas), len(alphas)), NaN where an
    alpha was skipped (module doc); grid_losses[0] is losses.

    quantized: `quantize_tensor(awq_apply(weight, scales), ...)` as the search made it (along
    axis 0, with its format, block size, method and clip ratio), so callers need not redo it.
    """

    scales: np.ndarray
    alpha: float
    alphas: np.ndarray
    losses: np.ndarray
    quantized: QuantizedTensor | None = None
    #: with clip=True: the chosen ratio of each block (N, n_blocks), all 1 if clipping did not
    #: lower the objective (then `quantized` is unclipped), and the objective of `quantized`
    #: with pair clipping (formats with a zero point) the ratios are (N, n_blocks, 2): the low
    #: end's and the high end's
    clip_ratios: np.ndarray | None = None
    clip_loss: float | None = None
    beta: float = 0.0
    betas: np.ndarray | None = None
    grid_losses: np.ndarray | None = None
    #: with activation_only=True: the search as `weight_powers=(0,)` would have made it (the
    #: best of the beta = 0 candidates, clipped likewise), from the same losses
    activation_only: AwqSearch | None = None

    @property
    def rtn_loss(self) -> float:
        """The objective at alpha = 0 (s = 1): plain round-to-nearest."""
        return float(self.losses[0])

    @property
    def loss(self) -> float:
        """The least objective of the scale search (before clipping)."""
        if self.grid_losses is not None:
            return float(np.nanmin(self.grid_losses))
        return float(self.losses[int(np.argmin(self.losses))])


def awq_apply(weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """weight * s[:, None] in the weight's dtype; the MatMul's input must then be divided by s."""
    w = prepare(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (K, N) like an ONNX MatMul's B, got {w.shape}")
    sc = _check_scales(s, w.shape[0])
    cdt = compute_dtype(w.dtype)
    out = w.astype(cdt) * sc.astype(cdt)[:, None]
    return out.astype(w.dtype) if np.issubdtype(w.dtype, np.floating) else out


def _check_scales(s, k: int) -> np.ndarray:
    arr = as_real_array(s, "s")
    if arr.shape != (k,):
        raise ValueError(f"s must have shape ({k},), one scale per input row, got {arr.shape}")
    check_finite(arr, "s")
    if not (arr > 0).all():
        raise ValueError("s must be > 0 everywhere")
    return arr


def _check_powers(powers) -> np.ndarray:
    """The betas to try: 0 first, then the given ones (finite, >= 0), sorted, no repeats."""
    arr = as_real_array(powers, "weight_powers")
    if arr.ndim != 1:
        raise ValueError(f"weight_powers must be a 1-D sequence of numbers, got shape {arr.shape}")
    check_finite(arr, "weight_powers")
    if (arr < 0).any():
        raise ValueError("weight_powers must be >= 0 everywhere")
    return np.unique(np.concatenate([[0.0], arr.astype(np.float64)]))


def _block_rows(block_size, k: int) -> int:
    """The rows of one block along K as quantize_tensor counts them (None: the whole of K)."""
    return k if block_size is None else max(1, min(int(block_size), k))


def _weight_magnitude(w64: np.ndarray, bs: int) -> np.ndarray:
    """m_w (K,): per input row, the mean over columns of |w| / the max |w| of its block."""
    k, n = w64.shape
    nb = -(-k // bs)
    pad = np.zeros((nb * bs, n))
    pad[:k] = np.abs(w64)
    blocks = pad.reshape(nb, bs, n)
    peak = blocks.max(axis=1, keepdims=True)
    rel = np.divide(blocks, peak, out=np.zeros_like(blocks), where=peak > 0)
    return rel.reshape(nb * bs, n)[:k].mean(axis=1)


def _sample_rows(x: np.ndarray, max_rows: int) -> np.ndarray:
    """At most max_rows rows of x, a fixed random subset (the same on every call)."""
    if x.shape[0] <= max_rows:
        return x
    idx = np.sort(np.random.default_rng(0).choice(x.shape[0], max_rows, replace=False))
    return x[idx]


def awq_scan(
    weight: np.ndarray,
    x: np.ndarray,
    format: str = "int4",
    block_size: int | None = 128,
    *,
    grid: int = 20,
    method: str = "rtn",
    max_rows: int = 4096,
    clip_ratio: float = 1.0,
    clip: bool = True,
    weight_powers=WEIGHT_POWERS,
    activation_only: bool = False,
) -> AwqSearch:
    """`awq_search` with its working: the alphas tried (i/grid, i = 0..grid) and their losses.

    clip: after the scale search, run the activation-aware clipping search (module doc); the
    result's `quantized` is then the clipped weight when that lowered the objective.
    weight_powers: the betas of s = mean|x|^alpha / m_w^beta to try (module doc); beta = 0 is
    always tried, so (0,) is the activation-only search.
    activation_only: also give (`.activation_only`) what weight_powers=(0,) would give, the
    same bytes: its candidates and their losses are the first ones here, so only its clipping
    search is extra (the ONNX path's whole-model check wants both).
    """
    w = prepare(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (K, N) like an ONNX MatMul's B, got {w.shape}")
    k = w.shape[0]
    xa = as_real_array(x, "x")
    if xa.ndim < 1 or xa.shape[-1] != k or xa.size == 0:
        raise ValueError(f"x must be non-empty activations of shape (..., {k}), got {xa.shape}")
    check_finite(xa, "x")
    grid = as_int(grid, "grid")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    max_rows = as_int(max_rows, "max_rows")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    clip_ratio = as_finite_float(clip_ratio, "clip_ratio")
    betas = _check_powers(weight_powers)
    if not isinstance(clip, (bool, np.bool_)):
        raise TypeError(f"clip must be True or False, got {clip!r}")
    fmt = get_format(format)
    get_method(method)  # a bad name fails here, before any work

    xs = _sample_rows(xa.reshape(-1, k), max_rows).astype(np.float64)
    w64 = w.astype(compute_dtype(w.dtype)).astype(np.float64)
    # the objective is ||xs D||^2 = tr(D^T H D); with more rows than inputs H is cheaper
    h = xs.T @ xs if xs.shape[0] > k else None

    def losses_of(ds: list[np.ndarray]) -> list[float]:
        # one product for several candidates (per column the same sums as one product each):
        # fewer, larger BLAS calls; each loss is sum((H D) * D), or ||xs D||^2 with fewer rows
        # than inputs. The elementwise product or square of a part (a column slice) is a new
        # C-ordered array, so np.sum adds in the same order as for a lone candidate.
        n = ds[0].shape[1]
        big = ds[0] if len(ds) == 1 else np.concatenate(ds, axis=1)
        prod = h @ big if h is not None else xs @ big
        out = []
        for i, d in enumerate(ds):
            part = prod[:, i * n : (i + 1) * n]
            out.append(float(np.sum(part * d)) if h is not None else float(np.sum(np.square(part))))
        return out

    mean = np.abs(xs).mean(axis=0)
    top = float(mean.max())
    alphas = np.arange(grid + 1, dtype=np.float64) / grid
    grid_losses = np.full((len(betas), len(alphas)), np.nan)
    # the weight's magnitude per input row, on the blocks quantize_tensor makes (any alpha's
    # result tells their size; block_size may be "auto")
    rtn_qt = quantize_tensor(w, fmt, block_size, axis=0, clip_ratio=clip_ratio, method=method)
    mag = _weight_magnitude(w64, _block_rows(rtn_qt.block_size, k))
    mag_top = float(mag.max())
    per_batch = max(1, _BATCH_BYTES // max(1, w64.nbytes))
    pending: list[tuple[tuple[int, int], np.ndarray, QuantizedTensor, np.ndarray]] = []
    # per family (0: every candidate; 1: beta = 0's only): [loss, s, alpha, beta, qt]
    best = [[None, np.ones(k, np.float32), 0.0, 0.0, None] for _ in range(2)]

    def settle() -> None:
        for (ij, s, qt, _), value in zip(pending, losses_of([p[3] for p in pending]), strict=True):
            grid_losses[ij] = value
            # ties keep the earlier candidate: rtn first, then beta = 0's alphas, then beta's
            for fam in best if ij[0] == 0 else best[:1]:
                if fam[0] is None or value < fam[0]:
                    fam[:] = [value, s, float(alphas[ij[1]]), float(betas[ij[0]]), qt]
        pending.clear()

    candidates = [(0, j) for j in range(len(alphas))]
    if top > 0 and mag_top > 0:
        # a silent weight (all zero) or silent inputs leave only s = 1: no weight factor then
        candidates += [
            (i, j) for i in range(1, len(betas)) for j in range(0, len(alphas), _WEIGHT_ALPHA_STEP)
        ]
    for i, j in candidates:
        if i > 0 and pending and pending[-1][0][0] == 0:
            # beta = 0's candidates are batched alone, as weight_powers=(0,) batches them: a
            # BLAS product's last bits can depend on its width, and `activation_only` promises
            # that search's very bytes
            settle()
        alpha, beta = float(alphas[j]), float(betas[i])
        if top == 0 or (alpha == 0 and beta == 0):
            s = np.ones(k, np.float32)  # exactly rtn
            qt = rtn_qt
        else:
            raw = np.maximum(mean, _FLOOR * top) ** alpha
            if beta:
                raw = raw / np.maximum(mag, _FLOOR * mag_top) ** beta
            s = (raw / np.sqrt(raw.max() * raw.min())).astype(np.float32)
            qt = quantize_tensor(
                awq_apply(w, s), fmt, block_size, axis=0, clip_ratio=clip_ratio, method=method
            )
        # (x / s) @ Ŵ_s == x @ (Ŵ_s / s[:, None])
        d = w64 - qt.dequantize(np.float64) / s.astype(np.float64)[:, None]
        pending.append(((i, j), s, qt, d))
        if top == 0:  # every alpha is s = 1
            settle()
            grid_losses[0, j + 1 :] = grid_losses[0, j]
            break
        if len(pending) >= per_batch:
            settle()
    if pending:
        settle()
    hb = None

    def finish(fam, betas_, grid) -> AwqSearch:
        nonlocal hb
        loss, s, alpha, beta, qt = fam
        ratios = clip_loss = None
        if clip and qt is not None:
            if hb is None:
                hb = _diag_blocks(xs, h, qt.block_size)
            qt, ratios, clip_loss = _clip_search(
                w, w64, s, qt, fmt, clip_ratio, method, hb, loss, losses_of,
                pairs=_pairs_for(fmt, qt),
            )  # fmt: skip
        return AwqSearch(
            scales=s,
            alpha=alpha,
            alphas=alphas,
            losses=grid_losses[0].copy(),
            quantized=qt,
            clip_ratios=ratios,
            clip_loss=clip_loss,
            beta=beta,
            betas=betas_,
            grid_losses=grid,
        )

    result = finish(best[0], betas, grid_losses)
    if not activation_only:
        return result
    if best[0][3] == 0.0:  # the best is a beta = 0 candidate: the first least of both families
        alone = dataclasses.replace(result, betas=betas[:1], grid_losses=grid_losses[:1].copy())
    else:
        alone = finish(best[1], betas[:1], grid_losses[:1].copy())
    return dataclasses.replace(result, activation_only=alone)


def _clip_pairs() -> np.ndarray:
    """(P, 2) the (r_lo, r_hi) pairs of the pair clipping search, (1, 1) first."""
    r = CLIP_PAIR_RATIOS
    return np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1).reshape(-1, 2)


class _BlockRatios:
    """A method giving each block its own range: candidate 0 is `base`'s choice, candidate i
    the format's rule on the block clamped to +-CLIP_RATIOS[i] * max|block| (or, with pairs,
    to [r_lo * min, r_hi * max] for the pair i of `_clip_pairs`); `index` is one candidate for
    every block or an (N, n_blocks) array of them."""

    name = "awq-clip"
    description = "per block, the range ratio the activation-aware clipping search chose"

    def __init__(self, base, index, pairs: bool = False):
        self.base = base
        self.index = index
        self.pairs = _clip_pairs() if pairs else None
        self.masks_padding = getattr(base, "masks_padding", False)

    def _candidate(self, i, fmt, blocks, tensor_scale, clip_ratio, kw):
        if i == 0:
            return self.base.choose_params(fmt, blocks, tensor_scale, clip_ratio, **kw)
        # AutoAWQ's clip: clamp the block to +-r * max|w|, then the format's own rule (with the
        # user's clip_ratio); with a zero point only the side past r * max|w| moves, which kept
        # more of the block's gain than shrinking both ends (OCR recogniser, module doc). A
        # format with a tensor scale (nvfp4) derives it from the blocks it is given, so there
        # the clamped range goes in as a ratio instead (the same range for its absmax rule).
        if self.pairs is not None:
            # each end on its own: a zero point lets the grid follow an uneven range
            zero = blocks.dtype.type(0)
            r_lo, r_hi = (blocks.dtype.type(v) for v in self.pairs[i])
            lo = np.minimum(blocks.min(axis=-1, keepdims=True), zero) * r_lo
            hi = np.maximum(blocks.max(axis=-1, keepdims=True), zero) * r_hi
            return fmt.choose_params(np.clip(blocks, lo, hi), clip_ratio)
        r = float(CLIP_RATIOS[i])
        if tensor_scale is not None:
            return fmt.choose_params(blocks, clip_ratio * r)
        m = np.abs(blocks).max(axis=-1, keepdims=True) * blocks.dtype.type(r)
        return fmt.choose_params(np.clip(blocks, -m, m), clip_ratio)

    def choose_params(self, fmt, blocks, tensor_scale, clip_ratio=1.0, **kw):
        if np.isscalar(self.index):
            return self._candidate(int(self.index), fmt, blocks, tensor_scale, clip_ratio, kw)
        idx = np.asarray(self.index)
        if idx.shape != blocks.shape[:-1]:
            raise ValueError(f"index has shape {idx.shape}, the blocks {blocks.shape[:-1]}")
        scale = zp = None
        for i in np.unique(idx):
            sc, z = self._candidate(int(i), fmt, blocks, tensor_scale, clip_ratio, kw)
            if scale is None:
                scale, zp = np.array(sc, copy=True), None if z is None else np.array(z, copy=True)
            pick = idx == i
            scale[pick] = sc[pick]
            if zp is not None:
                zp[pick] = z[pick]
        return scale, zp


def _diag_blocks(xs: np.ndarray, h: np.ndarray | None, bs: int) -> np.ndarray:
    """H's diagonal blocks (n_blocks, bs, bs), H = xs^T xs; the last block zero-padded."""
    k = xs.shape[1]
    nb = -(-k // bs)
    out = np.zeros((nb, bs, bs))
    damp = _CLIP_DAMP * (float(np.trace(h)) if h is not None else float(np.sum(xs * xs))) / k
    for b in range(nb):
        lo, hi = b * bs, min(k, (b + 1) * bs)
        if h is not None:
            out[b, : hi - lo, : hi - lo] = h[lo:hi, lo:hi]
        else:
            part = xs[:, lo:hi]
            out[b, : hi - lo, : hi - lo] = part.T @ part
        out[b, np.arange(hi - lo), np.arange(hi - lo)] += damp
    return out


def _as_blocks(a: np.ndarray, nb: int, bs: int) -> np.ndarray:
    """(K, n) -> (nb, bs, n), the last block zero-padded."""
    out = np.zeros((nb * bs, a.shape[1]))
    out[: a.shape[0]] = a
    return out.reshape(nb, bs, a.shape[1])


def _block_errors(hb: np.ndarray, d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each block's score, (K, N) weight errors d -> (N, n_blocks): its share of the output
    error d_b^T H_bb d_b, plus _CLIP_GAIN * bs times the squared part of it along the block's
    own output y_b = X_b w_b, (y_b . e_b)^2 / |y_b|^2 (module doc)."""
    nb, bs, _ = hb.shape
    n = d.shape[1]
    out = np.empty((n, nb))
    cols = max(1, _CLIP_BYTES // max(1, 8 * nb * bs))
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        dd = _as_blocks(d[:, c0:c1], nb, bs)
        err = np.sum(np.matmul(hb, dd) * dd, axis=1)
        if _CLIP_GAIN:
            hw = np.matmul(hb, _as_blocks(w[:, c0:c1], nb, bs))
            yy = np.sum(hw * _as_blocks(w[:, c0:c1], nb, bs), axis=1)
            ye = np.sum(hw * dd, axis=1)
            err += _CLIP_GAIN * bs * ye * ye / np.maximum(yy, np.finfo(np.float64).tiny)
        out[c0:c1] = err.T
    return out


def _clip_search(w, w64, s, qt0, fmt, clip_ratio, method, hb, loss0, losses_of, pairs=False):
    """(quantized, ratios, loss): AWQ's clipping search on the scaled weight (module doc).

    pairs: clamp each end of a block on its own (`CLIP_PAIR_RATIOS`); ratios are then
    (N, n_blocks, 2), the low end's and the high end's.
    """
    base = get_method(method)
    scaled = awq_apply(w, s)
    inv = 1.0 / s.astype(np.float64)[:, None]
    table = _clip_pairs() if pairs else CLIP_RATIOS

    def clipped(index) -> QuantizedTensor:
        """The scaled weight with block b at table[index] (or table[index[n, b]])."""
        method = _BlockRatios(base, index, pairs)
        return quantize_tensor(scaled, fmt, qt0.block_size, axis=0, clip_ratio=clip_ratio,
                               method=method)  # fmt: skip

    errs = []
    for i in range(len(table)):
        qt = qt0 if i == 0 else clipped(i)
        errs.append(_block_errors(hb, w64 - qt.dequantize(np.float64) * inv, w64))
    idx = np.argmin(np.stack(errs), axis=0)  # the first minimum: ties keep the larger range
    ones = np.ones(idx.shape + table.shape[1:], np.float32)
    if not idx.any():
        return qt0, ones, loss0
    qt = clipped(idx)
    loss = losses_of([w64 - qt.dequantize(np.float64) * inv])[0]
    if not loss < loss0:  # the blocks' interactions undid the gain: keep the unclipped weight
        return qt0, ones, loss0
    return qt, table[idx].astype(np.float32), loss


def _pairs_for(fmt, qt: QuantizedTensor) -> bool:
    """Clamp each end of a block on its own? For formats with a zero point (and no tensor
    scale), whose range has two ends (module doc)."""
    return fmt.zero_point is not None and qt.tensor_scale is None


def awq_clip(
    weight: np.ndarray,
    h: np.ndarray,
    format: str = "int4",
    block_size: int | str | None = "auto",
    *,
    method: str = "rtn",
    clip_ratio: float = 1.0,
    col_weights: np.ndarray | None = None,
) -> tuple[QuantizedTensor, np.ndarray, float]:
    """(quantized, ratios, loss): AWQ's clipping search alone (module doc), on a (K, N) weight
    whose scales are already applied (or s = 1), quantized along K, scored on H (K, K) = X^T X.

    The objective is sum_j col_weights[j] * (D^T H D)_jj (D the weight's error; col_weights 1
    each by default): quantized is the clipped weight only if that is lower than without
    clipping. ratios: the blocks' range ratios (N, n_blocks), or for formats with a zero point
    (N, n_blocks, 2), the low end's and the high end's; all 1 when nothing was clipped.
    """
    w = prepare(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (K, N), got shape {w.shape}")
    k, n = w.shape
    hh = np.asarray(h, np.float64)
    if hh.shape != (k, k):
        raise ValueError(f"h must have shape ({k}, {k}), got {hh.shape}")
    check_finite(hh, "h")
    cw = np.ones(n) if col_weights is None else np.asarray(col_weights, np.float64)
    if cw.shape != (n,):
        raise ValueError(f"col_weights must have shape ({n},), got {cw.shape}")
    fmt = get_format(format)
    w64 = w.astype(compute_dtype(w.dtype)).astype(np.float64)
    qt0 = quantize_tensor(w, fmt, block_size, axis=0, clip_ratio=clip_ratio, method=method)

    def losses_of(ds: list[np.ndarray]) -> list[float]:
        return [float(np.sum((hh @ d) * d * cw)) for d in ds]

    loss0 = losses_of([w64 - qt0.dequantize(np.float64)])[0]
    hb = _diag_blocks(np.empty((0, k)), hh, qt0.block_size)  # rows unused when H is given
    ones = np.ones(k, np.float32)
    pairs = _pairs_for(fmt, qt0)
    return _clip_search(w, w64, ones, qt0, fmt, clip_ratio, method, hb, loss0, losses_of, pairs)


def awq_search(
    weight: np.ndarray,
    x: np.ndarray,
    format: str = "int4",
    block_size: int | None = 128,
    *,
    grid: int = 20,
    method: str = "rtn",
    max_rows: int = 4096,
    clip_ratio: float = 1.0,
    clip: bool = True,
    weight_powers=WEIGHT_POWERS,
) -> np.ndarray:
    """AWQ scales s (K,) float32 > 0 for a (K, N) weight from activations x (..., K).

    Quantize `awq_apply(weight, s)` (along axis 0, same format/block_size/method) and divide
    the MatMul's input by s. Rows of x beyond max_rows are subsampled (a fixed random subset).
    """
    return awq_scan(
        weight,
        x,
        format,
        block_size,
        grid=grid,
        method=method,
        max_rows=max_rows,
        clip_ratio=clip_ratio,
        clip=clip,
        weight_powers=weight_powers,
    ).scales
