"""A packed layer laid out for decode keeps its codes once (tiled), and stays the same layer to
everything outside it: outputs, gradients, state dict (keys, order, values), loading, strict-mode
errors, merges into other modes, exports, save / load round trips; models.tile_for_decode drops
`packed` everywhere, shared-input groups included, unless asked to keep it."""

import pytest
import torch
from conftest import knob

from qatext import QuantSpec, load_quantized, methods, models, save_quantized
from qatext.export.layers import read_quantized
from qatext.io import quant_layers
from qatext.nn import QuantLinear
from qatext.nn.shared_input import SharedInputProjections


def _packed_layer(device, n=96, k=384, seed=0):
    # (a shape no other test tunes: tile_for_decode measures a GPU's crossover per shape, for the process)
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=True).to(device)
    return QuantLinear.from_linear(linear, QuantSpec(4, 64), mode="fake").to_packed()


def _storage_bytes(module):
    """Bytes of the distinct storages behind a module's parameters and buffers (views counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()]}
    return sum(storages.values())


def test_tiled_layer_holds_one_copy_and_reads_as_before(device):
    layer = _packed_layer(device)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 384, device=device)
    with torch.no_grad():
        expected = layer(x)
    size = _storage_bytes(layer)
    layer.tile_for_decode()

    assert not layer.holds_packed and "packed" not in dict(layer.named_buffers())
    with pytest.raises(AttributeError, match="packed"):
        layer.packed  # noqa: B018 (a stale reader fails loudly, never reads stale codes)
    assert _storage_bytes(layer) == size  # the tiled codes replace the packed ones, byte for byte
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    state = layer.state_dict()
    assert list(state) == list(before)
    for key, value in before.items():
        assert torch.equal(state[key], value), key
    assert "tiled" not in state

    x.requires_grad_(True)
    layer(x).sum().backward()  # gradients take the packed path, untiled on the fly
    assert x.grad is not None and x.grad.abs().sum() > 0

    for mode in ("e2eqp", "qalora"):
        other = layer.to_mode(mode, **({"rank": 4} if mode == "qalora" else {}))
        assert torch.equal(other.packed, before["packed"]), mode
    assert torch.equal(layer.to_packed().packed, before["packed"])


@pytest.mark.parametrize("tokens", [20, 200])
def test_tiled_layer_prefill_equals_the_packed_path(device, tokens):
    """A prompt beyond the decode and staged kernels on a tiled-only layer (16-bit, as served) dequantises from the
    tiled codes (20 tokens on a GPU: untiled for the fused kernel): bit for bit the output of the layer
    that keeps its packed codes."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    both = _packed_layer(device).to(dtype).tile_for_decode(keep_packed=True)
    tiled = _packed_layer(device).to(dtype).tile_for_decode()
    x = torch.randn(tokens, 384, device=device, dtype=dtype)
    with torch.no_grad(), knob("decode_gemm_max_m", 0), knob("staged_gemm_max_m", 0):
        assert torch.equal(tiled(x), both._matmul(x))


def test_loading_into_a_tiled_layer(device):
    layer, other = _packed_layer(device, seed=0), _packed_layer(device, seed=1)
    layer.tile_for_decode()
    layer.load_state_dict(other.state_dict())
    x = torch.randn(2, 384, device=device)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.state_dict()["packed"], other.packed)

    wrong = dict(other.state_dict(), packed=other.packed[:, :-1])
    with pytest.raises(RuntimeError, match="size mismatch for packed"):
        layer.load_state_dict(wrong)
    missing = {k: v for k, v in other.state_dict().items() if k != "packed"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"packed\""):
        layer.load_state_dict(missing)
    layer.load_state_dict(missing, strict=False)  # non-strict: the codes stay as they were
    assert torch.equal(layer.state_dict()["packed"], other.packed)


def test_keep_packed_keeps_both():
    layer = _packed_layer("cpu")
    layer.tile_for_decode(keep_packed=True)
    assert layer.holds_packed and layer.tiled is not None
    layer.drop_packed()
    assert not layer.holds_packed


def test_model_keeps_its_codes_once_and_round_trips(tmp_path, tiny_model_dir, device):
    """A whole model (q/k/v and gate/up grouped): the packed codes' bytes are gone after tiling, logits,
    exports and a save / load round trip are unchanged."""
    from transformers import AutoModelForCausalLM

    save_quantized(methods.rtn(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QuantSpec(4, 32)), tmp_path / "q")
    model = load_quantized(tmp_path / "q", device=device, decode_layout=False)
    ids = torch.randint(0, 100, (1, 5), device=device)
    with torch.no_grad():
        expected = model(ids).logits.float()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    codes = {w.name: w.codes for w in read_quantized(model, "gptq")}
    packed_bytes = sum(layer.packed.nbytes for _, layer in quant_layers(model))

    kept = load_quantized(tmp_path / "q", device=device, decode_layout=False)
    models.tile_for_decode(kept, keep_packed=True)
    assert all(layer.holds_packed for _, layer in quant_layers(kept))
    assert models.tile_for_decode(model) == 14
    assert not any(layer.holds_packed for _, layer in quant_layers(model))
    assert _storage_bytes(kept) - _storage_bytes(model) == packed_bytes
    groups = [m for m in model.modules() if isinstance(m, SharedInputProjections)]
    assert len(groups) == 4  # q/k/v and gate/up of two layers: each holds views, no second copy
    for group in groups:
        for name in ("tiled", "scale", "zero"):
            storage = getattr(group, name).untyped_storage().data_ptr()
            assert all(getattr(m, name).untyped_storage().data_ptr() == storage for m in group.members), name

    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), expected, rtol=0,
                                   atol=0 if device == "cpu" else 0.05 * expected.abs().max().item())
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(torch.equal(w.codes, codes[w.name]) for w in read_quantized(model, "gptq"))

    save_quantized(model, tmp_path / "again")
    reloaded = load_quantized(tmp_path / "again", device=device, decode_layout=False)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())
