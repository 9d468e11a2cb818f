"""End-to-end generation: a LLaMA-2-7B-shaped model (random init, no weights here) as qatext leaves it
after merging (W4 g128, W3 g128, W2 g64 packed layers, tiled for decode), against the same model in
bf16 and with bitsandbytes NF4 weights (benchmarks/peers.py), in one run. Greedy decoding with a
static KV cache (Generator: the prefill eagerly, each decode step one torch.compile'd call, fullgraph
so a graph break fails loudly, mode reduce-overhead: CUDA graphs), a 512-token prompt, 128 new
tokens, batch 1 and 8. Reported: time to first token (prefill + one step), decode tokens/s (per
sequence and in all), peak memory, the weights' bytes, and whether the compiled step decodes the
eager step's first token.

    python benchmarks/bench_generate.py --out benchmarks/results/generate_h200.json
    python benchmarks/bench_generate.py --variants "qatext W4 g128" --batches 1   # a part of the run
    python benchmarks/bench_generate.py --batches 1 --variants "qatext W4 g128" \
        --also-tuning decode_gemm_min_slice=4   # each qatext row again under other knobs, same run
    python benchmarks/bench_generate.py --tiny --device cpu --backend eager   # the code paths, in seconds
    python benchmarks/bench_generate.py --moe-layers 8 --variants "qatext W4 g128" --batches 1,8  # Qwen3-30B-A3B
"""

from __future__ import annotations

import copy
import json
import time

import torch

import qatext
from qatext import QuantSpec, methods, models
import peers
import timing

CONFIGS = {"W4 g128": QuantSpec(4, 128, False), "W3 g128": QuantSpec(3, 128, False), "W2 g64": QuantSpec(2, 64, False)}


def build_model(tiny: bool, device, moe_layers: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    if moe_layers:  # Qwen3-30B-A3B-shaped, its experts as transformers' grouped_mm runs them (bf16 under compile)
        from moe_shape import qwen3_30b_a3b

        model = qwen3_30b_a3b(moe_layers, device)
        model.set_experts_implementation("grouped_mm")
        return model.eval()
    if tiny:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=1024, max_position_embeddings=1024)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


VARIANTS = ("bf16", "bitsandbytes NF4") + tuple(f"qatext {name}" for name in CONFIGS)


def variants(base, wanted):
    """(name, model) pairs in `wanted` (VARIANTS' order: the peers first, so a run stopped at its time
    limit still has them), built one at a time from the bf16 base, which waits in host memory while a
    variant is measured: each variant's peak memory is its own."""
    device = next(base.parameters()).device
    for name in (v for v in VARIANTS if v in wanted):
        if name == "bf16":
            yield name, base
            continue
        if name == "bitsandbytes NF4":
            try:
                model = peers.nf4(copy.deepcopy(base))
            except ImportError as e:
                yield name, f"not installed ({e.name})"
                continue
        else:
            model = methods.rtn(copy.deepcopy(base), CONFIGS[name.removeprefix("qatext ")])  # as merge_model leaves it
            models.tile_for_decode(model)
        base.to("cpu")
        yield name, model
        base.to(device)


def model_bytes(model) -> int:
    """What the model holds (parameters and buffers, a decode copy included), each storage once: a
    layer's tiled codes are a view of its shared-input group's."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


class Generator:
    """Greedy generation with a static KV cache, the way gpt-fast and transformers' static-cache guide
    run it: the prefill eagerly, each decode step one compiled call (torch.compile, mode
    reduce-overhead: CUDA graphs) that reads the cache in place. One cache per batch shape, reset
    between runs, so the graphs are captured once and replayed."""

    def __init__(self, model, backend: str | None):
        """backend: None (eager), "inductor" (fused kernels in CUDA graphs, ~100 s to compile a 7B model)
        or "cudagraphs" (the eager kernels captured in CUDA graphs: seconds to compile)."""
        self.model, self.caches, self.step = model, {}, self._step
        if backend:
            torch._dynamo.reset()  # a fresh compile per model: the recompile limit counts across models
            options = {"mode": "reduce-overhead"} if backend == "inductor" else {"backend": backend}
            self.step = torch.compile(self._step, fullgraph=True, **options)

    def _step(self, token, position, cache):
        logits = self.model(input_ids=token, cache_position=position, past_key_values=cache, use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()  # as transformers' generate runs
    def __call__(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        from transformers import StaticCache

        batch, length = prompt.shape
        key = (batch, length + new_tokens)
        if key not in self.caches:
            self.caches[key] = StaticCache(config=self.model.config, max_cache_len=length + new_tokens)
        cache = self.caches[key]
        cache.reset()
        positions = torch.arange(length + new_tokens, device=prompt.device)
        token = self._step(prompt, positions[:length], cache)
        out = [token]
        for i in range(length, length + new_tokens - 1):
            torch.compiler.cudagraph_mark_step_begin()
            token = self.step(token, positions[i:i + 1], cache).clone()  # the graph's output is overwritten next step
            out.append(token)
        return torch.cat(out, dim=1)


def timed_generate(generate: Generator, prompt, new_tokens: int, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    generate(prompt, new_tokens)
    sync()
    return time.perf_counter() - t0


def measure(model, batch: int, prompt_len: int, new_tokens: int, backend: str | None, device, repeats: int,
            profile_rows: int = 0) -> dict:
    from torch._dynamo.utils import counters

    generate = Generator(model, backend)
    prompt = torch.randint(1, model.config.vocab_size, (batch, prompt_len), device=device)
    skips = counters["inductor"]["cudagraph_skips"]  # (both backends count a graph they would not capture)
    for _ in range(2):  # compile, capture the graphs, warm the caches
        timed_generate(generate, prompt, new_tokens, device)
    skips = counters["inductor"]["cudagraph_skips"] - skips
    # The compiled step decodes what the eager forward does: the first decoded token of every sequence
    # (later ones diverge at the first near-tie of a random-init model, so whole sequences say little).
    same = (generate(prompt, 2)[:, 1] == Generator(model, None)(prompt, 2)[:, 1]).float().mean().item()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = sorted(timed_generate(generate, prompt, 1, device) for _ in range(repeats))[repeats // 2]
    full = sorted(timed_generate(generate, prompt, new_tokens, device) for _ in range(repeats))[repeats // 2]
    per_token = (full - first) / (new_tokens - 1)
    return {"batch": batch, "prompt": prompt_len, "new_tokens": new_tokens, "time_to_first_token_s": first,
            "decode_tokens_per_s": 1 / per_token, "decode_tokens_per_s_all_sequences": batch / per_token,
            "peak_GB": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
            "first_token_same_as_eager": same, "model_GB": model_bytes(model) / 1e9,
            # > 0: a decode step ran outside CUDA graphs (the reason is in the log), so its tokens/s are not a
            # graph's
            "cudagraph_skips": skips,
            # one whole generate (its prefill included) by op: where a variant's time per token goes
            **({"ops_per_generate": timing.profile_ops(lambda: generate(prompt, new_tokens), steps=1,
                                                       rows=profile_rows)}
               if profile_rows else {})}


def main():
    p = timing.parser(__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the code paths quickly")
    p.add_argument("--backend", default="inductor", choices=("inductor", "cudagraphs", "eager"),
                   help="the decode step: compiled by inductor (fused kernels, in CUDA graphs), its eager kernels "
                   "in CUDA graphs (cudagraphs: far faster to compile), or eager (no compile, no graphs)")
    p.add_argument("--moe-layers", type=int, default=0, metavar="N",
                   help="a Qwen3-30B-A3B-shaped mixture of experts (benchmarks/moe_shape.py), N of its 48 layers, in "
                   "place of the LLaMA-2-7B shape (its bf16 experts on transformers' grouped_mm; NF4 does not take "
                   "stacked experts)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of: " + ", ".join(VARIANTS) + " (each compiles for ~100 s on a 7B "
                   "model, so a time-limited run can take them in parts); bf16 is always run, as the reference")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--also-tuning", default="", metavar="KNOB=VALUE,...",
                   help="measure each qatext variant again with these knobs (compiled anew), as a row of its own; "
                   "such a second compile of one model ran slow once and decoded another first token (NOTES, SwiGLU "
                   "section): for an A/B, run each setting in its own process with --tuning")
    p.add_argument("--profile", type=int, nargs="?", const=30, default=0, metavar="ROWS",
                   help="also each row's ROWS most costly ops (30 when not given) by device time over one generate "
                   "(torch.profiler), in the row; a row timed after a profiled one has run slow (W4 3.08 against "
                   "2.61 ms a token), so take tokens/s from a run without it")
    args = timing.start(p)
    wanted = {v.strip() for v in args.variants.split(",")} | {"bf16"}
    if unknown := wanted - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(unknown)}; expected a comma-separated subset of {', '.join(VARIANTS)}")
    also = timing.knob_settings(p, "--also-tuning", args.also_tuning)
    try:
        with qatext.tuning(**also):  # each value in its knob's range, before any model is built
            pass
    except ValueError as e:
        p.error(f"--also-tuning: {e}")
    backend = None if args.backend == "eager" else args.backend
    device = torch.device(args.device)
    base = build_model(args.tiny, device, args.moe_layers)
    rows, skipped = [], []
    if args.moe_layers and "bitsandbytes NF4" in wanted:  # (its Linear4bit takes no 3-D stacked experts)
        wanted.discard("bitsandbytes NF4")
        skipped.append({"variant": "bitsandbytes NF4", "reason": "no NF4 form of transformers' stacked experts"})

    def save():  # after every row: a run stopped at its time limit keeps what it measured
        for row in rows:
            bf16 = next((r for r in rows if r["variant"] == "bf16" and r["batch"] == row["batch"]), None)
            row["decode_speed_vs_bf16"] = bf16 and row["decode_tokens_per_s"] / bf16["decode_tokens_per_s"]
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           "model": (f"Qwen3-30B-A3B shape, {args.moe_layers} of 48 layers" if args.moe_layers else
                                     "tiny LLaMA" if args.tiny else "LLaMA-2-7B shape"),
                           "torch": torch.__version__, "backend": args.backend, "tuning": qatext.get_tuning(),
                           "rows": rows, "skipped": skipped},
                          f, indent=1)

    for name, model in variants(base, wanted):
        if isinstance(model, str):
            skipped.append({"variant": name, "reason": model})
            print(f"{name}: skipped, {model}", flush=True)
            continue
        settings = [(name, {})] + ([(f"{name} [{args.also_tuning}]", also)] if also and name.startswith("qatext") else [])
        for label, knobs in settings:
            for batch in (int(b) for b in args.batches.split(",")):
                try:
                    with qatext.tuning(**knobs):
                        row = {"variant": label, "tuning": knobs, **measure(
                            model, batch, args.prompt, args.new_tokens, backend, device, args.repeats, args.profile)}
                except Exception as e:  # noqa: BLE001 (a peer that cannot run this way is reported, not fatal)
                    skipped.append({"variant": label, "batch": batch, "reason": f"{type(e).__name__}: {e}"[:500]})
                    print(f"{label} batch {batch}: failed, {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append(row)
                print(f"{label:18s} batch {batch}: first token {row['time_to_first_token_s'] * 1e3:7.1f} ms, "
                      f"{row['decode_tokens_per_s']:7.1f} tokens/s per sequence, peak {row['peak_GB']} GB"
                      + (f", CUDA graphs skipped {row['cudagraph_skips']}x" if row["cudagraph_skips"] else ""),
                      flush=True)
                save()
        if model is not base:
            del model
            torch.cuda.empty_cache() if device.type == "cuda" else None
    save()


if __name__ == "__main__":
    main()
