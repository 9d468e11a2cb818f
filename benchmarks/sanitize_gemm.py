"""Small dequant-GEMM workload for compute-sanitizer (memcheck / racecheck): the fused kernel at every
bit width and token tile (1, 2 and 4 m16 tiles, a partial tile), split-K on and off, both directions;
and the decode kernel on the tiled layout (1, 2 and 4 token tiles, several token blocks, a partial column
block, split-K on and off, through a cluster and through global partials, the warps of a block splitting K,
2 and 4 row tiles per warp, rings of 4 and 8 stages, SwiGLU's epilogue; grouped over stacked experts); the staged
kernel; and beyond them, the tiled layout untiled and
dequantised straight into a 16- or 32-bit weight (group sizes that a lane's 16 columns straddle
included); and the packed codes dequantised at every width 2-8 into each dtype, from aligned and odd
addresses (the vector and element-wise kernels); QA-LoRA's pooling and its transpose at 1 to 32 lanes a
group and past them."""

import itertools

import torch

import qatext
from qatext import ops

qatext.set_tuning(dequant_gemm_max_m=512)  # every M here takes the fused kernel


def tiled_weight(n, k, bits, g):
    """Random codes in the tiled layout, with scales and zeros."""
    packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda"), bits)
    scale = torch.rand(n, 1 if g == -1 else k // g, device="cuda") * 0.1 + 0.01
    return ops.tile_packed(packed, bits, k), scale, torch.full_like(scale, 1.5)


for n, k, g in [(256, 384, 32), (128, 128, -1), (384, 512, 128)]:
    for bits in (2, 3, 4):
        packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda"), bits)
        scale = torch.rand(n, 1 if g == -1 else k // g, device="cuda") * 0.1 + 0.01
        zero = torch.full_like(scale, 1.5)
        for m in (1, 20, 33, 64, 70):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ops.dequant_matmul(x, packed, scale, zero, bits, g, torch.randn(n, device="cuda", dtype=torch.bfloat16))
            torch.ops.qatext.dequant_matmul_grad_input(torch.randn(m, n, device="cuda", dtype=torch.float16),
                                                       packed, scale, zero, bits, g, k)
# (4352 rows in 1-tile slices: 4 row tiles per warp, a partial last column block.)
# (Warp split: a block's warps split K, summed in shared memory; min slice and cluster unused.)
# (2 and 3 stages: the 32-token blocks of m = 37, their sums in units of the group's scale.)
settings = [(*s, 0) for s in itertools.product((1, 8), (2, 3, 4, 8), (0, 1))] + [(8, d, 0, 1) for d in (2, 3, 4, 8)]
for (n, k, g), (min_slice, stages, cluster, warp_split) in itertools.product(
        [(128, 64, -1), (1040, 512, 128), (256, 4096, 64), (4352, 1024, 128)], settings):
    qatext.set_tuning(decode_gemm_max_m=64, decode_gemm_min_slice=min_slice, decode_gemm_stages=stages,
                      decode_gemm_cluster=cluster, decode_gemm_warp_split=warp_split)
    for bits in (2, 3, 4):
        tiled, scale, zero = tiled_weight(n, k, bits, g)
        for m in (1, 7, 16, 37):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g, torch.randn(n, device="cuda", dtype=torch.float16))
            # SwiGLU in the warp-split epilogue: gate and up halves, 2 or 4 row tiles a block.
            ops.swiglu_matmul_tiled(x, tiled, scale, zero, bits, g, torch.randn(n, device="cuda", dtype=torch.float16))
# Grouped experts (one decode launch over the stacked experts): idle experts, token tiles that end at an expert's
# last row, a tile height of 8 and 16, SwiGLU per expert, rows routed past the list.
qatext.set_tuning(decode_gemm_max_m=64, decode_gemm_min_slice=8, decode_gemm_stages=4, decode_gemm_cluster=0,
                  decode_gemm_warp_split=0)
for (n, k, g), counts in itertools.product([(64, 256, 64), (1040, 512, 128)], [[0, 1, 0, 3], [17, 0, 9, 40]]):
    for bits in (2, 3, 4):
        tiled, scale, zero = tiled_weight(len(counts) * n, k, bits, g)
        offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
        x = torch.randn(sum(counts) + 2, k, device="cuda", dtype=torch.bfloat16)
        ops.grouped_matmul_tiled(x, offs, tiled, scale, zero, bits, g, False)
        if n % 32 == 0:
            ops.grouped_matmul_tiled(x, offs, tiled, scale, zero, bits, g, True)
# The staged kernel: 4, 8 and 16 token tiles (several token blocks, a partial last one), 1 (wgmma from 64 tokens)
# and 2 row tiles a warp, a partial column block, split-K of one to many slices through a cluster and through global
# partials.
for (n, k, g), (min_slice, row_tiles, cluster) in itertools.product(
        [(48, 384, -1), (1040, 512, 128), (256, 4096, 64)], itertools.product((1, 8), (1, 2), (0, 1))):
    qatext.set_tuning(decode_gemm_max_m=0, staged_gemm_max_m=512, decode_gemm_min_slice=min_slice,
                      decode_gemm_row_tiles=row_tiles, staged_gemm_cluster=cluster)
    for bits in (2, 3, 4):
        tiled, scale, zero = tiled_weight(n, k, bits, g)
        for m in (17, 64, 150):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g, torch.randn(n, device="cuda", dtype=torch.bfloat16))
qatext.set_tuning(decode_gemm_max_m=0, staged_gemm_max_m=0, dequant_gemm_max_m=0)  # dequant_tiled + cuBLAS, untile
for n, k, g in [(48, 384, 24), (1040, 512, 128), (128, 64, -1)]:
    for bits, dtype in itertools.product((2, 3, 4), (torch.bfloat16, torch.float32)):
        tiled, scale, zero = tiled_weight(n, k, bits, g)
        ops.dequant_matmul_tiled(torch.randn(3, k, device="cuda", dtype=dtype), tiled, scale, zero, bits, g)
        ops.untile_packed(tiled, bits, k)
for bits, dtype, (n, k, g) in itertools.product(range(2, 9), (torch.bfloat16, torch.float16, torch.float32),
                                                [(33, 256, 8), (7, 1024, 256), (5, 100, -1)]):
    packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda"), bits)
    scale = torch.rand(n, 1 if g == -1 else k // g, device="cuda") * 0.1 + 0.01
    zero = torch.full_like(scale, 1.5)
    odd = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view(packed.shape)
    odd.copy_(packed)
    for codes in (packed, odd):
        ops.dequant(codes, scale, zero, bits, g, k, dtype)
for (m, k, g), dtype in itertools.product([(5, 256, 8), (3, 512, 64), (7, 1024, 256), (2, 96, 24), (4, 4096, 512)],
                                          (torch.bfloat16, torch.float32)):
    pooled = ops.group_sum(torch.randn(m, k, device="cuda", dtype=dtype), g)
    ops.group_expand(pooled, g)
torch.cuda.synchronize()
print("sanitize workload done")
