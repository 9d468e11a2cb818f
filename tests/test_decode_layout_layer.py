"""QuantLinear.tile_for_decode: inference from the tiled copy gives the packed layer's outputs, the
copy follows changes of `packed`, gradients keep the packed path, and bad layers are refused."""

import pytest
import torch
from conftest import kernel_names, knob

import qatext
from qatext import QuantSpec, models, ops
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


def test_packed_layer_decodes_on_its_own(device):
    """No call needed: a no-grad 16-bit forward of few tokens on a GPU takes the decode kernel on a tiled
    copy it makes itself; more tokens, gradients or a CPU keep the packed path (and make no copy)."""
    layer = _packed_layer(4, n=64, k=256, device=device).to(torch.bfloat16)
    with torch.no_grad():
        # Past the largest crossover any tuning can measure (128 tokens), whatever ran before on this shape.
        x_long = torch.randn(192, 256, device=device, dtype=torch.bfloat16)
        y_long = layer(x_long)
        assert getattr(layer, "tiled", None) is None  # prefill-sized: the packed path
        x = torch.randn(3, 256, device=device, dtype=torch.bfloat16)
        y = layer(x)
    expected = layer._matmul(x.detach()).detach()
    assert (getattr(layer, "tiled", None) is not None) == (device == "cuda")
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)  # bf16 outputs of two fp32 accumulations
    torch.testing.assert_close(y_long, layer._matmul(x_long).detach())
    y = layer(x.requires_grad_(True))  # gradients: the packed path, which has a backward
    y.float().sum().backward()
    assert x.grad is not None
    # Grad mode on but nothing needing a gradient (a decode loop without no_grad): still the decode path.
    fresh = _packed_layer(4, n=64, k=256, device=device).to(torch.bfloat16)
    fresh.bias.requires_grad_(False)  # frozen, as in a model loaded for inference
    assert torch.is_grad_enabled()
    y = fresh(x.detach())
    assert (getattr(fresh, "tiled", None) is not None) == (device == "cuda") and not y.requires_grad


def test_shapes_not_measured_decode_up_to_16_tokens(device):
    """The decode kernel's crossover where nothing was timed (a CPU; a shape no test tunes) is 16 tokens, and
    decode_gemm_max_m defaults to -1: the measured crossover rules."""
    assert qatext.get_tuning("decode_gemm_max_m") == -1
    assert ops.decode_gemm_crossover(device, 3 * 1040, 7 * 64, 4, 64) == 16
    layer = _packed_layer(4, n=80, k=320, device=device)
    assert layer._decode_max_tokens(torch.device(device)) == 16
    with knob("decode_gemm_max_m", 5):
        assert layer._decode_max_tokens(torch.device(device)) == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_layer_decodes_up_to_the_measured_crossover():
    """tile_for_decode times the decode kernel against the path beyond it for the weight's shape (at 32, 64
    and 128 tokens, with its variant tuned at each); the layer then takes the decode kernel exactly up to
    the crossover, and decode_gemm_max_m, where set, rules instead."""
    n, k = 2048, 1024
    layer = _packed_layer(4, n=n, k=k, device="cuda").to(torch.bfloat16)
    layer.tile_for_decode()
    crossover = ops.decode_gemm_crossover("cuda", n, k, 4, 64)
    assert crossover in (16, 32, 64, 128)
    # the decode kernel's variant was tuned at each count it was timed at (32 always, on to the first loss)
    assert all(ops.decode_gemm_choice("cuda", n, k, 4, 64, m) is not None for m in (32, max(32, crossover)))
    assert ops.decode_gemm_crossover("cpu", n, k, 4, 64) == 16  # measured on the GPU, not for a CPU

    def decodes(m):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            return "decode_gemm_kernel" in kernel_names(lambda: layer(x))

    assert decodes(crossover) and not decodes(crossover + 1)
    with knob("decode_gemm_max_m", crossover + 1):
        assert decodes(crossover + 1)
    with knob("decode_gemm_max_m", 0):
        assert not decodes(1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_inference_never_syncs_the_gpu():
    """Value checks run where they are free: a packed layer's prefill and decode forwards read nothing
    back from the GPU by default (torch raises on a synchronising call in this mode)."""
    layer = _packed_layer(4, n=64, k=256, device="cuda").to(torch.bfloat16)
    layer.tile_for_decode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            layer(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16))
            layer(torch.randn(200, 256, device="cuda", dtype=torch.bfloat16))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_load_refuses_a_damaged_scale(tmp_path, tiny_model_dir):
    """load_quantized checks every layer's scales once (so the ops need not sync on every call)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from qatext import load_quantized, methods, save_quantized

    model = methods.rtn(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QuantSpec(4, 32))
    save_quantized(model, tmp_path / "q")
    weights = load_file(tmp_path / "q" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.scale"
    weights[name][0, 0] = float("nan")
    save_file(weights, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layer model.layers.1.mlp.down_proj has a scale <= 0, NaN or inf"):
        load_quantized(tmp_path / "q")


def test_load_lays_out_for_decode_once_on_a_gpu(tmp_path, tiny_model_dir, device):
    """load_quantized makes the decode layout at load time on a GPU (torch.compile and CUDA graphs cannot
    make it inside a forward), or when asked; on a CPU, or with decode_layout=False, it holds none."""
    from transformers import AutoModelForCausalLM

    from qatext import load_quantized, methods, ops, save_quantized
    from qatext.io import quant_layers

    save_quantized(methods.rtn(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QuantSpec(4, 32)), tmp_path / "q")

    def tiled(model):
        return [getattr(layer, "tiled", None) is not None for _, layer in quant_layers(model)]

    by_default = tiled(load_quantized(tmp_path / "q", device=device))
    assert len(by_default) == 14 and by_default == [device == "cuda"] * 14
    assert not any(tiled(load_quantized(tmp_path / "q", device=device, decode_layout=False)))
    asked = load_quantized(tmp_path / "q", device=device, decode_layout=True)
    plain = dict(quant_layers(load_quantized(tmp_path / "q", device=device, decode_layout=False)))
    for name, layer in quant_layers(asked):
        assert not layer.holds_packed  # the tiled codes are its only copy
        assert torch.equal(layer.tiled, ops.tile_packed(plain[name].packed, 4, layer.in_features))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuning_without_memory_for_its_copies_warns_and_keeps_the_defaults():
    """A GPU too full for the tuner's cold copies of the weight: tile_for_decode warns instead of failing,
    the layer keeps the default crossover and serves as before; with memory back, the shape is tuned."""
    n, k = 1072, 1536  # a shape no other test tunes
    layer = _packed_layer(4, n=n, k=k, device="cuda").to(torch.bfloat16)
    layer.tile_for_decode(tune=False)
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 2**20) / total)
    try:
        with pytest.warns(RuntimeWarning, match=f"no GPU memory left to time the decode kernel on a {n} x {k}"):
            layer.tile_for_decode()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert ops.decode_gemm_choice("cuda", n, k, 4, 64, 1) is None  # nothing measured
    assert ops.decode_gemm_crossover("cuda", n, k, 4, 64) == 16
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    layer.tile_for_decode()
    assert ops.decode_gemm_choice("cuda", n, k, 4, 64, 1) is not None
