"""LR-QAT (Bondarenko et al. 2024): frozen P = phi(W0 / s0), trainable A B inside the rounding.

Paper defaults: rank 32, A zero-init, B Kaiming, scale init by L4-norm search, AdamW with
lr 1e-3 for A and B, 1e-5 for the scales, weight decay 0, beta2 0.95, clip 1.0, linear schedule
with warmup, per-layer checkpointing. `storage`: 'int' keeps P as packed b-bit codes, 'fixed' as
uint8 fixed point with 8 - b fractional bits (Q4.4 at 4 bits). `act_bits=8` gives W4A8.
"""

from __future__ import annotations

from ..models import quantize_model
from ..quant import QuantSpec
from ..train import TrainConfig, train
from .common import TrainDefaults, freeze, layer_params

TRAIN_DEFAULTS = TrainDefaults(schedule="linear", betas=(0.9, 0.95), weight_decay=0.0, clip=1.0,
                               warmup_fraction=0.1)


def lrqat(model, spec: QuantSpec, tokens, cfg: TrainConfig, rank: int = 32, alpha: float | None = None,
          lr: float = 1e-3, scale_lr: float = 1e-5, storage: str = "int", act_bits: int | None = None,
          init: str = "l4", target_modules=None, checkpointing: bool = True):
    if storage not in ("int", "fixed"):
        raise ValueError(f"lrqat: storage must be 'int' or 'fixed', got {storage!r}")
    frac_bits = 0 if storage == "int" else 8 - spec.bits
    freeze(model)
    quantize_model(model, spec, method="lrqat", init=init, target_modules=target_modules, rank=rank,
                   alpha=float(alpha if alpha is not None else rank), frac_bits=frac_bits, act_bits=act_bits,
                   checkpointing=checkpointing)
    groups = [{"params": layer_params(model, ("lora_a", "lora_b")), "lr": lr},
              {"params": layer_params(model, ("scale",)), "lr": scale_lr}]
    history = train(model, groups, tokens, cfg, desc=f"LR-QAT W{spec.bits}")
    return model, history
