"""Host time and GPU time of each phase of a training step (forward, backward, clip, AdamW) on the
7B-shaped model. A phase whose host time equals its GPU time is host-bound (the GPU waits for the
launches); one whose GPU time is longer is GPU-bound. bench_step.py says how fast a step is; this says
which phase is lost to the host, and profile_step.py which ops. The loop is qatext.train's: AdamW
with the method's recipe (betas, weight decay, clip), zero_grad(set_to_none), one loss.item() a step,
local_shards.clip_grad_norm.

    python benchmarks/step_phases.py --method full_qat
    python benchmarks/step_phases.py --method full_qat --frozen-qparams   # scales and zeros not trained
    python benchmarks/step_phases.py --method qalora --device cpu --layers 1 --seq-len 16   # the code path
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from bench_step import METHODS, build
from timing import emit

import qatext
from qatext import local_shards, methods
from qatext.evaluate import causal_lm_loss

PHASES = ("forward", "backward", "loss_item", "clip", "adamw")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--frozen-qparams", action="store_true", help="scales and zeros not trained (what they cost)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=7, help="steps; the first 2 untimed")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.steps < 3:
        p.error(f"--steps must be at least 3 (2 warm-up steps and one timed), got {args.steps}")
    qatext.set_value_checks(False)
    model, params, recipe, lr = build(args.method, args.layers, args.device)
    cfg = methods.default_config(recipe)  # the optimiser and clip qatext.train uses for this method
    if args.frozen_qparams:
        for name, param in model.named_parameters():
            if name.endswith((".scale", ".zero")):
                param.requires_grad_(False)
        params = [q for q in params if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    tokens = torch.randint(0, model.config.vocab_size, (1, args.seq_len + 1), device=args.device)
    on_gpu = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    rows = []
    for _ in range(args.steps):
        sync()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(PHASES) + 1)] if on_gpu else []
        stamps = [time.perf_counter()]

        def timed(fn, events=events, stamps=stamps):  # one phase: its start marked, fn run, its end stamped
            if events:
                events[len(stamps) - 1].record()
            out = fn()
            stamps.append(time.perf_counter())
            return out

        loss = timed(lambda: causal_lm_loss(model, tokens))
        timed(lambda: (opt.zero_grad(set_to_none=True), loss.backward()))  # noqa: B023 (called at once)
        timed(loss.item)
        timed(lambda: local_shards.clip_grad_norm(params, cfg.clip) if cfg.clip else None)
        timed(opt.step)
        if events:
            events[-1].record()
        sync()
        stamps.append(time.perf_counter())
        row = {f"{name}_host_ms": 1e3 * (b - a) for name, (a, b) in zip(PHASES, itertools.pairwise(stamps))}
        row["end_wait_ms"], row["step_ms"] = 1e3 * (stamps[-1] - stamps[-2]), 1e3 * (stamps[-1] - stamps[0])
        for name, (a, b) in zip(PHASES, itertools.pairwise(events)):
            row[f"{name}_gpu_ms"] = a.elapsed_time(b)
        rows.append(row)
    medians = {k: round(statistics.median(r[k] for r in rows[2:]), 2) for k in rows[0]}
    result = {"method": args.method, "frozen_qparams": args.frozen_qparams, "device": args.device,
              "layers": args.layers, "seq_len": args.seq_len, **medians}
    emit(result, args.out)


if __name__ == "__main__":
    main()
