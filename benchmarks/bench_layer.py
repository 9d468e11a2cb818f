"""One linear layer forward+backward at M tokens (bf16), the way training runs it: every trainable
gradient (and the input's) set to None before each step, so no call accumulates into an earlier one.

qatext's full QAT, LR-QAT, QA-LoRA and E2E-QP against the tools a user would pick instead, each
configured as its users configure it: a plain bf16 nn.Linear with a trainable weight; torchao QAT
(FakeQuantizedLinear, int4 g128, QATConfig's prepare step); PEFT LoRA r64 on a bf16 base with bf16
adapters (autocast_adapter_dtype=False: PEFT's default fp32 adapters would hold an fp32 copy of the
input); QLoRA (bitsandbytes NF4 base + PEFT LoRA r64, bf16 adapters and compute); and the pure-PyTorch
LR-QAT formulation (reference.py under torch.utils.checkpoint). A peer that is not installed is
listed under "skipped" with the reason. Time (CUDA events, median of rounds that each time every variant
once, after two seconds of them all running, so each sees the same GPU clocks), the host's time for one step
started on an idle GPU (the 7B steps are host-bound), and the memory the layer holds between forward
and backward (allocated after forward, less its output).

    python benchmarks/bench_layer.py --out benchmarks/results/layer_h200.json
    python benchmarks/bench_layer.py --profile --out layer_ops.json   # and where each variant's time goes
    python benchmarks/bench_layer.py --variants lrqat_int4 --also-tuning lrqat_rank_kernel=0   # an A/B in one run
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import qatext
from qatext import QuantSpec, reference
from qatext.nn import QuantLinear
import peers
import timing
from timing import cuda_time_interleaved_ms, peak_extra_mib

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


def trainable(fn) -> list[torch.Tensor]:
    return [p for p in getattr(fn, "parameters", lambda: [])() if p.requires_grad]


def step(fn, x, grad_y, knobs=None):
    """One training step's forward + backward, gradients set to None first (as optimizer.zero_grad does);
    with knobs, under those tuning knobs."""
    params = trainable(fn)

    def run():
        for p in params:
            p.grad = None
        x.grad = None
        fn(x).backward(grad_y)

    def run_tuned():
        with qatext.tuning(**knobs):
            run()
    return run_tuned if knobs else run


def peer_layers(k, n, dtype, weight):
    """The other tools' layers (benchmarks/peers.py), by name: a module, or why it could not be built."""
    def linear():
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
        return nn.Sequential(lin)

    builders = {"torchao_qat_int4_g128": lambda: peers.torchao_qat(linear()),
                "peft_lora_r64_bf16": lambda: peers.lora(linear(), ["0"]),
                "qlora_nf4_peft_r64_bf16": lambda: peers.lora(peers.nf4(linear()), ["0"])}
    out = {}
    for name, build in builders.items():
        try:
            out[name] = build()
        except ImportError as e:
            out[name] = f"not installed ({e.name})"
    return out


def variants(k, n, dtype):
    spec = QuantSpec(4, 128)
    base = nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
    out = {"bf16_linear": base}
    full = QuantLinear.from_linear(base, spec, "fake")
    for p in full.parameters():
        p.requires_grad_(True)  # full QAT trains the weight, its scales and zeros
    out["full_qat_int4_g128"] = full
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

    torch_lrqat.parameters = lr.parameters  # it trains the LR-QAT layer's adapters and scales
    out["torch_lrqat_int4_checkpointed"] = torch_lrqat
    qalora = QuantLinear.from_linear(base, spec, "qalora", rank=64, alpha=16.0)
    qalora.lora_a.requires_grad_(True), qalora.lora_b.requires_grad_(True)
    out["qalora_r64"] = qalora
    out["e2eqp"] = QuantLinear.from_linear(base, spec, "e2eqp")
    out.update(peer_layers(k, n, dtype, base.weight.detach()))
    return out


def main():
    parser = timing.parser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed rounds; each round times every variant once, in an order rotating by one")
    parser.add_argument("--profile", action="store_true",
                        help="also each variant's ops by device time per step (torch.profiler), in its row")
    parser.add_argument("--variants", default=None, metavar="NAME,...",
                        help="only these variants (default: all), e.g. lrqat_int4,qalora_r64; bf16_linear, the "
                        "reference of the time_vs_bf16_linear column, is always run")
    parser.add_argument("--also-tuning", default="", metavar="KNOB=VALUE,...",
                        help="also time each chosen variant but bf16_linear with these qatext knobs set around its "
                        "step, as NAME [KNOB=VALUE,...], in the same interleaved rounds: an A/B within one run")
    args = timing.start(parser)
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive number of rounds, got {args.repeats}")
    also = timing.knob_settings(parser, "--also-tuning", args.also_tuning)
    try:
        with qatext.tuning(**also):  # each value in its knob's range
            pass
    except ValueError as e:
        parser.error(f"--also-tuning: {e}")
    timing.require_gpu(parser)
    dtype = torch.bfloat16
    rows, skipped = [], []
    for k, n in LAYERS:
        x = torch.randn(args.tokens, k, device="cuda", dtype=dtype, requires_grad=True)
        grad_y = torch.randn(args.tokens, n, device="cuda", dtype=dtype)
        built = variants(k, n, dtype)
        wanted = list(built) if args.variants is None else ["bf16_linear", *args.variants.split(",")]
        if unknown := [name for name in wanted if name not in built]:
            parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(built)}")
        runs, settings = {}, {}  # by row name: the step, and (variant, knobs)
        for name, fn in built.items():
            if name not in wanted:
                continue
            if isinstance(fn, str):
                skipped.append({"layer": f"{k}->{n}", "variant": name, "reason": fn})
                print(f"{k}->{n} {name:32s} skipped: {fn}", flush=True)
                continue
            for row_name, knobs in [(name, {})] + ([(f"{name} [{args.also_tuning}]", also)]
                                                   if also and name != "bf16_linear" else []):
                runs[row_name], settings[row_name] = step(fn, x, grad_y, knobs), (name, knobs)
        times = cuda_time_interleaved_ms(runs, warmup=3, repeats=args.repeats, inner=3)
        for name, run in runs.items():
            (variant, knobs), ms = settings[name], times[name]
            fn = built[variant]
            with qatext.tuning(**knobs):
                held = held_mib(fn, x)
            row = {"layer": f"{k}->{n}", "M": args.tokens, "variant": name, "tuning": knobs, "fwd_bwd_ms": ms,
                   "host_us": timing.host_time_us(run),  # what a host-bound step pays for this layer
                   "held_for_backward_MiB": held, "step_peak_extra_MiB": peak_extra_mib(run),
                   "weight_NxK_bf16_MiB": n * k * 2 / 2**20}
            if args.profile:
                row["ops"] = timing.profile_ops(run)
            rows.append(row)
            print(f"{k}->{n} {name:32s} {ms * 1e3:8.0f} us (host {row['host_us']:5.0f} us)  "
                  f"held {row['held_for_backward_MiB']:7.1f} MiB  "
                  f"peak +{row['step_peak_extra_MiB']:7.1f} MiB", flush=True)
        base = next(r["fwd_bwd_ms"] for r in rows if r["layer"] == f"{k}->{n}" and r["variant"] == "bf16_linear")
        for r in rows:
            if r["layer"] == f"{k}->{n}":
                r["time_vs_bf16_linear"] = r["fwd_bwd_ms"] / base
    timing.save_rows(args.out, rows, skipped=skipped)


if __name__ == "__main__":
    main()
