"""QA-LoRA (Xu et al. 2023): frozen group-wise INT weights, a LoRA adapter on the group-pooled input
that merges exactly into the (float) zeros.

Paper defaults: rank 64, alpha 16, AdamW lr 2e-4 constant, gradient clip 0.3. The base is
round-to-nearest here (the paper starts from GPTQ).
"""

from __future__ import annotations

from ..models import convert_layers, quantize_model
from ..quant import QuantSpec
from ..train import TrainConfig, train
from .common import TrainDefaults, freeze, layer_params

TRAIN_DEFAULTS = TrainDefaults(schedule="constant", betas=(0.9, 0.999), clip=0.3)


def qalora(model, spec: QuantSpec, tokens, cfg: TrainConfig, rank: int = 64, alpha: float = 16.0, lr: float = 2e-4,
           init: str = "minmax", target_modules=None):
    freeze(model)
    quantize_model(model, spec, method="packed", init=init, target_modules=target_modules)
    convert_layers(model, "qalora", rank=rank, alpha=alpha)
    groups = [{"params": layer_params(model, ("lora_a", "lora_b")), "lr": lr}]
    history = train(model, groups, tokens, cfg, desc=f"QA-LoRA W{spec.bits}")
    return model, history
