"""Helpers shared by the recipes: freezing, picking parameter groups."""

from __future__ import annotations

from torch import nn

from ..models import quant_layers


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
