"""Every method x export format x bits: train a tiny Llama briefly, merge, export, load the export with
the third-party loader (GPTQ: transformers + optimum + gptqmodel's torch kernel; HQQ: the hqq library)
and compare its logits with qatext's own model. QA-LoRA also reports held-out perplexity trained vs
exported, and what rounding its zeros (the only way into GPTQ) does. CPU; needs the `export` extra.

    python benchmarks/export_roundtrip.py --out benchmarks/results/export_roundtrip_cpu.json
    python benchmarks/export_roundtrip.py --families --out benchmarks/results/export_families_cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch
import transformers

from qatext import QuantSpec, data, evaluate, export_model, load_quantized, methods, models, save_quantized
from qatext.export import round_zeros

FAST = {"full_qat": dict(lr=3e-3, quant_lr=1e-3), "lrqat": dict(rank=8, lr=1e-2, scale_lr=1e-3),
        "qalora": dict(rank=8, lr=1e-2), "efficientqat": dict(e2e_lr=1e-2, block_ap_kwargs=dict(
            n_samples=8, batch_size=4, epochs=1, quant_lr=1e-3, weight_lr=1e-3, progress=False))}


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg)


def train(method, bits, tokens, steps, **overrides):
    model = tiny_llama(1)
    cfg = methods.default_config(method, steps=steps, batch_size=4, seq_len=64, progress=False)
    kwargs = {**FAST.get(method, {}), **overrides}
    model, _ = methods.run(method, model, QuantSpec(bits, 32, method == "lrqat"), tokens, cfg, **kwargs)
    return models.merge_model(model).eval()


def load(fmt, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "hqq":
            from hqq.models.hf.base import AutoHQQHFModel

            return AutoHQQHFModel.from_quantized(str(path), compute_dtype=torch.float32, device="cpu")
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map="cpu",
            quantization_config=transformers.GPTQConfig(bits=4, backend="torch"))


# Families whose layers differ from Llama's (biases, q/k norms, fused projections, other block names).
FAMILIES = {"LlamaConfig": dict(tie_word_embeddings=True), "MistralConfig": {}, "Qwen2Config": {}, "Qwen3Config": {},
            "Gemma2Config": dict(head_dim=16), "Gemma3TextConfig": dict(head_dim=16), "Phi3Config": {},
            "PhiConfig": {}, "OlmoConfig": {}, "Olmo2Config": {}, "GraniteConfig": {}, "StableLmConfig": {},
            "CohereConfig": {}, "GPTNeoXConfig": {}, "OPTConfig": dict(ffn_dim=128, word_embed_proj_dim=64),
            "FalconConfig": dict(new_decoder_architecture=True)}


@torch.no_grad()
def families(tmp: Path, x: torch.Tensor) -> list[dict]:
    """RTN W4 g32 on a tiny random model of each family: saved, loaded, exported, read back by each loader."""
    rows = []
    for arch, extra in FAMILIES.items():
        torch.manual_seed(0)
        cfg = getattr(transformers, arch)(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                          pad_token_id=None, bos_token_id=None, eos_token_id=None, **extra)
        model = models.merge_model(models.quantize_model(transformers.AutoModelForCausalLM.from_config(cfg),
                                                         QuantSpec(4, 32)))
        save_quantized(model, tmp / arch, overwrite=True)
        model = load_quantized(tmp / arch)
        ours = model(input_ids=x).logits
        for fmt in ("gptq", "hqq"):
            try:
                result = export_model(model, tmp / f"{arch}-{fmt}", format=fmt, overwrite=True)
            except ValueError as e:
                rows.append(dict(family=arch, format=fmt, exported=False, why=str(e)[:160]))
            else:
                theirs = load(fmt, result["path"])(input_ids=x).logits
                rows.append(dict(family=arch, format=fmt, exported=True, max_logit_diff=(theirs - ours).abs().max().item(),
                                 max_logit=ours.abs().max().item()))
            print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/export_roundtrip_cpu.json")
    ap.add_argument("--families", action="store_true", help="only the model families (RTN W4), into --out")
    args = ap.parse_args()
    tokens = data.ByteTokenizer().encode(data.load_kjv()[:300_000])
    train_tokens, val = data.train_val_split(tokens)
    x = val[:129].unsqueeze(0)
    if args.families:
        with tempfile.TemporaryDirectory() as tmp:
            rows = families(Path(tmp), x)
        Path(args.out).write_text(json.dumps({"model": "2 layers, hidden 64, random init; RTN W4 g32", "families": rows,
                                              "transformers": transformers.__version__, "torch": torch.__version__},
                                             indent=1))
        print(f"wrote {args.out}")
        return
    rows, qalora_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method in ("rtn", "full_qat", "lrqat", "qalora", "efficientqat"):
            for bits in (2, 3, 4, 8):
                with torch.enable_grad():
                    model = train(method, bits, train_tokens, args.steps)
                save_quantized(model, tmp / "saved", overwrite=True)
                model = load_quantized(tmp / "saved")
                ours = model(input_ids=x).logits
                for fmt in ("gptq", "hqq"):
                    try:
                        result = export_model(model, tmp / fmt, format=fmt, overwrite=True)
                    except ValueError as e:
                        rows.append(dict(method=method, bits=bits, format=fmt, exported=False, why=str(e)[:90]))
                        continue
                    loaded = load(fmt, result["path"])
                    theirs = loaded(input_ids=x).logits
                    rows.append(dict(method=method, bits=bits, format=fmt, exported=True,
                                     loader=type(loaded.model.layers[0].mlp.up_proj).__name__,
                                     max_logit_diff=(theirs - ours).abs().max().item(),
                                     max_logit=ours.abs().max().item()))
                    print(rows[-1], flush=True)
        for lr in (2e-4, 2e-3):
            with torch.enable_grad():
                rtn = train("rtn", 4, train_tokens, 1)
                model = train("qalora", 4, train_tokens, 40, lr=lr)
            rtn_zero = torch.cat([m.zero.flatten() for _, m in models.quant_layers(rtn)])
            zero = torch.cat([m.zero.flatten() for _, m in models.quant_layers(model)])

            def ppl(m):
                return evaluate.perplexity(m, val, seq_len=128, max_windows=64, progress=False)["ppl"]

            trained = ppl(model)
            result = export_model(model, tmp / "auto", overwrite=True)
            exported = ppl(load(result["format"], result["path"]))
            round_zeros(model)
            export_model(model, tmp / "rounded", format="gptq", overwrite=True)
            rounded = ppl(load("gptq", tmp / "rounded"))
            qalora_rows.append(dict(lr=lr, auto_format=result["format"], ppl_trained=trained, ppl_exported=exported,
                                    ppl_rtn=ppl(rtn), ppl_gptq_rounded_zeros=rounded,
                                    rounded_zero_equals_rtn=float((torch.round(zero) == rtn_zero).float().mean())))
            print(qalora_rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": "Llama 2 layers, hidden 128, byte tokens; g32 (lrqat symmetric)",
                                          "steps": args.steps, "transformers": transformers.__version__,
                                          "torch": torch.__version__, "roundtrip": rows, "qalora": qalora_rows},
                                         indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
