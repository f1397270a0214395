"""Proof, run by hand, that `quantize safetensors --method awq` is right on a real Llama.

Needs torch and transformers (not dependencies of quantize; a venv of its own, as for
scripts/check_compressed_tensors.py). No model hub: a 2-layer Llama is built from a config,
given a few outlier channels in its norms (trained LLMs have them; a fresh init does not),
saved, calibrated with forward hooks (each Linear's inputs, `NAME.inputs`), and then:

1. the AWQ scales (`quantize.io.awq_fold.compute_fold`) folded into the float checkpoint,
   loaded into transformers: logits equal the float model's (float32 rounding);
2. `quantize safetensors --method awq` and `--method rtn` (and awq+gptq), dequantized with
   `quantize.load` and loaded into transformers: awq's logits are closer to the float ones;
   also awq and awq+gptq without the clipping search (`awq_fold.CLIP = False`, in process),
   to show what it adds;
3. `--method awq --target-bits B` (B: the uniform run's bits per weight + --extra-bits): the
   file loads, its bits per weight are <= B, and its logit error is compared with uniform awq.

    python scripts/check_awq_llama.py [--format int4] [--block-size 32] [--kv-heads 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="int4")
    ap.add_argument("--block-size", default="32")
    ap.add_argument("--kv-heads", type=int, default=4, help="< 4: grouped-query attention")
    ap.add_argument("--extra-bits", type=float, default=0.5, help="mixed: B = uniform + this")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import quantize
    from quantize.io import awq_fold
    from quantize.io.awq_fold import compute_fold
    from quantize.io.safetensors import quantize_safetensors

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                idx = torch.randperm(cfg.hidden_size)[:4]
                norm.weight[idx] *= 30.0  # outlier input channels for q/k/v and gate/up
            layer.mlp.up_proj.weight[:8] *= 8.0  # and for down_proj
    ids = torch.randint(0, cfg.vocab_size, (8, 64))
    held_out = torch.randint(0, cfg.vocab_size, (8, 64))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "float"
        model.save_pretrained(src, safe_serialization=True)
        calib = tmp / "calib.npz"
        np.savez(calib, **capture_inputs(model, ids))
        with torch.no_grad():
            ref = model(held_out).logits.double()

        def logits(state: dict) -> torch.Tensor:
            m = LlamaForCausalLM(cfg).eval()
            missing, unexpected = m.load_state_dict(state, strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
            m.tie_weights()
            with torch.no_grad():
                return m(held_out).logits.double()

        def rel(x: torch.Tensor) -> float:
            return float(((x - ref) ** 2).sum() / (ref**2).sum())

        # 1. the fold alone keeps the float model
        fold = compute_fold(src, calib, args.format, int(args.block_size))
        floats = load_file(src / "model.safetensors")
        folded = {
            n: torch.from_numpy(np.ascontiguousarray(fold.fold(n, t.numpy())))
            for n, t in floats.items()
        }
        changed = sum(not torch.equal(folded[n], floats[n]) for n in floats)
        print(
            f"fold: {len(fold.scales)} groups scaled, alphas "
            f"{sorted(round(a, 2) for a in fold.alphas.values())}, skipped: "
            f"{sorted(set(fold.skipped.values())) or 'none'}; {changed} tensors changed"
        )
        e = rel(logits(folded))
        print(f"  folded float model vs float model: relative squared logit error {e:.2e}")
        ok = e < 1e-9

        def state_of(out: Path) -> dict:
            return {
                n: torch.from_numpy(
                    np.ascontiguousarray(
                        v.dequantize(np.float32) if isinstance(v, quantize.QuantizedTensor) else v
                    )
                )
                for n, v in quantize.load(out).items()
            }

        def show(label: str, rows: list[dict], err: float) -> None:
            q = [r for r in rows if r["quantized"]]
            size = sum(np.prod(r["shape"]) for r in q)
            bits = sum(r["bits_per_weight"] * np.prod(r["shape"]) for r in q) / size
            calib_err = sum(r["output_error"] for r in q) / len(q)
            calib_rtn = sum(r["output_error_rtn"] for r in q) / len(q)
            print(
                f"{label:>17}: held-out relative squared logit error {err:.4g}; mean per-layer "
                f"calibration output error {calib_err:.4g} (rtn {calib_rtn:.4g}); "
                f"{bits:.3f} bits/weight"
            )

        # 2. quantized: awq vs rtn, through the command
        errs, bits = {}, {}
        for method in ("rtn", "awq", "awq+gptq"):
            out = tmp / method.replace("+", "_")
            cmd = [
                sys.executable, "-m", "quantize", "safetensors", str(src), "-o", str(out),
                "--format", args.format, "--block-size", args.block_size, "--quiet",
                "--method", method, "--calib", str(calib),
            ]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            errs[method] = rel(logits(state_of(out)))
            report = json.loads((tmp / f"{out.name}.report.json").read_text())
            bits[method] = report["totals"]["bits_per_weight"]
            show(method, report["tensors"], errs[method])
        # without the clipping search (the scales-only fold), in process
        awq_fold.CLIP = False
        try:
            for method in ("awq", "awq+gptq"):
                out = tmp / ("noclip_" + method.replace("+", "_"))
                rows = quantize_safetensors(
                    src, out, format=args.format, block_size=int(args.block_size),
                    method=method, calib=calib,
                )  # fmt: skip
                errs[method + " no clip"] = rel(logits(state_of(out)))
                show(method + " no clip", rows, errs[method + " no clip"])
        finally:
            awq_fold.CLIP = True
        ok = ok and errs["awq"] < errs["rtn"]

        # 3. mixed precision on the folded weights
        target = bits["awq"] + args.extra_bits
        out = tmp / "awq_mixed"
        rows = quantize_safetensors(
            src, out, format=args.format, block_size=int(args.block_size), method="awq",
            calib=calib, target_bits=target,
        )  # fmt: skip
        err = rel(logits(state_of(out)))
        got = quantize.report.summarize(rows)["bits_per_weight"]
        choices = sorted({r["choice"] for r in rows if r["quantized"]})
        show(f"awq, B={target:g}", rows, err)
        print(f"  mixed: {got:.4f} bits/weight <= {target:g}; options used {choices}")
        ok = ok and got <= target and err <= errs["awq"]
        print("OK" if ok else "FAILED")
        return 0 if ok else 1


def capture_inputs(model, ids, rows: int = 4096) -> dict[str, np.ndarray]:
    """NAME.inputs for every Linear of the decoder layers, from one forward pass."""
    import torch

    xs: dict[str, list] = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in n:

            def f(module, a, out, name=n + ".weight"):
                xs.setdefault(name, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))

            hooks.append(m.register_forward_hook(f))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {k + ".inputs": torch.cat(v)[:rows].float().numpy() for k, v in xs.items()}


if __name__ == "__main__":
    raise SystemExit(main())
