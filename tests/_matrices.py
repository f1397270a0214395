"""Seeded test matrices of the kinds that break quantizers (shared by the algorithm and kernel
tests)."""

from __future__ import annotations

import numpy as np

MATRIX_KINDS = ("normal", "student-t", "zeros", "constant", "single", "sparse", "ties", "tiny",
                "huge")  # fmt: skip


def matrix(kind: str, seed: int, rows: int, n: int, dtype=np.float32) -> np.ndarray:
    """A (rows, n) matrix of `kind` (one of MATRIX_KINDS), the same for the same seed."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal((rows, n))
    elif kind == "student-t":  # heavy tails, rows over several binades
        x = rng.standard_t(2.5, (rows, n)) * np.exp2(rng.integers(-6, 6, (rows, 1)))
    elif kind == "zeros":
        x = np.zeros((rows, n))
    elif kind == "constant":
        x = np.full((rows, n), rng.choice([-3.5, 0.1, 2.0**-130, 7.0]))
    elif kind == "single":  # one non-zero per row
        x = np.zeros((rows, n))
        x[np.arange(rows), rng.integers(0, n, rows)] = rng.standard_normal(rows) * 10
    elif kind == "sparse":  # mostly zero blocks with a few outliers
        x = rng.standard_normal((rows, n)) * (rng.random((rows, n)) < 0.1) * 100
    elif kind == "ties":  # multiples of 1/16 of a +-1 extreme: half steps of scale 1/8
        x = rng.integers(-16, 17, (rows, n)) / 16.0
        x[:, ::7] = rng.choice([-1.0, 1.0], (rows, 1))
    elif kind == "tiny":  # subnormal float32 range
        x = rng.standard_normal((rows, n)) * 2.0**-135
    elif kind == "huge":  # near float32's largest
        x = (rng.standard_normal((rows, n)) * 1e38).clip(-3.4e38, 3.4e38)
    else:
        raise ValueError(f"kind must be one of {MATRIX_KINDS}, got {kind!r}")
    return x.astype(dtype)


def awq_layers():
    """Hypothesis strategy: (w (k, n) student-t(3), x (s, k) with channel sizes 0.1-20, format,
    block size) for AWQ's property tests; k, n, s small, formats with and without zero points."""
    from hypothesis import strategies as st

    @st.composite
    def layer(draw):
        k, n, s = draw(st.integers(1, 40)), draw(st.integers(1, 6)), draw(st.integers(1, 30))
        fmt = draw(st.sampled_from(["int4", "uint4", "nf4", "mxfp4", "nvfp4"]))
        bs = draw(st.sampled_from([8, 16, None]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        w = rng.standard_t(3, (k, n)).astype(np.float32)
        x = rng.standard_normal((s, k)).astype(np.float32) * rng.uniform(0.1, 20, k)
        return w, x.astype(np.float32), fmt, bs

    return layer()


def same_bytes(a, b) -> bool:
    """Equal dtype, shape and bytes (None only equals None): "bit for bit" in the kernel tests."""
    if a is None or b is None:
        return a is None and b is None
    same = np.array_equal(a.view(np.uint8), b.view(np.uint8))
    return a.dtype == b.dtype and a.shape == b.shape and same
