"""Full QAT with learned step sizes (LSQ): every weight, scale and zero trained end to end."""

from __future__ import annotations

from ..models import quantize_model
from ..quant import QuantSpec
from ..train import TrainConfig, train
from .common import TrainDefaults, layer_params

TRAIN_DEFAULTS = TrainDefaults(schedule="cosine", clip=1.0)


def full_qat(model, spec: QuantSpec, tokens, cfg: TrainConfig, lr: float = 1e-5, quant_lr: float = 1e-4,
             init: str = "minmax", target_modules=None, gradient_checkpointing: bool = False):
    quantize_model(model, spec, method="fake", init=init, target_modules=target_modules)
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    for p in model.parameters():
        p.requires_grad_(True)
    qparams = layer_params(model, ("scale", "zero"))
    ids = {id(p) for p in qparams}
    others = [p for p in model.parameters() if id(p) not in ids]
    history = train(model, [{"params": others, "lr": lr}, {"params": qparams, "lr": quant_lr}], tokens, cfg,
                    desc=f"full-QAT W{spec.bits}")
    return model, history
