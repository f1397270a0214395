"""`quantize inspect`: what a safetensors checkpoint holds, quantized by us or plain."""

from __future__ import annotations

import argparse
import json
import math

EPILOG = """\
examples:
  quantize inspect model.safetensors
  quantize inspect ./llama-int4/            (a folder, or a *.safetensors.index.json)

For a checkpoint written by `quantize safetensors` it lists every quantized tensor with its
format, block size, bits per weight and the pieces that store it, then the other tensors.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the tensors of a safetensors file (ours or plain)",
        description="List what a safetensors checkpoint holds: tensor names, dtypes and\n"
        "shapes, and for one written by quantize each tensor's format, block and bits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="a .safetensors file, a folder or an index.json")
    p.add_argument("--json", action="store_true", help="print it all as JSON")
    p.set_defaults(run=run)


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def run(args) -> int:
    from ..io.compressed_tensors import SUFFIXES
    from ..io.safetensors import PIECES, describe

    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for f in info["files"]:
        print(f"{f['path']}: {len(f['tensors'])} tensors")
        if f["metadata"]:
            print("  metadata: " + ", ".join(f"{k}={v}" for k, v in f["metadata"].items()))
        meta = f["quantize"]
        by = {t["name"]: t for t in f["tensors"]}
        used: set[str] = set()
        if meta:
            print(
                f"  quantized by quantize {meta.get('version')} (layout {meta['layout']}, "
                f"version {meta['layout_version']})"
            )
            rows = [
                ["tensor", "format", "shape", "dtype", "block", "axis", "bits/weight", "stored as"]
            ]
            for name, e in meta["tensors"].items():
                if meta["layout"] == "quantize":
                    base, suffixes = name, PIECES
                else:
                    base, suffixes = name[: -len("weight")], SUFFIXES
                pieces = [base + s for s in suffixes if base + s in by]
                used.update(pieces)
                size = math.prod(e.get("shape", []))
                nbytes = sum(by[n]["nbytes"] for n in pieces) + (4 if e.get("tensor_scale") else 0)
                rows.append(
                    [
                        name,
                        str(e.get("format")),
                        _shape(e.get("shape", [])),
                        str(e.get("dtype")),
                        str(e.get("block_size")),
                        str(e.get("axis")),
                        f"{8 * nbytes / size:.3f}" if size else "-",
                        ", ".join(n[len(base) :] for n in pieces),
                    ]
                )
            print("\n".join("  " + line for line in _table(rows)))
            qc = meta.get("quantization_config")
            if qc:
                print("  quantization_config (for config.json):")
                print("    " + json.dumps(qc, sort_keys=True))
        rest = [t for t in f["tensors"] if t["name"] not in used]
        if rest:
            if meta:
                print("  other tensors:")
            rows = [["tensor", "dtype", "shape", "bytes"]]
            rows += [[t["name"], t["dtype"], _shape(t["shape"]), str(t["nbytes"])] for t in rest]
            print("\n".join("  " + line for line in _table(rows)))
    return 0
