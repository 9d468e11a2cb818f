"""The tools a user would pick instead of qatext, set up the way their users set them up, for the
benchmarks that put them side by side (bench_layer, bench_step). Each needs its package installed
(peft, bitsandbytes, torchao); a missing one raises ImportError, which the benchmarks report as a
skipped row.

- LoRA: PEFT r64, alpha 16, adapters in the base's dtype (autocast_adapter_dtype=False; PEFT's
  default upcasts them to fp32, which would hold an fp32 copy of every adapter input).
- QLoRA: bitsandbytes NF4 base weights (bf16 compute), then PEFT LoRA as above.
- torchao QAT: QATConfig's prepare step with an int4, group-128 weight fake quantizer on every
  linear layer but the output head (the layers qatext quantizes).
"""

from __future__ import annotations

import torch
from torch import nn

LORA_RANK, LORA_ALPHA = 64, 16


def lora(model: nn.Module, target_modules, target_parameters=None) -> nn.Module:
    """target_parameters: stacked experts' tensors (PEFT's LoRA on an nn.Parameter, for MoE models)."""
    from peft import LoraConfig, get_peft_model

    extra = {"target_parameters": target_parameters} if target_parameters else {}
    return get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=target_modules, **extra),
                          autocast_adapter_dtype=False)


def _decoder_linears(model: nn.Module):
    """(parent, child name, Linear) for every nn.Linear but an output head named lm_head."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and name != "lm_head":
                yield parent, name, child


def nf4(model: nn.Module, compute_dtype=torch.bfloat16) -> nn.Module:
    """Replace the linear layers by bitsandbytes NF4 layers (quantized where the weights lie), in place."""
    import bitsandbytes as bnb

    for parent, name, lin in list(_decoder_linears(model)):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        setattr(parent, name, q.to(lin.weight.device))  # .to() quantizes
    return model


def torchao_qat(model: nn.Module) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    head = getattr(model, "lm_head", None)
    quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=128), step="prepare"),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m is not head)
    return model
