"""`quantize onnx`: an ONNX model's MatMul/Gemm weights to 4 bits (MatMulNBits or QDQ)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from contextlib import closing
from pathlib import Path

from ._args import positive_int


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


EPILOG = """\
examples:
  quantize onnx model.onnx -o model.int4.onnx
  quantize onnx model.onnx -o model.q4.onnx --format uint4 --block-size 128 --check
  quantize onnx model.onnx -o model.qdq.onnx --output-type qdq --exclude 'lm_head*' --gather
  quantize onnx model.onnx -o model.gptq.onnx --method gptq --calib inputs.npz --check
  quantize onnx model.onnx -o model.mixed.onnx --format uint4 --block-size 128 --target-bits 4.5

Methods: rtn rounds to nearest; mse and hqq search each block's scale (and zero point)
without data; awq and gptq run the float model in onnxruntime on calibration inputs
(--calib: an .npz of arrays keyed by input name, first axis = samples; without it,
random inputs from the model's input types). awq scales each weight's input channels
and puts a Mul by 1/s in front of the MatMul; gptq rounds with error feedback (rows in
decreasing activation order, block params from the mse search); awq+gptq tries awq, gptq
and gptq on awq's scaled weight and keeps, per weight, the one with the smallest output
error on the calibration inputs. Calibration keeps a K x K float64 Hessian per MatMul
input; --calib-memory bounds what is held at once (more passes over the inputs instead).
--target-bits mixes 4 bits at the block size, 4 bits at block 32 (16) and 8 bits per
weight to keep the error lowest within that many bits per weight (scales included).

MatMulNBits output runs in onnxruntime (com.microsoft domain); QDQ output
(DequantizeLinear, opset 21) is standard ONNX: models below opset 21 are upgraded.
Patterns are shell-style globs matched against weight and node names.
A report goes beside OUT (OUT.report.json, OUT.report.md; --no-report skips it).
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
        choices=["int4", "uint4", "int4_ort"],
        default="int4",
        help="int4: symmetric, no zero point; uint4: a zero point per block; int4_ort: ONNX "
        "Runtime's own symmetric rule, the bytes its MatMulNBitsQuantizer writes (default: int4)",
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
    p.add_argument(
        "--method",
        choices=["rtn", "mse", "hqq", "awq", "gptq", "awq+gptq"],
        default="rtn",
        help="how codes are chosen: rtn, mse, hqq (data-free); awq, gptq, awq+gptq "
        "(calibrated; awq+gptq: the best of the three per weight) (default: rtn)",
    )
    p.add_argument(
        "--calib",
        metavar="FILE.npz",
        help="calibration inputs keyed by input name, first axis = samples (awq, gptq, "
        "--target-bits; with it the table shows each layer's output error)",
    )
    p.add_argument(
        "--target-bits",
        type=positive_float,
        metavar="B",
        help="mixed precision: at most B bits per weight on average (e.g. 4.5)",
    )
    p.add_argument(
        "--calib-memory",
        type=positive_float,
        default=2048.0,
        metavar="MIB",
        help="calibration state held at once (Hessians, AWQ rows), MiB; above it the weights "
        "are calibrated in groups, one pass over the inputs each (default: 2048)",
    )
    p.add_argument(
        "--no-awq-check",
        action="store_true",
        help="awq, awq+gptq with --calib: skip the whole-model choice between AWQ scales with "
        "and without the weight factor (which builds the model twice); keep the weight factor",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--no-report", action="store_true", help="do not write OUT.report.json / OUT.report.md"
    )
    p.add_argument(
        "--plot",
        metavar="IMAGE",
        help="draw per-tensor SQNR and the worst tensor's error histogram (.png/.svg/.pdf; "
        "needs matplotlib)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
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


class _WeightBar:
    """The progress bar, sized when the first weight reports how many there are."""

    def __init__(self, quiet: bool):
        from ..progress import ProgressBar

        self.bar = ProgressBar(0, "weights", enabled=False if quiet else None)

    def step(self, name: str, total: int) -> None:
        self.bar.total = total
        self.bar(name)

    def close(self) -> None:
        self.bar.close()


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
    if args.calib and not os.path.isfile(args.calib):
        raise ValueError(f"{args.calib}: no such file (--calib)")
    if args.plot:
        from ..plot import _check_path

        if args.no_report:
            raise ValueError("--plot draws the report: drop --no-report")
        _check_path(args.plot)  # a bad name fails now, not after the work
    if args.method in ("awq", "gptq", "awq+gptq") and not args.calib:
        print(
            f"quantize onnx: --method {args.method} without --calib: calibrating on random "
            "inputs built from the model's input types",
            file=sys.stderr,
        )
    bar = _WeightBar(quiet=args.quiet)
    with closing(bar):
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
            method=args.method,
            calib=args.calib,
            target_bits=args.target_bits,
            calib_memory=int(args.calib_memory * 2**20),
            awq_check=not args.no_awq_check,
            overwrite=args.force,
            progress=bar.step,
        )
    rows = [
        {
            "tensor": r["name"],
            "op": "/".join(r["op_types"]),
            "shape": "x".join(map(str, r["shape"])),
            "sqnr": r["sqnr_db"],
            "bits": r["bits_per_weight"],
            "choice": r.get("choice", ""),
            "err_rtn": r.get("output_error_rtn", float("nan")),
            "err": r.get("output_error", float("nan")),
        }
        for r in result["rows"]
    ]
    columns = [
        ("tensor", "tensor", ""),
        ("op", "op", ""),
        ("shape", "shape", ""),
        ("SQNR dB", "sqnr", ".2f"),
        ("bits/weight", "bits", ".3f"),
    ]
    if args.target_bits is not None:
        columns.insert(3, ("chosen", "choice", ""))
    if any("output_error" in r for r in result["rows"]):
        # relative output error tr(D^T H D)/tr(W^T H W) on the calibration activations
        columns += [("out err rtn", "err_rtn", ".3e"), (f"out err {args.method}", "err", ".3e")]
    mixed = f", mixed to <= {args.target_bits:g} bits/weight" if args.target_bits else ""
    calib = ""
    if args.method in ("awq", "gptq", "awq+gptq") or args.target_bits is not None:
        calib = f", calibrated on {args.calib or 'random inputs'}"
    print(
        f"{args.model}: {len(rows)} tensors quantized to {args.format} "
        f"(block {args.block_size}, {args.output_type}, method {args.method}{mixed}{calib})\n",
        file=out,
    )
    print(table(rows, columns), file=out)
    if rows and args.target_bits is not None:
        n = sum(math.prod(r["shape"]) for r in result["rows"])
        bits = sum(r["bits_per_weight"] * math.prod(r["shape"]) for r in result["rows"])
        print(f"average: {bits / max(n, 1):.3f} bits per weight", file=out)
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
    if not args.no_report:
        json_path, md_path = _write_report(args, result)
        print(f"report: {json_path}, {md_path}", file=out)
        if args.plot:
            from ..plot import plot_report
            from ..report import read_report

            print(f"plot: {plot_report(read_report(json_path), args.plot)}", file=out)
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


def report_base(output: str | os.PathLike) -> Path:
    """Where the reports of OUT go: OUT.onnx -> OUT.report(.json/.md), beside it."""
    p = Path(output)
    name = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(name + ".report")


def _write_report(args, result: dict) -> tuple[Path, Path]:
    """OUT.report.json / .md: the settings, every quantized tensor, what stayed float and why."""
    from ..report import write_reports

    settings = {
        "input": str(args.model),
        "output": str(args.output),
        "format": args.format,
        "block_size": args.block_size,
        "output_type": args.output_type,
        "method": args.method,
        "calib": args.calib,
        "target_bits": args.target_bits,
        "calib_memory_mib": args.calib_memory,
        "include": args.include,
        "exclude": args.exclude,
        "exclude_op_types": args.exclude_op_type,
        "gather": args.gather,
        "accuracy_level": args.accuracy_level,
        "input_bytes": result["input_bytes"],
        "output_bytes": result["output_bytes"],
        "notes": result["notes"],
    }
    rows = [dict(r, quantized=True) for r in result["rows"]]
    rows += [
        {"name": s["name"], "quantized": False, "op_type": s["op_type"], "note": s["reason"]}
        for s in result["skipped"]
    ]
    return write_reports(rows, report_base(args.output), settings)
