"""LR-QAT (INT4 P, rank 32, checkpointing) on a LLaMA-2-7B-shaped model (random init, bf16): tokens/s and
peak memory per GPU, one GPU against FSDP2 on several, the same per-GPU batch (seq 1024).

    torchrun --nproc-per-node 1 benchmarks/bench_distributed.py --out one.json
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --out two.json
"""

from __future__ import annotations

import argparse
import json

import torch

from qatext import QuantSpec, distributed, methods, models
from qatext.evaluate import causal_lm_loss
from qatext.methods.common import layer_params
from qatext.train import train
from llama7b import llama_7b
from timing import StepClock


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--per-gpu-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="decoder layers recompute their activations in backward")
    parser.add_argument("--profile", default=None, help="write rank 0's torch.profiler tables (CPU and CUDA) here")
    args = parser.parse_args()
    distributed.init_from_env()
    world = distributed.world_size()
    model = llama_7b(args.layers)
    models.quantize_model(model, QuantSpec(4, 128), method="lrqat", init="minmax", rank=32, alpha=32.0)
    groups = [{"params": layer_params(model, ("lora_a", "lora_b")), "lr": 1e-4},
              {"params": layer_params(model, ("scale",)), "lr": 1e-5}]
    tokens = torch.randint(0, model.config.vocab_size, (1_000_000,))
    clock = StepClock(causal_lm_loss)

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    tcfg = methods.default_config("lrqat", steps=args.steps, batch_size=args.per_gpu_batch * world,
                                  seq_len=args.seq_len, progress=False, distributed="fsdp",
                                  activation_checkpointing=args.activation_checkpointing)
    if args.profile:
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            history = train(model, groups, tokens, tcfg, loss_fn=clock)
        if distributed.is_main():
            table = prof.key_averages()
            with open(args.profile, "w") as f:
                f.write(table.table(sort_by="self_cuda_time_total", row_limit=30) + "\n")
                f.write(table.table(sort_by="cpu_time_total", row_limit=40) + "\n")
    else:
        history = train(model, groups, tokens, tcfg, loss_fn=clock)
    peak = torch.cuda.max_memory_allocated() / 2**30
    step_s = clock.seconds_per_step(warmup=2)
    result = {"gpus": world, "device": torch.cuda.get_device_name(), "layers": args.layers, "seq_len": args.seq_len,
              "global_batch": args.per_gpu_batch * world,
              "activation_checkpointing": args.activation_checkpointing, "step_s": step_s,
              "tokens_per_s": args.per_gpu_batch * world * args.seq_len / step_s,
              "step_peak_GiB_per_gpu": clock.step_peak / 2**30, "setup_peak_GiB_per_gpu": clock.setup_peak / 2**30,
              "resident_GiB_per_gpu": clock.resident / 2**30, "peak_through_finish_GiB_per_gpu": peak,
              "loss": history}
    peaks = [None] * world
    if distributed.active():
        torch.distributed.all_gather_object(peaks, peak)
        result["peak_through_finish_GiB_all_ranks"] = peaks
    if distributed.is_main():
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    if distributed.active():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
