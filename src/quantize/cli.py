"""The `quantize` command: parses arguments, runs one subcommand, turns failures into one line.

Exit codes: 0 success, 1 failure (one line on stderr; the traceback only with --debug),
2 usage error (argparse's), 130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM).
An interrupted or terminated run removes its temporary files and leaves no partial output:
SIGTERM is raised as an exception like Ctrl-C's KeyboardInterrupt, so every cleanup block runs,
and further signals are ignored until that cleanup is done.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from . import __version__
from .commands import COMMANDS
from .io.atomic import Terminated


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


def _on_signal(signum: int, frame) -> None:
    # the first signal stops the work; later ones must not cut its cleanup short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise (KeyboardInterrupt, Terminated) in the block; then restored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (cli.main called from a thread)
        return
    before: dict[int, Callable | int | None] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        before[sig] = signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _signals_raise():
            return args.run(args)
    except KeyboardInterrupt:
        print("quantize: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("quantize: terminated; nothing was written", file=sys.stderr)
        return 143
    except Exception as exc:  # one clear line; the traceback only when asked for
        if args.debug:
            raise
        print(f"quantize: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
