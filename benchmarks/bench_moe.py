"""Mixture-of-experts inference: a Qwen3-30B-A3B-shaped model (benchmarks/moe_shape.py; --layers of
its 48) as qatext leaves it after merging (W4 g128 packed experts, tiled for decode), its experts on the
grouped decode kernel over the chosen experts up to 16 pairs an expert (nn.expert_decode), then grouped GEMMs
over their stacked weights (nn.grouped_experts): the default; grouped GEMMs at every count; and one after another
(the loop, with the decode kernels), against the same model in bf16 with transformers' own experts
(grouped_mm: one grouped GEMM a projection; eager: its loop) and with qatext's expert loop over bf16
experts (the loop's own cost), in one run.
One eager forward of M tokens (batch 1, no cache): wall-clock milliseconds, host included (the
per-expert loop is host work), the median of --repeats after warm-up, and the GPU time of the same
calls. The floor of a forward at small M is one read of the chosen experts' weights.

    python benchmarks/bench_moe.py --layers 8 --out benchmarks/results/moe_h200.json
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from qatext import QuantSpec, methods, models
from qatext.nn.experts import ExpertList, unfuse_experts
import timing
from bench_generate import model_bytes
from moe_shape import qwen3_30b_a3b

VARIANTS = ("bf16 grouped_mm", "bf16 eager", "bf16 per expert", "qatext W4 g128", "qatext W4 g128 grouped_mm",
            "qatext W4 g128 loop")
# ExpertList.grouped of each qatext variant: None the default (the grouped decode kernel up to its pairs an expert,
# grouped GEMMs beyond), True the grouped GEMMs on dequantised stacks, False the loop.
GROUPED = {"qatext W4 g128": None, "qatext W4 g128 grouped_mm": True, "qatext W4 g128 loop": False}


def forward_ms(model, tokens: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(wall ms, GPU ms) of one forward: medians over `repeats` after two warm-up calls."""
    walls, gpus = [], []
    with torch.no_grad():
        for i in range(repeats + 2):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            model(input_ids=tokens, use_cache=False)
            end.record()
            end.synchronize()
            if i >= 2:
                walls.append((time.perf_counter() - t0) * 1e3)
                gpus.append(start.elapsed_time(end))
    return statistics.median(walls), statistics.median(gpus)


def main():
    p = timing.parser(__doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128, 1024])
    p.add_argument("--repeats", type=int, default=5)
    args = timing.start(p)
    timing.require_gpu(p)
    base = qwen3_30b_a3b(args.layers)
    rows = []
    for name in VARIANTS:
        if name in ("bf16 grouped_mm", "bf16 eager"):
            model = base
            model.set_experts_implementation(name.removeprefix("bf16 "))
        elif name == "bf16 per expert":  # qatext's loop (nn.experts.ExpertList) over bf16 nn.Linear experts
            model = copy.deepcopy(base)
            unfuse_experts(model)
        else:
            model = methods.rtn(copy.deepcopy(base), QuantSpec(4, 128, False))
            models.tile_for_decode(model)
        for experts in model.modules():
            if isinstance(experts, ExpertList):
                experts.grouped = GROUPED.get(name)
        for m in args.tokens:
            tokens = torch.randint(0, model.config.vocab_size, (1, m), device="cuda")
            wall, gpu = forward_ms(model, tokens, args.repeats)
            rows.append({"variant": name, "M": m, "wall_ms": wall, "gpu_ms": gpu, "layers": args.layers,
                         "experts_implementation": model.config._experts_implementation,
                         "model_GB": model_bytes(model) / 1e9})
            print(f"{name:16s} M={m:5d}: {wall:8.2f} ms wall, {gpu:8.2f} ms GPU", flush=True)
        if model is not base:
            del model
            torch.cuda.empty_cache()
    for row in rows:
        ref = next(r for r in rows if r["variant"] == "bf16 grouped_mm" and r["M"] == row["M"])
        row["speed_vs_bf16_grouped_mm"] = ref["wall_ms"] / row["wall_ms"]
    timing.save_rows(args.out, rows)


if __name__ == "__main__":
    main()
