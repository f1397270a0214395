"""`quantize safetensors` options: --method, --nan, --plot and the progress bar."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import save_file

from quantize.cli import main


def _checkpoint(path, nan=False):
    rng = np.random.default_rng(11)
    tensors = {
        f"layers.{i}.mlp.weight": (rng.standard_t(3, size=(64, 256)) * 0.02).astype(np.float32)
        for i in range(3)
    }
    tensors["layers.0.norm.weight"] = np.ones(256, np.float32)
    if nan:
        tensors["layers.1.mlp.weight"][5, 7] = np.nan
    save_file(tensors, path)
    return path


def _sqnr(report_json):
    data = json.loads(report_json.read_text())
    return {r["name"]: float(r["sqnr_db"]) for r in data["tensors"] if r.get("quantized")}


def test_method_mse_is_no_worse_than_rtn_per_tensor(tmp_path):
    src = _checkpoint(tmp_path / "m.safetensors")
    for method in ("rtn", "mse"):
        out = tmp_path / f"{method}.safetensors"
        # int4: mse's objective is plain squared error there, so SQNR can only go up
        argv = ["safetensors", str(src), "-o", str(out), "--format", "int4", "--quiet"]
        assert main([*argv, "--block-size", "32", "--method", method]) == 0
    rtn, mse = _sqnr(tmp_path / "rtn.report.json"), _sqnr(tmp_path / "mse.report.json")
    assert rtn.keys() == mse.keys() and len(rtn) == 3
    assert all(mse[k] >= rtn[k] for k in rtn)
    assert sum(mse.values()) > sum(rtn.values())  # heavy tails: clipping pays somewhere
    settings = json.loads((tmp_path / "mse.report.json").read_text())["settings"]
    assert settings["method"] == "mse"


def test_nan_policy(tmp_path, capsys):
    src = _checkpoint(tmp_path / "m.safetensors", nan=True)
    out = tmp_path / "o.safetensors"
    assert main(["safetensors", str(src), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "layers.1.mlp.weight" in err and "non-finite" in err and not out.exists()
    assert main(["safetensors", str(src), "-o", str(out), "--quiet", "--nan", "zero"]) == 0
    import quantize

    w = quantize.load(out)["layers.1.mlp.weight"].dequantize()
    assert np.isfinite(w).all() and w[5, 7] == 0
    rows = json.loads((tmp_path / "o.report.json").read_text())["tensors"]
    assert [r.get("nonfinite") for r in rows if r["name"] == "layers.1.mlp.weight"] == [1]


def test_plot_and_bad_plot_name(tmp_path, capsys):
    src = _checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "o.safetensors"
    argv = ["safetensors", str(src), "-o", str(out), "--quiet"]
    assert main([*argv, "--plot", str(tmp_path / "o.bmp")]) == 1  # refused before any work
    assert "--plot" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--plot", str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "o.png").read_bytes().startswith(b"\x89PNG")


def test_progress_bar_only_when_wanted(tmp_path, capsys, monkeypatch):
    from quantize import progress

    src = _checkpoint(tmp_path / "m.safetensors")
    monkeypatch.setenv(progress.ENV_SWITCH, "1")
    real_init = progress.ProgressBar.__init__

    def no_delay(self, *a, **k):
        k["delay"] = 0.0
        real_init(self, *a, **k)

    monkeypatch.setattr(progress.ProgressBar, "__init__", no_delay)
    assert main(["safetensors", str(src), "-o", str(tmp_path / "a.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "/4 tensors" in err and "\r" in err and "dB," not in err  # a bar, not log lines
    assert main(["safetensors", str(src), "-o", str(tmp_path / "b.safetensors"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(progress.ENV_SWITCH, "0")
    assert main(["safetensors", str(src), "-o", str(tmp_path / "c.safetensors")]) == 0
    assert "dB," in capsys.readouterr().err  # not a terminal: one line per tensor
