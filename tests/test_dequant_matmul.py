"""dequant_matmul (forward, grad to x, bias and scale), the E2E-QP scale gradient, and dequant's own (the
scale gradient of a weight a caller builds: a mixture's stacked experts)."""

import pytest
import torch

from conftest import DTYPES, at_odd_address, random_qparams
from qatext import ops, reference

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
       torch.float16: dict(rtol=5e-3, atol=1e-2)}


def _weight(n, k, bits, g, device):
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device)
    scale, zero = random_qparams(n, k, bits, g, False, device)
    return ops.pack(codes, bits), scale * 0.1, zero


@pytest.mark.parametrize("m_shape", [(1,), (5,), (2, 3)])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,g", [(7, 96, 32), (33, 256, 128), (5, 100, -1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_and_backward(device, m_shape, bits, n, k, g, dtype, with_bias):
    packed, scale, zero = _weight(n, k, bits, g, device)
    x = torch.randn(*m_shape, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    grad_y = torch.randn(*m_shape, n, device=device).to(dtype)

    def run(fn):
        xs, ss = x.clone().requires_grad_(), scale.clone().requires_grad_()
        bs = bias.clone().requires_grad_() if with_bias else None
        y = fn(xs, packed, ss, zero, bits, g, bs)
        y.backward(grad_y)
        return y, xs.grad, ss.grad, (bs.grad if with_bias else None)

    got, want = run(ops.dequant_matmul), run(reference.dequant_matmul)
    assert got[0].dtype == dtype and got[0].shape == (*m_shape, n)
    # The scale gradient is an fp32 sum (both sides, every dtype) of M * g exact products per group:
    # its error is a few fp32 roundings of the largest partial sums (observed below 1e-6 of the
    # largest gradient), far inside 2^-16 of it.
    scale_tol = dict(rtol=0, atol=2**-16 * want[2].abs().max().item())
    for a, b, tol in zip(got, want, [TOL[dtype], TOL[dtype], scale_tol, TOL[dtype]]):
        if b is not None:
            torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("bits,g", [(4, 128), (2, 64), (3, -1)])
def test_e2eqp_scale_grad(device, bits, g):
    n, k = 33, 256
    packed, scale, zero = _weight(n, k, bits, g, device)
    x, grad_y = torch.randn(4, 9, k, device=device), torch.randn(4, 9, n, device=device)
    got = ops.e2eqp_scale_grad(x, grad_y, packed, zero, bits, g)
    torch.testing.assert_close(got, reference.e2eqp_scale_grad(x, grad_y, packed, zero, bits, g), rtol=1e-4, atol=1e-3)
    # It is the gradient of <grad_y, x W(s)^T> with respect to s.
    s = scale.clone().requires_grad_()
    (reference.dequant_matmul(x, packed, s, zero, bits, g) * grad_y).sum().backward()
    torch.testing.assert_close(got, s.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits,g", [(4, 8), (4, 256), (3, 16), (8, 32)])
def test_e2eqp_scale_grad_at_every_group_width_and_an_odd_code_address(device, bits, g):
    """The vectorised group-code dot at 1 to 32 lanes a group; codes one byte off an aligned address
    (no aligned 32-bit loads) give the same gradient."""
    n, k = 24, 512
    packed, _, zero = _weight(n, k, bits, g, device)
    x, grad_y = torch.randn(6, k, device=device), torch.randn(6, n, device=device)
    want = reference.e2eqp_scale_grad(x, grad_y, packed, zero, bits, g)
    for codes in (packed, at_odd_address(packed)):
        torch.testing.assert_close(ops.e2eqp_scale_grad(x, grad_y, codes, zero, bits, g), want, rtol=1e-4, atol=1e-3)


def test_zero_is_not_differentiable(device):
    packed, scale, zero = _weight(4, 64, 4, 32, device)
    y = ops.dequant_matmul(torch.randn(2, 64, device=device), packed, scale, zero.requires_grad_(), 4, 32)
    with pytest.raises(RuntimeError, match="zero is frozen"):
        y.sum().backward()


@pytest.mark.parametrize("chunk", [1, 256 * 5, 256 * 33])
def test_e2eqp_scale_grad_in_row_blocks(device, chunk):
    """dW is formed a block of rows at a time: 1 row, several uneven blocks, or all rows at once."""
    import qatext

    n, k, bits, g = 33, 256, 4, 128
    packed, scale, zero = _weight(n, k, bits, g, device)
    x, grad_y = torch.randn(7, k, device=device), torch.randn(7, n, device=device)
    with qatext.tuning(dw_chunk_elements=chunk):
        got = ops.e2eqp_scale_grad(x, grad_y, packed, zero, bits, g)
    torch.testing.assert_close(got, reference.e2eqp_scale_grad(x, grad_y, packed, zero, bits, g), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits,g", [(4, 128), (2, 64), (3, -1), (4, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [None, 256 * 5])
def test_dequant_scale_grad_is_dequants_scale_gradient(device, bits, g, dtype, chunk):
    """dequant's backward to the scale (dequant_scale_grad, a block of dW rows at a time with `chunk`) against
    the reference formula and against autograd through the reference dequant. The gradient is an fp32 sum of g
    exact products (grad_w in dtype times small integers) a group: the same 2^-16 of the largest as above."""
    import qatext

    n, k = 33, 256
    packed, scale, zero = _weight(n, k, bits, g, device)
    grad_w = torch.randn(n, k, device=device).to(dtype)
    s = scale.clone().requires_grad_()
    with qatext.tuning(**({"dw_chunk_elements": chunk} if chunk else {})):
        w = ops.dequant(packed, s, zero, bits, g, k, dtype)
        w.backward(grad_w)
        got = ops.dequant_scale_grad(grad_w, packed, zero, bits, g)
    want = reference.dequant_scale_grad(grad_w, packed, zero, bits, g)
    tol = dict(rtol=0, atol=2**-16 * want.abs().max().item())
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(s.grad, want, **tol)
    s_ref = scale.clone().requires_grad_()
    reference.dequant(packed, s_ref, zero, bits, g, k).backward(grad_w.float())
    torch.testing.assert_close(s.grad, s_ref.grad, **tol)
    assert w.dtype == dtype and s.grad.dtype == torch.float32


def test_dequant_scale_grad_names_a_mismatched_weight(device):
    packed, _, zero = _weight(8, 64, 4, 32, device)
    with pytest.raises(ValueError, match="grad_w has 9 rows and packed 8"):
        ops.dequant_scale_grad(torch.randn(9, 64, device=device), packed, zero, 4, 32)
    with pytest.raises(RuntimeError, match="zero is frozen"):
        ops.dequant(packed, torch.rand(8, 2, device=device), zero.requires_grad_(), 4, 32, 64).sum().backward()
