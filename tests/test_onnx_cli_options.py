"""`quantize onnx` options: --plot, the progress bar, --quiet; the report beside the output."""

from __future__ import annotations

import json

from quantize import progress
from quantize.cli import main
from quantize.commands.demo import build_demo_model, demo_weights


def _model(tmp_path):
    path = tmp_path / "m.onnx"
    build_demo_model(path, demo_weights())
    return path


def test_plot_and_report(tmp_path, capsys):
    src, dst = _model(tmp_path), tmp_path / "q.onnx"
    argv = ["onnx", str(src), "-o", str(dst), "--quiet"]
    assert main([*argv, "--plot", str(tmp_path / "q.tiff")]) == 1  # refused before any work
    assert "--plot" in capsys.readouterr().err and not dst.exists()
    assert main([*argv, "--plot", str(tmp_path / "q.png"), "--no-report"]) == 1
    assert "--no-report" in capsys.readouterr().err and not dst.exists()
    assert main([*argv, "--plot", str(tmp_path / "q.png"), "--method", "mse"]) == 0
    assert (tmp_path / "q.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["settings"]["method"] == "mse"
    assert sorted(r["name"] for r in report["tensors"]) == sorted(demo_weights())


def test_progress_bar(tmp_path, capsys, monkeypatch):
    src = _model(tmp_path)
    monkeypatch.setenv(progress.ENV_SWITCH, "1")
    real_init = progress.ProgressBar.__init__

    def no_delay(self, *a, **k):
        k["delay"] = 0.0
        real_init(self, *a, **k)

    monkeypatch.setattr(progress.ProgressBar, "__init__", no_delay)
    assert main(["onnx", str(src), "-o", str(tmp_path / "a.onnx")]) == 0
    err = capsys.readouterr().err
    assert "4/4 weights" in err and err.endswith("\r")  # drawn, then erased
    assert main(["onnx", str(src), "-o", str(tmp_path / "b.onnx"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
