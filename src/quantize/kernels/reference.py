"""NumPy twins of the kernels: the same (rows, n) layout, computed by the formats themselves.

`quantize_rows` / `dequantize_rows` here take the arguments of their namesakes in
`quantize.kernels` and return what `quantize.quantize_tensor(x2d, fmt, block_size, axis=-1)` and
`QuantizedTensor.dequantize` return, through the same steps (blocking, the format's
`choose_params`/`encode`/`decode`, `packing`); the kernels must match them bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..blocking import n_blocks, to_blocks
from ..core import compute_dtype
from ..formats import get_format
from ..formats.base import effective_scale
from ..packing import pack_nibbles, unpack_nibbles
from ..tensor import _saturating_cast
from . import QuantizedRows


def quantize_rows(fmt_name: str, x2d: np.ndarray, block_size: int | None) -> QuantizedRows:
    """(packed, scales, zero_points or None) of each row of `x2d`, round to nearest; the
    result's `.tensor_scale` is the format's tensor scale (nvfp4) or None, its `.double_quant`
    nf4_dq's compressed scales or None."""
    fmt = get_format(fmt_name)
    x = np.asarray(x2d)
    n = x.shape[-1]
    bs = n if block_size is None or block_size == -1 else int(block_size)
    blocks = to_blocks(x.astype(compute_dtype(x.dtype), copy=False), bs, -1)
    tensor_scale = fmt.tensor_scale(blocks)
    scale, zp = fmt.choose_params(blocks)
    dq = None
    if getattr(fmt, "double_quant", False):  # nf4_dq: codes against the compressed scales
        dq = fmt.compress_scales(scale, blocks)
        scale = dq.values()
    pad = n_blocks(n, bs) * bs - n
    if pad:  # the padding is stored as the code of 0
        blocks[..., -1, bs - pad :] = 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        codes = fmt.encode(blocks, effective_scale(scale, tensor_scale), zp)
    packed = pack_nibbles(codes.reshape(*codes.shape[:-2], -1))
    return QuantizedRows(packed, scale, zp, tensor_scale, dq)


def dequantize_rows(
    fmt_name: str,
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    n: int,
    block_size: int | None,
    out_dtype: Any = np.float32,
    *,
    tensor_scale: Any = None,
) -> np.ndarray:
    """(rows, n) values as `QuantizedTensor.dequantize` computes them: decode in float64 (exact),
    drop the padding, round once to `out_dtype`, saturating past its range."""
    fmt = get_format(fmt_name)
    bs = n if block_size is None or block_size == -1 else int(block_size)
    nb = scales.shape[-1]
    codes = unpack_nibbles(packed, nb * bs, fmt.signed_codes)
    if not fmt.signed_codes:
        codes = codes.view(np.uint8)
    codes = codes.reshape(*codes.shape[:-1], nb, bs)
    with np.errstate(over="ignore"):
        values = fmt.dequantize_blocks(codes, scales.astype(np.float64), zero_points, tensor_scale)
    flat = values.reshape(*values.shape[:-2], nb * bs)[..., :n]
    return np.ascontiguousarray(_saturating_cast(flat, np.dtype(out_dtype)))
