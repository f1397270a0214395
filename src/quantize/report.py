"""Error figures for a quantized tensor: what the bits cost, per tensor, in one dict; and the
report files (JSON for machines, Markdown for people) written next to a quantized model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .tensor import QuantizedTensor


def error_stats(original: np.ndarray, reconstructed: np.ndarray) -> dict[str, float]:
    """rel_rmse, sqnr_db, max_abs_err and outlier_ratio (amax / std) of one tensor, in float64.

    sqnr_db is inf for an exact reconstruction; rel_rmse is 0 then (and for an all-zero
    original with an exact reconstruction).
    """
    x = np.asarray(original, dtype=np.float64)
    err = np.asarray(reconstructed, dtype=np.float64) - x
    emax = float(np.abs(err).max()) if err.size else 0.0
    amax = float(np.abs(x).max()) if x.size else 0.0
    out = _figures(float(np.mean(x * x)), float(np.mean(err * err)), emax, amax, float(x.std()))
    out["error_hist"] = _hist_row(_error_counts(err.reshape(-1), emax), emax)
    return out


#: bins of the error histogram a report row keeps (equal widths over [-max|err|, max|err|])
HIST_BINS = 40


def _error_counts(err: np.ndarray, emax: float) -> np.ndarray:
    """Counts of `err` in HIST_BINS equal bins over [-emax, emax] (an exact tensor: the middle)."""
    if emax == 0:
        counts = np.zeros(HIST_BINS, np.int64)
        counts[HIST_BINS // 2] = err.size
        return counts
    return np.histogram(err, bins=HIST_BINS, range=(-emax, emax))[0]


def _hist_row(counts: np.ndarray, emax: float) -> dict:
    return {"max_abs_err": emax, "counts": [int(c) for c in counts]}


def _figures(signal: float, noise: float, emax: float, amax: float, std: float) -> dict:
    """The report's error figures from mean squares, the largest errors and the spread."""
    if noise == 0:
        rel_rmse, sqnr_db = 0.0, np.inf
    elif signal == 0:
        rel_rmse, sqnr_db = np.inf, -np.inf
    else:
        rel_rmse, sqnr_db = float(np.sqrt(noise / signal)), float(10 * np.log10(signal / noise))
    return {
        "rel_rmse": rel_rmse,
        "sqnr_db": sqnr_db,
        "max_abs_err": emax,
        "outlier_ratio": amax / std if std > 0 else 1.0,
    }


def error_stats_chunked(
    original: np.ndarray, reconstructed: np.ndarray, chunk: int = 1 << 22
) -> dict[str, float]:
    """`error_stats` for tensors too big to copy to float64: two passes of a numba kernel over
    slices of `chunk` elements (float16/bfloat16 slices are widened to float32 first).

    Same figures as `error_stats` (sums taken in a different order, so the last digits may
    differ; the histogram is the same); a tensor of at most `chunk` elements goes to
    `error_stats` itself, as does everything when kernels are off (QUANTIZE_KERNELS=0).
    """
    import os

    from . import kernels

    x_all, r_all = np.asarray(original), np.asarray(reconstructed)
    off = os.environ.get(kernels.ENV_SWITCH, "1") == "0"
    if x_all.size <= chunk or x_all.ndim == 0 or off:
        return error_stats(x_all, r_all)
    from .kernels import stats

    x_all, r_all = x_all.reshape(-1), r_all.reshape(-1)
    slices = [slice(i, i + chunk) for i in range(0, x_all.size, chunk)]

    def part(a, sl):
        piece = a[sl]
        return piece if piece.dtype in (np.float32, np.float64) else piece.astype(np.float32)

    parts = np.concatenate([stats.moments(part(x_all, sl), part(r_all, sl)) for sl in slices])
    total = x_all.size
    s_x, s_xx, s_ee = (float(v) for v in parts[:, :3].sum(axis=0))
    amax, emax = float(parts[:, 3].max()), float(parts[:, 4].max())
    mean = s_x / total
    edges = np.linspace(-emax, emax, HIST_BINS + 1) if emax > 0 else np.linspace(-1, 1, 3)
    s_dd, counts = 0.0, np.zeros(HIST_BINS, np.int64)
    for sl in slices:
        dd, c = stats.spread(part(x_all, sl), part(r_all, sl), mean, edges)
        s_dd += float(dd.sum())
        if emax > 0:
            counts += c.sum(axis=0)
    if emax == 0:
        counts[HIST_BINS // 2] = total
    out = _figures(s_xx / total, s_ee / total, emax, amax, float(np.sqrt(s_dd / total)))
    out["error_hist"] = _hist_row(counts, emax)
    return out


def tensor_report(name: str, original: np.ndarray, qt: QuantizedTensor) -> dict[str, object]:
    """One row of a report: the tensor, its format and bits per weight, and its error figures."""
    row: dict[str, object] = {
        "name": name,
        "format": qt.format,
        "block_size": qt.block_size,
        "shape": list(qt.shape),
        "bits_per_weight": qt.bits_per_weight,
    }
    # in slices by a kernel: a float64 copy of a big tensor would cost several times its size
    row.update(error_stats_chunked(original, qt.dequantize(np.float32)))
    return row


# --------------------------------------------------------------------------- report files

#: bump when the report JSON changes shape
REPORT_VERSION = 1
WORST_N = 5


def _is_quantized(row: dict) -> bool:
    return bool(row.get("quantized", row.get("sqnr_db") is not None))


def _size(row: dict) -> int:
    return int(np.prod(row.get("shape") or [], dtype=np.int64))


def summarize(rows: list[dict]) -> dict[str, object]:
    """Totals over report rows: bytes before/after, mean SQNR, bits per weight, the worst ones.

    Rows are `tensor_report` rows; rows with "quantized": False (tensors kept as they were)
    count in the byte totals only. Byte totals need "bytes_before"/"bytes_after" in the rows
    (the safetensors rows have them) and are None otherwise. mean_sqnr_db averages the finite
    SQNRs (an exact tensor's is inf); bits_per_weight is over the quantized tensors' elements.
    """
    q = [r for r in rows if _is_quantized(r)]
    elems = sum(_size(r) for r in q)
    q_bits = sum(float(r["bits_per_weight"]) * _size(r) for r in q)
    finite = [float(r["sqnr_db"]) for r in q if np.isfinite(float(r["sqnr_db"]))]

    def total(key, subset):
        vals = [r.get(key) for r in subset]
        return None if any(v is None for v in vals) else int(sum(vals))

    before, after = total("bytes_before", rows), total("bytes_after", rows)
    worst = sorted(q, key=lambda r: float(r["sqnr_db"]))[:WORST_N]
    return {
        "tensors": len(rows),
        "quantized": len(q),
        "kept": len(rows) - len(q),
        "quantized_elements": elems,
        "bytes_before": before,
        "bytes_after": after,
        "quantized_bytes_before": total("bytes_before", q),
        "quantized_bytes_after": total("bytes_after", q),
        "compression_ratio": before / after if before and after else None,
        "bits_per_weight": q_bits / elems if elems else None,
        "mean_sqnr_db": float(np.mean(finite)) if finite else (np.inf if q else None),
        "min_sqnr_db": float(worst[0]["sqnr_db"]) if worst else None,
        "max_rel_rmse": max((float(r["rel_rmse"]) for r in q), default=None),
        "seconds": float(sum(r.get("seconds") or 0.0 for r in q)),
        "worst": [r["name"] for r in worst],
    }


def _jsonable(x):
    """inf/-inf/nan as the strings "inf"/"-inf"/"nan" (JSON has no such numbers); numpy -> py."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return "nan" if np.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


_FLOAT_KEYS = {
    "sqnr_db",
    "rel_rmse",
    "max_abs_err",
    "outlier_ratio",
    "bits_per_weight",
    "mean_sqnr_db",
    "min_sqnr_db",
    "max_rel_rmse",
    "compression_ratio",
}


def _unjson(x, key=None):
    if isinstance(x, dict):
        return {k: _unjson(v, k) for k, v in x.items()}
    if isinstance(x, list):
        return [_unjson(v) for v in x]
    if key in _FLOAT_KEYS and x in ("inf", "-inf", "nan"):
        return float(x)
    return x


def build_report(rows: list[dict], settings: dict | None = None) -> dict[str, object]:
    """The report as one JSON-ready dict: settings, totals (`summarize`) and the rows."""
    from . import __version__

    return {
        "kind": "quantize-report",
        "report_version": REPORT_VERSION,
        "quantize_version": __version__,
        "settings": dict(settings or {}),
        "totals": summarize(rows),
        "tensors": [dict(r) for r in rows],
    }


def write_reports(rows: list[dict], base_path, settings: dict | None = None) -> tuple[Path, Path]:
    """Write BASE.json and BASE.md (BASE = `base_path` as given) atomically; return their paths.

    The JSON holds everything (`build_report`; non-finite numbers as "inf"/"-inf"/"nan"
    strings, `read_report` turns them back); the Markdown is for people: totals, the worst
    tensors by SQNR, then every tensor (the worst ones in bold) and the tensors kept as they
    were.
    """
    from .io.atomic import atomic_path

    base = Path(base_path)
    report = build_report(rows, settings)
    json_path = base.with_name(base.name + ".json")
    md_path = base.with_name(base.name + ".md")
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"
    with atomic_path(json_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    with atomic_path(md_path) as tmp:
        tmp.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path


def read_report(path) -> dict[str, object]:
    """A report JSON written by `write_reports`, checked; ValueError naming the file if not."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: not a report (not JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("kind") != "quantize-report":
        raise ValueError(f"{p}: not a quantize report")
    version = data.get("report_version")
    if not isinstance(version, int) or version > REPORT_VERSION:
        raise ValueError(f"{p}: report version {version!r} is not one this quantize reads")
    tensors = data.get("tensors")
    if not isinstance(tensors, list) or not all(
        isinstance(r, dict) and "name" in r for r in tensors
    ):
        raise ValueError(f"{p}: the report has no list of tensors")
    if not isinstance(data.get("totals"), dict) or not isinstance(data.get("settings"), dict):
        raise ValueError(f"{p}: the report lacks totals or settings")
    return _unjson(data)


# --------------------------------------------------------------------------- rendering


def _num(x, fmt: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not np.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return format(x, fmt)


def _mib(n) -> str:
    """Bytes for people: B, KiB, MiB or GiB."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


#: (title, key, format) of the per-tensor columns
COLUMNS = (
    ("tensor", "name", ""),
    ("format", "format", ""),
    ("shape", "shape", ""),
    ("block", "block_size", ""),
    ("bits/weight", "bits_per_weight", ".3f"),
    ("SQNR dB", "sqnr_db", ".2f"),
    ("rel RMSE", "rel_rmse", ".4f"),
    ("max |err|", "max_abs_err", ".4g"),
    ("amax/std", "outlier_ratio", ".1f"),
    ("ms", "seconds", ""),
)


def _cells(row: dict) -> list[str]:
    out = []
    for _, key, fmt in COLUMNS:
        v = row.get(key)
        if key == "shape":
            out.append("x".join(str(d) for d in v) if v is not None else "-")
        elif key == "seconds":
            out.append("-" if v is None else f"{1000 * v:.0f}")
        elif fmt:
            out.append(_num(v, fmt))
        else:
            out.append("-" if v is None else str(v))
    return out


def _totals_lines(t: dict) -> list[tuple[str, str]]:
    return [
        ("tensors", f"{t['tensors']} ({t['quantized']} quantized, {t['kept']} kept)"),
        ("size before", _mib(t.get("bytes_before"))),
        ("size after", _mib(t.get("bytes_after"))),
        ("compression", _num(t.get("compression_ratio"), ".2f") + "x"),
        ("bits/weight (quantized tensors)", _num(t.get("bits_per_weight"), ".3f")),
        ("mean SQNR dB", _num(t.get("mean_sqnr_db"), ".2f")),
        ("worst SQNR dB", _num(t.get("min_sqnr_db"), ".2f")),
        ("time", f"{t.get('seconds') or 0:.2f} s"),
    ]


def render_text(report: dict, *, all_rows: bool = True) -> str:
    """The report as a console table: quantized tensors, totals, the worst ones."""
    rows = [r for r in report["tensors"] if _is_quantized(r)] if all_rows else []
    head = [title for title, _, _ in COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = []
    if rows:
        out += [line(head), line(["-" * w for w in widths]), *map(line, body), ""]
    t = report["totals"]
    out += [f"{k}: {v}" for k, v in _totals_lines(t)]
    if t.get("worst"):
        by = {r["name"]: r for r in report["tensors"]}
        out.append(f"the {len(t['worst'])} worst by SQNR:")
        out += [f"  {_num(by[n].get('sqnr_db'), '6.2f')} dB  {n}" for n in t["worst"]]
    return "\n".join(out) + "\n"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def render_markdown(report: dict) -> str:
    t = report["totals"]
    s = report.get("settings") or {}
    rows = report["tensors"]
    worst = set(t.get("worst") or [])
    by = {r["name"]: r for r in rows}
    out = ["# Quantization report", ""]
    if s:
        out += [", ".join(f"**{k}**: `{_md_escape(v)}`" for k, v in s.items()), ""]
    out += ["## Totals", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in _totals_lines(t)]
    out += [""]
    head = "| " + " | ".join(_md_escape(title) for title, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    if worst:
        out += [f"## The {len(worst)} worst tensors by SQNR", "", head, rule]
        out += ["| " + " | ".join(map(_md_escape, _cells(by[n]))) + " |" for n in t["worst"]]
        out += [""]
    q = [r for r in rows if _is_quantized(r)]
    if q:
        bold = len(q) > len(worst)  # when every tensor is among the worst, bold says nothing
        note = ["The worst ones are in bold.", ""] if bold else []
        out += ["## Quantized tensors", "", *note, head, rule]
        for r in q:
            cells = list(map(_md_escape, _cells(r)))
            if bold and r["name"] in worst:
                cells = [f"**{c}**" for c in cells]
            out.append("| " + " | ".join(cells) + " |")
        out += [""]
    kept = [r for r in rows if not _is_quantized(r)]
    if kept:
        out += [
            "## Kept as they were",
            "",
            "| tensor | dtype | shape | size | why |",
            "|---|---|---|---:|---|",
        ]
        for r in kept:
            shape = "x".join(str(d) for d in r.get("shape") or []) or "scalar"
            out.append(
                f"| {_md_escape(r['name'])} | {r.get('dtype', '-')} | {shape} | "
                f"{_mib(r.get('bytes_before'))} | {_md_escape(r.get('note') or '-')} |"
            )
        out += [""]
    out += [
        "SQNR: signal-to-quantization-noise ratio (higher is better); bits/weight include "
        "scales and zero points; amax/std: how far the largest weight stands out.",
        "",
    ]
    return "\n".join(out)
