"""The register-direct decode GEMM on the tiled layout (CUDA, 16-bit x, small M): against the reference
on both bit widths, groups, odd M, split-K on and off, bias; it really runs, and is deterministic."""

import re

import pytest
import torch

from conftest import kernel_names, knob
from qatext import QuantSpec, ops, reference
from qatext.nn import QuantLinear
from test_dequant_gemm import _weight as packed_weight

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The kernel multiplies by the exact dequantised weight in fp32 (the reference's own arithmetic), so
# the only error is the output's 16-bit rounding and the summation order.
TOL = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _weight(n, k, bits, g):
    """test_dequant_gemm's random weight, and its tiled layout."""
    packed, scale, zero = packed_weight(n, k, bits, g)
    return packed, ops.tile_packed(packed, bits, k), scale, zero


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,g", [(128, 256, 64), (256, 512, 128), (48, 192, -1), (384, 1024, 256), (1040, 128, 64),
                                   (128, 64, -1), (64, 4096, 128)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 17, 32, 40, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference(bits, n, k, g, m, dtype):
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype) if m % 2 else None
    with knob("decode_gemm_max_m", 64):
        y = ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g, bias)
    expected = reference.dequant_matmul(x, packed, scale, zero, bits, g, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y.float(), expected.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [128, -1])
def test_long_sums_of_offset_activations_stay_accurate(g, dtype):
    """K = 8192, activations with mean 4: the per-group sums are large, and the zero term
    (z * s * sum x) nearly cancels s * sum x q; the result must still be within one output rounding.
    bf16's mma takes base + q (base = 128 joins the zero term), so base * sum x is in every sum too."""
    n, k, bits = 64, 8192, 4
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    x = (torch.randn(5, k, device="cuda") + 4).to(dtype)
    with knob("decode_gemm_max_m", 16):
        y = ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g)
    expected = reference.dequant_matmul(x, packed, scale, zero, bits, g).float()
    if dtype == torch.float16:
        torch.testing.assert_close(y.float(), expected, **TOL[torch.float16])
    else:  # one output ulp (2^-8 to 2^-7 of the value), and 2^-12 of the largest output near zero: an fp32
        # simulation of the base-folded sums errs 0.002 (g128) / 0.1 (per channel) against outputs up to
        # 1.4e3 / 7e3; dequant + cuBLAS (the weight rounded to bf16) errs 1.0 / 7.4 here, and would fail.
        torch.testing.assert_close(y.float(), expected, rtol=2**-7, atol=expected.abs().max().item() / 4096)


def test_kernel_runs_is_deterministic_and_dispatch_falls_back():
    n, k, bits, g = 512, 2048, 4, 128
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    x = torch.randn(2, 5, k, device="cuda", dtype=torch.bfloat16)

    def call():
        return ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g)

    with knob("decode_gemm_max_m", 64):
        assert "decode_gemm_kernel" in kernel_names(call)
        fused = call()
        assert torch.equal(call(), fused)  # split-K partials summed in a fixed order
    with knob("decode_gemm_max_m", 0):
        assert "decode_gemm_kernel" not in kernel_names(call)
        plain = call()
    assert fused.shape == plain.shape == (2, 5, n)
    expected = reference.dequant_matmul(x, packed, scale, zero, bits, g).float()
    torch.testing.assert_close(fused.float(), expected, **TOL[torch.bfloat16])
    torch.testing.assert_close(plain.float(), expected, rtol=2e-2, atol=6e-2)  # its weight is rounded to bf16


@pytest.mark.parametrize("stages,cluster", [(2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1), (8, 0), (8, 1)])
@pytest.mark.parametrize("row_tiles", [1, 2, 4])
@pytest.mark.parametrize("n,min_slice,g", [(1088, 1, 128), (1088, 3, 128), (1088, 3, 256), (1088, 64, 128),
                                           (4352, 1, 128), (1088, 7, -1), (1088, 2, 64)])
@pytest.mark.parametrize("m", [1, 7, 16, 29])
def test_split_k_slices_of_any_length_match_the_reference(n, min_slice, g, m, row_tiles, stages, cluster):
    """From one-wave split-K (64 slices of one tile here) to one slice, with 1, 2 or 4 row tiles per
    warp allowed (4352 rows with single-tile slices fill the grid with 4: a partial last column block);
    the last block's reduction takes the splits four at a time and a remainder. Slices that start inside
    a group (4-tile groups over 3-tile slices, per-channel) and groups of one tile carry each
    group's scales and zeros; rings of 4 and 8 stages (2, 3 and 4 at 29 tokens: one 32-token block, its sums
    in units of the group's scale), longer and shorter than a slice; the slices summed through a cluster
    where they fit one, else through global partials."""
    k, bits = 4096, 4
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    with (knob("decode_gemm_max_m", 64), knob("decode_gemm_warp_split", 0), knob("decode_gemm_min_slice", min_slice),
          knob("decode_gemm_row_tiles", row_tiles), knob("decode_gemm_stages", stages),
          knob("decode_gemm_cluster", cluster)):
        y = ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g, bias)
    torch.testing.assert_close(y.float(), reference.dequant_matmul(x, packed, scale, zero, bits, g, bias).float(),
                               **TOL[torch.bfloat16])


@pytest.mark.parametrize("stages", [2, 3, 4, 8])
@pytest.mark.parametrize("row_tiles", [1, 2, 4])
@pytest.mark.parametrize("n,k,g", [(1088, 4096, 128), (1088, 576, 64), (1088, 11008, 256), (1088, 4096, -1),
                                   (64, 64, -1), (8448, 1024, 128)])
@pytest.mark.parametrize("m", [1, 7, 16, 29])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_warp_split_matches_the_reference(bits, n, k, g, m, row_tiles, stages):
    """The warps of a block split K over the same row tiles and sum in shared memory: slices of several
    tiles, of one or two with warps left empty (576 and 64 columns), slices that start inside a group
    (22-tile slices over 4-tile groups, per-channel), 1 to 4 token tiles, and 4 row tiles a block where
    the grid still covers the SMs (8448 rows); deterministic."""
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    with (knob("decode_gemm_max_m", 64), knob("decode_gemm_autotune", 0), knob("decode_gemm_warp_split", 1),
          knob("decode_gemm_row_tiles", row_tiles), knob("decode_gemm_stages", stages)):
        y = ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g, bias)
        assert torch.equal(ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g, bias), y)
    torch.testing.assert_close(y.float(), reference.dequant_matmul(x, packed, scale, zero, bits, g, bias).float(),
                               **TOL[torch.bfloat16])


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("warp_split,row_tiles", [(1, 1), (1, 2), (1, 4), (0, 2), (0, 4)])
@pytest.mark.parametrize("m", [17, 32, 45])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_32_token_blocks_in_scale_units_match_the_exact_weight(stages, warp_split, row_tiles, m, dtype):
    """32-token blocks sum in units of each group's scale (out rescaled by s_g / s_(g+1) at a group's
    start) with one all-ones mma a token-tile pair: scales up to 10^4 apart from group to group, a row
    whose every scale is zero, rows with one zero group (first, inner, last), fractional zeros; warp split
    and split-K across blocks (slices of 3 tiles: starting inside a group), 1, 2 and 4 row tiles a warp,
    each on a weight that keeps that many (the kernel run is checked): 66 row tiles (a part-empty last
    block across blocks), enough blocks to cover the SMs under warp split, 21 slices of 9 column blocks
    across blocks (the last part-empty). Against x @ the exact fp32 weight: fp32 sums, one output rounding."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, k = {(1, 1): (1056, 1024), (1, 2): (32 * (sms | 1), 1024), (1, 4): (64 * sms, 1024), (0, 2): (1056, 1024),
            (0, 4): (4352, 4096)}[warp_split, row_tiles]
    bits, g = 4, 128
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    scale = scale.clone() * torch.logspace(-2, 2, k // g, device="cuda")[torch.randperm(k // g)]
    scale[3] = 0
    scale[::7, 0] = 0
    scale[1::11, 3] = 0
    scale[2::13, -1] = 0
    x = (torch.randn(m, k, device="cuda") + 1).to(dtype)
    with (knob("decode_gemm_max_m", 64), knob("decode_gemm_autotune", 0), knob("decode_gemm_warp_split", warp_split),
          knob("decode_gemm_row_tiles", row_tiles), knob("decode_gemm_stages", stages),
          knob("decode_gemm_min_slice", 3)):
        y = ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g)
        names = kernel_names(lambda: ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g))
    # decode_gemm_kernel<T, BITS, MT, NT, S>
    assert re.findall(r"decode_gemm_kernel<[^<>]*, 4, (\d+), \d+>", names) == [str(row_tiles)], names
    expected = x.float() @ reference.dequant(packed, scale, zero, bits, g, k, dtype=torch.float32).T
    assert torch.all(y[:, 3] == 0)
    torch.testing.assert_close(y.float(), expected, rtol=2**-7, atol=expected.abs().max().item() / 4096)


@pytest.mark.parametrize("n,k,m", [(4096, 4096, 1), (1024, 4096, 8), (2048, 1024, 3), (4096, 4096, 16)])
def test_cluster_split_k_equals_the_global_partials_bit_for_bit(n, k, m):
    """Both split-K paths add the slices in the same order after the bias, so they agree exactly. The
    cluster path (sm_90) keeps its partials in shared memory: no fp32 [splits, M, N] buffer is made."""
    bits, g = 4, 128
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    results, peaks = {}, {}
    for cluster in (0, 1):
        with knob("decode_gemm_warp_split", 0), knob("decode_gemm_cluster", cluster):
            ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g, bias)  # warm: the counter buffer
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            results[cluster] = ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g, bias)
            peaks[cluster] = torch.cuda.max_memory_allocated() - base
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[1].float(), reference.dequant_matmul(x, packed, scale, zero, bits, g,
                                                                            bias).float(), **TOL[torch.bfloat16])
    if torch.cuda.get_device_capability()[0] >= 9 and m <= 8:  # one token tile: the grid's clusters fit
        assert peaks[1] < peaks[0], peaks


def test_tuning_picks_a_variant_per_token_bucket_that_matches_the_reference():
    """tune_decode_gemm times the variants once per weight shape; every later call of that shape takes
    the one it chose for its token bucket (1, up to 8, up to 16, and up to 32, 64 and 128 as it measures the
    crossover, from 32 tokens up), deterministic and within the reference's tolerance. A second call
    measures nothing new; the split-K knobs do not override a measured choice."""
    n, k, bits, g = 2112, 2048, 4, 128  # a shape no other test tunes
    packed, tiled, scale, zero = _weight(n, k, bits, g)
    assert ops.decode_gemm_choice("cuda", n, k, bits, g, 1) is None
    ops.tune_decode_gemm(tiled, scale, zero, bits, g, k)
    choices = {m: ops.decode_gemm_choice("cuda", n, k, bits, g, m) for m in (1, 5, 8, 13, 16, 17, 32)}
    assert all(c is not None and c["stages"] in ((4, 8) if m <= 16 else (2, 3, 4)) and c["row_tiles"] in (1, 2, 4)
               and (c["min_slice"] in (4, 8, 16) or (c["warp_split"] and c["min_slice"] == 0 and not c["cluster"]))
               for m, c in choices.items()), choices  # (32-token blocks: rings of 2, 3 or 4 stages)
    assert choices[5] == choices[8] and choices[13] == choices[16] and choices[17] == choices[32]
    ops.tune_decode_gemm(tiled, scale, zero, bits, g, k)
    assert {m: ops.decode_gemm_choice("cuda", n, k, bits, g, m) for m in choices} == choices
    with knob("decode_gemm_min_slice", 4), knob("decode_gemm_row_tiles", 1):  # they rule unmeasured shapes only
        assert ops.decode_gemm_choice("cuda", n, k, bits, g, 1) == choices[1]
    for m in choices:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g)
        assert torch.equal(ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g), y)
        torch.testing.assert_close(y.float(), reference.dequant_matmul(x, packed, scale, zero, bits, g).float(),
                                   **TOL[torch.bfloat16])


def test_a_forward_never_tunes_tile_for_decode_does():
    """A layer that tiles itself on its first decode forward does not time kernels there (that would
    synchronise the GPU); tile_for_decode() does, once per shape."""
    linear = torch.nn.Linear(1024, 1056, bias=False).cuda().bfloat16()  # a shape no other test tunes
    layer = QuantLinear.from_linear(linear, QuantSpec(4, 128), mode="fake").to_packed()
    with torch.no_grad():
        layer(torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16))
    assert ops.decode_gemm_choice("cuda", 1056, 1024, 4, 128, 1) is None
    layer.tile_for_decode()
    assert ops.decode_gemm_choice("cuda", 1056, 1024, 4, 128, 1) is not None


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_four_row_tiles_per_warp_where_the_grid_stays_full(bits):
    """Split-K across blocks: a large weight at M = 1 takes the 4-row-tile instance (and still matches
    the reference); a 64-row one, whose grid 4 row tiles would leave empty, keeps 2. Warp split (a block's
    warps on the same row tiles): 4 row tiles a block where the blocks still cover the SMs, 2 where they
    would leave one empty."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n, k, row_tiles, warp_split in [(8192, 16384, 4, 0), (64, 4096, 2, 0), (64 * sms, 1024, 4, 1),
                                        (64 * (sms - 1), 1024, 2, 1)]:
        packed, tiled, scale, zero = _weight(n, k, bits, 128)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        with knob("decode_gemm_warp_split", warp_split):
            names = kernel_names(lambda: ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, 128))  # noqa: B023
            # decode_gemm_kernel<T, BITS, MT, NT, S>
            assert re.findall(r"decode_gemm_kernel<[^<>]*, (\d+), \d+>", names) == [str(row_tiles)], names
            torch.testing.assert_close(ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, 128).float(),
                                       reference.dequant_matmul(x, packed, scale, zero, bits, 128).float(),
                                       **TOL[torch.bfloat16])


def test_unsupported_inputs_fall_back():
    """fp32 x, or groups of 32 (smaller than a 64-column tile): the untile + dequant_matmul path."""
    n, k, bits = 128, 256, 4
    for g, dtype in [(128, torch.float32), (32, torch.bfloat16)]:
        packed, tiled, scale, zero = _weight(n, k, bits, g)
        x = torch.randn(3, k, device="cuda", dtype=dtype)
        y = ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g)
        torch.testing.assert_close(y.float(), reference.dequant_matmul(x, packed, scale, zero, bits, g).float(),
                                   rtol=2e-2, atol=3e-2)


def test_quant_linear_decodes_through_the_kernel():
    """A packed bf16 layer with tile_for_decode() serves no-grad forwards with the decode kernel."""
    linear = torch.nn.Linear(512, 256, bias=True).cuda().bfloat16()
    layer = QuantLinear.from_linear(linear, QuantSpec(4, 128), mode="fake").to_packed()
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
        layer.tile_for_decode()
        assert "decode_gemm_kernel" in kernel_names(lambda: layer(x))
        torch.testing.assert_close(layer(x).float(), expected.float(), rtol=2e-2, atol=3e-2)



def test_chained_calls_reuse_the_counters_eagerly_and_in_graphs():
    """Decode GEMMs back to back, each reading the one before's output, after a torch kernel that
    writes the first input. Every split-K call on a stream shares one counter buffer, which each
    kernel leaves zero: so repeated calls and graph replays must match exactly. The graph is captured
    on a fresh stream, whose first call inside the capture gets a zeroed counter tensor instead."""
    k, bits, g, depth = 2048, 4, 128, 6
    weights = [(packed, tiled, scale * 0.14, zero) for packed, tiled, scale, zero in  # outputs stay ~1
               (_weight(k, k, bits, g) for _ in range(depth))]
    x0 = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)

    def chain(x):
        ys = [x * 0.5 + 1]  # a torch kernel right before the first decode GEMM
        for _, tiled, scale, zero in weights:
            ys.append(ops.dequant_matmul_tiled(ys[-1], tiled, scale, zero, bits, g))
        return torch.stack(ys)
    eager = [chain(x0) for _ in range(3)]
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        static_x = x0.clone()
        with torch.cuda.graph(graph, stream=stream):
            static_y = chain(static_x)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append(static_y.clone())
    for ys in eager[1:] + replays:
        assert torch.equal(ys, eager[0])
    for (packed, _, scale, zero), x, y in zip(weights, eager[0][:-1], eager[0][1:], strict=True):
        expected = reference.dequant_matmul(x, packed, scale, zero, bits, g)  # of what the kernel read
        torch.testing.assert_close(y.float(), expected.float(), **TOL[torch.bfloat16])

