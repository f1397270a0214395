"""`quantize demo`: the built-in weight set, quantized in several formats, and the error table."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..core import quantize_tensor
from ..formats import available_formats
from ..report import tensor_report
from ._args import positive_int, table

#: (format, block size[, method]) the tensor table shows by default: each format at its usual
#: sizes, round to nearest, and the mse scale search where it pays most
DEMO_CONFIGS = (
    ("int4", 32), ("int4", 128), ("int4", 128, "mse"), ("uint4", 32), ("uint4", 128),
    ("uint4", 128, "mse"), ("nf4", 64), ("fp4_e2m1", 32), ("mxfp4", 32), ("nvfp4", 16),
    ("int8", 128),
)  # fmt: skip
#: the ONNX model is quantized in these (MatMulNBits, which ONNX Runtime runs on any CPU)
MODEL_CONFIGS = (
    ("int4", 32, "rtn"),
    ("uint4", 32, "rtn"),
    ("int4", 128, "rtn"),
    ("int4", 128, "mse"),
)


def _config(config: tuple) -> tuple[str, int, str]:
    fmt, bs, *rest = config
    return fmt, bs, rest[0] if rest else "rtn"


def model_name(config: tuple) -> str:
    """The file name run_model_demo gives the model quantized in `config`."""
    fmt, bs, method = _config(config)
    return f"demo_block.{fmt}.b{bs}{'' if method == 'rtn' else '.' + method}.onnx"


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


def run_demo(configs: Sequence[tuple], out=None) -> list[dict]:
    """Quantize the demo weights in each (format, block size[, method]); print the table."""
    out = sys.stdout if out is None else out
    weights = demo_weights()
    total = sum(w.size for w in weights.values())
    print(
        f"quantize {__version__} demo: {len(weights)} weight matrices of a transformer MLP "
        f"block, {total:,} float32 weights ({4 * total / 2**20:.1f} MiB)\n",
        file=out,
    )
    rows = []
    for config in configs:
        fmt, bs, method = _config(config)
        start = time.perf_counter()
        results = [
            tensor_report(n, w, quantize_tensor(w, fmt, bs, axis=-1, method=method))
            for n, w in weights.items()
        ]
        seconds = time.perf_counter() - start
        worst = min(results, key=lambda r: r["sqnr_db"])
        size = sum(r["bits_per_weight"] * np.prod(r["shape"]) for r in results) / 8
        rows.append(
            {
                "format": fmt,
                "block": bs,
                "method": method,
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
                ("method", "method", ""),
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
        "bits/weight include scales and zero points; method: how block scales are chosen (rtn: "
        "the format's rule; mse: a search for the least squared error).",
        file=out,
    )
    return rows


def build_demo_model(path: Path, weights: dict[str, np.ndarray]) -> None:
    """The demo weights as an ONNX transformer block: attention output projection with a
    residual, then a ReLU MLP with a residual, plus the QKV projection as a second output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = weights["attn.out"].shape[0]
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w.T), name) for name, w in weights.items()
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "attn.qkv"], ["qkv"]),
        helper.make_node("MatMul", ["x", "attn.out"], ["attn"]),
        helper.make_node("Add", ["x", "attn"], ["h"]),
        helper.make_node("MatMul", ["h", "mlp.up"], ["up"]),
        helper.make_node("Relu", ["up"], ["act"]),
        helper.make_node("MatMul", ["act", "mlp.down"], ["down"]),
        helper.make_node("Add", ["h", "down"], ["y"]),
    ]
    io = lambda name, n: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", n])  # noqa: E731
    graph = helper.make_graph(
        nodes, "quantize_demo_block", [io("x", d)], [io("y", d), io("qkv", 3 * d)], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def run_model_demo(folder: Path, out=None) -> list[dict] | None:
    """Quantize the demo ONNX model in MODEL_CONFIGS, run float and quantized in ONNX Runtime,
    and print sizes and output agreement. None (and a note) without onnx/onnxruntime."""
    out = sys.stdout if out is None else out
    try:
        from ..io.onnx import check_models, quantize_onnx_file
    except ImportError:
        print("\n(the model-level demo needs onnx and onnxruntime: pip install 'quantize[onnx]')",
              file=out)  # fmt: skip
        return None
    float_path = folder / "demo_block.onnx"
    build_demo_model(float_path, demo_weights())
    rows = []
    for config in MODEL_CONFIGS:
        fmt, bs, method = _config(config)
        q_path = folder / model_name(config)
        start = time.perf_counter()
        result = quantize_onnx_file(
            float_path,
            q_path,
            format=fmt,
            block_size=bs,
            output="matmulnbits",
            overwrite=True,
            method=method,
        )
        seconds = time.perf_counter() - start
        checked = check_models(float_path, q_path, n=4, seed=0)
        rows.append(
            {
                "model": q_path.name,
                "MiB": result["output_bytes"] / 2**20,
                "ratio": result["input_bytes"] / result["output_bytes"],
                "cosine": min(c["cosine"] for c in checked.values()),
                "max_err": max(c["max_abs_err"] for c in checked.values()),
                "ms": 1000 * seconds,
            }
        )
    size = float_path.stat().st_size / 2**20
    print(f"\nThe same weights as an ONNX transformer block ({float_path.name}, {size:.2f} MiB), "
          "quantized to MatMulNBits and run in ONNX Runtime against the float model on 4 random "
          "inputs:\n", file=out)  # fmt: skip
    columns = [
        ("model", "model", ""),
        ("MiB", "MiB", ".3f"),
        ("smaller by", "ratio", ".2f"),
        ("output cosine (min)", "cosine", ".5f"),
        ("max |err|", "max_err", ".4f"),
        ("quantize ms", "ms", ".0f"),
    ]
    print(table(rows, columns), file=out)
    return rows


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="quantize a built-in weight set and model, and print what it cost",
        description="Quantize a built-in, transformer-shaped weight set in several formats and "
        "print what each costs in accuracy and size; then quantize the same weights as an ONNX "
        "model and compare its outputs with the float model's in ONNX Runtime. Writes nothing "
        "outside a temporary folder unless -o is given.",
        epilog="example: quantize demo --formats int4 nf4 --block-size 32 --method mse -o models",
    )
    demo.add_argument(
        "--formats",
        nargs="+",
        choices=available_formats(),
        metavar="FORMAT",
        help="formats for the tensor table (default: each format at its usual block sizes; "
        f"available: {', '.join(available_formats())})",
    )
    demo.add_argument(
        "--block-size",
        type=positive_int,
        nargs="+",
        help="block sizes for --formats (default: 32 128)",
    )
    demo.add_argument(
        "--method",
        choices=["rtn", "mse", "hqq"],
        default="rtn",
        help="how block scales are chosen for --formats (default: rtn)",
    )
    demo.add_argument(
        "-o", "--output", type=Path, metavar="DIR", help="keep the ONNX models in DIR"
    )
    demo.add_argument("--no-model", action="store_true", help="skip the ONNX model part")
    demo.set_defaults(run=run)


def run(args) -> int:
    if args.formats or args.block_size:
        formats = args.formats or sorted({c[0] for c in DEMO_CONFIGS})
        configs = [(f, b, args.method) for f in formats for b in (args.block_size or (32, 128))]
    else:
        configs = list(DEMO_CONFIGS)
    run_demo(configs)
    if args.no_model:
        return 0
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        run_model_demo(args.output)
        print(f"\nmodels written to {args.output}/")
    else:
        with tempfile.TemporaryDirectory(prefix="quantize-demo-") as tmp:
            run_model_demo(Path(tmp))
    return 0
