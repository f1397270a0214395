"""API-level speed of quantize_tensor / dequantize per format, kernels on and off.

Run by hand: python benchmarks/bench_api.py
4096x4096 float32 (seeded normal), each format at its usual block size, best of 5 after a
warm-up call; includes the input checks and output allocation an API call pays. For kernel-only
figures against the machine's copy bandwidth see bench_kernels.py.
"""

from __future__ import annotations

import os
import time

import numpy as np

from quantize import quantize_tensor

CONFIGS = [("int4", 128), ("uint4", 128), ("nf4", 64), ("fp4_e2m1", 32), ("mxfp4", 32),
           ("nvfp4", 16)]  # fmt: skip


def best(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    x = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    print(f"{'format':9s} {'block':>5s} {'path':8s} {'quantize Melem/s':>17s} {'dequantize':>11s}")
    for fmt, bs in CONFIGS:
        for switch, path in (("1", "kernels"), ("0", "numpy")):
            os.environ["QUANTIZE_KERNELS"] = switch
            qt = quantize_tensor(x, fmt, bs)
            qt.dequantize()  # warm-up (and numba's first-call compile or cache load)
            tq = best(lambda: quantize_tensor(x, fmt, bs))  # noqa: B023
            td = best(qt.dequantize)
            q_rate, dq_rate = x.size / tq / 1e6, x.size / td / 1e6
            print(f"{fmt:9s} {bs:5d} {path:8s} {q_rate:17,.0f} {dq_rate:11,.0f}")


if __name__ == "__main__":
    main()
