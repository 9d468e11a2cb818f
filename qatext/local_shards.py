"""AdamW steps and gradient clipping on FSDP2's local shards.

`torch.optim.AdamW.step()` and `clip_grad_norm_` over DTensor parameters dispatch every foreach
kernel through DTensor's sharding propagation, parameter by parameter: on a 7B-shaped LR-QAT model
(~700 trainable tensors) that was ~0.3 s of host time per step, as long as the GPU work itself.
Every element of a row-sharded parameter lives on exactly one rank, so the update is elementwise on
the local shards, and the squared gradient norm is the sum of the local ones over ranks. The
optimizer keeps its state as DTensors (the state dict, and so distributed checkpoints, are
unchanged); only the arithmetic runs on their local tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as adamw_functional


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def _row_sharded(tensors) -> bool:
    """Whether every tensor is a DTensor sharded over a 1-D mesh (each element on exactly one rank)."""
    dtensor = _dtensor_type()
    return bool(tensors) and dtensor is not None and all(
        isinstance(t, dtensor) and t.device_mesh.ndim == 1 and all(pl.is_shard() for pl in t.placements)
        for t in tensors)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def adamw(param_groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """AdamW as transformers' Trainer builds it on torch >= 2.8: fused (one kernel a step, no intermediate
    tensors) where every parameter is a floating-point CUDA tensor outside FSDP2's shards. The foreach
    implementation it replaces holds a temporary as large as the exponential averages (13.5 GB for a 7B
    bf16 model's full fine-tune) and passes over the state about twice as often. FSDP2's shards keep the
    foreach step on their local tensors (adamw_step); CPU parameters keep torch's default."""
    params = [p for g in param_groups for p in g["params"]]
    dtensor = _dtensor_type()
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() and not (dtensor and isinstance(p, dtensor))
                                 for p in params)
    return torch.optim.AdamW(param_groups, fused=fused or None, **kwargs)


@torch.no_grad()
def adamw_step(opt: torch.optim.Optimizer) -> None:
    """opt.step() for an AdamW over row-sharded DTensor parameters, computed on the local shards;
    any other optimizer or parameter layout takes opt.step()."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if type(opt) is not torch.optim.AdamW or not _row_sharded(params) or any(
            g.get("amsgrad") or g.get("maximize") or g.get("capturable") or g.get("differentiable") or g.get("fused")
            for g in opt.param_groups):
        opt.step()
        return
    for group in opt.param_groups:
        ps, grads, avgs, sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state[p]
            if not state:  # as AdamW initialises it: the state dict keeps its usual form
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ps.append(_local(p))
            grads.append(_local(p.grad))
            avgs.append(_local(state["exp_avg"]))
            sqs.append(_local(state["exp_avg_sq"]))
            steps.append(state["step"])
        if not ps:
            continue
        beta1, beta2 = group["betas"]
        adamw_functional(ps, grads, avgs, sqs, [], steps, foreach=group.get("foreach") is not False,
                         amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                         weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def _by_device_and_dtype(tensors) -> list[list[torch.Tensor]]:
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2), also on the local shards of row-sharded DTensor gradients.

    The clip coefficient is cast to each gradient dtype before the foreach multiply: torch multiplies
    bf16 gradients by an fp32 coefficient (the norm of a model whose parameters mix bf16 and fp32) one
    tensor at a time, through its slow elementwise path (+20 ms a 7B full-QAT step on an H200)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    sharded = _row_sharded([p.grad for p in params])
    dtensor = _dtensor_type()
    if not sharded and dtensor is not None and any(isinstance(p.grad, dtensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)  # other layouts: DTensor's own reductions
    grads = [_local(p.grad) for p in params]
    nonempty = [g for g in grads if g.numel()]  # a small parameter may have no rows on this rank
    sq = torch.zeros((), device=grads[0].device, dtype=torch.float32)
    for group in _by_device_and_dtype(nonempty):
        sq = sq + torch.stack(torch._foreach_norm(group, 2, dtype=torch.float32)).square().sum().to(sq.device)
    if sharded:
        dist.all_reduce(sq, group=params[0].grad.device_mesh.get_group())
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for group in _by_device_and_dtype(grads):
        torch._foreach_mul_(group, coef.to(group[0].device, group[0].dtype))
    return total
