"""The report's error histogram and `--plot` (per-tensor SQNR + the worst tensor's histogram)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from quantize import quantize_tensor
from quantize.cli import main
from quantize.plot import PlotError, plot_report
from quantize.report import HIST_BINS, build_report, error_stats, tensor_report, write_reports


def _rows(n=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w = (rng.standard_t(3, size=(64, 96)) * (i + 1)).astype(np.float32)
        rows.append(tensor_report(f"layer{i}.weight", w, quantize_tensor(w, "int4", 32)))
    return rows


def test_error_hist_counts_every_element_in_equal_bins():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((50, 70)).astype(np.float32)
    r = quantize_tensor(w, "int4", 32).dequantize()
    h = error_stats(w, r)["error_hist"]
    err = r.astype(np.float64) - w
    assert len(h["counts"]) == HIST_BINS and sum(h["counts"]) == w.size
    assert h["max_abs_err"] == np.abs(err).max()
    # the outermost bins hold the largest errors, so neither end is empty
    assert h["counts"][0] + h["counts"][-1] >= 1
    mid = np.abs(err) < h["max_abs_err"] / HIST_BINS
    assert h["counts"][HIST_BINS // 2 - 1] + h["counts"][HIST_BINS // 2] >= mid.sum()


def test_error_hist_of_an_exact_tensor_is_all_in_the_middle():
    w = np.zeros((8, 8), np.float32)
    h = error_stats(w, w)["error_hist"]
    assert h["max_abs_err"] == 0 and h["counts"][HIST_BINS // 2] == 64 and sum(h["counts"]) == 64


@pytest.mark.parametrize("suffix", ["png", "svg", "pdf"])
def test_plot_report_writes_the_image(tmp_path, suffix):
    out = plot_report(build_report(_rows()), tmp_path / f"r.{suffix}")
    data = out.read_bytes()
    magic = {"png": b"\x89PNG", "svg": b"<?xml", "pdf": b"%PDF"}[suffix]
    assert data.startswith(magic) and len(data) > 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"r.{suffix}"]  # no temp left


def test_plot_refuses_bad_requests(tmp_path, monkeypatch):
    with pytest.raises(PlotError, match=r"\.png"):
        plot_report(build_report(_rows()), tmp_path / "r.jpeg2")
    with pytest.raises(PlotError, match="no quantized tensors"):
        plot_report(build_report([]), tmp_path / "r.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(PlotError, match=r"quantize\[plot\]"):
        plot_report(build_report(_rows()), tmp_path / "r.png")
    assert list(tmp_path.iterdir()) == []


def test_report_command_plots(tmp_path, capsys):
    json_path, _ = write_reports(_rows(), tmp_path / "m.report")
    assert main(["report", str(json_path), "--plot", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG")
    assert "layer0.weight" in capsys.readouterr().out
    assert main(["report", str(json_path), "--plot", str(tmp_path / "m.gif")]) == 1
    assert "--plot" in capsys.readouterr().err
    assert not (tmp_path / "m.gif").exists()
