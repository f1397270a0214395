"""GPTQ (quantize.algorithms.gptq): never worse than round-to-nearest on tr(D^T H D), equal to it
when H is diagonal, the standard axis-0 layout, and every bad argument named.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantize import available_formats, quantize_tensor
from quantize.algorithms import available_methods
from quantize.algorithms.gptq import gptq_quantize, hessian_from_activations, output_error_trace

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMATS = [f for f in available_formats() if f != "uint8"]  # uint8 behaves as int8 here
MAIN_FORMATS = ["int4", "uint4", "nf4", "fp4_e2m1", "mxfp4", "nvfp4", "int4_affine"]


def same_tensor(a, b) -> bool:
    """Byte-identical: codes, scales, zero points, tensor scale, layout."""
    return (
        a.format == b.format
        and a.block_size == b.block_size
        and a.axis == b.axis
        and a.shape == b.shape
        and a.dtype == b.dtype
        and np.array_equal(a.data, b.data)
        and a.scales.dtype == b.scales.dtype
        and np.array_equal(a.scales, b.scales)
        and (a.zero_points is None) == (b.zero_points is None)
        and (a.zero_points is None or np.array_equal(a.zero_points, b.zero_points))
        and (a.tensor_scale is None) == (b.tensor_scale is None)
        and (a.tensor_scale is None or a.tensor_scale == b.tensor_scale)
    )


def correlated_x(rng, s: int, k: int, rank: int = 16, noise: float = 0.5) -> np.ndarray:
    """Activations like a transformer's: a few shared directions, uneven channel scales, noise."""
    base = rng.standard_normal((s, rank)) @ rng.standard_normal((rank, k))
    x = base + noise * rng.standard_normal((s, k))
    return x * np.exp(0.5 * rng.standard_normal(k))


def weight(rng, k: int, n: int, heavy: bool) -> np.ndarray:
    w = rng.standard_t(3, (k, n)) if heavy else rng.standard_normal((k, n))
    return (0.02 * w).astype(np.float32)


def err(w, qt, h) -> float:
    return output_error_trace(w.astype(np.float64) - qt.dequantize(np.float64), h)


# --------------------------------------------------------------------------- equal to rtn


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block_size", [32, 64, None])
def test_identity_hessian_is_rtn_byte_for_byte(fmt, block_size):
    rng = np.random.default_rng(1)
    w = weight(rng, 200, 12, heavy=True)  # 200 rows: a padded last block at 32 and 64
    rtn = quantize_tensor(w, fmt, block_size, axis=0)
    for act_order in (False, True):
        qt = gptq_quantize(w, np.eye(200), fmt, block_size, act_order=act_order, fallback_rtn=False)
        assert same_tensor(qt, rtn), (fmt, block_size, act_order)


@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_diagonal_hessian_is_rtn_for_every_method_and_dtype(method, dtype):
    """A diagonal H has a diagonal inverse: no error is passed on, whatever its entries."""
    rng = np.random.default_rng(2)
    w = weight(rng, 96, 10, heavy=True).astype(dtype)
    h = np.diag(rng.uniform(0.1, 10, 96))
    for fmt, bs in [("int4", 32), ("uint4", None), ("nvfp4", 16)]:
        rtn = quantize_tensor(w, fmt, bs, axis=0, method=method)
        for act_order in (False, True):
            qt = gptq_quantize(
                w, h, fmt, bs, method=method, act_order=act_order, damp=0.1, fallback_rtn=False
            )
            if method == "hqq" and not act_order:
                # hqq's float sums depend on the blocks' memory layout (a group's blocks are
                # not laid out as the whole tensor's): a rare block picks another iterate
                assert np.mean(qt.codes() == rtn.codes()) > 0.99
            else:
                assert same_tensor(qt, rtn), (fmt, bs, act_order)


@SETTINGS
@given(
    k=st.integers(1, 70),
    n=st.integers(1, 6),
    bs=st.sampled_from([1, 3, 16, 32, None]),
    cpp=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    fmt=st.sampled_from(["int4", "uint4", "nf4", "nvfp4", "int4_affine"]),
)
def test_identity_hessian_any_shape_and_pass_size(k, n, bs, cpp, seed, fmt):
    rng = np.random.default_rng(seed)
    w = weight(rng, k, n, heavy=True)
    qt = gptq_quantize(w, np.eye(k), fmt, bs, columns_per_pass=cpp, fallback_rtn=False)
    assert same_tensor(qt, quantize_tensor(w, fmt, bs, axis=0))


# --------------------------------------------------------------------------- better than rtn


@pytest.mark.parametrize("fmt", MAIN_FORMATS)
@pytest.mark.parametrize("heavy", [False, True])
def test_gptq_beats_rtn_on_correlated_activations(fmt, heavy):
    rng = np.random.default_rng(3)
    k, n = 256, 64
    x = correlated_x(rng, 512, k)
    h = hessian_from_activations(x)
    w = weight(rng, k, n, heavy)
    bs = 32 if fmt in ("mxfp4", "nvfp4") else 64
    rtn = err(w, quantize_tensor(w, fmt, bs, axis=0), h)
    for act_order in (False, True):
        qt = gptq_quantize(w, h, fmt, bs, act_order=act_order, fallback_rtn=False)
        # realistic data: GPTQ removes most of the output error (measured 0.05-0.3 of rtn's)
        assert err(w, qt, h) < 0.6 * rtn, (fmt, heavy, act_order)


@SETTINGS
@given(
    k=st.integers(2, 48),
    n=st.integers(1, 8),
    s=st.integers(1, 80),
    bs=st.sampled_from([4, 16, None]),
    heavy=st.booleans(),
    act_order=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    fmt=st.sampled_from(["int4", "uint4", "nf4", "fp4_e2m1", "nvfp4"]),
)
def test_never_worse_than_rtn(k, n, s, bs, heavy, act_order, seed, fmt):
    """With the rtn fallback (the default) the objective is never above rtn's: any data, any S
    (fewer rows than inputs: a singular H, damped)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((s, k)) * (rng.standard_t(2, k) if heavy else 1.0)
    h = hessian_from_activations(x)
    w = weight(rng, k, n, heavy)
    rtn = err(w, quantize_tensor(w, fmt, bs, axis=0), h)
    qt = gptq_quantize(w, h, fmt, bs, act_order=act_order)
    assert err(w, qt, h) <= rtn


def test_strictly_better_on_average_without_fallback():
    rng = np.random.default_rng(4)
    ratios = []
    for _ in range(20):
        k, n = 64, 16
        h = hessian_from_activations(correlated_x(rng, 200, k, rank=8, noise=1.0))
        w = weight(rng, k, n, heavy=bool(rng.integers(2)))
        rtn = err(w, quantize_tensor(w, "int4", 32, axis=0), h)
        ratios.append(err(w, gptq_quantize(w, h, "int4", 32, fallback_rtn=False), h) / rtn)
    assert np.mean(ratios) < 0.8
    assert np.mean(np.array(ratios) < 1) >= 0.9


def test_act_order_keeps_rtn_scales_and_layout():
    """act_order uses static groups: every group's params are rtn's, computed up front."""
    rng = np.random.default_rng(5)
    k, n = 150, 20
    h = hessian_from_activations(correlated_x(rng, 300, k))
    w = weight(rng, k, n, heavy=True)
    for fmt in ("int4", "uint4", "nvfp4"):
        rtn = quantize_tensor(w, fmt, 32, axis=0)
        qt = gptq_quantize(w, h, fmt, 32, act_order=True, fallback_rtn=False)
        assert np.array_equal(qt.scales, rtn.scales)
        assert qt.zero_points is None or np.array_equal(qt.zero_points, rtn.zero_points)
        assert qt.data.shape == rtn.data.shape and qt.tensor_scale == rtn.tensor_scale
        assert err(w, qt, h) < err(w, rtn, h)


def test_nvfp4_tensor_scale_is_the_original_weights():
    rng = np.random.default_rng(6)
    k, n = 128, 16
    h = hessian_from_activations(correlated_x(rng, 256, k, noise=0.1))
    w = weight(rng, k, n, heavy=True)
    qt = gptq_quantize(w, h, "nvfp4", 16, fallback_rtn=False)
    assert qt.tensor_scale == quantize_tensor(w, "nvfp4", 16, axis=0).tensor_scale


def test_padding_of_the_last_block_is_the_code_of_zero():
    rng = np.random.default_rng(7)
    k, n = 100, 9  # block 32: 28 padding rows in the last block
    h = hessian_from_activations(correlated_x(rng, 200, k))
    w = weight(rng, k, n, heavy=False)
    for fmt in ("int4", "uint4", "nf4"):
        qt = gptq_quantize(w, h, fmt, 32, fallback_rtn=False)
        rtn = quantize_tensor(w, fmt, 32, axis=0)
        assert qt.data.shape == rtn.data.shape
        codes = qt.codes()
        dq_pad = qt.fmt.decode(
            codes[:, -1:, 4:],
            qt.scales[:, -1:],
            None if qt.zero_points is None else qt.zero_points[:, -1:],
        )
        assert np.all(dq_pad == 0)
        assert qt.dequantize().shape == (k, n)


def test_lazy_batch_size_does_not_change_the_answer():
    """Passes only regroup the same updates (float rounding aside): codes match almost all."""
    rng = np.random.default_rng(8)
    k, n = 160, 24
    h = hessian_from_activations(correlated_x(rng, 320, k))
    w = weight(rng, k, n, heavy=True)
    ref = gptq_quantize(w, h, "int4", 32, columns_per_pass=1, fallback_rtn=False)
    for cpp in (7, 32, 100, 1000):
        qt = gptq_quantize(w, h, "int4", 32, columns_per_pass=cpp, fallback_rtn=False)
        assert np.mean(qt.codes() == ref.codes()) > 0.995
        assert err(w, qt, h) == pytest.approx(err(w, ref, h), rel=1e-3)


def test_damping_moves_towards_rtn():
    """A huge damp makes H ~ c I: nothing is passed on, the answer is rtn's."""
    rng = np.random.default_rng(9)
    k, n = 64, 16
    h = hessian_from_activations(correlated_x(rng, 128, k))
    w = weight(rng, k, n, heavy=True)
    rtn = quantize_tensor(w, "int4", 32, axis=0)
    big = gptq_quantize(w, h, "int4", 32, damp=1e9, fallback_rtn=False)
    assert np.mean(big.codes() == rtn.codes()) > 0.999
    small = gptq_quantize(w, h, "int4", 32, damp=0.0, fallback_rtn=False)
    assert err(w, small, h) < err(w, rtn, h)


def test_singular_hessian_needs_damping():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((8, 32))  # 8 rows, 32 inputs: rank 8
    h = hessian_from_activations(x)
    w = weight(rng, 32, 4, heavy=False)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, h, "int4", 16, damp=0.0)
    gptq_quantize(w, h, "int4", 16)  # the default damping makes it positive definite


def test_dead_inputs_keep_their_weights():
    rng = np.random.default_rng(11)
    k, n = 64, 8
    x = correlated_x(rng, 128, k)
    x[:, [3, 40]] = 0  # never fire: H_33 = H_40,40 = 0
    h = hessian_from_activations(x)
    w = weight(rng, k, n, heavy=False)
    for act_order in (False, True):
        qt = gptq_quantize(w, h, "int4", 32, act_order=act_order, fallback_rtn=False)
        deq = qt.dequantize()
        assert np.all(np.isfinite(deq))
        # rounded, not zeroed: within half a step of the (possibly updated) weight's scale
        assert np.abs(deq[[3, 40]]).sum() > 0
        assert err(w, qt, h) < err(w, quantize_tensor(w, "int4", 32, axis=0), h)


def test_float16_and_float64_weights():
    rng = np.random.default_rng(12)
    h = hessian_from_activations(correlated_x(rng, 128, 64))
    for dt in (np.float16, np.float64):
        w = weight(rng, 64, 8, heavy=False).astype(dt)
        qt = gptq_quantize(w, h, "int4", 32)
        assert qt.dtype == dt and qt.dequantize().dtype == dt
        assert qt.scales.dtype == (np.float64 if dt == np.float64 else np.float32)


def test_hessian_from_activations_accumulates():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 5, 7)).astype(np.float32)
    h = hessian_from_activations(x[0])
    hessian_from_activations(x[1], h)
    flat = x.reshape(-1, 7).astype(np.float64)
    np.testing.assert_allclose(h, flat.T @ flat, rtol=1e-12)
    np.testing.assert_allclose(hessian_from_activations(x), flat.T @ flat, rtol=1e-12)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"hessian": np.eye(7)}, ValueError, "hessian"),
        ({"hessian": np.eye(8)[:, :7]}, ValueError, "hessian"),
        ({"hessian": np.triu(np.ones((8, 8)))}, ValueError, "symmetric"),
        ({"hessian": np.where(np.eye(8) > 0, np.nan, 0)}, ValueError, "hessian"),
        ({"hessian": -np.eye(8)}, ValueError, "hessian"),
        ({"hessian": "eye"}, TypeError, "hessian"),
        ({"damp": -0.1}, ValueError, "damp"),
        ({"damp": float("nan")}, ValueError, "damp"),
        ({"damp": "x"}, TypeError, "damp"),
        ({"columns_per_pass": 0}, ValueError, "columns_per_pass"),
        ({"act_order": 1}, TypeError, "act_order"),
        ({"format": "int3"}, ValueError, "format"),
        ({"method": "nope"}, ValueError, "method"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"weight": np.ones(8)}, ValueError, "weight"),
        ({"weight": np.full((8, 2), np.inf)}, ValueError, "weight"),
        ({"clip_ratio": 0.0}, ValueError, "clip_ratio"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, name):
    args = {"weight": np.ones((8, 3), np.float32), "hessian": np.eye(8)}
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        gptq_quantize(**args)
