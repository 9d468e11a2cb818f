"""A block's experts on their stacked tiled codes in one decode launch (ops.grouped_matmul_tiled): each
expert's rows against the reference (CPU and CUDA), experts with no rows, rows routed past the list, token
tiles that cross no expert's boundary, SwiGLU per expert; one kernel launch, and no host synchronisation."""

import pytest
import torch

from conftest import kernel_names, random_qparams
from qatext import ops, reference
from test_swiglu import UNIT_ROUNDOFF, _assert_close_to_reference

# The decode kernel multiplies by the exact dequantised weight in fp32: the error is the output's 16-bit
# rounding and the summation order (as test_decode_gemm's); SwiGLU rounds silu(gate) * up once.
TOL = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _assert_each_expert_close(y, x, offs, tiled, scale, zero, bits, g, swiglu, fused):
    """Each expert's rows within the roundings of its path (test_swiglu's bound for SwiGLU; else the output's
    rounding u |y|, and where the weight is rounded to x's dtype first (off the kernel) u |x| |W| more)."""
    n = tiled.shape[0] // offs.numel()
    first = 0
    for e, last in enumerate(offs.tolist()):
        rows, w = slice(first, last), slice(e * n, (e + 1) * n)
        first = last
        if rows.start == rows.stop:
            continue
        args = (x[rows], tiled[w], scale[w], zero[w], bits, g)
        if swiglu:
            _assert_close_to_reference(y[rows], *args, fused=fused)
            continue
        expected = reference.dequant_matmul_tiled(x[rows].float(), *args[1:])
        u = UNIT_ROUNDOFF[y.dtype]
        bound = u * expected.abs() + 1e-3 * u * expected.abs().max()
        if not fused:
            weight = reference.dequant_tiled(tiled[w], scale[w], zero[w], bits, g, x.shape[-1])
            bound = bound + u * (x[rows].float().abs() @ weight.abs().t())
        excess = (y[rows].float() - expected).abs() - bound
        assert excess.max() <= 0, f"expert {e}: off by up to {excess.max().item():.3g} past the rounding bound"


def _experts(experts, n, k, bits, g, device):
    """The experts' tiled codes, scale and zero, each expert tiled on its own and stacked (as a block's layers'
    tiled buffers are stacked)."""
    tiled, scales, zeros = [], [], []
    for _ in range(experts):
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
        tiled.append(ops.tile_packed(ops.pack(codes, bits), bits, k))
        s, z = random_qparams(n, k, bits, g, False, "cpu")
        scales.append(s), zeros.append(z)
    return [torch.cat(t).to(device) for t in (tiled, scales, zeros)]


def _routing(counts, past, k, dtype, device):
    """x sorted by expert (counts[e] rows each), then `past` rows routed past the list; offs as grouped_mm's."""
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(device)
    x = torch.randn(sum(counts) + past, k).to(dtype).to(device)
    return x, offs


ROUTINGS = {
    "decode": [0, 1, 0, 0, 1, 0, 1, 1],          # one token a chosen expert, most experts idle
    "uneven": [3, 0, 17, 1, 0, 8, 9, 40],        # tiles of one expert never hold another's rows
    "one expert": [0, 0, 0, 33, 0, 0, 0, 0],
    "32-token tiles": [40, 33, 0, 70],          # ~37 rows an expert: 4 token tiles a block, two blocks an expert
}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,g", [(64, 256, 64), (128, 512, 128), (32, 192, -1)])
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference(device, bits, n, k, g, routing, swiglu, dtype):
    tiled, scale, zero = _experts(len(ROUTINGS[routing]), n, k, bits, g, device)
    x, offs = _routing(ROUTINGS[routing], 3, k, dtype, device)
    y = ops.grouped_matmul_tiled(x, offs, tiled, scale, zero, bits, g, swiglu)
    assert y.shape == (x.shape[0], n // 2 if swiglu else n) and y.dtype == dtype
    _assert_each_expert_close(y, x, offs, tiled, scale, zero, bits, g, swiglu, fused=device == "cuda")
    assert (y[-3:] == 0).all()  # routed past the list
    # The reference itself (fp32 throughout) is within the kernel's bound.
    expected = reference.grouped_matmul_tiled(x, offs, tiled, scale, zero, bits, g, swiglu)
    _assert_each_expert_close(expected, x, offs, tiled, scale, zero, bits, g, swiglu, fused=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_launch_and_no_host_sync():
    """Two kernels (the token tiles' table, the GEMM), whatever the routing, and capturable in a CUDA graph:
    replaying it with another routing gives that routing's products."""
    tiled, scale, zero = _experts(16, 128, 256, 4, 128, "cuda")
    x, offs = _routing([2, 0, 1] + [0] * 12 + [5], 0, 256, torch.bfloat16, "cuda")
    names = kernel_names(lambda: ops.grouped_matmul_tiled(x, offs, tiled, scale, zero, 4, 128))
    assert names.count("decode_gemm_kernel") == 1 and names.count("expert_items") == 1, names
    ops.grouped_matmul_tiled(x, offs, tiled, scale, zero, 4, 128)  # (warm: tuning, workspaces)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.grouped_matmul_tiled(x, offs, tiled, scale, zero, 4, 128)
    offs.copy_(torch.tensor([0] * 15 + [8], dtype=torch.int32).cumsum(0))
    graph.replay()
    expected = reference.grouped_matmul_tiled(x.float(), offs, tiled, scale, zero, 4, 128)
    torch.testing.assert_close(y.float(), expected, **TOL[torch.bfloat16])


def test_no_rows(device):
    tiled, scale, zero = _experts(2, 32, 128, 4, 64, device)
    x = torch.empty(0, 128, dtype=torch.bfloat16, device=device)
    offs = torch.zeros(2, dtype=torch.int32, device=device)
    assert ops.grouped_matmul_tiled(x, offs, tiled, scale, zero, 4, 64, True).shape == (0, 16)


def test_bad_arguments_name_themselves():
    tiled, scale, zero = _experts(2, 32, 128, 4, 64, "cpu")
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="grouped_matmul_tiled.*offs must be int32"):
        ops.grouped_matmul_tiled(x, torch.tensor([1, 4]), tiled, scale, zero, 4, 64)
    with pytest.raises(ValueError, match="grouped_matmul_tiled.*3 experts"):
        ops.grouped_matmul_tiled(x, torch.tensor([1, 2, 4], dtype=torch.int32), tiled, scale, zero, 4, 64)
    with pytest.raises(ValueError, match="grouped_matmul_tiled.*non-decreasing"):
        ops.grouped_matmul_tiled(x, torch.tensor([3, 1], dtype=torch.int32), tiled, scale, zero, 4, 64)
    with pytest.raises(ValueError, match="grouped_matmul_tiled.*swiglu"):
        ops.grouped_matmul_tiled(x, torch.tensor([1, 4], dtype=torch.int32), tiled[:32], scale[:32], zero[:32], 4, 64,
                                 True)
