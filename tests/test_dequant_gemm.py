"""The fused tensor-core dequant GEMM (CUDA, 16-bit inputs, small M): forward and grad input against
the reference, on every bit width, group size, odd M, split-K on and off, bias; and dispatch."""

import pytest
import torch

from conftest import kernel_names, knob, random_qparams
from qatext import ops, reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: dict(rtol=2e-2, atol=3e-2), torch.float16: dict(rtol=5e-3, atol=1e-2)}


def _weight(n, k, bits, g):
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda")
    scale, zero = random_qparams(n, k, bits, g, False, "cuda")
    return ops.pack(codes, bits), scale * 0.1, zero


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,g", [(256, 384, 32), (128, 512, 64), (384, 256, 128), (128, 384, -1), (256, 256, -1),
                                   (256, 128, 128)])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 40, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_and_grad_input(bits, n, k, g, m, dtype):
    packed, scale, zero = _weight(n, k, bits, g)
    x = torch.randn(m, k, device="cuda").to(dtype)
    gy = torch.randn(m, n, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype) if m % 2 else None
    with knob("dequant_gemm_max_m", 64):
        y = ops.dequant_matmul(x, packed, scale, zero, bits, g, bias)
        gx = torch.ops.qatext.dequant_matmul_grad_input(gy, packed, scale, zero, bits, g, k)
    torch.testing.assert_close(y.float(), reference.dequant_matmul(x, packed, scale, zero, bits, g, bias).float(),
                               **TOL[dtype])
    w = reference.dequant(packed, scale, zero, bits, g, k, torch.float32)
    torch.testing.assert_close(gx.float(), gy.float() @ w, **TOL[dtype])
    assert y.dtype == gx.dtype == dtype and y.shape == (m, n) and gx.shape == (m, k)


@pytest.mark.parametrize("grad_input", [False, True])
def test_fused_kernel_runs_and_matches_the_cublas_path(grad_input):
    """The dispatch takes the fused kernel at small M and the dequant + cuBLAS path otherwise; both agree."""
    n, k, bits, g = 512, 1024, 4, 128
    packed, scale, zero = _weight(n, k, bits, g)
    a = torch.randn(2, 5, k if not grad_input else n, device="cuda", dtype=torch.bfloat16)

    def call():
        if grad_input:
            return torch.ops.qatext.dequant_matmul_grad_input(a, packed, scale, zero, bits, g, k)
        return ops.dequant_matmul(a, packed, scale, zero, bits, g)

    with knob("dequant_gemm_max_m", 64):
        assert "dequant_gemm_kernel" in kernel_names(call)
        fused = call()
    with knob("dequant_gemm_max_m", 0):
        assert "dequant_gemm_kernel" not in kernel_names(call)
        plain = call()
    assert fused.shape == plain.shape == (2, 5, k if grad_input else n)
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=3e-2)
    with knob("dequant_gemm_max_m", 64):
        assert torch.equal(call(), call())  # split-K partials are summed in a fixed order


def test_unsupported_shapes_fall_back():
    """N or K not a multiple of 128, or fp32 x: the dequant + cuBLAS path, still correct."""
    for n, k, dtype in [(200, 256, torch.bfloat16), (256, 200, torch.bfloat16), (256, 256, torch.float32)]:
        packed, scale, zero = _weight(n, k, 4, -1)
        x = torch.randn(3, k, device="cuda", dtype=dtype)
        y = ops.dequant_matmul(x, packed, scale, zero, 4, -1)
        torch.testing.assert_close(y.float(), reference.dequant_matmul(x, packed, scale, zero, 4, -1).float(),
                                   rtol=2e-2, atol=3e-2)
