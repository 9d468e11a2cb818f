"""save_quantized / load_quantized: a model with QuantLinear layers as safetensors + a JSON layer config,
with the tokenizer and generation config beside it (the companions every writer adds)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from .nn import QuantLinear
from .nn.experts import unfuse_experts
from .nn.quant_linear import LayerOptions
from .outdir import written_dir
from .quant import QuantSpec

CONFIG_NAME = "qatext_config.json"
FORMAT_VERSION = 1  # of CONFIG_NAME and the weights' names; a reader refuses a newer one
WEIGHTS_NAME = "model.safetensors"
LAYER_OPTIONS = tuple(f.name for f in fields(LayerOptions))
# What a Hugging Face tokenizer (slow or fast, BPE or SentencePiece) and its chat template are saved as.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


def quant_layers(model: nn.Module):
    """(qualified name, QuantLinear) for every quantized layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def check_scales(model: nn.Module, where: str) -> None:
    """Every quantized layer's scales positive and finite, checked once for the whole model (one read
    from the GPU), so that the ops need not check them, and sync the GPU, on every call."""
    layers = [(n, m) for n, m in quant_layers(model) if m.scale.numel()]
    if not layers:
        return
    bad = torch.stack([((m.scale <= 0) | ~torch.isfinite(m.scale)).any() for _, m in layers]).cpu()
    if bad.any():
        name = layers[int(bad.nonzero()[0])][0]
        raise ValueError(f"{where}: layer {name} has a scale <= 0, NaN or inf (a damaged file, or a diverged run)")


def write_hf_config(model: nn.Module, out_dir: Path, quantization_config: dict | None = None) -> None:
    """config.json of every writer: the model's config naming its class (as save_pretrained does; hqq's
    loader builds from it) with the quantization_config of what is written (None: none), never the one
    the model was loaded with. The model's own config is left as it was."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.save_pretrained(out_dir)


def build_layers(model: nn.Module, layers: dict) -> None:
    """Replace each named linear layer by an empty QuantLinear of its saved mode and options (the
    weights are loaded into it after), on the current default device (meta under transformers); a
    mixture's stacked experts that hold saved layers first become per-expert nn.Linear layers, as
    quantize_model made them."""
    unfuse_experts(model, holding=layers)
    for name, cfg in layers.items():
        old = model.get_submodule(name)
        replace_module(model, name, QuantLinear(old.in_features, old.out_features, QuantSpec(**cfg["spec"]), cfg["mode"],
                                                bias=cfg["bias"], dtype=old.weight.dtype,
                                                **{k: cfg[k] for k in LAYER_OPTIONS}))


def check_version(version: int, where) -> None:
    if version > FORMAT_VERSION:
        raise ValueError(f"{where} was written by a newer qatext (format version {version}; this one reads "
                         f"{FORMAT_VERSION}); upgrade qatext")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def has_tokenizer(model_dir) -> bool:
    return any((Path(model_dir) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def write_companions(model: nn.Module, out_dir: Path, tokenizer=None) -> None:
    """What travels with the weights: the tokenizer (a directory holding one, or an object with
    save_pretrained) and the model's generation config."""
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            for name in TOKENIZER_FILES:
                if (Path(tokenizer) / name).is_file():
                    shutil.copy2(Path(tokenizer) / name, out_dir / name)
        else:
            tokenizer.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out_dir)


def _layer_config(layer: QuantLinear) -> dict:
    return {"mode": layer.mode, "spec": layer.spec.to_dict(), "bias": layer.bias is not None,
            **{k: getattr(layer, k) for k in LAYER_OPTIONS}}


def save_quantized(model: nn.Module, out_dir, tokenizer=None, overwrite: bool = False) -> Path:
    """Save a (Hugging Face) model with QuantLinear layers: safetensors + JSON quantization config, the
    HF config, generation config and, given `tokenizer` (a directory or a tokenizer object), its files.
    A non-empty out_dir is refused unless qatext wrote it and overwrite=True (then only qatext's files
    are replaced; see outdir.py)."""
    from safetensors.torch import save_model

    layers = quant_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no QuantLinear layers (run quantize_model first)")
    layer_configs = {n: _layer_config(m) for n, m in layers}
    with written_dir(out_dir, overwrite) as tmp:
        # config.json names qatext as the quantization, so transformers' from_pretrained builds these layers
        # (after `import qatext.hf`) or says it cannot, instead of loading the linears randomly initialised.
        write_hf_config(model, tmp, {"quant_method": "qatext", "version": FORMAT_VERSION, "layers": layer_configs})
        save_model(model, str(tmp / WEIGHTS_NAME))
        config = {"format": "qatext", "version": FORMAT_VERSION, "layers": layer_configs}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1))
        write_companions(model, tmp, tokenizer)
    return Path(out_dir)


def _read_config(in_dir: Path) -> dict:
    """qatext_config.json, refused by name where it is damaged or written by a newer qatext."""
    path = in_dir / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load_quantized: {path} is not valid JSON ({e}); copy or save the model again") from None
    if not isinstance(config, dict) or config.get("format") != "qatext" or not isinstance(config.get("layers"), dict):
        raise ValueError(f"load_quantized: {path} is not a qatext config (no format 'qatext' with its layers)")
    check_version(config.get("version", FORMAT_VERSION), f"load_quantized: {in_dir}")
    return config


def load_quantized(in_dir, device="cpu", dtype=None, decode_layout: bool | None = None) -> nn.Module:
    """Load what save_quantized wrote; the model computes the same logits.

    decode_layout: lay each packed layer's codes out for the decode kernel now, once, as its only copy
    (models.tile_for_decode; saving, merging and exporting lay them out as `packed` again), so that
    few-token forwards take it even under torch.compile or CUDA graphs, which cannot make it themselves.
    None (default): on a CUDA device, where that kernel runs; pass False for a model that never decodes
    (perplexity, scoring).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    in_dir = Path(in_dir)
    if not (in_dir / CONFIG_NAME).exists():
        raise ValueError(f"load_quantized: {in_dir} has no {CONFIG_NAME} (not saved by save_quantized)")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load_quantized: device {str(device)!r}, but no CUDA GPU is visible here; give device='cpu'")
    config = _read_config(in_dir)
    hf_config = AutoConfig.from_pretrained(in_dir)
    hf_config.name_or_path = str(in_dir.resolve())  # (absolute: export_model refuses to write over it)
    if hasattr(hf_config, "quantization_config"):  # a marker of the files (save_quantized), not of the model
        del hf_config.quantization_config
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    build_layers(model, config["layers"])
    try:
        load_model(model, str(in_dir / WEIGHTS_NAME), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"load_quantized: {in_dir / WEIGHTS_NAME} is damaged ({e}); copy or save the model "
                         "again") from None
    if (in_dir / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(in_dir)
    model = model.to(device).eval()
    if decode_layout is None:
        decode_layout = torch.device(device).type == "cuda"
    finish_loading(model, f"load_quantized: {in_dir}", decode_layout)
    return model


def finish_loading(model: nn.Module, where: str, decode_layout: bool) -> None:
    """What every loader of saved layers does once their tensors are in (load_quantized, qatext.hf): check
    the scales, leave trainable what quantize_model did (training resumes on the method's parameters),
    and lay the codes out for the decode kernel where asked."""
    from .models import tile_for_decode, train_only_adapters  # models imports this module

    check_scales(model, where)
    train_only_adapters(model)
    if decode_layout:
        tile_for_decode(model)
