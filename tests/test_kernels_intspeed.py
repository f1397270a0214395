"""The fast paths of the int4/uint4/int4_ort quantize kernel (`kernels.intvec`) equal the NumPy
path.

The kernel computes x / scale as a reciprocal multiply with one FMA correction (scales in
[2**-60, 2**60]; others divide), int4 scales from 16-block amax vectors and uint4 and int4_ort
scales and zero points 16 blocks at a time (`_uint4_param_groups`, `_ort_param_groups`), falling
back to the exact scalar rules for spans that overflow, nudged and subnormal scales. These paths
only run on work items of 16 or more whole blocks, so the arrays here have enough blocks
(`quantize.kernels._chunk` gives at least 64 items: rows * blocks >= 1024). The correction's
argument is checked below on a sample of scales; QUANTIZE_EXHAUSTIVE=1 checks every float32
mantissa (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

pytest.importorskip("numba")

from quantize import kernels as K
from quantize.kernels import reference as R

FORMATS = ["int4", "uint4"]


def check(fmt: str, x: np.ndarray, bs: int, **kw) -> None:
    got = K.quantize_rows(fmt, x, bs, **kw)
    want = R.quantize_rows(fmt, x, bs)
    for name, g, w in zip(("packed", "scales", "zero_points"), got, want, strict=True):
        if g is None or w is None:
            assert g is None and w is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), f"{name} differ ({fmt})"


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _f32_step(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """x moved by k ulps (finite nonzero float32 of one sign, no crossing of zero)."""
    b = x.astype(np.float32).view(np.int32) + k.astype(np.int32)
    return b.view(np.float32)


def _near_ties(rng, fmt: str, rows: int, nb: int, bs: int) -> np.ndarray:
    """Blocks whose values lie within 3 ulps of scale * (k + 1/2), the scale known in advance:
    int4 pins amax (so scale = amax / 7), uint4 pins hi and lo (scale = (hi - lo) / 15)."""
    e = np.exp2(rng.integers(-40, 40, (rows, nb, 1))).astype(np.float32)
    m = rng.uniform(1.0, 2.0, (rows, nb, 1)).astype(np.float32)
    if fmt == "int4":
        amax = (m * e).astype(np.float32)
        scale = (amax / np.float32(7)).astype(np.float32)
        h = rng.integers(-7, 6, (rows, nb, bs)) + 0.5  # |h| <= 6.5: inside the block's range
        lo, hi = -amax, amax
    else:
        hi = (m * e).astype(np.float32)
        lo = (-rng.uniform(0.0, 1.0, (rows, nb, 1)) * hi).astype(np.float32)
        scale = ((hi - lo) / np.float32(15)).astype(np.float32)
        h = rng.integers(0, 15, (rows, nb, bs)) + 0.5 + np.floor(lo / scale)
    centre = (h.astype(np.float32) * scale).astype(np.float32)
    x = _f32_step(centre, rng.integers(-3, 4, centre.shape))
    x = np.where(centre == 0, centre, x)
    x = np.clip(x, lo, hi)
    x[..., 0] = hi[..., 0]
    x[..., 1] = lo[..., 0] if fmt == "uint4" else -amax[..., 0] * rng.uniform(0, 1)
    return np.ascontiguousarray(x.reshape(rows, nb * bs).astype(np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bs", [16, 32, 128])
def test_near_ties_match_division(fmt, bs):
    rng = rng_for(fmt, bs, "ties")
    rows, nb = 64, 32
    check(fmt, _near_ties(rng, fmt, rows, nb, bs), bs)


def _odd_blocks(rng, rows, n, bs):
    """Normal data with, here and there, blocks that leave the fast paths: all zero, constant,
    all negative, subnormal, tiny and huge scales (outside [2**-60, 2**60]), a span that
    overflows float32, and blocks one subnormal step above zero."""
    x = rng.standard_normal((rows, n)).astype(np.float32)
    nb = n // bs
    blocks = x[:, : nb * bs].reshape(rows, nb, bs)
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    kinds = rng.integers(0, 12, (rows, nb))
    for r, b in zip(*np.nonzero(kinds < 9), strict=True):
        k = kinds[r, b]
        v = blocks[r, b]
        if k == 0:
            v[:] = 0.0
        elif k == 1:
            v[:] = np.float32(-1.25)
        elif k == 2:
            v[:] = -np.abs(v)
        elif k == 3:
            v *= np.float32(1e-41)
        elif k == 4:
            v *= np.float32(1e-22)  # scale about 2**-75: divides
        elif k == 5:
            v *= np.float32(1e21)  # scale about 2**68: divides
        elif k == 6:
            v[::5] = np.float32(3e38)
            v[1::5] = np.float32(-3e38)
        elif k == 7:
            v[:] = 0.0
            v[rng.integers(0, bs)] = tiny
        else:
            v *= np.float32(2.0**-59)  # near the lower edge of the reciprocal path
    return x


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("rows", "n", "bs"), [(64, 2048, 128), (33, 4196, 128), (40, 1030, 32)])
def test_odd_blocks_inside_groups_of_16(fmt, rows, n, bs):
    rng = rng_for(fmt, rows, n, bs, "odd")
    x = _odd_blocks(rng, rows, n, bs)
    check(fmt, x, bs)
    # one odd block per row only: the rest of its group stays on the vector rule
    y = rng.standard_normal((rows, n)).astype(np.float32)
    y[:, 5] = np.float32(1e-41)
    y[::3, 3 * bs + 7] = np.float32(3e38)
    y[1::3, 3 * bs + 9] = np.float32(-3e38)
    check(fmt, y, bs)


@pytest.mark.parametrize(("rows", "n", "bs"), [(64, 2048, 128), (33, 4196, 128), (40, 1030, 32)])
def test_int4_ort_params_16_blocks_at_a_time(rows, n, bs):
    """int4_ort's vector parameter pass (`_ort_param_groups`) on items of >= 16 blocks: ties
    |max| == |min| (the minimum wins), all-positive and all-negative blocks, and, in a few rows
    only, a block whose scale |e| / 8 is subnormal (the item falls back to the scalar rule)."""
    rng = rng_for("int4_ort", rows, n, bs, "groups")
    x = rng.standard_normal((rows, n)).astype(np.float32)
    nb = n // bs
    blocks = x[:, : nb * bs].reshape(rows, nb, bs)
    kinds = rng.integers(0, 8, (rows, nb))
    for r, b in zip(*np.nonzero(kinds < 5), strict=True):
        v = blocks[r, b]
        m = np.abs(v).max()
        if kinds[r, b] == 0:
            v[3], v[9] = m, -m  # a tie: zero point 8
        elif kinds[r, b] == 1:
            v[:] = np.abs(v)
        elif kinds[r, b] == 2:
            v[:] = -np.abs(v)
        elif kinds[r, b] == 3:
            v[:] = 0.0
        else:
            v *= np.float32(2.0**100)  # large scales divide in the code pass
    check("int4_ort", x, bs)
    y = x.copy()
    y[::5, bs : 2 * bs] *= np.float32(1e-40)
    y[::5, bs + 2] = np.float32(-5e-38)  # amax in [tiny, 8 * tiny): the scale is subnormal
    y[1::7, 4 * bs : 5 * bs] *= np.float32(1e-41)
    check("int4_ort", y, bs)
    check("int4_ort", _odd_blocks(rng, rows, n, bs), bs)


@pytest.mark.parametrize("fmt", [*FORMATS, "int4_ort"])
def test_half_inputs_and_thread_counts_on_the_fast_paths(fmt):
    import ml_dtypes

    rng = rng_for(fmt, "half")
    x = rng.standard_normal((48, 4096)).astype(np.float32)
    x[::7, :128] *= np.float32(1e-30)
    for dt in (np.float16, np.dtype(ml_dtypes.bfloat16)):
        check(fmt, x.astype(dt), 128)
    ones = [K.quantize_rows(fmt, x, 128, num_threads=t) for t in (1, 2)]
    for a, b in zip(*ones, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)


# --------------------------------------------------------------------------- the argument


def _fma_quotient_checker():
    """A compiled check: for scale mantissas s in [1, 2) from `bits` (0 .. 2**23 - 1), every
    half-integer h in 0.5 .. 16.5 and every x within K ulps of fl(s * h), is the kernel's
    fma(fma(-y, s, x), inv, y) (y = x * inv, inv = 1 / s, float32) equal to fl(x / s)? Returns
    per scale: mismatches of the corrected quotient, and of rint(x * inv) without the correction
    (which shows the sample does reach the ties)."""
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic

    f32 = ir.FloatType()

    @intrinsic
    def fma32(typingctx, a, b, c):
        def codegen(context, builder, sig, args):
            f = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32] * 3))
            return builder.call(f, args)

        return types.float32(types.float32, types.float32, types.float32), codegen

    @intrinsic
    def div32(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return builder.fdiv(*args)

        return types.float32(types.float32, types.float32), codegen

    @njit(parallel=True)
    def run(bits, k):
        bad = np.zeros(bits.shape[0], np.int64)
        plain = np.zeros(bits.shape[0], np.int64)
        one = np.zeros(1, np.int32)
        for i in prange(bits.shape[0]):
            cell = one.copy()
            cell[0] = np.int32(0x3F800000) + bits[i]
            s = cell.view(np.float32)[0]
            inv = div32(np.float32(1.0), s)
            for hh in range(17):
                fcell = np.zeros(1, np.float32)
                fcell[0] = s * np.float32(hh + 0.5)
                c = fcell.view(np.int32)[0]
                for d in range(-k, k + 1):
                    cell[0] = c + d
                    x = cell.view(np.float32)[0]
                    z = div32(x, s)
                    y = x * inv
                    q = fma32(-y, s, x)
                    q = fma32(q, inv, y)
                    if q != z:
                        bad[i] += 1
                    if np.rint(y) != np.rint(z):
                        plain[i] += 1
        return bad, plain

    return run


def test_reciprocal_with_one_fma_equals_division_near_every_tie():
    run = _fma_quotient_checker()
    if os.environ.get("QUANTIZE_EXHAUSTIVE") == "1":
        bad = plain = 0
        step = 1 << 20
        for lo in range(0, 1 << 23, step):
            b, p = run(np.arange(lo, lo + step, dtype=np.int32), 8)
            bad += int(b.sum())
            plain += int(p.sum())
    else:
        bits = np.random.default_rng(7).integers(0, 1 << 23, 4096).astype(np.int32)
        bits[:3] = (0, 1, (1 << 23) - 1)  # 1.0, its successor, the largest mantissa
        b, p = run(bits, 8)
        bad, plain = int(b.sum()), int(p.sum())
    assert bad == 0
    assert plain > 0  # without the correction rint differs: the sample reaches the ties
