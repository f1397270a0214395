"""Calibrated safetensors quantization: --calib, --method gptq, --target-bits (issue 6)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import quantize
from quantize.cli import main
from quantize.io.safetensors import quantize_safetensors

K, N = 128, 48  # in, out


def _weights(seed=3, n=3):
    rng = np.random.default_rng(seed)
    w = {
        f"layers.{i}.mlp.weight": (rng.standard_t(4, (N, K)) * 0.02).astype(np.float32)
        for i in range(n)
    }
    w["layers.0.norm.weight"] = np.ones(K, np.float32)
    return w


def _checkpoint(path, **kw):
    save_file(_weights(**kw), str(path))
    return path


def _inputs(seed=5, rows=1024):
    """Strongly correlated activations (rank-8 plus noise), as real layers' inputs are."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, 8))
    return (z @ rng.standard_normal((8, K)) + 0.05 * rng.standard_normal((rows, K))).astype(
        np.float32
    )


def _rows(rows):
    return {r["name"]: r for r in rows if r["quantized"]}


def _same_tensors(a, b):
    la, lb = quantize.load(a), quantize.load(b)
    assert la.keys() == lb.keys()
    for name, qa in la.items():
        qb = lb[name]
        if isinstance(qa, np.ndarray):
            assert np.array_equal(qa, qb)
            continue
        assert (qa.format, qa.block_size, qa.axis, qa.shape) == (
            qb.format,
            qb.block_size,
            qb.axis,
            qb.shape,
        )
        assert np.array_equal(qa.data, qb.data) and np.array_equal(qa.scales, qb.scales)
        assert (qa.zero_points is None) == (qb.zero_points is None)
        if qa.zero_points is not None:
            assert np.array_equal(qa.zero_points, qb.zero_points)


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
def test_gptq_with_diagonal_hessian_is_round_to_nearest(tmp_path, fmt):
    # a diagonal H pushes no error anywhere: GPTQ's codes are round to nearest's, with the
    # group parameters of its mse search (so: --method mse's output, byte for byte)
    src = _checkpoint(tmp_path / "m.safetensors")
    d = np.random.default_rng(1).uniform(0.5, 2.0, K)
    calib = {f"layers.{i}.mlp.weight.hessian": np.diag(d) for i in range(3)}
    a, b = tmp_path / "gptq.safetensors", tmp_path / "mse.safetensors"
    rows = quantize_safetensors(src, a, format=fmt, block_size=32, method="gptq", calib=calib)
    quantize_safetensors(src, b, format=fmt, block_size=32, method="mse")
    _same_tensors(a, b)
    assert all(r["method"] == "gptq" for r in _rows(rows).values())


def test_gptq_lowers_the_output_error_and_inputs_equal_their_hessian(tmp_path):
    src = _checkpoint(tmp_path / "m.safetensors")
    x = _inputs()
    x64 = x.astype(np.float64)
    np.savez(
        tmp_path / "h.npz",
        **{
            "layers.0.mlp.weight.inputs": x,
            "layers.1.mlp.weight.hessian": x64.T @ x64,
        },
    )
    np.savez(
        tmp_path / "x.npz",
        **{
            "layers.0.mlp.weight.hessian": x64.T @ x64,
            "layers.1.mlp.weight.inputs": x,
        },
    )
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    kw = dict(format="int4", block_size=32, method="gptq")
    rows = _rows(quantize_safetensors(src, a, calib=tmp_path / "h.npz", **kw))
    quantize_safetensors(src, b, calib=str(tmp_path / "x.npz"), **kw)
    _same_tensors(a, b)  # samples and their X^T X give the same result
    for name in ("layers.0.mlp.weight", "layers.1.mlp.weight"):
        r = rows[name]
        assert r["method"] == "gptq" and r["note"] is None
        assert r["output_error"] < 0.5 * r["output_error_rtn"], r
        # the row's figure is the real output error on the calibration inputs
        w = quantize.load(src)[name].astype(np.float64)
        wq = quantize.load(a)[name].dequantize(np.float64)
        want = np.sum(np.square(x64 @ (w - wq).T)) / np.sum(np.square(x64 @ w.T))
        assert r["output_error"] == pytest.approx(want, rel=1e-6)
    r = rows["layers.2.mlp.weight"]  # no data for it: round to nearest, said so
    assert r["method"] == "rtn" and "no calibration data" in r["note"]
    assert "output_error" not in r


def test_calib_with_a_data_free_method_reports_output_errors(tmp_path):
    src = _checkpoint(tmp_path / "m.safetensors")
    calib = {"layers.1.mlp.weight.inputs": _inputs()}
    rows = _rows(quantize_safetensors(src, tmp_path / "o.safetensors", calib=calib))
    r = rows["layers.1.mlp.weight"]
    assert r["method"] == "rtn" and r["output_error"] == r["output_error_rtn"] > 0


def _bad(tmp_path, arrays, match, **kw):
    src = _checkpoint(tmp_path / "m.safetensors")
    path = tmp_path / "c.npz"
    np.savez(path, **arrays)
    out = tmp_path / "o.safetensors"
    with pytest.raises(ValueError, match=match) as info:
        quantize_safetensors(src, out, method="gptq", calib=path, **kw)
    assert str(path) in str(info.value)
    assert not out.exists()


H = np.eye(K)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"layers.9.mlp.weight.hessian": H}, r"'layers\.9\.mlp\.weight\.hessian'.*no tensor"),
        ({"layers.0.mlp.weight.h": H}, r"'layers\.0\.mlp\.weight\.h' is neither"),
        ({"layers.0.mlp.weight.hessian": np.eye(K - 1)}, r"\.hessian'.*shape \(128, 128\)"),
        ({"layers.0.mlp.weight.inputs": np.ones((4, K + 1))}, r"\.inputs'.*\(rows > 0, 128\)"),
        ({"layers.0.mlp.weight.inputs": np.ones((0, K))}, r"\.inputs'.*\(rows > 0, 128\)"),
        ({"layers.0.mlp.weight.hessian": np.full((K, K), np.nan)}, r"\.hessian'.*NaN"),
        ({"layers.0.mlp.weight.inputs": np.full((3, K), np.inf)}, r"\.inputs'.*NaN or Inf"),
        ({"layers.0.mlp.weight.hessian": np.triu(np.ones((K, K)))}, r"\.hessian'.*symmetric"),
        ({"layers.0.mlp.weight.hessian": -np.eye(K)}, r"\.hessian'.*negative diagonal"),
        ({"layers.0.mlp.weight.hessian": np.eye(K, dtype=np.int64)}, r"floating point"),
        ({"layers.0.norm.weight.hessian": np.eye(1)}, r"norm\.weight\.hessian'.*2-d weights"),
        (
            {"layers.0.mlp.weight.hessian": H, "layers.0.mlp.weight.inputs": np.ones((2, K))},
            r"give one",
        ),
        ({"layers.0.mlp.weight.hessian": np.array([None, 1], object)}, r"pickle"),
    ],
)
def test_bad_calib_files_name_the_file_and_the_key(tmp_path, arrays, match):
    _bad(tmp_path, arrays, match)


def test_calib_file_that_is_not_an_npz(tmp_path):
    src = _checkpoint(tmp_path / "m.safetensors")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"c\.npz: not a readable \.npz"):
        quantize_safetensors(
            src, tmp_path / "o.safetensors", method="gptq", calib=tmp_path / "c.npz"
        )
    with pytest.raises(ValueError, match=r"nope\.npz: no such file"):
        quantize_safetensors(
            src, tmp_path / "o.safetensors", method="gptq", calib=tmp_path / "nope.npz"
        )


def test_refusals(tmp_path):
    src = _checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "o.safetensors"
    with pytest.raises(
        ValueError, match=r"awq needs the preceding operator.*use gptq, or the onnx"
    ):
        quantize_safetensors(src, out, method="awq", calib={})
    with pytest.raises(ValueError, match="'gptq' needs calib"):
        quantize_safetensors(src, out, method="gptq")
    with pytest.raises(ValueError, match="target_bits needs layout 'quantize'"):
        quantize_safetensors(src, out, target_bits=5, layout="compressed-tensors")
    with pytest.raises(ValueError, match="target_bits must be a finite number > 0"):
        quantize_safetensors(src, out, target_bits=float("nan"))
    with pytest.raises(ValueError, match=r"target_bits=4 is below the cheapest plan"):
        quantize_safetensors(src, out, target_bits=4)
    with pytest.raises(TypeError, match="calib must be"):
        quantize_safetensors(src, out, calib=3)
    assert not out.exists()


def _stored_bits(path, names):
    """Bits per weight of the quantized weights, counted from the written file's tensors."""
    from quantize.io._stfile import SafetensorsFile

    total = 0
    with SafetensorsFile(path) as f:
        for t, info in f.tensors.items():
            if t.endswith((".qdata", ".scales", ".zero_points")):
                total += info.nbytes
    n = sum(int(np.prod(s)) for s in names.values())
    return 8 * total / n


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_target_bits_is_respected_on_the_written_file_and_monotone(tmp_path, method):
    w = _weights(n=4)
    w["layers.3.mlp.weight"] = w["layers.3.mlp.weight"][:, :96].copy()  # another size
    save_file(w, str(tmp_path / "m.safetensors"))
    x = _inputs()
    calib = {f"layers.{i}.mlp.weight.inputs": x for i in range(3)}
    calib["layers.3.mlp.weight.inputs"] = x[:, :96]
    shapes = {k: v.shape for k, v in w.items() if "mlp" in k}
    errors, seen = [], set()
    for target in (4.6, 5.0, 5.6, 6.5, 8.0, 9.0):
        out = tmp_path / f"o{target}.safetensors"
        rows = _rows(
            quantize_safetensors(
                tmp_path / "m.safetensors",
                out,
                format="int4",
                block_size=64,
                method=method,
                calib=calib,
                target_bits=target,
            )
        )
        assert _stored_bits(out, shapes) <= target + 1e-9
        assert rows.keys() == shapes.keys()
        errors.append(sum(r["output_error"] * np.prod(r["shape"]) for r in rows.values()))
        seen.update(r["choice"] for r in rows.values())
        for r in rows.values():  # the row's choice is what was written
            fmt, bs = r["choice"].split("/b")
            assert (r["format"], r["block_size"]) == (fmt, int(bs))
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < errors[0]
    assert seen == {"int4/b64", "int4/b32", "int8/b64"}


def test_jobs_give_the_same_output(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    w = _weights(n=4)
    names = sorted(w)
    save_file({k: w[k] for k in names[:2]}, str(folder / "a.safetensors"))
    save_file({k: w[k] for k in names[2:]}, str(folder / "b.safetensors"))
    calib = tmp_path / "c.npz"
    np.savez(calib, **{f"layers.{i}.mlp.weight.inputs": _inputs(i) for i in (0, 2, 3)})
    kw = dict(format="uint4", block_size=32, method="gptq", calib=calib, target_bits=5.5)
    r1 = quantize_safetensors(folder, tmp_path / "o1", jobs=1, **kw)
    r2 = quantize_safetensors(folder, tmp_path / "o2", jobs=2, **kw)
    for name in ("a.safetensors", "b.safetensors"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(r1) == strip(r2)
    assert sum("output_error" in r for r in r1) == 3


def test_cli(tmp_path, capsys):
    src = _checkpoint(tmp_path / "m.safetensors")
    calib = tmp_path / "c.npz"
    np.savez(calib, **{"layers.0.mlp.weight.inputs": _inputs()})
    out = tmp_path / "o.safetensors"
    argv = ["safetensors", str(src), "-o", str(out), "--quiet", "--block-size", "64"]
    assert main([*argv, "--method", "gptq", "--calib", str(calib), "--target-bits", "6"]) == 0
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["settings"]["calib"] == str(calib)
    assert report["settings"]["target_bits"] == 6
    rows = _rows(report["tensors"])
    r = rows["layers.0.mlp.weight"]
    assert r["output_error"] < r["output_error_rtn"] and r["method"] == "gptq"
    assert all("choice" in r for r in rows.values())
    capsys.readouterr()
    assert main([*argv, "--force", "--method", "awq"]) == 1
    assert "use gptq, or the onnx command" in capsys.readouterr().err
    assert main([*argv, "--force", "--method", "gptq"]) == 1
    assert "needs calib" in capsys.readouterr().err
    np.savez(calib, **{"layers.7.mlp.weight.hessian": np.eye(K)})
    assert main([*argv, "--force", "--method", "gptq", "--calib", str(calib)]) == 1
    err = capsys.readouterr().err
    assert str(calib) in err and "layers.7.mlp.weight.hessian" in err
