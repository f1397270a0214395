"""The report's two-pass error kernel equals the NumPy figures, for every input dtype."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from quantize import quantize_tensor
from quantize.report import error_stats, error_stats_chunked


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, ml_dtypes.bfloat16])
@pytest.mark.parametrize("chunk", [997, 50_000])
def test_kernel_figures_equal_numpy(dtype, chunk):
    rng = np.random.default_rng(3)
    w = (rng.standard_t(3, size=(300, 170)) * 3 + 0.5).astype(dtype)
    r = quantize_tensor(w, "nf4", 64).dequantize(np.float32)
    a, b = error_stats(w, r), error_stats_chunked(w, r, chunk=chunk)
    assert a.keys() == b.keys()
    for key in a.keys() - {"error_hist"}:
        assert b[key] == pytest.approx(a[key], rel=1e-12), key
    assert a["error_hist"] == b["error_hist"]  # np.histogram's edges and edge rule


def test_exact_and_constant_tensors(monkeypatch):
    z = np.zeros((400, 50), np.float32)
    s = error_stats_chunked(z, z, chunk=1000)
    assert s["sqnr_db"] == np.inf and s["max_abs_err"] == 0 and s["outlier_ratio"] == 1.0
    assert s["error_hist"]["counts"][20] == z.size
    c = np.full((400, 50), 2.5, np.float32)
    assert error_stats_chunked(c, c, chunk=1000) == error_stats(c, c)


def test_kernels_off_gives_numpy(monkeypatch):
    from quantize import kernels

    rng = np.random.default_rng(4)
    w = rng.standard_normal((200, 100)).astype(np.float32)
    r = quantize_tensor(w, "int4", 32).dequantize()
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert error_stats_chunked(w, r, chunk=100) == error_stats(w, r)
