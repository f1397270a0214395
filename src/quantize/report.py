"""Error figures for a quantized tensor: what the bits cost, per tensor, in one dict."""

from __future__ import annotations

import numpy as np

from .tensor import QuantizedTensor


def error_stats(original: np.ndarray, reconstructed: np.ndarray) -> dict[str, float]:
    """rel_rmse, sqnr_db, max_abs_err and outlier_ratio (amax / std) of one tensor, in float64.

    sqnr_db is inf for an exact reconstruction; rel_rmse is 0 then (and for an all-zero
    original with an exact reconstruction).
    """
    x = np.asarray(original, dtype=np.float64)
    err = np.asarray(reconstructed, dtype=np.float64) - x
    signal = float(np.mean(x * x))
    noise = float(np.mean(err * err))
    std = float(x.std())
    return {
        "rel_rmse": 0.0 if noise == 0 else float(np.sqrt(noise / signal)) if signal else np.inf,
        "sqnr_db": np.inf
        if noise == 0
        else float(10 * np.log10(signal / noise))
        if signal
        else -np.inf,
        "max_abs_err": float(np.abs(err).max()) if err.size else 0.0,
        "outlier_ratio": float(np.abs(x).max() / std) if std > 0 else 1.0,
    }


def tensor_report(name: str, original: np.ndarray, qt: QuantizedTensor) -> dict[str, object]:
    """One row of a report: the tensor, its format and bits per weight, and its error figures."""
    row: dict[str, object] = {
        "name": name,
        "format": qt.format,
        "block_size": qt.block_size,
        "shape": list(qt.shape),
        "bits_per_weight": qt.bits_per_weight,
    }
    row.update(error_stats(original, qt.dequantize(np.float32)))
    return row
