"""A SwiGLU MLP's gate/up decode GEMM with silu(gate) * up in its epilogue (ops.swiglu_matmul_tiled)
against the same GEMM followed by the product as a compiled model runs it (one inductor kernel), on the
LLaMA gate/up shapes, small M, same run. Both are timed as a decode step sees them: CUDA events around
a CUDA graph of 20 calls, cold weights (`timing.cold`), medians; each weight tuned as a layer tunes it.

    python benchmarks/bench_swiglu.py --out benchmarks/results/swiglu_h200.json

Per row: `gemm_us` (the GEMM alone, dequant_matmul_tiled), `unfused_us` (GEMM + inductor's silu x up),
`fused_us`, `saved_us` = unfused - fused, and the fused output's largest error against the unfused one
relative to the output's largest value.
"""

from __future__ import annotations

import timing
import torch
from bench_gemm import random_weight
from timing import cold
from timing import cuda_graph_time_ms as gpu_time_ms

from qatext import ops

# gate + up rows x K: LLaMA-2-7B, LLaMA-2-13B, Llama-3-8B
SHAPES = [(2 * 11008, 4096), (2 * 13824, 5120), (2 * 14336, 4096)]
CONFIGS = [(4, 128), (3, 128), (2, 64)]


def calls(product, x, bits, g):
    """The GEMM alone, the GEMM then the compiled product, the fused op: each of (tiled, scale, zero)."""
    return (lambda w, s, z: ops.dequant_matmul_tiled(x, w, s, z, bits, g),
            lambda w, s, z: product(ops.dequant_matmul_tiled(x, w, s, z, bits, g)),
            lambda w, s, z: ops.swiglu_matmul_tiled(x, w, s, z, bits, g))


def main():
    p = timing.parser(__doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16])
    args = timing.start(p)
    timing.require_gpu(p)
    torch._dynamo.config.cache_size_limit = 64  # one compiled product a (shape, M)
    product = torch.compile(lambda y: torch.nn.functional.silu(y[..., : y.shape[-1] // 2]) * y[..., y.shape[-1] // 2:])
    rows = []
    for n, k in SHAPES:
        for bits, g in CONFIGS:
            packed, scale, zero = random_weight(n, k, bits, g)
            tiled = ops.tile_packed(packed, bits, k)
            ops.tune_decode_gemm(tiled, scale, zero, bits, g, k)
            for m in args.tokens:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                gemm, unfused, fused = (cold(call, tiled, scale, zero) for call in calls(product, x, bits, g))
                a, b = fused(), unfused()
                err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                row = {"n": n, "k": k, "bits": bits, "group_size": g, "m": m, "gemm_us": 1e3 * gpu_time_ms(gemm),
                       "unfused_us": 1e3 * gpu_time_ms(unfused), "fused_us": 1e3 * gpu_time_ms(fused),
                       "fused_rel_err": err}
                row["saved_us"] = row["unfused_us"] - row["fused_us"]
                rows.append(row)
                print({key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}, flush=True)
    timing.save_rows(args.out, rows)


if __name__ == "__main__":
    main()
