"""Throughput and memory of the 4-bit kernels against the NumPy path and a memory copy.

Run by hand (not collected by pytest):

    python benchmarks/bench_kernels.py              # 4096x4096 and 11008x4096, ~8 minutes
    python benchmarks/bench_kernels.py --quick      # 4096x4096 float32 only
    python benchmarks/bench_kernels.py --quick --formats nvfp4,nf4
    QUANTIZE_NUM_THREADS=1 python benchmarks/bench_kernels.py --quick
    python benchmarks/bench_kernels.py --no-memory --shapes 11008x4096 --dtypes float32 \
        --formats int4,uint4 --blocks 128           # one row per format

For each shape, input dtype (float32, float16), format and block size (int4 and uint4 at 32 and
128; int4_ort and fp4_e2m1 at 128, mxfp4 and mxfp4_ceil at 32, nvfp4 at 16, nf4 and nf4_dq at
64: each format's usual block), blocks along the last axis, it prints:

* quantize+pack and unpack+dequantize in Melem/s, best of --reps after a warm-up;
  dequantize twice: into a preallocated array (`out=`, the kernel itself) and into a new array
  (what an API call returning a fresh array pays: the OS zero-fills every new page first);
* the ratio to the NumPy path (`quantize.kernels.reference`, the steps `quantize_tensor` and
  `QuantizedTensor.dequantize` take; best of --ref-reps);
* bytes read + written per second as a share of a 2-thread `np.copyto` of the input's bytes,
  measured in the same run (each thread copies one half into a preallocated array), in the
  same rounds as the kernels (one call of each per round; best of --reps rounds);
* peak extra memory of one call in a fresh subprocess: the peak resident set (VmHWM, reset
  through /proc/self/clear_refs just before the call) minus the resident set before it, with
  the input already in memory. numba's allocations are invisible to tracemalloc; this is not.

Also: NumPy/numba versions, thread count, CPU, and how much CPU other processes used while the
timings ran (on a shared machine that makes a run worth repeating).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np

SHAPES = [(4096, 4096), (11008, 4096)]
DTYPES = ["float32", "float16"]
#: format -> block sizes
FORMATS = {
    "int4": [32, 128],
    "uint4": [32, 128],
    "int4_ort": [128],
    "fp4_e2m1": [128],
    "mxfp4": [32],
    "mxfp4_ceil": [32],
    "nvfp4": [16],
    "nf4": [64],
    "nf4_dq": [64],
}


# --------------------------------------------------------------------------- helpers


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class Copy:
    """A 2-thread copy of x into a preallocated array, one half per thread (np.copyto releases
    the GIL, so the halves run in parallel)."""

    def __init__(self, x: np.ndarray):
        dst = np.empty_like(x)
        src, out = x.reshape(-1), dst.reshape(-1)
        half = src.size // 2
        self.parts = [(out[:half], src[:half]), (out[half:], src[half:])]
        self.dst = dst

    def __call__(self) -> None:
        threads = [threading.Thread(target=np.copyto, args=p) for p in self.parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


class Flush:
    """Evict the caches by reading a buffer larger than the last-level cache (this machine
    reports hundreds of MiB of L3, which would otherwise hold a 64 MiB tensor between calls).
    Reading leaves clean lines behind, so the timed call pays no write-backs for the flush."""

    def __init__(self, nbytes: int):
        self.buf = np.ones(nbytes // 8, np.uint64)

    def __call__(self) -> None:
        self.buf.max()


def llc_bytes() -> int:
    """The largest cache the OS reports (Linux sysfs), or 0."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    sizes = [0]
    for d in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, d, "size")) as f:
                v = f.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(v[-1:], 1)
        sizes.append(int(v.rstrip("KMG")) * mult)
    return max(sizes)


def timings(fns: dict, reps: int, flush: Flush | None) -> dict:
    """Best time of each function. Without `flush`: `reps` calls in a row after a warm-up (the
    data stay in cache as far as they fit). With it: `reps` rounds of one call of each, the
    caches evicted before every call (every call reads and writes memory)."""
    best = dict.fromkeys(fns, float("inf"))
    if flush is None:
        for name, fn in fns.items():
            fn()
            best[name] = best_of(fn, 2 * reps if name == "copy" else reps)  # copies vary most
        return best
    for _ in range(reps):
        for name, fn in fns.items():
            flush()
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(a) for a in f.readline().split()[1:8]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


def _own_ticks() -> float:
    """This process and its finished children (the memory probes)."""
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """CPU cores used by other processes during the block (Linux; None elsewhere)."""

    def __enter__(self):
        try:
            self.start = (_busy_ticks(), _own_ticks(), time.perf_counter())
        except OSError:
            self.start = None
        self.cores = None
        return self

    def __exit__(self, *exc):
        if self.start is not None:
            busy, own, t = self.start
            dt = time.perf_counter() - t
            ticks = (_busy_ticks() - busy) - (_own_ticks() - own)
            self.cores = max(0.0, ticks / os.sysconf("SC_CLK_TCK") / dt)


def make_input(shape, dtype: str) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return x.astype(dtype)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- memory probe

PROBE = r"""
import json, sys
import numpy as np
from quantize import kernels as K
from quantize.kernels import reference as R

rows, n, dtype, fmt, bs, op, impl = json.loads(sys.argv[1])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

x = np.random.default_rng(0).standard_normal((rows, n), dtype=np.float32).astype(dtype)
K.quantize_rows(fmt, x[:2, :256], bs)  # load the kernels (and numba) before measuring
p, s, z = res = K.quantize_rows(fmt, x, bs)
ts = res.tensor_scale
K.dequantize_rows(fmt, p[:2], s[:2], None if z is None else z[:2], n, bs, dtype, tensor_scale=ts)
if op == "quantize":
    del p, s, z, res
    call = (lambda: K.quantize_rows(fmt, x, bs)) if impl == "kernel" else (
        lambda: R.quantize_rows(fmt, x, bs))
else:
    del x
    call = (lambda: K.dequantize_rows(fmt, p, s, z, n, bs, dtype, tensor_scale=ts)) if (
        impl == "kernel") else (
        lambda: R.dequantize_rows(fmt, p, s, z, n, bs, dtype, tensor_scale=ts))
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident set
out = call()
print(status("VmHWM") - before)
"""


def peak_extra_bytes(rows, n, dtype, fmt, bs, op, impl) -> int | None:
    """Peak extra resident memory of one call, in a fresh process (None if not measurable)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    arg = json.dumps([rows, n, dtype, fmt, bs, op, impl])
    res = subprocess.run(
        [sys.executable, "-c", PROBE, arg], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return None
    return int(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def run_case(K, R, x: np.ndarray, fmt: str, bs: int, flush: Flush, args) -> str:
    """One table row: time the copy, the kernels and the NumPy path; probe the memory."""
    rows, n = x.shape
    dtype = x.dtype.name
    p, s, z = res = K.quantize_rows(fmt, x, bs)
    ts = res.tensor_scale  # nvfp4's; None for the others
    out = np.empty(x.shape, x.dtype)
    fns = {
        "copy": Copy(x),
        "q": lambda: K.quantize_rows(fmt, x, bs),
        "dq": lambda: K.dequantize_rows(fmt, p, s, z, n, bs, dtype, out=out, tensor_scale=ts),
    }
    with ForeignLoad() as load:
        hot = timings(fns, args.reps, None)
        tdn = best_of(
            lambda: K.dequantize_rows(fmt, p, s, z, n, bs, dtype, tensor_scale=ts), args.reps
        )
        cold = timings(fns, args.reps, flush)
    tq_ref = best_of(lambda: R.quantize_rows(fmt, x, bs), args.ref_reps)
    td_ref = best_of(
        lambda: R.dequantize_rows(fmt, p, s, z, n, bs, dtype, tensor_scale=ts), args.ref_reps
    )
    packed_bytes = p.nbytes + s.nbytes + (0 if z is None else z.nbytes)
    moved = x.nbytes + packed_bytes  # the same bytes move both ways
    mem = ["", ""]
    if not args.no_memory:
        for i, op in enumerate(("quantize", "dequantize")):
            k = peak_extra_bytes(rows, n, dtype, fmt, bs, op, "kernel")
            r = peak_extra_bytes(rows, n, dtype, fmt, bs, op, "numpy")
            if k is not None and r is not None:
                mem[i] = f"{k / 2**20:.0f} / {r / 2**20:.0f}"

    def rate(t):  # Melem/s
        return f"{x.size / t / 1e6:,.0f}"

    def pct(t, regime):  # bytes moved per second, as a share of the copy's
        return f"{100 * moved / t / (2 * x.nbytes / regime['copy']):.0f}%"

    row = (
        f"| {rows}x{n} | {dtype} | {fmt} | {bs} "
        f"| {2 * x.nbytes / hot['copy'] / 1e9:.1f} / {2 * x.nbytes / cold['copy'] / 1e9:.1f} "
        f"| {rate(hot['q'])} / {rate(cold['q'])} | {pct(hot['q'], hot)} / {pct(cold['q'], cold)} "
        f"| {tq_ref / hot['q']:.0f} | {mem[0]} "
        f"| {rate(hot['dq'])} / {rate(cold['dq'])} "
        f"| {pct(hot['dq'], hot)} / {pct(cold['dq'], cold)} "
        f"| {rate(tdn)} | {td_ref / tdn:.0f} | {pct(tdn, hot)} | {mem[1]} |"
    )
    if load.cores is not None and load.cores > 0.05:
        row += f" (other processes: {load.cores:.2f} cores)"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 float32 only")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per kernel (best is kept)")
    ap.add_argument("--ref-reps", type=int, default=3, help="timed runs of the NumPy path")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument(
        "--formats", default=",".join(FORMATS), help="comma-separated formats (default: all)"
    )
    ap.add_argument("--shapes", help="comma-separated RxN shapes (default: 4096x4096,11008x4096)")
    ap.add_argument("--dtypes", help="comma-separated input dtypes (default: float32,float16)")
    ap.add_argument("--blocks", help="comma-separated block sizes (default: each format's)")
    args = ap.parse_args()
    formats = {f: FORMATS[f] for f in args.formats.split(",")}
    if args.blocks:
        formats = {f: [int(b) for b in args.blocks.split(",")] for f in formats}

    import numba

    from quantize import kernels as K
    from quantize.kernels import reference as R

    shapes = SHAPES[:1] if args.quick else SHAPES
    dtypes = DTYPES[:1] if args.quick else DTYPES
    if args.shapes:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    if args.dtypes:
        dtypes = args.dtypes.split(",")

    # compile (or load from numba's cache) every kernel before any timing
    for dtype in dtypes:
        for fmt in formats:
            x = make_input((4, 256), dtype)
            p, s, z = res = K.quantize_rows(fmt, x, 128)
            K.dequantize_rows(fmt, p, s, z, 256, 128, dtype, tensor_scale=res.tensor_scale)

    print(f"date: {datetime.date.today()}  machine: {cpu_name()}, {os.cpu_count()} vCPU")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"threads {numba.get_num_threads()} (layer {numba.threading_layer()}), "
        f"{K.ENV_THREADS}={os.environ.get(K.ENV_THREADS, '')!r}"
    )
    flush = Flush(max(2 * llc_bytes(), 256 << 20))
    print(
        f"caches: largest reported {llc_bytes() >> 20} MiB; cold runs first read "
        f"{flush.buf.nbytes >> 20} MiB to evict it\n"
        "columns (a / b = hot / cold): hot = best of --reps calls in a row (the data stay in "
        "cache as far as they fit), cold = caches evicted before every call; Melem/s; %copy = "
        "(bytes read + written)/s over a 2-thread np.copyto's in the same regime; x numpy = "
        "speed-up over the NumPy path (hot); dq out= into a preallocated array, dq new into a "
        "fresh one (hot, page faults included); mem = peak extra resident MiB of one call "
        "(kernel / NumPy)\n"
    )
    header = (
        "| shape | dtype | fmt | block | copy GB/s | quantize Melem/s | %copy | x numpy | mem | "
        "dq out= Melem/s | %copy | dq new Melem/s | x numpy | %copy | mem |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    overall = ForeignLoad().__enter__()
    for shape in shapes:
        for dtype in dtypes:
            x = make_input(shape, dtype)
            for fmt, blocks in formats.items():
                for bs in blocks:
                    print(run_case(K, R, x, fmt, bs, flush, args), flush=True)
    overall.__exit__()
    if overall.cores is not None:
        print(f"\nCPU used by other processes during the run: {overall.cores:.2f} cores on average")
    print(
        "outputs (kernel mem floor): packed n/2 B + scales 4n/bs B (+ zero points n/bs B) per "
        "row for quantize; the (rows, n) result for dequantize. nvfp4 quantize reads its input "
        "twice (the tensor amax comes first)"
    )


if __name__ == "__main__":
    main()
