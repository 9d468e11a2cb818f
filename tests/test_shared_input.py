"""Sibling packed layers that read one input (q/k/v, gate/up) decode through one GEMM: same outputs as
one GEMM each, one call per group (eagerly and in a compiled graph), checkpoints unchanged, weights
that change afterwards followed, and a member fed another input computing its own."""

import copy
import dataclasses

import pytest
import torch

from qatext import QuantSpec, methods, models, ops
from qatext.nn.modes import PackedLinear
from qatext.nn.shared_input import SharedInputProjections


def _llama(layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)


def _packed(model):
    return methods.rtn(model, QuantSpec(4, 64, False))


@pytest.fixture
def decode_everywhere(device, monkeypatch):
    """On a CPU, forwards take the decode path too (its CPU fallback), so the grouping runs there."""
    if device == "cpu":
        monkeypatch.setattr(PackedLinear, "_decodes", lambda self, x: True)


@pytest.fixture
def count_decode_calls(monkeypatch):
    """The rows of every tiled GEMM called (dequant_matmul_tiled, and swiglu_matmul_tiled for a SwiGLU MLP's
    gate/up group)."""
    calls = []
    for name in ("dequant_matmul_tiled", "swiglu_matmul_tiled"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, real=real, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    return calls


def test_one_gemm_per_group_same_outputs(device, decode_everywhere, count_decode_calls):
    model = _packed(_llama()).to(device)
    separate = copy.deepcopy(model)
    for layer in separate.modules():
        if isinstance(layer, PackedLinear):
            layer.tile_for_decode(tune=False)
    keys = set(model.state_dict())
    assert models.tile_for_decode(model) == 14
    assert set(model.state_dict()) == keys  # the concatenation is not part of a checkpoint
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.decode_q_k_v, SharedInputProjections) and isinstance(mlp.decode_gate_up, SharedInputProjections)
    assert attn.q_proj.tiled.data_ptr() == attn.decode_q_k_v.tiled.data_ptr()  # a view, not a second copy
    ids = torch.randint(0, 100, (2, 3), device=device)
    with torch.no_grad():
        expected = separate(ids).logits.float()
        count_decode_calls.clear()
        got = model(ids).logits.float()
    # Per layer: q+k+v (128 + 64 + 64 rows), o, gate+up (512), down.
    assert count_decode_calls == [256, 128, 512, 128] * 2
    assert attn.decode_q_k_v._pending is None  # no activations held between forwards
    # Other N, other split-K partials on a GPU: fp32 sums in another order, then bf16 rounding.
    torch.testing.assert_close(got, expected, rtol=0, atol=0 if device == "cpu" else 0.05 * expected.abs().max().item())


def test_compiled_graph_has_one_call_per_group(monkeypatch):
    monkeypatch.setattr(PackedLinear, "_decodes", lambda self, x: True)
    model = _packed(_llama(layers=1))
    models.tile_for_decode(model)
    counts = []

    def backend(gm, example_inputs):
        counts.append(sum(any(op in str(node.target) for op in ("dequant_matmul_tiled", "swiglu_matmul_tiled"))
                          for node in gm.graph.nodes))
        return gm

    ids = torch.randint(0, 100, (1, 2))
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    assert counts == [4]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_follows_weights_loaded_after_grouping(decode_everywhere, device):
    model, other = _packed(_llama(layers=1, seed=0)).to(device), _packed(_llama(layers=1, seed=1)).to(device)
    models.tile_for_decode(model)
    model.load_state_dict(other.state_dict())
    ids = torch.randint(0, 100, (1, 2), device=device)
    with torch.no_grad():
        expected = other(ids).logits.float()
        torch.testing.assert_close(model(ids).logits.float(), expected, rtol=0,
                                   atol=0 if device == "cpu" else 0.05 * expected.abs().max().item())


def test_a_member_fed_another_input_computes_its_own(monkeypatch, count_decode_calls):
    monkeypatch.setattr(PackedLinear, "_decodes", lambda self, x: True)
    model = _packed(_llama(layers=1))
    models.tile_for_decode(model)
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(1, 128, dtype=torch.bfloat16), torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        q, k = attn.q_proj(x), attn.k_proj(other)
        torch.testing.assert_close(q, attn.q_proj._matmul(x), rtol=0, atol=0)
        torch.testing.assert_close(k, attn.k_proj._matmul(other), rtol=0, atol=0)
    assert count_decode_calls == [256, 256]  # the group ran again for the other input


def test_layers_that_cannot_share_stay_separate():
    model = _packed(_llama(layers=1))
    mlp = model.model.layers[0].mlp
    # Activation fake-quant gives each layer its own input.
    mlp.up_proj.options = dataclasses.replace(mlp.up_proj.options, act_bits=8)
    models.tile_for_decode(model)
    assert not hasattr(mlp, "decode_gate_up") and hasattr(model.model.layers[0].self_attn, "decode_q_k_v")
    assert getattr(mlp.up_proj, "_shared_input", None) is None


def test_biased_projections_and_a_second_tiling(monkeypatch, count_decode_calls):
    """Qwen2's q/k/v carry biases: the group adds them. Tiling again rebuilds the same groups."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    monkeypatch.setattr(PackedLinear, "_decodes", lambda self, x: True)
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    model = _packed(Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None
    with torch.no_grad():
        attn.q_proj.bias.normal_()
    ids = torch.randint(0, 100, (1, 3))
    with torch.no_grad():
        expected = model(ids).logits
        models.tile_for_decode(model)
        group = attn.decode_q_k_v
        models.tile_for_decode(model)
        assert attn.decode_q_k_v is group and attn.q_proj._shared_input[0] is group
        count_decode_calls.clear()
        got = model(ids).logits
    assert count_decode_calls == [256, 128, 512, 128]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_members_decode_up_to_their_group_gemms_crossover(device):
    """A member's decode is the group's one GEMM, so it takes the decode kernel up to the crossover measured
    for the concatenated shape, not its own (which would send the group GEMM to its slow fallback)."""
    model = _packed(_llama(layers=1)).to(device)
    models.tile_for_decode(model)
    attn = model.model.layers[0].self_attn
    group = attn.decode_q_k_v
    expected = ops.decode_gemm_crossover(device, sum(group.sizes), group.in_features, group.bits, group.group_size)
    for member in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert member._decode_max_tokens(torch.device(device)) == expected
