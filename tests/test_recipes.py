"""End to end on a tiny random-init Llama: every method trains, merges exactly, saves, loads, exports."""

import json

import pytest
import torch

from qatext import QuantSpec, data, export_model, load_quantized, methods, models, ops, save_quantized
from qatext.nn import QuantLinear

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tokens():
    return data.ByteTokenizer().encode(data.load_kjv()[:100_000])


# Learning rates for a random-init model over a few steps (the papers' are for pretrained 7B models).
FAST = {"full_qat": dict(lr=3e-3, quant_lr=1e-3), "lrqat": dict(rank=8, lr=1e-2, scale_lr=1e-3),
        "qalora": dict(rank=8, lr=1e-2), "efficientqat": dict(e2e_lr=1e-2, block_ap_kwargs=dict(
            n_samples=8, batch_size=4, epochs=1, quant_lr=1e-3, weight_lr=1e-3, progress=False))}


@pytest.mark.parametrize("name", ["full_qat", "lrqat", "qalora", "efficientqat"])
def test_method_trains_merges_saves_and_exports(tmp_path, tokens, name):
    model = tiny_llama()
    spec = QuantSpec(4, 32, name == "lrqat")
    cfg = methods.default_config(name, steps=25, batch_size=8, seq_len=64, progress=False)
    model, history = methods.run(name, model, spec, tokens, cfg, **FAST[name])
    assert len(history) == 25
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5 - 0.1, f"{name}: loss did not fall: {history}"

    x = tokens[:65].unsqueeze(0)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=x).logits
        models.merge_model(model)
        merged = model(input_ids=x).logits
    assert all(layer.mode == "packed" for _, layer in models.quant_layers(model))
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-4)

    save_quantized(model, tmp_path / "saved")
    loaded = load_quantized(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, merged, rtol=0, atol=0)


def test_quantize_model_targets_decoder_linears_only():
    model = tiny_llama()
    models.quantize_model(model, QuantSpec(4, 32), method="packed")
    names = [n for n, _ in models.quant_layers(model)]
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives


def test_quantize_model_bad_configs():
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] match no Linear"):
        models.quantize_model(tiny_llama(), QuantSpec(4, 32), target_modules=["q_proj", "qkv"])
    with pytest.raises(ValueError, match=r"group_size \(48\) must divide in_features \(64\)"):
        models.quantize_model(tiny_llama(), QuantSpec(4, 48))
    with pytest.raises(ValueError, match="bits must be an int in 2..8, got 9"):
        QuantSpec(9, 32)
    with pytest.raises(ValueError, match="unknown method 'gptq'"):
        methods.run("gptq", tiny_llama(), QuantSpec(4, 32), None, None)
    with pytest.raises(ValueError, match="unknown mode"):
        models.quantize_model(tiny_llama(), QuantSpec(4, 32), method="int4")


def test_bf16_and_gradient_checkpointing(tokens):
    model = tiny_llama().to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    cfg = methods.default_config("lrqat", steps=2, batch_size=2, seq_len=32, progress=False)
    model, history = methods.run("lrqat", model, QuantSpec(4, 32, True), tokens, cfg, rank=4)
    assert all(torch.isfinite(torch.tensor(history)))
    assert models.quant_layers(model)[0][1].lora_a.dtype == torch.bfloat16


def test_training_resumes_exactly(tmp_path, tokens):
    from qatext.evaluate import causal_lm_loss
    from qatext.train import train

    def run(ckpt, crash_at=None):
        model = models.quantize_model(tiny_llama(), QuantSpec(4, 32, True), method="lrqat", rank=4)
        params = [p for n, p in model.named_parameters() if "lora" in n or "scale" in n]
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in params))
        calls = []

        def loss_fn(m, batch):
            calls.append(1)
            if len(calls) == crash_at:
                raise KeyboardInterrupt  # the run dies mid-training
            return causal_lm_loss(m, batch)

        cfg = methods.default_config("lrqat", steps=8, batch_size=4, seq_len=32, progress=False,
                                     checkpoint_dir=str(ckpt), checkpoint_every=3)
        return train(model, [{"params": params, "lr": 1e-2}], tokens, cfg, loss_fn=loss_fn)

    full = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=8)  # dies in step 8; the last checkpoint holds steps 1-6
    resumed = run(tmp_path / "b")
    assert len(resumed) == 8
    assert resumed == full


def test_a_nan_loss_stops_training_before_the_update(tokens):
    from qatext.evaluate import causal_lm_loss
    from qatext.train import TrainConfig, train

    model = models.quantize_model(tiny_llama(), QuantSpec(4, 32, True), method="lrqat", rank=4)
    lora = [p for n, p in model.named_parameters() if "lora" in n]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in lora))
    before = [p.detach().clone() for p in lora]
    calls = []

    def loss_fn(m, batch):  # NaN in the second step
        calls.append(1)
        return causal_lm_loss(m, batch) * (float("nan") if len(calls) == 2 else 1.0)

    with pytest.raises(RuntimeError, match="loss became nan at step 1"):
        train(model, [{"params": lora, "lr": 1e-2}], tokens, TrainConfig(steps=3, batch_size=2, seq_len=16,
                                                                           progress=False), loss_fn=loss_fn)
    after_first = [p.detach().clone() for p in lora]
    assert any(not torch.equal(a, b) for a, b in zip(after_first, before))  # step 0 trained
    assert all(torch.isfinite(p).all() for p in lora)  # step 1's NaN gradients never applied


def _read_gptq(state, name, bits, k, n, g):
    """An independent reading of the GPTQ v1 layout: qweight packs K (32 / b per int32) for each
    output column, qzeros packs N per group and stores zero - 1, scales are [G, N]."""
    per, mask = 32 // bits, (1 << bits) - 1
    qweight = state[f"{name}.qweight"].to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(qweight >> (bits * j)) & mask for j in range(per)], dim=1).reshape(k, n)
    qzeros = state[f"{name}.qzeros"].to(torch.int64) & 0xFFFFFFFF
    z = torch.stack([(qzeros >> (bits * j)) & mask for j in range(per)], dim=2).reshape(k // g, n) + 1
    scales = state[f"{name}.scales"].float()
    g_idx = state[f"{name}.g_idx"].long()
    return (q - z[g_idx]).float() * scales[g_idx]  # [K, N]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_export_unpacks_to_the_same_weights(tmp_path, bits):
    from safetensors.torch import load_file

    model = models.quantize_model(tiny_llama(), QuantSpec(bits, 32, False), method="packed")
    with torch.no_grad():  # fp16-representable scales so the comparison can be exact
        for _, layer in models.quant_layers(model):
            layer.scale.copy_(layer.scale.half().float())
    export_model(model, tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "gptq", "bits": bits, "group_size": 32,
                                             "desc_act": False, "sym": False, "checkpoint_format": "gptq"}
    state = load_file(tmp_path / "gptq" / "model.safetensors")
    for name, layer in models.quant_layers(model):
        w = ops.dequant(layer.packed, layer.scale, layer.zero, bits, 32, layer.in_features)
        got = _read_gptq(state, name, bits, layer.in_features, layer.out_features, 32)
        torch.testing.assert_close(got.t(), w, rtol=0, atol=0)
    assert "model.embed_tokens.weight" in state


@pytest.mark.parametrize("arch", ["MistralConfig", "Qwen2Config"])
def test_other_architectures(tokens, arch):
    """Mistral and Qwen2 (which has q/k/v biases) quantize, train, merge and keep their logits."""
    torch.manual_seed(0)
    cfg = getattr(transformers, arch)(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    tcfg = methods.default_config("qalora", steps=3, batch_size=2, seq_len=32, progress=False)
    model, history = methods.run("qalora", model, QuantSpec(4, 32), tokens, tcfg, rank=4, lr=1e-2)
    layers = dict(models.quant_layers(model))
    assert len(layers) == 14
    if arch == "Qwen2Config":
        bias = layers["model.layers.0.self_attn.q_proj"].bias
        assert bias is not None and not bias.requires_grad  # frozen means frozen: no wasted gradient
    x = tokens[:33].unsqueeze(0)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=x).logits
        models.merge_model(model)
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,trains", [("lrqat", {"lora_a", "lora_b", "scale"}), ("qalora", {"lora_a", "lora_b"}),
                                         ("e2eqp", {"scale"})])
def test_adapter_modes_leave_trainable_only_what_the_method_trains(tmp_path, mode, trains):
    """As PEFT's get_peft_model leaves a model: an optimiser over model.parameters() trains the method's
    parameters, not the embeddings, norms and biases too; full QAT (fake) trains everything."""
    model = models.quantize_model(tiny_llama(), QuantSpec(4, 32), method=mode, **({"rank": 4} if "lora_a" in trains else {}))
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == trains
    save_quantized(model, tmp_path / "saved")  # saved mid-training and loaded again: the same
    loaded = load_quantized(tmp_path / "saved")
    assert {n.rsplit(".", 1)[-1] for n, p in loaded.named_parameters() if p.requires_grad} == trains
    fake = models.quantize_model(tiny_llama(), QuantSpec(4, 32), method="fake")
    assert all(p.requires_grad for p in fake.parameters())


def test_transformers_trainer_trains_a_qalora_model(tmp_path):
    """The Python API under transformers' Trainer (no qatext loop): only the adapter moves, and the merged
    model saves and loads with the logits it trained to."""
    model = models.quantize_model(tiny_llama(), QuantSpec(4, 32), method="qalora", rank=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = torch.randint(0, 256, (16, 32))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows]).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("lora_a", "lora_b")) for n in changed), changed
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=rows[:2]).logits
        models.merge_model(model)
        save_quantized(model, tmp_path / "saved")
        torch.testing.assert_close(load_quantized(tmp_path / "saved")(input_ids=rows[:2]).logits, trained,
                                   rtol=1e-4, atol=1e-4)
