"""fake_quant (weights) against the reference: values exact, gradients against autograd."""

import pytest
import torch

from conftest import DTYPES, random_qparams
from qatext import ops, reference
from qatext.nn.quant_linear import MIN_SCALE

# (N, K, group_size): odd N, K a multiple of the group but not of 64, tiny and larger shapes.
SHAPES = [(1, 32, 32), (7, 96, 32), (5, 100, -1), (33, 192, 64), (17, 256, 128), (65, 512, 256), (3, 160, 160),
          (129, 1024, 128)]


def _inputs(shape, bits, symmetric, dtype, device):
    n, k, g = shape
    w = (torch.randn(n, k, device=device) * 1.5).to(dtype)
    scale, zero = random_qparams(n, k, bits, g, symmetric, device)
    return w, scale, zero


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference_exactly(device, shape, bits, symmetric, dtype):
    w, scale, zero = _inputs(shape, bits, symmetric, dtype, device)
    out = ops.fake_quant(w, scale, zero, bits, shape[2])
    ref = reference.fake_quant(w, scale, zero, bits, shape[2])
    assert out.dtype == dtype and out.shape == w.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # Sanity: the output really is on the quantization grid and changed the input.
    assert not torch.equal(out, w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_autograd(device, shape, bits, symmetric, dtype):
    w, scale, zero = _inputs(shape, bits, symmetric, dtype, device)
    grad = torch.randn(w.shape, device=device).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (w, scale, zero)]
    ops.fake_quant(*leaves, bits, shape[2]).backward(grad)
    ref_leaves = [t.clone().requires_grad_() for t in (w, scale, zero)]
    reference.fake_quant(*ref_leaves, bits, shape[2]).backward(grad)
    clipped = leaves[0].grad == 0
    assert clipped.any() and not clipped.all(), "test inputs must exercise both branches of the clamp"
    # The kernel passes g exactly; autograd computes g * s * (1 / s), off by an ulp at times.
    assert torch.equal(leaves[0].grad == 0, ref_leaves[0].grad == 0), "straight-through mask differs"
    torch.testing.assert_close(leaves[0].grad, ref_leaves[0].grad)
    group = shape[1] if shape[2] == -1 else shape[2]
    for got, want in zip(leaves[1:], ref_leaves[1:]):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5 * group)


def test_backward_is_deterministic(device):
    w, scale, zero = _inputs((31, 1024, -1), 4, False, torch.float32, device)
    grad = torch.randn_like(w)
    first = torch.ops.qatext.fake_quant_backward(grad, w, scale, zero, 4, -1)
    second = torch.ops.qatext.fake_quant_backward(grad, w, scale, zero, 4, -1)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_scale_and_zero_dtypes_follow_inputs(device):
    w, scale, zero = _inputs((4, 64, 32), 4, False, torch.bfloat16, device)
    scale, zero = scale.to(torch.bfloat16).requires_grad_(), zero.to(torch.bfloat16).requires_grad_()
    out = ops.fake_quant(w, scale, zero, 4, 32)
    out.sum().backward()
    assert scale.grad.dtype == torch.bfloat16 and zero.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference.fake_quant(w, scale, zero, 4, 32), rtol=0, atol=0)


def test_non_contiguous_weight(device):
    w, scale, zero = _inputs((64, 96, 32), 4, False, torch.float32, device)
    wt = torch.randn(96, 64, device=device).t()  # [64, 96], transposed storage
    assert not wt.is_contiguous()
    torch.testing.assert_close(ops.fake_quant(wt, scale, zero, 4, 32), reference.fake_quant(wt, scale, zero, 4, 32),
                               rtol=0, atol=0)


def test_empty_weight(device):
    w = torch.empty(0, 64, device=device)
    scale, zero = torch.ones(0, 2, device=device), torch.zeros(0, 2, device=device)
    assert ops.fake_quant(w, scale, zero, 4, 32).shape == (0, 64)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    w, scale, zero = _inputs((257, 4096, 128), 3, False, dtype, "cpu")
    grad = torch.randn(w.shape).to(dtype)
    cpu = ops.fake_quant(w, scale, zero, 3, 128)
    gpu = ops.fake_quant(w.cuda(), scale.cuda(), zero.cuda(), 3, 128)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
    cpu_grads = torch.ops.qatext.fake_quant_backward(grad, w, scale, zero, 3, 128)
    gpu_grads = torch.ops.qatext.fake_quant_backward(grad.cuda(), w.cuda(), scale.cuda(), zero.cuda(), 3, 128)
    torch.testing.assert_close(gpu_grads[0].cpu(), cpu_grads[0], rtol=0, atol=0)
    for g, c in zip(gpu_grads[1:], cpu_grads[1:]):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rounds_edge_values_as_cpu():
    # The GPU rounds by adding 1.5 * 2^23 (exact below 2^22, and past it the clamp decides as for rint):
    # halves, the 2^22 boundary, huge, infinite and NaN values of w / s give the CPU's outputs bit for bit.
    edges = [0.5, 1.5, 2.5, -0.5, -1.5, 7.5, 8.5, 14.5, 15.5, -7.5, -8.5, 2.0**22 - 0.5, 2.0**22, 2.0**22 + 1,
             -(2.0**22) - 1, 1e7, -1e7, 3e38, -3e38, float("inf"), float("-inf"), float("nan"), -0.0, 0.0]
    w = torch.tensor(edges * 2, dtype=torch.float32).view(2, -1)
    scale = torch.ones(2, 1)
    zero = torch.tensor([[8.0], [0.0]])
    grad = torch.randn(w.shape)
    for bits in (4, 8):
        cpu = ops.fake_quant(w, scale, zero, bits, -1)
        gpu = ops.fake_quant(w.cuda(), scale.cuda(), zero.cuda(), bits, -1)
        assert torch.equal(gpu.cpu().nan_to_num(nan=123.0), cpu.nan_to_num(nan=123.0))
        cpu_grads = torch.ops.qatext.fake_quant_backward(grad, w, scale, zero, bits, -1)
        gpu_grads = torch.ops.qatext.fake_quant_backward(grad.cuda(), w.cuda(), scale.cuda(), zero.cuda(), bits, -1)
        assert torch.equal(gpu_grads[0].cpu(), cpu_grads[0])  # elementwise: exact
        for g, c in zip(gpu_grads[1:], cpu_grads[1:]):  # sums over the row, in another order
            torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_divides_by_the_scale_as_cpu():
    # The forward divides by a group's scale as a product with its rounded reciprocal and two FMA
    # corrections, which must round w / s as the division does. Quotients a few ulps from a half (a third
    # of them) round to the CPU's codes only if every bit of w / s is the division's; the others span the
    # 8-bit code range and beyond, over scales from 2^-62 to 2^62 (past the fast path's range at both ends).
    # The backward (a plain division) is held to the CPU's bits too: with g = 1 and groups of 8 its ds sums
    # (round(w/s) - w/s) in the CPU's order.
    gen = torch.Generator().manual_seed(0)
    rows, k = 4096, 64
    s = (2.0 ** torch.randint(-62, 63, (rows, k // 8), generator=gen)) * (1 + torch.rand(rows, k // 8, generator=gen))
    x = torch.rand(rows, k, generator=gen) * 300 - 150
    halves = torch.randint(-140, 140, (rows, k), generator=gen) + 0.5
    near_half = torch.rand(rows, k, generator=gen) < 1 / 3
    w = (torch.where(near_half, halves, x) * s.repeat_interleave(8, dim=1)).float()
    ulps = torch.randint(-3, 4, (rows, k), generator=gen, dtype=torch.int32)
    w = torch.where(near_half, (w.view(torch.int32) + ulps).view(torch.float32), w)
    zero = torch.full_like(s, 128.0)
    assert torch.equal(ops.fake_quant(w.cuda(), s.cuda(), zero.cuda(), 8, 8).cpu(), ops.fake_quant(w, s, zero, 8, 8))
    grad = torch.ones_like(w)
    cpu = torch.ops.qatext.fake_quant_backward(grad, w, s, zero, 8, 8)
    gpu = torch.ops.qatext.fake_quant_backward(grad.cuda(), w.cuda(), s.cuda(), zero.cuda(), 8, 8)
    for g, c in zip(gpu, cpu):
        assert torch.equal(g.cpu(), c)


@pytest.mark.parametrize("shape", [(9, 256, 128), (5, 4096, -1)])
def test_unaligned_storage_takes_the_fallback_correctly(device, shape):
    n, k, g = shape
    flat = torch.randn(n * k + 3, device=device).to(torch.bfloat16)
    w = flat[3:].view(n, k)  # 6-byte offset: no 16-byte vector loads possible
    scale, zero = random_qparams(n, k, 4, g, False, device)
    torch.testing.assert_close(ops.fake_quant(w, scale, zero, 4, g), reference.fake_quant(w, scale, zero, 4, g),
                               rtol=0, atol=0)
    grad = torch.randn(n, k, device=device).to(torch.bfloat16)
    got = torch.ops.qatext.fake_quant_backward(grad, w, scale, zero, 4, g)
    want = torch.ops.qatext.fake_quant_backward(grad, w.clone(), scale, zero, 4, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape", [(17, 256, 128), (5, 100, -1)])
def test_trained_scale_and_zero_enter_clamped_and_rounded(device, shape):
    """The op computes with max(s, 1e-6) and round(z) and passes both gradients straight through:
    the same values and gradients as the kernel given the clamped and rounded tensors."""
    w, scale, zero = _inputs(shape, 4, False, torch.float32, device)
    zero = zero + torch.rand_like(zero) - 0.5  # trained zeros drift off the integers
    scale[0, 0], scale[-1, -1] = -0.25, 0.0  # an optimiser step past zero
    effective = (scale.clamp(min=1e-6), torch.round(zero))
    assert not torch.equal(effective[1], zero)
    grad = torch.randn_like(w)
    raw = [t.clone().requires_grad_() for t in (w, scale, zero)]
    out = ops.fake_quant(*raw, 4, shape[2])
    out.backward(grad)
    want = torch.ops.qatext.fake_quant_backward(grad, w, *effective, 4, shape[2])
    torch.testing.assert_close(out, ops.fake_quant(w, *effective, 4, shape[2]), rtol=0, atol=0)
    torch.testing.assert_close(out, reference.fake_quant(w, scale, zero, 4, shape[2]), rtol=0, atol=0)
    for leaf, g in zip(raw, want):
        torch.testing.assert_close(leaf.grad, g, rtol=0, atol=0)
    assert torch.isfinite(out).all()
    assert MIN_SCALE == reference.MIN_SCALE == 1e-6  # the layer's positive(), the oracle and the kernels agree
