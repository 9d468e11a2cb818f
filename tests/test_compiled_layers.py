"""TrainConfig(compile=True): every decoder layer runs as torch.compile'd graphs during training, with
the eager loss curve, alone and under activation checkpointing; the layers' own forward comes back."""

import pytest
import torch
from torch._dynamo.utils import counters

from qatext import QuantSpec, data, methods, models
from qatext.evaluate import causal_lm_loss
from qatext.io import quant_layers

transformers = pytest.importorskip("transformers")


def _curve(compile_: bool, activation_checkpointing: bool):
    """QA-LoRA for 3 steps on a tiny Llama: its loss curve, the graphs dynamo compiled meanwhile, and
    whether the decoder layers have their own forward again."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    tcfg = methods.default_config("qalora", steps=3, batch_size=2, seq_len=32, progress=False, compile=compile_,
                                  activation_checkpointing=activation_checkpointing)
    tokens = data.ByteTokenizer().encode(data.load_kjv()[:5_000])
    graphs = counters["stats"]["unique_graphs"]
    model, history = methods.run("qalora", transformers.LlamaForCausalLM(cfg), QuantSpec(4, 32), tokens, tcfg,
                                 rank=4, lr=1e-2)
    restored = all("forward" not in layer.__dict__ for layer in models.decoder_layers(model))
    return history, counters["stats"]["unique_graphs"] - graphs, restored


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_compiled_layers_train_on_the_eager_curve(activation_checkpointing):
    torch._dynamo.reset()
    eager, eager_graphs, _ = _curve(False, activation_checkpointing)
    compiled, graphs, restored = _curve(True, activation_checkpointing)
    assert eager_graphs == 0 and graphs >= 1 and restored
    # Inductor fuses and reorders fp32 sums: the losses agree to float rounding, not bitwise.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-4)


def test_compiled_lrqat_layers_keep_no_weight_for_backward():
    # LR-QAT recomputes each N x K weight in backward; compiled, the weight must not become a tensor
    # the step keeps (as two ops, the compiler merged the recomputation with the forward's weight and
    # kept it: twice the memory of a 7B step).
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    models.quantize_model(model, QuantSpec(4, 128), method="lrqat", rank=8, alpha=8.0)
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[-1] in ("lora_a", "lora_b", "scale"))
    weights = {tuple(layer.p.shape[:1]) + (layer.in_features,) for _, layer in quant_layers(model)}
    weights |= {shape[::-1] for shape in weights}
    batch = torch.randint(0, cfg.vocab_size, (1, 33))
    torch._dynamo.reset()
    kept = []
    with models.compiled_layers(model):
        for _ in range(2):  # the first layer's input needs no gradient: a second graph
            kept.clear()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
                loss = causal_lm_loss(model, batch)
            loss.backward()
    assert kept and not weights & set(kept), sorted(weights & set(kept))


def test_a_mixture_of_experts_compiles_once_whatever_the_routing():
    """Compiled decoder layers of a Qwen3-MoE: the experts run eagerly in a graph break (grouped GEMMs), so new
    routings compile nothing new (traced, the loop's host-read token counts recompiled every step until dynamo's
    limit), and the losses are the eager model's."""
    import copy

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=64, moe_intermediate_size=32, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                      num_experts=8, num_experts_per_tok=2, max_position_embeddings=64)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    models.quantize_model(model, QuantSpec(4, 16), method="lrqat", rank=4)
    eager = copy.deepcopy(model)
    batches = [torch.randint(0, cfg.vocab_size, (1, 16)) for _ in range(6)]
    torch._dynamo.reset()
    graphs = []
    with models.compiled_layers(model):
        losses = []
        for batch in batches:
            loss = causal_lm_loss(model, batch)
            loss.backward()
            losses.append(loss.item())
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] >= 1 and graphs[-1] == graphs[1], graphs
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([causal_lm_loss(eager, b).item() for b in batches]),
                               rtol=1e-4, atol=1e-4)
