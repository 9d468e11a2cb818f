"""Helpers shared by the recipes: their optimiser defaults, freezing, picking parameter groups."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..models import quant_layers


@dataclass(frozen=True)
class TrainDefaults:
    """A paper's optimiser settings (each recipe module holds its own as TRAIN_DEFAULTS)."""

    schedule: str = "cosine"
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    clip: float | None = 1.0
    warmup_fraction: float = 0.0  # of the steps, at least one step where > 0

    def config(self, **overrides) -> dict:
        """TrainConfig keyword arguments: these defaults under `overrides`."""
        cfg = {"schedule": self.schedule, "betas": self.betas, "weight_decay": self.weight_decay, "clip": self.clip,
               **overrides}
        if self.warmup_fraction and "warmup_steps" not in overrides:
            cfg["warmup_steps"] = max(1, math.floor(cfg.get("steps", 100) * self.warmup_fraction + 1e-9))
        return cfg


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def layer_params(model: nn.Module, names: tuple[str, ...]) -> list[nn.Parameter]:
    """The named parameters (e.g. 'lora_a', 'scale') of every QuantLinear, made trainable."""
    out = []
    for _, layer in quant_layers(model):
        for name in names:
            p = getattr(layer, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(True)
                out.append(p)
    return out
