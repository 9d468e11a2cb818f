"""Where one training step's time goes, per method: torch.profiler over steps after warm-up, the time of
each op per step (device time on a GPU), the top rows as a table and JSON. bench_step.py says how fast
a method is; this says what it spends that another does not (a QA-LoRA step on the 7B-shaped model
loses ~150 ms to PEFT LoRA's, far more than its layers do: NOTES, training-speed peers).

    for m in qalora peft_lora; do python benchmarks/profile_step.py --method $m --out profile_$m.json; done
    python benchmarks/profile_step.py --method qalora --device cpu --layers 1 --seq-len 32   # the code path
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile, schedule

import qatext
from bench_step import METHODS, build
from qatext import methods
from qatext.evaluate import causal_lm_loss
from qatext.train import train


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3, help="steps before the profiled ones")
    p.add_argument("--active", type=int, default=2, help="profiled steps")
    p.add_argument("--rows", type=int, default=25, help="ops in the printed table")
    p.add_argument("--out", default=None, help="JSON: every op's time per step")
    p.add_argument("--compile", action="store_true", help="decoder layers compiled (TrainConfig.compile)")
    args = p.parse_args()
    qatext.set_value_checks(False)
    model, params, recipe, lr = build(args.method, args.layers, args.device)
    on_gpu = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    tokens = torch.randint(0, model.config.vocab_size, (100_000,))
    steps = args.warmup + args.active
    cycles = []  # the active steps' averages, kept when the cycle closes (the profiler clears its events then)
    with profile(activities=activities, schedule=schedule(wait=0, warmup=args.warmup, active=args.active, repeat=1),
                 on_trace_ready=lambda prof: cycles.append(prof.key_averages())) as prof:
        def loss_fn(m, batch):  # the profiler's step boundary is each step's start
            prof.step()
            return causal_lm_loss(m, batch)

        tcfg = methods.default_config(recipe, steps=steps + 1, batch_size=1, seq_len=args.seq_len, progress=False,
                                      compile=args.compile)
        train(model, [{"params": params, "lr": lr}], tokens, tcfg, loss_fn=loss_fn)
    key = "device_time_total" if on_gpu else "cpu_time_total"
    averages = cycles[0]
    print(averages.table(sort_by=key, row_limit=args.rows))
    events = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
    # Host time beside device time: a step whose host time exceeds its device time is launch-bound.
    rows = [{"op": e.key, "calls_per_step": e.count / args.active, "ms_per_step": getattr(e, key) / 1e3 / args.active,
             "self_ms_per_step": getattr(e, "self_" + key) / 1e3 / args.active,
             "cpu_ms_per_step": e.cpu_time_total / 1e3 / args.active,
             "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / args.active} for e in events]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"method": args.method, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                       "layers": args.layers, "seq_len": args.seq_len, "compiled": args.compile, "time": key,
                       "ops": rows}, f, indent=1)


if __name__ == "__main__":
    main()
