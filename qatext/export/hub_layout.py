"""A GPTQ export's tensors under the names the model's hub checkpoints use.

transformers (5.x) renames and stacks some weights as it loads a checkpoint (its conversion mapping:
GPT-NeoX's embed_out becomes lm_head, Mixtral's block_sparse_moe.experts.E.w1 / w3 are stacked into
mlp.experts.gate_up_proj) and reverts that as save_pretrained writes one. Loaders other than transformers
(vLLM, SGLang, GPTQModel) read the hub's names, so the export is written in them too: dense tensors as
save_pretrained would write them, each quantized layer (an expert's included) under its weight's hub name.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.experts import EXPERT_LINEARS, ExpertList


def hub_layout(model: nn.Module, dense: dict[str, torch.Tensor],
               layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`dense` (full-precision tensors by state-dict name) and `layers` ({layer name: {"qweight": ...}})
    as one state dict in the hub's names."""
    try:
        from transformers.core_model_loading import revert_weight_conversion as revert
    except ImportError:  # (transformers 4)
        revert = None
    if revert is None or not hasattr(model, "config"):  # the in-memory names are the hub's
        def revert(_model, state):
            return dict(state)
    names = _expert_names(model, revert)
    names.update(_layer_names(model, [name for name in layers if name not in names], revert))
    state = revert(model, {k: v for k, v in dense.items() if k.rpartition(".")[0] not in names})
    for k, v in dense.items():  # an expert's projection left in full precision (target_modules)
        owner, _, leaf = k.rpartition(".")
        if owner in names:
            state[f"{names[owner]}.{leaf}"] = v
    for name, tensors in layers.items():
        state.update({f"{names[name]}.{k}": t for k, t in tensors.items()})
    return state


def _layer_names(model: nn.Module, names: list[str], revert) -> dict[str, str]:
    """{layer name: hub name}: each layer's weight, as a one-element stand-in holding its index, reverted."""
    if not names:
        return {}
    out = revert(model, {f"{name}.weight": torch.full((1, 1), float(i)) for i, name in enumerate(names)})
    return {names[int(t.item())]: hub.removesuffix(".weight") for hub, t in out.items()}


def _expert_names(model: nn.Module, revert) -> dict[str, str]:
    """{expert layer name (...experts.E.gate_proj): hub name}: each ExpertList's stacked tensors as
    stand-ins whose entries count (projection, expert), reverted as save_pretrained reverts them; the
    in-memory name where the model's mapping has no place for them."""
    names = {}
    for stack, experts in ((n, m) for n, m in model.named_modules() if isinstance(m, ExpertList)):
        count = len(experts)
        index = torch.arange(count, dtype=torch.float32)
        gate_up = torch.stack([index, count + index], dim=1).view(count, 2, 1)  # gate rows, then up rows
        down = (2 * count + index).view(count, 1, 1)
        for hub, t in revert(model, {f"{stack}.gate_up_proj": gate_up, f"{stack}.down_proj": down}).items():
            if t.numel() == 1:
                projection, expert = divmod(int(t.item()), count)
                names[f"{stack}.{expert}.{EXPERT_LINEARS[projection]}"] = hub.removesuffix(".weight")
        for expert in range(count):
            for projection in EXPERT_LINEARS:
                names.setdefault(f"{stack}.{expert}.{projection}", f"{stack}.{expert}.{projection}")
    return names
