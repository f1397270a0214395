"""`quantize safetensors`: a safetensors checkpoint's linear weights to 4 (or 8) bits."""

from __future__ import annotations

import argparse
import sys
from contextlib import closing

from ..formats import available_formats

EPILOG = """\
examples:
  quantize safetensors model.safetensors -o model.nf4.safetensors --format nf4 --block-size 64
  quantize safetensors ./llama/ -o ./llama-int4/ --exclude '*.mlp.down_proj.*'
  quantize safetensors ./llama/ -o ./llama-uint4/ --format uint4 --method mse --jobs 2
  quantize safetensors ./llama/model.safetensors.index.json -o ./llama-w4a16/ \\
      --format int4 --block-size 128 --layout compressed-tensors

IN is a .safetensors file, a folder of them, or a sharded checkpoint's index
(*.safetensors.index.json); a folder or index gives an output folder with the same file
names, a rewritten index and the folder's other files (config.json, tokenizer) copied.
By default the floating-point weights with 2+ dimensions are quantized, except norms,
embeddings and the output head (by name); patterns are shell-style globs on tensor names.
The reports go beside OUT: OUT.report.json and OUT.report.md (OUT without .safetensors).

calibration (--calib FILE.npz, for --method gptq and --target-bits): an .npz with, per 2-d
weight NAME (out, in) of the checkpoint, either NAME.hessian, float (in, in) = X^T X summed
over that layer's inputs X (rows, in), or NAME.inputs, float (rows, in) samples of X (then
X^T X is computed here). Unknown names, wrong shapes, NaN/Inf or a non-symmetric Hessian are
errors. Under gptq, weights without data get rtn (noted in the report). To make the file, with
torch and transformers (not needed by quantize):

  import numpy as np, torch
  H = {}
  def hook(name):
      def f(module, args, out):
          x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
          H[name] = H.get(name, 0) + (x.T @ x).cpu()
      return f
  for n, m in model.named_modules():
      if isinstance(m, torch.nn.Linear):
          m.register_forward_hook(hook(n + ".weight"))
  with torch.no_grad():
      for batch in calibration_batches:
          model(**batch)
  np.savez("calib.npz", **{k + ".hessian": v.numpy() for k, v in H.items()})

--method gptq needs --calib. --method awq (and awq+gptq: GPTQ on the AWQ-scaled weights)
needs --calib with NAME.inputs samples and a Llama-style model (config.json's model_type
llama, mistral, qwen2 or qwen3 next to IN): each group's scales are folded into the norm or
Linear layer before it (input_layernorm, v_proj, post_attention_layernorm, up_proj), which
stay float; then each folded weight gets AWQ's clipping search (per block the range with the
least calibration output error, kept only where it lowers the weight's); other models are
refused.
--target-bits B picks per weight the format at the block size, at block 32, or int8/uint8,
keeping the stored bits (codes + scales + zero points) per quantized weight <= B with the
least error (output error with --calib, else relative squared error); with --method awq the
options are of the AWQ-folded weights.
"""


def block_size_arg(text: str):
    if text in ("auto", "channel"):
        return "auto" if text == "auto" else None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a block size: {text!r} (a number > 0, 'auto' or 'channel')"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def jobs_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of jobs: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "safetensors",
        help="quantize a safetensors checkpoint (file, folder or sharded index)",
        description="Quantize the linear weights of a safetensors checkpoint block-wise, write\n"
        "the quantized checkpoint and a JSON + Markdown report, and print what each tensor\n"
        "cost in accuracy and size. Nothing is written unless everything succeeds.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="a .safetensors file, a folder, or an index.json")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the file/folder to write")
    p.add_argument(
        "--format",
        default="int4",
        choices=available_formats(),
        metavar="FORMAT",
        help=f"one of {', '.join(available_formats())} (default: int4)",
    )
    p.add_argument(
        "--block-size",
        type=block_size_arg,
        default="auto",
        metavar="N",
        help="weights per block along the input dimension; 'auto' (the format's usual: 128 "
        "int, 64 nf4, 32 mxfp4, 16 nvfp4) or 'channel' (one block per row); default: auto",
    )
    p.add_argument(
        "--include", nargs="+", action="extend", metavar="PATTERN", help="quantize only these"
    )
    p.add_argument(
        "--exclude", nargs="+", action="extend", metavar="PATTERN", help="keep these as they are"
    )
    p.add_argument(
        "--embeddings",
        action="store_true",
        help="also quantize embeddings and the output head",
    )
    p.add_argument(
        "--all",
        dest="all_tensors",
        action="store_true",
        help="consider every floating-point tensor (1-d ones and FP8 too); --include/--exclude "
        "still apply",
    )
    p.add_argument(
        "--layout",
        choices=["quantize", "compressed-tensors"],
        default="quantize",
        help="quantize: NAME.qdata/.scales/.zero_points (docs/safetensors-layout.md), any "
        "format; compressed-tensors: pack-quantized for vLLM/transformers, int4/uint4/int8/"
        "uint8 (default: quantize)",
    )
    p.add_argument(
        "--jobs",
        type=jobs_arg,
        default=1,
        metavar="N",
        help="convert N shards at once, in N processes (each holds about one tensor at a "
        "time); the output is the same for any N (default: 1)",
    )
    p.add_argument(
        "--method",
        choices=["rtn", "mse", "hqq", "gptq", "awq", "awq+gptq"],
        default="rtn",
        help="how block scales are chosen: rtn (the format's rule), mse (clipping search, "
        "least squared error per block), hqq (half-quadratic optimisation), gptq (needs "
        "--calib: rounding errors pushed onto the inputs not yet done), awq (needs --calib "
        "inputs and a Llama-style model: scales folded into the norms and v_proj/up_proj, "
        "then a clipping search per weight), awq+gptq (gptq on awq's scaled weights, or the "
        "clipped awq result where its calibration error is lower) (default: rtn)",
    )
    p.add_argument(
        "--calib",
        metavar="FILE.npz",
        help="calibration data: NAME.hessian (in, in) = X^T X or NAME.inputs (rows, in) per "
        "2-d weight NAME (see below); reports gain output_error / output_error_rtn",
    )
    p.add_argument(
        "--target-bits",
        type=float,
        metavar="B",
        help="mixed precision: the least-error choice per weight among the format at the "
        "block size, at block 32, and int8/uint8, with stored bits per quantized weight <= B",
    )
    p.add_argument(
        "--nan",
        choices=["raise", "zero"],
        default="raise",
        help="a NaN/Inf weight: raise (an error naming the tensor) or zero (NaN -> 0, "
        "+-Inf -> the block's finite extreme) (default: raise)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-report", action="store_true", help="do not write the report files")
    p.add_argument(
        "--plot",
        metavar="IMAGE",
        help="draw per-tensor SQNR and the worst tensor's error histogram (.png/.svg/.pdf; "
        "needs matplotlib)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar or progress lines on stderr"
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from ..io.safetensors import report_base, resolve
    from ..progress import ProgressBar
    from ..report import build_report, render_text, write_reports

    output = Path(args.output)
    source = resolve(args.input)
    if source.single and output.is_dir():  # a file into a folder keeps its name
        output = output / source.files[0].name

    if args.plot:
        from ..plot import _check_path

        _check_path(args.plot)  # a bad name fails now, not after the work
    bar = ProgressBar(_count_tensors(source), enabled=False if args.quiet else None)

    def progress(row):
        bar(row["name"])
        if row["quantized"] and not args.quiet and not bar.enabled:  # a log, not a terminal
            print(
                f"  {row['name']}: {row['sqnr_db']:.1f} dB, {row['bits_per_weight']:.2f} bits",
                file=sys.stderr,
            )

    with closing(bar):
        rows = _convert(args, output, progress)
    settings = {
        "input": str(args.input),
        "output": str(output),
        "format": args.format,
        "block_size": "channel" if args.block_size is None else args.block_size,
        "layout": args.layout,
        "method": args.method,
    }
    if args.calib is not None:
        settings["calib"] = str(args.calib)
    if args.target_bits is not None:
        settings["target_bits"] = args.target_bits
    print(render_text(build_report(rows, settings)), end="")
    if not any(r["quantized"] for r in rows):
        print("note: no tensor matched; the output is a copy of the input", file=sys.stderr)
    print(f"wrote {output}")
    if not args.no_report:
        json_path, md_path = write_reports(rows, report_base(output), settings)
        print(f"report: {json_path}, {md_path}")
    if args.plot:
        from ..plot import plot_report

        print(f"plot: {plot_report(build_report(rows, settings), args.plot)}")
    return 0


def _count_tensors(source) -> int:
    from ..io._stfile import SafetensorsFile

    total = 0
    for path in source.files:
        with SafetensorsFile(path) as f:
            total += len(f.tensors)
    return total


def _convert(args, output, progress):
    from ..io.safetensors import quantize_safetensors

    return quantize_safetensors(
        args.input,
        output,
        format=args.format,
        block_size=args.block_size,
        include=args.include,
        exclude=args.exclude,
        embeddings=args.embeddings,
        all_tensors=args.all_tensors,
        layout=args.layout,
        overwrite=args.force,
        progress=progress,
        jobs=args.jobs,
        method=args.method,
        nan=args.nan,
        calib=args.calib,
        target_bits=args.target_bits,
    )
