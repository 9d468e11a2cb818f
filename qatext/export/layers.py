"""The one reader of qatext's quantized layers for every export format: integer codes, fp32 scales and
zeros, bias, and the model's other (full-precision) tensors."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..io import quant_layers
from ..nn.quant_linear import positive
from ..quant import QuantSpec


@dataclass
class QuantizedWeight:
    """One linear layer as w[n, k] = (codes[n, k] - zero[n, k // g]) * scale[n, k // g]."""

    name: str
    spec: QuantSpec
    group_size: int  # resolved: in_features for per-channel
    codes: torch.Tensor  # [N, K] uint8
    scale: torch.Tensor  # [N, K / g] fp32
    zero: torch.Tensor  # [N, K / g] fp32, integer-valued unless an adapter was merged into it
    bias: torch.Tensor | None

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def fractional_groups(self) -> int:
        return int((self.zero != torch.round(self.zero)).sum())


def check_plain_linears(model: nn.Module, names: list[str], fmt: str) -> None:
    """Refuse layers that the model's architecture builds as a subclass of nn.Linear (Falcon's
    FalconLinear): transformers' GPTQ loader (optimum / gptqmodel) and hqq swap exact nn.Linear layers
    only, so an export holding them loads with those layers freshly initialised (transformers, with a
    MISSING report) or fails (hqq). The architecture is rebuilt from the config on the meta device."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return  # not a transformers model: no loader of these formats would build it either
    with torch.device("meta"):
        skeleton = type(model)(copy.deepcopy(model.config))
    unbuilt = [name for name in names if not _has_module(skeleton, name)]
    if unbuilt and fmt != "gptq":
        where = ("hqq's loader, which builds the model as transformers does, would not load them" if fmt == "hqq" else
                 "give format 'gptq' (--format gptq) to write them one module an expert, as GPTQModel.load, vLLM and "
                 "SGLang read them (transformers' from_pretrained would leave them randomly initialised)")
        raise ValueError(f"export ({fmt}): {len(unbuilt)} of {len(names)} quantized layers (e.g. {unbuilt[0]}) are not "
                         f"modules of {type(model).__name__} as transformers builds it (a mixture's experts, which it "
                         f"stacks into one tensor): {where}. The qatext model itself loads and runs (load_quantized, "
                         "qatext.hf, qatext eval / generate)")
    built = {name: type(skeleton.get_submodule(name)) for name in names if name not in unbuilt}
    subclassed = {name: cls for name, cls in built.items() if cls is not nn.Linear}
    if subclassed:
        name, cls = next(iter(subclassed.items()))
        raise ValueError(f"export ({fmt}): {len(subclassed)} of {len(names)} quantized layers (e.g. {name}) are "
                         f"{cls.__name__}, not nn.Linear, in {type(model).__name__}; transformers' GPTQ loader and hqq "
                         "replace exact nn.Linear layers only, so the export would load there with those layers "
                         "randomly initialised, or fail. The qatext model itself loads and runs (load_quantized, "
                         "qatext eval / generate)")


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


@torch.no_grad()
def read_quantized(model: nn.Module, fmt: str) -> list[QuantizedWeight]:
    """Every QuantLinear of `model` merged to integer codes (training modes merge losslessly first)."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError(f"export ({fmt}): the model has no quantized layers (a full-precision model); export the "
                         "model `qatext train` wrote (OUTPUT/model), or quantize this one first")
    check_plain_linears(model, [name for name, _ in layers], fmt)
    out = []
    for name, layer in layers:
        if layer.act_bits is not None:
            raise ValueError(f"export ({fmt}): {name} quantizes its input activations (act_bits={layer.act_bits}); "
                             "GPTQ and HQQ hold weight-only models, so the export would compute something else")
        packed = layer if layer.mode == "packed" else layer.to_packed()
        k = layer.in_features
        out.append(QuantizedWeight(
            name=name, spec=layer.spec, group_size=packed.group_size,
            codes=ops.unpack(packed.packed_codes().detach().cpu(), layer.spec.bits, k),
            scale=positive(packed.scale.detach().cpu().float()), zero=packed.zero.detach().cpu().float().clone(),
            bias=None if packed.bias is None else packed.bias.detach().cpu().clone()))
    return out


def dense_tensors(model: nn.Module, weights: list[QuantizedWeight], keep_tied: bool = False) -> dict[str, torch.Tensor]:
    """The state dict entries that are not part of a quantized layer (embeddings, norms, lm_head); a tied
    lm_head is left out, as transformers writes it, unless the reader re-ties nothing (keep_tied)."""
    quantized = {w.name for w in weights}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if k.rpartition(".")[0] not in quantized}
    if not keep_tied and getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state
