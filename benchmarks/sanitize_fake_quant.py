"""Small fake-quant workload for compute-sanitizer (memcheck / racecheck): every kernel path once."""

import torch

from qatext import ops

for n, k, g in [(7, 96, 32), (9, 256, 128), (5, 512, 256), (3, 160, 160), (31, 1024, -1), (5, 100, -1)]:
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        groups = 1 if g == -1 else k // g
        scale = torch.rand(n, groups, device="cuda") * 0.3 + 0.1
        zero = torch.full((n, groups), 8.0, device="cuda")
        ops.fake_quant(w, scale, zero, 4, g)
        torch.ops.qatext.fake_quant_backward(torch.randn_like(w), w, scale, zero, 4, g)
        ops.fake_quant_per_token(w, 8, False)
torch.cuda.synchronize()
print("sanitize workload done")
