"""One dequant-GEMM launch after warm-up, for Nsight Compute: the v4 fused kernel on the packed layout,
or with --tiled the decode kernel on the tiled layout (with --staged, the staged kernel).

    ncu --kernel-name regex:'dequant_gemm_kernel|decode_gemm_kernel' --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python benchmarks/profile_gemm.py [--tiled] [--n N --k K --m M]

A decode kernel variant past 16 tokens: --tiled --m 32 --tuning decode_gemm_max_m=128,decode_gemm_autotune=0,
decode_gemm_stages=3 (the knobs: qatext.tuning_table()).
"""

import timing
import torch

import qatext
from qatext import ops

parser = timing.parser()
parser.add_argument("--tiled", action="store_true")
parser.add_argument("--staged", action="store_true", help="with --tiled: the staged kernel, not the decode kernel")
parser.add_argument("--row-tiles", type=int, default=2, help="with --staged: most row tiles a warp (1 or 2)")
parser.add_argument("--n", type=int, default=11008)
parser.add_argument("--k", type=int, default=4096)
parser.add_argument("--m", type=int, default=1)
parser.add_argument("--bits", type=int, default=4)
args = timing.start(parser)
timing.require_gpu(parser)
if args.staged:
    qatext.set_tuning(decode_gemm_max_m=0, staged_gemm_max_m=1 << 20, decode_gemm_row_tiles=args.row_tiles)
n, k, bits, g = args.n, args.k, args.bits, 128
packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda"), bits)
tiled = ops.tile_packed(packed, bits, k)
scale = torch.rand(n, k // g, device="cuda") * 0.01 + 0.005
zero = torch.rand(n, k // g, device="cuda") * (1 << bits)
x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    if args.tiled:
        ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g)
    else:
        ops.dequant_matmul(x, packed, scale, zero, bits, g)
torch.cuda.synchronize()
