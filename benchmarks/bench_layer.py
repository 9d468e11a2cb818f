"""One linear layer forward+backward at M tokens (bf16): LR-QAT, QA-LoRA and E2E-QP in qatext against
a plain bf16 nn.Linear with a trainable weight, the pure-PyTorch LR-QAT formulation (reference.py under
torch.utils.checkpoint) and PEFT LoRA on a bf16 base. Time (CUDA events, median) and the memory the
layer holds between forward and backward (allocated after forward, less its output).

    python benchmarks/bench_layer.py --out benchmarks/results/layer_h100.json
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qatext import QuantSpec, reference
from qatext.nn import QuantLinear
import timing
from timing import cuda_time_ms, peak_extra_mib

LAYERS = [(4096, 11008), (11008, 4096)]  # (in, out)


def held_mib(fn, x):
    """MiB that fn(x)'s autograd graph holds between forward and backward, less the output."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    y = fn(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
    y.float().sum().backward()
    return held / 2**20


def step(fn, x, grad_y):
    def run():
        fn(x).backward(grad_y)
    return run


def variants(k, n, dtype):
    spec = QuantSpec(4, 128)
    base = nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
    out = {"bf16_linear": base}
    for name, frac in (("lrqat_int4", 0), ("lrqat_q4.4", 4)):
        layer = QuantLinear.from_linear(base, spec, "lrqat", rank=32, alpha=32.0, frac_bits=frac)
        with torch.no_grad():
            layer.lora_a.normal_(0, 0.02)  # a trained adapter, not the zero init
        out[name] = layer
    lr = out["lrqat_int4"]

    def torch_lrqat(x):
        def f(x):
            w = reference.lrqat_weight(lr.p, lr.lora_a, lr.lora_b, lr.scale, lr.zero, lr.lora_scale, 4, 128, 0)
            return F.linear(x, w.to(x.dtype))
        return checkpoint(f, x, use_reentrant=False)

    out["torch_lrqat_int4_checkpointed"] = torch_lrqat
    qalora = QuantLinear.from_linear(base, spec, "qalora", rank=64, alpha=16.0)
    qalora.lora_a.requires_grad_(True), qalora.lora_b.requires_grad_(True)
    out["qalora_r64"] = qalora
    out["e2eqp"] = QuantLinear.from_linear(base, spec, "e2eqp")
    try:
        from peft import LoraConfig, get_peft_model
        wrapper = nn.Sequential(nn.Linear(k, n, bias=False, device="cuda", dtype=dtype))
        peft_model = get_peft_model(wrapper, LoraConfig(r=64, lora_alpha=16, target_modules=["0"]))
        out["peft_lora_r64_bf16_base"] = peft_model
    except ImportError:
        pass
    return out


def main():
    parser = timing.parser()
    parser.add_argument("--tokens", type=int, default=4096)
    args = timing.start(parser)
    dtype = torch.bfloat16
    rows = []
    for k, n in LAYERS:
        x = torch.randn(args.tokens, k, device="cuda", dtype=dtype, requires_grad=True)
        grad_y = torch.randn(args.tokens, n, device="cuda", dtype=dtype)
        for name, fn in variants(k, n, dtype).items():
            for p in getattr(fn, "parameters", lambda: [])():
                p.grad = None
            run = step(fn, x, grad_y)
            ms = cuda_time_ms(run, warmup=3, repeats=10, inner=3)
            row = {"layer": f"{k}->{n}", "M": args.tokens, "variant": name, "fwd_bwd_ms": ms,
                   "held_for_backward_MiB": held_mib(fn, x), "step_peak_extra_MiB": peak_extra_mib(run),
                   "weight_NxK_bf16_MiB": n * k * 2 / 2**20}
            rows.append(row)
            print(f"{k}->{n} {name:32s} {ms * 1e3:8.0f} us  held {row['held_for_backward_MiB']:7.1f} MiB  "
                  f"peak +{row['step_peak_extra_MiB']:7.1f} MiB", flush=True)
        base = next(r["fwd_bwd_ms"] for r in rows if r["layer"] == f"{k}->{n}" and r["variant"] == "bf16_linear")
        for r in rows:
            if r["layer"] == f"{k}->{n}":
                r["time_vs_bf16_linear"] = r["fwd_bwd_ms"] / base
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
