"""AWQ: scale a MatMul weight's input rows by activation magnitude before quantizing it.

Activation-aware weight quantization (Lin et al., 2023): inputs with large activations matter
more, so their weight rows are multiplied by s > 0 before rounding (a larger share of the grid)
and the layer input is divided by s, which leaves the float product unchanged:

    (x / s) @ (diag(s) W) == x @ W

`awq_search` picks s = mean|x|^alpha (normalised so sqrt(max(s) * min(s)) = 1), alpha on a grid
in [0, 1], minimising the calibration output error ||x W - (x / s) @ dq(Q(diag(s) W))||^2.
alpha = 0 gives s = 1 exactly, which is plain round-to-nearest, and it is on the grid: the
chosen s is never worse than rtn on that objective.

The graph side: `awq_apply(weight, s)` is the weight to quantize (and to store), and the MatMul
input must be multiplied by 1/s: a Mul node before the MatMul, or folded into whatever produces
the input (a LayerNorm's gamma and beta, a preceding MatMul's output columns). Done so, the
float model's outputs are unchanged before quantization (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import as_finite_float, as_int, as_real_array, check_finite
from ..core import compute_dtype, prepare, quantize_tensor
from ..formats import get_format
from ..tensor import QuantizedTensor
from . import get_method

__all__ = ["AwqSearch", "awq_apply", "awq_scan", "awq_search"]

#: channels whose mean |x| is below this fraction of the largest are treated as this small, so
#: a silent channel gets a small but finite scale rather than 0
_FLOOR = 1e-4
#: bytes of candidate errors (K x N float64 each) whose losses are taken in one product
_BATCH_BYTES = 32 << 20


@dataclass(frozen=True)
class AwqSearch:
    """What `awq_scan` tried: scales (K,) float32, the chosen alpha, and every alpha's loss.

    quantized: `quantize_tensor(awq_apply(weight, scales), ...)` as the search made it (along
    axis 0, with its format, block size, method and clip ratio), so callers need not redo it.
    """

    scales: np.ndarray
    alpha: float
    alphas: np.ndarray
    losses: np.ndarray
    quantized: QuantizedTensor | None = None

    @property
    def rtn_loss(self) -> float:
        """The objective at alpha = 0 (s = 1): plain round-to-nearest."""
        return float(self.losses[0])

    @property
    def loss(self) -> float:
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
) -> AwqSearch:
    """`awq_search` with its working: the alphas tried (i/grid, i = 0..grid) and their losses."""
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
    fmt = get_format(format)
    get_method(method)  # a bad name fails here, before any work

    xs = _sample_rows(xa.reshape(-1, k), max_rows).astype(np.float64)
    w64 = w.astype(compute_dtype(w.dtype)).astype(np.float64)
    # the objective is ||xs D||^2 = tr(D^T H D); with more rows than inputs H is cheaper
    h = xs.T @ xs if xs.shape[0] > k else None

    def losses_of(ds: list[np.ndarray]) -> list[float]:
        # one product for several candidates (per column the same sums as one product each,
        # and each part made contiguous so np.sum adds in the same order): fewer, larger BLAS
        # calls; each loss is sum((H D) * D), or ||xs D||^2 with fewer rows than inputs
        n = ds[0].shape[1]
        big = ds[0] if len(ds) == 1 else np.concatenate(ds, axis=1)
        prod = h @ big if h is not None else xs @ big
        out = []
        for i, d in enumerate(ds):
            part = prod if len(ds) == 1 else np.ascontiguousarray(prod[:, i * n : (i + 1) * n])
            out.append(float(np.sum(part * d)) if h is not None else float(np.sum(np.square(part))))
        return out

    mean = np.abs(xs).mean(axis=0)
    top = float(mean.max())
    alphas = np.arange(grid + 1, dtype=np.float64) / grid
    losses = np.empty(len(alphas))
    per_batch = max(1, _BATCH_BYTES // max(1, w64.nbytes))
    pending: list[tuple[int, np.ndarray, QuantizedTensor, np.ndarray]] = []
    best = None
    best_s, best_alpha, best_qt = np.ones(k, np.float32), 0.0, None

    def settle() -> None:
        nonlocal best, best_s, best_alpha, best_qt
        for (j, s, qt, _), value in zip(pending, losses_of([p[3] for p in pending]), strict=True):
            losses[j] = value
            if best is None or value < best:  # ties keep the smaller alpha (rtn first)
                best, best_s, best_alpha, best_qt = value, s, float(alphas[j]), qt
        pending.clear()

    for j, alpha in enumerate(alphas):
        if top == 0 or alpha == 0:
            s = np.ones(k, np.float32)  # exactly rtn
        else:
            raw = np.maximum(mean, _FLOOR * top) ** alpha
            s = (raw / np.sqrt(raw.max() * raw.min())).astype(np.float32)
        qt = quantize_tensor(
            awq_apply(w, s), fmt, block_size, axis=0, clip_ratio=clip_ratio, method=method
        )
        # (x / s) @ Ŵ_s == x @ (Ŵ_s / s[:, None])
        d = w64 - qt.dequantize(np.float64) / s.astype(np.float64)[:, None]
        pending.append((j, s, qt, d))
        if top == 0:  # every alpha is s = 1
            settle()
            losses[j + 1 :] = losses[j]
            break
        if len(pending) >= per_batch:
            settle()
    if pending:
        settle()
    return AwqSearch(
        scales=best_s, alpha=best_alpha, alphas=alphas, losses=losses, quantized=best_qt
    )


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
    ).scales
