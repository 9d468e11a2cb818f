"""LR-QAT weight reconstruction kernels alone: the tensor-core kernels (A B formed in registers)
against the fp32 path (A B by cuBLAS into an N x K fp32 tensor, then elementwise), with the bytes
floor (read P, write W forward; read P and dW, write dU backward) and copy bandwidth, same run; the adapters'
gradients from dU (one read by the rank kernel against two cuBLAS GEMMs); and lrqat_linear's whole backward
at M tokens, one weight-kernel pass against the two it replaced.

    python benchmarks/bench_lowrank.py --out benchmarks/results/lowrank_h100.json
"""

from __future__ import annotations


import torch

import qatext
from qatext import ops
import timing
from timing import cuda_time_ms

SHAPES = [(11008, 4096), (4096, 11008), (28672, 8192)]  # (N, K)


def main():
    parser = timing.parser()
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096, help="M of the linear backward rows")
    args = timing.start(parser)
    timing.require_gpu(parser)
    rows = []
    buf = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    copy_ms = cuda_time_ms(lambda: buf.clone())
    copy_bw = 2 * buf.numel() / copy_ms / 1e9  # bytes read + written, TB/s
    for n, k in SHAPES:
        for frac in (0, 4):
            p = (ops.pack(torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda"), 4) if frac == 0
                 else torch.randint(0, 241, (n, k), dtype=torch.uint8, device="cuda"))
            a = torch.randn(n, args.rank, device="cuda", dtype=torch.bfloat16) * 0.02
            b = torch.randn(args.rank, k, device="cuda", dtype=torch.bfloat16)
            scale = torch.rand(n, k // 128, device="cuda") * 0.01 + 0.01
            zero = torch.full((n, k // 128), 8.0, device="cuda")
            grad_w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            fwd = lambda: ops.lrqat_weight(p, a, b, scale, zero, 1.0, 4, 128, frac)  # noqa: E731
            bwd = lambda: torch.ops.qatext.lrqat_weight_backward(grad_w, p, a, b, scale, zero, 1.0, 4, 128, frac)  # noqa: E731
            p_bytes = p.numel()
            floor = {"fwd": p_bytes + 2 * n * k, "bwd": p_bytes + 4 * n * k}
            for path in ("fused", "fp32_ab"):
                qatext.set_tuning(lrqat_fused=path == "fused")
                for direction, fn in (("fwd", fwd), ("bwd", bwd)):
                    ms = cuda_time_ms(fn, warmup=3, repeats=15, inner=5)
                    bw = floor[direction] / ms / 1e9
                    rows.append({"N": n, "K": k, "rank": args.rank, "P": "int4" if frac == 0 else "q4.4",
                                 "path": path, "direction": direction, "us": ms * 1e3, "floor_bytes": floor[direction],
                                 "TB_per_s": bw, "pct_of_copy": 100 * bw / copy_bw})
                    r = rows[-1]
                    print(f"{n}x{k} {r['P']} {path:8s} {direction}: {r['us']:8.1f} us  {bw:5.2f} TB/s "
                          f"({r['pct_of_copy']:.0f}% of copy)", flush=True)
            qatext.set_tuning(lrqat_fused=True)
            if frac == 0:
                rows += rank_grad_rows(grad_w, a, b, copy_bw)
                rows += linear_backward_rows(p, a, b, scale, zero, args.tokens)
    timing.save_rows(args.out, rows, copy_TB_per_s=copy_bw)


def rank_grad_rows(grad_u, a, b, copy_bw):
    """dA = dU B^T and dB = A^T dU: the one-read kernel against two cuBLAS GEMMs (each reading dU), with the
    floor of one read of dU."""
    n, k = grad_u.shape
    floor = 2 * n * k
    rows = []
    for path, kernel in (("kernel", 1), ("cublas", 0)):
        with qatext.tuning(lrqat_rank_kernel=kernel):
            ms = cuda_time_ms(lambda: torch.ops.qatext.lrqat_rank_grads(grad_u, a, b), warmup=3, repeats=15, inner=5)
        bw = floor / ms / 1e9
        rows.append({"N": n, "K": k, "rank": a.shape[1], "path": path, "direction": "rank_grads", "us": ms * 1e3,
                     "floor_bytes": floor, "TB_per_s": bw, "pct_of_copy": 100 * bw / copy_bw})
        pct = rows[-1]["pct_of_copy"]
        print(f"{n}x{k} rank_grads {path:6s}: {ms * 1e3:8.1f} us  {bw:5.2f} TB/s ({pct:.0f}% of copy)", flush=True)
    return rows


def linear_backward_rows(p, a, b, scale, zero, tokens):
    """lrqat_linear's whole backward (dW and dX GEMMs, the weight kernels, the adapters' gradients) as one op,
    whose weight-kernel pass also writes W for dX, with the rank kernel and with two cuBLAS GEMMs for dA, dB,
    against the two passes it replaced: W rebuilt by the forward kernel, then the backward kernel."""
    n, k = a.shape[0], b.shape[1]
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    qargs = (p, a, b, scale, zero, 1.0, 4, 128, 0)

    def two_pass():
        w = ops.lrqat_weight(*qargs)
        gy @ w
        torch.ops.qatext.lrqat_weight_backward(gy.t() @ x, *qargs)

    def one_pass_cublas_rank():
        with qatext.tuning(lrqat_rank_kernel=0):
            torch.ops.qatext.lrqat_linear_backward(gy, x, *qargs, True)

    rows = []
    for path, fn in (("one_pass", lambda: torch.ops.qatext.lrqat_linear_backward(gy, x, *qargs, True)),
                     ("one_pass_cublas_rank", one_pass_cublas_rank), ("two_pass", two_pass)):
        ms = cuda_time_ms(fn, warmup=3, repeats=15, inner=3)
        rows.append({"N": n, "K": k, "rank": a.shape[1], "P": "int4", "path": path, "direction": "linear_bwd",
                     "M": tokens, "us": ms * 1e3})
        print(f"{n}x{k} int4 {path:20s} linear_bwd (M = {tokens}): {ms * 1e3:8.1f} us", flush=True)
    return rows


if __name__ == "__main__":
    main()
