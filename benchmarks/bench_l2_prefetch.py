"""Would prefetching the next decode GEMM's weight into L2, while a decode step's other kernels run,
make the step faster? An experiment with today's kernels, before building the prefetch into them.

A LLaMA-2-7B-shaped decode step's GEMMs at W4 g128 and one token (q/k/v, o, gate/up, down as
`models.tile_for_decode` groups them; 32 layers of distinct weights, so every GEMM reads DRAM), with idle
gaps between them as long as the model's other kernels there (attention and rotary after q/k/v, the
residual add and norm after o and after down, SiLU x up after gate/up: from a `bench_generate.py
--profile` of the compiled W4 step on the H200). The gaps are sleeping kernels: the SMs and DRAM idle,
as they mostly are while those small kernels run. Timed as one CUDA graph per arrangement:

    plain       the GEMMs and the gaps on one stream, as the model runs today;
    prefetch    besides, on a second stream, as each GEMM ends, a kernel reads the first bytes of the
                next GEMM's codes (as many as the gap streams at the copy rate) so they wait in L2;
    whole       the same with the next GEMM's whole codes (the reads run on into the next GEMM).

`saved_ms_per_step` (plain - prefetch) bounds what a prefetch issued by the GEMM kernels at their
end could gain in `bench_generate.py` (the reading kernel competes for SMs where an L2 prefetch
instruction would not).

    python benchmarks/bench_l2_prefetch.py --out benchmarks/results/l2_prefetch_h200.json
"""

from __future__ import annotations

import json

import timing
import torch
from bench_gemm import copy_bandwidth, random_weight

from qatext import ops

# (N, K) of a layer's decode GEMMs in step order, and the idle gap after each (us).
LAYER = (("q/k/v", 12288, 4096, 13.8), ("o", 4096, 4096, 3.7), ("gate/up", 22016, 4096, 1.2),
         ("down", 4096, 11008, 2.6))


def sleep_cycles_per_us() -> float:
    """The sleeping kernel's cycles per microsecond, measured."""
    cycles = 20_000_000
    ms = timing.cuda_time_ms(lambda: torch.cuda._sleep(cycles), warmup=2, repeats=5, inner=1)
    return cycles / (ms * 1e3)


def step_graph(gemms, gaps_cycles, prefetch_bytes):
    """One CUDA graph of the step: each GEMM, then its gap; with prefetch_bytes (per GEMM, or None), a
    second stream reads that many leading bytes of the next GEMM's codes as each GEMM ends."""
    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        main = torch.cuda.current_stream()
        for i, (gemm, cycles) in enumerate(zip(gemms, gaps_cycles)):
            gemm["call"]()
            if prefetch_bytes is not None and i + 1 < len(gemms):
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    nxt = gemms[i + 1]["codes"]
                    nbytes = min(prefetch_bytes[i + 1], nxt.numel()) // 4 * 4
                    nxt[:nbytes].view(torch.int32).amax()
            if cycles:
                torch.cuda._sleep(cycles)
        if prefetch_bytes is not None:
            main.wait_stream(side)  # join the second stream back (only one that captured work)
    return graph


def main():
    p = timing.parser(__doc__)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    args = timing.start(p)
    for flag in ("layers", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: expected at least 1, got {getattr(args, flag)}")
    timing.require_gpu(p)
    bits, g = 4, 128
    bw = copy_bandwidth()  # bytes a second that DRAM moves (a copy's reads and writes; a read stream's alike)
    per_us = sleep_cycles_per_us()
    gemms, gaps = [], []
    tuned = set()
    for _ in range(args.layers):
        for name, n, k, gap_us in LAYER:
            packed, scale, zero = random_weight(n, k, bits, g)
            tiled = ops.tile_packed(packed, bits, k)
            del packed
            if (n, k) not in tuned:
                ops.tune_decode_gemm(tiled, scale, zero, bits, g, k)
                tuned.add((n, k))
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            call = lambda x=x, t=tiled, s=scale, z=zero: ops.dequant_matmul_tiled(x, t, s, z, bits, g)
            gemms.append({"name": name, "codes": tiled.view(-1), "gap_us": gap_us, "call": call})
            gaps.append(int(gap_us * per_us))
    # The gap before GEMM i is the one after GEMM i - 1; the first GEMM's is the last one's (the step wraps).
    before = [gemms[i - 1]["gap_us"] for i in range(len(gemms))]
    sized = [int(us * 1e-6 * bw) for us in before]
    graphs = {"plain": step_graph(gemms, gaps, None), "prefetch": step_graph(gemms, gaps, sized),
              "whole": step_graph(gemms, gaps, [gm["codes"].numel() for gm in gemms]),
              "gaps only": step_graph([{"call": lambda: None, "codes": None}] * len(gemms), gaps, None)}
    ms = {name: timing.replay_ms(graph, args.repeats, warmup=3) for name, graph in graphs.items()}
    # Alternate once more: a drift between the first and last graphs timed shows here.
    ms_again = {name: timing.replay_ms(graph, args.repeats, warmup=3) for name, graph in graphs.items()}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "bits": bits, "group_size": g, "dram_bandwidth_TBps": bw / 1e12,
              "gaps_us": {n: gap for n, *_, gap in LAYER},
              "ms": ms, "ms_again": ms_again,
              "gemm_ms_per_step": {n: ms[n] - ms["gaps only"] for n in ("plain", "prefetch", "whole")},
              "saved_ms_per_step": {n: ms["plain"] - ms[n] for n in ("prefetch", "whole")},
              "saved_ms_per_step_again": {n: ms_again["plain"] - ms_again[n] for n in ("prefetch", "whole")}}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
