"""LR-QAT weight reconstruction from packed INT-b or fixed-point P, forward and backward."""

import pytest
import torch

from conftest import DTYPES, random_qparams
from qatext import ops, reference


def _inputs(n, k, r, bits, g, frac_bits, dtype, device):
    qmax = (1 << bits) - 1
    if frac_bits == 0:
        p = ops.pack(torch.randint(0, qmax + 1, (n, k), dtype=torch.uint8, device=device), bits)
    else:
        p = torch.randint(0, qmax * (1 << frac_bits) + 1, (n, k), dtype=torch.uint8, device=device)
    a = (torch.randn(n, r, device=device) * 0.5).to(dtype)
    b = (torch.randn(r, k, device=device) * 0.5).to(dtype)
    scale, zero = random_qparams(n, k, bits, g, True, device)
    return p, a, b, scale, zero


CASES = [(7, 96, 4, 4, 32, 0), (33, 256, 8, 4, 128, 4), (5, 100, 2, 3, -1, 0), (17, 128, 16, 2, 64, 0),
         (9, 64, 4, 2, 32, 6), (65, 512, 32, 8, 256, 0)]


@pytest.mark.parametrize("n,k,r,bits,g,frac_bits", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_backward(device, n, k, r, bits, g, frac_bits, dtype):
    p, a, b, scale, zero = _inputs(n, k, r, bits, g, frac_bits, dtype, device)
    lora_scale = 2.0 / r
    grad_w = torch.randn(n, k, device=device).to(dtype)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (a, b, scale)]
        w = fn(p, leaves[0], leaves[1], leaves[2], zero, lora_scale, bits, g, frac_bits)
        w.backward(grad_w)
        return [w] + [t.grad for t in leaves]

    got, want = run(ops.lrqat_weight), run(reference.lrqat_weight)
    assert got[0].dtype == dtype and got[0].shape == (n, k)
    # Same device, same A @ B: the rounding agrees exactly.
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for x, y in zip(got[1:], want[1:]):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-3 if dtype == torch.float32 else 2e-2,
                                   atol=1e-3 * max(k, r) ** 0.5)


@pytest.mark.parametrize("n,k,r,bits,g,frac_bits", CASES[:4])
def test_stacked_experts_forward_and_backward(device, n, k, r, bits, g, frac_bits):
    """A mixture's experts stacked (a [E, N, r], b [E, r, K], p, scale, zero [E, N, ..]): W [E, N, K], each expert's
    A B its own, and the gradients in the stacked shapes, as the reference's batched formula gives them."""
    experts = [_inputs(n, k, r, bits, g, frac_bits, torch.float32, device) for _ in range(3)]
    p, a, b, scale, zero = [torch.stack(t) for t in zip(*experts)]
    grad_w = torch.randn(3, n, k, device=device)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (a, b, scale)]
        w = fn(p, leaves[0], leaves[1], leaves[2], zero, 0.5, bits, g, frac_bits)
        w.backward(grad_w)
        return [w] + [t.grad for t in leaves]

    got, want = run(ops.lrqat_weight), run(reference.lrqat_weight)
    assert got[0].shape == (3, n, k) and [t.shape for t in got[1:]] == [a.shape, b.shape, scale.shape]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the same batched A @ B
    for x, y in zip(got[1:], want[1:]):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3 * max(k, r) ** 0.5)
    torch.testing.assert_close(got[0][1], ops.lrqat_weight(*experts[1], 0.5, bits, g, frac_bits), rtol=0,
                               atol=float(scale.max()) * 1.0001)  # an expert alone: A B by mm, not bmm (ties)


def test_stacked_experts_need_one_expert_count():
    p, a, b, scale, zero = [torch.stack(t) for t in zip(*[_inputs(16, 64, 4, 4, 32, 0, torch.float32, "cpu")] * 3)]
    with pytest.raises(ValueError, match=r"stacked experts take a \[E, N, r\], b \[E, r, K\]"):
        ops.lrqat_weight(p, a, b[:2], scale, zero, 0.5, 4, 32, 0)
    with pytest.raises(ValueError, match="grad_w must have the weight's shape"):
        torch.ops.qatext.lrqat_weight_backward(torch.zeros(3, 16, 32), p, a, b, scale, zero, 0.5, 4, 32, 0)


def test_zero_adapter_gives_the_frozen_weight(device):
    p, a, b, scale, zero = _inputs(9, 96, 4, 4, 32, 0, torch.float32, device)
    w = ops.lrqat_weight(p, torch.zeros_like(a), b, scale, zero, 0.5, 4, 32, 0)
    torch.testing.assert_close(w, reference.dequant(p, scale, zero, 4, 32, 96), rtol=0, atol=0)


def test_clamp_blocks_gradient_outside_range(device):
    p, a, b, scale, zero = _inputs(4, 32, 2, 4, 32, 0, torch.float32, device)
    a = torch.full_like(a, 100.0).requires_grad_()  # pushes every code far outside [0, 15]
    b = torch.ones_like(b).requires_grad_()
    ops.lrqat_weight(p, a, b, scale, zero, 1.0, 4, 32, 0).sum().backward()
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_up_to_rounding_ties():
    p, a, b, scale, zero = _inputs(257, 1024, 16, 4, 128, 0, torch.float32, "cpu")
    cpu = ops.lrqat_weight(p, a, b, scale, zero, 0.125, 4, 128, 0)
    gpu = ops.lrqat_weight(p.cuda(), a.cuda(), b.cuda(), scale.cuda(), zero.cuda(), 0.125, 4, 128, 0).cpu()
    # cuBLAS and the CPU BLAS sum A B in different orders, which can move a value across a
    # rounding boundary: allow a few elements one quantization step apart, nothing more.
    diff = (gpu - cpu).abs()
    step = scale.repeat_interleave(128, dim=1)
    assert (diff > 1e-6).float().mean() < 1e-3
    assert torch.all(diff <= step * 1.0001)


@pytest.mark.parametrize("fn", [ops.lrqat_weight, "linear"])
def test_trained_scale_enters_clamped_straight_through(device, fn):
    """An optimiser step past zero: the ops compute with max(s, 1e-6) and pass the scale's gradient
    straight through, the same values and gradients as given the clamped scale."""
    p, a, b, scale, zero = _inputs(9, 128, 4, 4, 64, 0, torch.float32, device)
    scale[0, 0], scale[3, 1] = -0.5, 0.0
    x = torch.randn(3, 128, device=device)

    def run(s):
        s = s.clone().requires_grad_()
        if fn == "linear":
            out = ops.lrqat_linear(x, p, a, b, s, zero, 0.5, 4, 64, 0)
        else:
            out = fn(p, a, b, s, zero, 0.5, 4, 64, 0)
        out.sum().backward()
        return out, s.grad

    (got, got_grad), (want, want_grad) = run(scale), run(scale.clamp(min=1e-6))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)
    assert torch.isfinite(got).all()
