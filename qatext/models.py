"""Model surgery on Hugging Face causal LMs: quantize, convert, merge, tile (save / load: io.py;
export: export/)."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .io import quant_layers, replace_module
from .nn import QuantLinear
from .nn.experts import EXPERT_LINEARS, ExpertList, is_stacked_experts, unfuse_experts
from .nn.shared_input import share_inputs
from .quant import QuantSpec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (model.model.layers for Llama, Mistral, Qwen2, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") and len(module):
            return module
    raise ValueError(f"{type(model).__name__}: no decoder block list (e.g. model.layers) found")


@contextlib.contextmanager
def _layer_forwards(model: nn.Module, wrap):
    """Within the block, every decoder layer's forward is wrap(forward); restored on leaving."""
    layers = list(decoder_layers(model))
    own = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = wrap(layer.forward)
    try:
        yield model
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module):
    """Within the block, every decoder layer keeps only its input for backward and recomputes the
    rest there (torch.utils.checkpoint, non-reentrant): activation memory falls from every layer's
    intermediates to one layer's. Under FSDP2 the recomputation runs on the parameters FSDP gathered
    for the layer's backward. A KV cache would be filled twice, so `config.use_cache` is off inside."""
    from torch.utils.checkpoint import checkpoint

    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    try:
        with _layer_forwards(model, lambda forward: functools.partial(checkpoint, forward, use_reentrant=False)):
            yield model
    finally:
        if use_cache:
            config.use_cache = use_cache


def compiled_layers(model: nn.Module, mode: str | None = None):
    """Within the block, every decoder layer runs as torch.compile'd graphs, forward and backward:
    its elementwise ops fused and no Python per op, for steps the host cannot issue as fast as the GPU
    runs them (small batches, many layers). The first steps compile (about a minute on a 7B model);
    the layers are the same modules (state dicts and checkpoints unchanged). `mode`: torch.compile's
    (None: its default)."""
    return _layer_forwards(model, functools.partial(torch.compile, mode=mode))


# Mixture-of-experts routers that are nn.Linear (Qwen2-MoE's shared_expert_gate, older models' gate): their
# outputs choose the experts and they hold a negligible share of the weights, so they stay in full precision,
# as GPTQModel and vLLM leave them, unless named in target_modules.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")

# What each adapter mode trains (the papers': LR-QAT its low-rank pair and scales, QA-LoRA its pair,
# EfficientQAT's E2E-QP the step sizes); quantize_model freezes the rest of the model.
ADAPTER_PARAMS = {"lrqat": ("lora_a", "lora_b", "scale"), "qalora": ("lora_a", "lora_b"), "e2eqp": ("scale",)}


def check_no_fused_experts(model: nn.Module) -> None:
    """Refuse decoder blocks that hold stacks of weight matrices outside nn.Linear in a layout qatext does
    not take apart (transformers' fused MoE experts, a 3-D tensor [experts, out, in], transposed, biased or
    interleaved as Llama 4's and GPT-OSS's are; a depthwise conv's [channels, 1, width] is not one):
    qatext quantizes nn.Linear layers, so those weights, most of a mixture-of-experts model, would stay in
    full precision under a model labelled W4. Experts in transformers' common layout are not refused:
    quantize_model makes them nn.Linear layers (nn.experts)."""
    blocks = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    separable = [f"{n}." for n, m in blocks.named_modules() if is_stacked_experts(m)]
    stacks = [(f"{prefix}.{n}", p) for n, p in blocks.named_parameters()
              if p.dim() == 3 and min(p.shape[1:]) > 1 and not n.startswith(tuple(separable))]
    if not stacks:
        return
    matrices = sum(p.numel() for p in blocks.parameters() if p.dim() >= 2)
    share = sum(p.numel() for _, p in stacks) / matrices
    name, first = stacks[0]
    owner = type(model.get_submodule(name.rpartition(".")[0])).__name__
    raise ValueError(f"quantize_model: the decoder blocks hold {len(stacks)} stacked weight tensors outside nn.Linear "
                     f"(e.g. {name} {list(first.shape)}, fused mixture-of-experts weights of {owner}), {share:.0%} of "
                     "their weights, in a layout qatext does not take apart (it takes [experts, out, in] without bias, "
                     "as Mixtral's, Qwen-MoE's and DeepSeek's are); they would stay in full precision, so this model is "
                     "not supported (quantize_model(..., target_modules=[...]) quantizes the nn.Linear layers alone, "
                     "knowingly)")


def quantize_model(model: nn.Module, spec: QuantSpec, method: str = "fake", target_modules=None,
                   init: str = "minmax", **layer_kwargs) -> nn.Module:
    """Replace the nn.Linear layers of the decoder blocks by QuantLinear in mode `method`.

    `method` is a QuantLinear mode (fake, lrqat, qalora, e2eqp, packed). `target_modules`: names
    (last path component, e.g. "q_proj") to restrict to; every one must match at least one layer.
    Embeddings, norms, lm_head and mixture-of-experts routers (ROUTER_NAMES) stay in full precision; a
    mixture's stacked experts become per-expert nn.Linear layers first (nn.experts). In the adapter modes
    (lrqat, qalora, e2eqp) only what the method trains stays trainable (ADAPTER_PARAMS), as PEFT's
    get_peft_model leaves a model; fake (full QAT) leaves every parameter trainable.
    """
    blocks = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    targets = None if target_modules is None else set(target_modules)
    if targets is None:
        check_no_fused_experts(model)
    if targets is None or targets & set(EXPERT_LINEARS):
        unfuse_experts(blocks)  # a mixture's stacked experts as nn.Linear layers, quantized below with the rest
    found = set()
    linears = [(f"{prefix}.{n}", m) for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        short = name.split(".")[-1]
        skipped = short not in targets if targets is not None else short in ROUTER_NAMES
        if skipped:
            continue
        found.add(short)
        replace_module(model, name, QuantLinear.from_linear(linear, spec, mode=method, init=init, **layer_kwargs))
    if targets is not None and targets - found:
        raise ValueError(f"quantize_model: target_modules {sorted(targets - found)} match no Linear in the decoder "
                         f"blocks (available: {sorted({n.split('.')[-1] for n, _ in linears})})")
    if not found:
        if quantized := len(quant_layers(model)):
            raise ValueError(f"quantize_model: the model is already quantized ({quantized} QuantLinear layers); "
                             "quantize the full-precision model, or train or merge this one")
        conv1d = any(type(m).__name__ == "Conv1D" for m in blocks.modules())  # (transformers' GPT-2 family)
        held = " (its blocks hold Conv1D layers, as GPT-2's do)" if conv1d else ""
        raise ValueError(f"quantize_model: no nn.Linear found in the decoder blocks{held}; qatext quantizes models "
                         "whose blocks use nn.Linear (Llama, Mistral, Qwen, ...)")
    train_only_adapters(model)
    return model


def train_only_adapters(model: nn.Module) -> None:
    """Where layers are in an adapter mode, leave trainable only what those layers train (ADAPTER_PARAMS);
    a model without such layers (full QAT, packed) is left as it is."""
    layers = [layer for _, layer in quant_layers(model) if layer.mode in ADAPTER_PARAMS]
    if not layers:
        return
    model.requires_grad_(False)
    for layer in layers:
        for name in ADAPTER_PARAMS[layer.mode]:
            getattr(layer, name).requires_grad_(True)


def convert_layers(model: nn.Module, mode: str, **layer_kwargs) -> nn.Module:
    """Convert every QuantLinear to `mode` ('packed' merges; 'e2eqp' / 'qalora' start from integers)."""
    for name, layer in quant_layers(model):
        replace_module(model, name, layer.to_packed() if mode == "packed" else layer.to_mode(mode, **layer_kwargs))
    return model


def merge_model(model: nn.Module) -> nn.Module:
    """Fold every trained QuantLinear into frozen integer weights (mode 'packed'), losslessly."""
    if not quant_layers(model):
        raise ValueError("merge_model: the model has no QuantLinear layers (run quantize_model first)")
    return convert_layers(model, "packed")


def tile_for_decode(model: nn.Module, keep_packed: bool = False) -> int:
    """QuantLinear.tile_for_decode on every 'packed' layer whose shape and bits allow it (the others
    keep the packed path), and one decode GEMM for each set of siblings that read the same input (q/k/v,
    gate/up: nn.shared_input), with silu(gate) * up in the gate/up GEMM of a transformers Llama-family MLP
    (nn.shared_input.fuse_swiglu); returns how many layers were tiled. The tiled codes become each layer's
    storage (its `packed` buffer dropped: one copy of the codes) unless `keep_packed`."""
    layers = [layer for _, layer in quant_layers(model) if layer.mode == "packed" and layer._tileable]
    # A block's experts, where they stack, decode as stacks (nn.expert_decode) instead of a gate/up group an
    # expert: their layers tiled (and only tiled) first, then stacked.
    expert_lists = [m for m in model.modules() if isinstance(m, ExpertList)]
    stacked = set()
    if not keep_packed:
        for experts in expert_lists:
            members = [layer for expert in experts for layer in expert.children() if isinstance(layer, QuantLinear)]
            if members and all(layer.mode == "packed" and layer._tileable for layer in members):
                for layer in members:
                    if layer.holds_packed:
                        layer.drop_packed()  # (tiled first where it is not current)
                if experts.stack_for_decode():
                    stacked.update(experts)
    # Groups next: their members' tiled codes become views of the group's, and only the group's
    # shape is timed (a member's own shape would be tuned for a path it does not take).
    for group in [group for parent in list(model.modules()) if parent not in stacked for group in share_inputs(parent)]:
        group.tune()
    for layer in layers:
        if getattr(layer, "_shared_input", None) is None:  # (a stacked expert's: tuned only, its shape once)
            layer.tile_for_decode(keep_packed=keep_packed)
        elif not keep_packed and layer.holds_packed:
            layer.drop_packed()  # its tiled codes are a view of its group's
    return len(layers)
