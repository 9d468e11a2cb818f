"""One training step of a LLaMA-2-7B-shaped model (transformers config, random init, bf16; or with
--model qwen3_moe a Qwen3-30B-A3B-shaped mixture of experts, benchmarks/moe_shape.py), seq 1024,
batch 1, for one method: peak GPU memory and tokens/s. qatext's methods and the tools a user would
pick instead (benchmarks/peers.py): a bf16 full fine-tune, PEFT LoRA r64 with bf16 adapters, QLoRA
(bitsandbytes NF4 + PEFT) and torchao QAT (int4 g128 fake quantization, full fine-tune). Full
fine-tunes (bf16, torchao, qatext's full QAT) use gradient checkpointing, as their users do to fit.
Run once per method (fresh process, clean peak; --compile runs every method's decoder layers compiled):

    for m in lrqat lrqat_q44 qalora e2eqp full_qat bf16_ft peft_lora qlora torchao_qat; do
        python benchmarks/bench_step.py --method $m --out step_$m.json; done
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import qatext
from qatext import QuantSpec, methods, models
from qatext.evaluate import causal_lm_loss
from qatext.methods.common import layer_params
from qatext.nn.experts import ExpertList, is_stacked_experts
from qatext.train import train
import peers
from llama7b import llama_7b
from moe_shape import qwen3_30b_a3b
from timing import StepClock, emit

# method -> (QuantLinear mode, layer options, trained parameter names, learning rate)
SETUPS = {
    "lrqat": ("lrqat", dict(rank=32, alpha=32.0), ("lora_a", "lora_b", "scale"), 1e-4),
    "lrqat_q44": ("lrqat", dict(rank=32, alpha=32.0, frac_bits=4), ("lora_a", "lora_b", "scale"), 1e-4),
    "qalora": ("qalora", dict(rank=64, alpha=16.0), ("lora_a", "lora_b"), 1e-4),
    "e2eqp": ("e2eqp", {}, ("scale",), 1e-5),
    "full_qat": ("fake", {}, ("weight", "scale", "zero"), 1e-5),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# transformers' stacked experts (PEFT's target_parameters), which qatext's methods quantize per expert
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# peer -> (build the trained model from the bf16 one, learning rate, the recipe whose optimiser settings it takes)
PEERS = {
    "bf16_ft": (lambda m: m, 1e-5, "full_qat"),
    "torchao_qat": (peers.torchao_qat, 1e-5, "full_qat"),
    "peft_lora": (lambda m: peers.lora(m, LORA_TARGETS, EXPERT_PARAMETERS if has_stacked_experts(m) else None), 1e-4,
                  "qalora"),
    "qlora": (lambda m: peers.lora(peers.nf4(m), LORA_TARGETS), 1e-4, "qalora"),
}
MODELS = {"llama7b": llama_7b, "qwen3_moe": qwen3_30b_a3b}
FULL_FINE_TUNES = ("full_qat", "bf16_ft", "torchao_qat")
METHODS = sorted(SETUPS) + sorted(PEERS)


def has_stacked_experts(model) -> bool:
    return any(is_stacked_experts(m) for m in model.modules())


def build(method: str, layers: int = 32, device="cuda", shape: str = "llama7b"):
    """(model, trained parameters, recipe, lr) of `method` on the `shape` model (MODELS), as a user trains it."""
    model = MODELS[shape](layers, device)
    if method in SETUPS:
        mode, options, trained, lr = SETUPS[method]
        models.quantize_model(model, QuantSpec(4, 128), method=mode, init="minmax", **options)
        recipe = {"lrqat": "lrqat", "fake": "full_qat", "qalora": "qalora", "e2eqp": "efficientqat"}[mode]
    else:
        make, lr, recipe = PEERS[method]
        model = make(model)
    if method in FULL_FINE_TUNES:
        model.gradient_checkpointing_enable()
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
    elif method in SETUPS:
        params = layer_params(model, trained)
    else:  # PEFT marks its adapters trainable
        params = [p for p in model.parameters() if p.requires_grad]
    return model, params, recipe, lr


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", choices=sorted(MODELS), default="llama7b")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--compile", action="store_true",
                        help="decoder layers as torch.compile'd graphs (TrainConfig.compile), for every method")
    parser.add_argument("--compile-mode", default=None, choices=("reduce-overhead", "max-autotune"),
                        help="with --compile: the layers compiled in this torch.compile mode instead of the default "
                        "(reduce-overhead: in CUDA graphs, forward and backward; an experiment, not a train option)")
    parser.add_argument("--experts-loop", action="store_true",
                        help="qatext's experts one after another (ExpertList.grouped = False), not as grouped GEMMs")
    args = parser.parse_args()
    if args.experts_loop:
        ExpertList.grouped = False
    qatext.set_value_checks(False)
    model, params, recipe, lr = build(args.method, args.layers, shape=args.model)
    tokens = torch.randint(0, model.config.vocab_size, (1_000_000,))
    clock = StepClock(causal_lm_loss)

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    by_mode = args.compile and args.compile_mode is not None
    tcfg = methods.default_config(recipe, steps=args.steps, batch_size=1, seq_len=args.seq_len, progress=False,
                                  compile=args.compile and not by_mode)
    # The same layer wrapping as TrainConfig.compile, in another torch.compile mode.
    compiled = models.compiled_layers(model, mode=args.compile_mode) if by_mode else contextlib.nullcontext()
    with compiled:
        history = train(model, [{"params": params, "lr": lr}], tokens, tcfg, loss_fn=clock)
    step_s = clock.seconds_per_step(warmup=2)
    forward_host_ms, forward_gpu_ms = clock.forward_host_and_gpu_ms(warmup=2)
    result = {"method": args.method, "model": args.model, "device": torch.cuda.get_device_name(), "layers": args.layers,
              "seq_len": args.seq_len, "compiled": args.compile, "compile_mode": args.compile_mode, "step_s": step_s,
              "tokens_per_s": args.seq_len / step_s, "experts_loop": args.experts_loop,
              "peak_GB": torch.cuda.max_memory_allocated() / 1e9, "forward_host_ms": forward_host_ms,
              "forward_gpu_ms": forward_gpu_ms,
              "trained_params_M": sum(p.numel() for p in params) / 1e6, "loss": history}
    emit(result, args.out)


if __name__ == "__main__":
    main()
