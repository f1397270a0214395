"""MSE clipping search: per block, the shrunk range whose parameters give the least error.

`MSESearch.choose_params` tries the format's own round-to-nearest rule at a grid of range
ratios, clip_ratio * [1, ..., lowest] (21 ratios from 1 down to 0.5 by default), then at the
format's `search_widen` ratios above 1 (MXFP4: 2, its exponent one up), each through
`fmt.choose_params(blocks, ratio)`, so every candidate scale is one the format can store (E8M0
powers of two for MXFP4, E4M3 block scales for NVFP4, integer zero points for uint4, ...). Each
candidate is scored by encoding and decoding the block with the format itself; per block the
candidate with the least error wins, ties going to the larger range. Ratio 1 (times the
user's clip_ratio) is round-to-nearest's own choice and is tried first, so no block ends with a
larger error (by this objective) than `method="rtn"` gives it.

The objective, per block of n real elements x, with e = decode(encode(x)) - x:

    sum(e^2) + dc_weight * sum(e)^2 + gain_weight * n * sum(e x)^2 / sum(x^2)

(`search_error`; both weights 0 is plain squared error). By default both weights are 1 for
formats with a zero point (uint4, ...) and 0 for the others (int4, nf4, fp4, ...). The two extra
terms are the error's components along the two directions a trained layer's inputs are known to
favour without seeing any data, each weighted as if that direction carried the whole block's
input energy (n times a coordinate's): the constant direction and the block's own weights.

* sum(e)^2, the error sum: a layer's input has a common component (activations after
  LayerNorm, GELU or ReLU do not average to zero over a block of channels), and what that
  component sees of the block's error is sum(e), which adds up across blocks and tokens instead
  of averaging out. Plain squared error shrinks ranges in a way that leaves sum(e) free; on
  rxnmap's attention (uint4, block 32) that cost far more output accuracy than it saved.
* n sum(e x)^2 / sum(x^2), the gain: the part of e along x itself, e ~ -g x, scales the block's
  contribution to the output, y ~ (1 - g) y, and inputs of a trained layer are aligned with its
  weights (the outputs x.w are far larger than for a random direction), so that part costs more
  than its share of sum(e^2). Clipping, the very thing the search does to lower sum(e^2), always
  shrinks the largest weights, g > 0 in every clipped block of a column, so the scalings add up
  along the column; in attention, shrunk query/key weights flatten the softmax. Diagnosis
  (rxnmap, uint4, block 128, one weight at a time, the others float): the old search
  (sum(e^2) + sum(e)^2) lowered every weight's squared error by 5-6% but made every weight's
  output error worse than round to nearest's, most of all the reaction layer's fused QKV
  (cosine 0.99942 vs 0.99976) and its second FFN weight (0.99973 vs 0.99983). With the gain
  term the QKV weight alone gives 0.99974 (gain term without the error sum: 0.99981).
  Also tried there and worse than round to nearest: an |e|^p objective (p 2.5: 0.99960, p 3:
  0.99973, p 4: 0.99972) and searching lo and hi shrink separately (0.99936).

Measured effect of the gain term on top of the error sum (benchmarks/methods_real_models.py,
mean output cosine over the held-out inputs; ORT's asymmetric round to nearest at the same size
in brackets), uint4: MiniLM b32 0.97310 -> 0.97437 (0.97187), b128 0.96178 -> 0.96112
(0.95959); OCR recogniser b32 0.99928 -> 0.99942 (0.99895), b128 0.99858 -> 0.99884 (0.99731);
rxnmap b32 0.99726 -> 0.99791 (0.99630), b128 0.99877 -> 0.99923 (0.99906): the one case the
error sum alone lost to ORT is now won, and five of six improve. gain_weight 0.5 also wins all
six, 2 loses rxnmap b32. The gain term alone (no error sum) lost rxnmap b32 badly (0.98785;
NumPy trial). For int4 (symmetric, no zero point) the gain term costs MiniLM
(b32 0.96706 -> 0.96469, b128 0.95805 -> 0.94717, ORT symmetric 0.95158) for little elsewhere
(OCR b128 0.99239 -> 0.99297, rxnmap b128 0.99875 -> 0.99881), as the error sum did before it:
int4's round to nearest wastes a code and the search's clipping buys much more there, so the
formats without a zero point keep plain squared error.

int4_ort (ONNX Runtime's symmetric rule: the block's extreme on code -8, scale -extreme/8, the
other side reaching 7 steps) gets both orientations at every ratio: ORT's, and the other one,
the extreme on the 7-step side (scale |extreme| * ratio / 7, int4's rule), which leaves the
extra code to the other side; per block the better is kept, ORT's own (ratio 1) first. Its zero
point (8 or 7) only says which side holds the extra code, and both terms get weight 0.25
(`ORT_INT4_WEIGHT`): measured (benchmarks/methods_real_models.md, 2026-11-23 16:20) plain
squared error won MiniLM by far but lost rxnmap at both blocks to ORT's own rule, weights 1 / 1
lost MiniLM b32 and rxnmap b128, 0.25 / 0.25 was the one of six weightings tried to beat ORT's
symmetric quantizer in all six cases (chosen on those held-out figures: small margins on
MiniLM b32 and rxnmap b128 are within their noise). int4 itself cannot take the other
orientation: it would need a negative scale (-8 on the extreme's side of a positive extreme),
and a QuantizedTensor's scales are > 0 (the compressed-tensors layout could not store others
either); int4_ort stores that choice in its zero point, and its ONNX writers emit ORT's signed
scales with no zero point, the same bytes as ORT's symmetric quantizer. Its search (the
compiled one, `kernels.search.mse_ort_kernel`, and the NumPy path for float32 blocks, its twin)
ranks all 2 x 21 candidates as int4 at ORT's signed scales (`approx_sse`) and checks the winner
exactly against ORT's own rule (`_pick_two_stage`), as int4's does; against ranking them all by
the exact objective (`_pick_exact`, the rule before the kernel) that picks another candidate in
at most 0.02% of blocks, +0.004% objective at most (512x1024 normal and student-t(4), blocks
32 and 128).

The decoded values are in the compute dtype (float32, or float64 for float64 input), the
differences, squares and sums in float64. The padding of a row's last block is not scored (the
core says how long it is; n counts only the real elements). The sums run in a fixed order,
`block_sse`, which the numba kernels (`kernels.search`: int4, uint4 and int4_ort;
`kernels.search_e2m1`: mxfp4, mxfp4_ceil and nvfp4 with plain squared error;
`kernels.search_codebook`: fp4_e2m1 and nf4 with plain squared error, every candidate scored
exactly as `_pick_exact` does; from float32/float16/bfloat16) follow too, so both paths pick
the same candidate, bit for bit. The other formats (nf4_dq, int4_affine, ...) search on the
NumPy path only.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..formats import Format, get_format
from ..formats.base import effective_scale
from ..formats.integer import INT4, OrtInt4
from . import register_method

DEFAULT_STEPS = 21
DEFAULT_LOWEST = 0.5
#: weight of sum(e)^2 against sum(e^2) in the objective (see the module docstring)
DEFAULT_DC_WEIGHT = 1.0
#: weight of n * sum(e x)^2 / sum(x^2) (the error's gain part) in the objective (docstring)
DEFAULT_GAIN_WEIGHT = 1.0
#: int4_ort's default weights of both terms (its zero point is only a sign; module docstring)
ORT_INT4_WEIGHT = 0.25
#: elements scored per NumPy pass: bounds the temporaries (about 40 bytes per element)
_CHUNK_ELEMENTS = 1 << 20
#: formats whose compiled search ranks candidates approximately, then checks (`_pick_two_stage`)
_INT_KERNEL_FORMATS = ("int4", "uint4", "int4_ort")
#: formats with a compiled exact search (`kernels.search_e2m1`) when the objective is plain sse
_E2M1_KERNEL_FORMATS = ("mxfp4", "mxfp4_ceil", "nvfp4")
#: formats with float32 block scales and a compiled exact search (`kernels.search_codebook`)
#: when the objective is plain sse
_CODEBOOK_KERNEL_FORMATS = ("fp4_e2m1", "nf4")


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
    gain_weight: float = 0.0,
) -> np.ndarray:
    """Per-block search objective (..., nb), e the decoding error, x the block:
    sum(e^2) + dc_weight * sum(e)^2 + gain_weight * n * sum(e x)^2 / sum(x^2).

    As `squared_error` (decoded in the scale's dtype, float64 differences, sums in order by
    `block_sse`, padding not scored), plus the error's own sum and its gain part
    (`gain_factor`); float64 throughout.
    """
    eff = effective_scale(scale, tensor_scale)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        codes = fmt.encode(blocks, eff, zero_point)
        deq = fmt.decode(codes, eff, zero_point)
        x64 = blocks.astype(np.float64)
        d = deq.astype(np.float64) - x64
        if last_valid is not None and last_valid < blocks.shape[-1]:
            d[..., -1, last_valid:] = 0.0
        err = block_sse(d * d)
        if dc_weight:  # (not 0 * inf = NaN where a candidate decodes beyond the dtype)
            s1 = block_sse(d)
            err = err + np.float64(dc_weight) * (s1 * s1)
        if gain_weight:
            s2 = block_sse(d * x64)
            err = err + gain_factor(blocks, last_valid, gain_weight) * (s2 * s2)
        return err


def gain_factor(blocks: np.ndarray, last_valid: int | None, gain_weight: float) -> np.ndarray:
    """Per block (..., nb), float64: gain_weight * n / sum(x^2) over its n real elements (the
    sum in order, `block_sse`), 0 for blocks of zeros; the gain term's factor on sum(e x)^2."""
    x64 = blocks.astype(np.float64)
    if last_valid is not None and last_valid < blocks.shape[-1]:
        x64[..., -1, last_valid:] = 0.0
    q = block_sse(x64 * x64)
    n = np.full(q.shape, np.float64(blocks.shape[-1]))
    if last_valid is not None:
        n[..., -1] = last_valid
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(q > 0, (np.float64(gain_weight) * n) / q, 0.0)


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
    gain: np.ndarray | None = None,
) -> np.ndarray:
    """The search kernels' cheap per-block score for int4 (zero_point None) / uint4, float64.

    int4_ort is scored as int4 at ORT's signed scales (negative where its zero point is 7): its
    grid is -8..7 steps of that scale, its codes rint(x / scale) + 8 rounded half up; rint
    differs from them only on ties, which the exact check settles.

    Codes rint(x * (1/scale)) (a reciprocal, not the encoder's division: they differ only on
    near-ties), clipped; decoded, differences, squares and the sums (in order) in float32, then
    sum(d^2) + dc_weight * sum(d)^2 in float32; with `gain` (the blocks' `gain_factor`, float64)
    that plus gain * sum(d x)^2 in float64 (sum(d x) in float32, in order). Candidates whose
    1/scale overflows, or whose sums overflow to NaN, score +inf. Used only to rank candidates;
    the winner is then checked against round to nearest with the exact `search_error`.
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
        s2 = None if gain is None else np.add.accumulate(d * x, axis=-1)[..., -1]
        d *= d
        sse = np.add.accumulate(d, axis=-1)[..., -1]
        if dc_weight:
            sse = sse + np.float32(dc_weight) * (s1 * s1)
        sse = sse.astype(np.float64)  # exact: the float32 ranking is unchanged
        if s2 is not None:
            s2 = s2.astype(np.float64)
            sse = sse + gain * (s2 * s2)
    sse[bad | np.isnan(sse)] = np.inf  # (inf - inf in the overflowing sums: no ranking)
    return sse


def _has_kernel_twin(fmt: Format, names) -> bool:
    """True for the registered formats the search kernels implement (the two-stage twin)."""
    from ..formats import available_formats, get_format

    return fmt.name in names and fmt.name in available_formats() and get_format(fmt.name) is fmt


def _pick_exact(fmt, x, s, z, ts, last_valid, dc_weight, gain_weight) -> np.ndarray:
    """Per block, the index of the first candidate with the least exact `search_error`.

    A block whose candidate has the previous candidate's params has its error too (the same
    params give the same error, bit for bit), so only blocks whose params changed are scored
    again: E8M0 and E4M3 scales take few distinct values over the ratio grid (MXFP4: about 3
    per block of 22 candidates)."""

    def error(k, sel=None):
        zk = None if z is None else z[k]
        if sel is None:
            return search_error(fmt, x, s[k], zk, ts, last_valid, dc_weight, gain_weight)
        out = np.empty(sel.shape[0])
        # blocks gathered as rows of one block each; a row's last block keeps its padding rule
        last = sel[:, -1] == x.shape[-2] - 1
        for part, valid in ((~last, None), (last, last_valid)):
            if part.any():
                i = tuple(sel[part].T)
                xs = x[i][:, None]
                zs = None if zk is None else zk[i][:, None]
                out[part] = search_error(
                    fmt, xs, s[k][i][:, None], zs, ts, valid, dc_weight, gain_weight
                )[:, 0]
        return out

    errs = np.empty(s.shape)
    errs[0] = error(0)
    for k in range(1, s.shape[0]):
        changed = s[k] != s[k - 1]
        if z is not None:
            changed |= z[k] != z[k - 1]
        errs[k] = errs[k - 1]
        if changed.all():
            errs[k] = error(k)
        elif changed.any():
            sel = np.argwhere(changed)
            errs[k][tuple(sel.T)] = error(k, sel)
    errs[np.isnan(errs)] = np.inf  # never picked over a finite error
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


def _pick_two_stage(fmt, x, s, z, ts, last_valid, dc_weight, gain_weight) -> np.ndarray:
    """The kernels' rule: the first least `approx_sse`; kept outright where it beats round to
    nearest's (candidate 0) by more than `sure_margin` (only with dc_weight and gain_weight 0:
    sum(e) and sum(e x) can cancel, so their float32 values have no relative error bound), else
    only where its exact `search_error` is strictly below round to nearest's; 0 elsewhere."""
    gain = gain_factor(x, last_valid, gain_weight) if gain_weight else None
    if isinstance(fmt, OrtInt4):  # ranked as int4 at ORT's signed scales (`approx_sse`)
        sa, za = np.where(z == 7, -s, s), None
    else:
        sa, za = s, z
    approx = np.stack(
        [
            approx_sse(x, sa[k], None if za is None else za[k], last_valid, dc_weight, gain)
            for k in range(s.shape[0])
        ]
    )
    pick = np.argmin(approx, axis=0)
    n = np.full(pick.shape, x.shape[-1])
    if last_valid is not None:
        n[..., -1] = last_valid
    ab = np.take_along_axis(approx, pick[None], 0)[0].astype(np.float64)
    ar = approx[0].astype(np.float64)
    plain = dc_weight == 0 and gain_weight == 0
    sure = np.isfinite(ar) & (ab < ar * (1.0 - sure_margin(n))) & plain
    sb = np.take_along_axis(s, pick[None], 0)[0]
    zb = None if z is None else np.take_along_axis(z, pick[None], 0)[0]
    z0 = None if z is None else z[0]
    exact_best = search_error(fmt, x, sb, zb, ts, last_valid, dc_weight, gain_weight)
    exact_rtn = search_error(fmt, x, s[0], z0, ts, last_valid, dc_weight, gain_weight)
    return np.where(sure | (exact_best < exact_rtn), pick, 0)


def _default_weight(fmt, weight: float) -> float:
    """`weight` for formats whose zero point shifts the grid (uint4, ...), ORT_INT4_WEIGHT for
    int4_ort (its zero point, 8 or 7, only says which side of a symmetric grid holds the extra
    code), 0 for the formats without a zero point."""
    f = get_format(fmt)
    if isinstance(f, OrtInt4):
        return ORT_INT4_WEIGHT
    return weight if f.zero_point else 0.0


def _flipped_candidates(blocks, cands, ratios) -> list:
    """int4_ort's other orientation at each ratio: the block's extreme on the 7-step side
    (zero point 15 - ORT's), so scale = |extreme| * ratio / 7, int4's rule (`SymmetricInt`).

    ORT's rule always spends the extra code (-8) on the extreme; when clipping the extreme is
    cheap the other side may need it more, so the search scores both (see the module
    docstring)."""
    out = []
    for r, (_, zp) in zip(ratios, cands, strict=True):
        scale, _ = INT4.choose_params(blocks, r)
        out.append((scale, (np.uint8(15) - zp).astype(np.uint8)))
    return out


class MSESearch:
    """Per block, the range ratio (of a grid down to `lowest`) whose scale gives the least
    `search_error`.

    steps: how many ratios (>= 1; 1 is round to nearest); lowest: the smallest ratio, in (0, 1];
    dc_weight: the weight of sum(e)^2 in the objective (>= 0; 0 is plain squared error; None:
    1 for formats with a zero point, 0 for the others); gain_weight: the weight of the gain
    term n * sum(e x)^2 / sum(x^2) (>= 0; None: as dc_weight's default). All are checked here
    (ValueError/TypeError naming them). Registered as "mse" with the defaults; pass an instance
    as `method=` for other settings.
    """

    name = "mse"
    description = (
        "per-block clipping search: least squared error (plus the error sum's square) over a "
        "grid of range ratios"
    )
    #: the core passes `last_valid` (the padding of a row's last block is not scored)
    masks_padding = True

    def __init__(
        self,
        steps: int = DEFAULT_STEPS,
        lowest: float = DEFAULT_LOWEST,
        dc_weight: float | None = None,
        gain_weight: float | None = None,
    ):
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(f"steps must be an integer >= 1, got {steps!r}")
        if steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(lowest, bool) or not isinstance(lowest, numbers.Real):
            raise TypeError(f"lowest must be a number in (0, 1], got {lowest!r}")
        if not 0 < lowest <= 1:
            raise ValueError(f"lowest must be a number in (0, 1], got {lowest!r}")
        for name, v in (("dc_weight", dc_weight), ("gain_weight", gain_weight)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise TypeError(f"{name} must be a finite number >= 0, got {v!r}")
            if v is not None and not 0 <= v < np.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.steps = int(steps)
        self.lowest = float(lowest)
        self.dc_weight = None if dc_weight is None else float(dc_weight)
        self.gain_weight = None if gain_weight is None else float(gain_weight)

    @property
    def kernel_formats(self) -> tuple[str, ...]:
        """Formats with a compiled search (`quantize_rows`), for float32/float16/bfloat16 input:
        int4, uint4, int4_ort, and mxfp4 / mxfp4_ceil / nvfp4 / fp4_e2m1 / nf4 while their
        objective is plain squared error (`kernels.search_e2m1`, `kernels.search_codebook`;
        dc_weight and gain_weight 0, their defaults)."""
        plain = not self.dc_weight and not self.gain_weight
        exact = _E2M1_KERNEL_FORMATS + _CODEBOOK_KERNEL_FORMATS if plain else ()
        return _INT_KERNEL_FORMATS + exact

    def dc_weight_for(self, fmt) -> float:
        """The objective's dc_weight for `fmt`: as given, or by default 1 for formats with a
        zero point, 0.25 for int4_ort (whose zero point is only the scale's sign) and 0 for the
        others (module docstring)."""
        if self.dc_weight is not None:
            return self.dc_weight
        return _default_weight(fmt, DEFAULT_DC_WEIGHT)

    def gain_weight_for(self, fmt) -> float:
        """The objective's gain_weight for `fmt`: as given, or by default as dc_weight's
        (module docstring)."""
        if self.gain_weight is not None:
            return self.gain_weight
        return _default_weight(fmt, DEFAULT_GAIN_WEIGHT)

    def ratios(self, clip_ratio: float = 1.0) -> list[float]:
        """The ratios this search tries, largest (round to nearest's) first."""
        return ratio_grid(clip_ratio, self.steps, self.lowest)

    def choose_params(self, fmt, blocks, tensor_scale, clip_ratio=1.0, *, last_valid=None):
        """(scale, zero point) per block: the candidate with the least `search_error`."""
        ratios = self.ratios(clip_ratio) + [clip_ratio * r for r in fmt.search_widen]
        # every candidate's params from the whole array (nvfp4 reads the tensor's amax), then
        # the scoring in chunks of blocks, which bounds the temporaries
        cands = [fmt.choose_params(blocks, r) for r in ratios]
        if isinstance(fmt, OrtInt4):
            cands += _flipped_candidates(blocks, cands, ratios)
        lead, (nb, bs) = blocks.shape[:-2], blocks.shape[-2:]
        flat = blocks.reshape(-1, nb, bs)
        fs = np.stack([s.reshape(-1, nb) for s, _ in cands])
        fz = None if cands[0][1] is None else np.stack([z.reshape(-1, nb) for _, z in cands])
        two_stage = _has_kernel_twin(fmt, _INT_KERNEL_FORMATS) and blocks.dtype == np.float32
        best_s, best_z = fs[0].copy(), None if fz is None else fz[0].copy()
        dc, gain = self.dc_weight_for(fmt), self.gain_weight_for(fmt)
        step = max(1, _CHUNK_ELEMENTS // max(1, nb * bs))
        for r0 in range(0, flat.shape[0], step):
            sl = slice(r0, r0 + step)
            x, s, z = flat[sl], fs[:, sl], None if fz is None else fz[:, sl]
            pick = (_pick_two_stage if two_stage else _pick_exact)(
                fmt, x, s, z, tensor_scale, last_valid, dc, gain
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
        """The compiled search plus quantize+pack (int4, uint4, int4_ort; mxfp4, mxfp4_ceil, nvfp4,
        fp4_e2m1, nf4 with plain squared error): (packed, scales, zero points[, nvfp4's tensor
        scale]) of each row of `x2d` (float32, float16 or bfloat16), bit for bit the NumPy path's
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
        if fmt_name in _CODEBOOK_KERNEL_FORMATS:  # the same ratios, in order, as `choose_params`
            from ..kernels import search_codebook

            widen = [clip_ratio * r for r in get_format(fmt_name).search_widen]
            ratios = np.asarray(self.ratios(clip_ratio) + widen, np.float32)
            return search_codebook.mse_codebook_rows(
                fmt_name, x, block_size, ratios, num_threads, kernels
            )
        if fmt_name in _E2M1_KERNEL_FORMATS:  # the same ratios, in order, as `choose_params`
            from ..kernels import search_e2m1

            widen = [clip_ratio * r for r in get_format(fmt_name).search_widen]
            ratios = np.asarray(self.ratios(clip_ratio) + widen, np.float32)
            if fmt_name == "nvfp4":
                return search_e2m1.mse_nvfp4_rows(x, block_size, ratios, num_threads, kernels)
            return search_e2m1.mse_mx_rows(fmt_name, x, block_size, ratios, num_threads, kernels)
        return search.mse_rows(
            fmt_name,
            x,
            block_size,
            ratios,
            num_threads,
            kernels,
            self.dc_weight_for(fmt_name),
            self.gain_weight_for(fmt_name),
        )


MSE = register_method(MSESearch())

__all__ = [
    "MSE",
    "MSESearch",
    "approx_sse",
    "block_sse",
    "gain_factor",
    "ratio_grid",
    "search_error",
    "squared_error",
    "sure_margin",
]
