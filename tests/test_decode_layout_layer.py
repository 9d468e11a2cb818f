"""QuantLinear.tile_for_decode: inference from the tiled copy gives the packed layer's outputs, the
copy follows changes of `packed`, gradients keep the packed path, and bad layers are refused."""

import pytest
import torch

from qatext import QuantSpec, models
from qatext.nn import QuantLinear


def _packed_layer(bits=4, n=32, k=128, device="cpu"):
    linear = torch.nn.Linear(k, n, bias=True).to(device)
    return QuantLinear.from_linear(linear, QuantSpec(bits, 64), mode="fake").to_packed()


@pytest.mark.parametrize("bits", [2, 4])
def test_tiled_inference_matches_packed(device, bits):
    layer = _packed_layer(bits, device=device)
    x = torch.randn(3, 128, device=device)
    with torch.no_grad():
        expected = layer(x)
        layer.tile_for_decode()
        assert "tiled" not in layer.state_dict()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_tiled_copy_follows_packed_and_gradients_keep_packed_path():
    layer, other = _packed_layer(), _packed_layer()
    other.packed.copy_(torch.randint(0, 256, other.packed.shape, dtype=torch.uint8))
    layer.tile_for_decode()
    layer.load_state_dict(other.state_dict())
    x = torch.randn(2, 128, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other(x))
    y = layer(x)  # gradients on: the packed path, which has a backward
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_refused_layers():
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        _packed_layer(bits=8).tile_for_decode()
    with pytest.raises(ValueError, match="only mode 'packed'"):
        QuantLinear.from_linear(torch.nn.Linear(128, 32), QuantSpec(4, 64), mode="fake").tile_for_decode()
    model = torch.nn.Sequential(_packed_layer(4), _packed_layer(8, n=32, k=128))
    assert models.tile_for_decode(model) == 1
