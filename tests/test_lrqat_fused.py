"""The tensor-core LR-QAT kernels (16-bit adapters on CUDA) and lrqat_linear, against the reference."""

import pytest
import torch
import torch.nn.functional as F

import qatext
from conftest import kernel_names, random_qparams
from qatext import ops, reference

cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (N, K, rank, bits, group_size, frac_bits): on the 16 x 128 tile grid, every groups-per-tile case,
# ranks that pad to 16 / 32 / 64, packed INT2/3/4/8 and fixed-point P.
CASES = [(64, 512, 32, 4, 128, 0), (48, 256, 8, 4, 32, 0), (32, 384, 64, 2, 64, 0), (16, 256, 16, 3, -1, 0),
         (32, 512, 32, 4, 256, 4), (16, 128, 20, 8, 128, 0), (80, 640, 48, 4, 64, 4)]
HALF = [torch.bfloat16, torch.float16]


def _inputs(n, k, r, bits, g, frac_bits, dtype, device="cuda"):
    qmax = (1 << bits) - 1
    if frac_bits == 0:
        p = ops.pack(torch.randint(0, qmax + 1, (n, k), dtype=torch.uint8), bits)
    else:
        p = torch.randint(0, qmax * (1 << frac_bits) + 1, (n, k), dtype=torch.uint8)
    a = (torch.randn(n, r) * 0.5).to(dtype)
    b = (torch.randn(r, k) * 0.5).to(dtype)
    scale, zero = random_qparams(n, k, bits, g, True, "cpu")
    return [t.to(device) for t in (p, a, b, scale, zero)]


def _assert_close_up_to_ties(got, want, scale, g):
    """A B summed in another order may move a value across a rounding boundary: allow a few elements
    one quantization step apart, nothing more."""
    diff = (got.float() - want.float()).abs()
    step = scale.repeat_interleave(g if g > 0 else got.shape[1], dim=1).float()
    tol = step * 0.01 + 2 * torch.finfo(got.dtype).eps * want.float().abs()  # 16-bit output rounding
    off = diff > tol
    assert off.float().mean() < 2e-3, f"{int(off.sum())} of {off.numel()} elements differ"
    assert torch.all(diff <= step * 1.01 + tol)


@pytest.mark.parametrize("n,k,r,bits,g,frac_bits", CASES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_fused_matches_reference(n, k, r, bits, g, frac_bits, dtype, _):
    p, a, b, scale, zero = _inputs(n, k, r, bits, g, frac_bits, dtype)
    c = 2.0 / r
    grad_w = torch.randn(n, k, device="cuda").to(dtype)

    def run(fn, *inputs):
        leaves = [t.clone().requires_grad_() for t in inputs[1:4]]
        w = fn(inputs[0], *leaves, inputs[4], c, bits, g, frac_bits)
        w.backward(grad_w.to(w.device))
        return [w] + [t.grad for t in leaves]

    names = kernel_names(lambda: run(ops.lrqat_weight, p, a, b, scale, zero))
    assert "lrqat_tile_kernel" in names
    got = run(ops.lrqat_weight, p, a, b, scale, zero)
    want = run(reference.lrqat_weight, *[t.cpu() for t in (p, a, b, scale, zero)])
    assert got[0].dtype == dtype
    _assert_close_up_to_ties(got[0].cpu(), want[0], scale.cpu(), g)
    for name, x, y in zip(("a", "b", "scale"), got[1:], want[1:]):
        y = y.float()
        err = (x.cpu().float() - y).norm() / y.norm().clamp(min=1e-6)
        assert err < 2e-2, f"grad_{name}: relative error {err:.3g}"


@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_fused_and_fp32_paths_agree_and_knob_switches(_):
    p, a, b, scale, zero = _inputs(64, 1024, 32, 4, 128, 0, torch.bfloat16)
    fused = ops.lrqat_weight(p, a, b, scale, zero, 1.0, 4, 128, 0)
    with qatext.tuning(lrqat_fused=False):
        assert "lrqat_tile_kernel" not in kernel_names(lambda: ops.lrqat_weight(p, a, b, scale, zero, 1.0, 4, 128, 0))
        plain = ops.lrqat_weight(p, a, b, scale, zero, 1.0, 4, 128, 0)
    assert qatext.get_tuning("lrqat_fused") == 1
    _assert_close_up_to_ties(fused, plain, scale, 128)


@pytest.mark.parametrize("n,k,r,bits,g,frac_bits", [(80, 640, 48, 4, 64, 4), (144, 384, 32, 3, 32, 0),
                                                     (256, 512, 16, 2, -1, 0), (48, 1024, 64, 8, 128, 0)])
@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_fused_blocks_running_through_many_tiles_match_one_tile_each(n, k, r, bits, g, frac_bits, blocks, _):
    # A few blocks run through every tile: each crosses column tiles (B^T restaged) and row groups, and
    # warps past the last row tile idle (n not a multiple of 128). The work split changes no value.
    p, a, b, scale, zero = _inputs(n, k, r, bits, g, frac_bits, torch.bfloat16)
    b = b.t().contiguous().t()  # a transposed view: the op copies it for the kernel
    grad_w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)

    def run():
        w = ops.lrqat_weight(p, a, b, scale, zero, 0.5, bits, g, frac_bits)
        return (w,) + torch.ops.qatext.lrqat_weight_backward(grad_w, p, a, b, scale, zero, 0.5, bits, g, frac_bits)

    one_each = run()
    with qatext.tuning(lrqat_fused_blocks=blocks):
        assert "lrqat_tile_kernel" in kernel_names(run)
        few = run()
    for x, y in zip(one_each, few):
        assert torch.equal(x, y)
    want = reference.lrqat_weight(*[t.cpu() for t in (p, a, b, scale, zero)], 0.5, bits, g, frac_bits)
    _assert_close_up_to_ties(few[0].cpu(), want, scale.cpu(), g)


@pytest.mark.parametrize("n,k,r,bits,g,frac_bits", [(48, 384, 8, 4, 32, 0), (144, 256, 32, 3, 128, 0),
                                                     (32, 512, 20, 2, -1, 0), (16, 384, 64, 4, 64, 4),
                                                     (128, 640, 24, 4, 128, 0)])  # dA, dB by the rank kernel
@pytest.mark.parametrize("blocks", [0, 1, 3])
@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_fused_stacked_experts_equal_each_expert_alone(n, k, r, bits, g, frac_bits, blocks, _):
    """Three experts' weights in one launch (a mixture's, nn.grouped_experts): each expert's W, dA, dB and ds as
    that expert alone gives them. Expert sizes not a multiple of the block's 8 row tiles leave warps idle at each
    expert's end; a few blocks run across experts (B^T restaged for each)."""
    experts = [_inputs(n, k, r, bits, g, frac_bits, torch.bfloat16) for _ in range(3)]
    stacked = [torch.stack(t) for t in zip(*experts)]
    grad_w = torch.randn(3, n, k, device="cuda", dtype=torch.bfloat16)
    with qatext.tuning(lrqat_fused_blocks=blocks):
        assert "lrqat_tile_kernel" in kernel_names(lambda: ops.lrqat_weight(*stacked, 0.5, bits, g, frac_bits))
        w = ops.lrqat_weight(*stacked, 0.5, bits, g, frac_bits)
        grads = torch.ops.qatext.lrqat_weight_backward(grad_w, *stacked, 0.5, bits, g, frac_bits)
        assert w.shape == (3, n, k) and [t.shape for t in grads] == [stacked[1].shape, stacked[2].shape,
                                                                     stacked[3].shape]
        for e, inputs in enumerate(experts):
            assert torch.equal(w[e], ops.lrqat_weight(*inputs, 0.5, bits, g, frac_bits))
            alone = torch.ops.qatext.lrqat_weight_backward(grad_w[e], *inputs, 0.5, bits, g, frac_bits)
            assert torch.equal(grads[2][e], alone[2])  # ds: the kernel's own sums
            for got, want in zip(grads[:2], alone[:2]):  # dA, dB: cuBLAS, batched against one at a time
                torch.testing.assert_close(got[e], want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_fused_is_deterministic(_):
    p, a, b, scale, zero = _inputs(32, 512, 32, 4, 256, 0, torch.bfloat16)
    grad_w = torch.randn(32, 512, device="cuda", dtype=torch.bfloat16)
    runs = [torch.ops.qatext.lrqat_weight_backward(grad_w, p, a, b, scale, zero, 0.5, 4, 256, 0) for _ in range(3)]
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_lrqat_linear_matches_reference_formula(device, dtype, bias):
    n, k, r, bits, g = 32, 256, 16, 4, 64
    p, a, b, scale, zero = _inputs(n, k, r, bits, g, 0, dtype, device)
    x = torch.randn(3, 5, k, device=device, dtype=dtype)
    bias_t = torch.randn(n, device=device, dtype=dtype) if bias else None
    grad_y = torch.randn(3, 5, n, device=device, dtype=dtype)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, a, b, scale) + ((bias_t,) if bias else ())]
        y = fn(leaves)
        y.backward(grad_y)
        return [y] + [t.grad for t in leaves]

    got = run(lambda t: ops.lrqat_linear(t[0], p, t[1], t[2], t[3], zero, 0.5, bits, g, 0,
                                          t[4] if bias else None))
    want = run(lambda t: F.linear(t[0], reference.lrqat_weight(p, t[1], t[2], t[3], zero, 0.5, bits, g, 0).to(dtype),
                                  t[4] if bias else None))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for x_, y_ in zip(got, want):
        assert x_.dtype == y_.dtype and x_.shape == y_.shape
        err = (x_.float() - y_.float()).norm() / y_.float().norm().clamp(min=1e-6)
        assert err < tol


def test_lrqat_linear_holds_no_weight_for_backward(device):
    n, k = 64, 512
    p, a, b, scale, zero = _inputs(n, k, 16, 4, 128, 0, torch.float32, device)
    a.requires_grad_()
    x = torch.randn(4, k, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.lrqat_linear(x, p, a, b, scale, zero, 1.0, 4, 128, 0)
    assert saved and all(t.numel() < n * k for t in saved if t.dtype != torch.uint8), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert a.grad is not None and x.grad is not None


@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_fp32_adapters_with_bf16_activations_take_the_tensor_cores(_):
    # FSDP keeps fp32 masters of the adapters in a bf16 model: the layer must still use the tile kernels.
    from qatext import QuantSpec
    from qatext.nn import QuantLinear

    base = torch.nn.Linear(256, 64, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = QuantLinear.from_linear(base, QuantSpec(4, 128), "lrqat", rank=16, alpha=16.0)
    layer.lora_a.data = layer.lora_a.data.float().normal_(0, 0.02)
    layer.lora_b.data = layer.lora_b.data.float()
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    assert "lrqat_tile_kernel" in kernel_names(lambda: layer(x).float().sum().backward())
    assert layer.lora_a.grad.dtype == torch.float32 and layer.lora_a.grad.abs().sum() > 0


@pytest.mark.parametrize("n,k,r,bits,g,frac_bits", [(64, 512, 32, 4, 128, 0), (80, 640, 48, 4, 64, 4),
                                                     (144, 384, 16, 2, 32, 0)])
@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda_only)])
def test_lrqat_linear_backward_rebuilds_the_weight_in_its_one_pass(n, k, r, bits, g, frac_bits, _):
    # Forward and backward run the tile kernel once each (the backward pass writes W for dX too), and
    # every gradient has the bits of the two-pass composition.
    p, a, b, scale, zero = _inputs(n, k, r, bits, g, frac_bits, torch.bfloat16)
    x = torch.randn(3, 7, k, device="cuda", dtype=torch.bfloat16)
    grad_y = torch.randn(3, 7, n, device="cuda", dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, scale)]

    def step():
        for t in leaves:
            t.grad = None
        ops.lrqat_linear(leaves[0], p, *leaves[1:4], zero, 0.5, bits, g, frac_bits).backward(grad_y)

    assert kernel_names(step).count("lrqat_tile_kernel") == 2
    got = [t.grad for t in leaves]
    w = ops.lrqat_weight(p, a, b, scale, zero, 0.5, bits, g, frac_bits)
    grad_w = grad_y.reshape(-1, n).t() @ x.reshape(-1, k)
    want = [(grad_y @ w)] + list(torch.ops.qatext.lrqat_weight_backward(grad_w, p, a, b, scale, zero, 0.5, bits, g,
                                                                         frac_bits))
    for name, x_, y_ in zip(("x", "a", "b", "scale"), got, want):
        assert torch.equal(x_, y_), name


def test_lrqat_linear_backward_without_grad_input(device):
    n, k, r, bits, g = 32, 256, 16, 4, 64
    p, a, b, scale, zero = _inputs(n, k, r, bits, g, 0, torch.float32, device)
    x, grad_y = torch.randn(6, k, device=device), torch.randn(6, n, device=device)
    full = torch.ops.qatext.lrqat_linear_backward(grad_y, x, p, a, b, scale, zero, 0.5, bits, g, 0, True)
    part = torch.ops.qatext.lrqat_linear_backward(grad_y, x, p, a, b, scale, zero, 0.5, bits, g, 0, False)
    assert full[0].shape == x.shape and part[0].numel() == 0
    for x_, y_ in zip(full[1:], part[1:]):
        assert torch.equal(x_, y_)
    with pytest.raises(ValueError, match="grad_y .* and x .* must have the same rows"):
        torch.ops.qatext.lrqat_linear_backward(grad_y[:5], x, p, a, b, scale, zero, 0.5, bits, g, 0, True)


def test_lrqat_linear_gradients_do_not_depend_on_which_inputs_need_them(device):
    # The autograd takes the one-op backward when an adapter or the scale needs a gradient (with or
    # without dX) and the weight op + one GEMM when only x does: each gradient comes out the same.
    n, k, r, bits, g = 32, 256, 16, 4, 64
    p, a, b, scale, zero = _inputs(n, k, r, bits, g, 0, torch.bfloat16, device)
    x = torch.randn(2, 5, k, device=device, dtype=torch.bfloat16)
    grad_y = torch.randn(2, 5, n, device=device, dtype=torch.bfloat16)

    def grads(which):
        leaves = {name: t.clone().requires_grad_(name in which) for name, t in (("x", x), ("a", a), ("b", b),
                                                                                 ("scale", scale))}
        ops.lrqat_linear(leaves["x"], p, leaves["a"], leaves["b"], leaves["scale"], zero, 0.5, bits, g,
                         0).backward(grad_y)
        return {name: t.grad for name, t in leaves.items() if name in which}

    every = grads({"x", "a", "b", "scale"})
    for which in ({"a", "b", "scale"}, {"x"}, {"scale"}):
        for name, got in grads(which).items():
            assert torch.equal(got, every[name]), name
