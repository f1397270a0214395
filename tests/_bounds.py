"""Error-bound checks shared by test_core.py and test_bad_input.py (not a test module).

A format's *unit grid* in a block is what its codes decode to with scale 1 and the block's zero
point: c - zp for the integer formats (uniform, step 1), the E2M1 or NF4 values for the float
ones. Three properties are checked per element, with x̂ = qt.dequantize(np.float64) (the
compute dtype's result, exactly):

* round to nearest: |x - x̂| is no larger than the distance from x to the nearest grid value;
* coverage: x lies within half the end step beyond the grid's range (nothing clips by more
  than half a step), except where a format documents a larger clip (CLIP_ALLOWANCE);
* for uniform grids (the integer formats): |x - x̂| <= scale/2 (or the format's CLIP_ALLOWANCE
  times scale, if larger), with the scale taken per block from qt.scales_along_axis() repeated
  along the axis.

The slack is the compute dtype's rounding only: a few ulps of the block's largest magnitude
(the zero point and x/scale are of that size) plus a few subnormal steps.
"""

from __future__ import annotations

import numpy as np

from quantize import QuantizedTensor, get_format

#: Largest documented clip beyond the grid's end, in units of the block scale. mxfp4 (OCP's
#: floor rule, formats/fp4.py MXFP4 docstring): amax / 2^e lies in [4, 8), so elements in
#: (6, 8) * 2^e clip to 6 * 2^e. int4_ort (ONNX Runtime's rule, formats/integer.py OrtInt4):
#: the extreme maps to -8 steps, so the other end clips at 7 steps, up to 1 step short.
CLIP_ALLOWANCE = {"mxfp4": 2.0, "int4_ort": 1.0}


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """Documented in core.compute_dtype: float64 runs in float64, everything else in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def work_layout(x: np.ndarray, qt: QuantizedTensor) -> np.ndarray:
    """x with the quantized axis last (flattened for axis=None)."""
    return x.reshape(-1) if qt.axis is None else np.moveaxis(x, qt.axis, -1)


def my_blocks(x: np.ndarray, qt: QuantizedTensor, fill: float = 0.0) -> np.ndarray:
    """x as float64 (*rows, nb, bs), padded with `fill`: computed here, not by the library."""
    w = work_layout(np.asarray(x).astype(np.float64), qt)
    n, bs = w.shape[-1], qt.block_size
    nb = -(-n // bs)
    pad = np.full((*w.shape[:-1], nb * bs - n), fill)
    return np.concatenate([w, pad], axis=-1).reshape(*w.shape[:-1], nb, bs)


def valid_mask(qt: QuantizedTensor, shape: tuple[int, ...]) -> np.ndarray:
    """True where a block position holds a real element (False on the padding)."""
    return ~np.isnan(my_blocks(np.zeros(qt.shape), qt, fill=np.nan)).reshape(shape)


def expand(per_block_axis_layout: np.ndarray, qt: QuantizedTensor) -> np.ndarray:
    """Block parameters in the tensor's layout (nb at `axis`) -> one per element."""
    p, bs = per_block_axis_layout, qt.block_size
    if qt.axis is None:
        return np.repeat(p.reshape(-1), bs)[: qt.size].reshape(qt.shape)
    n = qt.shape[qt.axis]
    return np.take(np.repeat(p, bs, axis=qt.axis), np.arange(n), axis=qt.axis)


def block_scales(qt: QuantizedTensor) -> np.ndarray:
    """Effective scales, (*rows, nb) float64: stored block scale times any tensor scale."""
    s = qt.scales.astype(np.float64)
    return s * float(qt.tensor_scale) if qt.tensor_scale is not None else s


def unit_grid(qt: QuantizedTensor) -> np.ndarray:
    """(*rows, nb, n_codes) float64: every code decoded with scale 1 and the block's zp."""
    fmt = get_format(qt.format)
    codes = np.arange(fmt.code_min, fmt.code_max + 1)
    codes = codes.astype(np.int8 if fmt.code_min < 0 else np.uint8)
    codes = np.ascontiguousarray(np.broadcast_to(codes, (*qt.scales.shape, codes.size)))
    ones = np.ones(qt.scales.shape, qt.scales.dtype)
    return np.asarray(fmt.decode(codes, ones, qt.zero_points), dtype=np.float64)


def is_uniform(grid: np.ndarray) -> bool:
    d = np.diff(np.sort(grid, axis=-1), axis=-1)
    return bool(np.all(np.abs(d - 1) <= 1e-5))


def code_of_zero(qt: QuantizedTensor) -> np.ndarray:
    """(*rows, nb) int64: the code +0.0 encodes to in each block (the padding's code)."""
    fmt = get_format(qt.format)
    if fmt.zero_point == "int":
        return qt.zero_points.astype(np.int64)
    if fmt.zero_point == "float":
        zp = qt.zero_points.astype(np.float64)
        return np.clip(np.rint(zp), fmt.code_min, fmt.code_max).astype(np.int64)
    grid = unit_grid(qt).reshape(-1, fmt.code_max - fmt.code_min + 1)[0]
    (zero,) = np.nonzero((grid == 0) & ~np.signbit(grid))
    return np.full(qt.scales.shape, fmt.code_min + int(zero[0]), np.int64)


def slack(x_blocks: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(*rows, nb, 1): a few ulps of each block's amax plus a few subnormal steps."""
    fi = np.finfo(compute_dtype(dtype))
    amax = np.abs(x_blocks).max(axis=-1, keepdims=True)
    return 8 * float(fi.eps) * amax + 4 * float(fi.smallest_subnormal)


def check_error_bounds(x, qt: QuantizedTensor) -> None:
    x = np.asarray(x)
    xhat = qt.dequantize(np.float64)
    assert xhat.shape == x.shape and xhat.dtype == np.float64
    assert np.all(np.isfinite(xhat)), f"{qt.format}: non-finite reconstruction of finite input"

    xb, hb = my_blocks(x, qt), my_blocks(xhat, qt)
    valid = valid_mask(qt, xb.shape)
    s = block_scales(qt)[..., None]  # (*rows, nb, 1)
    tol = slack(xb, x.dtype)
    err = np.abs(xb - hb)
    grid = unit_grid(qt)  # (*rows, nb, K)

    def fail(what: str, bad: np.ndarray, bound: np.ndarray) -> None:
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{qt.format} ({what}): x={xb[i]!r} x̂={hb[i]!r} err={err[i]!r} > {bound[i]!r}; "
            f"scale={s[i[:-1]][0]!r}, block_size={qt.block_size}, axis={qt.axis}, "
            f"dtype={x.dtype}"
        )

    # round to nearest: no grid value is closer to x than x̂
    values = grid[..., None, :] * s[..., None]  # (*rows, nb, 1, K)
    nearest = np.abs(xb[..., None] - values).min(axis=-1)
    bad = valid & (err > nearest + tol)
    if bad.any():
        fail("not the nearest grid value", bad, nearest + tol)

    # coverage: no element beyond the grid's ends by more than half the end step
    g = np.sort(grid, axis=-1)
    lo, hi = g[..., :1] * s, g[..., -1:] * s
    half_end = np.maximum(g[..., 1:2] - g[..., :1], g[..., -1:] - g[..., -2:-1]) / 2
    allowed = np.maximum(half_end, CLIP_ALLOWANCE.get(qt.format, 0.0)) * s + tol
    beyond = np.maximum(np.maximum(lo - xb, xb - hi), 0)
    bad = valid & (beyond > allowed)
    if bad.any():
        fail("clipped by more than half a step", bad, np.broadcast_to(allowed, xb.shape))

    # uniform grids: every element within scale/2, scales from scales_along_axis()
    if is_uniform(grid):
        s_el = expand(qt.scales_along_axis().astype(np.float64), qt)
        if qt.tensor_scale is not None:
            s_el = s_el * float(qt.tensor_scale)
        tol_el = my_unblock(np.broadcast_to(tol, xb.shape), qt)
        e = np.abs(x.astype(np.float64) - xhat)
        # scale/2, or the documented clip where it is larger (int4_ort's clipped end)
        half = max(0.5, CLIP_ALLOWANCE.get(qt.format, 0.0))
        bound = s_el * half * (1 + 1e-6) + tol_el
        if not np.all(e <= bound):
            i = np.unravel_index(int(np.argmax(e - bound)), e.shape)
            raise AssertionError(
                f"{qt.format}: |x - x̂| = {e[i]!r} > scale/2 bound {bound[i]!r} at {i}"
            )


def my_unblock(blocks: np.ndarray, qt: QuantizedTensor) -> np.ndarray:
    """Inverse of my_blocks: (*rows, nb, bs) -> the tensor's shape, padding dropped."""
    flat = blocks.reshape(*blocks.shape[:-2], -1)
    if qt.axis is None:
        return flat[: qt.size].reshape(qt.shape)
    return np.moveaxis(flat[..., : qt.shape[qt.axis]], -1, qt.axis)
