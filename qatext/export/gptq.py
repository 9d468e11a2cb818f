"""GPTQ checkpoints (the layout AutoGPTQ, GPTQModel, vLLM, SGLang and transformers read).

Per layer: qweight [K * b / 32, N] int32, qzeros [G, N * b / 32] int32, scales [G, N] fp16, g_idx [K]
int32, bias fp16. Codes and zeros are one little-endian bit stream per column (qweight) or row
(qzeros) in 32-bit words, lowest bits first; at 3 bits a value may straddle two words (32 values fill
3 words). checkpoint_format "gptq" (v1) stores zero - 1, so a zero of 0 needs "gptq_v2" (zero as is).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import write_hf_config
from ..quant.primitives import qmax
from .hub_layout import hub_layout
from .layers import QuantizedWeight, dense_tensors

BITS = (2, 3, 4, 8)
FP16_MAX = 65504.0  # GPTQ's scales are fp16
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # the offset subtracted from each zero before packing


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned b-bit values along `dim` into a bit stream of int32 words, lowest bits first."""
    v = values.to(torch.int64).movedim(dim, 0)
    if (v.shape[0] * bits) % 32:
        raise ValueError(f"pack_int32: {v.shape[0]} values of {bits} bits do not fill whole 32-bit words")
    offset = torch.arange(v.shape[0]) * bits
    word, shift = offset // 32, (offset % 32).view(-1, *([1] * (v.dim() - 1)))
    words = torch.zeros((v.shape[0] * bits // 32, *v.shape[1:]), dtype=torch.int64)
    words.index_add_(0, word, (v << shift) & 0xFFFFFFFF)
    spill = (shift + bits > 32).flatten()
    if spill.any():  # the high bits of a value that straddles two words
        words.index_add_(0, word[spill] + 1, v[spill] >> (32 - shift[spill]))
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32).movedim(0, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Inverse of pack_int32: `count` unsigned values along `dim`."""
    w = (words.to(torch.int64) & 0xFFFFFFFF).movedim(dim, 0)
    offset = torch.arange(count) * bits
    word, shift = offset // 32, (offset % 32).view(-1, *([1] * (w.dim() - 1)))
    value = w[word] >> shift
    spill = (shift + bits > 32).flatten()
    if spill.any():
        value[spill] |= w[word[spill] + 1] << (32 - shift[spill])
    return (value & qmax(bits)).movedim(0, dim).contiguous()


def default_checkpoint_format(weights: list[QuantizedWeight]) -> str:
    """v1, the format every GPTQ reader knows, unless some zero is 0 (v1 cannot store -1)."""
    return "gptq_v2" if any(bool((w.zero < 0.5).any()) for w in weights) else "gptq"


def check(weights: list[QuantizedWeight], checkpoint_format: str) -> None:
    """One clear error for everything GPTQ cannot hold exactly."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"export (gptq): checkpoint_format must be one of {tuple(CHECKPOINT_FORMATS)}, "
                         f"got {checkpoint_format!r}")
    specs = {w.spec for w in weights}
    if len(specs) != 1:
        raise ValueError(f"export (gptq): GPTQ holds one bits / group_size / symmetric for all layers, got {specs}")
    for w in weights:
        if w.bits not in BITS:
            raise ValueError(f"export (gptq): {w.name} has {w.bits} bits; GPTQ packs {BITS} (use format 'hqq')")
        if (w.in_features * w.bits) % 32 or (w.out_features * w.bits) % 32:
            raise ValueError(f"export (gptq): {w.name} is {w.out_features}x{w.in_features}; GPTQ's int32 packing "
                             f"needs both dimensions times {w.bits} bits to be multiples of 32")
        if bool((w.scale > FP16_MAX).any()):
            raise ValueError(f"export (gptq): {w.name} has scales above {FP16_MAX:.0f}, beyond the fp16 GPTQ stores "
                             "them in; use format 'hqq' (fp32 scales)")
        fractional = w.fractional_groups()
        if fractional:
            raise ValueError(f"export (gptq): {w.name} has {fractional} of {w.zero.numel()} groups with a fractional "
                             "zero point (a merged QA-LoRA adapter); GPTQ stores integer zeros, so the export would "
                             "change the model. Use format 'hqq' (exact), or round the zeros explicitly "
                             "(--round-zeros) and accept the measured loss")
        low = CHECKPOINT_FORMATS[checkpoint_format]
        high = low + qmax(w.bits)
        if bool((w.zero < low).any()) or bool((w.zero > high).any()):
            raise ValueError(f"export (gptq): {w.name} has zero points outside [{low}, {high}], "
                             f"which checkpoint_format {checkpoint_format!r} cannot store"
                             + ("; use 'gptq_v2'" if checkpoint_format == "gptq" else "; use format 'hqq'"))


def layer_tensors(w: QuantizedWeight, checkpoint_format: str) -> dict[str, torch.Tensor]:
    zero = w.zero.to(torch.int64) - CHECKPOINT_FORMATS[checkpoint_format]
    tensors = {
        "qweight": pack_int32(w.codes.t(), w.bits, 0),
        "qzeros": pack_int32(zero.t(), w.bits, 1),
        "scales": w.scale.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(w.in_features) // w.group_size).to(torch.int32),
    }
    if w.bias is not None:
        tensors["bias"] = w.bias.to(torch.float16)
    return tensors


def write(model, weights: list[QuantizedWeight], out_dir: Path, checkpoint_format: str) -> dict:
    """Write config.json (with quantization_config) and model.safetensors into out_dir; returns the
    quantization_config."""
    from safetensors.torch import save_file

    check(weights, checkpoint_format)
    spec = weights[0].spec
    quant_config = {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": False,
                    "sym": spec.symmetric, "checkpoint_format": checkpoint_format}
    state = hub_layout(model, dense_tensors(model, weights),
                       {w.name: layer_tensors(w, checkpoint_format) for w in weights})
    write_hf_config(model, out_dir, quant_config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return quant_config
