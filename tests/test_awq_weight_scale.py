"""AWQ's scale family with a weight factor: s = mean|x|^alpha / m_w^beta (awq.py, weight_powers)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _matrices import awq_layers, same_bytes
from quantize import quantize_tensor
from quantize.algorithms.awq import WEIGHT_POWERS, _weight_magnitude, awq_apply, awq_scan

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def objective(w, x, s, fmt, bs) -> float:
    """||x W - (x / s) @ dq(Q(diag(s) W))||^2 the plain way, in float64."""
    qt = quantize_tensor(awq_apply(w, s), fmt, bs, axis=0)
    x64 = x.astype(np.float64)
    deq = qt.dequantize(np.float64)
    return float(np.sum(np.square(x64 @ w.astype(np.float64) - (x64 / s) @ deq)))


def uneven_rows(seed, k=128, n=64, rows=256):
    """Weight rows of very different sizes, inputs of similar sizes: mean|x| alone cannot tell
    which rows to scale."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * np.exp(rng.uniform(-2, 1, k))[:, None]).astype(np.float32)
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.5, 2, k)).astype(np.float32)
    return w, x


@pytest.mark.parametrize(("fmt", "bs"), [("uint4", 32), ("int4", 32), ("uint4", 128), ("nf4", 64)])
def test_weight_factor_lowers_the_objective(fmt, bs):
    w, x = uneven_rows(0)
    plain = awq_scan(w, x, fmt, bs, weight_powers=(0,), clip=False)
    res = awq_scan(w, x, fmt, bs, clip=False)
    assert res.beta > 0
    assert res.loss < 0.7 * plain.loss  # measured 0.40-0.59 of the activation-only search
    assert res.loss == pytest.approx(objective(w, x, res.scales, fmt, bs), rel=1e-6)
    # the chosen scales are the family's member at (alpha, beta)
    xm = np.abs(x.astype(np.float64)).mean(axis=0)
    raw = np.maximum(xm, 1e-4 * xm.max()) ** res.alpha
    mag = _weight_magnitude(w.astype(np.float64), bs)
    raw = raw / np.maximum(mag, 1e-4 * mag.max()) ** res.beta
    want = (raw / np.sqrt(raw.max() * raw.min())).astype(np.float32)
    assert np.allclose(res.scales, want, rtol=1e-6)


def test_grid_bookkeeping():
    w, x = uneven_rows(1, k=64, n=16, rows=64)
    res = awq_scan(w, x, "uint4", 32, grid=4, weight_powers=(1.0, 0.5), clip=False)
    assert list(res.betas) == [0.0, 0.5, 1.0]  # 0 always, sorted
    assert res.grid_losses.shape == (3, 5)
    assert np.array_equal(res.grid_losses[0], res.losses)
    # beta > 0 tries every second alpha (0, 0.5, 1 here); the others are NaN
    assert np.isnan(res.grid_losses[1:, 1::2]).all() and np.isfinite(res.grid_losses[1:, ::2]).all()
    assert res.loss == np.nanmin(res.grid_losses)
    assert res.rtn_loss == pytest.approx(objective(w, x, np.ones(64), "uint4", 32), rel=1e-9)
    only = awq_scan(w, x, "uint4", 32, grid=4, weight_powers=(0,), clip=False)
    assert list(only.betas) == [0.0] and only.beta == 0.0
    assert np.array_equal(only.losses, res.losses)  # the activation-only row is unchanged
    assert 0.0 in WEIGHT_POWERS


@SETTINGS
@given(case=awq_layers(), silent=st.integers(0, 2**32 - 1))
def test_never_worse_than_rtn_or_the_activation_only_search(case, silent):
    w, x, fmt, bs = case
    w[np.random.default_rng(silent).random(w.shape[0]) < 0.2] = 0  # silent rows: m_w = 0, floored
    res = awq_scan(w, x, fmt, bs, grid=4, clip=False)
    only = awq_scan(w, x, fmt, bs, grid=4, weight_powers=(0,), clip=False)
    assert res.loss <= only.loss <= res.rtn_loss
    assert np.isfinite(res.scales).all() and (res.scales > 0).all()
    got = objective(w, x, res.scales, fmt, bs)
    assert got <= res.rtn_loss * (1 + 1e-9) + 1e-9


@SETTINGS
@given(case=awq_layers(), clip=st.booleans())
def test_activation_only_result_equals_its_own_search(case, clip):
    """awq_scan(activation_only=True) also gives what weight_powers=(0,) gives, bit for bit
    (scales, codes, clip ratios, losses), and its main result is unchanged."""
    w, x, fmt, bs = case
    both = awq_scan(w, x, fmt, bs, grid=4, clip=clip, activation_only=True)
    main = awq_scan(w, x, fmt, bs, grid=4, clip=clip)
    only = awq_scan(w, x, fmt, bs, grid=4, clip=clip, weight_powers=(0,))
    got = both.activation_only
    assert main.activation_only is None and got.activation_only is None
    for want, have in ((only, got), (main, both)):
        assert same_bytes(want.scales, have.scales) and (want.alpha, want.beta) == (
            have.alpha,
            have.beta,
        )
        assert same_bytes(want.quantized.data, have.quantized.data)
        assert same_bytes(want.quantized.scales, have.quantized.scales)
        assert np.array_equal(want.grid_losses, have.grid_losses, equal_nan=True)
        assert want.clip_loss == have.clip_loss
        assert (want.clip_ratios is None) == (have.clip_ratios is None)
        if want.clip_ratios is not None:
            assert np.array_equal(want.clip_ratios, have.clip_ratios)


def test_silent_weight_or_inputs_give_s_one():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    res = awq_scan(np.zeros((32, 4), np.float32), x, "uint4", 16)
    assert np.array_equal(res.scales, np.ones(32, np.float32)) and res.beta == 0.0
    w = rng.standard_normal((32, 4)).astype(np.float32)
    res = awq_scan(w, np.zeros((8, 32)), "uint4", 16)
    assert np.array_equal(res.scales, np.ones(32, np.float32)) and res.beta == 0.0


@pytest.mark.parametrize(
    ("powers", "exc", "match"),
    [
        ((-0.5,), ValueError, ">= 0"),
        ((np.nan,), ValueError, "weight_powers"),
        ([[0.5]], ValueError, "1-D"),
        ("abc", TypeError, "weight_powers"),
    ],
)
def test_weight_powers_are_checked(powers, exc, match):
    w, x = uneven_rows(3, k=32, n=4, rows=8)
    with pytest.raises(exc, match=match):
        awq_scan(w, x, "uint4", 32, weight_powers=powers)


@pytest.mark.parametrize("rows", [32, 256])  # fewer rows than inputs (||xs D||^2) and more (H)
def test_batched_losses_equal_one_at_a_time(monkeypatch, rows):
    """Candidates scored in one product give bit for bit the losses scored one by one."""
    import quantize.algorithms.awq as awq

    w, x = uneven_rows(2, k=64, n=48, rows=rows)
    batched = awq_scan(w, x, "uint4", 32, grid=6)
    monkeypatch.setattr(awq, "_BATCH_BYTES", 1)  # one candidate per product
    single = awq_scan(w, x, "uint4", 32, grid=6)
    assert np.array_equal(batched.grid_losses, single.grid_losses, equal_nan=True)
    assert np.array_equal(batched.scales, single.scales)
    assert batched.clip_loss == single.clip_loss
