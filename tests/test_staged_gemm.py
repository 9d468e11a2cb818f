"""The staged GEMM on the tiled layout (CUDA, 16-bit x, M beyond the decode kernel up to
staged_gemm_max_m): against the reference with the weight rounded to x's dtype (as its mma.sync form
rounds it), on every bit width, group size, token tail, both row-tile counts, split-K through global
partials and through a cluster; its wgmma form (sm_90, one row tile a warp, more than 32 tokens) against
the exact weight, with integer, fractional and far zeros and zero scales; it runs where the dispatch
says, and is deterministic."""

import contextlib
import re

import pytest
import torch
from conftest import kernel_names, knob
from test_decode_gemm import _weight

from qatext import ops, reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The mma.sync form sums exact fp32 products of x and the weight rounded once to x's dtype: against the
# reference with that same rounded weight, only the summation order and the output rounding differ.
TOL = {torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}, torch.float16: {"rtol": 2e-3, "atol": 2e-3}}
# The wgmma form keeps the weight exact: against the rounded one it also differs by that rounding, at
# most half an ulp of each weight (2^-8 and 2^-11 of it) times |x|, summed.
WEIGHT_ROUNDING = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _rounded_weight(x, packed, scale, zero, bits, g):
    return reference.dequant(packed, scale, zero, bits, g, x.shape[-1], dtype=x.dtype).float()


def _product(x, w, bias=None):
    y = x.float() @ w.T
    return y + bias.float() if bias is not None else y


def _expected(x, packed, scale, zero, bits, g, bias=None):
    return _product(x, _rounded_weight(x, packed, scale, zero, bits, g), bias)


def _assert_matches_rounded(y, x, packed, scale, zero, bits, g, bias=None):
    """y within TOL of the reference with the weight rounded to x's dtype, widened by that rounding."""
    w = _rounded_weight(x, packed, scale, zero, bits, g)
    expected = _product(x, w, bias)
    tol = TOL[x.dtype]
    bound = tol["atol"] + tol["rtol"] * expected.abs() + WEIGHT_ROUNDING[x.dtype] * (x.float().abs() @ w.abs().T)
    excess = (y.float() - expected).abs() - bound
    assert excess.max() <= 0, f"{(excess > 0).sum().item()} outputs beyond the bound, worst by {excess.max().item():.3g}"


def _staged(x, tiled, scale, zero, bits, g, bias=None, **knobs):
    settings = {"decode_gemm_max_m": 0, "staged_gemm_max_m": 512, **knobs}
    with contextlib.ExitStack() as stack:
        for name, value in settings.items():
            stack.enter_context(knob(name, value))
        return ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g, bias)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,g", [(128, 256, 64), (256, 512, 128), (48, 192, -1), (384, 1024, 256), (1040, 128, 64),
                                   (64, 4096, 128)])
@pytest.mark.parametrize("m", [2, 17, 32, 33, 64, 100, 128, 257])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_the_reference_with_the_weight_rounded(bits, n, k, g, m, dtype):
    """48 and 1040 rows: one row tile a warp (N not a multiple of 32) and a part-empty last block; 257
    tokens: five token blocks, the last with one token."""
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype) if m % 2 else None
    y = _staged(x, tiled, scale, zero, bits, g, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    _assert_matches_rounded(y, x, packed, scale, zero, bits, g, bias)


@pytest.mark.parametrize("cluster", [0, 1])
@pytest.mark.parametrize("row_tiles", [1, 2])
@pytest.mark.parametrize("min_slice,g", [(1, 128), (3, 128), (3, 256), (64, 128), (7, -1), (2, 64)])
@pytest.mark.parametrize("m", [20, 64, 72])
def test_split_k_slices_of_any_length_match_the_reference(min_slice, g, m, row_tiles, cluster):
    """From 64 slices of one tile to one slice; slices that start inside a group carry its scales and
    zeros; the slices summed through a cluster where they fit, else through global partials."""
    n, k, bits = 1088, 4096, 4
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = _staged(x, tiled, scale, zero, bits, g, bias, decode_gemm_min_slice=min_slice,
                decode_gemm_row_tiles=row_tiles, staged_gemm_cluster=cluster)
    _assert_matches_rounded(y, x, packed, scale, zero, bits, g, bias)


@pytest.mark.parametrize("n,k,m", [(4096, 4096, 64), (1024, 4096, 40), (2048, 1024, 128)])
def test_cluster_split_k_equals_the_global_partials_bit_for_bit(n, k, m):
    bits, g = 4, 128
    _, tiled, scale, zero = _weight(n, k, bits, g)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    results = [_staged(x, tiled, scale, zero, bits, g, bias, staged_gemm_cluster=c) for c in (0, 1)]
    assert torch.equal(results[0], results[1])


def test_dispatch_runs_the_staged_kernel_between_decode_and_its_limit_deterministically():
    n, k, bits, g = 512, 2048, 4, 128
    _, tiled, scale, zero = _weight(n, k, bits, g)

    def names(m, **knobs):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        return kernel_names(lambda: _staged(x, tiled, scale, zero, bits, g, **knobs))

    assert re.findall(r"staged_gemm_kernel<[^<>]*, (\d+), (\d+), \d+>", names(40)) == [("8", "2")]  # MT 8, NT 2
    assert re.findall(r"staged_gemm_kernel<[^<>]*, (\d+), (\d+), \d+>", names(20)) == [("4", "2")]
    assert "staged_gemm_kernel" not in names(129, staged_gemm_max_m=128)
    assert "staged_gemm_kernel" not in names(40, staged_gemm_max_m=0)
    with knob("decode_gemm_max_m", 64):  # the decode kernel first, up to its limit
        x = torch.randn(40, k, device="cuda", dtype=torch.bfloat16)
        assert "staged_gemm_kernel" not in kernel_names(lambda: ops.dequant_matmul_tiled(x, tiled, scale, zero, 4, g))
    x = torch.randn(3, 40, k, device="cuda", dtype=torch.bfloat16)
    first = _staged(x, tiled, scale, zero, bits, g)
    assert first.shape == (3, 40, n) and torch.equal(_staged(x, tiled, scale, zero, bits, g), first)


@pytest.mark.parametrize("zeros", ["integer", "fraction", "far"])
@pytest.mark.parametrize("m,min_slice", [(64, 1), (100, 3), (128, 64), (257, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_form_keeps_the_weight_exact(zeros, m, min_slice, dtype):
    """One row tile a warp: on sm_90 the wgmma form (fragments q - round(z), sums rescaled from group to
    group, z's fraction times sum_k x over the slice's part of the group). Zeros integer, with a fraction,
    or beyond the 16-bit range of q - round(z); a row with every scale zero, rows with one group's zero;
    slices of 1 and 3 tiles (starting inside a group); 1040 rows (a last block with one busy warp).
    Against x @ the exact fp32 weight: fp32 sums, one output rounding."""
    n, k, bits, g = 1040, 1024, 4, 128
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    zero = {"integer": zero.round(), "fraction": zero, "far": zero * 20 - 100.3}[zeros]
    scale = scale.clone()
    scale[3] = 0
    scale[::7, 2] = 0
    x = (torch.randn(m, k, device="cuda") + 1).to(dtype)
    y = _staged(x, tiled, scale, zero, bits, g, decode_gemm_row_tiles=1, decode_gemm_min_slice=min_slice)
    w = reference.dequant(packed, scale, zero, bits, g, k, dtype=torch.float32)
    expected = x.float() @ w.T
    assert torch.all(y[:, 3] == 0)
    torch.testing.assert_close(y.float(), expected, rtol=2**-7, atol=expected.abs().max().item() / 4096)


def test_long_sums_of_offset_activations_stay_accurate():
    """K = 8192, activations with mean 4: the weight is rounded once (as dequant + cuBLAS does), the
    sums of exact products stay within the output's rounding."""
    n, k, bits, g = 64, 8192, 4, 128
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    x = (torch.randn(40, k, device="cuda") + 4).to(torch.bfloat16)
    y = _staged(x, tiled, scale, zero, bits, g)
    expected = _expected(x, packed, scale, zero, bits, g)
    torch.testing.assert_close(y.float(), expected, rtol=2**-7, atol=expected.abs().max().item() / 4096)


def test_tuning_measures_the_staged_limit_and_the_dispatch_follows_it():
    """tune_decode_gemm times the staged kernel against the path beyond it at 32, 64 and 128 tokens; with
    staged_gemm_max_m at -1 (the default) calls between the decode crossover and that limit take it, and
    no others. A CPU has nothing measured; an unmeasured shape never takes it."""
    n, k, bits, g = 2048, 2048, 4, 128
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    assert ops.staged_gemm_limit("cuda", n, k, bits, g) == 0  # not yet measured
    assert ops.tune_decode_gemm(tiled, scale, zero, bits, g, k)
    limit, crossover = ops.staged_gemm_limit("cuda", n, k, bits, g), ops.decode_gemm_crossover("cuda", n, k, bits, g)
    assert limit in (0, 32, 64, 128) and ops.staged_gemm_limit("cpu", n, k, bits, g) == 0

    def staged(m):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        names = kernel_names(lambda: ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g))
        expected = _expected(x, packed, scale, zero, bits, g)  # (beyond the limit cuBLAS's bf16 GEMM: 2 output ulps)
        torch.testing.assert_close(ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g).float(), expected,
                                   rtol=2e-2, atol=expected.abs().max().item() / 64)
        return "staged_gemm_kernel" in names

    for m in {crossover + 1, limit + 1} | ({limit} if limit else set()):
        assert staged(m) == (crossover < m <= limit), (m, crossover, limit)
    with knob("staged_gemm_max_m", 0):
        assert not staged(crossover + 1)
