"""Group-wise dequant GEMM (W4/W3/W2 x bf16, g128): qatext's fused kernel and its dequant + cuBLAS path
against cuBLAS bf16 and torch's int4 tinygemm, forward (y = x W^T) and grad input (gx = gy W), same run.

    python benchmarks/bench_gemm.py --out benchmarks/results/gemm_h100.json

Per row: median us of each path, speedup of qatext's dispatch over cuBLAS, % of the memory floor
(weight + activation bytes at the copy bandwidth measured in this run) and TFLOP/s. cuBLAS and qatext's
paths cycle through copies of their weight past twice the L2 (`timing.cold`: each call reads its weight
from DRAM, as a model's forward does); tinygemm's packed weight is made inside its own call and stays one.
"""

from __future__ import annotations


import torch

import qatext
from qatext import ops
import timing
from timing import cold, cuda_time_ms

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672)]  # (N, K)
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]
FUSED_UP_TO = 512  # beyond this the fused kernel (tiles of 64 tokens) is not a candidate


def copy_bandwidth() -> float:
    """Device copy bandwidth (bytes read + written per second) on a 1 GiB buffer."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), repeats=10, inner=5)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def floor_bytes(n, k, m, bits, g):
    """Bytes a packed GEMM must move at least: the codes, an fp32 scale and zero a group, x and the output
    (16-bit)."""
    return n * k * bits / 8 + n * (k // g) * 8 + 2 * m * (n + k)


def with_max_m(m, fn, knob="dequant_gemm_max_m"):
    """fn() with tuning knob `knob` set to m, then the old value back."""
    with qatext.tuning(**{knob: m}):
        return fn()


def random_weight(n, k, bits, g):
    """Random packed codes with scales and zeros of a realistic range, on the GPU."""
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda")
    scale = torch.rand(n, k // g, device="cuda") * 0.01 + 0.005
    zero = torch.rand(n, k // g, device="cuda") * (1 << bits)
    return ops.pack(codes, bits), scale, zero


def tinygemm_fn(x, n, k, g):
    """torch's int4 tinygemm on random codes (W4 only); None where this torch lacks it."""
    try:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        sz = torch.rand(k // g, n, 2, device="cuda", dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, packed, g, sz)
        return lambda: torch._weight_int4pack_mm(x, packed, g, sz)
    except (RuntimeError, AttributeError) as e:  # noqa: PERF203
        print(f"tinygemm unavailable: {e}")
        return None


def main():
    parser = timing.parser()
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="first n shapes only")
    args = timing.start(parser)
    timing.require_gpu(parser)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; fused kernel dispatched up to M = {qatext.get_tuning('dequant_gemm_max_m')}")
    rows = []
    for n, k in SHAPES[: args.shapes]:
        g = 128
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        weights = {}
        for bits in (4, 3, 2):
            weights[bits] = random_weight(n, k, bits, g)
        for m in TOKENS:
            repeat = dict(warmup=2, repeats=10, inner=3) if m >= 2048 else {}
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            cublas = cuda_time_ms(cold(lambda v: x @ v.t(), w), **repeat)  # noqa: B023
            cublas_gx = cuda_time_ms(cold(lambda v: gy @ v, w), **repeat)  # noqa: B023
            tg = tinygemm_fn(x, n, k, g)
            tinygemm = cuda_time_ms(tg, **repeat) if tg else None
            for bits, (packed, scale, zero) in weights.items():
                fwd = cold(lambda p, s, z: ops.dequant_matmul(x, p, s, z, bits, g), packed, scale, zero)  # noqa: B023
                bwd = cold(lambda p, s, z: torch.ops.qatext.dequant_matmul_grad_input(gy, p, s, z, bits, g, k),  # noqa: B023
                           packed, scale, zero)
                row = {"N": n, "K": k, "M": m, "bits": bits, "group_size": g, "cublas_us": cublas * 1e3,
                       "cublas_grad_input_us": cublas_gx * 1e3, "tinygemm_w4_us": tinygemm * 1e3 if tinygemm else None}
                for name, fn in (("fwd", fwd), ("grad_input", bwd)):
                    row[f"{name}_dispatch_us"] = cuda_time_ms(fn, **repeat) * 1e3
                    row[f"{name}_dequant_cublas_us"] = with_max_m(0, lambda: cuda_time_ms(fn, **repeat)) * 1e3  # noqa: B023
                    row[f"{name}_fused_us"] = (with_max_m(FUSED_UP_TO, lambda: cuda_time_ms(fn, **repeat)) * 1e3  # noqa: B023
                                               if m <= FUSED_UP_TO else None)
                # (bw counts every byte moved, as the floor does)
                row["floor_us"] = floor_bytes(n, k, m, bits, g) / bw * 1e6
                row["fwd_speedup_vs_cublas"] = row["cublas_us"] / row["fwd_dispatch_us"]
                row["grad_input_speedup_vs_cublas"] = row["cublas_grad_input_us"] / row["grad_input_dispatch_us"]
                row["fwd_pct_of_floor"] = 100 * row["floor_us"] / row["fwd_dispatch_us"]
                row["fwd_tflops"] = 2 * m * n * k / row["fwd_dispatch_us"] / 1e6
                rows.append(row)
                fused = f"{row['fwd_fused_us']:.1f}" if row["fwd_fused_us"] else "-"
                print(f"{n}x{k} M={m:5d} W{bits}: cuBLAS {row['cublas_us']:8.1f} | qatext {row['fwd_dispatch_us']:8.1f} "
                      f"(fused {fused}, deq+cuBLAS {row['fwd_dequant_cublas_us']:.1f}) x{row['fwd_speedup_vs_cublas']:.2f}"
                      f" {row['fwd_pct_of_floor']:.0f}% floor | gx cuBLAS {row['cublas_grad_input_us']:.1f} qatext "
                      f"{row['grad_input_dispatch_us']:.1f} x{row['grad_input_speedup_vs_cublas']:.2f}"
                      + (f" | tinygemm {row['tinygemm_w4_us']:.1f}" if tinygemm and bits == 4 else ""), flush=True)
    timing.save_rows(args.out, rows, copy_TBps=bw / 1e12)


if __name__ == "__main__":
    main()
