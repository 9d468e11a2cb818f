"""One training loop for every method: AdamW with parameter groups, warmup + linear / cosine /
constant schedules, gradient clipping, tqdm progress, and checkpoints that resume exactly."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed as dist
from . import local_shards, models
from .knobs import tuning
from .data import random_batch
from .evaluate import causal_lm_loss

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 2048
    schedule: str = "linear"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine / linear decay to lr * min_lr_ratio
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    clip: float | None = 1.0
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # 0: only at the end
    progress: bool = True
    distributed: str = "ddp"  # under torchrun: 'ddp' or 'fsdp' (FSDP2); ignored in one process
    activation_checkpointing: bool = False  # decoder layers recompute their activations in backward
    compile: bool = False  # decoder layers run as torch.compile'd graphs (models.compiled_layers)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"TrainConfig: steps >= 0, batch_size >= 1, seq_len >= 1 expected, got {self}")
        if self.distributed not in dist.STRATEGIES:
            raise ValueError(f"TrainConfig: distributed must be one of {dist.STRATEGIES}, got {self.distributed!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig: schedule must be one of {SCHEDULES}, got {self.schedule!r}")


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, progress)
        shape = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return factor


class LossNotFinite(RuntimeError):
    """The loss became NaN or infinite; the step's update was not applied."""


def save_checkpoint_file(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint_file(path: Path, map_location=None):
    """torch.load without unpickling arbitrary objects (tensors, containers and numbers only): a file
    crafted to run code on load, a truncated or a foreign file is refused with one line."""
    import pickle

    fix = "delete it, or rerun with --restart to start over"
    if Path(path).stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (a crash while it was written?); {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # the weights-only unpickler met a class or function to import
            raise ValueError(f"checkpoint {path} holds objects other than tensors, numbers and containers, and "
                             f"loading it could run code: refused; {fix}") from None
        raise ValueError(f"checkpoint {path} is truncated or not a torch checkpoint (UnpicklingError); {fix}") from None
    except Exception as e:  # noqa: BLE001 (zip, pickle and torch raise many types; all mean the same here)
        raise ValueError(f"checkpoint {path} is truncated or not a torch checkpoint ({type(e).__name__}); {fix}") from None


def train(model, param_groups: list[dict], tokens: torch.Tensor, cfg: TrainConfig, loss_fn=None,
          desc: str = "train") -> list[float]:
    """Train `model` on random windows of `tokens`; returns the loss of every step.

    param_groups: AdamW groups ({"params": [...], "lr": ...}); every other parameter should have
    requires_grad False. With cfg.checkpoint_dir set, the run resumes from its last checkpoint and
    continues with the same batches and the same loss curve. Under torchrun (see
    qatext.distributed) every rank draws the same global batch of cfg.batch_size windows and trains
    on its share, with DDP or FSDP2 (cfg.distributed); the loss curve is the one-process curve.
    """
    params = [p for g in param_groups for p in g["params"]]
    if not params:
        raise ValueError(f"{desc}: nothing to train (no parameters in param_groups)")
    loss_fn = loss_fn or causal_lm_loss
    device = params[0].device
    wrapped = dist.Wrapped(model, cfg.distributed, param_groups) if dist.active() else None
    module = wrapped.module if wrapped else model
    param_groups = wrapped.param_groups if wrapped else param_groups
    params = [p for g in param_groups for p in g["params"]]
    opt = local_shards.adamw(param_groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    start = 0
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None

    def loop_state(step):
        return {"scheduler": sched.state_dict(), "generator": gen.get_state(), "history": history, "step": step,
                "config": asdict(cfg)}

    def restore(state):
        nonlocal history, start
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        history, start = state["history"], state["step"]

    if ckpt_dir is not None and wrapped:
        if (state := dist.load_checkpoint(ckpt_dir, module, opt)) is not None:
            restore(state)
    elif ckpt_dir is not None and (ckpt_dir / "last.pt").exists():
        state = load_checkpoint_file(ckpt_dir / "last.pt", map_location=device)
        if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= state.keys():
            raise ValueError(f"checkpoint {ckpt_dir / 'last.pt'} is not a qatext training checkpoint; delete it, "
                             "or rerun with --restart to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        restore(state)

    if start and cfg.progress and dist.is_main():
        tqdm.write(f"{desc}: resuming at step {start} of {cfg.steps} from {ckpt_dir}")

    def save(step):
        if ckpt_dir is None:
            return
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if wrapped:
            dist.save_checkpoint(ckpt_dir, module, opt, loop_state(step))
        else:
            save_checkpoint_file({"model": model.state_dict(), "optimizer": opt.state_dict(), **loop_state(step)},
                         ckpt_dir / "last.pt")

    module.train()
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not (cfg.progress and dist.is_main()), initial=start,
               total=cfg.steps)
    tokens_seen, t0 = 0, time.perf_counter()
    # The per-op value checks (scale > 0 and finite) each read a value back from the GPU, so they
    # would serialise host and device on every layer; the modules keep scales positive themselves
    # and the loss is checked for finiteness once a step instead.
    recompute = models.checkpointed_layers(module) if cfg.activation_checkpointing else contextlib.nullcontext()
    compiled = models.compiled_layers(module) if cfg.compile else contextlib.nullcontext()
    with tuning(value_checks=False), compiled, recompute:  # recomputation runs the compiled layers
        for step in bar:
            batch = dist.local_rows(random_batch(tokens, cfg.batch_size, cfg.seq_len, gen)).to(device)
            loss = loss_fn(module, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # One host-device sync a step, after backward is queued (the host runs ahead through
            # forward and backward); the global loss, so every rank stops together on a NaN.
            value = dist.mean_over_ranks(loss).item()
            if not math.isfinite(value):
                raise LossNotFinite(f"{desc}: loss became {value} at step {step} (lr {sched.get_last_lr()[0]:.2e}); "
                                    "lower the learning rate")
            if cfg.clip:
                local_shards.clip_grad_norm(params, cfg.clip)
            local_shards.adamw_step(opt)
            sched.step()
            history.append(value)
            tokens_seen += (batch.numel() - len(batch)) * dist.world_size()
            bar.set_postfix(loss=f"{history[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                            tok_s=f"{tokens_seen / (time.perf_counter() - t0):.0f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save(step + 1)
    save(cfg.steps)
    if wrapped:
        opt.state.clear()  # the sharded moments are not needed by the gathered model: room for it
        wrapped.finish()
    return history
