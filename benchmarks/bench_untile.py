"""What a packed layer holding only its tiled codes pays beyond the decode crossover: the untile kernel
(tiled -> packed) and the GEMM on the tiled codes (`dequant_matmul_tiled` with the decode kernel off: the
weight dequantised straight from the tiled layout, or, for the fused kernel's 16-bit inputs of at most
dequant_gemm_max_m rows, untiled first) against the same GEMM on the packed codes, same run.

    python benchmarks/bench_untile.py --nk 4096 4096 --nk 22016 4096 --nk 4096 11008 --tokens 32 512 --out untile.json

Per row: median us (CUDA events around a CUDA graph of 20 calls, cold weights: `timing.cold`), the untile
kernel's rate (codes read and written), and the two GEMMs at each --tokens (default 512, a prefill). Each
untile is checked against the packed codes it came from, and each tiled GEMM against the packed one.
"""

from __future__ import annotations

import timing
import torch
from bench_gemm import SHAPES
from timing import cold
from timing import cuda_graph_time_ms as gpu_time_ms

import qatext
from qatext import ops


def main():
    parser = timing.parser()
    parser.add_argument("--nk", type=int, nargs=2, action="append", metavar=("N", "K"),
                        help="this weight shape instead of bench_gemm's (repeatable)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512], help="the GEMMs' M (512: a prefill)")
    parser.add_argument("--group-size", type=int, default=128)
    args = timing.start(parser)
    timing.require_gpu(parser)
    rows = []
    for n, k in args.nk or SHAPES:
        for bits in args.bits:
            packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda"), bits)
            tiled = ops.tile_packed(packed, bits, k)
            if not torch.equal(ops.untile_packed(tiled, bits, k), packed):
                raise SystemExit(f"untile_packed is wrong at {n}x{k} W{bits}")
            g = args.group_size
            scale = torch.rand(n, k // g, device="cuda") * 0.01 + 0.001
            zero = torch.full((n, k // g), float(1 << (bits - 1)), device="cuda")
            untile_us = gpu_time_ms(cold(lambda t: ops.untile_packed(t, bits, k), tiled)) * 1e3  # noqa: B023
            for m in args.tokens:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                with qatext.tuning(decode_gemm_max_m=0):  # the path beyond the decode kernel, at every M
                    if not torch.equal(ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g),
                                       ops.dequant_matmul(x, packed, scale, zero, bits, g)):
                        raise SystemExit(f"dequant_matmul_tiled differs from dequant_matmul at {n}x{k} W{bits} M={m}")
                    row = {"N": n, "K": k, "bits": bits, "group_size": g, "M": m, "untile_us": untile_us,
                           "untile_TBps": 2 * packed.numel() / untile_us / 1e6,
                           "gemm_packed_us": gpu_time_ms(cold(
                               lambda p: ops.dequant_matmul(x, p, scale, zero, bits, g), packed)) * 1e3,  # noqa: B023
                           "gemm_tiled_us": gpu_time_ms(cold(
                               lambda t: ops.dequant_matmul_tiled(x, t, scale, zero, bits, g), tiled)) * 1e3}  # noqa: B023
                row["tiled_over_packed"] = row["gemm_tiled_us"] / row["gemm_packed_us"]
                rows.append(row)
                print(f"{n}x{k} W{bits}: untile {untile_us:6.1f} us ({row['untile_TBps']:.2f} TB/s) | M={m} "
                      f"GEMM packed {row['gemm_packed_us']:7.1f} tiled {row['gemm_tiled_us']:7.1f} "
                      f"({row['tiled_over_packed']:.2f}x)", flush=True)
    timing.save_rows(args.out, rows)


if __name__ == "__main__":
    main()
