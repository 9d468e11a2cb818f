"""Tiled (inference) weights between decode and prefill, M = 16-512, g128: the staged kernel against
cuBLAS bf16, the decode kernel and the path beyond them before it (the fused kernel on the codes
untiled up to dequant_gemm_max_m tokens, else dequant + cuBLAS), and the default dispatch (after
tune_decode_gemm measured the shape's decode crossover and staged limit, as a layer does), same run.

    python benchmarks/bench_staged.py --out benchmarks/results/staged_h200.json

Per row: median us (CUDA events around a CUDA graph of 20 calls, each on the next of enough copies of
its weight to pass twice the L2: `timing.cold`), each path's speedup over cuBLAS, and the floor (weight,
scales and zeros, activations and output at the copy bandwidth measured in the run). Staged variants:
1 or 2 row tiles a warp, split-K summed in a cluster or through global partials; and the default with the
zeros rounded to integers (the random zeros have fractions, as QA-LoRA's merged zeros do).
"""

from __future__ import annotations

import timing
import torch
from bench_gemm import SHAPES, copy_bandwidth, floor_bytes, random_weight
from timing import cold
from timing import cuda_graph_time_ms as gpu_time_ms

import qatext
from qatext import ops

TOKENS = [16, 32, 64, 128, 256, 512]
# (autotune off: the row tiles the tuner chose would otherwise replace each variant's)
STAGED_VARIANTS = {
    f"staged nt{nt} {'cluster' if cluster else 'partials'}": {"decode_gemm_row_tiles": nt, "staged_gemm_cluster": cluster,
                                                            "decode_gemm_autotune": 0}
    for nt in (2, 1)
    for cluster in (1, 0)
}


def main():
    parser = timing.parser()
    parser.add_argument("--shapes", type=int, default=4, help="first n shapes only")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    args = timing.start(parser)
    timing.require_gpu(parser)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    g = 128
    for n, k in SHAPES[: args.shapes]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for bits in args.bits:
            packed, scale, zero = random_weight(n, k, bits, g)
            tiled = ops.tile_packed(packed, bits, k)
            ops.tune_decode_gemm(tiled, scale, zero, bits, g, k)  # as a layer does: the default's limits
            limits = {"decode_crossover": ops.decode_gemm_crossover("cuda", n, k, bits, g),
                      "staged_limit": ops.staged_gemm_limit("cuda", n, k, bits, g)}
            print(f"{n}x{k} W{bits}: measured {limits}", flush=True)
            for m in args.tokens:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

                def matmul(t, s, z):
                    return ops.dequant_matmul_tiled(x, t, s, z, bits, g)  # noqa: B023

                call = cold(matmul, tiled, scale, zero)

                def timed(**knobs):
                    with qatext.tuning(**knobs):
                        return gpu_time_ms(call) * 1e3  # noqa: B023

                us = {"cublas": gpu_time_ms(cold(lambda v: x @ v.t(), w)) * 1e3}  # noqa: B023
                us["before"] = timed(decode_gemm_max_m=0, staged_gemm_max_m=0)
                us["decode"] = timed(decode_gemm_max_m=m, staged_gemm_max_m=0)
                for name, knobs in STAGED_VARIANTS.items():
                    us[name] = timed(decode_gemm_max_m=0, staged_gemm_max_m=m, **knobs)
                us["default"] = timed()
                # (integer zeros, as LR-QAT's and EfficientQAT's: the wgmma form skips the zeros' fractions)
                us["default integer zeros"] = gpu_time_ms(cold(matmul, tiled, scale, zero.round())) * 1e3
                floor = floor_bytes(n, k, m, bits, g) / bw * 1e6
                row = {"N": n, "K": k, "M": m, "bits": bits, "group_size": g, **limits, "us": us, "floor_us": floor,
                       "speedup_vs_cublas": {p: us["cublas"] / t for p, t in us.items()}}
                rows.append(row)
                best = min(STAGED_VARIANTS, key=us.get)
                print(f"{n}x{k} W{bits} M={m:3d}: cuBLAS {us['cublas']:6.1f} | before {us['before']:6.1f} | "
                      f"decode {us['decode']:6.1f} | {best} {us[best]:6.1f} x{us['cublas'] / us[best]:.2f} | "
                      f"default {us['default']:6.1f} x{us['cublas'] / us['default']:.2f} | integer zeros "
                      f"{us['default integer zeros']:6.1f} | floor {floor:.1f}",
                      flush=True)
    timing.save_rows(args.out, rows, tuning=qatext.get_tuning(), copy_TBps=bw / 1e12)


if __name__ == "__main__":
    main()
