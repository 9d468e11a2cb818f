"""TrainConfig(compile=True): every decoder layer runs as torch.compile'd graphs during training, with
the eager loss curve, alone and under activation checkpointing; the layers' own forward comes back."""

import pytest
import torch
from torch._dynamo.utils import counters

from qatext import QuantSpec, data, methods, models

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
