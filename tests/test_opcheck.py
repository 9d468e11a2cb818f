"""torch.library.opcheck on every op: schema, fake kernel, autograd registration, AOT dispatch."""

import pytest
import torch

from conftest import random_qparams
from qatext import ops


def _cases(device):
    n, k, g, bits = 9, 96, 32, 4
    w = torch.randn(n, k, device=device)
    scale, zero = random_qparams(n, k, bits, g, False, device)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    packed = ops.pack(codes, bits)
    x = torch.randn(3, k, device=device)
    grad_y = torch.randn(3, n, device=device)
    a, b = torch.randn(n, 4, device=device) * 0.1, torch.randn(4, k, device=device) * 0.1
    q44 = torch.randint(0, 241, (n, k), dtype=torch.uint8, device=device)
    n2, k2 = 32, 128  # the tiled layout needs N % 16 == 0 and K % 64 == 0
    packed2 = ops.pack(torch.randint(0, 16, (n2, k2), dtype=torch.uint8, device=device), 4)
    tiled2 = ops.tile_packed(packed2, 4, k2)
    scale2, zero2 = random_qparams(n2, k2, 4, 64, False, device)
    x2 = torch.randn(3, k2, device=device)
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    stacked = lambda t: torch.stack([t, t.flip(0)])  # noqa: E731  (two experts)
    a2, b2 = torch.randn(n2, 8, device=device) * 0.1, torch.randn(8, k2, device=device) * 0.1
    qa_a, qa_b = torch.randn(4, k // g, device=device), torch.randn(n, 4, device=device)  # QA-LoRA's adapter
    return {
        "fake_quant": [(rg(w), rg(scale), rg(zero), bits, g), (w.bfloat16(), scale[:, :1], zero[:, :1], 2, -1)],
        "fake_quant_backward": [(torch.randn_like(w), w, scale, zero, bits, g)],
        "fake_quant_per_token": [(rg(x), 8, False), (x.half(), 4, True)],
        "fake_quant_per_token_backward": [(torch.randn_like(x), x, 8, True)],
        "pack": [(codes, bits), (codes[:, :95] % 8, 3)],
        "unpack": [(packed, bits, k)],
        "dequant": [(packed, scale, zero, bits, g, k, torch.bfloat16), (packed, rg(scale), zero, bits, g, k, torch.float32)],
        "dequant_matmul": [(rg(x), packed, rg(scale), zero, bits, g, rg(torch.randn(n, device=device))),
                           (x.bfloat16(), packed, scale, zero, bits, g, None)],
        "dequant_matmul_grad_input": [(grad_y, packed, scale, zero, bits, g, k)],
        "tile_packed": [(packed2, 4, k2)],
        "untile_packed": [(tiled2, 4, k2)],
        "dequant_tiled": [(tiled2, scale2, zero2, 4, 64, k2, torch.bfloat16)],
        "dequant_matmul_tiled": [(x2.bfloat16(), tiled2, scale2, zero2, 4, 64, None),
                                 (x2, tiled2, scale2[:, :1], zero2[:, :1], 4, -1, torch.randn(n2, device=device))],
        "swiglu_matmul_tiled": [(x2.bfloat16(), tiled2, scale2, zero2, 4, 64, None),
                                (x2, tiled2, scale2[:, :1], zero2[:, :1], 4, -1, torch.randn(n2, device=device))],
        "grouped_matmul_tiled": [(x2.bfloat16(), torch.tensor([1, 2], dtype=torch.int32, device=device), tiled2, scale2,
                                  zero2, 4, 64, False),
                                 (x2, torch.tensor([3], dtype=torch.int32, device=device), tiled2, scale2, zero2, 4, 64,
                                  True)],
        "e2eqp_scale_grad": [(x, grad_y, packed, zero, bits, g)],
        "dequant_scale_grad": [(w, packed, zero, bits, g), (w.bfloat16(), packed, zero, bits, g)],
        "lrqat_weight": [(packed, rg(a), rg(b), rg(scale), zero, 0.5, bits, g, 0),
                         (q44, a.bfloat16(), b.bfloat16(), scale, zero, 0.5, bits, g, 4),
                         (stacked(packed2), rg(stacked(a2)), rg(stacked(b2)), rg(stacked(scale2)), stacked(zero2), 0.5,
                          4, 64, 0)],  # a mixture's experts: [E, N, ..]
        "lrqat_weight_backward": [(torch.randn_like(w), packed, a, b, scale, zero, 0.5, bits, g, 0),
                                  (torch.randn(2, n2, k2, device=device).bfloat16(), stacked(packed2),
                                   stacked(a2).bfloat16(), stacked(b2).bfloat16(), stacked(scale2), stacked(zero2), 0.5,
                                   4, 64, 0)],
        "lrqat_rank_grads": [(w, a, b), (torch.randn(n2 * 2, k2, device=device).bfloat16(), a2.repeat(2, 1).bfloat16(),
                                       b2.bfloat16()),
                             (torch.randn(2, n2 * 2, k2, device=device).half(), stacked(a2.repeat(2, 1)).half(),
                              stacked(b2).half())],
        "lrqat_linear": [(rg(x), packed, rg(a), rg(b), rg(scale), zero, rg(torch.randn(n, device=device)), 0.5, bits,
                          g, 0), (x.bfloat16(), q44, a.bfloat16(), b.bfloat16(), scale, zero, None, 0.5, bits, g, 4)],
        "lrqat_linear_backward": [(grad_y, x, packed, a, b, scale, zero, 0.5, bits, g, 0, True),
                                  (grad_y.bfloat16(), x.bfloat16(), q44, a.bfloat16(), b.bfloat16(), scale, zero, 0.5,
                                   bits, g, 4, False)],
        "qalora_linear": [(rg(x), packed, scale, zero, rg(qa_a), rg(qa_b), rg(torch.randn(n, device=device)), 0.5, bits,
                           g),
                          (rg(x.bfloat16()), packed, scale[:, :1], zero[:, :1], rg(qa_a[:, :1]), qa_b.bfloat16(), None,
                           2.0, bits, -1)],
        "group_sum": [(x, g), (x.bfloat16(), 8), (x.half(), -1)],
        "group_expand": [(torch.randn(3, k // g, device=device), g), (x.bfloat16(), 8), (x.t(), 3)],
    }


OPS = list(_cases("cpu"))


@pytest.mark.parametrize("name", OPS)
def test_opcheck(device, name):
    op = getattr(torch.ops.qatext, name).default
    for args in _cases(device)[name]:
        torch.library.opcheck(op, args)


def test_every_registered_op_is_checked():
    registered = {schema.name.split("::")[1] for schema in torch._C._jit_get_all_schemas()
                  if schema.name.startswith("qatext::")}
    assert registered == set(OPS)
