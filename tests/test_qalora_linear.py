"""qatext.ops.qalora_linear (QA-LoRA's linear as one op, autograd in C++) against the reference: outputs
and the gradients of x, A, B and bias, on random shapes, bit widths, group sizes and dtypes; its
errors; and the QA-LoRA layer running through it."""

import pytest
import torch

from conftest import random_qparams
from qatext import QuantSpec, ops, reference
from qatext.nn import QuantLinear

# fp32: only the summation order differs from the reference. 16-bit: the op rounds y, the pooled input,
# the hidden and the sum to x's dtype as the layer always did; the reference keeps fp32 throughout.
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
       torch.float16: {"rtol": 1e-2, "atol": 1e-2}}


def _case(device, n, k, g, bits, rank, dtype, adapter_dtype, bias):
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device)
    scale, zero = random_qparams(n, k, bits, g, False, device)
    groups = k // (k if g == -1 else g)
    a = (torch.randn(rank, groups, device=device) * 0.3).to(adapter_dtype).requires_grad_()
    b = (torch.randn(n, rank, device=device) * 0.3).to(adapter_dtype).requires_grad_()
    x = torch.randn(2, 5, k, device=device).to(dtype).requires_grad_()
    bias = torch.randn(n, device=device).to(dtype).requires_grad_() if bias else None
    return x, ops.pack(codes, bits), scale * 0.1, zero, a, b, bias


def _grads(out, tensors, grad_out):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], grad_out)


@pytest.mark.parametrize("n,k,g,bits,rank", [(48, 256, 64, 4, 8), (33, 384, 128, 3, 4), (64, 128, -1, 2, 16),
                                             (16, 512, 32, 4, 1)])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_reference_forward_and_backward(device, n, k, g, bits, rank, dtype, adapter_dtype, bias):
    x, packed, scale, zero, a, b, bias_t = _case(device, n, k, g, bits, rank, dtype, adapter_dtype, bias)
    out = ops.qalora_linear(x, packed, scale, zero, a, b, 2.0, bits, g, bias_t)
    expected = reference.qalora_linear(x, packed, scale, zero, a, b, 2.0, bits, g, bias_t)
    assert out.dtype == dtype and out.shape == (2, 5, n)
    tol = TOL[dtype]
    scale_of = expected.detach().float().abs().max().item()
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * scale_of)
    grad_out = torch.randn_like(out)
    for got, want in zip(_grads(out, (x, a, b, bias_t), grad_out), _grads(expected, (x, a, b, bias_t), grad_out),
                         strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol["rtol"],
                                   atol=tol["atol"] * want.float().abs().max().item())


def test_bad_adapter_shape_and_a_trained_scale_are_one_clear_error():
    x, packed, scale, zero, a, b, _ = _case("cpu", 16, 256, 64, 4, 4, torch.float32, torch.float32, False)
    with pytest.raises(ValueError, match=r"qalora_linear: a must be \[rank, in_features / group_size\] = \[r, 4\]"):
        ops.qalora_linear(x, packed, scale, zero, a.detach()[:, :3], b, 1.0, 4, 64)
    out = ops.qalora_linear(x, packed, scale.requires_grad_(), zero, a, b, 1.0, 4, 64)
    with pytest.raises(RuntimeError, match="scale and zero are frozen"):
        out.sum().backward()


def test_holds_the_pooled_input_not_x():
    """What backward keeps: the codes, scale, zero, A, B, the pooled input [.., K / g] and the hidden
    [.., r], never x [.., K] (the layer's ops one by one held x for dequant_matmul)."""
    x, packed, scale, zero, a, b, _ = _case("cpu", 64, 1024, 128, 4, 4, torch.float32, torch.float32, False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        ops.qalora_linear(x, packed, scale, zero, a, b, 1.0, 4, 128)
    assert x.shape not in saved
    assert (2, 5, 8) in saved and (2, 5, 4) in saved


def test_the_layer_runs_through_the_op_and_matches_its_merge(device):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=True, device=device)
    layer = QuantLinear.from_linear(linear, QuantSpec(4, 64), mode="fake").to_packed().to_mode("qalora", rank=4)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 256, device=device)
    with torch.profiler.profile() as prof:
        y = layer(x)
    assert "qatext::qalora_linear" in {e.name for e in prof.events()}
    torch.testing.assert_close(y, layer.to_packed()(x), rtol=1e-4, atol=1e-4)  # the adapter merged into the zeros


# fp32 sums in another order than the reference's, then one rounding: at most an ulp of the result apart.
SUM_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2**-8, "atol": 1e-5},
           torch.float16: {"rtol": 2**-11, "atol": 1e-5}}


@pytest.mark.parametrize("shape,g", [((3, 5, 256), 8), ((3, 5, 256), 16), ((2, 512), 64), ((4, 1024), 256),
                                     ((7, 96), 24), ((2, 3, 100), 20), ((5, 64), -1), ((6, 4096), 512),
                                     ((0, 128), 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_group_sum_and_expand_match_the_reference(device, shape, g, dtype):
    """Every lane count the kernels take (1 to 32 a group), and what they leave to torch: groups not a
    power of two of chunks, K not a multiple of 8, a whole row, groups past 32 lanes, no rows."""
    x = torch.randn(shape, device=device).to(dtype)
    got = ops.group_sum(x, g)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.group_sum(x, g), **SUM_TOL[dtype])
    width = shape[-1] if g == -1 else g
    assert torch.equal(ops.group_expand(got, width), reference.group_expand(got, width))


def test_group_sum_and_expand_of_strided_views(device):
    """Inputs the kernels cannot read as contiguous chunks (a transposed view, a slice off a 16-byte
    boundary) give the same values through torch's ops."""
    x = torch.randn(256, 6, device=device, dtype=torch.bfloat16).t()
    torch.testing.assert_close(ops.group_sum(x, 32), reference.group_sum(x, 32), **SUM_TOL[torch.bfloat16])
    off = torch.randn(1, 2 * 256 + 1, device=device, dtype=torch.bfloat16)[:, 1:].view(2, 256)
    torch.testing.assert_close(ops.group_sum(off, 64), reference.group_sum(off, 64), **SUM_TOL[torch.bfloat16])
    t = torch.randn(5, 3, device=device).t()
    assert torch.equal(ops.group_expand(t, 8), reference.group_expand(t, 8))
    t = torch.randn(2 * 3 + 1, device=device, dtype=torch.bfloat16)[1:].view(2, 3)  # contiguous, off 16 bytes
    assert torch.equal(ops.group_expand(t, 16), reference.group_expand(t, 16))


def test_group_ops_bad_group_size_is_one_clear_error():
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="group_size .*must divide K"):
        ops.group_sum(x, 40)
    with pytest.raises(ValueError, match="group_size must be positive"):
        ops.group_expand(x, 0)
