"""nf4_dq by the kernels (block amaxes compiled, their 8-bit compression in NumPy, the NF4 codes
compiled against the compressed scales) equals the NumPy path bit for bit: packed codes,
stored scales and the double-quantization state (codes, group absmaxes, offset)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

pytest.importorskip("numba")

from quantize import kernels as K
from quantize import quantize_tensor
from quantize.kernels import reference as R
from test_kernels import MAKERS, same


def same_state(a, b) -> bool:
    return (
        same(a.codes, b.codes)
        and same(a.absmax, b.absmax)
        and same(np.asarray(a.offset), np.asarray(b.offset))
        and a.block_size == b.block_size
    )


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize(("rows", "n", "bs"), [(9, 1000, 64), (40, 64, 16), (3, 300, None)])
def test_matches_reference(kind, rows, n, bs):
    rng = np.random.default_rng(zlib.crc32(repr(("nf4_dq", kind, rows, n, bs)).encode()))
    x = MAKERS[kind](rng, rows, n)
    got = K.quantize_rows("nf4_dq", x, bs)
    want = R.quantize_rows("nf4_dq", x, bs)
    for name, g, w in zip(("packed", "scales", "zero_points"), got, want, strict=True):
        assert same(g, w), f"{name} differ (shape {x.shape}, block {bs})"
    assert same_state(got.double_quant, want.double_quant)
    n_ = x.shape[1]
    assert same(K.dequantize_rows("nf4_dq", *got, n_, bs), R.dequantize_rows("nf4", *want, n_, bs))


@pytest.mark.parametrize("shape", [(4, 300, 128), (3, 5, 1000)])
def test_quantize_tensor_kernel_equals_numpy(shape, monkeypatch):
    """Through `quantize_tensor` (3-D: the state's codes take the scales' shape), with zero
    blocks; kernels forced on, then off."""
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    x.reshape(-1)[:256] = 0
    monkeypatch.setattr(K, "MIN_KERNEL_ELEMENTS", 1)
    monkeypatch.setenv("QUANTIZE_KERNELS", "1")
    fast = quantize_tensor(x, "nf4_dq", 64)
    monkeypatch.setenv("QUANTIZE_KERNELS", "0")
    slow = quantize_tensor(x, "nf4_dq", 64)
    assert same(fast.data, slow.data) and same(fast.scales, slow.scales)
    assert same_state(fast.double_quant, slow.double_quant)
    assert same(fast.dequantize(), slow.dequantize())


def test_all_zero_tensor():
    x = np.zeros((8, 256), np.float32)
    got = K.quantize_rows("nf4_dq", x, 64)
    want = R.quantize_rows("nf4_dq", x, 64)
    assert same(got.scales, want.scales) and same(got.packed, want.packed)
    assert same_state(got.double_quant, want.double_quant)
