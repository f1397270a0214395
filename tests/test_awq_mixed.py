"""AWQ scales (quantize.algorithms.awq) and the mixed-precision planner (.mixed), by property."""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantize import quantize_tensor
from quantize.algorithms import mixed
from quantize.algorithms.awq import awq_apply, awq_scan, awq_search
from quantize.algorithms.gptq import gptq_quantize, hessian_from_activations
from quantize.algorithms.mixed import LayerChoice, output_error, plan_cost, plan_mixed

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def awq_objective(w, x, s, fmt, bs) -> float:
    """||x W - (x / s) @ dq(Q(s W))||^2 computed the plain way, in float64."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    deq = quantize_tensor(awq_apply(w, s), fmt, bs, axis=0).dequantize(np.float64)
    return float(np.sum(np.square(x64 @ w64 - (x64 / s.astype(np.float64)) @ deq)))


def outlier_activations(rng, s, k, n_out=6, factor=50.0):
    x = rng.standard_normal((s, k)).astype(np.float32)
    x[:, rng.choice(k, n_out, replace=False)] *= factor
    return x


# --------------------------------------------------------------------------- AWQ


@SETTINGS
@given(
    k=st.integers(1, 40),
    n=st.integers(1, 6),
    s=st.integers(1, 30),
    fmt=st.sampled_from(["int4", "uint4", "nf4", "fp4_e2m1", "mxfp4", "nvfp4"]),
    bs=st.sampled_from([8, 16, None]),
    heavy=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_awq_never_worse_than_rtn(k, n, s, fmt, bs, heavy, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (k, n)) if heavy else rng.standard_normal((k, n))).astype(np.float32)
    x = rng.standard_normal((s, k)) * (np.abs(rng.standard_t(1, k)) if heavy else 1.0)
    scales = awq_search(w, x, fmt, bs, grid=5)
    assert scales.shape == (k,) and scales.dtype == np.float32 and (scales > 0).all()
    rtn = awq_objective(w, x, np.ones(k, np.float32), fmt, bs)
    got = awq_objective(w, x, scales, fmt, bs)
    assert got <= rtn * (1 + 1e-9) + 1e-300


@pytest.mark.parametrize(
    ("fmt", "bs"), [("int4", 128), ("int4", 32), ("uint4", 128), ("nf4", 64), ("nvfp4", 16)]
)
def test_awq_gains_on_outlier_channels(fmt, bs):
    """A few input channels 50x larger (as in LLM activations): AWQ cuts the output error."""
    rng = np.random.default_rng(0)
    k, n = 256, 128
    w = (0.02 * rng.standard_normal((k, n))).astype(np.float32)
    x = outlier_activations(rng, 512, k)
    res = awq_scan(w, x, fmt, bs)
    assert res.alpha > 0
    assert res.loss < 0.5 * res.rtn_loss  # measured 0.12-0.25 of rtn's
    assert awq_objective(w, x, res.scales, fmt, bs) == pytest.approx(res.loss, rel=1e-6)


def test_alpha_zero_is_rtn():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    x = rng.standard_normal((32, 64))
    res = awq_scan(w, x, "int4", 32, grid=1)
    assert list(res.alphas) == [0.0, 1.0]
    assert res.losses[0] == pytest.approx(awq_objective(w, x, np.ones(64, np.float32), "int4", 32))
    zero = awq_scan(w, np.zeros((4, 64)), "int4", 32)  # no signal: s = 1
    assert np.array_equal(zero.scales, np.ones(64, np.float32)) and zero.alpha == 0.0


@SETTINGS
@given(
    k=st.integers(1, 30),
    n=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_folded_scales_leave_the_float_model_unchanged(k, n, seed, dtype):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(dtype)
    x = outlier_activations(rng, 9, k, n_out=min(k, 2))
    s = awq_search(w, x, "int4", 16, grid=4)
    x64 = x.astype(np.float64)
    folded = (x64 * (1.0 / s.astype(np.float64))) @ awq_apply(w, s).astype(np.float64)
    np.testing.assert_allclose(folded, x64 @ w.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_awq_accepts_batched_activations_and_subsamples():
    rng = np.random.default_rng(2)
    w = (0.02 * rng.standard_normal((32, 16))).astype(np.float32)
    x = outlier_activations(rng, 120, 32).reshape(4, 30, 32)
    s_all = awq_search(w, x, "int4", 16)
    s_sub = awq_search(w, x, "int4", 16, max_rows=50)
    assert s_all.shape == s_sub.shape == (32,)
    assert np.array_equal(s_sub, awq_search(w, x, "int4", 16, max_rows=50))  # deterministic


def test_awq_then_gptq_compose():
    """The ONNX side may do both: GPTQ on the AWQ-scaled weight with the scaled Hessian."""
    rng = np.random.default_rng(3)
    k, n = 128, 32
    w = (0.02 * rng.standard_normal((k, n))).astype(np.float32)
    x = outlier_activations(rng, 256, k)
    s = awq_search(w, x, "int4", 32)
    xs = x / s
    qt = gptq_quantize(awq_apply(w, s), hessian_from_activations(xs), "int4", 32)
    x64 = x.astype(np.float64)
    ref = x64 @ w.astype(np.float64)
    both = np.sum(np.square(ref - xs.astype(np.float64) @ qt.dequantize(np.float64)))
    assert both <= awq_objective(w, x, s, "int4", 32) * (1 + 1e-9)


@pytest.mark.parametrize(
    ("call", "exc", "name"),
    [
        (lambda w, x: awq_search(w, x[:, :5]), ValueError, "x"),
        (lambda w, x: awq_search(w, np.full_like(x, np.nan)), ValueError, "x"),
        (lambda w, x: awq_search(w, x, grid=0), ValueError, "grid"),
        (lambda w, x: awq_search(w, x, max_rows=0), ValueError, "max_rows"),
        (lambda w, x: awq_search(w, x, format="int3"), ValueError, "format"),
        (lambda w, x: awq_search(w, x, method="nope"), ValueError, "method"),
        (lambda w, x: awq_search(w[:, 0], x), ValueError, "weight"),
        (lambda w, x: awq_apply(w, -np.ones(8)), ValueError, "s"),
        (lambda w, x: awq_apply(w, np.ones(7)), ValueError, "s"),
    ],
)
def test_awq_bad_input_names_the_argument(call, exc, name):
    w, x = np.ones((8, 3), np.float32), np.ones((4, 8))
    with pytest.raises(exc, match=name):
        call(w, x)


# --------------------------------------------------------------------------- mixed precision


@st.composite
def layer_sets(draw):
    n_layers = draw(st.integers(1, 6))
    layers = []
    for i in range(n_layers):
        n_opts = draw(st.integers(1, 4))
        bits = draw(
            st.lists(
                st.sampled_from([4.0, 4.25, 4.5, 5.0, 8.25, 16.0]),
                min_size=n_opts,
                max_size=n_opts,
                unique=True,
            )
        )
        errs = draw(st.lists(st.floats(0, 1), min_size=n_opts, max_size=n_opts))
        opts = [(f"o{j}", b, e) for j, (b, e) in enumerate(zip(bits, errs, strict=True))]
        layers.append(LayerChoice(f"l{i}", draw(st.integers(1, 10_000)), opts))
    return layers


def brute_force(layers, target):
    total = sum(la.n_weights for la in layers)
    best = None
    for combo in itertools.product(*[la.options for la in layers]):
        bits = sum(o[1] * la.n_weights for o, la in zip(combo, layers, strict=True))
        if bits <= target * total * (1 + 1e-12):
            err = sum(o[2] * la.n_weights for o, la in zip(combo, layers, strict=True))
            best = err if best is None else min(best, err)
    return best


@SETTINGS
@given(
    layers=layer_sets(),
    targets=st.lists(st.floats(4.0, 17.0), min_size=2, max_size=6),
    exact=st.booleans(),
)
def test_plan_respects_budget_and_is_monotone(layers, targets, exact):
    """Both solvers: the exact programme (optimal) and the greedy one (forced here)."""
    with mock.patch.object(mixed, "_DP_CELLS", mixed._DP_CELLS if exact else 0):
        check_plans(layers, targets, exact)


def check_plans(layers, targets, exact):
    cheapest = sum(min(o[1] for o in la.options) * la.n_weights for la in layers)
    cheapest /= sum(la.n_weights for la in layers)
    prev = None
    for t in sorted(targets):
        if t < cheapest - 1e-9:
            with pytest.raises(ValueError, match="target_bits"):
                plan_mixed(layers, t)
            continue
        plan = plan_mixed(layers, t)
        assert set(plan) == {la.name for la in layers}
        bpw, err = plan_cost(layers, plan)
        assert bpw <= t * (1 + 1e-9)
        opt = brute_force(layers, t)
        assert err >= opt - 1e-9 * max(1.0, opt)  # sanity: never below the true optimum
        if exact:
            assert err <= opt + 1e-9 * max(1.0, opt)
        if prev is not None:
            assert err <= prev + 1e-9 * max(1.0, prev)
        prev = err


def test_plan_upgrades_the_most_sensitive_layers_first():
    layers = [
        LayerChoice("attn", 1000, [("int4/128", 4.25, 0.02), ("int8/128", 8.25, 1e-4)]),
        LayerChoice("mlp", 1000, [("int4/128", 4.25, 0.002), ("int8/128", 8.25, 1e-5)]),
        LayerChoice("head", 2000, [("int4/32", 4.5, 0.01), ("int4/128", 4.25, 0.05)]),
    ]
    assert plan_mixed(layers, 4.25) == {"attn": "int4/128", "mlp": "int4/128", "head": "int4/128"}
    assert plan_mixed(layers, 4.5)["head"] == "int4/32"  # cheapest gain per bit first
    plan = plan_mixed(layers, 5.5)
    assert plan["attn"] == "int8/128" and plan["mlp"] == "int4/128"
    assert set(plan_mixed(layers, 100).values()) == {"int8/128", "int4/32"}


@pytest.mark.parametrize("exact", [True, False])
def test_plan_near_optimal_on_random_sets(exact):
    rng = np.random.default_rng(4)
    gaps = []
    for _ in range(40):
        layers = [
            LayerChoice(
                f"l{i}",
                int(rng.integers(100, 10_000)),
                [
                    ("int4/128", 4.25, float(e)),
                    ("int4/32", 4.5, float(e) * 0.7),
                    ("int8/128", 8.25, float(e) * 1e-3),
                ],
            )
            for i, e in enumerate(rng.lognormal(-5, 1, 6))
        ]
        target = float(rng.uniform(4.25, 6.0))
        with mock.patch.object(mixed, "_DP_CELLS", mixed._DP_CELLS if exact else 0):
            _, err = plan_cost(layers, plan_mixed(layers, target))
        gaps.append(err / brute_force(layers, target))
    if exact:
        assert max(gaps) < 1 + 1e-9
    else:  # greedy: measured median 1.0, 90th percentile 1.17 over 200 such sets
        assert np.median(gaps) < 1.05 and max(gaps) < 2.0


def test_exact_plan_for_model_like_layer_sizes():
    """Layer sizes sharing large factors (4096 x 4096, 4096 x 11008) take the exact path."""
    rng = np.random.default_rng(6)
    sizes = [4096 * 4096, 4096 * 11008, 4096 * 1024, 11008 * 4096] * 2
    opts = [("int4/128", 4.25, 1.0), ("int4/32", 4.5, 0.6), ("int8/128", 8.25, 0.001)]
    layers = [
        LayerChoice(f"l{i}", n, [(lab, b, e * float(rng.lognormal())) for lab, b, e in opts])
        for i, n in enumerate(sizes)
    ]
    total = sum(sizes)
    for t in (4.25, 4.4, 4.5, 5.0, 6.0):
        assert mixed._plan_exact(layers, t, total) is not None
        _, err = plan_cost(layers, plan_mixed(layers, t))
        assert err == pytest.approx(brute_force(layers, t), rel=1e-12)


@pytest.mark.parametrize(
    ("layers", "target", "exc", "name"),
    [
        ([LayerChoice("a", 10, [("x", 4.25, 0.1)])], 4.0, ValueError, "target_bits"),
        ([LayerChoice("a", 10, [("x", 4.25, 0.1)])], float("nan"), ValueError, "target_bits"),
        ([LayerChoice("a", 10, [("x", 4.25, 0.1)])], 0, ValueError, "target_bits"),
        ([], 4.5, ValueError, "layers"),
        ([LayerChoice("a", 10, [])], 4.5, ValueError, "options"),
        ([LayerChoice("a", 0, [("x", 4, 0.1)])], 4.5, ValueError, "n_weights"),
        ([LayerChoice("a", 10, [("x", 4, -1)])], 4.5, ValueError, "error"),
        ([LayerChoice("a", 10, [("x", 4, 0.1)])] * 2, 4.5, ValueError, "two layers"),
    ],
)
def test_plan_bad_input(layers, target, exc, name):
    with pytest.raises(exc, match=name):
        plan_mixed(layers, target)


def test_output_error_from_x_and_from_hessian_agree():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((48, 12)).astype(np.float32)
    x = rng.standard_normal((100, 48))
    qt = quantize_tensor(w, "int4", 16, axis=0)
    e_x = output_error(w, qt, x)
    e_h = output_error(w, qt, hessian_from_activations(x))
    direct = np.sum(np.square(x @ w - x @ qt.dequantize(np.float64))) / np.sum(np.square(x @ w))
    assert e_x == pytest.approx(direct, rel=1e-9) and e_h == pytest.approx(direct, rel=1e-9)
    assert output_error(w, w, x) == 0.0
    assert output_error(w, qt.dequantize(), x) == pytest.approx(e_x)
    # a square, symmetric x is taken as H unless told otherwise
    xs = rng.standard_normal((48, 48))
    xs = xs + xs.T
    assert output_error(w, qt, xs, is_hessian=False) == pytest.approx(
        np.sum(np.square(xs @ (w - qt.dequantize(np.float64)))) / np.sum(np.square(xs @ w))
    )
    with pytest.raises(ValueError, match="x_or_hessian"):
        output_error(w, qt, x[:, :5])
