"""What the benchmarks share: their start (arguments, value checks off, seed), GPU timing (CUDA
events around back-to-back calls, median of repeats) and their JSON results."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

import qatext


def parser(description: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the common --out (JSON results path) and --tuning (knobs for the run)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--tuning", default="", metavar="KNOB=VALUE,...",
                   help="qatext tuning knobs for the whole run (qatext.tuning_table() lists them)")
    return p


def knob_settings(p: argparse.ArgumentParser, flag: str, text: str) -> dict[str, int]:
    """{knob: value} from "KNOB=VALUE,..." (a flag's value); a malformed pair or an unknown knob is one
    line from the parser naming the flag."""
    knobs = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        try:
            knobs[name.strip()] = int(value)
        except ValueError:
            p.error(f"{flag} {item!r}: expected KNOB=INTEGER pairs separated by commas")
    if unknown := set(knobs) - set(qatext.get_tuning()):
        p.error(f"{flag}: unknown knob(s) {sorted(unknown)}; qatext.tuning_table() lists them")
    return knobs


def start(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the arguments, set the --tuning knobs, turn the per-op value checks off (each would
    synchronise the GPU, which training runs without), and seed the generators."""
    args = p.parse_args()
    try:
        qatext.set_tuning(**knob_settings(p, "--tuning", args.tuning))
    except ValueError as e:  # a value out of the knob's range
        p.error(f"--tuning: {e}")
    qatext.set_value_checks(False)
    torch.manual_seed(0)
    return args


def require_gpu(p: argparse.ArgumentParser) -> None:
    """A benchmark that times CUDA kernels stops in one line without a GPU (after its own argument checks)."""
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (it times the CUDA kernels)")


def cuda_time_ms(fn, warmup=5, repeats=20, inner=10) -> float:
    """Median milliseconds of one fn() call, timed with CUDA events around `inner` back-to-back calls so
    the GPU queue stays full and host-side launch overhead (Python, dispatcher) is not counted."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def cuda_time_interleaved_ms(fns: dict, warmup=3, repeats=10, inner=3, settle_s=2.0) -> dict[str, float]:
    """Median milliseconds of one call of each fn, the fns timed in turn within every repeat (the order
    rotating by one each repeat) after `settle_s` seconds of them run round-robin: each sees the same
    clocks and the same neighbours. Timed one after another instead, the same cuBLAS GEMM on the same
    inputs took 443 us in the first variant and 458-479 us in later ones (results/layer_h200_profile.json),
    as much as the differences the layer benchmark is after."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < settle_s:
        for name in names:
            fns[name]()
        torch.cuda.synchronize()
    times = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        events = []
        for name in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fns[name]()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize()
        for name, start, end in events:
            times[name].append(start.elapsed_time(end) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def host_time_us(fn, warmup=3, repeats=20) -> float:
    """Median microseconds the host spends in one fn() call started on an idle GPU (synchronised
    before each call, none inside it): the Python, dispatch and launch cost a host-bound training step
    pays per call. On a CPU the kernels run inside the call, so it is the whole time."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    sync()
    return statistics.median(times)


def save_rows(out: str | None, rows: list, **extra) -> None:
    """A benchmark's rows as indented JSON in `out` (when given), after the device, the torch version and
    `extra`."""
    if out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        with open(out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, **extra, "rows": rows}, f, indent=1)


def emit(result: dict, out: str | None) -> None:
    """A benchmark's result: one JSON line on stdout, and the file `out` (indented) when given."""
    print(json.dumps(result))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def cold(call, *weights):
    """A zero-argument fn() calling call(*copy) on the next of enough copies of `weights` that, cycled,
    they exceed twice the L2 cache: each timed call reads its weight from DRAM, as a model's decode step
    reads each layer's weight once a token. (Timed back to back on one weight, a 4096 x 4096 W4 weight,
    9 MB, is served from the H200's 50 MB L2.)"""
    l2 = torch.cuda.get_device_properties(weights[0].device).L2_cache_size
    size = sum(t.numel() * t.element_size() for t in weights)
    n = min(64, max(2, -(-2 * l2 // max(size, 1))))
    copies = [weights] + [tuple(t.clone() for t in weights) for _ in range(n - 1)]
    it = itertools.cycle(copies)
    return lambda: call(*next(it))


def cuda_graph_time_ms(fn, repeats=20, inner=20) -> float:
    """Median milliseconds of one fn() call replayed from a CUDA graph of `inner` calls: GPU time only,
    as a decode loop under CUDA graphs sees it (host-side dispatch would otherwise dominate a 10 us op)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return replay_ms(graph, repeats) / inner


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 20, warmup: int = 1) -> float:
    """Median milliseconds of one replay of a captured CUDA graph (CUDA events, after `warmup` replays)."""
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_mib(fn) -> float:
    """Memory fn() allocates above what is live before it, at its peak (MiB)."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def profile_ops(fn, steps: int = 3, rows: int = 30) -> list[dict]:
    """fn()'s ops by time per call after one warm-up call, most first (device time on a GPU, host time
    otherwise): set beside another variant's, what one spends that the other does not."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    fn()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in range(steps):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
    key = "device_time_total" if on_gpu else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"op": e.key, "calls": e.count / steps, "us": getattr(e, key) / steps,
             "self_us": getattr(e, "self_" + key) / steps} for e in events]


class StepClock:
    """A loss_fn wrapper for qatext.train that stamps the start of every step (synchronised), so
    seconds per step can be taken after warm-up steps. It also splits peak memory: `setup_peak`
    (everything before the first step), `resident` (allocated when the first step starts: the model
    as trained) and `step_peak` (the steps, read at each step's start, so
    the last step's peak is that of the ones before it, the same work)."""

    def __init__(self, loss_fn):
        self.loss_fn, self.stamps, self.forwards = loss_fn, [], []
        self.setup_peak = self.step_peak = self.resident = 0

    def __call__(self, model, batch):
        torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            self.setup_peak = torch.cuda.max_memory_allocated()
            self.resident = torch.cuda.memory_allocated()  # model (and its shards) before any step
            torch.cuda.reset_peak_memory_stats()
        else:
            self.step_peak = max(self.step_peak, torch.cuda.max_memory_allocated())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = self.loss_fn(model, batch)
        end.record()
        self.forwards.append((time.perf_counter() - self.stamps[-1], start, end))
        return loss

    def forward_host_and_gpu_ms(self, warmup: int = 2) -> tuple[float, float]:
        """Medians after warm-up of the forward's host time (Python and launches, the queue starting
        empty) and of its GPU time: a host time above the GPU time means the step is host-bound."""
        torch.cuda.synchronize()
        rows = self.forwards[warmup:]
        return (1e3 * statistics.median(host for host, _, _ in rows),
                statistics.median(start.elapsed_time(end) for _, start, end in rows))

    def seconds_per_step(self, warmup: int = 2) -> float:
        """Call after training: the mean step time after `warmup` steps (the last step ends now)."""
        torch.cuda.synchronize()
        stamps = self.stamps + [time.perf_counter()]
        return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)
