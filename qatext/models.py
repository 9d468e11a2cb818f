"""Model surgery on Hugging Face causal LMs: quantize, merge, save / load, export to GPTQ."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .nn import QuantLinear
from .quant import QuantSpec

CONFIG_NAME = "qatext_config.json"
WEIGHTS_NAME = "model.safetensors"
LAYER_OPTIONS = ("rank", "alpha", "frac_bits", "act_bits", "checkpointing")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (model.model.layers for Llama, Mistral, Qwen2, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") and len(module):
            return module
    raise ValueError(f"{type(model).__name__}: no decoder block list (e.g. model.layers) found")


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module):
    """Within the block, every decoder layer keeps only its input for backward and recomputes the
    rest there (torch.utils.checkpoint, non-reentrant): activation memory falls from every layer's
    intermediates to one layer's. Under FSDP2 the recomputation runs on the parameters FSDP gathered
    for the layer's backward. A KV cache would be filled twice, so `config.use_cache` is off inside."""
    from torch.utils.checkpoint import checkpoint

    layers = list(decoder_layers(model))
    own = [layer.__dict__.get("forward") for layer in layers]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    if use_cache:
        config.use_cache = False
    try:
        yield model
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
        if use_cache:
            config.use_cache = use_cache


def quant_layers(model: nn.Module):
    """(qualified name, QuantLinear) for every quantized layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, spec: QuantSpec, method: str = "fake", target_modules=None,
                   init: str = "minmax", **layer_kwargs) -> nn.Module:
    """Replace the nn.Linear layers of the decoder blocks by QuantLinear in mode `method`.

    `method` is a QuantLinear mode (fake, lrqat, qalora, e2eqp, packed). `target_modules`: names
    (last path component, e.g. "q_proj") to restrict to; every one must match at least one layer.
    Embeddings, norms and lm_head stay in full precision.
    """
    blocks = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    targets = None if target_modules is None else set(target_modules)
    found = set()
    linears = [(f"{prefix}.{n}", m) for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        short = name.split(".")[-1]
        if targets is not None and short not in targets:
            continue
        found.add(short)
        _replace(model, name, QuantLinear.from_linear(linear, spec, mode=method, init=init, **layer_kwargs))
    if targets is not None and targets - found:
        raise ValueError(f"quantize_model: target_modules {sorted(targets - found)} match no Linear in the decoder "
                         f"blocks (available: {sorted({n.split('.')[-1] for n, _ in linears})})")
    if not found:
        raise ValueError("quantize_model: no nn.Linear found in the decoder blocks")
    return model


def convert_layers(model: nn.Module, mode: str, **layer_kwargs) -> nn.Module:
    """Convert every QuantLinear to `mode` ('packed' merges; 'e2eqp' / 'qalora' start from integers)."""
    for name, layer in quant_layers(model):
        _replace(model, name, layer.to_packed() if mode == "packed" else layer.to_mode(mode, **layer_kwargs))
    return model


def merge_model(model: nn.Module) -> nn.Module:
    """Fold every trained QuantLinear into frozen integer weights (mode 'packed'), losslessly."""
    return convert_layers(model, "packed")


def tile_for_decode(model: nn.Module) -> int:
    """QuantLinear.tile_for_decode on every 'packed' layer whose shape and bits allow it (the others
    keep the packed path); returns how many were tiled."""
    tiled = 0
    for _, layer in quant_layers(model):
        if layer.mode != "packed":
            continue
        try:
            layer.tile_for_decode()
            tiled += 1
        except ValueError:
            continue
    return tiled


# ---------------------------------------------------------------------------- save / load


def _atomic_dir(out_dir: Path):
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp in one rename (an old directory is moved aside first)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _layer_config(layer: QuantLinear) -> dict:
    return {"mode": layer.mode, "spec": layer.spec.to_dict(), "bias": layer.bias is not None,
            **{k: getattr(layer, k) for k in LAYER_OPTIONS}}


def save_quantized(model: nn.Module, out_dir) -> Path:
    """Save a (Hugging Face) model with QuantLinear layers: safetensors + JSON quantization config."""
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    layers = quant_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no QuantLinear layers (run quantize_model first)")
    tmp = _atomic_dir(out_dir)
    try:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_NAME))
        config = {"format": "qatext", "version": 1, "layers": {n: _layer_config(m) for n, m in layers}}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1))
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_quantized(in_dir, device="cpu", dtype=None) -> nn.Module:
    """Load what save_quantized wrote; the model computes the same logits."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    in_dir = Path(in_dir)
    if not (in_dir / CONFIG_NAME).exists():
        raise ValueError(f"load_quantized: {in_dir} has no {CONFIG_NAME} (not saved by save_quantized)")
    config = json.loads((in_dir / CONFIG_NAME).read_text())
    hf_config = AutoConfig.from_pretrained(in_dir)
    model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=dtype)
    for name, cfg in config["layers"].items():
        old = model.get_submodule(name)
        layer = QuantLinear(old.in_features, old.out_features, QuantSpec(**cfg["spec"]), cfg["mode"], bias=cfg["bias"],
                            dtype=old.weight.dtype, **{k: cfg[k] for k in LAYER_OPTIONS})
        _replace(model, name, layer)
    load_model(model, str(in_dir / WEIGHTS_NAME), device=str(device))
    return model.to(device).eval()


# ---------------------------------------------------------------------------- GPTQ export

GPTQ_BITS = (2, 4, 8)


def _pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ints along `dim`, 32 // bits per int32, lowest first (GPTQ's layout)."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, 0)
    v = v.reshape(v.shape[0] // per, per, *v.shape[1:])
    shifts = (torch.arange(per) * bits).reshape(1, per, *([1] * (v.dim() - 2)))
    packed = (v << shifts).sum(1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement into int32
    return packed.to(torch.int32).movedim(0, dim).contiguous()


def gptq_tensors(layer: QuantLinear) -> dict[str, torch.Tensor]:
    """qweight [K * b / 32, N], qzeros [G, N * b / 32] (stored as zero - 1, GPTQ v1), scales [G, N] fp16,
    g_idx [K] for one packed layer. Zeros are rounded to integers (exact unless QA-LoRA moved them)."""
    from . import ops

    bits, k, n = layer.spec.bits, layer.in_features, layer.out_features
    if bits not in GPTQ_BITS:
        raise ValueError(f"export_gptq: bits={bits} has no exact GPTQ int32 packing here; supported: {GPTQ_BITS}")
    if (k * bits) % 32 or (n * bits) % 32:
        raise ValueError(f"export_gptq: in_features ({k}) and out_features ({n}) must fill whole int32 words")
    packed = layer if layer.mode == "packed" else layer.to_packed()
    codes = ops.unpack(packed.packed.cpu(), bits, k)  # [N, K]
    zero = torch.round(packed.zero.cpu().float())
    if not torch.equal(zero, packed.zero.cpu().float()):
        warnings.warn("export_gptq: fractional zeros (e.g. a merged QA-LoRA adapter) are rounded to integers; "
                      "the exported weights differ from the trained ones by up to half a quantization step")
    if torch.any(zero < 1) or torch.any(zero > 2**bits):
        raise ValueError("export_gptq: GPTQ stores zero - 1 unsigned, so zeros must lie in [1, 2^bits]")
    return {
        "qweight": _pack_int32(codes.t().contiguous(), bits, 0),
        "qzeros": _pack_int32((zero - 1).t().to(torch.int64).contiguous(), bits, 1),
        "scales": packed.scale.detach().cpu().t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(k) // packed.group_size).to(torch.int32),
        **({"bias": packed.bias.detach().cpu().to(torch.float16)} if packed.bias is not None else {}),
    }


def export_gptq(model: nn.Module, out_dir) -> Path:
    """Write a GPTQ checkpoint (qweight / qzeros / scales / g_idx, quantization_config in config.json)."""
    from safetensors.torch import save_file

    layers = quant_layers(model)
    if not layers:
        raise ValueError("export_gptq: the model has no QuantLinear layers")
    specs = {m.spec for _, m in layers}
    if len(specs) != 1:
        raise ValueError(f"export_gptq: GPTQ needs one bits/group_size for all layers, got {specs}")
    spec = specs.pop()
    quantized = {n for n, _ in layers}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] not in quantized:
            state[name] = tensor.detach().cpu().contiguous()
    for name, layer in layers:
        for key, t in gptq_tensors(layer).items():
            state[f"{name}.{key}"] = t
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    out_dir = Path(out_dir)
    tmp = _atomic_dir(out_dir)
    try:
        config = model.config.to_dict()
        config["quantization_config"] = {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size,
                                         "desc_act": False, "sym": spec.symmetric, "checkpoint_format": "gptq"}
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        save_file({k: v.clone() for k, v in state.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
