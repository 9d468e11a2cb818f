"""The host calls of one mixture-of-experts block (Qwen3-MoE experts, one ExpertList), counted, for each of
qatext's modes: the op calls Python makes ("top-level": each a Python-to-C++ dispatch and, on CUDA, most a
launch; what binds a host-bound step) and all ATen / qatext calls (those inside ops too). Training modes run
forward and backward with the gradients set to None first, as training does; packed runs a no-grad forward.
No GPU needed: the counts are the host's work whatever runs the kernels (on a CPU, "all" also holds the CPU
grouped GEMM's per-expert loop, which is one kernel on CUDA).

    python benchmarks/moe_host_calls.py --out benchmarks/results/moe_host_calls_cpu.json
"""

from __future__ import annotations

import torch

from qatext import QuantSpec, quantize_model
import timing

MODES = ("lrqat", "qalora", "e2eqp", "packed")


def block(mode: str, experts: int, hidden: int, inter: int, group: int, rank: int, device):
    """One Qwen3-MoE block's ExpertList in `mode` (bf16)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=hidden, moe_intermediate_size=inter, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                         num_experts=experts, num_experts_per_tok=min(8, experts))
    model = AutoModelForCausalLM.from_config(cfg).to(device, torch.bfloat16)
    quantize_model(model, QuantSpec(4, group), method=mode, **({"rank": rank} if mode in ("lrqat", "qalora") else {}))
    return model.model.layers[0].mlp.experts


def calls(fn) -> tuple[int, int]:
    """(top-level, all) ATen / qatext op calls of one fn() after two warm-up calls."""
    from torch.profiler import ProfilerActivity, profile

    fn(), fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [e for e in prof.events() if e.name.startswith(("aten::", "qatext::"))]
    top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith(("aten::", "qatext::"))]
    return len(top), len(ops)


def main():
    p = timing.parser(__doc__)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--inter", type=int, default=64)
    p.add_argument("--loop", action="store_true", help="the experts one after another (ExpertList.grouped = False)")
    args = timing.start(p)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for mode in MODES:
        experts = block(mode, args.experts, args.hidden, args.inter, group=32, rank=8, device=device)
        experts.grouped = not args.loop
        x = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16)
        top_k = min(8, args.experts)
        index = torch.stack([torch.randperm(args.experts)[:top_k] for _ in range(args.tokens)]).to(device)
        weights = torch.rand(args.tokens, top_k, device=device, dtype=torch.bfloat16)
        trained = [q for q in experts.parameters() if q.requires_grad]

        def step():
            if not trained:
                with torch.no_grad():
                    experts(x, index, weights)
                return
            for q in trained:
                q.grad = None
            experts(x.detach().requires_grad_(), index, weights).float().sum().backward()

        top, every = calls(step)
        rows.append({"mode": mode, "backward": bool(trained), "trained_tensors": len(trained), "top_level_calls": top,
                     "all_calls": every})
    timing.emit({"device": device, "experts": args.experts, "tokens": args.tokens, "hidden": args.hidden,
                 "inter": args.inter, "grouped": not args.loop, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
