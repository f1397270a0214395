"""`quantize demo`: the built-in weight set, quantized in several formats, and the error table."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np

from .. import __version__
from ..core import quantize_tensor
from ..formats import available_formats
from ..report import tensor_report
from ._args import positive_int, table

DEMO_FORMATS = ("int4", "uint4", "int4_affine", "int8")
DEMO_BLOCKS = (32, 128)


def demo_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A small transformer MLP block's weights, [out, in] float32, heavy-tailed as trained ones are.

    Student-t (3 degrees of freedom) entries scaled like a Kaiming init, and a few input
    channels with 10x larger weights, the outlier columns that make 4-bit hard.
    """
    rng = np.random.default_rng(seed)
    shapes = {
        "attn.qkv": (768, 256),
        "attn.out": (256, 256),
        "mlp.up": (1024, 256),
        "mlp.down": (256, 1024),
    }
    weights = {}
    for name, (rows, cols) in shapes.items():
        w = rng.standard_t(3, size=(rows, cols)) / np.sqrt(3 * cols)
        outliers = rng.choice(cols, size=max(1, cols // 128), replace=False)
        w[:, outliers] *= 10
        weights[name] = w.astype(np.float32)
    return weights


def run_demo(formats: Sequence[str], block_sizes: Sequence[int], out=None) -> list[dict]:
    """Quantize the demo weights in each format and block size; print the table to `out`."""
    out = sys.stdout if out is None else out
    weights = demo_weights()
    total = sum(w.size for w in weights.values())
    print(
        f"quantize {__version__} demo: {len(weights)} weight matrices of a transformer MLP "
        f"block, {total:,} float32 weights ({4 * total / 2**20:.1f} MiB)\n",
        file=out,
    )
    rows = []
    for fmt in formats:
        for bs in block_sizes:
            start = time.perf_counter()
            results = [
                tensor_report(n, w, quantize_tensor(w, fmt, bs, axis=-1))
                for n, w in weights.items()
            ]
            seconds = time.perf_counter() - start
            worst = min(results, key=lambda r: r["sqnr_db"])
            size = sum(r["bits_per_weight"] * np.prod(r["shape"]) for r in results) / 8
            rows.append(
                {
                    "format": fmt,
                    "block": bs,
                    "bits": 8 * size / total,
                    "MiB": size / 2**20,
                    "sqnr": float(np.mean([r["sqnr_db"] for r in results])),
                    "rel_rmse": float(np.mean([r["rel_rmse"] for r in results])),
                    "max_err": max(r["max_abs_err"] for r in results),
                    "worst": f"{worst['name']} ({worst['sqnr_db']:.1f} dB)",
                    "ms": 1000 * seconds,
                }
            )
    print(
        table(
            rows,
            [
                ("format", "format", ""),
                ("block", "block", ""),
                ("bits/weight", "bits", ".3f"),
                ("MiB", "MiB", ".3f"),
                ("SQNR dB", "sqnr", ".2f"),
                ("rel RMSE", "rel_rmse", ".4f"),
                ("max |err|", "max_err", ".4f"),
                ("worst tensor", "worst", ""),
                ("ms", "ms", ".0f"),
            ],
        ),
        file=out,
    )
    print(
        "\nSQNR: signal-to-quantization-noise ratio, mean over tensors (higher is better); "
        "bits/weight include scales and zero points.",
        file=out,
    )
    return rows


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="quantize a built-in weight set and print the error table",
        description="Quantize a built-in, transformer-shaped weight set in several formats "
        "and print what each costs in accuracy and size.",
        epilog="example: quantize demo --formats int4 uint4 --block-size 32",
    )
    demo.add_argument(
        "--formats",
        nargs="+",
        default=list(DEMO_FORMATS),
        choices=available_formats(),
        metavar="FORMAT",
        help=f"formats to try (default: {' '.join(DEMO_FORMATS)}; "
        f"available: {', '.join(available_formats())})",
    )
    demo.add_argument(
        "--block-size",
        type=positive_int,
        nargs="+",
        default=list(DEMO_BLOCKS),
        help="block sizes along the input dimension (default: 32 128)",
    )
    demo.set_defaults(run=run)


def run(args) -> int:
    run_demo(args.formats, args.block_size)
    return 0
