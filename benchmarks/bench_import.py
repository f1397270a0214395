"""Import cost of `quantize` in fresh processes (the budget: under 0.3 s, no compiler loaded).

Run by hand: python benchmarks/bench_import.py [runs]
Prints the median and min wall time of `import quantize` against `import numpy` alone.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

CODE = "import time; t = time.perf_counter(); import {mod}; print(time.perf_counter() - t)"


def measure(mod: str, runs: int) -> list[float]:
    return [
        float(
            subprocess.run(
                [sys.executable, "-c", CODE.format(mod=mod)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for _ in range(runs)
    ]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    for mod in ("numpy", "ml_dtypes", "quantize", "quantize.quant_utils"):
        t = measure(mod, runs)
        print(
            f"import {mod:22s} median {1000 * statistics.median(t):6.1f} ms  "
            f"min {1000 * min(t):6.1f} ms  ({runs} fresh processes)"
        )


if __name__ == "__main__":
    main()
