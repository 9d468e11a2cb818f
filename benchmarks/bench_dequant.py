"""The streaming kernels QA-LoRA and E2E-QP training run each step: over a whole packed weight,
`dequant` (packed codes -> bf16 weight, before a cuBLAS GEMM in the forward and the input gradient)
and E2E-QP's group-code dot (its scale gradient from the fp32 dW), on the LLaMA shapes; over the
activations, QA-LoRA's pooling `group_sum` and its transpose `group_expand` (M = 4096, g = 128) beside
the torch ops they replaced. Each against a device copy of the same bytes in the same run (the ceiling).

    python benchmarks/bench_dequant.py --out benchmarks/results/dequant_h200.json

Per row: median us (CUDA events, cold weights: copies cycled past twice the L2), bytes moved, and the
share of the copy rate. The group-code dot's time is its kernel's device time (torch.profiler) inside
`e2eqp_scale_grad` at 16 tokens, since the op also runs the dW GEMM.
"""

from __future__ import annotations

import torch

from qatext import ops
import timing
from timing import cold, cuda_time_ms

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]  # (N, K)


def copy_us(nbytes: int) -> float:
    """One device copy moving nbytes in all (nbytes / 2 read, nbytes / 2 written), cold."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    return cuda_time_ms(cold(lambda s: torch.empty_like(s).copy_(s), src)) * 1e3


def kernel_us(fn, name: str) -> float:
    """Device time per fn() call of the kernels whose name contains `name`."""
    ops_ = timing.profile_ops(fn, steps=5, rows=100)
    return sum(o["self_us"] for o in ops_ if name in o["op"])


def main():
    parser = timing.parser()
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group-size", type=int, default=128)
    args = timing.start(parser)
    timing.require_gpu(parser)
    g, rows = args.group_size, []
    for n, k in SHAPES:
        for bits in args.bits:
            packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda"), bits)
            scale = torch.rand(n, k // g, device="cuda") * 0.01 + 0.005
            zero = torch.rand(n, k // g, device="cuda") * (1 << bits)
            qbytes = packed.numel() + 8 * scale.numel()
            deq_bytes = qbytes + 2 * n * k  # codes, scales and zeros in, bf16 weight out
            deq = cuda_time_ms(cold(lambda p, s, z: ops.dequant(p, s, z, bits, g, k, torch.bfloat16),  # noqa: B023
                                    packed, scale, zero)) * 1e3
            x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
            gy = torch.randn(16, n, device="cuda", dtype=torch.bfloat16)
            dot = kernel_us(lambda: ops.e2eqp_scale_grad(x, gy, packed, zero, bits, g), "group_code_dot")  # noqa: B023
            dot_bytes = 4 * n * k + packed.numel() + 8 * zero.numel()  # fp32 dW, codes and zeros in, scale grad out
            row = {"N": n, "K": k, "bits": bits, "group_size": g,
                   "dequant_us": deq, "dequant_bytes": deq_bytes, "copy_same_bytes_us": copy_us(deq_bytes),
                   "group_code_dot_us": dot, "group_code_dot_bytes": dot_bytes,
                   "copy_dot_bytes_us": copy_us(dot_bytes)}
            row["dequant_pct_of_copy"] = 100 * row["copy_same_bytes_us"] / deq
            row["group_code_dot_pct_of_copy"] = 100 * row["copy_dot_bytes_us"] / dot if dot else None
            rows.append(row)
            print(f"{n}x{k} W{bits}: dequant {deq:6.1f} us ({row['dequant_pct_of_copy']:.0f}% of a copy of its "
                  f"{deq_bytes / 1e6:.0f} MB) | group-code dot {dot:6.1f} us "
                  f"({row['group_code_dot_pct_of_copy'] or 0:.0f}% of a copy of {dot_bytes / 1e6:.0f} MB)", flush=True)
    for k in (4096, 11008):  # QA-LoRA's pooling of x [M, K] and the input gradient's broadcast, bf16
        x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
        pooled = ops.group_sum(x, g)
        row = {"M": 4096, "K": k, "group_size": g,
               "group_sum_us": cuda_time_ms(lambda: ops.group_sum(x, g)) * 1e3,  # noqa: B023
               "torch_sum_us": cuda_time_ms(lambda: x.unflatten(-1, (-1, g)).sum(-1)) * 1e3,  # noqa: B023
               "group_expand_us": cuda_time_ms(lambda: ops.group_expand(pooled, g)) * 1e3,  # noqa: B023
               "torch_expand_us": cuda_time_ms(
                   lambda: pooled.unsqueeze(-1).expand(*pooled.shape, g).reshape(x.shape)) * 1e3,  # noqa: B023
               "copy_same_bytes_us": copy_us(2 * x.numel() * x.element_size())}
        rows.append(row)
        print(f"M 4096 K {k}: group_sum {row['group_sum_us']:.1f} us (torch {row['torch_sum_us']:.1f}) | group_expand "
              f"{row['group_expand_us']:.1f} us (torch {row['torch_expand_us']:.1f}) | copy of x "
              f"{row['copy_same_bytes_us']:.1f} us (read and write: each op does one of the two)", flush=True)
    timing.save_rows(args.out, rows)


if __name__ == "__main__":
    main()
