"""Cost and accuracy of the data-free methods ("mse", "hqq") against round to nearest ("rtn").

Run by hand: python benchmarks/bench_methods.py [--quick] [--no-hqq]
Part 1, time: quantize_tensor on 4096x4096 float32 (seeded normal) at block 32 and 128 for
int4, uint4, int4_ort, nf4, fp4_e2m1, mxfp4 and nvfp4 (the formats with a compiled mse search),
kernels on and off,
best of 3 after a warm-up call (which compiles or loads the kernels; on the NumPy path mse is
timed once, without one: several seconds a call);
the ratio is each method's time over rtn's on the same path, and for the kernels also the
ratio of process CPU times (best of 3; less noisy on a shared machine).
Part 1b, hqq (unless --no-hqq): int4, uint4, int4_affine and uint4_float_zp at block 128, in one
run: rtn (kernel where there is one), hqq's compiled path (best of 3) and its NumPy reference
(QUANTIZE_KERNELS=0, one call: ~30 s each, 60+ s for the float zero point formats),
with the ratios to rtn (wall, and process CPU time for the compiled path: less noisy on a
shared machine) and whether both hqq paths gave the same bytes.
Part 2, accuracy: SQNR (dB) of each method and its gain over rtn for int4, uint4, int4_ort,
nf4, fp4_e2m1, mxfp4 and nvfp4 at block 32 and 128, on gaussian and student-t(4) 4096x4096
weights. --quick uses 1024x4096.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from quantize import quantize_tensor


def best(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sqnr(x: np.ndarray, y: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    return float(10 * np.log10((x64**2).sum() / ((x64 - y) ** 2).sum()))


def timing(x: np.ndarray, formats: list[str], methods: list[str]) -> None:
    head = " ".join(f"{m + ' ms':>9s}" for m in methods)
    tail = " ".join(f"{m + '/rtn':>8s}" for m in methods[1:])
    cpu = " ".join(f"{'cpu ' + m + '/rtn':>12s}" for m in methods[1:])
    print(f"{'format':8s} {'block':>5s} {'path':8s} {head}   {tail}   {cpu}")
    for fmt in formats:
        for bs in (32, 128):
            for switch, path in (("1", "kernels"), ("0", "numpy")):
                os.environ["QUANTIZE_KERNELS"] = switch
                t, c = {}, {}
                for m in methods:
                    run = lambda: quantize_tensor(x, fmt, bs, method=m)  # noqa: B023, E731
                    if path == "numpy" and m != "rtn":  # seconds a call, nothing to compile
                        t[m] = best(run, 1)
                        continue
                    run()  # warm-up / compile
                    t[m] = best(run, 3 if m != "hqq" else 1)
                    if path == "kernels":
                        c[m] = cpu_best(run)
                cells = " ".join(f"{t[m] * 1e3:9.1f}" for m in methods)
                ratios = " ".join(f"{t[m] / t['rtn']:8.1f}" for m in methods[1:])
                cpus = " ".join(
                    f"{c[m] / c['rtn']:12.1f}" if m in c else f"{'-':>12s}" for m in methods[1:]
                )
                print(f"{fmt:8s} {bs:5d} {path:8s} {cells}   {ratios}   {cpus}")
    os.environ["QUANTIZE_KERNELS"] = "1"


def cpu_best(fn, runs: int = 3) -> float:
    """Least process CPU time of `runs` calls: on a shared machine it moves less than wall."""
    times = []
    for _ in range(runs):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def hqq_timing(x: np.ndarray, formats: list[str], bs: int = 128) -> None:
    print(f"\n{'format':14s} {'block':>5s} {'rtn s':>8s} {'hqq kernel s':>13s} {'hqq numpy s':>12s}"
          f" {'kernel/rtn':>10s} {'numpy/rtn':>10s} {'numpy/kernel':>12s} {'cpu k/rtn':>9s}"
          " same")  # fmt: skip
    for fmt in formats:
        os.environ["QUANTIZE_KERNELS"] = "1"
        quantize_tensor(x, fmt, bs)
        quantize_tensor(x, fmt, bs, method="hqq")  # warm-up / compile
        t_rtn = best(lambda: quantize_tensor(x, fmt, bs))  # noqa: B023
        t_k = best(lambda: quantize_tensor(x, fmt, bs, method="hqq"))  # noqa: B023
        c_rtn = cpu_best(lambda: quantize_tensor(x, fmt, bs))  # noqa: B023
        c_k = cpu_best(lambda: quantize_tensor(x, fmt, bs, method="hqq"))  # noqa: B023
        k = quantize_tensor(x, fmt, bs, method="hqq")
        os.environ["QUANTIZE_KERNELS"] = "0"
        start = time.perf_counter()
        r = quantize_tensor(x, fmt, bs, method="hqq")
        t_n = time.perf_counter() - start
        os.environ["QUANTIZE_KERNELS"] = "1"
        same = (
            np.array_equal(k.data, r.data)
            and np.array_equal(k.scales.view(np.uint32), r.scales.view(np.uint32))
            and (k.zero_points is None or np.array_equal(k.zero_points, r.zero_points))
        )
        print(
            f"{fmt:14s} {bs:5d} {t_rtn:8.3f} {t_k:13.3f} {t_n:12.1f} {t_k / t_rtn:10.1f}"
            f" {t_n / t_rtn:10.0f} {t_n / t_k:12.0f} {c_k / c_rtn:9.1f} {same}"
        )


def accuracy(shape: tuple[int, int], methods: list[str]) -> None:
    rng = np.random.default_rng(0)
    data = {
        "gaussian": rng.standard_normal(shape).astype(np.float32),
        "student-t(4)": rng.standard_t(4, shape).astype(np.float32),
    }
    head = " ".join(f"{m + ' dB':>8s}" for m in methods)
    tail = " ".join(f"{m + ' gain':>9s}" for m in methods[1:])
    print(f"\n{'data':13s} {'format':8s} {'block':>5s} {head}   {tail}")
    for name, x in data.items():
        for fmt in ("int4", "uint4", "int4_ort", "nf4", "fp4_e2m1", "mxfp4", "nvfp4"):
            for bs in (32, 128):
                q = {
                    m: sqnr(x, quantize_tensor(x, fmt, bs, method=m).dequantize()) for m in methods
                }
                cells = " ".join(f"{q[m]:8.2f}" for m in methods)
                gains = " ".join(f"{q[m] - q['rtn']:+9.2f}" for m in methods[1:])
                print(f"{name:13s} {fmt:8s} {bs:5d} {cells}   {gains}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024x4096 for the accuracy table")
    ap.add_argument(
        "--no-hqq", action="store_true", help="leave hqq out (its NumPy path takes ~30 s a call)"
    )
    args = ap.parse_args()
    methods = ["rtn", "mse"] + ([] if args.no_hqq else ["hqq"])
    x = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    timing(x, ["int4", "uint4", "int4_ort", "nf4", "fp4_e2m1", "mxfp4", "nvfp4"], ["rtn", "mse"])
    if not args.no_hqq:
        hqq_timing(x, ["int4", "uint4", "int4_affine", "uint4_float_zp"])
    accuracy((1024, 4096) if args.quick else (4096, 4096), methods)


if __name__ == "__main__":
    main()
