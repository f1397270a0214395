"""`quantize report`: print a report that `quantize safetensors` wrote, again."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
example:
  quantize report model.int4.report.json
  quantize report model.int4.report.json --plot model.int4.png
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="print a quantization report (the .report.json beside a quantized model)",
        description="Print the per-tensor table, totals and worst tensors of a report JSON.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="a report JSON (OUT.report.json)")
    p.add_argument(
        "--markdown", action="store_true", help="print it as Markdown instead of a table"
    )
    p.add_argument(
        "--plot",
        metavar="IMAGE",
        help="also draw per-tensor SQNR and the worst tensor's error histogram (.png/.svg/.pdf; "
        "needs matplotlib)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..report import read_report, render_markdown, render_text

    report = read_report(args.file)
    if args.plot:
        from ..plot import plot_report

        print(f"plot: {plot_report(report, args.plot)}", file=sys.stderr)
    settings = report["settings"]
    if args.markdown:
        print(render_markdown(report), end="")
        return 0
    if settings:
        print(", ".join(f"{k}: {v}" for k, v in settings.items()))
    print(render_text(report), end="")
    return 0
