"""The `quantize` command: parses arguments, runs one subcommand, turns failures into one line.

Exit codes: 0 success, 1 failure (one line on stderr; the traceback only with --debug),
2 usage error (argparse's).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantize", description="4-bit quantization of tensors and model checkpoints."
    )
    parser.add_argument("--version", action="version", version=f"quantize {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("quantize: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line; the traceback only when asked for
        if args.debug:
            raise
        print(f"quantize: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
