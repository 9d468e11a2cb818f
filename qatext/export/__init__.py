"""Export a quantized model to a checkpoint format other tools read, exactly.

| format | zero points | bits | read by |
| gptq   | integer (v1 stores zero - 1; gptq_v2 as is) | 2, 3, 4, 8 | transformers (+ optimum, gptqmodel), vLLM, SGLang, GPTQModel |
| hqq    | float32 (a merged QA-LoRA adapter stays exact) | 2-6, 8 | the hqq library (AutoHQQHFModel.from_quantized) |

`export_model(model, dir)` picks GPTQ when every zero is an integer and GPTQ can hold the model, HQQ
otherwise, and says which; `format=` forces one. GPTQ on fractional zeros refuses unless the caller
rounds them first (`round_zeros`), which changes the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..io import quant_layers, write_companions
from ..nn.experts import ExpertList
from ..outdir import check_not_source, check_target, written_dir
from . import gptq, hqq
from .layers import QuantizedWeight, read_quantized

FORMATS = ("gptq", "hqq")


def choose_format(weights: list[QuantizedWeight]) -> tuple[str, str]:
    """(format, why): GPTQ where it is exact, else HQQ."""
    fractional = sum(w.fractional_groups() for w in weights)
    if fractional:
        total = sum(w.zero.numel() for w in weights)
        return "hqq", (f"{fractional} of {total} groups have fractional zero points (e.g. a merged QA-LoRA adapter), "
                       "which GPTQ would round; HQQ keeps them exactly")
    try:
        gptq.check(weights, gptq.default_checkpoint_format(weights))
    except ValueError as e:
        return "hqq", f"GPTQ would not be exact here: {str(e).removeprefix('export (gptq): ')}"
    return "gptq", "every zero point is an integer, so GPTQ holds the model exactly"


@torch.no_grad()
def round_zeros(model: nn.Module) -> int:
    """Round every fractional zero point in place (changes the model); returns how many groups moved."""
    moved = 0
    for name, layer in quant_layers(model):
        if layer.mode != "packed":
            raise ValueError(f"round_zeros: {name} is in mode {layer.mode!r}; merge the model first (merge_model)")
        rounded = torch.round(layer.zero)
        moved += int((rounded != layer.zero).sum())
        layer.zero.copy_(rounded)
    return moved


def export_model(model: nn.Module, out_dir, format: str = "auto", tokenizer=None,
                 checkpoint_format: str | None = None, overwrite: bool = False) -> dict:
    """Write `model` (QuantLinear layers, any mode) to `out_dir` in `format` ('auto', 'gptq', 'hqq'),
    with its config, generation config and, given `tokenizer` (a directory or tokenizer object), the
    tokenizer files. checkpoint_format (GPTQ only): 'gptq' (v1) or 'gptq_v2'; default v1 unless a zero
    is 0 (giving it means GPTQ). A non-empty out_dir is refused unless qatext wrote it and overwrite=True
    (then only qatext's files are replaced), and so is the directory the model was loaded from. Returns
    {"format", "reason", "quantization_config", "path"}."""
    if format not in ("auto", *FORMATS):
        raise ValueError(f"export: format must be 'auto' or one of {FORMATS}, got {format!r}")
    if checkpoint_format is not None:
        if format == "hqq":
            raise ValueError("export: checkpoint_format applies to format 'gptq' only")
        format = "gptq"
    check_not_source(out_dir, getattr(getattr(model, "config", None), "name_or_path", None), "export: out_dir")
    check_target(out_dir, overwrite)
    weights = read_quantized(model, format)
    reason = "requested"
    if format == "auto":
        format, reason = choose_format(weights)
    with written_dir(out_dir, overwrite) as tmp:
        if format == "gptq":
            quant_config = gptq.write(model, weights, tmp, checkpoint_format or gptq.default_checkpoint_format(weights))
        else:
            quant_config = hqq.write(model, weights, tmp)
        write_companions(model, tmp, tokenizer)
    if format == "gptq" and any(isinstance(m, ExpertList) for m in model.modules()):
        reason += ("; the experts are written one module an expert, under the hub's names, as vLLM, SGLang and "
                   "GPTQModel.load read them, not transformers' from_pretrained (it builds them stacked)")
    return {"format": format, "reason": reason, "quantization_config": quant_config, "path": str(Path(out_dir))}


__all__ = ["FORMATS", "choose_format", "export_model", "round_zeros"]
