"""A LLaMA-2-7B-shaped model for the step benchmarks: transformers config, random init (no weights
are downloaded), bf16 on the GPU (or `device`), every parameter frozen."""

from __future__ import annotations

import torch

from qatext.methods.common import freeze


def llama_7b(layers: int = 32, device="cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    freeze(model)
    return model
