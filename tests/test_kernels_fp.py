"""The fp4_e2m1, mxfp4, mxfp4_ceil, nvfp4 and nf4 kernels equal the NumPy path bit for bit.

Every case compares `quantize.kernels` with its NumPy twin `quantize.kernels.reference` (tied to
`quantize_tensor` below): packed bytes, block scales and nvfp4's tensor scale byte for byte, and
the dequantized values in float32, float16, bfloat16 and float64. Shapes are chosen so that the
kernels' work items hold 16 or more whole blocks (the vector path's 16-block amax tree), fewer
(one block at a time), padded last blocks, block sizes that are not multiples of 16, and one
block per row.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("numba")

from quantize import kernels as K
from quantize import quantize_tensor
from quantize.formats.nf4 import NF4_MIDPOINTS
from quantize.kernels import reference as R

FORMATS = ["fp4_e2m1", "mxfp4", "mxfp4_ceil", "nvfp4", "nf4"]
BF16 = np.dtype(ml_dtypes.bfloat16)
OUT_DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16, np.dtype(np.float64)]
F32_MAX = np.finfo(np.float32).max
E2M1_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def same(a, b) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0)."""
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(
            np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)
        )
    )


def check(fmt: str, x: np.ndarray, bs: int | None, threads: int | None = None):
    """Kernel == reference: quantize (packed, scales, tensor scale), then dequantize each dtype."""
    got = K.quantize_rows(fmt, x, bs, num_threads=threads)
    want = R.quantize_rows(fmt, x, bs)
    where = f"({fmt}, {x.dtype}, shape {x.shape}, block {bs})"
    assert same(got.packed, want.packed), f"packed differ {where}"
    assert same(got.scales, want.scales), f"scales differ {where}"
    assert got.zero_points is None and want.zero_points is None
    if fmt == "nvfp4":
        assert same(np.float32(got.tensor_scale), np.float32(want.tensor_scale)), where
    else:
        assert got.tensor_scale is None and want.tensor_scale is None
    n = x.shape[1]
    with np.errstate(over="ignore"):
        for dt in OUT_DTYPES:
            a = K.dequantize_rows(
                fmt, *got, n, bs, dt, num_threads=threads, tensor_scale=got.tensor_scale
            )
            b = R.dequantize_rows(fmt, *want, n, bs, dt, tensor_scale=want.tensor_scale)
            assert same(a, b), f"dequantized {dt} differ {where}"
    return got


# --------------------------------------------------------------------------- data


def _normal(rng, rows, n, fmt):
    return rng.standard_normal((rows, n)).astype(np.float32)


def _heavy(rng, rows, n, fmt):
    """Student-t(1.5) with outlier columns and row scales over 40 binades."""
    x = rng.standard_t(1.5, (rows, n)) * np.exp2(rng.integers(-20, 20, (rows, 1)))
    x[:, rng.integers(0, n, max(1, n // 50))] *= 100.0
    return x.astype(np.float32)


def _zeros(rng, rows, n, fmt):
    """All-zero blocks and rows, -0.0, a single non-zero in an otherwise zero row."""
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[:, : n // 2] = 0.0
    x[0] = 0.0
    x[0, n // 3] = -2.5
    x[rows // 2 :, 1::2] = -0.0
    x[rows // 2 :, : n // 4] = -0.0
    return x


def _subnormal(rng, rows, n, fmt):
    """Subnormal and tiny blocks (scales under/overflow, get nudged; nvfp4's tensor scale is
    subnormal where the whole tensor is) next to normal ones."""
    x = (rng.standard_normal((rows, n)) * 1e-40).astype(np.float32)
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    x[0, ::3] = tiny
    x[0, 1::3] = -tiny
    x[-1, ::2] = 3 * tiny
    if rows > 2:
        x[1] = (rng.standard_normal(n) * 1e-36).astype(np.float32)
        x[2] = rng.standard_normal(n).astype(np.float32) * np.float32(2.0**-120)
    return x


def _huge(rng, rows, n, fmt):
    """The float32 max region: +-3e38 and +-FLT_MAX next to ordinary and tiny blocks (mxfp4_ceil
    rounds values above 3.5 * 2^126 up to 2^128, which dequantizes past float32)."""
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[:, ::7] = 3e38
    x[:, 3::7] = -3.2e38
    x[-1] = F32_MAX * np.sign(rng.standard_normal(n)).astype(np.float32)
    x[0, : n // 2] *= np.float32(1e-38)
    return x


def _ties(rng, rows, n, fmt):
    """Values whose quotient by the block's effective scale is exactly a rounding boundary (E2M1
    midpoints, NF4's float32 thresholds), grid points and just either side of both."""
    nb = -(-n // 16)
    if fmt == "nf4":  # block amax 2^e: x * (1 / amax) is exact
        e = np.exp2(rng.integers(-30, 30, (rows, nb, 1))).astype(np.float32)
        mids = NF4_MIDPOINTS.astype(np.float32)
        v = rng.choice(np.concatenate([mids, -mids[::-1]]), (rows, nb, 16))
        v[..., 0] = 1.0
    else:
        if fmt == "nvfp4":  # tensor scale 2^-3 (amax 2688 * 2^-3 = 336), block scales 2^k
            e = np.exp2(rng.integers(-9, 6, (rows, nb, 1)) - 3).astype(np.float32)
            e[0, 0] = 448 * 2.0**-3  # this block holds the tensor amax, 6 * 56
        else:
            e = np.exp2(rng.integers(-10, 10, (rows, nb, 1))).astype(np.float32)
        pool = np.concatenate([E2M1_MIDPOINTS, E2M1_GRID[1:], -E2M1_MIDPOINTS, -E2M1_GRID])
        v = rng.choice(pool, (rows, nb, 16)).astype(np.float32)
        v[..., 0] = 6.0  # the block amax: scale 2^e (fp4_e2m1 amax / 6, mx 2^(e+2-2))
    x = (v * e).astype(np.float32)
    # a few neighbours of the ties, one ulp either side
    sel = rng.random(x.shape) < 0.15
    x[sel] = np.nextafter(x[sel], np.where(rng.random(sel.sum()) < 0.5, -np.inf, np.inf))
    x[..., 0] = (v[..., 0] * e[..., 0]).astype(np.float32)
    x = x.reshape(rows, nb * 16)[:, :n]
    return np.ascontiguousarray(x)


MAKERS = {
    "normal": _normal,
    "heavy": _heavy,
    "zeros": _zeros,
    "subnormal": _subnormal,
    "huge": _huge,
    "ties": _ties,
}
# (rows, n, block). Work items are about 4096 elements and at least 64 of them when there are
# enough blocks: (10, 2048, 16) gives items of 20 blocks (one 16-block amax tree + 4 single
# blocks), (20, 4096, 64) items of 20 blocks, (1, 8192, 16) of 8; the small ones one block per
# item; 1000 and 37 leave padded last blocks; 5 and 24 are not multiples of 16; None: one block
# per row (of 37: padded, odd; of 640: a multiple of 16).
SHAPES = [
    (10, 2048, 16),
    (20, 4096, 64),
    (1, 8192, 16),
    (9, 1000, 32),
    (3, 96, 16),
    (4, 200, 24),
    (2, 45, 5),
    (4, 37, None),
    (3, 640, None),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize(("rows", "n", "bs"), SHAPES)
def test_kernel_equals_numpy(fmt, kind, rows, n, bs):
    rng = np.random.default_rng(zlib.crc32(repr((fmt, kind, rows, n, bs)).encode()))
    check(fmt, MAKERS[kind](rng, rows, n, fmt), bs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_half_precision_input(fmt, dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((24, 1024)) * 50).astype(dtype)
    x[0, :40] = 0
    x[1, :64] = np.float32(1e-7)  # float16 subnormals
    x[2, ::5] = 60000.0 if dtype == np.float16 else 3e38
    x[2, 1::5] = -60000.0 if dtype == np.float16 else -3e38
    x[3] = -0.0
    for bs in (16, 32, 48, None):
        check(fmt, x, bs)
        check(fmt, np.ascontiguousarray(x[:3, :1000]), bs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_thread_counts_give_the_same_bytes(fmt, monkeypatch):
    rng = np.random.default_rng(11)
    for rows, n, bs in [(1, 8192, 32), (64, 320, 64), (3, 99, 3), (10, 2048, 16)]:
        x = _heavy(rng, rows, n, fmt)
        one = check(fmt, x, bs, threads=1)
        two = check(fmt, x, bs, threads=2)
        monkeypatch.setenv(K.ENV_THREADS, "1")
        env = K.quantize_rows(fmt, x, bs)
        monkeypatch.delenv(K.ENV_THREADS)
        for a, b, c in zip(one, two, env, strict=True):
            assert same(a, b) and same(a, c)
        assert same(np.float32(one.tensor_scale or 0), np.float32(two.tensor_scale or 0))


def test_exact_ties_round_as_the_formats_say():
    """E2M1 ties go to the even code, NF4's to the lower one: checked on the codes themselves."""
    rng = np.random.default_rng(7)
    for fmt in ("fp4_e2m1", "mxfp4", "nvfp4", "nf4"):
        x = np.ascontiguousarray(_ties(rng, 8, 512, fmt))
        res = check(fmt, x, 16)
        codes = np.stack([res.packed & 15, res.packed >> 4], -1).reshape(8, -1).astype(int)
        eff = res.scales
        if fmt == "nvfp4":
            assert res.tensor_scale == np.float32(2.0**-3)
            eff = res.scales * res.tensor_scale
        q = x / np.repeat(eff, 16, axis=1)
        if fmt == "nf4":
            mids = NF4_MIDPOINTS.astype(np.float32)
            tie = np.isin(q, mids)
            assert tie.mean() > 0.3
            assert np.all(codes[tie] == np.searchsorted(mids, q[tie]))  # the lower code
        else:
            tie = np.isin(np.abs(q), E2M1_MIDPOINTS)
            assert tie.mean() > 0.2
            assert np.all(codes[tie] % 2 == 0)  # even: mantissa bit 0


def test_mxfp4_ceil_overflow_to_2_128_saturates():
    """Values above 3.5 * 2^126 in a block with exponent 126 round to 4 * 2^126 = 2^128: float32
    (and float16, bfloat16) output saturates to the largest finite value; float64 keeps 2^128."""
    x = np.full((4, 64), 3.0e38, np.float32)
    x[1] = -3.3e38
    x[2, ::2] = F32_MAX
    x[3, :32] = 1.0
    res = check("mxfp4_ceil", x, 32)
    assert np.all(res.scales[:3] == np.float32(2.0**126))
    out = K.dequantize_rows("mxfp4_ceil", *res, 64, 32, np.float32)
    assert out[0, 0] == F32_MAX and out[1, 0] == -F32_MAX
    out64 = K.dequantize_rows("mxfp4_ceil", *res, 64, 32, np.float64)
    assert out64[0, 0] == 2.0**128
    assert K.dequantize_rows("mxfp4_ceil", *res, 64, 32, np.float16)[0, 0] == 65504
    bf = K.dequantize_rows("mxfp4_ceil", *res, 64, 32, BF16)
    assert bf[0, 0] == ml_dtypes.finfo(BF16).max


def test_nvfp4_zero_effective_scale_matches_numpy():
    """A subnormal tensor scale times a small E4M3 block scale underflows to 0 in float32: the
    NumPy path then divides by 0 (inf codes, NaN for zeros, mapped as e2m1_encode maps NaN)."""
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    x = np.zeros((2, 64), np.float32)
    x[0, 0] = 40 * tiny  # the tensor amax: tensor scale ~ 2^-149
    x[0, 16] = tiny  # a block whose effective scale underflows
    x[0, 17] = -tiny
    x[1, 5] = -3 * tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        check("nvfp4", x, 16)
        check("nvfp4", x, 5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dt", OUT_DTYPES)
def test_dequantize_rounds_once_and_saturates(fmt, dt):
    """Random codes times random positive float32 scales over the whole range (for nvfp4 E4M3
    block scales, and hand-made scales that are not, times random tensor scales): each value is
    the exact product rounded once to the output dtype, saturating."""
    rng = np.random.default_rng(1)
    rows = 1 << 13
    bits = rng.integers(1, 0x7F800000, rows, dtype=np.int64).astype(np.uint32)
    edges = np.array([0x387FC000, 0x33000000, 0x477FE000, 0x477FF000, 0x7F7FFFFF, 0x7E800000,
                      0x00800000, 0x00000001, 0x3F800000, 0x00400000], np.uint32)  # fmt: skip
    bits[: edges.size] = edges
    scales = bits.view(np.float32).reshape(-1, 1)
    packed = rng.integers(0, 256, (rows, 16), dtype=np.uint8)
    ts = None
    if fmt == "nvfp4":
        e4m3 = rng.integers(1, 0x7F, rows, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
        scales = e4m3.astype(np.float32).reshape(-1, 1)
        scales[-64:] = bits[-64:].view(np.float32).reshape(-1, 1)  # not E4M3 values
        ts = np.float32(3.7e-3)
    for n, bs in [(32, 32), (31, 32), (32, 8)]:
        s = scales if bs == 32 else np.repeat(scales, 4, axis=1)
        p = packed
        with np.errstate(over="ignore"):
            got = K.dequantize_rows(fmt, p, s, None, n, bs, dt, tensor_scale=ts)
            want = R.dequantize_rows(fmt, p, s, None, n, bs, dt, tensor_scale=ts)
        assert same(got, want), (n, bs)
        assert np.isfinite(got.astype(np.float64)).all()
    if fmt == "nvfp4":
        # subnormal, huge, exact and not a float32 at all (taken in float64, as NumPy does)
        for t in (np.float32(1e-40), np.float32(3e38), np.float32(1.0), 0.1):
            got = K.dequantize_rows(fmt, packed, scales, None, 32, 32, dt, tensor_scale=t)
            with np.errstate(over="ignore"):
                want = R.dequantize_rows(fmt, packed, scales, None, 32, 32, dt, tensor_scale=t)
            assert same(got, want), t


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_is_the_core_path(fmt):
    """The twin the kernels are held to returns what quantize_tensor stores (NumPy path)."""
    rng = np.random.default_rng(2)
    x = np.clip(_heavy(rng, 6, 1000, fmt), -6e4, 6e4)  # finite in float16
    for dtype in (np.float32, np.float16, BF16):
        xd = x.astype(dtype)
        for bs in (16, 64, None):
            qt = quantize_tensor(xd, fmt, block_size=bs)
            res = R.quantize_rows(fmt, xd, bs)
            assert same(res.packed, qt.data) and same(res.scales, qt.scales)
            assert same(res.tensor_scale, qt.tensor_scale)
            for dt in OUT_DTYPES:
                back = R.dequantize_rows(
                    fmt, *res, 1000, qt.block_size, dt, tensor_scale=res.tensor_scale
                )
                assert same(back, qt.dequantize(dt))


def test_result_unpacks_as_three_arrays_and_pickles():
    import pickle

    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    res = K.quantize_rows("nvfp4", x, 16)
    packed, scales, zp = res
    assert zp is None and res.packed is packed and res.scales is scales
    assert isinstance(res.tensor_scale, np.float32) and res.tensor_scale > 0
    back = pickle.loads(pickle.dumps(res))
    assert same(back.packed, packed) and back.tensor_scale == res.tensor_scale
    assert K.quantize_rows("mxfp4", x, 32).tensor_scale is None


def test_available_and_wanted():
    for fmt in FORMATS:
        assert K.available(fmt, np.float32) and K.available(fmt, BF16)
        assert K.available(fmt, np.float64, "dequantize")
        assert not K.available(fmt, np.float64)
    from quantize import get_format

    big = K.MIN_KERNEL_ELEMENTS
    assert K.wanted(get_format("nf4"), np.float32, big)
    # a caller that cannot carry nvfp4's tensor scale must not get the kernel
    assert not K.wanted(get_format("nvfp4"), np.float32, big)
    assert K.wanted(get_format("nvfp4"), np.float32, big, tensor_scale=True)
    assert K.wanted(get_format("nvfp4"), np.float16, big, "dequantize", tensor_scale=True)


def test_bad_arguments():
    x = np.ones((2, 32), np.float32)
    res = K.quantize_rows("nvfp4", x, 16)
    with pytest.raises(ValueError, match="tensor_scale"):
        K.dequantize_rows("nvfp4", *res, 32, 16)
    with pytest.raises(ValueError, match="tensor_scale"):
        K.dequantize_rows("nvfp4", *res, 32, 16, tensor_scale=-1.0)
    p, s, _ = K.quantize_rows("nf4", x, 16)
    with pytest.raises(ValueError, match="tensor scale"):
        K.dequantize_rows("nf4", p, s, None, 32, 16, tensor_scale=np.float32(1))
    with pytest.raises(ValueError, match="zero points"):
        K.dequantize_rows("mxfp4", p, s, s.astype(np.uint8), 32, 16)
    with pytest.raises(TypeError, match="float64"):
        K.quantize_rows("mxfp4", x.astype(np.float64), 32)


# --- the core's dispatch ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("shape", "axis", "dtype", "bs"),
    [
        ((600, 512), -1, np.float32, "auto"),
        ((512, 600), 0, np.float16, 32),
        ((3, 100, 1000), None, np.int16, "auto"),
    ],
)
def test_quantize_tensor_uses_the_kernels_and_agrees(fmt, shape, axis, dtype, bs, monkeypatch):
    from quantize import kernels

    rng = np.random.default_rng(7)
    x = (rng.standard_t(3, size=shape) * 20).astype(dtype)
    assert x.size >= kernels.MIN_KERNEL_ELEMENTS
    calls = []
    real_q, real_dq = kernels.quantize_rows, kernels.dequantize_rows
    monkeypatch.setattr(
        kernels, "quantize_rows", lambda *a, **k: calls.append("q") or real_q(*a, **k)
    )
    monkeypatch.setattr(
        kernels, "dequantize_rows", lambda *a, **k: calls.append("dq") or real_dq(*a, **k)
    )
    fast = quantize_tensor(x, fmt, bs, axis)
    fast_out = [fast.dequantize(dt) for dt in (None, np.float16)]
    kernel_calls = list(calls)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    slow = quantize_tensor(x, fmt, bs, axis)
    slow_out = [slow.dequantize(dt) for dt in (None, np.float16)]
    assert calls == kernel_calls  # the switch turned the kernels off
    assert fast.data.tobytes() == slow.data.tobytes()
    assert fast.scales.tobytes() == slow.scales.tobytes()
    assert same(fast.tensor_scale, slow.tensor_scale)
    for a, b in zip(fast_out, slow_out, strict=True):
        assert same(a, b)
    assert kernel_calls == ["q", "dq", "dq"]


@pytest.mark.parametrize("avx512", [True, False])
def test_nf4_vector_code_and_value_paths(avx512, monkeypatch):
    """NF4's 16-lane encode (binary search over the midpoints) and decode, both ways they are
    built (vpermps on AVX-512, selects elsewhere), on every midpoint and its neighbours and on
    random values: the codes of nf4_encode, the values of NF4_VALUES."""
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from quantize.formats.nf4 import NF4_VALUES, nf4_encode
    from quantize.kernels import fp4, nf4

    host = nf4._has_avx512()
    if avx512 and not host:
        pytest.skip("numba does not compile for AVX-512 here")
    monkeypatch.setattr(nf4, "_has_avx512", lambda: avx512)

    @intrinsic
    def unit(typingctx, x, codes, values, off):
        def codegen(context, builder, sig, args):
            v = fp4._vload(context, builder, sig.args[0], args[0], args[3])
            c = nf4._nf4_code_vec(builder, v)
            for arrty, arr, vec in ((sig.args[1], args[1], c), (sig.args[2], args[2], None)):
                if vec is None:
                    vec = builder.bitcast(nf4._nf4_value_vec(builder, c), c.type)
                ptr = fp4._ptr(context, builder, arrty, arr, args[3])
                builder.store(vec, builder.bitcast(ptr, ir.PointerType(vec.type)), align=4)
            return context.get_dummy_value()

        return types.void(x, codes, values, types.intp), codegen

    @njit
    def run(x, codes, values):
        for i in range(0, x.shape[0], 16):
            unit(x, codes, values, i)

    mids = NF4_MIDPOINTS.astype(np.float32)
    near = np.concatenate([mids, np.nextafter(mids, -2), np.nextafter(mids, 2), NF4_VALUES])
    rng = np.random.default_rng(5)
    x = np.concatenate([near, -near, rng.uniform(-1.2, 1.2, 4096).astype(np.float32)])
    x = np.concatenate([x, np.zeros(-x.size % 16, np.float32)]).astype(np.float32)
    codes = np.empty(x.size, np.int32)
    values = np.empty(x.size, np.int32)
    run(x, codes, values)
    assert np.array_equal(codes, nf4_encode(x).astype(np.int32))
    assert same(values.view(np.float32), NF4_VALUES[codes])
