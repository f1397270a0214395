"""`quantize onnx`: an ONNX model's MatMul/Gemm weights to 4 bits (MatMulNBits or QDQ)."""

from __future__ import annotations

import argparse
import os
import sys

from ._args import positive_int

EPILOG = """\
examples:
  quantize onnx model.onnx -o model.int4.onnx
  quantize onnx model.onnx -o model.q4.onnx --format uint4 --block-size 128 --check
  quantize onnx model.onnx -o model.qdq.onnx --output-type qdq --exclude 'lm_head*' --gather

MatMulNBits output runs in onnxruntime (com.microsoft domain); QDQ output
(DequantizeLinear, opset 21) is standard ONNX: models below opset 21 are upgraded.
Patterns are shell-style globs matched against weight and node names.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "onnx",
        help="quantize an ONNX model's MatMul/Gemm weights to 4 bits",
        description="Quantize the constant weights of an ONNX model's MatMul and Gemm nodes\n"
        "(and, with --gather, Gather embeddings) block-wise to 4 bits, write the new\n"
        "model and print what each tensor cost in accuracy and size.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="the float ONNX model (.onnx)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the model to write")
    p.add_argument(
        "--format",
        choices=["int4", "uint4"],
        default="int4",
        help="int4: symmetric, no zero point; uint4: a zero point per block (default: int4)",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        default=32,
        help="weights per block along K (MatMulNBits: a power of two >= 16; default: 32)",
    )
    p.add_argument(
        "--output-type",
        choices=["matmulnbits", "qdq"],
        default="matmulnbits",
        help="matmulnbits: ORT's com.microsoft.MatMulNBits; qdq: DequantizeLinear + MatMul "
        "(default: matmulnbits)",
    )
    p.add_argument(
        "--include", nargs="+", action="extend", metavar="PATTERN", help="quantize only these"
    )
    p.add_argument(
        "--exclude", nargs="+", action="extend", metavar="PATTERN", help="leave these in float"
    )
    p.add_argument(
        "--exclude-op-type",
        nargs="+",
        action="extend",
        default=[],
        choices=["MatMul", "Gemm", "Gather"],
        metavar="T",
        help="leave nodes of these op types in float (MatMul, Gemm, Gather)",
    )
    p.add_argument(
        "--accuracy-level",
        type=int,
        choices=range(5),
        metavar="N",
        help="MatMulNBits accuracy_level 0-4 (4: int8 activations, faster, less exact); unset "
        "by default",
    )
    p.add_argument(
        "--gather",
        action="store_true",
        help="also quantize Gather embeddings (DequantizeLinear + Gather, opset 21)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--check",
        action="store_true",
        help="run float and quantized model in onnxruntime and print output cosine similarity",
    )
    p.add_argument(
        "--inputs",
        metavar="FILE.npz",
        help="inputs for --check, keyed by input name (default: random inputs); implies --check",
    )
    p.set_defaults(run=run)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def run(args, out=None) -> int:
    from ..io.onnx import check_models, quantize_onnx_file
    from ._args import table

    out = sys.stdout if out is None else out
    if args.accuracy_level is not None and args.output_type != "matmulnbits":
        raise ValueError("--accuracy-level applies to --output-type matmulnbits only")
    if args.inputs and not os.path.isfile(args.inputs):
        raise ValueError(f"{args.inputs}: no such file (--inputs)")
    result = quantize_onnx_file(
        args.model,
        args.output,
        format=args.format,
        block_size=args.block_size,
        output=args.output_type,
        include=args.include,
        exclude=args.exclude,
        exclude_op_types=args.exclude_op_type,
        accuracy_level=args.accuracy_level,
        quantize_gather=args.gather,
        overwrite=args.force,
    )
    rows = [
        {
            "tensor": r["name"],
            "op": "/".join(r["op_types"]),
            "shape": "x".join(map(str, r["shape"])),
            "sqnr": r["sqnr_db"],
            "bits": r["bits_per_weight"],
        }
        for r in result["rows"]
    ]
    print(
        f"{args.model}: {len(rows)} tensors quantized to {args.format} "
        f"(block {args.block_size}, {args.output_type})\n",
        file=out,
    )
    print(
        table(
            rows,
            [
                ("tensor", "tensor", ""),
                ("op", "op", ""),
                ("shape", "shape", ""),
                ("SQNR dB", "sqnr", ".2f"),
                ("bits/weight", "bits", ".3f"),
            ],
        ),
        file=out,
    )
    for note in result["notes"]:
        print(f"note: {note}", file=out)
    skipped = result["skipped"]
    if skipped:
        print(f"left in float: {len(skipped)}", file=out)
        for s in skipped[:10]:
            print(f"  {s['name']} ({s['op_type']}): {s['reason']}", file=out)
        if len(skipped) > 10:
            print(f"  ... and {len(skipped) - 10} more", file=out)
    before, after = result["input_bytes"], result["output_bytes"]
    print(
        f"\nsize: {_mib(before)} -> {_mib(after)} ({before / max(after, 1):.2f}x smaller); "
        f"wrote {', '.join(str(p) for p in result['output_files'])}",
        file=out,
    )
    if args.check or args.inputs:
        checks = check_models(args.model, args.output, inputs=args.inputs)
        what = args.inputs or "4 random input sets"
        print(f"\ncheck against the float model in onnxruntime ({what}):", file=out)
        if args.output_type == "qdq":
            print(
                "(ORT's default optimizations run DequantizeLinear + MatMul as MatMulNBits "
                "with int8 activations)",
                file=out,
            )
        print(
            table(
                [{"output": k, **v} for k, v in checks.items()],
                [
                    ("output", "output", ""),
                    ("cosine", "cosine", ".6f"),
                    ("max |err|", "max_abs_err", ".4g"),
                    ("rel RMSE", "rel_rmse", ".4f"),
                ],
            ),
            file=out,
        )
    return 0
