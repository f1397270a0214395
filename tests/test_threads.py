"""quantize_tensor from several Python threads at once gives exactly the serial results."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from quantize import kernels, quantize_tensor


@pytest.mark.parametrize("fmt", ["int4", "uint4", "nf4", "nvfp4", "mxfp4"])
def test_concurrent_calls_equal_serial_calls(fmt):
    rng = np.random.default_rng(11)
    # some arrays big enough for the kernels, some small enough for the NumPy path
    arrays = [
        rng.standard_normal((512, 600)).astype(np.float32),
        rng.standard_normal((40, 33)).astype(np.float16),
        (rng.standard_t(3, size=(700, 512)) * 3).astype(np.float32),
        rng.standard_normal((5, 7, 9)),
    ]
    assert arrays[0].size >= kernels.MIN_KERNEL_ELEMENTS
    serial = [quantize_tensor(a, fmt, 32) for a in arrays]
    serial_out = [q.dequantize() for q in serial]

    def job(i):
        q = quantize_tensor(arrays[i % len(arrays)], fmt, 32)
        return i % len(arrays), q, q.dequantize()

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(job, range(16)))
    for i, q, out in results:
        assert q.data.tobytes() == serial[i].data.tobytes()
        assert q.scales.tobytes() == serial[i].scales.tobytes()
        assert out.tobytes() == serial_out[i].tobytes()
