"""The compiled mse search for int4_ort (`kernels.search.mse_ort_kernel`) equals the NumPy path.

Bit for bit (packed codes, scales, zero points), as the int4/uint4 search kernel is held to
its NumPy twin (tests/test_algorithms.py): random, heavy-tailed, tied, all-zero, subnormal and
huge data, padded last blocks, tiny clip ratios (scales whose reciprocal overflows, extremes
that underflow to 0 once shrunk), every objective weighting, float16/bfloat16 input, and any
thread count. The kernel ranks candidates as int4 at ORT's signed scales (`mse.approx_sse`) and
checks the winner with ORT's own rule, so ties (ORT rounds them up, rint to even) matter.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _matrices import matrix, same_bytes
from quantize import quantize_tensor
from quantize.algorithms import get_method
from quantize.algorithms.mse import MSE, MSESearch, search_error
from quantize.blocking import n_blocks, to_blocks
from quantize.formats import get_format

pytest.importorskip("numba")

FMT = "int4_ort"
ORT4 = get_format(FMT)


KINDS = ["normal", "student-t", "zeros", "constant", "sparse", "ties", "huge", "tiny"]


# None: the default objective (0.25 / 0.25); (0, 0): plain squared error; (1.5, 0.25): both
@pytest.mark.parametrize("weights", [None, (0.0, 0.0), (1.5, 0.25)])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 5),
    n=st.integers(1, 90),
    bs=st.sampled_from([1, 2, 5, 8, 16, 32, 33, 64, None]),
    clip=st.sampled_from([1.0, 0.7, 1e-3, 1e-30]),
)
def test_kernel_equals_numpy(weights, kind, seed, rows, n, bs, clip):
    x = matrix(kind, seed, rows, n)
    m = MSE if weights is None else MSESearch(dc_weight=weights[0], gain_weight=weights[1])
    got = m.quantize_rows(FMT, x, bs, clip)
    want = quantize_tensor(x, FMT, bs, clip_ratio=clip, method=m)  # small: the NumPy path
    assert same_bytes(got[0], want.data) and same_bytes(got[1], want.scales)
    assert same_bytes(got[2], want.zero_points)


@pytest.mark.parametrize("steps", [1, 2, 30])  # 2, 4 and 60 candidates: one or two passes
def test_other_grids(steps):
    x = matrix("student-t", 7, 6, 200)
    m = MSESearch(steps=steps, lowest=0.3)
    got = m.quantize_rows(FMT, x, 32)
    want = quantize_tensor(x, FMT, 32, method=m)
    want_rows = (want.data, want.scales, want.zero_points)
    assert all(same_bytes(a, b) for a, b in zip(got, want_rows, strict=True))


def test_both_orientations_are_chosen():
    x = matrix("student-t", 3, 64, 256)
    got = MSE.quantize_rows(FMT, x, 32)
    rtn = quantize_tensor(x, FMT, 32)
    assert set(np.unique(got[2])) == {7, 8}
    assert (got[2] != rtn.zero_points).any()  # some blocks flipped
    assert np.all(got[1] > 0) and np.all(np.isfinite(got[1]))


def test_dispatch_threads_and_half_input(monkeypatch):
    from quantize import kernels

    x = matrix("student-t", 11, 300, 1000)  # 300k elements: above the kernels' threshold
    x[:, -3:] = 0  # and a padded last block (1000 = 31 * 32 + 8)
    assert kernels.wanted(ORT4, np.float32, x.size)
    assert FMT in get_method("mse").kernel_formats
    on = quantize_tensor(x, FMT, 32, method="mse")
    monkeypatch.setenv("QUANTIZE_KERNELS", "0")
    off = quantize_tensor(x, FMT, 32, method="mse")
    monkeypatch.delenv("QUANTIZE_KERNELS")
    assert same_bytes(on.data, off.data) and same_bytes(on.scales, off.scales)
    assert same_bytes(on.zero_points, off.zero_points)
    one = MSE.quantize_rows(FMT, x, 32, num_threads=1)
    two = MSE.quantize_rows(FMT, x, 32, num_threads=2)
    assert all(same_bytes(a, b) for a, b in zip(one, two, strict=True))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_input(dtype):
    h = matrix("student-t", 5, 8, 100).astype(dtype)
    got = MSE.quantize_rows(FMT, h, 32)
    wide = MSE.quantize_rows(FMT, h.astype(np.float32), 32)
    assert all(same_bytes(a, b) for a, b in zip(got, wide, strict=True))
    want = quantize_tensor(h, FMT, 32, method="mse")  # the NumPy path (computes in float32)
    assert same_bytes(got[0], want.data) and same_bytes(got[1], want.scales)
    assert same_bytes(got[2], want.zero_points)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), bs=st.sampled_from([16, 32, 128]), n=st.integers(1, 300))
def test_never_worse_than_ort_rtn(seed, bs, n):
    """The kernel's blocks: the objective never above round to nearest's (ORT's own rule)."""
    x = matrix("student-t", seed, 4, n)
    got = MSE.quantize_rows(FMT, x, bs)
    rtn = quantize_tensor(x, FMT, bs)
    pad = n_blocks(n, bs) * bs - n
    blocks = to_blocks(x, bs, -1)
    valid = bs - pad if pad else None
    dc, gain = MSE.dc_weight_for(FMT), MSE.gain_weight_for(FMT)
    e_got = search_error(ORT4, blocks, got[1], got[2], None, valid, dc, gain)
    e_rtn = search_error(ORT4, blocks, rtn.scales, rtn.zero_points, None, valid, dc, gain)
    assert np.all(e_got <= e_rtn)
