"""Proof, run by hand, that transformers + compressed-tensors load our "pack-quantized" output.

Needs torch, transformers and compressed-tensors (not dependencies of quantize; a venv of its
own, see benchmarks/README.md). No model hub: a small Llama is built from a config here, saved,
quantized by the `quantize safetensors --layout compressed-tensors` command, loaded back with
`AutoModelForCausalLM.from_pretrained` (which decompresses through compressed-tensors'
PackedQuantizationCompressor), and compared with (1) our own dequantized weights, element for
element, and (2) the float model's logits.

    python scripts/check_compressed_tensors.py [--format int4|uint4|int8|uint8] [--block-size N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="int4")
    ap.add_argument("--block-size", default="32")
    args = ap.parse_args()

    import compressed_tensors
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import quantize

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "float", Path(tmp) / "quantized"
        model.save_pretrained(src, safe_serialization=True)
        cmd = [
            sys.executable, "-m", "quantize", "safetensors", str(src), "-o", str(out),
            "--format", args.format, "--block-size", args.block_size,
            "--layout", "compressed-tensors", "--quiet",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        low_n, low_worst, same_packed = check_with_compressor(src, out)
        print(
            f"{args.format} block {args.block_size}: PackedQuantizationCompressor on our files: "
            f"{low_n} weights; decompress vs quantize.load: max diff {low_worst:.3g}; "
            f"its compress() of the float weight with our scales: {same_packed}"
        )
        try:
            loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        except RuntimeError as exc:  # transformers' load report
            print(f"transformers could not load it: {str(exc).splitlines()[-1]}")
            return 0 if low_n and low_worst == 0.0 else 1
        ids = torch.randint(0, cfg.vocab_size, (4, 64))
        with torch.no_grad():
            a = model(ids).logits.flatten().double()
            b = loaded(ids).logits.flatten().double()
        # the first forward pass decompresses (a hook); then the weights are plain tensors
        ours = quantize.load(out)
        worst = 0.0
        n = 0
        for name, param in loaded.named_parameters():
            key = name if name in ours else None
            if key is None or not isinstance(ours[key], quantize.QuantizedTensor):
                continue
            mine = ours[key].dequantize(np.float32)
            theirs = param.detach().float().numpy()
            worst = max(worst, float(np.abs(mine - theirs).max()))
            n += 1
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"compressed-tensors {compressed_tensors.__version__}"
    )
    print(f"{args.format} block {args.block_size}: {n} quantized weights loaded by transformers;")
    print(f"  largest difference from quantize.load's dequantized weights: {worst:.3g}")
    print(f"  logits cosine similarity, quantized vs float model: {cos:.6f}")
    return 0 if n and worst == 0.0 else 1


def check_with_compressor(src: Path, out: Path) -> tuple[int, float, str]:
    """compressed-tensors' own PackedQuantizationCompressor on our checkpoint, module by module:
    decompress() must give quantize.load's values, and compress() of the float weight with our
    scales and zero points must give our packed bytes."""
    import json

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    import quantize

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    floats = {}
    for f in sorted(src.glob("*.safetensors")):
        floats.update(load_file(f))
    ours = quantize.load(out)
    n, worst, diff, words = 0, 0.0, 0, 0
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        module = key[: -len(".weight_packed")]
        sd = {
            k[len(module) + 1 :]: v for k, v in tensors.items() if k.startswith(module + ".weight_")
        }
        dec = PackedQuantizationCompressor.decompress(dict(sd), scheme)
        mine = ours[module + ".weight"].dequantize(np.float32)
        worst = max(worst, float(np.abs(dec["weight"].float().numpy() - mine).max()))
        again = {"weight": floats[module + ".weight"].float(), "weight_scale": sd["weight_scale"]}
        if "weight_zero_point" in dec:
            again["weight_zero_point"] = dec["weight_zero_point"]
        comp = PackedQuantizationCompressor.compress(again, scheme)
        for part in ("weight_packed", "weight_zero_point"):
            if part in sd:
                diff += int((comp[part] != sd[part]).sum())
                words += sd[part].numel()
        n += 1
    return n, worst, f"{diff} of {words} int32 words differ"


if __name__ == "__main__":
    raise SystemExit(main())
