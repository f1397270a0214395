"""The `quantize` subcommands: one module each, with `add_parser(subparsers)` that registers
the subcommand and sets `run=` to a function `run(args) -> int` (the exit code).

add_parser must import nothing heavy (onnx, safetensors): that happens inside `run`.
"""

from . import demo, inspect, onnx, report, safetensors

#: subcommand modules in the order `quantize --help` lists them
COMMANDS = [demo, onnx, safetensors, inspect, report]
