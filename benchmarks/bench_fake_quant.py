"""Fake-quant forward / backward against the peers, on LLaMA-2 linear shapes (see benchmarks/NOTES.md).

Peers measured in the same run: the eager PyTorch formula (qatext.reference), torch.compile of the
same formula (forward, and forward + backward), torch.fake_quantize_per_channel_affine and
torch._fake_quantize_learnable_per_channel_affine (per-channel, fp32 as those builtins require), and
a device copy of the same bytes as the ceiling. CUDA events, warm-up, median of repeats, random data.

    python benchmarks/bench_fake_quant.py --out benchmarks/results/fake_quant_h100.json
    python benchmarks/bench_fake_quant.py --qatext-only   # qatext's kernels and the copy, no peers (seconds)
"""

from __future__ import annotations

import argparse
import json

import torch

import qatext
from qatext import ops, reference
from timing import cuda_time_ms as bench

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 28672)]


def qparams(w, bits, g):
    n, k = w.shape
    groups = 1 if g == -1 else k // g
    scale = (torch.rand(n, groups, device=w.device) * 0.5 + 0.75) * (4.0 / (1 << bits)) * w.float().std()
    zero = torch.full((n, groups), float(1 << (bits - 1)), device=w.device)
    return scale, zero


def run_case(n, k, g, bits, dtype, peers=True):
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    grad = torch.randn_like(w)
    scale, zero = qparams(w, bits, g)
    elem = w.element_size()
    qbytes = scale.numel() * 8
    fwd_bytes = 2 * w.numel() * elem + qbytes          # read W, write W_hat, read s and z
    bwd_bytes = 3 * w.numel() * elem + 3 * qbytes      # read W and dY, write dW, s/z in, ds/dz out
    copy_src = torch.empty(fwd_bytes // 2, dtype=torch.uint8, device="cuda").random_()
    copy_dst = torch.empty_like(copy_src)
    copy_ms = bench(lambda: copy_dst.copy_(copy_src))
    copy_bw = 2 * copy_src.numel() / copy_ms / 1e6  # GB/s

    row = {"N": n, "K": k, "group_size": g, "bits": bits, "dtype": str(dtype).replace("torch.", ""),
           "copy_GBps": copy_bw}
    qatext.set_value_checks(False)
    row["qatext_fwd_ms"] = bench(lambda: ops.fake_quant(w, scale, zero, bits, g))
    row["qatext_bwd_ms"] = bench(lambda: torch.ops.qatext.fake_quant_backward(grad, w, scale, zero, bits, g))
    wl, sl, zl = (t.clone().requires_grad_() for t in (w, scale, zero))

    def clear():  # time fresh gradients, not accumulation into .grad
        wl.grad = sl.grad = zl.grad = None

    def qatext_fwd_bwd():
        clear()
        ops.fake_quant(wl, sl, zl, bits, g).backward(grad)
    row["qatext_fwd_bwd_ms"] = bench(qatext_fwd_bwd)
    row["fwd_GBps"] = fwd_bytes / row["qatext_fwd_ms"] / 1e6
    row["bwd_GBps"] = bwd_bytes / row["qatext_bwd_ms"] / 1e6
    row["fwd_pct_copy"] = 100 * row["fwd_GBps"] / copy_bw
    row["bwd_pct_copy"] = 100 * row["bwd_GBps"] / copy_bw
    if not peers:
        return row

    row["eager_fwd_ms"] = bench(lambda: reference.fake_quant(w, scale, zero, bits, g))
    torch._dynamo.reset()

    def formula(w_, s_, z_):
        return reference.fake_quant(w_, s_, z_, bits, g)
    compiled = torch.compile(formula, dynamic=False)
    row["compile_fwd_ms"] = bench(lambda: compiled(w, scale, zero))

    def compile_fwd_bwd():
        clear()
        compiled(wl, sl, zl).backward(grad)
    row["compile_fwd_bwd_ms"] = bench(compile_fwd_bwd)
    if g == -1:
        w32, s32 = w.float(), scale[:, 0].contiguous()
        zi = zero[:, 0].to(torch.int32)
        row["torch_per_channel_fp32_fwd_ms"] = bench(
            lambda: torch.fake_quantize_per_channel_affine(w32, s32, zi, 0, 0, 2**bits - 1))
        w32g, s32g, z32g = w32.clone().requires_grad_(), s32.clone().requires_grad_(), zero[:, 0].clone().requires_grad_()

        def learnable():
            w32g.grad = s32g.grad = z32g.grad = None
            torch._fake_quantize_learnable_per_channel_affine(w32g, s32g, z32g, 0, 0, 2**bits - 1).backward(grad.float())
        row["torch_learnable_fp32_fwd_bwd_ms"] = bench(learnable)
    qatext.set_value_checks(True)
    row["fwd_speedup_vs_compile"] = row["compile_fwd_ms"] / row["qatext_fwd_ms"]
    row["fwd_bwd_speedup_vs_compile"] = row["compile_fwd_bwd_ms"] / row["qatext_fwd_bwd_ms"]
    return row


def per_token_case(m, k, bits, dtype, peers=True):
    """W4A8's dynamic activation quantizer: one row per token."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    grad = torch.randn_like(x)
    row = {"M": m, "K": k, "bits": bits, "dtype": str(dtype).replace("torch.", ""),
           "qatext_fwd_ms": bench(lambda: ops.fake_quant_per_token(x, bits, False)),
           "qatext_bwd_ms": bench(lambda: torch.ops.qatext.fake_quant_per_token_backward(grad, x, bits, False))}
    if peers:
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: reference.fake_quant_per_token(t, bits, False), dynamic=False)
        row["eager_fwd_ms"] = bench(lambda: reference.fake_quant_per_token(x, bits, False))
        row["compile_fwd_ms"] = bench(lambda: compiled(x))
    elem = x.element_size()
    row["fwd_GBps"] = 2 * x.numel() * elem / row["qatext_fwd_ms"] / 1e6  # read x (once from DRAM) + write
    row["bwd_GBps"] = 3 * x.numel() * elem / row["qatext_bwd_ms"] / 1e6
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--qatext-only", action="store_true", help="time qatext's kernels and the copy, no peers")
    args = parser.parse_args()
    peers = not args.qatext_only
    rows = []
    for n, k in SHAPES:
        for g in (128, -1):
            for bits in (4, 2):
                row = run_case(n, k, g, bits, torch.bfloat16, peers)
                rows.append(row)
                line = (f"{n}x{k} g{g} W{bits}: fwd {row['qatext_fwd_ms'] * 1e3:.1f} us ({row['fwd_pct_copy']:.0f}% "
                        f"copy), bwd {row['qatext_bwd_ms'] * 1e3:.1f} us ({row['bwd_pct_copy']:.0f}%)")
                if peers:
                    line += (f", fwd+bwd {row['fwd_bwd_speedup_vs_compile']:.2f}x compile; eager fwd "
                             f"{row['eager_fwd_ms'] * 1e3:.0f} us, compile fwd {row['compile_fwd_ms'] * 1e3:.0f} us")
                print(line, flush=True)
    per_token = [per_token_case(m, k, 8, torch.bfloat16, peers)
                 for m, k in [(4096, 4096), (4096, 11008), (16384, 8192)]]
    for r in per_token:
        line = (f"per-token {r['M']}x{r['K']} A8: fwd {r['qatext_fwd_ms'] * 1e3:.1f} us ({r['fwd_GBps']:.0f} GB/s), "
                f"bwd {r['qatext_bwd_ms'] * 1e3:.1f} us ({r['bwd_GBps']:.0f} GB/s)")
        if peers:
            line += f"; compile fwd {r['compile_fwd_ms'] * 1e3:.0f} us, eager fwd {r['eager_fwd_ms'] * 1e3:.0f} us"
        print(line, flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "build": qatext.build_info(),
              "rows": rows, "per_token": per_token}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
