"""The ops under torch.compile(fullgraph=True): forward and backward, no graph breaks."""

import torch

from qatext import ops, quant


class TinyQuantNet(torch.nn.Module):
    """Uses every trainable op: fake_quant (full QAT), lrqat_weight, dequant_matmul (E2E-QP)."""

    def __init__(self, k=64, n=32, bits=4, g=32):
        super().__init__()
        self.bits, self.g = bits, g
        w = torch.randn(n, k)
        scale, zero = quant.minmax_qparams(w, bits, g)
        self.w = torch.nn.Parameter(w)
        self.scale = torch.nn.Parameter(scale)
        self.register_buffer("zero", zero)
        codes = torch.clamp(torch.round(w.reshape(n, -1, g) / scale[..., None]) + zero[..., None], 0, 15)
        self.register_buffer("packed", ops.pack(codes.reshape(n, k).to(torch.uint8), bits))
        self.a = torch.nn.Parameter(torch.randn(n, 4) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(4, k) * 0.1)

    def forward(self, x):
        x = ops.fake_quant_per_token(x, 8, False)
        h = x @ ops.fake_quant(self.w, self.scale, self.zero, self.bits, self.g).t()
        w_lr = ops.lrqat_weight(self.packed, self.a, self.b, self.scale, self.zero, 0.25, self.bits, self.g)
        h = h + x @ w_lr.t()
        return h + ops.dequant_matmul(x, self.packed, self.scale, self.zero, self.bits, self.g)


def _step(model, x):
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out, [p.grad.clone() for p in model.parameters()]


def test_compile_fullgraph_forward_backward():
    torch.manual_seed(0)
    model = TinyQuantNet()
    x = torch.randn(8, 64)
    want_out, want_grads = _step(model, x)
    compiled = torch.compile(model, fullgraph=True)
    got_out, got_grads = _step(compiled, x)
    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
