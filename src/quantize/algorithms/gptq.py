"""GPTQ: quantize a MatMul weight row by row, pushing each row's error onto the rows not yet done.

Objective: the layer's output error on calibration inputs X, ||X W - X Ŵ||^2 = tr(D^T H D) with
D = W - Ŵ and H = X^T X. Rows of W (input features, axis 0 of an ONNX MatMul's B, y = x @ B)
are quantized in order; after row i is rounded, the remaining rows absorb its error weighted by
the inverse Hessian (Frantar et al., "GPTQ", 2022), which is what round-to-nearest ignores.

Layout and parameters: the result is laid out exactly as `quantize_tensor(weight, format,
block_size, axis=0)` (blocks of `block_size` input rows per output column), so every writer
treats it the same. Each group's (scale, zero point) comes from the registered method's
`choose_params` on that group's weights as they stand when GPTQ reaches the group (already
carrying the error pushed from earlier rows); codes come from the format's `encode`. With an
identity Hessian nothing is pushed (its inverse has no off-diagonal terms), so the result is
byte for byte round-to-nearest's.

Numerics: all Hessian work is float64; the weights are updated in float64 but every rounding
decision sees them in the dtype `quantize_tensor` would compute in (float32 for float32 input).
"""

from __future__ import annotations

import numpy as np

from .._checks import as_bool, as_finite_float, as_int, as_real_array, check_finite
from ..blocking import n_blocks, to_blocks
from ..core import compute_dtype, prepare, quantize_tensor, resolve_block
from ..formats import get_format
from ..formats.base import effective_scale
from ..packing import pack_nibbles
from ..tensor import QuantizedTensor
from . import get_method

__all__ = ["gptq_quantize", "hessian_from_activations", "output_error_trace"]


def hessian_from_activations(x, hessian: np.ndarray | None = None) -> np.ndarray:
    """X^T X in float64 for activations x (..., K); adds to `hessian` in place when given."""
    arr = as_real_array(x, "x")
    if arr.ndim < 1 or arr.size == 0:
        raise ValueError(f"x must be a non-empty array (..., K), got shape {arr.shape}")
    check_finite(arr, "x")
    rows = arr.reshape(-1, arr.shape[-1]).astype(np.float64)
    h = rows.T @ rows
    if hessian is None:
        return h
    if hessian.shape != h.shape or hessian.dtype != np.float64:
        raise ValueError(
            f"hessian must be a float64 array of shape {h.shape}, got {hessian.dtype} "
            f"{hessian.shape}"
        )
    hessian += h
    return hessian


def output_error_trace(diff: np.ndarray, hessian: np.ndarray) -> float:
    """tr(D^T H D) = ||X D||^2 for D (K, N) and H = X^T X (K, K), in float64."""
    d = np.asarray(diff, np.float64)
    return float(np.sum((hessian @ d) * d))


def _check_hessian(hessian, k: int) -> np.ndarray:
    """A finite, symmetric (K, K) matrix with a non-negative diagonal, as float64 (a copy)."""
    h = as_real_array(hessian, "hessian")
    if h.shape != (k, k):
        raise ValueError(
            f"hessian must have shape ({k}, {k}) (X^T X over the weight's {k} input rows), "
            f"got {h.shape}"
        )
    check_finite(h, "hessian")
    h = h.astype(np.float64)  # a copy: the caller's array is never touched
    top = float(np.abs(h).max())
    # a sum of X^T X accumulated in float32 is symmetric only to rounding
    if float(np.abs(h - h.T).max()) > 1e-5 * top:
        raise ValueError("hessian must be symmetric (X^T X); it is not, beyond rounding")
    h = (h + h.T) / 2
    d = np.diagonal(h)
    if (d < 0).any():
        i = int(np.argmin(d))
        raise ValueError(
            f"hessian must have a non-negative diagonal (X^T X); entry ({i}, {i}) is {d[i]:g}"
        )
    return h


def _inv_upper(v: np.ndarray) -> np.ndarray:
    """Inverse of an upper-triangular matrix by 2x2 block recursion (matmuls: a third of LU's work).

    [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]; zeros above the diagonal stay
    exact zeros, so a diagonal V gives a diagonal inverse.
    """
    k = v.shape[0]
    if k <= 64:
        return np.linalg.solve(v, np.eye(k))
    m = k // 2
    a_inv, c_inv = _inv_upper(v[:m, :m]), _inv_upper(v[m:, m:])
    out = np.zeros_like(v)
    out[:m, :m], out[m:, m:] = a_inv, c_inv
    out[:m, m:] = -(a_inv @ v[:m, m:]) @ c_inv
    return out


def _upper_cholesky_of_inverse(h: np.ndarray, damp: float) -> np.ndarray:
    """U upper-triangular with U^T U = H^-1, H damped and `dead` inputs fixed (float64)."""
    k = h.shape[0]
    h = h.copy()
    diag = np.arange(k)
    dead = h[diag, diag] == 0
    # an input that never fires (a zero column of X) has no error to pass on; H_ii = 1 keeps
    # H invertible and its row gets plain rounding (the weights stay: the input may fire later)
    h[diag[dead], diag[dead]] = 1.0
    h[diag, diag] += damp * float(np.mean(h[diag, diag]))
    try:
        # H = V V^T with V upper (the Cholesky factor of H with rows and columns reversed);
        # then U = V^-1 is upper and U^T U = H^-1: one factorisation and one triangular solve
        v = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
        return _inv_upper(v)
    except np.linalg.LinAlgError:
        raise ValueError(
            f"hessian is not positive definite after damping (damp={damp:g}); a Hessian from "
            "fewer calibration rows than inputs needs damp > 0 (0.01 is usual)"
        ) from None


def _passes(k: int, bs: int, cpp: int, static: bool) -> list[tuple[int, int]]:
    """Row ranges processed together (lazy batches), never splitting a group's params.

    With params chosen at a group's first row from its current weights, the whole group must
    be up to date then: either it lies inside one pass (passes of whole groups), or it starts
    a pass (a group longer than a pass, split in passes of its own).
    """
    if static:
        return [(i, min(i + cpp, k)) for i in range(0, k, cpp)]
    if bs <= cpp:
        step = (cpp // bs) * bs
        return [(i, min(i + step, k)) for i in range(0, k, step)]
    out = []
    for s in range(0, k, bs):
        e = min(s + bs, k)
        out.extend((i, min(i + cpp, e)) for i in range(s, e, cpp))
    return out


def _group_blocks(rows: np.ndarray, bs: int, dtype, amax_cap) -> np.ndarray:
    """(g, N) current rows of one group -> (N, 1, bs) blocks as `to_blocks` cuts them.

    For a two-level format (NVFP4) a last row holding the original tensor's amax is appended,
    so a choose_params that derives the tensor scale from its blocks derives the original one;
    values are capped at that amax (the effective scale cannot reach past it anyway).
    """
    # (N, 1, bs), the last row's value as padding; C order: a method's float sums may depend
    # on the layout, and rtn's blocks sum like contiguous ones
    blk = np.ascontiguousarray(to_blocks(rows.astype(dtype), bs, 0))
    if amax_cap is None:
        return blk
    np.clip(blk, -amax_cap, amax_cap, out=blk)
    anchor = np.zeros((1, 1, bs), dtype)
    anchor[0, 0, 0] = amax_cap
    return np.concatenate([blk, anchor], axis=0)


def _choose(algo, fmt, blocks, ts, clip_ratio, last_valid):
    """The method's params, told how much of the last block is real when it asks (as the core)."""
    if last_valid is not None and getattr(algo, "masks_padding", False):
        return algo.choose_params(fmt, blocks, ts, clip_ratio, last_valid=last_valid)
    return algo.choose_params(fmt, blocks, ts, clip_ratio)


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    format: str = "int4",
    block_size: int | None = 128,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    method: str = "rtn",
    columns_per_pass: int = 128,
    static_groups: bool = False,
    clip_ratio: float = 1.0,
    fallback_rtn: bool = True,
) -> QuantizedTensor:
    """GPTQ of a (K, N) MatMul weight along axis 0, given H = X^T X (K, K) from calibration.

    block_size: input rows per block (None: one block per output column). damp: fraction of
    mean(diag H) added to H's diagonal (>= 0). act_order: process rows by decreasing H_ii, with
    every group's params fixed up front from the original weights ("static groups", so the
    layout stays standard); static_groups=True does that in the natural order too, and
    double-quantized formats (nf4_dq) always do (their scales are compressed as a whole).
    columns_per_pass: rows per lazy batch (speed only). method: the registered params rule.
    Dead inputs (H_ii = 0: the input never fired in calibration) get H_ii = 1 and keep their
    weights, rounded plainly and passing no error on (the input may fire later).
    fallback_rtn: the objective tr(D^T H D) (undamped H) of plain `quantize_tensor(...,
    method=method)` is computed too and that result returned if GPTQ did not beat it, so the
    answer is never worse than round-to-nearest on it (GPTQ is a greedy heuristic).
    """
    w_in = prepare(weight, "weight")
    if w_in.ndim != 2:
        raise ValueError(f"weight must be 2-D (K, N) like an ONNX MatMul's B, got {w_in.shape}")
    k, n = w_in.shape
    h = _check_hessian(hessian, k)
    damp = as_finite_float(damp, "damp")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    act_order = as_bool(act_order, "act_order")
    static = as_bool(static_groups, "static_groups") or act_order
    fallback_rtn = as_bool(fallback_rtn, "fallback_rtn")
    cpp = as_int(columns_per_pass, "columns_per_pass")
    if cpp <= 0:
        raise ValueError(f"columns_per_pass must be > 0, got {cpp}")
    clip_ratio = as_finite_float(clip_ratio, "clip_ratio")
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be a number in (0, 1], got {clip_ratio}")
    fmt = get_format(format)
    algo = get_method(method)
    bs = resolve_block(k, block_size, fmt)
    nb = n_blocks(k, bs)
    pad = nb * bs - k
    last_valid = bs - pad if pad else None
    double_quant = getattr(fmt, "double_quant", False)
    static = static or double_quant
    cdt = compute_dtype(w_in.dtype)
    w_c = w_in.astype(cdt)

    blocks_all = to_blocks(w_c, bs, 0)  # (N, nb, bs): the layout rtn quantizes
    ts = fmt.tensor_scale(blocks_all)  # nvfp4: from the original weight, as rtn has it
    amax_cap = None if ts is None else cdt.type(np.abs(w_c).max())

    if act_order:
        # dead inputs (H_ii = 0) last; a stable sort keeps ties (H = I) in the natural order
        perm = np.argsort(-np.diagonal(h), kind="stable")
        u = _upper_cholesky_of_inverse(h[np.ix_(perm, perm)], damp)
    else:
        perm = np.arange(k)
        u = _upper_cholesky_of_inverse(h, damp)

    dq_state = None
    rtn = None
    if static and not double_quant:
        # static params are the method's on the original blocks: exactly what quantize_tensor
        # chooses (its compiled paths are held bit for bit to the NumPy one, and much faster
        # for searching methods), and its codes are the round-to-nearest fallback
        rtn = quantize_tensor(w_in, fmt, bs, axis=0, clip_ratio=clip_ratio, method=method)
        scale = np.array(rtn.scales, cdt)
        zp = None if rtn.zero_points is None else np.array(rtn.zero_points)
    elif static:
        scale, zp = _choose(algo, fmt, blocks_all, ts, clip_ratio, last_valid)
        scale = np.array(scale, cdt)
        zp = None if zp is None else np.array(zp)
        if double_quant:  # codes are chosen against the scales as stored, as the core does
            dq_state = fmt.compress_scales(scale, blocks_all)
            scale = dq_state.values().astype(cdt)
    else:
        scale = np.empty((n, nb), cdt)
        zp = None
    eff = effective_scale(scale, ts) if static else np.empty((n, nb), cdt)
    codes = None

    wp = w_c.astype(np.float64)[perm]  # rows in processing order
    for i1, i2 in _passes(k, bs, cpp, static):
        w1 = wp[i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        # the rank-1 update's product goes here rather than into a fresh array per row
        # (the same arithmetic; a fresh array of this size costs a map and page faults)
        tmp = np.empty_like(w1)
        for i in range(i2 - i1):
            g, r = divmod(int(perm[i1 + i]), bs)
            if not static and r == 0:
                size = min(bs, k - g * bs)
                cur = np.concatenate([w1[i : i + size], wp[i2 : i1 + i + size]])
                lv = last_valid if g == nb - 1 else None
                blk = _group_blocks(cur, bs, cdt, amax_cap)
                s, z = _choose(algo, fmt, blk, ts, clip_ratio, lv)
                scale[:, g] = np.asarray(s)[:n, 0]
                if z is not None:
                    if zp is None:
                        zp = np.empty((n, nb), np.asarray(z).dtype)
                    zp[:, g] = np.asarray(z)[:n, 0]
                eff[:, g] = effective_scale(scale[:, g : g + 1], ts)[:, 0]
            e_g = eff[:, g : g + 1]
            z_g = None if zp is None else zp[:, g : g + 1]
            w = w1[i]
            c = fmt.encode(w.astype(cdt)[:, None, None], e_g, z_g)
            if codes is None:
                codes = np.zeros((n, nb, bs), c.dtype)
            codes[:, g, r] = c[:, 0, 0]
            q = fmt.decode(c, e_g, z_g)[:, 0, 0].astype(np.float64)
            err = (w - q) / u1[i, i]
            # the rows after i absorb its error; with U's zero off-diagonals (H = I) this is
            # a no-op, so rtn's codes come out unchanged
            rest = tmp[: i2 - i1 - i - 1]
            np.multiply(u1[i, i + 1 :, None], err[None, :], out=rest)
            w1[i + 1 :] -= rest
            err1[i] = err
        wp[i2:] -= u[i1:i2, i2:].T @ err1

    if pad:  # the padding of the last block is the code of 0, as quantize_tensor stores it
        z_last = None if zp is None else zp[:, -1:]
        zeros = np.zeros((n, 1, pad), cdt)
        codes[:, -1, bs - pad :] = fmt.encode(zeros, eff[:, -1:], z_last)[:, 0, :]
    flat = codes.reshape(n, -1)
    data = pack_nibbles(flat) if fmt.bits == 4 else flat.view(np.uint8)
    qt = QuantizedTensor(
        data=np.ascontiguousarray(data),
        scales=np.ascontiguousarray(scale),
        zero_points=None if zp is None else np.ascontiguousarray(zp),
        format=fmt.name,
        block_size=bs,
        axis=0,
        shape=(k, n),
        dtype=w_in.dtype,
        tensor_scale=ts,
        **({} if dq_state is None else {"double_quant": dq_state}),
    )
    if not fallback_rtn:
        return qt
    if rtn is None:
        rtn = quantize_tensor(w_in, fmt, bs, axis=0, clip_ratio=clip_ratio, method=method)
    w64 = w_c.astype(np.float64)
    d_gptq = w64 - qt.dequantize(np.float64)
    d_rtn = w64 - rtn.dequantize(np.float64)
    # one product for both (per column it is the same sum as two); each half is made
    # contiguous so np.sum adds in the order output_error_trace does
    hd = h @ np.concatenate([d_gptq, d_rtn], axis=1)
    err_gptq = float(np.sum(np.ascontiguousarray(hd[:, :n]) * d_gptq))
    err_rtn = float(np.sum(np.ascontiguousarray(hd[:, n:]) * d_rtn))
    return qt if err_gptq < err_rtn else rtn
