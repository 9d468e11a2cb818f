"""Is a compiled decode step bound by the GPU or by the host? For bench_generate's model and Generator
(torch.compile, CUDA graphs), batch 1, per variant:

- wall and issue time a step over 127 steps back to back (issue: until the call returns);
- issue time a step while the GPU sleeps (12 steps queued behind a long sleeping kernel: the host's
  own cost, without back-pressure from a full queue; the second of two rounds);
- GPU time a step (the stream held by a sleep until the step is queued, so the graph runs unbroken);
- synchronising calls in one step (torch.cuda.set_sync_debug_mode), which must be 0;
- with --cprofile, where the host time goes (25 steps queued behind a sleep).

A step is GPU-bound when its wall time is close to its GPU time; its host cost (issue time asleep) is
then the headroom left before the host bounds it (smaller models, faster GPUs).

    python benchmarks/step_host_gpu.py --variants "bf16,qatext W4 g128" --out benchmarks/results/step_host_gpu_h200.json
"""

from __future__ import annotations

import copy
import cProfile
import io
import json
import pstats
import time
import warnings

import bench_generate as bg
import timing
import torch

from qatext import methods, models


def issue_asleep_ms(step, first: int, n: int) -> list[float]:
    torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time ahead of the steps
    times = []
    for i in range(first, first + n):
        t = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return times


def measure(model, cprofile_rows: int) -> dict:
    dev = torch.device("cuda")
    gen = bg.Generator(model, "inductor")
    prompt = torch.randint(1, model.config.vocab_size, (1, 512), device=dev)
    for _ in range(2):  # compile, capture the graphs
        gen(prompt, 128)
    cache, positions = gen.caches[(1, 640)], torch.arange(640, device=dev)
    state = {}

    def prefill():
        cache.reset()
        state["token"] = gen._step(prompt, positions[:512], cache)
        torch.cuda.synchronize()

    def step(i):
        torch.compiler.cudagraph_mark_step_begin()
        state["token"] = gen.step(state["token"], positions[i:i + 1], cache).clone()

    # The first steps driven this way re-record the graphs (seconds): once through, untimed.
    prefill()
    for i in range(512, 612):
        step(i)
    prefill()
    t0, issue = time.perf_counter(), []
    for i in range(512, 639):
        t = time.perf_counter()
        step(i)
        issue.append(time.perf_counter() - t)
    t_issued = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    prefill()
    asleep = [issue_asleep_ms(step, 512 + 12 * r, 12) for r in range(2)][-1]
    prefill()
    gpu = []
    for i in range(512, 536):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)
        start.record()
        step(i)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(540)
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    row = {"wall_ms_per_step": wall / 127 * 1e3, "issue_ms_per_step_back_to_back": t_issued / 127 * 1e3,
           "issue_ms_per_step_gpu_asleep": sorted(asleep)[len(asleep) // 2], "issue_ms_asleep_each": asleep,
           "gpu_ms_per_step": sorted(gpu)[len(gpu) // 2],
           "sync_warnings_in_one_step": len(caught)}
    if cprofile_rows:
        prefill()
        profiler = cProfile.Profile()
        torch.cuda._sleep(1_000_000_000)
        profiler.enable()
        for i in range(540, 565):
            step(i)
        profiler.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(cprofile_rows)
        row["cprofile_25_steps"] = out.getvalue()
    return row


def main():
    p = timing.parser(__doc__)
    allowed = ("bf16",) + tuple(f"qatext {name}" for name in bg.CONFIGS)
    p.add_argument("--variants", default="bf16,qatext W4 g128", help="comma-separated subset of: " + ", ".join(allowed))
    p.add_argument("--cprofile", type=int, default=0, metavar="ROWS",
                   help="also the ROWS costliest functions (own time) of 25 steps queued while the GPU sleeps")
    args = timing.start(p)
    wanted = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in wanted if v not in allowed]:
        p.error(f"--variants: unknown {unknown}; expected a comma-separated subset of {', '.join(allowed)}")
    timing.require_gpu(p)
    base = bg.build_model(False, torch.device("cuda"))
    rows = {}
    for name in wanted:
        model = base
        if name != "bf16":
            model = methods.rtn(copy.deepcopy(base), bg.CONFIGS[name.removeprefix("qatext ")])
            models.tile_for_decode(model)
        rows[name] = measure(model, args.cprofile)
        print(name, {k: v for k, v in rows[name].items() if k not in ("cprofile_25_steps", "issue_ms_asleep_each")},
              flush=True)
        if model is not base:
            del model
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
