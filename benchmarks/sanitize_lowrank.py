"""Small workload for compute-sanitizer (memcheck): the LR-QAT tile kernels at every padded rank
(16 / 32 / 64), groups per tile (4 / 2 / 1, per-channel), P format (INT2/3/4/8, fixed point), both
directions (the backward with and without W) and dtypes, one tile per block and a few blocks running
through every tile (crossing column tiles, with idle warps past the last row tile), the adapters' gradients
from dU in one read (every padded rank, partial row and column blocks, blocks through several row chunks,
stacked experts), and the vectorised E2E-QP group-code dot at every bit width."""

import itertools

import torch

import qatext
from qatext import ops

for (n, k, r, bits, g, frac), dtype, blocks in itertools.product(
        [(64, 512, 32, 4, 128, 0), (48, 256, 8, 4, 32, 0), (32, 384, 64, 2, 64, 0), (16, 256, 16, 3, -1, 0),
         (32, 512, 32, 4, 256, 4), (16, 128, 20, 8, 128, 0), (144, 640, 48, 3, 64, 0)],
        (torch.bfloat16, torch.float16), (0, 2)):
    with qatext.tuning(lrqat_fused_blocks=blocks):
        qmax = (1 << bits) - 1
        p = (ops.pack(torch.randint(0, qmax + 1, (n, k), dtype=torch.uint8, device="cuda"), bits) if frac == 0
             else torch.randint(0, qmax * (1 << frac) + 1, (n, k), dtype=torch.uint8, device="cuda"))
        a = torch.randn(n, r, device="cuda", dtype=dtype)
        b = torch.randn(r, k, device="cuda", dtype=dtype)
        groups = 1 if g == -1 else k // g
        scale = torch.rand(n, groups, device="cuda") * 0.1 + 0.01
        zero = torch.full_like(scale, qmax / 2)
        ops.lrqat_weight(p, a, b, scale, zero, 0.5, bits, g, frac)
        torch.ops.qatext.lrqat_weight_backward(torch.randn(n, k, device="cuda", dtype=dtype), p, a, b, scale, zero,
                                               0.5, bits, g, frac)
        torch.ops.qatext.lrqat_linear_backward(torch.randn(5, n, device="cuda", dtype=dtype),
                                               torch.randn(5, k, device="cuda", dtype=dtype), p, a, b, scale, zero,
                                               0.5, bits, g, frac, True)  # dU over dW, W written too
for (experts, n, k, r), dtype in itertools.product(
        [(1, 192, 1408, 20), (1, 9600, 128, 16), (1, 9600, 256, 64), (3, 128, 640, 48), (2, 64, 128, 32)],
        (torch.bfloat16, torch.float16)):
    lead = (experts,) if experts > 1 else ()
    torch.ops.qatext.lrqat_rank_grads(torch.randn(*lead, n, k, device="cuda", dtype=dtype),
                                      torch.randn(*lead, n, r, device="cuda", dtype=dtype),
                                      torch.randn(*lead, r, k, device="cuda", dtype=dtype))
for bits in (2, 3, 4, 8):
    for g in (32, 128, -1):
        n, k, m = 96, 384, 40
        packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda"), bits)
        zero = torch.full((n, 1 if g == -1 else k // g), 1.5, device="cuda")
        ops.e2eqp_scale_grad(torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                             torch.randn(m, n, device="cuda", dtype=torch.bfloat16), packed, zero, bits, g)
torch.cuda.synchronize()
print("sanitize workload done")
