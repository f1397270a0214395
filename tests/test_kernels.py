"""The compiled int4/uint4 kernels equal the NumPy path bit for bit.

Every case compares `quantize.kernels` with its NumPy twin `quantize.kernels.reference` (itself
tied to `quantize_tensor` below): packed bytes, scales and zero points byte for byte, and the
dequantized values against `QuantizedTensor.dequantize`. Arrays are small: the time goes into
compiling the kernels once (numba's on-disk cache makes later runs fast).
"""

from __future__ import annotations

import subprocess
import sys
import zlib

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("numba")

from quantize import kernels as K
from quantize import quantize_tensor
from quantize.kernels import reference as R

FORMATS = ["int4", "uint4"]
BF16 = np.dtype(ml_dtypes.bfloat16)
OUT_DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16, np.dtype(np.float64)]


def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    if a is None or b is None:
        return a is None and b is None
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(
            np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)
        )
    )


def check_quantize(fmt: str, x: np.ndarray, bs: int | None, **kw) -> tuple:
    got = K.quantize_rows(fmt, x, bs, **kw)
    want = R.quantize_rows(fmt, x, bs)
    for name, g, w in zip(("packed", "scales", "zero_points"), got, want, strict=True):
        assert same(g, w), f"{name} differ ({fmt}, shape {x.shape}, block {bs})"
    return got


# --------------------------------------------------------------------------- data


def _normal(rng, rows, n):
    return rng.standard_normal((rows, n)).astype(np.float32)


def _heavy(rng, rows, n):
    """Student-t(1.5) with outlier columns and row scales over 20 binades."""
    x = rng.standard_t(1.5, (rows, n)) * np.exp2(rng.integers(-10, 10, (rows, 1)))
    x[:, rng.integers(0, n, max(1, n // 50))] *= 100.0
    return x.astype(np.float32)


def _ties(rng, rows, n, fmt, bs):
    """Blocks whose scale is exactly 2**e and whose values are (k + 1/2) * 2**e: x/scale ties."""
    nb = -(-n // bs)
    e = np.exp2(rng.integers(-20, 20, (rows, nb, 1))).astype(np.float32)
    k = rng.integers(-7 if fmt == "int4" else -8, 7, (rows, nb, bs))  # |x| <= 7.5 * 2**e
    x = (k + 0.5).astype(np.float32) * e
    # pin the block range: int4 amax 7 * 2**e; uint4 [lo, hi] = [-8, 7] * 2**e (span 15 * 2**e)
    x[..., 0] = 7 * e[..., 0]
    if fmt == "uint4":
        x[..., 1] = -8 * e[..., 0]
    x = x.reshape(rows, nb * bs)[:, :n]
    return np.ascontiguousarray(x)


def _zeros_and_singles(rng, rows, n):
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[:, : n // 2] = 0.0
    x[0] = 0.0
    x[0, n // 3] = -2.5  # a single non-zero in an otherwise zero row
    x[rows // 2 :, 1::2] = -0.0
    return x


def _subnormal(rng, rows, n):
    """Blocks of subnormals (1e-40 and the smallest ones): scales under/overflow and get nudged."""
    x = (rng.standard_normal((rows, n)) * 1e-40).astype(np.float32)
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    x[0, ::3] = tiny
    x[0, 1::3] = -tiny
    x[-1, ::2] = 3 * tiny
    return x


def _huge(rng, rows, n):
    """+-3e38 (uint4's span overflows float32) next to ordinary and tiny blocks."""
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[:, ::7] = 3e38
    x[:, 3::7] = -3e38
    x[-1] = np.float32(3.4028235e38) * np.sign(rng.standard_normal(n)).astype(np.float32)
    x[0, : n // 2] *= np.float32(1e-38)
    return x


MAKERS = {
    "normal": _normal,
    "heavy": _heavy,
    "zeros": _zeros_and_singles,
    "subnormal": _subnormal,
    "huge": _huge,
}
# (rows, n, block): block sizes 16/32/64/128, lengths not divisible by the block, odd blocks,
# one block per row (None), one row and many rows
SHAPES = [
    (1, 1000, 128),
    (9, 1000, 128),
    (5, 37, 16),
    (3, 96, 32),
    (6, 200, 64),
    (40, 64, 16),
    (4, 37, None),
    (3, 256, None),
    (2, 45, 5),
    (1, 1, 16),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize(("rows", "n", "bs"), SHAPES)
def test_quantize_matches_reference(fmt, kind, rows, n, bs):
    rng = np.random.default_rng(zlib.crc32(repr((fmt, kind, rows, n, bs)).encode()))
    check_quantize(fmt, MAKERS[kind](rng, rows, n), bs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("rows", "n", "bs"), [(4, 512, 16), (3, 1000, 128), (2, 37, 37)])
def test_exact_ties_round_half_to_even(fmt, rows, n, bs):
    rng = np.random.default_rng(7)
    x = _ties(rng, rows, n, fmt, bs)
    packed, scales, zp = check_quantize(fmt, x, bs)
    frac = (x / np.repeat(scales, bs, axis=1)[:, :n]) % 1
    assert np.mean(frac == 0.5) > 0.5  # the data really are ties
    # and they went to even: code (minus zero point) is even wherever x/scale is a tie
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(rows, -1)[:, :n].astype(int)
    codes = (codes ^ 8) - 8 if fmt == "int4" else codes - np.repeat(zp, bs, axis=1)[:, :n]
    tie = frac == 0.5
    assert np.all(codes[tie] % 2 == 0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_half_precision_input(fmt, dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 300)) * 50).astype(dtype)
    x[0, :40] = 0
    x[1, :64] = np.float32(1e-7)  # float16 subnormals
    x[2, ::5] = 60000.0 if dtype == np.float16 else 3e38
    x[2, 1::5] = -60000.0 if dtype == np.float16 else -3e38
    for bs in (16, 128, None):
        check_quantize(fmt, x, bs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_thread_count_does_not_change_the_bytes(fmt, monkeypatch):
    rng = np.random.default_rng(11)
    for rows, n, bs in [(1, 4000, 32), (64, 300, 128), (3, 99, 3)]:
        x = _heavy(rng, rows, n)
        one = check_quantize(fmt, x, bs, num_threads=1)
        two = check_quantize(fmt, x, bs, num_threads=2)
        monkeypatch.setenv(K.ENV_THREADS, "1")
        env = K.quantize_rows(fmt, x, bs)
        monkeypatch.delenv(K.ENV_THREADS)
        for a, b, c in zip(one, two, env, strict=True):
            assert same(a, b) and same(a, c)
        d1 = K.dequantize_rows(fmt, *one, n, bs, num_threads=1)
        d2 = K.dequantize_rows(fmt, *one, n, bs, num_threads=2)
        assert same(d1, d2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("rows", "n", "bs"), [(7, 1000, 128), (5, 37, 16), (3, 37, None), (2, 45, 5)]
)
def test_dequantize_matches_quantized_tensor(fmt, rows, n, bs):
    rng = np.random.default_rng(5)
    x = np.concatenate([_heavy(rng, rows, n), _subnormal(rng, 2, n), _huge(rng, 2, n)])
    qt = quantize_tensor(x, fmt, block_size=bs)
    with np.errstate(over="ignore"):  # float16 output of +-3e38: inf, as NumPy's cast gives
        for dt in OUT_DTYPES:
            got = K.dequantize_rows(fmt, qt.data, qt.scales, qt.zero_points, n, qt.block_size, dt)
            assert same(got, qt.dequantize(dt)), dt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dt", OUT_DTYPES)
def test_dequantize_rounds_once_and_saturates(fmt, dt):
    """Random codes times random float32 scales over the whole range: each value is the exact
    product rounded once to the output dtype (float16 directly from float64, not via float32;
    bfloat16 the way ml_dtypes casts), subnormal results included, and values past the dtype's
    range clamp to its largest finite value."""
    rng = np.random.default_rng(1)
    rows, half = 1 << 15, 1 << 14
    # first half: any positive float32 scale, any codes and zero points
    bits = rng.integers(1, 0x7F800000, rows, dtype=np.int64).astype(np.uint32)
    edges = np.array([0x387FC000, 0x387FE000, 0x33000000, 0x33000001, 0x477FE000, 0x477FEFFF,
                      0x477FF000, 0x7F7FFFFF, 0x7F7F8000, 0x00800000, 0x00000001, 0x3F800000],
                     np.uint32)  # fmt: skip
    bits[: edges.size] = edges
    packed = rng.integers(0, 256, (rows, 4), dtype=np.uint8)
    zp = rng.integers(0, 16, (rows, 1), dtype=np.uint8)
    # second half: scales in float16's normal range times odd codes +-3..7 (zero point 0), whose
    # 26-bit products are where rounding through float32 first would differ (about 1 in 2**14)
    bits[half:] = rng.integers(0x38800000, 0x47000000, half, dtype=np.int64).astype(np.uint32)
    odd = np.array([3, 5, 7, 9, 11, 13], np.uint8)  # 9, 11, 13 are -7, -5, -3 in int4
    packed[half:] = rng.choice(odd, (half, 4)) | (rng.choice(odd, (half, 4)) << 4)
    zp[half:] = 0
    scales = bits.view(np.float32).reshape(-1, 1)
    zp = zp if fmt == "uint4" else None
    got = K.dequantize_rows(fmt, packed, scales, zp, 8, 8, dt)
    want = R.dequantize_rows(fmt, packed, scales, zp, 8, 8, dt)
    assert same(got, want)
    assert np.isfinite(got.astype(np.float64)).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_is_the_core_path(fmt):
    """The twin the kernels are held to returns what quantize_tensor stores (NumPy path)."""
    rng = np.random.default_rng(2)
    x = np.clip(_heavy(rng, 6, 1000), -6e4, 6e4)  # finite in float16
    for dtype in (np.float32, np.float16, BF16):
        xd = x.astype(dtype)
        for bs in (32, 128, None):
            qt = quantize_tensor(xd, fmt, block_size=bs)
            packed, scales, zp = R.quantize_rows(fmt, xd, bs)
            assert same(packed, qt.data) and same(scales, qt.scales)
            assert same(zp, qt.zero_points)
            for dt in OUT_DTYPES:
                back = R.dequantize_rows(fmt, packed, scales, zp, 1000, qt.block_size, dt)
                assert same(back, qt.dequantize(dt))


def test_three_d_tensor_along_the_last_axis():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, 200)).astype(np.float32)
    qt = quantize_tensor(x, "uint4", block_size=64)
    packed, scales, zp = K.quantize_rows("uint4", x.reshape(-1, 200), 64)
    assert same(packed.reshape(qt.data.shape), qt.data)
    assert same(scales.reshape(qt.scales.shape), qt.scales)
    assert same(zp.reshape(qt.zero_points.shape), qt.zero_points)
    out = K.dequantize_rows("uint4", packed, scales, zp, 200, 64)
    assert same(out.reshape(x.shape), qt.dequantize())


def test_out_argument_and_non_contiguous_input():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((100, 64)).astype(np.float32)
    got = check_quantize("int4", x.T, 32)  # (64, 100), copied to C order first
    out = np.empty((64, 100), np.float32)
    res = K.dequantize_rows("int4", *got, 100, 32, out=out)
    assert res is out and same(out, R.dequantize_rows("int4", *got, 100, 32))


def test_available():
    assert K.available("int4", np.float32) and K.available("uint4", BF16)
    assert K.available("uint4", np.float64, "dequantize")
    assert not K.available("int4", np.float64)
    assert not K.available("int4_affine", np.float32)
    assert not K.available("int4", np.int8)
    with pytest.raises(ValueError, match="op"):
        K.available("int4", np.float32, "both")


def test_bad_arguments_raise_instead_of_reading_out_of_bounds():
    x = np.ones((2, 10), np.float32)
    p, s, z = K.quantize_rows("uint4", x, 4)
    with pytest.raises(ValueError, match="format"):
        K.quantize_rows("int8", x, 4)
    with pytest.raises(TypeError, match="float64"):
        K.quantize_rows("int4", x.astype(np.float64), 4)
    with pytest.raises(ValueError, match="2-D"):
        K.quantize_rows("int4", x.reshape(-1), 4)
    with pytest.raises(ValueError, match="block_size"):
        K.quantize_rows("int4", x, 0)
    with pytest.raises(ValueError, match="packed"):
        K.dequantize_rows("uint4", p[:, :-1], s, z, 10, 4)
    with pytest.raises(ValueError, match="scales"):
        K.dequantize_rows("uint4", p, s[:, :2], z, 10, 4)
    with pytest.raises(ValueError, match="zero_points"):
        K.dequantize_rows("uint4", p, s, None, 10, 4)
    with pytest.raises(ValueError, match="zero points"):
        K.dequantize_rows("int4", p, s, z, 10, 4)
    with pytest.raises(ValueError, match="out"):
        K.dequantize_rows("uint4", p, s, z, 10, 4, out=np.empty((2, 9), np.float32))
    with pytest.raises(ValueError, match="num_threads"):
        K.quantize_rows("int4", x, 4, num_threads=0)


def test_importing_the_package_does_not_import_numba():
    code = "import sys, quantize.kernels; assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the core's dispatch ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
@pytest.mark.parametrize(
    ("shape", "axis", "dtype"),
    [((600, 500), -1, np.float32), ((600, 500), 0, np.float16), ((3, 100, 1000), None, np.int16)],
)
def test_quantize_tensor_uses_the_kernel_for_big_arrays_and_agrees(
    fmt, shape, axis, dtype, monkeypatch
):
    from quantize import kernels
    from quantize.core import quantize_tensor

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
    fast = quantize_tensor(x, fmt, 128, axis)
    fast_out = fast.dequantize()
    assert calls == ["q", "dq"]
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    slow = quantize_tensor(x, fmt, 128, axis)
    slow_out = slow.dequantize()
    assert calls == ["q", "dq"]  # the switch turned the kernels off
    assert fast.data.tobytes() == slow.data.tobytes()
    assert fast.scales.tobytes() == slow.scales.tobytes()
    if slow.zero_points is not None:
        assert fast.zero_points.tobytes() == slow.zero_points.tobytes()
    assert fast_out.dtype == slow_out.dtype and fast_out.tobytes() == slow_out.tobytes()


@pytest.mark.parametrize("fmt", [*FORMATS, "int4_ort"])
@pytest.mark.parametrize(("rows", "n", "bs"), [(3, 100, 24), (2, 50, 10), (4, 96, 48)])
def test_even_blocks_not_a_multiple_of_16(fmt, rows, n, bs):
    """Such blocks skip the 16-lane loops: the nibble-by-nibble path, both directions."""
    x = _heavy(np.random.default_rng(bs), rows, n)
    got = check_quantize(fmt, x, bs)
    want = R.dequantize_rows(fmt, *got, n, bs)
    assert same(K.dequantize_rows(fmt, *got, n, bs), want)


@pytest.mark.parametrize("fmt", [*FORMATS, "int4_ort"])
def test_streaming_stores_write_the_same_values(fmt, monkeypatch):
    """Large float32 results go out by non-temporal stores; forced on for small ones here,
    they must write exactly what plain stores write (and be skipped where unaligned)."""
    rng = np.random.default_rng(13)
    monkeypatch.setattr(K, "_STREAM_MIN_BYTES", 0)
    for rows, n, bs in [(7, 1024, 128), (5, 1000, 32), (3, 96, 16), (2, 45, 5)]:
        x = np.concatenate([_heavy(rng, rows, n), _subnormal(rng, 2, n), _huge(rng, 2, n)])
        res = check_quantize(fmt, x, bs)
        want = R.dequantize_rows(fmt, *res, n, bs)
        base = np.empty(x.size + 8, np.float32)
        for shift in (0, 1):  # a 16-byte aligned result, then one 4 bytes off
            off = (-base.ctypes.data // 4) % 4 + shift
            out = base[off : off + x.size].reshape(x.shape)
            if shift == 0 and n % 4 == 0 and bs % 16 == 0:
                assert K._stream(out, bs) == K._X86
            else:
                assert not K._stream(out, bs)
            assert same(K.dequantize_rows(fmt, *res, n, bs, out=out), want)
