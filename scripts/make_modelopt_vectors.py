"""Write tests/reference/modelopt_0_47.npz: reference outputs of NVIDIA ModelOpt's ONNX quant_utils.

Run by hand (never in CI):

    python scripts/make_modelopt_vectors.py [--wheel nvidia_modelopt-0.47.0-py3-none-any.whl]

Without --wheel, `pip download --no-deps nvidia-modelopt==0.47.0` fetches the wheel into a temp
dir. Only `modelopt/onnx/quantization/quant_utils.py` is extracted; it imports nothing but numpy
and math, so it is loaded by file path (modelopt itself is never installed or imported).

The .npz holds plain numeric arrays plus one uint8 array, "manifest", holding UTF-8 JSON:

    {"modelopt_version", "numpy_version", "seed", "wheel_sha256", "quant_utils_sha256",
     "cases": [case, ...], "deviations": [case, ...]}

    case = {"id", "function",
            "kwargs": {scalar arguments; a JSON list stands for a tuple},
            "inputs": {argument name: npz key},
            "input_forms": {argument name: "scalar" (pass arr[()]) | "list" (pass arr.tolist())},
            "returns": "array" | "scalar" | "tuple",
            "outputs": [{"key", "dtype", "shape"} or null for a None output, ...],
            "note" (optional), "reason" (deviations only)}

"cases" are inputs on which ModelOpt is right (each blockwise output is cross-checked here
against an independent computation); "deviations" record what ModelOpt returns where it is
wrong, as inputs for tests showing that quantize differs on purpose.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np

MODELOPT_VERSION = "0.47.0"
MEMBER = "modelopt/onnx/quantization/quant_utils.py"
SEED = 20240047
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "reference" / "modelopt_0_47.npz"


# --- getting ModelOpt's module --------------------------------------------------------------


def fetch_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["-d", str(dest), f"nvidia-modelopt=={MODELOPT_VERSION}"]
    subprocess.run(cmd, check=True)
    (wheel,) = dest.glob(f"nvidia_modelopt-{MODELOPT_VERSION}-*.whl")
    return wheel


def extract_quant_utils(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        version_line = f"Version: {MODELOPT_VERSION}"
        if version_line not in zf.read(metadata).decode().splitlines():
            raise SystemExit(f"{wheel} is not nvidia-modelopt {MODELOPT_VERSION}")
        path = dest / "quant_utils.py"
        path.write_bytes(zf.read(MEMBER))
    return path


def load_module(path: Path) -> types.ModuleType:
    """Load quant_utils.py by path inside a stub package.

    pack_float32_to_4bit_cpp_based does `from .extensions import round_and_pack_ext`; the stub
    package provides `round_and_pack_ext = None`, ModelOpt's own fallback when its C++
    extension cannot be built.
    """
    pkg = types.ModuleType("_modelopt_ref")
    pkg.__path__ = []
    ext = types.ModuleType("_modelopt_ref.extensions")
    ext.round_and_pack_ext = None
    sys.modules.update({"_modelopt_ref": pkg, "_modelopt_ref.extensions": ext})
    spec = importlib.util.spec_from_file_location("_modelopt_ref.quant_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- recording --------------------------------------------------------------------------------


class Recorder:
    """Runs ModelOpt functions and records inputs, kwargs and outputs as manifest cases."""

    def __init__(self, mo: types.ModuleType):
        self.mo = mo
        self.arrays: dict[str, np.ndarray] = {}
        self.sections: dict[str, list[dict]] = {"cases": [], "deviations": []}
        self._by_content: dict[tuple, str] = {}

    def put(self, key: str, arr: np.ndarray) -> str:
        """Store arr under key, or return the key of an identical array stored before."""
        arr = np.array(arr, order="C")  # a C-contiguous copy; 0-d stays 0-d
        assert arr.dtype.kind in "biuf", f"{key}: not a numeric array ({arr.dtype})"
        sig = (arr.dtype.str, arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())
        if sig not in self._by_content:
            assert key not in self.arrays, f"duplicate key {key}"
            self.arrays[key] = arr
            self._by_content[sig] = key
        return self._by_content[sig]

    def run(self, case_id, function, inputs, kwargs=None, forms=None, section="cases", **extra):
        """Call ModelOpt's `function`, record the case, return ModelOpt's result."""
        kwargs, forms = dict(kwargs or {}), dict(forms or {})
        assert all(c["id"] != case_id for s in self.sections.values() for c in s), case_id
        keys = {name: self.put(f"{case_id}.in.{name}", arr) for name, arr in inputs.items()}
        args = {}
        for name, key in keys.items():
            arr = self.arrays[key].copy()
            form = forms.get(name)
            args[name] = arr[()] if form == "scalar" else arr.tolist() if form == "list" else arr
        call_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = getattr(self.mo, function)(**args, **call_kwargs)
        for name, key in keys.items():  # ModelOpt must not have written into its inputs
            if forms.get(name) is None:
                np.testing.assert_array_equal(args[name], self.arrays[key])
        if isinstance(result, tuple):
            returns, outs = "tuple", list(result)
        elif isinstance(result, np.ndarray):
            returns, outs = "array", [result]
        else:
            assert isinstance(result, np.generic), type(result)
            returns, outs = "scalar", [result]
        specs = []
        for i, out in enumerate(outs):
            if out is None:
                specs.append(None)
                continue
            out = np.asarray(out)
            key = self.put(f"{case_id}.out{i}", out)
            specs.append({"key": key, "dtype": out.dtype.name, "shape": list(out.shape)})
        case = {"id": case_id, "function": function, "kwargs": kwargs, "inputs": keys}
        if forms:
            case["input_forms"] = forms
        case.update(returns=returns, outputs=specs, **extra)
        self.sections[section].append(case)
        return result


# --- independent block computations (to check ModelOpt is right on every recorded case) ----


def to_blocks(w: np.ndarray, block_size: int, axis: int) -> np.ndarray:
    """w -> (..., n_blocks, block_size) with `axis` moved last and zero padding at its end."""
    v = np.moveaxis(w, axis, -1)
    n = v.shape[-1]
    nb = math.ceil(n / block_size)
    pad = [(0, 0)] * (v.ndim - 1) + [(0, nb * block_size - n)]
    return np.pad(v, pad).reshape(*v.shape[:-1], nb, block_size)


def from_blocks(b: np.ndarray, n: int, axis: int) -> np.ndarray:
    v = b.reshape(*b.shape[:-2], -1)[..., :n]
    return np.moveaxis(v, -1, axis)


def params_to_axis(p: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(p, -1, axis)


def check_blockwise(w, axis, bs, alpha, use_zp, bits, s, z, wq, tie_data=False):
    """Recompute scales, zero points and codes block by block; assert ModelOpt agrees."""
    blocks = to_blocks(w, bs, axis)
    n = w.shape[axis]
    real = to_blocks(np.ones(w.shape, bool), bs, axis)
    if not use_zp:
        amax = np.abs(blocks).max(axis=-1)
        assert amax.min() >= 1e-3, "a block has amax < 1e-3 (ModelOpt's scale clip would bite)"
        scale = (amax * alpha) / (2 ** (bits - 1) - 1)
        codes = np.rint(blocks / scale[..., None])
        if alpha == 1.0:  # nothing may clip: ModelOpt's clip would then be an error
            assert np.abs(codes).max() <= 2 ** (bits - 1) - 1
        codes = codes.clip(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        assert z is None
    else:
        lo = np.where(real, blocks, np.inf).min(axis=-1)
        hi = np.where(real, blocks, -np.inf).max(axis=-1)
        assert (lo < 0).all() and (hi > 0).all(), "zero-point blocks must straddle 0"
        assert (hi - lo).min() >= 1e-3
        scale = (hi - lo) / (2**bits - 1)
        zero = (-np.round(lo / scale)).clip(0, 2**bits - 1)
        codes = np.rint(blocks / scale[..., None]) + zero[..., None]
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1, "a zero-point code clips"
        np.testing.assert_array_equal(z, params_to_axis(zero, axis))
        assert z.dtype == w.dtype
    if tie_data:
        frac = np.abs(blocks / scale[..., None]) % 1
        assert (frac == 0.5).sum() > blocks.size // 4, "tie data has too few exact .5 ties"
    np.testing.assert_array_equal(s, params_to_axis(scale, axis))
    assert s.dtype == w.dtype
    if wq is not None:
        np.testing.assert_array_equal(wq, from_blocks(codes, n, axis))
        assert wq.dtype == np.int8


# --- deterministic inputs -------------------------------------------------------------------


def normal_weights(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def straddling_weights(rng, shape, dtype):
    """|normal| + 0.05 with a checkerboard sign: any 2 neighbours along any axis differ in sign,
    so every block with at least 2 real elements holds a negative and a positive value."""
    sign = np.indices(shape).sum(axis=0) % 2 * 2 - 1
    return (sign * (np.abs(rng.standard_normal(shape)) + 0.05)).astype(dtype)


def tie_weights(rng, shape, dtype, axis, bs, bits=4, zero_point=False):
    """Weights whose scaled values are exact k + 0.5 ties, with power-of-two scales.

    Symmetric: each block holds +-qmax * 2^e (so the scale is exactly 2^e) and values
    (k + 0.5) * 2^e. Zero point (4 bits): each block holds -7 * 2^e and 8 * 2^e (scale 2^e,
    zero point 7) and values (k + 0.5) * 2^e in between.
    """
    others = [d for i, d in enumerate(shape) if i != axis]
    n = shape[axis]
    nb = math.ceil(n / bs)
    assert n % bs != 1, "the last block needs 2 real elements"
    scale = 2.0 ** rng.integers(-6, 3, size=(*others, nb, 1))
    if zero_point:
        assert bits == 4
        k = rng.integers(-7, 8, size=(*others, nb, bs)) + 0.5
        k[..., 0], k[..., 1] = -7, 8
    else:
        q = 2 ** (bits - 1) - 1
        k = rng.integers(-q, q, size=(*others, nb, bs)) + 0.5
        k[..., 0] = q * rng.choice([-1, 1], size=(*others, nb))
    return from_blocks(k * scale, n, axis).astype(dtype)


def wide_range_weights(rng, shape, axis, bs, zero_blocks=2):
    """float32 blocks with magnitudes from 1e-30 to 1e30 (both ends always present), a few
    all-zero blocks, and no block amax within 1e-4 (in log2) of 448 * 2^k, where float32 log2
    can round ceil(log2(amax / 448)) the wrong way (a ModelOpt flaw, kept out of the cases)."""
    b = to_blocks(rng.standard_normal(shape), bs, axis)
    mag = 10.0 ** rng.uniform(-30, 30, size=b.shape[:-1])
    mag.flat[:2] = 1e-30, 1e30
    b = b * mag[..., None]
    flat = b.reshape(-1, bs)
    flat[rng.choice(np.arange(2, flat.shape[0]), zero_blocks, replace=False)] = 0.0
    while True:
        amax = np.abs(flat.astype(np.float32)).max(axis=-1).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.log2(amax / 448)
            near = np.abs(r - np.round(r)) < 1e-4
        if not near.any():
            break
        flat[near] *= 1.01
    return from_blocks(b, shape[axis], axis).astype(np.float32)


def cid(function, wname, axis, bs, alpha=1.0, use_zp=False, bits=4):
    parts = [function, wname, f"ax{axis}", f"bs{bs}"]
    parts += [f"alpha{alpha}"] if alpha != 1.0 else []
    parts += ["zp"] if use_zp else []
    parts += [f"{bits}bit"] if bits != 4 else []
    return "-".join(parts)


# --- function families ----------------------------------------------------------------------


def blockwise_family(
    rec: Recorder, w, wname, axis, bs, alpha=1.0, use_zp=False, bits=4, tie_data=False, dq=False
):
    """find_scales, rtn and quant_tensor (and dq_tensor if `dq`) on one weight/configuration."""
    assert 0 <= axis < w.ndim and not (w.ndim == 3 and axis == 1), "ModelOpt mis-blocks 3-D axis 1"
    assert w.ndim == 2 or axis == 0 or w.shape[axis] % bs == 0, "ModelOpt's _depad: 2-D only"
    assert not (use_zp and (alpha != 1.0 or bits != 4)), "ModelOpt ignores alpha / wraps 8 bits"
    kw = {"block_size": bs, "quantize_axis": axis}
    qkw = {**kw, "alpha": alpha, "use_zero_point": use_zp, "num_bits": bits}
    key = (wname, axis, bs, alpha, use_zp, bits)
    s, z = rec.run(cid("find_scales", *key), "find_scales", {"w": w}, qkw)
    zin = {} if z is None else {"zp": z}
    wq = rec.run(cid("rtn", *key), "rtn", {"w": w, "s": s, **zin}, {**kw, "num_bits": bits})
    check_blockwise(w, axis, bs, alpha, use_zp, bits, s, z, wq, tie_data)
    if dq:
        rec.run(cid("dq_tensor", *key), "dq_tensor", {"w": wq, "s": s, **zin}, kw)
    wq2, s2, z2 = rec.run(cid("quant_tensor", *key), "quant_tensor", {"w": w}, qkw)
    np.testing.assert_array_equal(wq2, wq)
    np.testing.assert_array_equal(s2, s)
    assert (z2 is None) == (z is None)


def blockwise_cases(rec: Recorder, rng):
    """The block-wise integer family. dq_tensor (elementwise once the layout is right) runs on
    a subset of configurations that still covers every layout, to keep the file small."""
    f32, f64 = np.float32, np.float64
    w = {
        "w64x24f32": normal_weights(rng, (64, 24), f32),
        "w37x30f32": normal_weights(rng, (37, 30), f32),
        "w48x40f32": normal_weights(rng, (48, 40), f32),
        "w40x12f64": normal_weights(rng, (40, 12), f64),
        "w29x12f64": normal_weights(rng, (29, 12), f64),
        "w24x4x8f32": normal_weights(rng, (24, 4, 8), f32),
        "w4x16x16f32": normal_weights(rng, (4, 16, 16), f32),
        "w12x4x8f64": normal_weights(rng, (12, 4, 8), f64),
        "z32x24f32": straddling_weights(rng, (32, 24), f32),
        "z37x20f32": straddling_weights(rng, (37, 20), f32),
        "z24x20f64": straddling_weights(rng, (24, 20), f64),
        "z4x16x16f32": straddling_weights(rng, (4, 16, 16), f32),
        "z24x4x8f32": straddling_weights(rng, (24, 4, 8), f32),
    }
    # symmetric, 4 bits: every 2-D shape x both axes x block 8/16/32 (divisible or not)
    for name in ("w64x24f32", "w37x30f32", "w48x40f32"):
        for axis in (0, 1):
            for bs in (8, 16, 32):
                blockwise_family(rec, w[name], name, axis, bs, dq=bs == 16 and name != "w48x40f32")
    dq = {"dq": True}
    zp = {"use_zp": True}
    configs = [
        # one block bigger than the whole dimension
        ("w37x30f32", 0, 64, dq),
        ("w37x30f32", 1, 64, {}),
        ("w48x40f32", 1, 64, {}),
        # alpha
        ("w64x24f32", 1, 16, {"alpha": 0.75}),
        ("w37x30f32", 0, 8, {"alpha": 0.75, **dq}),
        ("w48x40f32", 0, 32, {"alpha": 0.75}),
        # 8 bits
        ("w64x24f32", 0, 16, {"bits": 8}),
        ("w37x30f32", 1, 32, {"bits": 8, **dq}),
        ("w48x40f32", 1, 8, {"bits": 8}),
        ("w37x30f32", 0, 16, {"alpha": 0.75, "bits": 8}),
        # float64
        ("w40x12f64", 0, 8, dq),
        ("w40x12f64", 1, 16, {}),
        ("w29x12f64", 0, 16, dq),
        ("w29x12f64", 1, 8, {}),
        ("w29x12f64", 1, 16, {"bits": 8}),
        ("w40x12f64", 0, 32, {"alpha": 0.75}),
        # 3-D: axis 0 (any size, padded) and axis 2 (divisible)
        ("w24x4x8f32", 0, 8, {}),
        ("w24x4x8f32", 0, 16, dq),
        ("w24x4x8f32", 0, 32, {}),
        ("w4x16x16f32", 0, 8, {}),
        ("w4x16x16f32", 2, 8, dq),
        ("w4x16x16f32", 2, 16, {}),
        ("w4x16x16f32", 2, 16, {"bits": 8}),
        ("w4x16x16f32", 0, 8, {"alpha": 0.75}),
        ("w12x4x8f64", 0, 8, dq),
        ("w12x4x8f64", 2, 4, {}),
        # zero point, 4 bits, alpha 1, every block straddling 0
        ("z32x24f32", 0, 8, {**zp, **dq}),
        ("z32x24f32", 1, 16, {**zp, **dq}),
        ("z37x20f32", 0, 16, {**zp, **dq}),
        ("z37x20f32", 1, 32, zp),
        ("z37x20f32", 0, 64, zp),
        ("z24x20f64", 1, 16, {**zp, **dq}),
        ("z24x20f64", 0, 32, zp),
        ("z4x16x16f32", 2, 8, {**zp, **dq}),
        ("z24x4x8f32", 0, 16, {**zp, **dq}),
    ]
    for name, axis, bs, opts in configs:
        blockwise_family(rec, w[name], name, axis, bs, **opts)

    # exact .5 ties after scaling (half-to-even), with power-of-two scales
    ties = [
        ((32, 24), f32, 0, 16, {}),
        ((21, 18), f32, 1, 8, {}),
        ((40, 12), f64, 0, 32, {}),
        ((21, 18), f32, 0, 16, {"bits": 8}),
        ((32, 24), f32, 1, 16, {"zero_point": True}),
        ((21, 18), f32, 0, 8, {"zero_point": True}),
        ((12, 4, 16), f32, 0, 8, {}),
        ((4, 6, 16), f64, 2, 16, {}),
        ((12, 4, 16), f32, 2, 8, {"zero_point": True}),
    ]
    for shape, dtype, axis, bs, opts in ties:
        wt = tie_weights(rng, shape, dtype, axis, bs, **opts)
        name = "t" + "x".join(map(str, shape)) + np.dtype(dtype).name.replace("loat", "")
        blockwise_family(
            rec,
            wt,
            name,
            axis,
            bs,
            use_zp=opts.get("zero_point", False),
            bits=opts.get("bits", 4),
            tie_data=True,
            dq=True,
        )

    extra_rtn_dq_cases(rec, rng, w)


def extra_rtn_dq_cases(rec: Recorder, rng, w):
    """rtn with scales too small (codes clip at both ends), dq_tensor on full-range codes,
    find_scales with 8-bit zero points (right in ModelOpt; only its rtn wraps them)."""
    w1 = w["w37x30f32"]
    s = rng.uniform(0.02, 0.4, size=(37, 2)).astype(np.float32)
    wq = rec.run(
        "rtn-w37x30f32-ax1-bs16-small_scales",
        "rtn",
        {"w": w1, "s": s},
        {"block_size": 16, "quantize_axis": 1, "num_bits": 4},
    )
    assert wq.min() == -8 and wq.max() == 7
    s8 = rng.uniform(0.002, 0.01, size=(5, 30)).astype(np.float32)
    wq = rec.run(
        "rtn-w37x30f32-ax0-bs8-small_scales-8bit",
        "rtn",
        {"w": w1, "s": s8},
        {"block_size": 8, "quantize_axis": 0, "num_bits": 8},
    )
    assert wq.min() == -128 and wq.max() == 127
    zw = w["z37x20f32"]
    zs = rng.uniform(0.05, 0.3, size=(3, 20)).astype(np.float32)
    zz = rng.integers(0, 16, size=(3, 20)).astype(np.float32)
    wq = rec.run(
        "rtn-z37x20f32-ax0-bs16-zp-given_params",
        "rtn",
        {"w": zw, "s": zs, "zp": zz},
        {"block_size": 16, "quantize_axis": 0, "num_bits": 4},
    )
    assert wq.min() == 0 and wq.max() == 15

    codes = rng.integers(-8, 8, size=(37, 30)).astype(np.int8)
    rec.run(
        "dq_tensor-codes37x30-ax1-bs16-full_range",
        "dq_tensor",
        {"w": codes, "s": s},
        {"block_size": 16, "quantize_axis": 1},
    )
    codes = rng.integers(-128, 128, size=(37, 30)).astype(np.int8)
    rec.run(
        "dq_tensor-codes37x30-ax0-bs8-8bit",
        "dq_tensor",
        {"w": codes, "s": s8},
        {"block_size": 8, "quantize_axis": 0},
    )
    codes = rng.integers(0, 16, size=(37, 20)).astype(np.int8)
    rec.run(
        "dq_tensor-codes37x20-ax0-bs16-zp-given_params",
        "dq_tensor",
        {"w": codes, "s": zs, "zp": zz},
        {"block_size": 16, "quantize_axis": 0},
    )

    kw = {"block_size": 16, "quantize_axis": 1}
    s, z = rec.run(
        "find_scales-z37x20f32-ax1-bs16-zp-8bit",
        "find_scales",
        {"w": zw},
        {**kw, "alpha": 1.0, "use_zero_point": True, "num_bits": 8},
    )
    check_blockwise(zw, 1, 16, 1.0, True, 8, s, z, None)
    b = to_blocks(zw, 16, 1)
    codes = from_blocks(np.rint(b / s[..., None]) + z[..., None], 20, 1).astype(np.uint8)
    rec.run(
        "dq_tensor-z37x20f32-ax1-bs16-zp-8bit-uint8_codes",
        "dq_tensor",
        {"w": codes, "s": s, "zp": z},
        kw,
        note="8-bit zero-point codes given as uint8 (ModelOpt's rtn would wrap them to int8)",
    )


def amax_e8m0_cases(rec: Recorder, rng):
    """get_amax (2-D axis 1, 3-D axes 1, 2, -1) and compute_e8m0 on its output."""
    for shape, axis, bs in [
        ((8, 64), 1, 32),
        ((6, 96), -1, 32),
        ((2, 64, 6), 1, 32),
        ((2, 6, 64), 2, 32),
        ((2, 4, 64), -1, 16),
        ((2, 32, 5), 1, 16),
    ]:
        w = wide_range_weights(rng, shape, axis % len(shape), bs)
        name = "x".join(map(str, shape))
        amax = rec.run(
            f"get_amax-{name}-ax{axis}-bs{bs}",
            "get_amax",
            {"weight": w},
            {"quant_axis": axis, "block_size": bs},
        )
        want = np.abs(to_blocks(w, bs, axis % len(shape))).max(axis=-1)
        np.testing.assert_array_equal(amax.ravel(), params_to_axis(want, axis).ravel())
        assert (amax == 0).sum() >= 2 and amax.max() > 1e25 and amax[amax > 0].min() < 1e-25
        rec.run(
            f"compute_e8m0-{name}-ax{axis}-bs{bs}",
            "compute_e8m0",
            {"amax": amax},
            {"weight_shape": list(shape), "quant_axis": axis, "block_size": bs},
        )

    # float64 amax: ModelOpt's e8m0 keeps the amax dtype
    w = wide_range_weights(rng, (8, 64), 1, 32).astype(np.float64)
    amax = rec.run(
        "get_amax-8x64f64-ax1-bs32", "get_amax", {"weight": w}, {"quant_axis": 1, "block_size": 32}
    )
    rec.run(
        "compute_e8m0-8x64f64-ax1-bs32",
        "compute_e8m0",
        {"amax": amax},
        {"weight_shape": [8, 64], "quant_axis": 1, "block_size": 32},
    )

    # 2-D axis 0: compute_e8m0 only reshapes, so it is right when given the right amax (max of
    # each contiguous run of block_size rows, row-major over (d0 // bs, d1))
    w = wide_range_weights(rng, (64, 6), 0, 32)
    amax = np.abs(w.reshape(2, 32, 6)).max(axis=1).ravel()
    rec.run(
        "compute_e8m0-64x6-ax0-bs32-contiguous_amax",
        "compute_e8m0",
        {"amax": amax},
        {"weight_shape": [64, 6], "quant_axis": 0, "block_size": 32},
        note="amax computed here (contiguous row blocks), not by ModelOpt's get_amax",
    )


def nvfp4_cases(rec: Recorder, rng):
    """get_weights_scaling_factor_2, get_weights_scaling_factor and quantize (NVFP4)."""
    for name, shape, bs in [("8x64", (8, 64), 16), ("8x96", (8, 96), 32)]:
        x = rng.standard_normal(shape) * rng.uniform(0.1, 3, size=(shape[0], 1))
        x = x.astype(np.float32)
        x[3, bs : 2 * bs] = 0.0  # one all-zero block: its scale becomes 1.0
        s2 = rec.run(
            f"get_weights_scaling_factor_2-{name}", "get_weights_scaling_factor_2", {"input": x}
        )
        sf = rec.run(
            f"get_weights_scaling_factor-{name}-bs{bs}",
            "get_weights_scaling_factor",
            {"input": x, "weights_scaling_factor_2": np.asarray(s2)},
            {"block_size": bs},
            forms={"weights_scaling_factor_2": "scalar"},
        )
        assert sf[3, 1] == 1.0
        rec.run(
            f"quantize-{name}-bs{bs}",
            "quantize",
            {"input": x, "weights_scaling_factor": sf, "weights_scaling_factor_2": np.asarray(s2)},
            {"block_size": bs},
            forms={"weights_scaling_factor_2": "scalar"},
        )
    rec.run(
        "get_weights_scaling_factor_2-zeros",
        "get_weights_scaling_factor_2",
        {"input": np.zeros((4, 16), np.float32)},
    )
    rec.run(
        "get_weights_scaling_factor_2-8x16f64",
        "get_weights_scaling_factor_2",
        {"input": rng.standard_normal((8, 16))},
        note="float64 input, float32 output",
    )


def packing_cases(rec: Recorder, rng):
    """pack_float32_to_4bit_optimized / _cpp_based and pack_weights_to_int4."""
    ties = np.arange(-9.5, 17, 1.0, dtype=np.float32)  # every x.5 from -9.5 to 16.5
    arrays = {
        "ties_even": rng.permutation(np.concatenate([ties, ties[:3]])),  # 30 values
        "ties_odd": rng.permutation(ties)[:27].copy(),
        "out_of_range": np.array(
            [-100, 100, -8.6, 7.6, 15.6, -0.4, 1e6, -1e6, 20, -20, 3], np.float32
        ),
        "ints_even": rng.integers(-10, 18, size=24).astype(np.float32),
        "ints_odd": rng.integers(-10, 18, size=17).astype(np.float32),
        "random_2d": (rng.standard_normal((6, 7)) * 6 + 4).astype(np.float32),
        "random_f64": rng.standard_normal(13) * 5 + 3,
        "int8_values": rng.integers(-20, 21, size=10).astype(np.int8),
        "one_value": np.array([5.0], np.float32),
    }
    for name, arr in arrays.items():
        for signed in (True, False):
            rec.run(
                f"pack_float32_to_4bit_optimized-{name}-{'s' if signed else 'u'}",
                "pack_float32_to_4bit_optimized",
                {"array": arr},
                {"signed": signed},
            )
    rec.run(
        "pack_float32_to_4bit_optimized-list-s",
        "pack_float32_to_4bit_optimized",
        {"array": np.array([1.5, -2.5, 3.2, 9.0, -0.6], np.float32)},
        {"signed": True},
        forms={"array": "list"},
        note="a Python list of floats",
    )

    # cpp_based: recorded with ModelOpt's Python fallback, on inputs without .5 ties only
    # (its C++ extension rounds ties away from zero, the fallback to even)
    for name in ("out_of_range", "ints_odd", "random_2d", "random_f64"):
        arr = arrays[name]
        assert not (np.abs(arr.astype(np.float64)) % 1 == 0.5).any()
        for signed in (True, False):
            rec.run(
                f"pack_float32_to_4bit_cpp_based-{name}-{'s' if signed else 'u'}",
                "pack_float32_to_4bit_cpp_based",
                {"array": arr},
                {"signed": signed},
                note="no .5 ties: ModelOpt's C++ and Python paths agree",
            )

    w = rng.permutation(np.concatenate([ties, [-30, 30, 0.4, -0.4, 6.6, -7.6]]))
    w = (np.concatenate([w, rng.standard_normal(48 - w.size) * 4])).astype(np.float32)
    rec.run("pack_weights_to_int4-8x6", "pack_weights_to_int4", {"weight": w.reshape(8, 6)})
    rec.run(
        "pack_weights_to_int4-6x5",
        "pack_weights_to_int4",
        {"weight": (rng.standard_normal((6, 5)) * 5).astype(np.float32)},
        note="odd last dim: pairs are consecutive C-order elements, crossing rows",
    )
    rec.run(
        "pack_weights_to_int4-4x3x2",
        "pack_weights_to_int4",
        {"weight": (rng.standard_normal((4, 3, 2)) * 5).astype(np.float32)},
    )


def deviation_cases(rec: Recorder, rng):
    """ModelOpt's outputs where it is wrong (quantize deviates on purpose)."""
    dev = {"section": "deviations"}
    w = rng.standard_normal((64, 6)).astype(np.float32)
    rec.run(
        "get_amax-64x6-ax0-bs16",
        "get_amax",
        {"weight": w},
        {"quant_axis": 0, "block_size": 16},
        **dev,
        reason="2-D quant_axis=0: reshape(block_size, -1) groups rows i, i+4, i+8, ... "
        "instead of contiguous runs of block_size rows",
    )

    tiny = (rng.uniform(-1, 1, size=(2, 16)) * 1e-7).astype(np.float32)
    tiny[:, 0] = [1e-7, -1e-7]
    kw = {"block_size": 16, "quantize_axis": 1}
    s, _ = rec.run(
        "find_scales-tiny-ax1-bs16",
        "find_scales",
        {"w": tiny},
        {**kw, "alpha": 1.0, "use_zero_point": False, "num_bits": 4},
        **dev,
        reason="amax 1e-7: scales clipped to CLIP_MIN=1e-5",
    )
    wq = rec.run(
        "rtn-tiny-ax1-bs16",
        "rtn",
        {"w": tiny, "s": s},
        {**kw, "num_bits": 4},
        **dev,
        reason="with the clipped 1e-5 scales every code is 0",
    )
    assert (wq == 0).all() and (s == np.float32(1e-5)).all()

    pos = np.array([[10.0, 11.0]], np.float32)
    kw = {"block_size": 2, "quantize_axis": 1}
    s, z = rec.run(
        "find_scales-positive_block-ax1-bs2-zp",
        "find_scales",
        {"w": pos},
        {**kw, "alpha": 1.0, "use_zero_point": True, "num_bits": 4},
        **dev,
        reason="block [10, 11] does not contain 0: zero point clips to 0",
    )
    wq = rec.run(
        "rtn-positive_block-ax1-bs2-zp",
        "rtn",
        {"w": pos, "s": s, "zp": z},
        {**kw, "num_bits": 4},
        **dev,
        reason="codes clip to 15: error about 10",
    )
    dq = rec.run(
        "dq_tensor-positive_block-ax1-bs2-zp",
        "dq_tensor",
        {"w": wq, "s": s, "zp": z},
        kw,
        **dev,
        reason="dequantized [1, 1]",
    )
    assert np.abs(dq - pos).max() > 9

    zw = straddling_weights(rng, (4, 32), np.float32)
    kw = {"block_size": 16, "quantize_axis": 1}
    s, z = rec.mo.find_scales(zw, 16, 1, 1.0, True, 8)
    wq = rec.run(
        "rtn-z4x32f32-ax1-bs16-zp-8bit",
        "rtn",
        {"w": zw, "s": s, "zp": z},
        {**kw, "num_bits": 8},
        **dev,
        reason="8-bit zero-point codes 128..255 cast to int8 (wrap negative on x86; "
        "float->int8 of out-of-range values is platform-dependent in NumPy)",
    )
    assert wq.min() < 0
    rec.run(
        "quant_tensor-z4x32f32-ax1-bs16-zp-8bit",
        "quant_tensor",
        {"w": zw},
        {**kw, "alpha": 1.0, "use_zero_point": True, "num_bits": 8},
        **dev,
        reason="same int8 wraparound through quant_tensor",
    )


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="the 0.47.0 wheel (default: pip download)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = args.wheel or fetch_wheel(tmp)
        source = extract_quant_utils(wheel, tmp)
        mo = load_module(source)
        provenance = {"wheel_sha256": sha256(wheel), "quant_utils_sha256": sha256(source)}

        rec = Recorder(mo)
        rng = np.random.default_rng(SEED)
        blockwise_cases(rec, rng)
        amax_e8m0_cases(rec, rng)
        nvfp4_cases(rec, rng)
        packing_cases(rec, rng)
        deviation_cases(rec, rng)

    manifest = {
        "modelopt_version": MODELOPT_VERSION,
        "module": MEMBER,
        "numpy_version": np.__version__,
        "seed": SEED,
        **provenance,
        **rec.sections,
    }
    blob = np.frombuffer(json.dumps(manifest, indent=1).encode("utf-8"), dtype=np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, manifest=blob, **rec.arrays)

    counts: dict[str, int] = {}
    for case in rec.sections["cases"]:
        counts[case["function"]] = counts.get(case["function"], 0) + 1
    for function, count in sorted(counts.items()):
        print(f"{count:4d}  {function}")
    print(
        f"{len(rec.sections['cases'])} cases, {len(rec.sections['deviations'])} deviations, "
        f"{len(rec.arrays)} arrays -> {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)"
    )


if __name__ == "__main__":
    main()
