"""The decode GEMM's tiled weight layout: exact both ways, equal to the pure-PyTorch reference, clear
errors on shapes it cannot hold, and dequant_matmul_tiled equal to dequant_matmul on CPU and CUDA."""

import pytest
import torch

from conftest import DTYPES, knob, random_qparams
from qatext import ops, reference


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k", [(16, 64), (48, 192), (128, 512), (32, 1024)])
def test_round_trip_and_reference(device, bits, n, k):
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device)
    packed = ops.pack(codes, bits)
    tiled = ops.tile_packed(packed, bits, k)
    assert tiled.shape == packed.shape and tiled.dtype == torch.uint8
    assert torch.equal(tiled, reference.tile_packed(packed, bits, k))
    assert torch.equal(ops.untile_packed(tiled, bits, k), packed)
    assert torch.equal(reference.untile_packed(tiled, bits, k), packed)
    if n * k >= 4096:  # a real permutation, not the identity
        assert not torch.equal(tiled, packed)


def test_tile_position_of_one_code():
    """Code (n=9, k=70) of a 4-bit [16, 128] weight: tile 1 (k // 64), lane 4 * (9 % 8) + 0 = 4, step
    j = 1, e = 2, so register 1 + 2 = 3 (row g + 8, columns e = 2, 3), low half: bit 4 * 3 = 12 of word 1,
    byte 512 + 16 * 4 + 4 * 1 + 12 // 8 = 581, shift 12 % 8 = 4."""
    codes = torch.zeros(16, 128, dtype=torch.uint8)
    codes[9, 70] = 0xB
    tiled = ops.tile_packed(ops.pack(codes, 4), 4, 128).flatten()
    assert tiled.nonzero().flatten().tolist() == [581] and tiled[581].item() == 0xB0


def test_tile_position_of_one_3_bit_code():
    """The same code position, 3 bits, value 0b101: tile 1 starts at byte 384. Low bits 0b01 in the
    2-bit plane: step j = 1 is the second step of word 0, register 3, so bit 2 * (3 + 4) = 14 of lane
    4's first word: byte 384 + 8 * 4 + 1 = 417, shift 6. The high bit in the 1-bit plane (at 256):
    bit 3 + 4 * 1 = 7 of lane 4's word: byte 384 + 256 + 4 * 4 = 656, shift 7."""
    codes = torch.zeros(16, 128, dtype=torch.uint8)
    codes[9, 70] = 0b101
    tiled = ops.tile_packed(ops.pack(codes, 3), 3, 128).flatten()
    assert tiled.nonzero().flatten().tolist() == [417, 656]
    assert tiled[417].item() == 0x40 and tiled[656].item() == 0x80


@pytest.mark.parametrize("op", ["tile_packed", "untile_packed"])
def test_bad_shapes_are_value_errors(op):
    fn = getattr(ops, op)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        fn(torch.zeros(16, 64, dtype=torch.uint8), 8, 64)
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        fn(torch.zeros(20, 32, dtype=torch.uint8), 4, 64)
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 64"):
        fn(torch.zeros(16, 48, dtype=torch.uint8), 4, 96)
    with pytest.raises(ValueError, match="must have shape"):
        fn(torch.zeros(16, 33, dtype=torch.uint8), 4, 64)
    with pytest.raises((ValueError, TypeError), match="uint8"):
        fn(torch.zeros(16, 32, dtype=torch.int32), 4, 64)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequant_matmul_tiled_matches_dequant_matmul(device, bits):
    n, k, g = 64, 256, 128
    packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device), bits)
    scale, zero = random_qparams(n, k, bits, g, False, device)
    x = torch.randn(2, 3, k, device=device)
    bias = torch.randn(n, device=device)
    y = ops.dequant_matmul_tiled(x, ops.tile_packed(packed, bits, k), scale, zero, bits, g, bias)
    torch.testing.assert_close(y, ops.dequant_matmul(x, packed, scale, zero, bits, g, bias))
    torch.testing.assert_close(y, reference.dequant_matmul(x, packed, scale, zero, bits, g, bias), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.dequant_matmul_tiled(x, ops.tile_packed(packed, bits, k), scale, zero, bits, g, bias[:-1])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g", [24, 32, 128, -1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [5, 80])
def test_dequant_matmul_tiled_beyond_decode_equals_dequant_matmul_exactly(device, bits, g, dtype, rows):
    """Beyond the decode and staged kernels a tiled weight is dequantised straight from its layout (16-bit
    CUDA inputs of at most dequant_gemm_max_m rows: untiled for the fused kernel), to the very values dequant makes
    from the packed codes: the output equals dequant_matmul's bit for bit (g = 24: a lane's 16 columns
    straddle two groups)."""
    n, k = 48, 384
    packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device), bits)
    scale, zero = random_qparams(n, k, bits, g, False, device)
    x = torch.randn(rows, k, device=device, dtype=dtype)
    bias = torch.randn(n, device=device, dtype=dtype)
    tiled = ops.tile_packed(packed, bits, k)
    with knob("decode_gemm_max_m", 0), knob("staged_gemm_max_m", 0):
        y = ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, g, bias)
    torch.testing.assert_close(y, ops.dequant_matmul(x, packed, scale, zero, bits, g, bias), rtol=0, atol=0)


def test_tune_decode_gemm_checks_its_arguments_and_leaves_cpu_weights_alone():
    """Tuning is for CUDA weights the decode kernel takes; on a CPU it checks its arguments and does
    nothing else (no choice is recorded)."""
    n, k, bits, g = 64, 128, 4, 64
    tiled = ops.tile_packed(ops.pack(torch.randint(0, 16, (n, k), dtype=torch.uint8), bits), bits, k)
    scale, zero = torch.rand(n, k // g) + 0.1, torch.zeros(n, k // g)
    ops.tune_decode_gemm(tiled, scale, zero, bits, g, k)
    assert ops.decode_gemm_choice("cpu", n, k, bits, g, 1) is None
    with pytest.raises(ValueError, match=r"qatext.tune_decode_gemm: scale must have shape \[64, 2\]"):
        ops.tune_decode_gemm(tiled, scale[:, :1], zero, bits, g, k)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g", [24, 64, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_tiled_is_dequant_of_the_untiled_codes(device, bits, g, dtype):
    """Stacked experts' tiled codes (nn.grouped_experts) are dequantised straight from the layout: the very values
    dequant gives from the packed codes, without the untiled copy."""
    n, k = 48, 384
    packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device), bits)
    scale, zero = random_qparams(n, k, bits, g, False, device)
    w = ops.dequant_tiled(ops.tile_packed(packed, bits, k), scale, zero, bits, g, k, dtype)
    assert w.dtype == dtype and w.shape == (n, k)
    assert torch.equal(w, ops.dequant(packed, scale, zero, bits, g, k, dtype))
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        ops.dequant_tiled(torch.zeros(20, k * bits // 8, dtype=torch.uint8, device=device), scale, zero, bits, g, k)
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16"):
        ops.dequant_tiled(ops.tile_packed(packed, bits, k), scale, zero, bits, g, k, torch.int8)
