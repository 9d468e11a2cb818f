"""Dynamic per-token activation fake-quant (W4A8's activations) against the reference."""

import pytest
import torch

from conftest import DTYPES
from qatext import ops, reference


@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 96), (37, 4096), (2, 1)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_backward(device, shape, bits, symmetric, dtype):
    x = (torch.randn(shape, device=device) * 3 + 0.5).to(dtype)
    out = ops.fake_quant_per_token(x, bits, symmetric)
    torch.testing.assert_close(out, reference.fake_quant_per_token(x, bits, symmetric), rtol=0, atol=0)
    grad = torch.randn(shape, device=device).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ops.fake_quant_per_token(a, bits, symmetric).backward(grad)
    reference.fake_quant_per_token(b, bits, symmetric).backward(grad)
    assert torch.equal(a.grad == 0, b.grad == 0), "straight-through mask differs"
    torch.testing.assert_close(a.grad, b.grad)


def test_at_most_2_to_the_bits_levels_per_token(device):
    x = torch.randn(16, 256, device=device)
    out = ops.fake_quant_per_token(x, 4, False)
    for row in out:
        assert row.unique().numel() <= 16
    assert (out - x).abs().max() < (x.amax(1) - x.amin(1)).max() / 15


def test_constant_rows_do_not_divide_by_zero(device):
    x = torch.zeros(4, 32, device=device)
    assert torch.equal(ops.fake_quant_per_token(x, 8, True), x)
    assert torch.equal(ops.fake_quant_per_token(x, 8, False), x)
