"""LR-QAT's adapter gradients from dU (qatext::lrqat_rank_grads): dA = dU B^T and dB = A^T dU against the
reference, on the one-read CUDA kernel (every block split: partial row and column blocks, padded ranks,
stacked experts, blocks that run through several row chunks) and on the GEMM path elsewhere."""

import pytest
import torch

import qatext
from conftest import at_odd_address, kernel_names
from qatext import reference

cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
KERNEL = "rank_grads_kernel"

# (experts, N, K, rank): N a multiple of 64 and K of 128 take the kernel. K = 1408 is 11 column chunks (blocks
# of 4, 4 and 3 at rank <= 32); N = 38400 gives each block several row chunks; ranks 20 and 48 pad to 32 / 64
# with zero rows of B; rank 64 takes 2 column chunks a block (5 chunks: 2, 2, 1).
KERNEL_CASES = [(1, 64, 128, 32), (1, 192, 1408, 20), (1, 38400, 128, 16), (1, 38400, 256, 64), (3, 128, 640, 48),
                (2, 4096, 512, 8), (1, 1024, 4096, 32)]


def _inputs(experts, n, k, r, dtype, device):
    lead = (experts,) if experts > 1 else ()
    grad_u = torch.randn(*lead, n, k, device=device).to(dtype)
    a = (torch.randn(*lead, n, r, device=device) * 0.5).to(dtype)
    b = (torch.randn(*lead, r, k, device=device) * 0.5).to(dtype)
    return grad_u, a, b


def _assert_within_rounding(got, grad_u, a, b):
    """Each output is one fp32 sum of exact 16-bit products, rounded once to the output dtype: at most half an
    output ulp off the exact sum, plus the fp32 sum's error (a few units of 2^-24 of the sum of |terms| times
    sqrt(terms), generously), which is what cancellation leaves."""
    want = reference.lrqat_rank_grads(grad_u.double(), a.double(), b.double())
    terms = reference.lrqat_rank_grads(grad_u.double().abs(), a.double().abs(), b.double().abs())
    eps = torch.finfo(got[0].dtype).eps  # 2^-7 bf16, 2^-10 fp16: half an ulp is eps / 2 of |value| or less
    for name, x, y, t, n in (("a", got[0], want[0], terms[0], grad_u.shape[-1]),
                             ("b", got[1], want[1], terms[1], grad_u.shape[-2])):
        assert x.shape == y.shape and x.dtype == grad_u.dtype
        bound = eps / 2 * y.abs() + 4 * n ** 0.5 * 2.0**-24 * t + 1e-30
        err = (x.double().cpu() - y.cpu()).abs()
        assert torch.all(err <= bound.cpu()), f"grad_{name}: worst {float((err / bound.cpu()).max()):.3g} of the bound"


@pytest.mark.parametrize("experts,n,k,r", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_kernel_matches_reference_to_one_rounding(experts, n, k, r, dtype, _):
    grad_u, a, b = _inputs(experts, n, k, r, dtype, "cuda")
    assert KERNEL in kernel_names(lambda: torch.ops.qatext.lrqat_rank_grads(grad_u, a, b))
    got = torch.ops.qatext.lrqat_rank_grads(grad_u, a, b)
    _assert_within_rounding(got, grad_u, a, b)
    again = torch.ops.qatext.lrqat_rank_grads(grad_u, a, b)  # partials summed in a fixed order: the same bits
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])


@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_kernel_and_gemms_agree_and_knob_switches(_):
    grad_u, a, b = _inputs(1, 256, 1024, 32, torch.bfloat16, "cuda")
    with qatext.tuning(lrqat_rank_kernel=0):
        assert KERNEL not in kernel_names(lambda: torch.ops.qatext.lrqat_rank_grads(grad_u, a, b))
        gemms = torch.ops.qatext.lrqat_rank_grads(grad_u, a, b)
    assert qatext.get_tuning("lrqat_rank_kernel") == 1
    _assert_within_rounding(gemms, grad_u, a, b)
    _assert_within_rounding(torch.ops.qatext.lrqat_rank_grads(grad_u, a, b), grad_u, a, b)


@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_kernel_reads_misaligned_and_strided_inputs_through_copies(_):
    grad_u, a, b = _inputs(1, 128, 256, 16, torch.bfloat16, "cuda")
    got = torch.ops.qatext.lrqat_rank_grads(at_odd_address(grad_u), a.t().contiguous().t(), at_odd_address(b))
    want = torch.ops.qatext.lrqat_rank_grads(grad_u, a, b)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("experts,n,k,r,dtype", [(1, 80, 256, 8, torch.bfloat16), (1, 64, 96, 4, torch.float32),
                                                 (2, 48, 128, 3, torch.float16), (1, 64, 128, 96, torch.bfloat16)])
def test_shapes_off_the_kernel_take_the_gemms(device, experts, n, k, r, dtype):
    # N not a multiple of 64, K not of 128, fp32, rank past 64: cuBLAS (or the CPU), same contract.
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    grad_u, a, b = _inputs(experts, n, k, r, dtype, device)
    got = torch.ops.qatext.lrqat_rank_grads(grad_u, a, b)
    want = reference.lrqat_rank_grads(grad_u, a, b)
    for x, y in zip(got, want):
        assert x.dtype == dtype
        torch.testing.assert_close(x.float(), y, rtol=torch.finfo(dtype).eps, atol=1e-4 * y.abs().max().item())


def test_empty_sums_are_zeros(device):
    grad_u, b = torch.zeros(64, 0, device=device), torch.zeros(4, 0, device=device)
    ga, gb = torch.ops.qatext.lrqat_rank_grads(grad_u.bfloat16(), torch.randn(64, 4, device=device).bfloat16(),
                                               b.bfloat16())
    assert ga.shape == (64, 4) and torch.all(ga == 0) and gb.shape == (4, 0)


@pytest.mark.parametrize("args,match", [
    (((64, 128), (64, 8), (4, 128)), r"expects grad_u \[N, K\], a \[N, r\], b \[r, K\]"),
    (((64, 128), (32, 8), (8, 128)), r"expects grad_u \[N, K\]"),
    (((2, 64, 128), (2, 64, 8), (3, 8, 128)), r"leading expert dimension E"),
])
def test_mismatched_shapes_are_one_clear_error(args, match):
    tensors = [torch.randn(s) for s in args]
    with pytest.raises(ValueError, match=match):
        torch.ops.qatext.lrqat_rank_grads(*tensors)


@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_lrqat_backward_takes_the_kernel(_):
    from test_lrqat_fused import _inputs as lrqat_inputs

    p, a, b, scale, zero = lrqat_inputs(128, 512, 32, 4, 128, 0, torch.bfloat16)
    grad_w = torch.randn(128, 512, device="cuda", dtype=torch.bfloat16)
    run = lambda: torch.ops.qatext.lrqat_weight_backward(grad_w, p, a, b, scale, zero, 0.5, 4, 128, 0)  # noqa: E731
    assert KERNEL in kernel_names(run)
    got = run()
    with qatext.tuning(lrqat_rank_kernel=0):
        gemms = run()
    assert torch.equal(got[2], gemms[2])  # the scale's gradient does not depend on it
    for x, y in zip(got[:2], gemms[:2]):  # one fp32 sum each, summed in another order: an ulp at most
        torch.testing.assert_close(x, y, rtol=2 * torch.finfo(x.dtype).eps, atol=1e-3 * y.abs().max().item())
