"""MSE clipping search: per block, the shrunk range whose parameters give the least error.

`MSESearch.choose_params` tries the format's own round-to-nearest rule at a grid of range
ratios, clip_ratio * [1, ..., lowest] (21 ratios from 1 down to 0.5 by default), each through
`fmt.choose_params(blocks, ratio)`, so every candidate scale is one the format can store (E8M0
powers of two for MXFP4, E4M3 block scales for NVFP4, integer zero points for uint4, ...). Each
candidate is scored by encoding and decoding the block with the format itself; per block the
candidate with the least error wins, ties going to the larger range. Ratio 1 (times the
user's clip_ratio) is round-to-nearest's own choice and is tried first, so no block ends with a
larger error (by this objective) than `method="rtn"` gives it.

The objective, per block, with e = decode(encode(x)) - x over its real elements:
sum(e^2) + dc_weight * sum(e)^2 (`search_error`; 0 is plain squared error). By default
dc_weight is 1 for formats with a zero point (uint4, ...) and 0 for the others (int4, nf4, fp4,
...): measured on three real models, the error-sum term turned uint4's losses to ONNX Runtime's
round-to-nearest into wins (5 of 6 model/block cases), while for int4 it made 3 of 5 worse.
Why the second term: a layer's input has a common component (activations after
LayerNorm, GELU or ReLU do not average to zero over a block of channels), and what that
component sees of the block's error is sum(e), which adds up across blocks and tokens instead of
averaging out. Plain squared error shrinks ranges in a way that leaves sum(e) free; on rxnmap's
attention (uint4, block 32) that cost far more output accuracy than it saved
(benchmarks/methods_real_models.md, "Data-free methods, revised"). The decoded values are in the
compute dtype (float32, or float64 for float64 input), the differences, squares and sums in
float64. The padding of a row's last block is not scored (the core says how long it is). The
sums run in a fixed order, `block_sse`, which the numba kernel (`kernels.search`, int4 and uint4
from float32/float16/bfloat16) follows too, so both pick the same candidate, bit for bit.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..formats import Format, get_format
from ..formats.base import effective_scale
from . import register_method

DEFAULT_STEPS = 21
DEFAULT_LOWEST = 0.5
#: weight of sum(e)^2 against sum(e^2) in the objective (see the module docstring)
DEFAULT_DC_WEIGHT = 1.0
#: elements scored per NumPy pass: bounds the temporaries (about 40 bytes per element)
_CHUNK_ELEMENTS = 1 << 20


def block_sse(err2: np.ndarray) -> np.ndarray:
    """(..., bs) float64 squared errors -> (...) sums, added in order of the elements.

    A fixed order (np.add.accumulate is sequential), not NumPy's pairwise sum, so that the
    search kernel, which scores all candidates of a block in one pass over its elements, gets
    the same sums bit for bit.
    """
    return np.add.accumulate(err2, axis=-1)[..., -1]


def squared_error(
    fmt: Format,
    blocks: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    tensor_scale=None,
    last_valid: int | None = None,
) -> np.ndarray:
    """Per-block squared error (..., nb) of `blocks` (..., nb, bs) encoded with these params.

    The decoded values are the format's own `decode` in the scale's dtype; the differences and
    the sum (`block_sse`) are float64. `last_valid`: real elements in each row's last block (the
    rest is padding and not scored); None: all of them.
    """
    eff = effective_scale(scale, tensor_scale)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        codes = fmt.encode(blocks, eff, zero_point)
        deq = fmt.decode(codes, eff, zero_point)
        d = deq.astype(np.float64) - blocks.astype(np.float64)
        d *= d
    if last_valid is not None and last_valid < blocks.shape[-1]:
        d[..., -1, last_valid:] = 0.0
    return block_sse(d)


def search_error(
    fmt: Format,
    blocks: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    tensor_scale=None,
    last_valid: int | None = None,
    dc_weight: float = DEFAULT_DC_WEIGHT,
) -> np.ndarray:
    """Per-block search objective (..., nb): sum(e^2) + dc_weight * sum(e)^2, e the decoding error.

    As `squared_error` (decoded in the scale's dtype, float64 differences, sums in order by
    `block_sse`, padding not scored), plus the error's own sum; float64 throughout.
    """
    eff = effective_scale(scale, tensor_scale)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        codes = fmt.encode(blocks, eff, zero_point)
        deq = fmt.decode(codes, eff, zero_point)
        d = deq.astype(np.float64) - blocks.astype(np.float64)
        if last_valid is not None and last_valid < blocks.shape[-1]:
            d[..., -1, last_valid:] = 0.0
        s1 = block_sse(d)
        return block_sse(d * d) + np.float64(dc_weight) * (s1 * s1)


def ratio_grid(clip_ratio: float = 1.0, steps: int = DEFAULT_STEPS, lowest: float = DEFAULT_LOWEST):
    """The range ratios tried, largest first: clip_ratio * (1 - (1 - lowest) * k / (steps - 1))."""
    if steps == 1:
        return [float(clip_ratio)]
    return [float(clip_ratio) * (1.0 - (1.0 - lowest) * k / (steps - 1)) for k in range(steps)]


def approx_sse(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    last_valid: int | None = None,
    dc_weight: float = 0.0,
) -> np.ndarray:
    """The search kernels' cheap per-block score for int4 (zero_point None) / uint4, float32.

    Codes rint(x * (1/scale)) (a reciprocal, not the encoder's division: they differ only on
    near-ties), clipped; decoded, differences, squares and the sums (in order) in float32, then
    sum(d^2) + dc_weight * sum(d)^2 in float32. Candidates whose 1/scale overflows score +inf.
    Used only to rank candidates; the winner is then checked against round to nearest with the
    exact `search_error`.
    """
    one = np.float32(1)
    with np.errstate(divide="ignore", over="ignore"):
        inv = one / scale
    bad = ~np.isfinite(inv)
    inv = np.where(bad, one, inv)[..., None]
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.rint(x * inv)
        if zero_point is None:
            deq = np.clip(y, -8, 7) * scale[..., None]
        else:
            zf = zero_point.astype(np.float32)[..., None]
            deq = (np.clip(y + zf, 0, 15) - zf) * scale[..., None]
        d = deq - x
        if last_valid is not None and last_valid < x.shape[-1]:
            d[..., -1, last_valid:] = 0
        s1 = np.add.accumulate(d, axis=-1)[..., -1]
        d *= d
        sse = np.add.accumulate(d, axis=-1)[..., -1]
        if dc_weight:
            sse = sse + np.float32(dc_weight) * (s1 * s1)
    sse[bad] = np.inf
    return sse


def _has_kernel_twin(fmt: Format, names) -> bool:
    """True for the registered formats the search kernels implement (the two-stage twin)."""
    from ..formats import available_formats, get_format

    return fmt.name in names and fmt.name in available_formats() and get_format(fmt.name) is fmt


def _pick_exact(fmt, x, s, z, ts, last_valid, dc_weight) -> np.ndarray:
    """Per block, the index of the first candidate with the least exact `search_error`."""
    errs = np.stack(
        [
            search_error(fmt, x, s[k], None if z is None else z[k], ts, last_valid, dc_weight)
            for k in range(s.shape[0])
        ]
    )
    return np.argmin(errs, axis=0)  # the first of equal minima: the larger range


def sure_margin(n: np.ndarray | int) -> np.ndarray:
    """How much lower (relative) a candidate's `approx_sse` must be than round to nearest's to
    win without an exact check, for blocks of n real elements.

    `approx_sse` is within about (n + 3) * 2^-24 + 2^-17 (relative) of the exact squared error:
    float32 squares and an n-term float32 sum, plus elements that the reciprocal rounds to the
    other code of a near-tie (whose two errors differ by < 2^-17 of their own size). The margin
    is 1e-3 + 8 n 2^-24, several times that bound for any n.
    """
    return 1e-3 + 8.0 * np.asarray(n, np.float64) * 2.0**-24


def _pick_two_stage(fmt, x, s, z, ts, last_valid, dc_weight) -> np.ndarray:
    """The kernels' rule: the first least `approx_sse`; kept outright where it beats round to
    nearest's (candidate 0) by more than `sure_margin` (only with dc_weight 0: sum(e) can cancel,
    so its float32 value has no relative error bound), else only where its exact `search_error`
    is strictly below round to nearest's; 0 elsewhere."""
    approx = np.stack(
        [
            approx_sse(x, s[k], None if z is None else z[k], last_valid, dc_weight)
            for k in range(s.shape[0])
        ]
    )
    pick = np.argmin(approx, axis=0)
    n = np.full(pick.shape, x.shape[-1])
    if last_valid is not None:
        n[..., -1] = last_valid
    ab = np.take_along_axis(approx, pick[None], 0)[0].astype(np.float64)
    ar = approx[0].astype(np.float64)
    sure = np.isfinite(ar) & (ab < ar * (1.0 - sure_margin(n))) & (dc_weight == 0)
    sb = np.take_along_axis(s, pick[None], 0)[0]
    zb = None if z is None else np.take_along_axis(z, pick[None], 0)[0]
    exact_best = search_error(fmt, x, sb, zb, ts, last_valid, dc_weight)
    exact_rtn = search_error(fmt, x, s[0], None if z is None else z[0], ts, last_valid, dc_weight)
    return np.where(sure | (exact_best < exact_rtn), pick, 0)


class MSESearch:
    """Per block, the range ratio (of a grid down to `lowest`) whose scale gives the least
    `search_error`.

    steps: how many ratios (>= 1; 1 is round to nearest); lowest: the smallest ratio, in (0, 1];
    dc_weight: the weight of sum(e)^2 in the objective (>= 0; 0 is plain squared error; None:
    1 for formats with a zero point, 0 for the others). All are
    checked here (ValueError/TypeError naming them). Registered as "mse" with the defaults; pass
    an instance as `method=` for other settings.
    """

    name = "mse"
    description = (
        "per-block clipping search: least squared error (plus the error sum's square) over a "
        "grid of range ratios"
    )
    #: the core passes `last_valid` (the padding of a row's last block is not scored)
    masks_padding = True
    #: formats with a compiled search (`quantize_rows`), for float32/float16/bfloat16 input
    kernel_formats = ("int4", "uint4")

    def __init__(
        self,
        steps: int = DEFAULT_STEPS,
        lowest: float = DEFAULT_LOWEST,
        dc_weight: float | None = None,
    ):
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(f"steps must be an integer >= 1, got {steps!r}")
        if steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(lowest, bool) or not isinstance(lowest, numbers.Real):
            raise TypeError(f"lowest must be a number in (0, 1], got {lowest!r}")
        if not 0 < lowest <= 1:
            raise ValueError(f"lowest must be a number in (0, 1], got {lowest!r}")
        if dc_weight is not None and (
            isinstance(dc_weight, bool) or not isinstance(dc_weight, numbers.Real)
        ):
            raise TypeError(f"dc_weight must be a finite number >= 0, got {dc_weight!r}")
        if dc_weight is not None and not 0 <= dc_weight < np.inf:
            raise ValueError(f"dc_weight must be a finite number >= 0, got {dc_weight!r}")
        self.steps = int(steps)
        self.lowest = float(lowest)
        self.dc_weight = None if dc_weight is None else float(dc_weight)

    def dc_weight_for(self, fmt) -> float:
        """The objective's dc_weight for `fmt`: as given, or by default 1 for formats with a
        zero point and 0 for the others (module docstring)."""
        if self.dc_weight is not None:
            return self.dc_weight
        return DEFAULT_DC_WEIGHT if get_format(fmt).zero_point else 0.0

    def ratios(self, clip_ratio: float = 1.0) -> list[float]:
        """The ratios this search tries, largest (round to nearest's) first."""
        return ratio_grid(clip_ratio, self.steps, self.lowest)

    def choose_params(self, fmt, blocks, tensor_scale, clip_ratio=1.0, *, last_valid=None):
        """(scale, zero point) per block: the candidate with the least `search_error`."""
        ratios = self.ratios(clip_ratio)
        # every candidate's params from the whole array (nvfp4 reads the tensor's amax), then
        # the scoring in chunks of blocks, which bounds the temporaries
        cands = [fmt.choose_params(blocks, r) for r in ratios]
        lead, (nb, bs) = blocks.shape[:-2], blocks.shape[-2:]
        flat = blocks.reshape(-1, nb, bs)
        fs = np.stack([s.reshape(-1, nb) for s, _ in cands])
        fz = None if cands[0][1] is None else np.stack([z.reshape(-1, nb) for _, z in cands])
        two_stage = _has_kernel_twin(fmt, self.kernel_formats) and blocks.dtype == np.float32
        best_s, best_z = fs[0].copy(), None if fz is None else fz[0].copy()
        step = max(1, _CHUNK_ELEMENTS // max(1, nb * bs))
        for r0 in range(0, flat.shape[0], step):
            sl = slice(r0, r0 + step)
            x, s, z = flat[sl], fs[:, sl], None if fz is None else fz[:, sl]
            pick = (_pick_two_stage if two_stage else _pick_exact)(
                fmt, x, s, z, tensor_scale, last_valid, self.dc_weight_for(fmt)
            )
            best_s[sl] = np.take_along_axis(s, pick[None], 0)[0]
            if z is not None:
                best_z[sl] = np.take_along_axis(z, pick[None], 0)[0]
        return best_s.reshape(*lead, nb), None if best_z is None else best_z.reshape(*lead, nb)

    def quantize_rows(
        self,
        fmt_name: str,
        x2d: np.ndarray,
        block_size: int,
        clip_ratio: float = 1.0,
        *,
        num_threads: int | None = None,
    ):
        """The compiled search plus quantize+pack (int4, uint4): (packed, scales, zero points)
        of each row of `x2d` (float32, float16 or bfloat16), bit for bit the NumPy path's
        `quantize_tensor(x2d, fmt_name, block_size, clip_ratio=clip_ratio, method=self)`."""
        from .. import kernels
        from ..kernels import search

        if fmt_name not in self.kernel_formats:
            raise ValueError(
                f"no mse kernel for format {fmt_name!r}; kernels: {self.kernel_formats}"
            )
        ratios = np.asarray(self.ratios(clip_ratio), np.float32)
        x = np.asarray(x2d)
        if x.dtype != np.float32 and x.dtype in kernels.QUANTIZE_DTYPES:
            x = x.astype(np.float32)  # exact; one compiled variant instead of three
        return search.mse_rows(
            fmt_name, x, block_size, ratios, num_threads, kernels, self.dc_weight_for(fmt_name)
        )


MSE = register_method(MSESearch())

__all__ = [
    "MSE",
    "MSESearch",
    "approx_sse",
    "block_sse",
    "ratio_grid",
    "search_error",
    "squared_error",
    "sure_margin",
]
