"""Run benchmarks/methods_real_models.py with an AWQ variant, for ablations.

    VARIANT=noweight,onesided python scripts/awq_variant.py $M --methods rtn,awq --no-mixed

VARIANT names what to turn off: `noweight` (the scale search without the weight-magnitude
factor: beta = 0 only) and/or `onesided` (AutoAWQ's one-sided clip instead of clamping each
end of a zero-point block on its own). Both off is the AWQ of before 2026-11-23.
"""

import os
import runpy
import sys
from pathlib import Path

import quantize.algorithms.awq as awq

variant = os.environ.get("VARIANT", "")
if "noweight" in variant:
    awq.awq_scan.__kwdefaults__ = {**awq.awq_scan.__kwdefaults__, "weight_powers": (0.0,)}
if "onesided" in variant:
    awq._pairs_for = lambda fmt, qt: False
script = Path(__file__).resolve().parents[1] / "benchmarks" / "methods_real_models.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
