"""Our 4-bit quantizers against other libraries' on the same weight, by speed and error.

Run by hand (not collected by pytest):

    python benchmarks/compare_peers.py                  # 4096x4096 float32, block 128
    python benchmarks/compare_peers.py --size 1024      # a quicker look

The weight is one seeded standard-normal float32 array W of shape (N, K) = (size, size), the
PyTorch Linear layout, quantized in blocks of 128 along K (the input dimension). Each library
gets it in its own layout, copied before any timing: ours and gguf take W (blocks along the
last axis), ONNX Runtime and ModelOpt the ONNX MatMul weight W.T (K, N), blocks along axis 0.

Times are the best of --reps calls after one warm-up call. SQNR = 10 log10(sum x^2 /
sum (x - x̂)^2), computed in float64 from each library's own dequantized values (for ORT,
which has no Python dequantizer, from its codes and scales: (code - zero point) * scale).
"same codes" compares a peer's codes with those of our format that implements the same rule.

Peers, each skipped with a printed note when it is not available:
* ONNX Runtime: `DefaultWeightOnlyQuantizer.qbits_block_quant`, the numpy-in/numpy-out step
  `MatMulNBitsQuantizer` runs on each MatMul weight (C++ `quantize_matmul_4bits`), symmetric
  and asymmetric. Needs onnx-ir (the module imports it).
* NVIDIA ModelOpt 0.47.0: `modelopt/onnx/quantization/quant_utils.py` `quant_tensor` (NumPy),
  loaded by path from the wheel (the package itself needs torch): from
  /tmp/mo/nvidia_modelopt-0.47.0-py3-none-any.whl if it is there, else
  `pip download --no-deps nvidia-modelopt==0.47.0` into a temporary folder.
* gguf (llama.cpp's Python package): `gguf.quants.quantize(W, Q4_0)`; Q4_0's block is 32.
* bitsandbytes NF4: only if it imports without torch (it does not).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from bench_kernels import ForeignLoad  # this folder's kernel benchmark: other processes' CPU use

from quantize import __version__ as quantize_version
from quantize import get_format, kernels, quantize_tensor
from quantize.formats.integer import OrtInt4

MO_VERSION = "0.47.0"
MO_WHEEL = Path(f"/tmp/mo/nvidia_modelopt-{MO_VERSION}-py3-none-any.whl")
MO_FILE = "modelopt/onnx/quantization/quant_utils.py"


def best_of(fn, reps: int) -> tuple[float, object]:
    out = fn()  # warm-up (numba compiles or loads its cache here)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def sqnr(x: np.ndarray, xhat: np.ndarray) -> float:
    x = x.astype(np.float64)
    err = np.sum((x - xhat.astype(np.float64)) ** 2)
    return float("inf") if err == 0 else 10 * np.log10(np.sum(x**2) / err)


def unpack(b: np.ndarray) -> np.ndarray:
    out = np.empty((*b.shape[:-1], 2 * b.shape[-1]), np.uint8)
    out[..., 0::2], out[..., 1::2] = b & 15, b >> 4
    return out


class Row:
    def __init__(self, name, rule, block, q_s, dq_s, snr, n, vs=None, same=None, note=""):
        self.name, self.rule, self.block = name, rule, block
        self.q = n / q_s / 1e6
        self.dq = None if dq_s is None else n / dq_s / 1e6
        self.snr, self.vs, self.same, self.note = snr, vs, same, note


# --------------------------------------------------------------------------- ours


def ours(w, fmt, block, reps):
    n = w.size
    used = kernels.wanted(get_format(fmt), w.dtype, n)
    tq, qt = best_of(lambda: quantize_tensor(w, fmt, block_size=block, axis=-1), reps)
    tdq, back = best_of(qt.dequantize, reps)
    path = "numba kernel" if used else "NumPy"
    return Row(f"quantize {fmt}", RULES[fmt], block, tq, tdq, sqnr(w, back), n, note=path), qt


RULES = {
    "int4": "amax/7, rint",
    "uint4": "(max-min)/15, int zp",
    "nf4": "NF4 codebook, amax",
    "int4_ort": "ORT: extreme/-8, roundf",
}


def ort_codes(qt) -> tuple[np.ndarray, np.ndarray]:
    """Our int4_ort tensor as ORT lays it out: unsigned codes and signed scales, (N, nb, bs)."""
    return OrtInt4.to_ort(qt.codes(), qt.scales, qt.zero_points)


# --------------------------------------------------------------------------- peers


def ort_peer(w, wt, block, reps, ours_qt):
    try:
        from onnxruntime import __version__ as v
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )
    except ImportError as e:
        print(f"note: ONNX Runtime's quantizer skipped: {e}")
        return []
    rows = []
    n = w.size
    for sym in (True, False):
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym)
        step = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant
        t, (packed, scales, zp) = best_of(lambda step=step: step(wt), reps)
        codes = unpack(packed)  # (N, nb, block)
        nb = scales.shape[1]  # ORT packs asymmetric zero points two per byte
        z = np.full(scales.shape, 8, np.uint8) if sym else unpack(zp)[:, :nb]
        back = (codes.astype(np.float64) - z[..., None]) * scales[..., None]
        back = back.reshape(w.shape[0], -1)[:, : w.shape[1]]
        if sym:
            oc, os_ = ort_codes(ours_qt["int4_ort"])
            same = f"{np.mean(oc == codes):.4%} of int4_ort's"
            same += ", scales equal" if np.array_equal(os_, scales) else ", scales differ"
            vs, rule = "int4_ort", "extreme/-8, roundf"
        else:
            q = ours_qt["uint4"]
            same = f"{np.mean(q.codes() == codes):.4%} of uint4's"
            same += f", zp {np.mean(q.zero_points == z):.2%}"
            vs, rule = "uint4", "(max-min)/15, roundf zp"
        name = f"ORT {v} {'sym' if sym else 'asym'}"
        rows.append(Row(name, rule, block, t, None, sqnr(w, back), n, vs, same, "C++, threads"))
    return rows


def modelopt_module():
    """ModelOpt's quant_utils.py loaded by path (it imports only NumPy), or None with a note."""
    wheel = MO_WHEEL
    if not wheel.exists():
        tmp = Path(tempfile.mkdtemp(prefix="modelopt-"))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp)]
        cmd.append(f"nvidia-modelopt=={MO_VERSION}")
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
            wheel = next(tmp.glob("nvidia_modelopt-*.whl"))
        except (subprocess.SubprocessError, StopIteration, OSError) as e:
            print(f"note: ModelOpt skipped: could not get the {MO_VERSION} wheel ({e})")
            return None
    try:
        with zipfile.ZipFile(wheel) as z:
            src = z.read(MO_FILE)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        print(f"note: ModelOpt skipped: {wheel} has no readable {MO_FILE} ({e})")
        return None
    path = Path(tempfile.mkdtemp(prefix="modelopt-src-")) / "modelopt_quant_utils.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location("modelopt_quant_utils", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # it should import NumPy only; a newer one might want more
        print(f"note: ModelOpt skipped: {MO_FILE} did not load ({type(e).__name__}: {e})")
        return None
    return mod


def modelopt_peer(w, wt, block, reps, ours_qt):
    mo = modelopt_module()
    if mo is None:
        return []
    t, (wq, s, _) = best_of(lambda: mo.quant_tensor(wt, block, quantize_axis=0), reps)
    tdq, back = best_of(lambda: mo.dq_tensor(wq, s, block, quantize_axis=0), reps)
    codes = ours_qt["int4"].codes().reshape(w.shape[0], -1)[:, : w.shape[1]]
    same = f"{np.mean(codes == wq.T):.4%} of int4's"
    same += ", scales equal" if np.array_equal(ours_qt["int4"].scales, s.T) else ", scales differ"
    name = f"ModelOpt {MO_VERSION} quant_tensor"
    return [
        Row(name, "amax/7, rint", block, t, tdq, sqnr(w, back.T), w.size, "int4", same, "NumPy")
    ]


def gguf_peer(w, reps, ours_qt):
    try:
        import gguf
        from gguf.quants import GGMLQuantizationType, dequantize, quantize
    except ImportError as e:
        print(f"note: gguf Q4_0 skipped: {e} (pip install gguf)")
        return []
    q4 = GGMLQuantizationType.Q4_0
    t, q = best_of(lambda: quantize(w, q4), reps)
    tdq, back = best_of(lambda: dequantize(q, q4), reps)
    # each 18-byte block: float16 d, then 16 bytes (elements i low nibble, i + 16 high)
    blocks = q.reshape(w.shape[0], -1, 18)
    qs = blocks[..., 2:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    oc, os_ = ort_codes(ours_qt["int4_ort@32"])
    same = f"{np.mean(oc == codes):.4%} of int4_ort's (block 32)"
    same += f", scales (float16) {np.mean(os_.astype(np.float16) == d):.2%}"
    v = getattr(gguf, "__version__", None) or _dist_version("gguf")
    name = f"gguf {v} Q4_0"
    return [
        Row(
            name, "extreme/-8, trunc(+8.5)", 32, t, tdq, sqnr(w, back), w.size, "int4_ort@32",
            same, "NumPy",
        )
    ]  # fmt: skip


def bnb_peer():
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # it imports torch at the top: not installed here, not wanted
        print(f"note: bitsandbytes NF4 skipped: it does not import without torch ({e})")
        return []
    if "torch" in sys.modules:
        print("note: bitsandbytes NF4 skipped: importing it pulled in torch")
    return []


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.size, args.size), dtype=np.float32)  # (N, K)
    wt = np.ascontiguousarray(w.T)  # (K, N): the ONNX MatMul weight, for ORT and ModelOpt

    print(
        f"{datetime.date.today()}  {platform.node()}  {os.cpu_count()} CPUs  Python "
        f"{platform.python_version()}  NumPy {np.__version__}  quantize {quantize_version}"
    )
    print(f"W: ({args.size}, {args.size}) float32 standard normal, seed 0; best of {args.reps}")

    rows, qts = [], {}
    with ForeignLoad() as load:
        for fmt in ("int4", "uint4", "nf4", "int4_ort"):
            row, qts[fmt] = ours(w, fmt, args.block, args.reps)
            rows.append(row)
        row, qts["int4_ort@32"] = ours(w, "int4_ort", 32, args.reps)
        row.name += " (block 32)"
        rows.append(row)
        ours_speed = {r.name.split()[1] + ("@32" if r.block == 32 else ""): r for r in rows}

        rows += ort_peer(w, wt, args.block, args.reps, qts)
        rows += modelopt_peer(w, wt, args.block, args.reps, qts)
        rows += gguf_peer(w, args.reps, qts)
        rows += bnb_peer()
    if load.cores is not None:
        print(f"other processes used {load.cores:.2f} CPU cores on average during the run")

    print()
    head = (
        "| implementation | rule | block | quantize Melem/s | same rule: ours x | int4: ours x "
        "| dequantize Melem/s | same rule: ours x | SQNR dB | same codes as ours | path |"
    )
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    int4 = ours_speed["int4"]
    for r in rows:
        mine = ours_speed.get(r.vs) if r.vs else None
        qx = f"{mine.q / r.q:.2f} ({r.vs})" if mine else ""
        ix = f"{int4.q / r.q:.2f}" if r.vs else ""
        dqx = f"{mine.dq / r.dq:.2f}" if mine and r.dq else ""
        dq = f"{r.dq:,.0f}" if r.dq else "n/a"
        print(
            f"| {r.name} | {r.rule} | {r.block} | {r.q:,.0f} | {qx} | {ix} | {dq} | {dqx} | "
            f"{r.snr:.3f} | {r.same or ''} | {r.note} |"
        )


if __name__ == "__main__":
    main()
