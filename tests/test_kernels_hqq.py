"""The compiled HQQ solver (`quantize.kernels.hqq`) equals the NumPy reference bit for bit.

`HalfQuadratic._solve_compiled` (the numba solver, int4/uint4/int8/uint8 and the float zero
point formats int4_affine/uint4_float_zp) against `HalfQuadratic.choose_params` on the NumPy
path, and the fused `quantize_rows` (int4, uint4) and `quantize_tensor` with the solver against
`quantize_tensor`'s NumPy path: scales and zero points byte for byte, packed codes too.
Arrays are small (the kernels compile once; numba's on-disk cache makes later runs fast).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from _matrices import matrix, same_bytes
from quantize import kernels, quantize_tensor
from quantize.algorithms import hqq as H
from quantize.algorithms.hqq import HQQ, HalfQuadratic, lp_power, solver_applies
from quantize.algorithms.mse import squared_error
from quantize.blocking import n_blocks, to_blocks
from quantize.formats import get_format
from quantize.kernels import hqq as K

SOLVER = ["int4", "uint4", "int8", "uint8", "int4_affine", "uint4_float_zp"]
FLOAT_ZP = ["int4_affine", "uint4_float_zp"]
BF16 = np.dtype(ml_dtypes.bfloat16)
KINDS = ["normal", "student-t", "zeros", "constant", "single", "sparse", "tiny", "huge"]


def _both(m: HalfQuadratic, fmt_name: str, x: np.ndarray, bs: int, monkeypatch):
    """(compiled, reference) params of x's blocks."""
    fmt = get_format(fmt_name)
    n = x.shape[-1]
    blocks = to_blocks(x, bs, -1)
    pad = n_blocks(n, bs) * bs - n
    lv = bs - pad if pad else None
    scale, zp = fmt.choose_params(blocks)
    got = m._solve_compiled(fmt, blocks, scale, zp, lv)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    want = m.choose_params(fmt, blocks, None, last_valid=lv)
    monkeypatch.delenv(kernels.ENV_SWITCH)
    return got, want, blocks, lv


def test_lp_power_accuracy_and_edges():
    a = np.geomspace(2.0**-99, 2.0**99, 20001).astype(np.float32)
    for p in (0.7, 0.3, 1.0):
        rel = np.abs(lp_power(a, p) / np.power(a.astype(np.float64), p) - 1)
        assert rel.max() < 2e-5  # float32 p ln(a): its rounding grows with |ln a|
        assert rel[np.abs(np.log2(a)) <= 10].max() < 1e-6
    e = lp_power(np.array([0.0, 2.0**-101, 2.0**101, np.inf, np.nan], np.float32), 0.7)
    assert e.dtype == np.float32
    assert e[0] == 0 and e[1] == 0 and e[2] == np.inf and e[3] == np.inf and e[4] == np.inf


def test_kernel_constants_are_the_references():
    names = [n for n in dir(H) if n.startswith(("_L", "_E")) and n[2:].isdigit()]
    names += ["_TINY", "_HUGE", "_SQRT2", "_LN2", "_INV_LN2", "_MANT", "_ONE_BITS", "_HALF"]
    assert len(names) > 12
    for name in names:
        k, h = getattr(K, name), getattr(H, name)
        assert k == h and np.asarray(k).dtype.kind == np.asarray(h).dtype.kind, name


@pytest.mark.parametrize("fmt", SOLVER)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 4),
    n=st.integers(1, 90),
    bs=st.sampled_from([1, 2, 5, 8, 16, 32, 33, 64]),
    upd=st.booleans(),
    iters=st.sampled_from([1, 3, 20]),
)
def test_solver_equals_numpy(fmt, kind, seed, rows, n, bs, upd, iters, monkeypatch):
    m = HalfQuadratic(iterations=iters, update_scale=upd)
    (gs, gz), (ws, wz), blocks, lv = _both(m, fmt, matrix(kind, seed, rows, n), bs, monkeypatch)
    assert same_bytes(gs, ws) and same_bytes(gz, wz)
    f = get_format(fmt)
    rs, rz = f.choose_params(blocks)
    assert np.all(
        squared_error(f, blocks, gs, gz, None, lv) <= squared_error(f, blocks, rs, rz, None, lv)
    )


@pytest.mark.parametrize("fmt", SOLVER)
def test_solver_edge_blocks(fmt, monkeypatch):
    """All-zero, one non-zero, constant and sign-constant blocks, and a partial last block,
    side by side in one call (they share SIMD lanes)."""
    x = np.zeros((6, 70), np.float32)
    x[1, 5] = 3.0
    x[2] = -1.25
    x[3] = np.linspace(0.1, 2.0, 70)
    x[4] = np.random.default_rng(1).standard_normal(70)
    x[5, -1] = -7.0  # alone in the partial last block
    m = HalfQuadratic(iterations=20)
    (gs, gz), (ws, wz), _, _ = _both(m, fmt, x, 32, monkeypatch)
    assert same_bytes(gs, ws) and same_bytes(gz, wz)
    qt = quantize_tensor(x, fmt, 32, method="hqq")
    assert np.all(qt.dequantize()[0] == 0) and np.all(qt.dequantize()[2] == -1.25)


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 4),
    n=st.integers(1, 90),
    bs=st.sampled_from([1, 3, 8, 16, 32, 64, None]),
    clip=st.sampled_from([1.0, 0.7]),
)
def test_fused_equals_numpy(fmt, kind, seed, rows, n, bs, clip):
    x = matrix(kind, seed, rows, n)
    got = HQQ.quantize_rows(fmt, x, bs, clip)
    want = quantize_tensor(x, fmt, bs, clip_ratio=clip, method="hqq")  # small: the NumPy path
    assert same_bytes(got[0], want.data) and same_bytes(got[1], want.scales)
    assert same_bytes(got[2], want.zero_points)


@pytest.mark.parametrize("dtype", [np.float16, BF16])
@pytest.mark.parametrize("fmt", ["int4", "uint4"])
def test_half_input(fmt, dtype):
    x = matrix("student-t", 4, 5, 200).astype(dtype)
    got = HQQ.quantize_rows(fmt, x, 32)
    assert all(
        same_bytes(a, b)
        for a, b in zip(got, HQQ.quantize_rows(fmt, x.astype(np.float32), 32), strict=True)
    )
    want = quantize_tensor(x, fmt, 32, method="hqq")  # the NumPy path, from float32 blocks
    assert same_bytes(got[0], want.data) and same_bytes(got[1], want.scales)


@pytest.mark.parametrize("fmt", ["int4", "uint4", "int8", *FLOAT_ZP])
def test_dispatch_threads(fmt, monkeypatch):
    x = matrix("student-t", 11, 256, 1024)  # 2^18 elements: the kernel's threshold
    f = get_format(fmt)
    assert solver_applies(f, to_blocks(x, 64, -1))
    on = quantize_tensor(x, fmt, 64, method="hqq")
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not solver_applies(f, to_blocks(x, 64, -1))
    off = quantize_tensor(x, fmt, 64, method="hqq")
    monkeypatch.delenv(kernels.ENV_SWITCH)
    assert same_bytes(on.data, off.data) and same_bytes(on.scales, off.scales)
    assert same_bytes(on.zero_points, off.zero_points)
    blocks = to_blocks(x[:64], 64, -1)
    s, z = f.choose_params(blocks)
    one = HQQ._solve_compiled(f, blocks, s, z, None, num_threads=1)
    two = HQQ._solve_compiled(f, blocks, s, z, None, num_threads=2)
    assert same_bytes(one[0], two[0]) and same_bytes(one[1], two[1])
    if fmt in HQQ.kernel_formats:
        a, b = (
            HQQ.quantize_rows(fmt, x[:64], 64, num_threads=1),
            HQQ.quantize_rows(fmt, x[:64], 64, num_threads=2),
        )
        assert all(same_bytes(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", [np.float16, BF16])
@pytest.mark.parametrize("fmt", FLOAT_ZP)
def test_float_zero_point_half_input_and_padding(fmt, dtype, monkeypatch):
    """quantize_tensor through the solver (threshold lowered) equals the NumPy path for
    float16/bfloat16 input, with a padded last block whose padding (the row's last value)
    differs from 0; the solver moves the float zero points off round to nearest's."""
    monkeypatch.setattr(kernels, "MIN_KERNEL_ELEMENTS", 1)
    x = matrix("student-t", 5, 7, 300).astype(dtype)
    x[:, -1] = np.array([3.0, -3.0, 0.0, 40.0, -40.0, 1e-3, 7.5], np.float32).astype(dtype)
    f = get_format(fmt)
    assert solver_applies(f, to_blocks(x.astype(np.float32), 64, -1))
    on = quantize_tensor(x, fmt, 64, method="hqq")
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    off = quantize_tensor(x, fmt, 64, method="hqq")
    monkeypatch.delenv(kernels.ENV_SWITCH)
    assert same_bytes(on.data, off.data) and same_bytes(on.scales, off.scales)
    assert same_bytes(on.zero_points, off.zero_points)
    rtn = quantize_tensor(x, fmt, 64)
    moved = on.zero_points != rtn.zero_points
    assert moved.mean() > 0.5 and np.any(on.zero_points[moved] % 1 != 0)
    x32 = x.astype(np.float32)
    err = ((on.dequantize(np.float64) - x32) ** 2).sum()
    assert err < ((rtn.dequantize(np.float64) - x32) ** 2).sum()


def test_quantize_rows_bad_input():
    with pytest.raises(ValueError, match="format"):
        HQQ.quantize_rows("nf4", np.ones((2, 8), np.float32), 8)
    with pytest.raises(ValueError, match="x2d"):
        HQQ.quantize_rows("int4", np.ones(8, np.float32), 8)
    with pytest.raises(TypeError, match="float64"):
        HQQ.quantize_rows("int4", np.ones((2, 8)), 8)
    r = HQQ.quantize_rows("uint4", np.ones((0, 8), np.float32), 4)
    assert r[0].shape == (0, 4) and r[1].shape == (0, 2) and r[2].shape == (0, 2)
    r = HalfQuadratic(iterations=0).quantize_rows("int4", np.ones((1, 8), np.float32), 4)
    assert same_bytes(r[1], quantize_tensor(np.ones((1, 8), np.float32), "int4", 4).scales)
