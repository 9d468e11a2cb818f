"""E2E-QP's scale gradient: the dW path (grad_y^T x formed whole, N x K fp32) against qatext's
row-blocked version, for one layer at M tokens, bf16: time and peak extra memory, same run.

    python benchmarks/bench_e2eqp.py --out benchmarks/results/e2eqp_h100.json
"""

from __future__ import annotations


import torch

import qatext
from qatext import ops
import timing
from timing import cuda_time_ms, peak_extra_mib

LAYERS = [(11008, 4096), (4096, 11008)]  # (N, K): 4096 -> 11008 and 11008 -> 4096


def measure(fn):
    return cuda_time_ms(fn, warmup=1, repeats=10, inner=5), peak_extra_mib(fn)


def main():
    parser = timing.parser()
    parser.add_argument("--tokens", type=int, default=4096)
    args = timing.start(parser)
    timing.require_gpu(parser)
    rows = []
    for n, k in LAYERS:
        bits, g = 4, 128
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        grad_y = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        packed = ops.pack(torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda"), bits)
        zero = torch.full((n, k // g), 8.0, device="cuda")
        blocked = measure(lambda: ops.e2eqp_scale_grad(x, grad_y, packed, zero, bits, g))
        with qatext.tuning(dw_chunk_elements=max(n, args.tokens) * k):  # one block: the whole dW at once
            whole = measure(lambda: ops.e2eqp_scale_grad(x, grad_y, packed, zero, bits, g))
        row = {"M": args.tokens, "N": n, "K": k, "bits": bits, "group_size": g,
               "blocked_ms": blocked[0], "blocked_peak_MiB": blocked[1],
               "dw_path_ms": whole[0], "dw_path_peak_MiB": whole[1],
               "memory_ratio": blocked[1] / whole[1], "time_ratio": blocked[0] / whole[0],
               "gemm_tflops_blocked": 2 * args.tokens * n * k / blocked[0] / 1e9}
        rows.append(row)
        print(f"M={args.tokens} {k}->{n}: blocked {blocked[0] * 1e3:.0f} us, {blocked[1]:.0f} MiB; dW path "
              f"{whole[0] * 1e3:.0f} us, {whole[1]:.0f} MiB; memory x{row['memory_ratio']:.2f}, "
              f"time x{row['time_ratio']:.2f}", flush=True)
    timing.save_rows(args.out, rows)


if __name__ == "__main__":
    main()
