"""`quantize onnx` on an ONNX model with external data over 2 GB: peak memory and wall time.

Run by hand (it writes SIZE GB of float32 weights plus the quantized output in a temporary
folder, and deletes them all):

    python benchmarks/big_onnx.py                    # 2.4 GB: 36 MatMuls of 4096 x 4096
    python benchmarks/big_onnx.py --layers 8 --output-type qdq

The model is a chain of MatMuls (float32 4096 x 4096 weights, one random tensor with its low
mantissa bits changed per layer so no two are equal), written straight to its data file so
generating it holds one weight at a time. The quantizer runs as a child process; a sampler
reads /proc/PID/status every 50 ms, and the child prints its own VmHWM (peak resident size) at
the end. Reading the input once is timed with `cat model.onnx model.onnx.data > /dev/null`
(page cache not dropped: no root here); the ratio run time / cat time is printed.
benchmarks/big_onnx.md holds the figures measured on this machine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _onnx_chain import chain_model  # the tests' model builder

GB = 1e9
CHILD = """
import sys, time
import quantize.io.onnx as q
from quantize.io.onnx import quantize_onnx_file
if sys.argv[5] == "eager":  # the old way, for comparison: all external data read up front
    lazy_load = q.load_model
    q.load_model = lambda path, lazy=False: lazy_load(path, lazy=False)
t = time.perf_counter()
res = quantize_onnx_file(sys.argv[1], sys.argv[2], format=sys.argv[3], output=sys.argv[4])
took = time.perf_counter() - t
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(len(res["rows"]), res["output_bytes"], took, int(hwm) * 1024)
"""


def generate(folder: Path, layers: int, dim: int) -> tuple[Path, int]:
    """Write the model and its data file one weight at a time; returns (model path, bytes)."""
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((dim, dim), np.float32) / np.float32(dim**0.5)).view(np.uint32)
    # low mantissa bits differ: no two weights equal
    path = chain_model(
        folder, layers, dim, weight=lambda i: (base ^ np.uint32(i + 1)).view(np.float32)
    )
    return path, layers * dim * dim * 4


def cat_time(files: list[Path]) -> float:
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def run_child(
    src: Path, dst: Path, fmt: str, output: str, mode: str
) -> tuple[list[str], float, int]:
    """(child's printed fields, wall time, polled peak VmHWM in bytes)."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), str(dst), fmt, output, mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    peak = [0]

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"quantizer failed ({proc.returncode})")
    return out.split(), wall, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=36, help="MatMuls (default 36: 2.4 GB)")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--format", default="int4")
    ap.add_argument("--output-type", default="matmulnbits", choices=["matmulnbits", "qdq"])
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--eager", action="store_true", help="read all external data up front")
    args = ap.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="big_onnx.", dir=args.dir))
    try:
        t = time.perf_counter()
        src, size = generate(folder, args.layers, args.dim)
        print(f"model: {args.layers} x {args.dim}x{args.dim} float32 = {size / GB:.2f} GB "
              f"(largest tensor {args.dim**2 * 4 / 2**20:.0f} MiB), written in "
              f"{time.perf_counter() - t:.1f} s")  # fmt: skip
        inputs = [src, src.with_name("m.onnx.data")]
        cat_before = cat_time(inputs)
        mode = "eager" if args.eager else "lazy"
        fields, wall, polled = run_child(
            src, folder / "q.onnx", args.format, args.output_type, mode
        )
        cat_after = cat_time(inputs)
        n, out_bytes, took, hwm = int(fields[0]), int(fields[1]), float(fields[2]), int(fields[3])
        print(f"quantized {n} weights ({args.format}, {args.output_type}, {mode}): output "
              f"{out_bytes / GB:.3f} GB")  # fmt: skip
        print(f"wall time {wall:.1f} s (child process), quantize_onnx_file {took:.1f} s")
        print(f"cat input > /dev/null: {cat_before:.1f} s before, {cat_after:.1f} s after; "
              f"ratio {took / min(cat_before, cat_after):.1f}x")  # fmt: skip
        mib = 2**20
        print(
            f"peak RSS (VmHWM): {hwm / mib:.0f} MiB (child's own), {polled / mib:.0f} MiB "
            f"(polled); input {size / mib:.0f} MiB, output {out_bytes / mib:.0f} MiB"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
