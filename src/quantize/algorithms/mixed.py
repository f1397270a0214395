"""Mixed precision: choose each layer's quantization under an average bits-per-weight budget.

Each layer offers options (label, bits per weight, error), e.g. ("int4/128", 4.25, 3e-3) and
("int8/128", 8.25, 1e-5); the error is a sensitivity score such as `output_error`, the relative
output error on calibration data. `plan_mixed` picks one option per layer, minimising

    total error = sum over layers of error * n_weights

(a weight-count-weighted sum: a big layer's relative error spreads over more of the model)
subject to sum(bits_per_weight * n_weights) / sum(n_weights) <= target_bits.

This is a multiple-choice knapsack. Exact when it is small: each option's extra bits over its
layer's cheapest, (bits - cheapest) * n_weights, are whole multiples of a common unit (the
exact gcd of these binary fractions; real models' layer sizes share large factors), and when
layers x (largest extra bits in units) is at most 1e7 a dynamic programme over units finds the
least total error that fits. Otherwise greedy: every layer starts at its cheapest option; its
upgrades follow the lower convex hull of its (bits, error) options; all layers' upgrades are
sorted once by error removed per extra bit, best first, and taken in that order whenever they
fit the budget left (optimal up to the one upgrade that does not fit, the LP bound). Which of
the two runs depends on the layers only, not on target_bits, and both are monotone: a larger
budget never gives a larger total error (the greedy order does not depend on the budget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from .._checks import as_finite_float, as_real_array, check_finite
from ..tensor import QuantizedTensor

__all__ = ["LayerChoice", "output_error", "plan_cost", "plan_mixed"]


@dataclass
class LayerChoice:
    """One layer: its name, weight count, and options (label, bits_per_weight, error)."""

    name: str
    n_weights: int
    options: list[tuple[str, float, float]] = field(default_factory=list)


def _check_layers(layers: Sequence[LayerChoice]) -> None:
    if not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)):
        raise TypeError(f"layers must be a sequence of LayerChoice, got {type(layers).__name__}")
    if not layers:
        raise ValueError("layers is empty; there is nothing to plan")
    seen = set()
    for layer in layers:
        if not isinstance(layer, LayerChoice):
            raise TypeError(f"layers must hold LayerChoice objects, got {type(layer).__name__}")
        if layer.name in seen:
            raise ValueError(f"layers has two layers named {layer.name!r}")
        seen.add(layer.name)
        if isinstance(layer.n_weights, bool) or not isinstance(layer.n_weights, (int, np.integer)):
            raise TypeError(f"layer {layer.name!r}: n_weights must be an int")
        if layer.n_weights <= 0:
            raise ValueError(f"layer {layer.name!r}: n_weights must be > 0, got {layer.n_weights}")
        if not layer.options:
            raise ValueError(f"layer {layer.name!r} has no options")
        labels = [o[0] for o in layer.options]
        if len(set(labels)) != len(labels):
            raise ValueError(f"layer {layer.name!r} has two options with the same label")
        for label, bits, err in layer.options:
            b = as_finite_float(bits, f"layer {layer.name!r} option {label!r} bits_per_weight")
            e = as_finite_float(err, f"layer {layer.name!r} option {label!r} error")
            if b <= 0 or e < 0:
                raise ValueError(
                    f"layer {layer.name!r} option {label!r}: bits_per_weight must be > 0 and "
                    f"error >= 0, got {b}, {e}"
                )


def _hull(options: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The options on the lower convex hull of (bits, error), cheapest first, error falling."""
    pts = sorted(options, key=lambda o: (float(o[1]), float(o[2])))
    out: list[tuple[str, float, float]] = []
    for label, b, e in pts:
        b, e = float(b), float(e)
        if out and e >= out[-1][2]:  # no cheaper-or-equal error for more bits: dominated
            continue
        while len(out) >= 2:
            (_, b1, e1), (_, b2, e2) = out[-2], out[-1]
            # drop the middle point if it lies on or above the chord from b1 to b
            if (e2 - e1) * (b - b1) >= (e - e1) * (b2 - b1):
                out.pop()
            else:
                break
        out.append((label, b, e))
    return out


def plan_mixed(layers: Sequence[LayerChoice], target_bits: float) -> dict[str, str]:
    """{layer name: option label} with average bits per weight <= target_bits, least error.

    ValueError naming target_bits if even the cheapest option everywhere exceeds it.
    """
    _check_layers(layers)
    target = as_finite_float(target_bits, "target_bits")
    if target <= 0:
        raise ValueError(f"target_bits must be > 0, got {target}")
    total_n = sum(int(layer.n_weights) for layer in layers)
    hulls = [_hull(layer.options) for layer in layers]
    used = sum(h[0][1] * int(layer.n_weights) for h, layer in zip(hulls, layers, strict=True))
    budget = target * total_n
    slack = 1e-12 * budget  # sums of products of floats: accept rounding-level excess
    if used > budget + slack:
        raise ValueError(
            f"target_bits={target:g} is below the cheapest plan, "
            f"{used / total_n:.4f} bits per weight; raise target_bits or add cheaper options"
        )
    exact = _plan_exact(layers, target, total_n)
    if exact is not None:
        return exact
    steps = []  # (-ratio, layer index, hull step, extra bits)
    for li, (h, layer) in enumerate(zip(hulls, layers, strict=True)):
        n = int(layer.n_weights)
        for si in range(1, len(h)):
            extra = (h[si][1] - h[si - 1][1]) * n
            gain = (h[si - 1][2] - h[si][2]) * n
            steps.append((-gain / extra, li, si, extra))
    steps.sort()
    at = [0] * len(layers)
    for _, li, si, extra in steps:
        if at[li] == si - 1 and used + extra <= budget + slack:
            at[li] = si
            used += extra
    return {layer.name: hulls[li][at[li]][0] for li, layer in enumerate(layers)}


#: the exact programme's limits: table cells (layers x budget units), and budget units
_DP_CELLS = 10_000_000
_DP_UNITS = 1_000_000


def _pareto(options) -> list[tuple[str, float, float]]:
    """Options not beaten on both bits and error, cheapest first (equal ones: the first)."""
    out: list[tuple[str, float, float]] = []
    for label, b, e in sorted(options, key=lambda o: (float(o[1]), float(o[2]))):
        if not out or float(e) < out[-1][2]:
            out.append((label, float(b), float(e)))
    return out


def _plan_exact(layers, target: float, total_n: int) -> dict[str, str] | None:
    """The least-error plan by dynamic programming over exact bit units, or None if too big."""
    fronts = [_pareto(layer.options) for layer in layers]
    extras = [
        [(Fraction(b) - Fraction(f[0][1])) * int(layer.n_weights) for _, b, _ in f]
        for f, layer in zip(fronts, layers, strict=True)
    ]
    nonzero = [c for cs in extras for c in cs if c]
    if not nonzero:
        return {layer.name: f[0][0] for f, layer in zip(fronts, layers, strict=True)}
    num = den = 0
    for c in nonzero:
        num = math.gcd(num, c.numerator)
        den = den * c.denominator // math.gcd(den, c.denominator) if den else c.denominator
    unit = Fraction(num, den)
    units = [[int(c / unit) for c in cs] for cs in extras]
    full = sum(max(us) for us in units)
    if full + 1 > _DP_UNITS or len(layers) * (full + 1) > _DP_CELLS:
        return None
    cheapest = sum(
        Fraction(f[0][1]) * int(la.n_weights) for f, la in zip(fronts, layers, strict=True)
    )
    # the budget in exact arithmetic, with the same rounding slack as the greedy path
    room = Fraction(target) * total_n * (1 + Fraction(1, 10**12)) - cheapest
    cap = min(full, math.floor(room / unit))
    inf = np.inf
    best = np.zeros(cap + 1)  # least error with at most j units spent, layers so far
    picks = np.zeros((len(layers), cap + 1), np.int16)
    for li, (f, us, layer) in enumerate(zip(fronts, units, layers, strict=True)):
        n = int(layer.n_weights)
        new = np.full(cap + 1, inf)
        for oi, ((_, _, e), u) in enumerate(zip(f, us, strict=True)):
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = best[: cap + 1 - u] + e * n
            better = cand < new
            new[better] = cand[better]
            picks[li, better] = oi
        best = new
    j = cap
    plan = {}
    for li in range(len(layers) - 1, -1, -1):
        oi = int(picks[li, j])
        plan[layers[li].name] = fronts[li][oi][0]
        j -= units[li][oi]
    return plan


def plan_cost(layers: Sequence[LayerChoice], plan: dict[str, str]) -> tuple[float, float]:
    """(average bits per weight, total error = sum error * n_weights) of a plan."""
    bits = err = 0.0
    total = 0
    for layer in layers:
        opts = {o[0]: o for o in layer.options}
        if layer.name not in plan or plan[layer.name] not in opts:
            raise ValueError(f"plan has no valid option for layer {layer.name!r}")
        _, b, e = opts[plan[layer.name]]
        bits += float(b) * layer.n_weights
        err += float(e) * layer.n_weights
        total += layer.n_weights
    return bits / total, err


def output_error(
    weight: np.ndarray,
    qt: QuantizedTensor | np.ndarray,
    x_or_hessian: np.ndarray,
    *,
    is_hessian: bool | None = None,
) -> float:
    """Relative output error ||x W - x Ŵ||^2 / ||x W||^2 of a (K, N) weight and its quantized Ŵ.

    x_or_hessian: activations (..., K), or H = X^T X (K, K), giving tr(D^T H D) / tr(W^T H W)
    with D = W - Ŵ. A square, symmetric (K, K) array is taken as H unless is_hessian=False.
    qt: a QuantizedTensor of the weight's shape, or Ŵ itself. 0.0 when x W is all zero.
    """
    w = as_real_array(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (K, N), got shape {w.shape}")
    check_finite(w, "weight")
    k = w.shape[0]
    w64 = w.astype(np.float64)
    if isinstance(qt, QuantizedTensor):
        if tuple(qt.shape) != w.shape:
            raise ValueError(f"qt has shape {tuple(qt.shape)}; the weight has {w.shape}")
        wq = qt.dequantize(np.float64)
    else:
        wq = as_real_array(qt, "qt")
        if wq.shape != w.shape:
            raise ValueError(f"qt has shape {wq.shape}; the weight has {w.shape}")
        check_finite(wq, "qt")
        wq = wq.astype(np.float64)
    a = as_real_array(x_or_hessian, "x_or_hessian")
    check_finite(a, "x_or_hessian")
    if a.ndim < 1 or a.shape[-1] != k:
        raise ValueError(
            f"x_or_hessian must be activations (..., {k}) or a ({k}, {k}) Hessian, got {a.shape}"
        )
    a = a.astype(np.float64)
    if is_hessian is None:
        is_hessian = a.shape == (k, k) and np.allclose(a, a.T, rtol=1e-5, atol=0)
    d = w64 - wq
    if is_hessian:
        if a.shape != (k, k):
            raise ValueError(f"x_or_hessian as a Hessian must be ({k}, {k}), got {a.shape}")
        num = float(np.sum((a @ d) * d))
        den = float(np.sum((a @ w64) * w64))
    else:
        rows = a.reshape(-1, k)
        num = float(np.sum(np.square(rows @ d)))
        den = float(np.sum(np.square(rows @ w64)))
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return max(num, 0.0) / den
