"""The decode GEMM on the tiled layout against cuBLAS bf16 and qatext's v4 fused kernel on the packed
layout, small M, g128, same run; with a correctness check against the reference on every shape.

    python benchmarks/bench_decode.py --out benchmarks/results/decode_h100.json
    python benchmarks/bench_decode.py --nk 12288 4096 --nk 22016 4096 --bits 4 --tokens 1 8   # other shapes

Per row: median us (CUDA events around a CUDA graph of 20 calls: GPU time, as a decode loop under
graphs sees it; eager dispatch costs ~20-40 us of host time per call at these sizes), speedup over cuBLAS, % of the memory floor (weight,
scales and zeros, activations and output at the copy bandwidth measured in the run), and what cuBLAS's bf16
GEMV reading the same bytes and a device copy moving them take (`plain_gemv_us`, `plain_copy_us`, and the
floor's share of the faster, `plain_pct_of_floor`: the bandwidth is measured on 1 GiB, which a call
moving a few MB does not reach). Every path cycles
through copies of its weight that together exceed twice the L2 cache (`timing.cold`), so each call reads
its weight from DRAM as a decode step does.
--producer also times each call after an elementwise kernel that writes its input, as in a model
(`tiled_marginal_us`: what the decode call adds to that kernel's time).
Knobs for the run: --tuning, e.g. --tuning decode_gemm_min_slice=4,decode_gemm_row_tiles=2.
Each weight is tuned as a layer tunes it (ops.tune_decode_gemm): `tiled_us` is the decode kernel with the
variant it chose; each variant is also timed alone (`variants_us`), so a row shows whether the default
is the fastest. `default_us` is the op with nothing set, as a packed layer holding the tiled codes runs
it (the decode kernel up to the shape's measured crossover; beyond it the staged kernel within its
measured limit, else dequant + cuBLAS), `beyond_us` the path beyond the decode kernel forced at every M,
and `default_vs_best_path` the default's time over the faster of the decode kernel and that path.
(`v4_packed_us` is the fused kernel on the packed layout, which a loaded model no longer holds.)
"""

from __future__ import annotations


import torch

import qatext
from qatext import ops, reference
from bench_gemm import SHAPES, copy_bandwidth, floor_bytes, random_weight, with_max_m
import timing
from timing import cuda_graph_time_ms as gpu_time_ms
from timing import cold, cuda_time_ms


def with_decode_max_m(m, fn):
    return with_max_m(m, fn, knob="decode_gemm_max_m")


def plain_moves_us(nbytes):
    """What a kernel moving `nbytes` pays at this size, cold, in the harness the GEMMs are timed in, in us:
    cuBLAS's bf16 GEMV reading a weight of those bytes (one token, K = 4096) and a device copy moving them
    (half read, half written). The floor counts the bytes at the copy rate of a 1 GiB buffer."""
    k = 4096
    w = torch.randn(max(1, int(nbytes) // (2 * k)), k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    gemv = gpu_time_ms(cold(lambda v: x @ v.t(), w)) * 1e3
    half = torch.rand(max(1, int(nbytes) // 8), device="cuda")
    dst = torch.empty_like(half)
    copy = gpu_time_ms(cold(lambda s, d: d.copy_(s), half, dst)) * 1e3
    return gemv, copy


TOKENS = [1, 2, 4, 8, 16, 32, 64]


def variants(m):
    """(ring stages, cluster, warp split) of the decode kernel timed at m tokens: rings of 4 or 8 stages up to
    16 tokens, of 2, 3 or 4 for 32-token blocks (8 would not fit)."""
    depths = (2, 3, 4) if m > 16 else (4, 8)
    return [(stages, cluster, 0) for stages in depths for cluster in (0, 1)] + [(stages, 0, 1) for stages in depths]


def main():
    parser = timing.parser()
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="first n shapes only")
    parser.add_argument("--nk", type=int, nargs=2, action="append", metavar=("N", "K"),
                        help="this weight shape instead (repeatable), e.g. --nk 12288 4096 for q/k/v as one GEMM")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--group-size", type=int, default=128, help="a multiple of 64, or -1 for one group a row")
    parser.add_argument("--producer", action="store_true",
                        help="also time each decode call after a kernel that writes its input (as a norm does in a "
                        "model; in a chain of decode calls alone, each may start while the one before ends)")
    args = timing.start(parser)
    if args.group_size != -1 and (args.group_size <= 0 or args.group_size % 64 != 0):
        parser.error(f"--group-size: expected a positive multiple of 64 or -1 (one group a row), got {args.group_size}")
    timing.require_gpu(parser)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for n, k in args.nk or SHAPES[: args.shapes]:
        g = k if args.group_size == -1 else args.group_size
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for bits in args.bits:
            packed, scale, zero = random_weight(n, k, bits, g)
            tiled = ops.tile_packed(packed, bits, k)
            ops.tune_decode_gemm(tiled, scale, zero, bits, g, k)
            crossover = ops.decode_gemm_crossover("cuda", n, k, bits, g)
            x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
            got = with_decode_max_m(64, lambda: ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g))  # noqa: B023
            err = (got.float() - reference.dequant_matmul(x, packed, scale, zero, bits, g).float()).abs().max().item()
            for m in args.tokens:
                max_m = max(64, m)  # the decode knob raised so that the tiled kernel takes these m tokens
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                tiled_call = cold(lambda t, s, z: ops.dequant_matmul_tiled(x, t, s, z, bits, g),  # noqa: B023
                                  tiled, scale, zero)
                row = {"N": n, "K": k, "M": m, "bits": bits, "group_size": g, "max_abs_err_vs_reference": err,
                       "cublas_us": gpu_time_ms(cold(lambda v: x @ v.t(), w)) * 1e3}  # noqa: B023
                row["v4_packed_us"] = with_max_m(64, lambda: gpu_time_ms(cold(  # noqa: B023
                    lambda p, s, z: ops.dequant_matmul(x, p, s, z, bits, g), packed, scale, zero))) * 1e3  # noqa: B023
                row["tiled_us"] = with_decode_max_m(max_m, lambda: gpu_time_ms(tiled_call)) * 1e3  # noqa: B023
                row["variant"] = ops.decode_gemm_choice("cuda", n, k, bits, g, m)
                row["variants_us"] = {}
                for stages, cluster, warp_split in variants(m):
                    with qatext.tuning(decode_gemm_autotune=0, decode_gemm_stages=stages, decode_gemm_cluster=cluster,
                                       decode_gemm_warp_split=warp_split):
                        name = f"stages={stages},cluster={cluster},warp_split={warp_split}"
                        row["variants_us"][name] = with_decode_max_m(
                            max_m, lambda: gpu_time_ms(tiled_call)) * 1e3  # noqa: B023
                row["tiled_vs_best_variant"] = row["tiled_us"] / min(row["variants_us"].values())
                row["crossover"] = crossover
                row["default_path"] = "decode" if m <= crossover else "beyond"
                row["default_us"] = gpu_time_ms(tiled_call) * 1e3
                row["beyond_us"] = with_decode_max_m(0, lambda: gpu_time_ms(tiled_call)) * 1e3  # noqa: B023
                row["default_vs_best_path"] = row["default_us"] / min(row["tiled_us"], row["beyond_us"])
                if args.producer:
                    def produce():  # an elementwise kernel writing x in place
                        x.mul_(1.0)  # noqa: B023

                    def after_producer():
                        produce()
                        tiled_call()  # noqa: B023

                    row["producer_us"] = gpu_time_ms(produce) * 1e3
                    row["tiled_after_producer_us"] = with_decode_max_m(max_m, lambda: gpu_time_ms(after_producer)) * 1e3
                    row["tiled_marginal_us"] = row["tiled_after_producer_us"] - row["producer_us"]
                # Eager back-to-back calls: bounded by host dispatch at these sizes (for the host cost).
                row["tiled_eager_us"] = with_decode_max_m(max_m, lambda: cuda_time_ms(  # noqa: B023
                    lambda: ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g))) * 1e3  # noqa: B023
                row["floor_us"] = floor_bytes(n, k, m, bits, g) / bw * 1e6
                row["plain_gemv_us"], row["plain_copy_us"] = plain_moves_us(floor_bytes(n, k, m, bits, g))
                plain = min(row["plain_gemv_us"], row["plain_copy_us"])
                row["plain_pct_of_floor"] = 100 * row["floor_us"] / plain
                row["tiled_over_plain"] = row["tiled_us"] / plain
                row["tiled_speedup_vs_cublas"] = row["cublas_us"] / row["tiled_us"]
                row["tiled_pct_of_floor"] = 100 * row["floor_us"] / row["tiled_us"]
                rows.append(row)
                print(f"{n}x{k} W{bits} M={m:3d}: cuBLAS {row['cublas_us']:7.1f} | v4 {row['v4_packed_us']:7.1f} | "
                      f"tiled {row['tiled_us']:7.1f} x{row['tiled_speedup_vs_cublas']:.2f} "
                      f"{row['tiled_pct_of_floor']:.0f}% floor (cuBLAS GEMV or a copy of its bytes "
                      f"{row['plain_pct_of_floor']:.0f}%), eager {row['tiled_eager_us']:.1f} (err {err:.2e}) | "
                      f"{row['tiled_vs_best_variant']:.2f}x the best variant | default {row['default_path']} "
                      f"{row['default_vs_best_path']:.2f}x the best path",
                      flush=True)
    timing.save_rows(args.out, rows, tuning=qatext.get_tuning(), copy_TBps=bw / 1e12)


if __name__ == "__main__":
    main()
