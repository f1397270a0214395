"""`--plot`: per-tensor SQNR and the error histogram of the worst tensor, as one image.

matplotlib is an optional extra (`pip install "quantize[plot]"`); it is imported only here, only
when a plot is asked for, and with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: file types the plot can be written as (matplotlib's raster and vector backends)
PLOT_TYPES = ("png", "svg", "pdf")


class PlotError(ValueError):
    """The plot cannot be drawn (no matplotlib, an unknown file type): one clear line."""


def _check_path(path: str | os.PathLike) -> tuple[Path, str]:
    p = Path(path)
    kind = p.suffix.lower().lstrip(".")
    if kind not in PLOT_TYPES:
        raise PlotError(f"{p}: the plot must end in .{', .'.join(PLOT_TYPES)} (--plot)")
    return p, kind


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError(
            'plotting needs matplotlib: pip install "quantize[plot]" (or matplotlib)'
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _sqnr(row: dict) -> float:
    v = float(row.get("sqnr_db", np.nan))
    return v if np.isfinite(v) else np.nan


def plot_report(report: dict, path: str | os.PathLike) -> Path:
    """Draw `report` (as `build_report`/`read_report` give it) into `path` (.png/.svg/.pdf).

    Top: SQNR in dB of every quantized tensor in the report's order (the worst in red). Bottom:
    the error histogram of the worst tensor (log counts), from the row's "error_hist". The file
    is written atomically; returns its path.
    """
    from .io.atomic import atomic_path

    out, kind = _check_path(path)
    plt = _pyplot()
    rows = [r for r in report["tensors"] if r.get("sqnr_db") is not None]
    if not rows:
        raise PlotError("the report has no quantized tensors to plot")
    worst = (report["totals"].get("worst") or [None])[0]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, min(18.0, 0.25 * len(rows))), 7))
    try:
        x = np.arange(len(rows))
        colors = ["tab:red" if r["name"] == worst else "tab:blue" for r in rows]
        top.bar(x, [_sqnr(r) for r in rows], color=colors)
        top.set_ylabel("SQNR dB")
        top.set_title(f"{len(rows)} quantized tensors (higher is better; worst in red)")
        if len(rows) <= 40:
            top.set_xticks(x, [r["name"] for r in rows], rotation=90, fontsize=6)
        else:
            top.set_xlabel("tensor, in file order")
        row = next((r for r in rows if r["name"] == worst), None)
        hist = (row or {}).get("error_hist")
        if hist and hist.get("counts"):
            counts = np.asarray(hist["counts"], dtype=np.float64)
            emax = float(hist["max_abs_err"]) or 1.0
            edges = np.linspace(-emax, emax, counts.size + 1)
            bottom.stairs(counts, edges, fill=True, color="tab:red")
            bottom.set_yscale("log")
            bottom.set_xlabel("error (dequantized - original)")
            bottom.set_ylabel("elements")
            bottom.set_title(f"error histogram of the worst tensor: {worst}", fontsize=9)
        else:
            bottom.text(0.5, 0.5, "no error histogram in this report", ha="center")
            bottom.set_axis_off()
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=kind, dpi=120)
    finally:
        plt.close(fig)
    return out
