"""AWQ for safetensors checkpoints of Llama-style decoders: scales folded into the tensors
that produce each Linear layer's input.

AWQ (`quantize.algorithms.awq`) multiplies a weight's input channels by s > 0 before
rounding and divides the layer's input by s, which leaves the float product unchanged. In an
ONNX graph the division is a Mul node; a checkpoint of tensors has no graph, so the division
is folded into the tensor that produces the input. Which tensor that is follows from the
architecture, read from config.json next to the checkpoint (`model_type` or `architectures`):
Llama-family decoders (llama, mistral, qwen2, qwen3: RMSNorm, attention, SwiGLU MLP, with
Hugging Face's tensor names). In each decoder layer L the groups are AutoAWQ's:

    divided by s (prev op)             input columns * s                 s searched on the
    L.input_layernorm (gamma, beta)    L.self_attn.q_proj, k_proj, v_proj  inputs of q_proj
    L.self_attn.v_proj (rows, bias)    L.self_attn.o_proj                  inputs of o_proj
    L.post_attention_layernorm         L.mlp.gate_proj, up_proj            inputs of gate_proj
    L.mlp.up_proj (rows, bias)         L.mlp.down_proj                     inputs of down_proj

Why each fold is exact in real arithmetic: a norm's output is normalised(x) * gamma, so gamma
/ s divides every channel of the one input the group's layers share (hence one s for the
group, searched on their weights side by side). Attention mixes tokens, never channels, and
its softmax weights come from q and k only, so v_proj's output channel c divided by s_c
divides the attention output's channel c, o_proj's input c, by s_c; that needs v_proj's
outputs to be o_proj's inputs one to one, which grouped-query attention breaks (a key/value
head serves several query heads: v_proj has fewer outputs than o_proj has inputs), and then
the group is skipped, as AutoAWQ skips it. down_proj's input is silu(gate) * up, linear in
up's output channels, so up_proj's rows divided by s divide it by s.

The search is `awq_scan`'s (s = mean|x|^alpha, alpha on a grid, alpha = 0 is round to
nearest) on the group's (in, out) weights concatenated along out: blocks run along `in`, one
column at a time, so that is each weight quantized on its own, and the objective is the sum
of their calibration output errors (nvfp4's per-tensor scale is then the group's; the weights
are still quantized one by one). Every group is searched on the unscaled weights and the
float model's inputs, as AutoAWQ does; a weight that is both scaled and a prev op (v_proj,
up_proj) is quantized with both folds applied. Folded tensors keep their dtype (AutoAWQ folds
in the model's dtype too): kept tensors such as the norms are written as float, changed only
by the fold.

Clipping (AWQ's second step, `awq.py`'s `clip=True`): once the scales are folded, each weight
with calibration data (X^T X, from NAME.inputs or NAME.hessian) is quantized by awq.py's
activation-aware clipping search, run on the folded weight against the Hessian of its folded
inputs (`clip_search`): per block, the range ratio with the least share of the calibration
output error, the clipped weight kept only if its whole output error (measured on the float
model's outputs: rows divided by a later group's scales weighted back) is lower than without
clipping. It runs per weight and per (format, block size), so mixed precision's options get
their own. Under awq+gptq, GPTQ runs on the folded weight and the clipped AWQ result is kept
instead where its calibration output error is lower (as the ONNX path keeps the best).

Mixed precision (target_bits) quantizes each option of a weight this same way, on the folded
weight, and scores it by the output error of the unfolded result against the float model's
weight; the scales are the group's, searched once at the run's format and block size.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AwqFold",
    "Group",
    "build_fold",
    "check_model",
    "clip_search",
    "compute_fold",
    "find_groups",
]

#: config.json model_type values whose decoder layers are Llama-style (names and structure)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: the same, by config.json "architectures" entry (a fine-tune may keep only these)
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
#: the methods of quantize_safetensors that fold AWQ scales
AWQ_METHODS = ("awq", "awq+gptq")
#: run awq.py's clipping search on each folded weight (module doc); False gives the scales-only
#: fold, for comparisons (tests, scripts/check_awq_llama.py)
CLIP = True

_ADVICE = "use gptq, or the onnx command"
_WHY = "awq needs the preceding operator of each weight to fold its scales into"
_LAYER = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+)\.self_attn\.q_proj\.weight$")
#: what a Llama-style decoder layer must hold (relative to its prefix)
_REQUIRED = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def _config_path(source) -> Path:
    """config.json of the model: in its folder, or next to a single .safetensors file."""
    folder = source.folder if source.folder is not None else source.files[0].parent
    return folder / "config.json"


def check_model(source, method: str = "awq") -> str:
    """The model_type of a supported checkpoint (config.json next to it); else ValueError."""
    path = _config_path(source)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if not path.is_file():
        raise ValueError(
            f"method {method!r}: {_WHY}, found from the model's config.json (model_type {supported}"
            f"); there is none at {path}: {_ADVICE}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the model config: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the model config is not a JSON object")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    if any(a in SUPPORTED_ARCHITECTURES for a in archs):
        return next(a for a in archs if a in SUPPORTED_ARCHITECTURES)
    what = f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
    raise ValueError(
        f"method {method!r}: {path}: {what} is not supported: {_WHY}, known here for Llama-style "
        f"decoders (model_type {supported}); {_ADVICE}"
    )


@dataclass(frozen=True)
class Group:
    """Weights sharing one input, and the tensors that produce it (divided by the scales)."""

    label: str  # e.g. "model.layers.0.input_layernorm -> q_proj,k_proj,v_proj"
    layers: tuple[str, ...]  # weights (out, in) whose input columns are multiplied by s
    divided: tuple[str, ...]  # tensors divided by s along their first axis (norm, rows, bias)
    skip: str | None = None  # why the group cannot be scaled (shapes), else None


def find_groups(shapes: dict[str, tuple[int, ...]]) -> list[Group]:
    """AutoAWQ's four groups per Llama-style decoder layer; ValueError if the names do not fit."""
    layers = sorted(
        {m["layer"] for n in shapes if (m := _LAYER.match(n))},
        key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)],
    )
    if not layers:
        raise ValueError(
            f"method 'awq': no decoder layer named like LAYER.self_attn.q_proj.weight: {_WHY} "
            f"(Llama-style names); {_ADVICE}"
        )
    groups: list[Group] = []
    for lay in layers:
        t = {k: f"{lay}.{k}" for k in _REQUIRED}
        missing = [n for n in t.values() if n not in shapes]
        if missing:
            raise ValueError(
                f"method 'awq': {lay} is not a Llama-style decoder layer: it has no "
                f"{missing[0]!r}; {_ADVICE}"
            )
        for k, n in t.items():
            want = 1 if k.endswith("layernorm.weight") else 2
            if len(shapes[n]) != want:
                raise ValueError(
                    f"method 'awq': {n!r} has shape {list(shapes[n])}, expected {want}-d"
                )

        def extra(*names, lay=lay):  # biases, present in some families (qwen2's q/k/v)
            return tuple(f"{lay}.{n}" for n in names if f"{lay}.{n}" in shapes)

        q, k, v, o = (t[f"self_attn.{p}_proj.weight"] for p in "qkvo")
        gate, up, down = (t[f"mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        ln1, ln2 = t["input_layernorm.weight"], t["post_attention_layernorm.weight"]
        for prev, members in ((ln1, (q, k, v)), (ln2, (gate, up))):
            ins = {shapes[m][1] for m in members}
            if ins != {shapes[prev][0]}:
                raise ValueError(
                    f"method 'awq': {prev!r} has {shapes[prev][0]} channels but "
                    f"{', '.join(members)} take {sorted(ins)} inputs"
                )
        if shapes[up][0] != shapes[down][1] or shapes[gate][0] != shapes[up][0]:
            raise ValueError(
                f"method 'awq': {lay}: gate_proj/up_proj outputs {shapes[gate][0]}/"
                f"{shapes[up][0]} do not match down_proj's {shapes[down][1]} inputs"
            )
        skip_o = None
        if shapes[v][0] != shapes[o][1]:
            skip_o = (
                f"grouped-query attention: v_proj has {shapes[v][0]} outputs, o_proj "
                f"{shapes[o][1]} inputs (as AutoAWQ, o_proj is not scaled)"
            )
        groups += [
            Group(
                f"{lay}.input_layernorm -> q_proj,k_proj,v_proj",
                (q, k, v),
                (ln1, *extra("input_layernorm.bias")),
            ),
            Group(
                f"{lay}.self_attn.v_proj -> o_proj",
                (o,),
                (v, *extra("self_attn.v_proj.bias")),
                skip_o,
            ),
            Group(
                f"{lay}.post_attention_layernorm -> gate_proj,up_proj",
                (gate, up),
                (ln2, *extra("post_attention_layernorm.bias")),
            ),
            Group(f"{lay}.mlp.up_proj -> down_proj", (down,), (up, *extra("mlp.up_proj.bias"))),
        ]
    return groups


@dataclass
class AwqFold:
    """Each group's outcome (scales and alpha, or why not scaled) and the folds they imply."""

    groups: list[Group]
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # label -> s (in,) float32
    alphas: dict[str, float] = field(default_factory=dict)  # label -> chosen alpha
    gains: dict[str, tuple[float, float]] = field(default_factory=dict)  # (rtn, awq) loss
    skipped: dict[str, str] = field(default_factory=dict)  # label -> why not scaled
    _col: dict[str, str] = field(default_factory=dict)  # weight -> label scaling its inputs
    _div: dict[str, str] = field(default_factory=dict)  # tensor -> label dividing it
    _member: dict[str, str] = field(default_factory=dict)  # weight -> its group's label

    def __post_init__(self) -> None:
        for g in self.groups:
            for n in g.layers:
                self._member[n] = g.label

    def set_scales(self, label: str, s: np.ndarray, alpha: float) -> None:
        """Record a group's scales: its layers' columns * s, its prev tensors / s."""
        g = next(g for g in self.groups if g.label == label)
        self.scales[label], self.alphas[label] = np.asarray(s, np.float32), float(alpha)
        for n in g.layers:
            self._col[n] = label
        for n in g.divided:
            self._div[n] = label

    def touches(self, name: str) -> bool:
        """Whether the fold changes this tensor."""
        return name in self._col or name in self._div

    def fold(self, name: str, arr: np.ndarray) -> np.ndarray:
        """The tensor with the scales folded in (its first axis / s, its last axis * s), in
        its own dtype; unchanged if no scaled group touches it."""
        if not self.touches(name):
            return arr
        a = np.asarray(arr).astype(np.float64)
        if name in self._div:
            s = self.scales[self._div[name]].astype(np.float64)
            a = a / s.reshape((-1,) + (1,) * (a.ndim - 1))
        if name in self._col:
            a = a * self.scales[self._col[name]].astype(np.float64)
        return a.astype(arr.dtype)

    def _col_div(self, name: str, shape) -> tuple[np.ndarray, np.ndarray]:
        """(c, r): the weight stored is diag(1/r) W diag(c); ones where nothing is folded."""
        c = np.ones(shape[-1]) if name not in self._col else self.scales[self._col[name]]
        r = np.ones(shape[0]) if name not in self._div else self.scales[self._div[name]]
        return np.asarray(c, np.float64), np.asarray(r, np.float64)

    def hessian(self, name: str, h: np.ndarray | None) -> np.ndarray | None:
        """X^T X of the folded weight's inputs x / c, from that of the float model's x."""
        if h is None or name not in self._col:
            return h
        c = self.scales[self._col[name]].astype(np.float64)
        return h / np.outer(c, c)

    def unfold(self, name: str, recon: np.ndarray) -> np.ndarray:
        """A dequantized folded weight (float64) mapped back to the float model's weight."""
        c, r = self._col_div(name, recon.shape)
        return recon * r[:, None] / c[None, :]

    def describe(self, name: str) -> str | None:
        """What AWQ did to this tensor, for its report row; None if it is in no group."""
        parts = []
        label = self._member.get(name)
        if label in self.alphas:
            parts.append(f"inputs scaled, alpha {self.alphas[label]:g} ({label})")
        elif label is not None:
            parts.append(f"not scaled: {self.skipped.get(label, 'skipped')} ({label})")
        if name in self._div:
            lab = self._div[name]
            parts.append(f"divided by the scales of {lab} (alpha {self.alphas[lab]:g})")
        return "awq: " + "; ".join(parts) if parts else None

    def quantize(
        self, name: str, arr: np.ndarray, h: np.ndarray | None, run, fmt_name: str, block_size
    ) -> tuple:
        """(qt, method used, clipped): a folded weight (out, in) quantized as the run's method
        says, then, given H of its folded inputs (`hessian`), by AWQ's clipping search (module
        doc); clipped is the fraction of blocks clipped, None if the search did not decide."""
        from .safetensors import _quantize_one

        qt, used = _quantize_one(arr, run, fmt_name, block_size, h)
        # NaN/Inf (nan="zero") are replaced inside quantize_tensor: nothing for a search
        if h is None or not CLIP or not np.isfinite(np.asarray(arr, np.float32)).all():
            return qt, used, None
        _, r = self._col_div(name, arr.shape)
        weights = r * r  # output j of the stored weight is the float model's / r_j
        clipped, ratios = clip_search(
            arr, h, fmt_name, block_size, clip_ratio=run.clip_ratio, row_weights=weights
        )
        if used == "gptq":  # awq+gptq: the clipped result where its output error is lower
            err_clip = _weighted_error(arr, clipped, h, weights)
            if not err_clip < _weighted_error(arr, qt, h, weights):
                return qt, used, None
            used = "rtn"
        shrunk = (ratios < 1).reshape(ratios.shape[0], ratios.shape[1], -1).any(axis=2)
        return clipped, used, float(np.mean(shrunk))

    def fields(self, name, w0, h0, qt, used, rtn, clipped: float | None = None) -> dict:
        """A quantized weight's report fields: method, awq group/alpha, the share of blocks
        the clipping search clipped, and (with H of the float model's inputs) output errors
        of the unfolded result and of rtn (`rtn`: the original weight w0 quantized by round
        to nearest, given with h0)."""
        folded = self.touches(name)
        if folded or (clipped and used == "rtn"):
            used = "awq+gptq" if used == "gptq" else "awq"
        out: dict[str, object] = {"method": used}
        label = self._member.get(name)
        if label in self.alphas:
            out["awq_group"], out["awq_alpha"] = label, self.alphas[label]
        note = self.describe(name)
        if note is None:
            note = f"awq: in no group ({used})"
        if clipped is not None:
            out["awq_clipped"] = clipped
            note += f"; clip search: {clipped:.0%} of blocks clipped"
        out["note"] = note
        if h0 is None:
            return out
        from .safetensors import _as_float64, _h_error

        recon = self.unfold(name, qt.dequantize(np.float64))
        w = _as_float64(w0, recon)
        out["output_error"] = _h_error(w, recon, h0)
        out["output_error_rtn"] = _h_error(w, rtn.dequantize(np.float64), h0)
        return out


def build_fold(opened, plan, run) -> AwqFold:
    """Search every group's scales on the calibration inputs (one group's weights in memory
    at a time); a group is left unscaled, with the reason noted, when its shapes do not allow
    it, one of its weights is not quantized, or the calibration file has no NAME.inputs."""
    from ..algorithms.awq import awq_scan

    shapes = {n: tuple(f.tensors[n].shape) for n, f in opened.where.items()}
    fold = AwqFold(find_groups(shapes))
    calib = run.calib
    for g in fold.groups:
        if g.skip is not None:
            fold.skipped[g.label] = g.skip
            continue
        kept = [n for n in g.layers if not plan[n].quantize]
        if kept:
            fold.skipped[g.label] = f"{kept[0]} is not quantized ({plan[kept[0]].note})"
            continue
        key = next((calib.keys[n] for n in g.layers if n in calib.keys), None)
        x_key = next(
            (calib.keys[n] for n in g.layers if calib.keys.get(n, "").endswith(".inputs")), None
        )
        if x_key is None:
            fold.skipped[g.label] = (
                "no calibration data"
                if key is None
                else f"the calibration has {key}, but awq needs samples (NAME.inputs)"
            )
            continue
        x = calib._array(x_key)
        w_kn = np.concatenate(
            [np.asarray(opened.where[n].array(n), np.float32).T for n in g.layers], axis=1
        )
        for n in g.layers:
            opened.where[n].release(n)
        try:
            # clip=False: the clipping search runs later, on each folded weight (module doc)
            res = awq_scan(
                w_kn, x, run.format, run.block_size, clip_ratio=run.clip_ratio, clip=False
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{opened.where[g.layers[0]].path}: awq {g.label}: {exc}") from None
        fold.set_scales(g.label, res.scales, res.alpha)
        fold.gains[g.label] = (res.rtn_loss, res.loss)
        del w_kn, x
    return fold


def clip_search(
    weight: np.ndarray,
    h: np.ndarray,
    format: str = "int4",
    block_size: int | str | None = "auto",
    *,
    method: str = "rtn",
    clip_ratio: float = 1.0,
    row_weights: np.ndarray | None = None,
) -> tuple:
    """(quantized, ratios): `awq.awq_clip` on an (out, in) weight quantized along `in` (its AWQ
    scales already folded in), scored on H (in, in) = X^T X of its inputs.

    quantized is an (out, in) QuantizedTensor (axis 1), the unclipped result unless clipping
    lowers the whole output error sum_j row_weights[j] * (D H D^T)_jj (row_weights: 1 each by
    default); ratios (out, n_blocks) float32 are the blocks' range ratios ((out, n_blocks, 2),
    the low end's and the high end's, for formats with a zero point), all 1 then.
    """
    from ..algorithms.awq import awq_clip

    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {w.shape}")
    qt, ratios, _ = awq_clip(
        w.T,
        h,
        format,
        block_size,
        method=method,
        clip_ratio=clip_ratio,
        col_weights=row_weights,
    )
    qt = dataclasses.replace(qt, shape=tuple(qt.shape[::-1]), axis=1 - qt.axis)
    return qt, np.asarray(ratios, np.float32)


def _weighted_error(w: np.ndarray, qt, h: np.ndarray, row_weights: np.ndarray) -> float:
    """sum_j row_weights[j] * (D H D^T)_jj of an (out, in) weight and its quantized qt."""
    d = np.asarray(w, np.float64) - qt.dequantize(np.float64)
    return float(np.sum((d @ h) * d * row_weights[:, None]))


def compute_fold(
    src, calib, format: str = "int4", block_size: int | str | None = "auto"
) -> AwqFold:
    """The scales `quantize_safetensors(src, ..., method="awq", calib=calib)` would fold, with
    the default tensor selection; `fold.fold(name, array)` gives the folded float model."""
    from ..formats import get_format
    from .safetensors import Selection, _Calib, _Opened, _plan, _Run, resolve

    source = resolve(src)
    check_model(source)
    run = _Run(
        format=get_format(format).name,
        block_size=block_size,
        axis=-1,
        clip_ratio=1.0,
        layout="quantize",
        selection=Selection(),
        progress=None,
        method="awq",
        calib=_Calib.open(calib),
    )
    with _Opened(source) as opened:
        plan = _plan(opened, run)
        run.calib.check(opened, plan)
        return build_fold(opened, plan, run)
