"""EfficientQAT (Chen et al. 2024): Block-AP, then E2E-QP.

Block-AP trains, block by block, every weight, scale and zero of the block to reproduce the
full-precision block's output (MSE); its inputs come from the blocks already quantized. Paper
defaults: quant_lr 1e-4, weight_lr 1e-5 (2e-5 at 2 bits), cosine to lr / 20, 2 epochs over the
calibration windows. E2E-QP then freezes the integer codes and zeros and trains only the step
sizes end to end (AdamW, cosine schedule).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from .. import distributed as dist
from .. import local_shards
from ..data import random_batch
from ..models import convert_layers, decoder_layers, quant_layers, quantize_model
from ..quant import QuantSpec
from ..train import TrainConfig, save_checkpoint_file, load_checkpoint_file, train
from .common import TrainDefaults, freeze, layer_params

TRAIN_DEFAULTS = TrainDefaults(schedule="cosine", clip=1.0)


class _StopForward(Exception):
    pass


def _capture_block_inputs(model, blocks, batches):
    """Hidden states entering the first block, and the keyword arguments blocks are called with."""
    hidden, kwargs = [], {}

    def hook(_module, args, kw):
        hidden.append(args[0].detach() if args else kw.pop("hidden_states").detach())
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return hidden, kwargs


def _run_block(block, h, kwargs):
    out = block(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_ap(model, spec: QuantSpec, tokens, n_samples: int = 128, seq_len: int = 2048, batch_size: int = 2,
             epochs: int = 2, quant_lr: float = 1e-4, weight_lr: float | None = None, init: str = "minmax",
             target_modules=None, seed: int = 0, progress: bool = True, checkpoint_dir=None):
    """Quantize `model` block by block; returns it with every block merged to frozen integer codes.

    With checkpoint_dir, each finished block is saved (with the two streams of calibration activations
    that the next block starts from, n_samples x seq_len x hidden x 2 tensors) to block_ap.pt, and a
    rerun resumes after the last finished block with the same result."""
    weight_lr = weight_lr if weight_lr is not None else (2e-5 if spec.bits == 2 else 1e-5)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n_batches = max(1, n_samples // batch_size)
    # Under torchrun each rank takes its rows of every calibration batch and DDP averages the block's
    # gradients: the same steps as one process, the work divided.
    batches = [dist.local_rows(random_batch(tokens, batch_size, seq_len - 1, gen)).to(device)
               for _ in range(n_batches)]
    blocks = decoder_layers(model)
    fp_in, kwargs = _capture_block_inputs(model, blocks, batches)
    q_in = [h.clone() for h in fp_in]
    freeze(model)
    steps = epochs * n_batches
    ckpt = Path(checkpoint_dir) / "block_ap.pt" if checkpoint_dir else None
    done = 0
    if ckpt is not None and ckpt.exists():
        state = load_checkpoint_file(ckpt, map_location=device)
        done, fp_in, q_in = state["done"], state["fp_in"], state["q_in"]
        for block, block_state in zip(blocks, state["blocks"]):
            quantize_model(_BlockHolder(block), spec, method="packed", init=init, target_modules=target_modules)
            block.load_state_dict(block_state)
    for i in tqdm(range(done, len(blocks)), desc=f"Block-AP W{spec.bits}", initial=done, total=len(blocks),
                  disable=not (progress and dist.is_main())):
        block = blocks[i]
        fp_block = copy.deepcopy(block)
        with torch.no_grad():
            fp_out = [_run_block(fp_block, h, kwargs) for h in fp_in]
        quantize_model(_BlockHolder(block), spec, method="fake", init=init, target_modules=target_modules)
        weights = layer_params(block, ("weight",))
        qparams = layer_params(block, ("scale", "zero"))
        opt = local_shards.adamw([{"params": weights, "lr": weight_lr}, {"params": qparams, "lr": quant_lr}],
                                 weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 1 / 20 + (1 - 1 / 20) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
        block.train()
        trained = DDP(block, device_ids=[device.index] if device.type == "cuda" else None) if dist.active() else block
        for step in range(steps):
            j = step % n_batches
            loss = F.mse_loss(_run_block(trained, q_in[j], kwargs).float(), fp_out[j].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        for p in weights + qparams:
            p.requires_grad_(False)
        convert_layers(block, "packed")
        with torch.no_grad():
            q_in = [_run_block(block, h, kwargs) for h in q_in]
        fp_in = fp_out
        del fp_block
        if ckpt is not None and dist.is_main():
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint_file({"done": i + 1, "fp_in": fp_in, "q_in": q_in,
                          "blocks": [b.state_dict() for b in blocks[:i + 1]]}, ckpt)
    return model


class _BlockHolder(torch.nn.Module):
    """Lets quantize_model treat one decoder block as a model with a one-block list."""

    def __init__(self, block):
        super().__init__()
        self.layers = torch.nn.ModuleList([block])


def e2e_qp(model, tokens, cfg: TrainConfig, lr: float = 2e-5):
    """Train only the step sizes of an integer model end to end (codes and zeros frozen)."""
    if not quant_layers(model):
        raise ValueError("e2e_qp: the model has no quantized layers (run block_ap or rtn first)")
    freeze(model)
    convert_layers(model, "e2eqp")
    groups = [{"params": layer_params(model, ("scale",)), "lr": lr}]
    bits = quant_layers(model)[0][1].spec.bits
    return model, train(model, groups, tokens, cfg, desc=f"E2E-QP W{bits}")


def efficientqat(model, spec: QuantSpec, tokens, cfg: TrainConfig, e2e_lr: float = 2e-5, block_ap_kwargs=None):
    """Block-AP followed by E2E-QP."""
    block_ap(model, spec, tokens, **{"seq_len": cfg.seq_len, "progress": cfg.progress,
                                     "checkpoint_dir": cfg.checkpoint_dir, **(block_ap_kwargs or {})})
    return e2e_qp(model, tokens, cfg, lr=e2e_lr)
