"""pack / unpack / dequant against the reference; the documented bit layouts, by hand."""

import pytest
import torch

from conftest import DTYPES, at_odd_address, random_qparams
from qatext import ops, reference


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(1, 1), (7, 96), (5, 100), (33, 13), (2, 3, 64)])
def test_round_trip_and_reference(device, bits, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8, device=device)
    packed = ops.pack(codes, bits)
    assert packed.shape[-1] == (shape[-1] * bits + 7) // 8
    assert torch.equal(packed, reference.pack(codes, bits))
    assert torch.equal(ops.unpack(packed, bits, shape[-1]), codes)
    assert torch.equal(reference.unpack(packed, bits, shape[-1]), codes)


def test_int4_is_double_packed_low_nibble_first(device):
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8, device=device)
    assert ops.pack(codes, 4).tolist() == [[0x21, 0x0F]]


def test_int2_is_four_per_byte_lowest_first(device):
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8, device=device)
    assert ops.pack(codes, 2).tolist() == [[0b00111001, 0b00000011]]


def test_int3_is_a_little_endian_bit_stream(device):
    # 8 codes of 3 bits fill 3 bytes: code k at bits 3k..3k+2 of b0 | b1 << 8 | b2 << 16.
    codes = torch.tensor([[7, 0, 5, 1, 2, 3, 4, 6]], dtype=torch.uint8, device=device)
    word = sum(int(c) << (3 * k) for k, c in enumerate(codes[0].tolist()))
    assert ops.pack(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_int8_is_identity(device):
    codes = torch.randint(0, 256, (3, 17), dtype=torch.uint8, device=device)
    assert torch.equal(ops.pack(codes, 8), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n,k,g", [(7, 96, 32), (5, 100, -1), (33, 256, 128), (3, 512, 256), (6, 64, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant(device, bits, n, k, g, dtype):
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device)
    packed = ops.pack(codes, bits)
    scale, zero = random_qparams(n, k, bits, g, False, device)
    out = ops.dequant(packed, scale, zero, bits, g, k, dtype)
    assert out.dtype == dtype and out.shape == (n, k)
    torch.testing.assert_close(out, reference.dequant(packed, scale, zero, bits, g, k, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequant_of_codes_at_an_odd_address(device, bits):
    """Codes the vector kernel cannot read as aligned words take the element-wise kernel: same values."""
    n, k, g = 9, 128, 32
    packed = ops.pack(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device), bits)
    scale, zero = random_qparams(n, k, bits, g, False, device)
    odd = at_odd_address(packed)
    assert odd.data_ptr() % 2 == 1
    want = reference.dequant(packed, scale, zero, bits, g, k, torch.bfloat16)
    torch.testing.assert_close(ops.dequant(odd, scale, zero, bits, g, k, torch.bfloat16), want, rtol=0, atol=0)
