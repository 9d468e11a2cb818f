"""Mixture-of-experts models (transformers' stacked experts): taken apart into per-expert nn.Linear
layers that compute what transformers' own module computes, quantized with the rest of the model,
trained, merged, saved and loaded back (load_quantized and from_pretrained) to the same logits."""

import copy

import pytest
import torch

from qatext import QuantSpec, load_quantized, merge_model, models, quantize_model, save_quantized
from qatext.nn.experts import EXPERT_LINEARS, ExpertList, is_stacked_experts, unfuse_experts

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")  # (transformers 5: experts stacked into one tensor)

SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def moe(family: str, seed: int = 0):
    """A tiny random model of `family`, four routed experts, two a token."""
    torch.manual_seed(seed)
    config = {
        "mixtral": lambda: transformers.MixtralConfig(**SMALL, intermediate_size=64, num_key_value_heads=2,
                                                      num_local_experts=4),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, moe_intermediate_size=32, intermediate_size=64,
                                                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                                         head_dim=16),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**SMALL, moe_intermediate_size=32, intermediate_size=64,
                                                         shared_expert_intermediate_size=64, num_key_value_heads=2,
                                                         num_experts=4, num_experts_per_tok=2),
        "olmoe": lambda: transformers.OlmoeConfig(**SMALL, intermediate_size=32, num_key_value_heads=2, num_experts=4,
                                                  num_experts_per_tok=2),
        "deepseek_v3": lambda: transformers.DeepseekV3Config(
            **SMALL, intermediate_size=64, moe_intermediate_size=32, first_k_dense_replace=1, num_key_value_heads=4,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=32,
            kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    }[family]()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_per_expert_layers_compute_what_the_stacked_experts_do(family):
    model = moe(family)
    x = torch.randint(0, 256, (2, 16))
    stacked = logits(model, x)
    names = unfuse_experts(model)
    assert names and all(isinstance(model.get_submodule(n), ExpertList) for n in names)
    assert not any(is_stacked_experts(m) for m in model.modules())
    experts = model.get_submodule(names[0])
    assert len(experts) == 4 and type(experts[0].gate_proj) is torch.nn.Linear
    assert experts[0].gate_proj.weight.shape == (experts[0].down_proj.in_features, 64)
    torch.testing.assert_close(logits(model, x), stacked, rtol=0, atol=0)  # the same products, summed alike


def test_experts_of_a_transformers_without_the_post_expert_norm_flag_are_taken_apart():
    model = moe("qwen3_moe")  # transformers 5.17's decorator sets no has_post_expert_norm
    for m in model.modules():
        if hasattr(m, "has_post_expert_norm"):
            del m.has_post_expert_norm
    assert unfuse_experts(model)
    normed = moe("qwen3_moe")
    normed.model.layers[0].mlp.experts.has_post_expert_norm = True
    assert unfuse_experts(normed) == ["model.layers.1.mlp.experts"]


def dequantized_into_stacked(quantized, original):
    """`original` (the model before quantize_model, experts stacked) given every quantized layer's weight
    as that layer dequantizes it: transformers' own MoE forward over the quantized weights, the oracle."""
    with torch.no_grad():
        for name, layer in models.quant_layers(quantized):
            owner, _, proj = name.rpartition(".")
            stack, _, e = owner.rpartition(".")
            if proj in EXPERT_LINEARS and e.isdigit() and is_stacked_experts(original.get_submodule(stack)):
                experts = original.get_submodule(stack)
                inter = experts.down_proj.shape[2]
                target = {"gate_proj": experts.gate_up_proj[int(e), :inter],
                          "up_proj": experts.gate_up_proj[int(e), inter:], "down_proj": experts.down_proj[int(e)]}[proj]
            else:
                target = original.get_submodule(name).weight
            target.copy_(layer.quantized_weight())
    return original


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method", ["fake", "packed"])
def test_quantized_experts_are_transformers_moe_over_the_quantized_weights(family, method):
    model = moe(family)
    original = copy.deepcopy(model)
    quantize_model(model, QuantSpec(4, 32), method=method)
    layers = dict(models.quant_layers(model))
    assert len(layers) == 2 * (4 + 4 * 3)  # attention and every expert's three projections, a block
    assert "model.layers.1.mlp.experts.3.down_proj" in layers and "model.layers.0.mlp.gate" not in layers
    x = torch.randint(0, 256, (2, 16))
    expected = logits(dequantized_into_stacked(model, original), x)
    scale = expected.abs().max()
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-5 * scale)
    if method == "packed":  # the decode layout: the block's experts stacked (nn.expert_decode) where every
        models.tile_for_decode(model)  # projection tiles, else gate/up one GEMM an expert (SwiGLU its epilogue)
        experts = model.model.layers[0].mlp.experts
        stacked = hasattr(experts, "decode_gate_up_tiled")
        assert stacked == (family == "mixtral")  # (qwen3_moe's down_proj, 32 inputs, does not tile)
        assert hasattr(experts[0], "decode_gate_up") != stacked
        torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("method", ["lrqat", "qalora", "e2eqp"])
def test_adapters_train_inside_every_routed_expert(method):
    model = moe("qwen3_moe")
    quantize_model(model, QuantSpec(4, 32), method=method, **({"rank": 4} if method != "e2eqp" else {}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in models.ADAPTER_PARAMS[method] for n in trainable)
    with torch.no_grad():  # trained a little: neither factor of a pair at its zero start
        for name, p in model.named_parameters():
            if "lora" in name:
                p.add_(0.01 * torch.randn_like(p))
    x = torch.randint(0, 256, (4, 32))
    model(input_ids=x, labels=x).loss.backward()
    for expert in model.model.layers[0].mlp.experts:  # 128 tokens, two experts each: every expert is hit
        grads = {n: p.grad for n, p in expert.named_parameters() if p.requires_grad}
        assert len(grads) == 3 * len(models.ADAPTER_PARAMS[method])
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method,targets", [("lrqat", None), ("fake", None), ("packed", None),
                                            ("fake", ["gate_proj", "q_proj"]), ("packed", ["q_proj"])])
def test_saved_moe_loads_back_to_the_same_logits(tmp_path, family, method, targets):
    import qatext.hf  # noqa: F401

    model = moe(family)
    quantize_model(model, QuantSpec(4, 32), method=method, target_modules=targets,
                   **({"rank": 4} if method == "lrqat" else {}))
    if method == "lrqat":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_b" in name:
                    p.add_(0.01 * torch.randn_like(p))  # trained: away from the identity start
    save_quantized(model, tmp_path / "saved")
    x = torch.randint(0, 256, (2, 16))
    expected = logits(model, x)
    ours = load_quantized(tmp_path / "saved")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert dict(models.quant_layers(ours)).keys() == dict(models.quant_layers(model)).keys()
    stacked = targets is not None and "gate_proj" not in targets  # experts left as transformers built them
    assert is_stacked_experts(ours.model.layers[0].mlp.experts) == stacked
    for loaded in (ours, theirs):
        torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=0)


def test_a_merged_moe_round_trips(tmp_path):
    model = merge_model(quantize_model(moe("olmoe"), QuantSpec(3, 32), method="lrqat", rank=4))
    save_quantized(model, tmp_path / "saved")
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(logits(load_quantized(tmp_path / "saved"), x), logits(model, x), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["fake", "packed", "tiled", "lrqat"])
@pytest.mark.parametrize("tokens", [3, 200])
@pytest.mark.parametrize("grouped", [False, True, None])
def test_experts_on_the_gpu_compute_transformers_moe_over_the_quantized_weights(method, tokens, grouped):
    """One block's experts in bf16 on the GPU (packed: the fused kernel; tiled: the decode kernel with
    SwiGLU in its gate/up epilogue at a token an expert, the staged kernel at ~50, and with `grouped` None
    the grouped decode kernel, nn.expert_decode), given the routing,
    against transformers' stacked experts in fp32 on the CPU over each layer's quantized weight; the same
    experts as grouped GEMMs over their stacked weights (nn.grouped_experts) too. bf16
    rounds x, the hidden product, the routing weights and the output (2^-9 each, relative): 2^-6 of
    the largest output leaves room for them and none for a wrong expert or projection."""
    config = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=256, moe_intermediate_size=128,
                                         intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    stacked = copy.deepcopy(model.model.layers[0].mlp.experts)
    model.to("cuda", torch.bfloat16)
    mode = "packed" if method == "tiled" else method
    quantize_model(model, QuantSpec(4, 64), method=mode, **({"rank": 8} if mode == "lrqat" else {}))
    experts = model.model.layers[0].mlp.experts
    experts.grouped = grouped
    with torch.no_grad():  # trained a little: the low-rank term inside the rounding is not zero
        for name, p in experts.named_parameters():
            if "lora_b" in name:
                p.add_(0.01 * torch.randn_like(p))
    if method == "tiled":
        assert models.tile_for_decode(model) > 0 and hasattr(experts, "decode_gate_up_tiled")  # (stacked)
    with torch.no_grad():
        for e, expert in enumerate(experts):
            weights = [getattr(expert, p).quantized_weight().float().cpu() for p in EXPERT_LINEARS]
            stacked.gate_up_proj[e].copy_(torch.cat(weights[:2]))
            stacked.down_proj[e].copy_(weights[2])
    x = torch.randn(tokens, 256)
    index = torch.stack([torch.randperm(8)[:2] for _ in range(tokens)])
    routing = torch.randn(tokens, 2).softmax(-1)
    with torch.no_grad():
        expected = stacked(x, index, routing)
        got = experts(x.cuda().bfloat16(), index.cuda(), routing.cuda().bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), expected, rtol=0, atol=2**-6 * expected.abs().max().item())
