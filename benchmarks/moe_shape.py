"""A Qwen3-30B-A3B-shaped mixture-of-experts model for the benchmarks: transformers config (hidden
2048, 32 query and 4 key-value heads of 128, 128 routed experts of width 768, 8 a token, vocab
151936), `layers` of its 48, random init (no weights are downloaded), bf16, every parameter frozen."""

from __future__ import annotations

import torch

from qatext.methods.common import freeze


def qwen3_30b_a3b(layers: int = 48, device="cuda"):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                         num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    freeze(model)
    return model
