"""One fused dequant-GEMM launch (11008x4096 W4 g128, M=1, bf16) after warm-up, for Nsight Compute:

    ncu --kernel-name regex:dequant_gemm_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python benchmarks/profile_gemm.py
"""

import torch

import qatext
from qatext import ops

qatext.set_value_checks(False)
n, k, bits, g = 11008, 4096, 4, 128
packed = ops.pack(torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda"), bits)
scale = torch.rand(n, k // g, device="cuda") * 0.01 + 0.005
zero = torch.rand(n, k // g, device="cuda") * 16
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    ops.dequant_matmul(x, packed, scale, zero, bits, g)
torch.cuda.synchronize()
