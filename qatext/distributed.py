"""Every recipe under torch.distributed, launched with torchrun: DDP or FSDP2 (`fully_shard`).

`init_from_env()` joins the process group torchrun describes (NCCL on GPUs, gloo on CPU).
`wrap()` prepares a model for `train()`:
- DDP wraps the model itself (parameters stay where they are; gradients are averaged).
- FSDP2 shards a structural copy of it, decoder layer by decoder layer: trainable and frozen
  parameters are sharded along dim 0 (rows), so a quantization group, which runs along the
  in-features, never straddles a shard. The quantized layers' frozen per-row buffers (packed codes,
  LR-QAT's P, zero points, frozen scales), the bulk of a quantized model's bytes, become frozen
  parameters of the copy, so they are sharded and gathered with their layer too.
  The kernels see full tensors: FSDP all-gathers a layer's parameters before its forward (and again
  for the recomputation of checkpointed layers). What trains is kept as fp32 masters in the shards. The original model's parameters give up their
  memory while the copy trains and get the trained full tensors back in `finish()`, so merge and
  export after training work on a plain model on every rank.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def init_from_env() -> bool:
    """Join the process group torchrun set up (WORLD_SIZE > 1); returns whether one is active."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global batch (all ranks draw the same global batch)."""
    world = world_size()
    if world == 1:
        return batch
    if len(batch) % world:
        raise ValueError(f"the global batch size ({len(batch)}) must be divisible by the number of ranks ({world})")
    per = len(batch) // world
    return batch[rank() * per:(rank() + 1) * per]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (the global batch's loss from each rank's share)."""
    if not active():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


# FSDP2 (torch 2.11) makes every shard an nn.Parameter that may require grad, which an integer dtype
# cannot: integer buffers travel as fp16 over the same bytes (a view, never a conversion; gloo has no
# 1-byte float), and FSDP and the collectives only copy them.
_CARRIER = torch.float16


def in_own_dtype(module: nn.Module, attr: str) -> torch.Tensor:
    """module's tensor `attr` in its own dtype, read without calling the module (whose forward pre-hook would
    install the view): an integer buffer that FSDP2 carries as an fp16 parameter viewed back. Read from the
    module's dicts: nn.Module.__getattr__ costs ~1 us, and a block of 128 experts reads thousands a forward."""
    dtype = module.__dict__.get("_integer_parameters", {}).get(attr)
    if dtype is not None:
        return module._parameters[attr].view(dtype)
    tensor = module._parameters.get(attr)
    if tensor is None:
        tensor = module._buffers.get(attr)
    return getattr(module, attr) if tensor is None else tensor


def _own_dtype_views(module: nn.Module, _args) -> None:
    """Forward pre-hook: the layer reads its integer parameters in their own dtype."""
    for attr in module._integer_parameters:
        module.__dict__[attr] = in_own_dtype(module, attr)


def _drop_own_dtype_views(module: nn.Module, _args, _out) -> None:
    for attr in module._integer_parameters:
        module.__dict__.pop(attr, None)


def _buffers_to_frozen_parameters(work: nn.Module, model: nn.Module) -> list[str]:
    """In `work` (a shallow copy of `model`), re-register every QuantLinear's per-row buffers as
    frozen parameters over the same storage, so that FSDP shards them; returns their names in
    `model`."""
    from .nn import QuantLinear

    names = {id(b): n for n, b in model.named_buffers()}
    moved = []
    for module in work.modules():
        if not isinstance(module, QuantLinear):
            continue
        module._integer_parameters = {}
        for attr, buf in list(module._buffers.items()):
            if (buf is None or attr in module._non_persistent_buffers_set or buf.dim() != 2
                    or buf.shape[0] != module.out_features or id(buf) not in names
                    or (buf.shape[1] * buf.element_size()) % _CARRIER.itemsize):
                continue  # (rows of an odd number of bytes stay replicated buffers)
            del module._buffers[attr]
            moved.append(names[id(buf)])
            if not buf.is_floating_point():
                module._integer_parameters[attr] = buf.dtype
                buf = buf.view(_CARRIER)
            module.register_parameter(attr, nn.Parameter(buf, requires_grad=False))
        if module._integer_parameters:
            module.register_forward_pre_hook(_own_dtype_views)
            module.register_forward_hook(_drop_own_dtype_views)
    return moved


def _free(tensors) -> None:
    for t in tensors:
        t.data = torch.empty(0, device=t.device, dtype=t.dtype)


def _shallow_copy(model: nn.Module) -> nn.Module:
    """A copy of the module structure of `model` whose parameters are new Parameter objects over the
    same storage and whose buffers (persistent or not) are the same tensors: no memory is copied."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b
    return copy.deepcopy(model, memo)


class Wrapped:
    """A model prepared for distributed training: call `module`, optimise `param_groups`, then
    `finish()` to put the trained full weights back into the original model."""

    def __init__(self, model: nn.Module, strategy: str, param_groups: list[dict]):
        from torch.nn.parallel import DistributedDataParallel as DDP

        if strategy not in STRATEGIES:
            raise ValueError(f"distributed strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.model, self.strategy = model, strategy
        device = next(model.parameters()).device
        if strategy == "ddp":
            self.module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
            self.param_groups = param_groups
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from .models import decoder_layers

        names = {id(p): n for n, p in model.named_parameters()}
        work = _shallow_copy(model)
        self.sharded_buffers = _buffers_to_frozen_parameters(work, model)
        mesh = init_device_mesh(device.type, (world_size(),))
        # FSDP wants one dtype for a layer's trainable parameters, and QuantLinear trains fp32 scales
        # beside 16-bit LoRA factors (or weights): the shards keep fp32 masters of what trains. No
        # compute-dtype cast: every parameter is gathered in its own dtype (scales stay fp32, as in
        # one process) and QuantLinear casts weights and factors to the activations' dtype itself.
        for p in work.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        # The shards hold the values once a unit is sharded: free the full copies unit by unit, so
        # that setting up never holds the whole model twice.
        full = {**dict(model.named_parameters()), **{n: model.get_buffer(n) for n in self.sharded_buffers}}
        layer_names = {id(m): n for n, m in work.named_modules()}
        for layer in decoder_layers(work):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
            _free([t for n, t in full.items() if n.startswith(layer_names[id(layer)] + ".")])
        fully_shard(work, mesh=mesh, mp_policy=policy)
        _free(full.values())
        params = dict(work.named_parameters())
        self.module = work
        self.param_groups = [{**g, "params": [params[names[id(p)]] for p in g["params"]]} for g in param_groups]

    def finish(self) -> nn.Module:
        """Gather the trained weights into the original model on every rank; returns it. Tensor by
        tensor, each shard freed once gathered, so the peak is the full model plus one tensor; the
        sharded copy is unusable afterwards."""
        if self.strategy == "fsdp":
            from torch.distributed.tensor import DTensor

            targets = {**dict(self.model.named_parameters()),
                       **{n: self.model.get_buffer(n) for n in self.sharded_buffers}}
            with torch.no_grad():
                for name, p in self.module.named_parameters():
                    target = targets[name]
                    full = p.detach()
                    if isinstance(p, DTensor):
                        full = p.full_tensor()
                        p.to_local().untyped_storage().resize_(0)
                        p.grad = None
                    # integer codes came as carriers over their bytes: a view, not a conversion
                    target.data = (full.to(target.device, target.dtype) if target.is_floating_point()
                                   else full.to(target.device).view(target.dtype))
            barrier()  # every rank is done with the gathers before the caller may tear the group down
        return self.model


def save_checkpoint(directory, module: nn.Module, opt, extra: dict) -> None:
    """Sharded checkpoint (torch.distributed.checkpoint) of model and optimiser, plus `extra` (loop
    state, the same on every rank) written by rank 0; published by one rename, so an interrupted
    save leaves the previous checkpoint whole."""
    import shutil
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(directory) / "dcp"
    tmp = Path(directory) / "dcp.tmp"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_sd, optim_sd = get_state_dict(module, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    barrier()
    if is_main():
        torch.save(extra, tmp / "loop.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()


def load_checkpoint(directory, module: nn.Module, opt) -> dict | None:
    """Restore what save_checkpoint wrote; returns its `extra`, or None where there is none."""
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    final = Path(directory) / "dcp"
    if not (final / "loop.pt").exists():
        return None
    model_sd, optim_sd = get_state_dict(module, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(final))
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    from .train import load_checkpoint_file

    return load_checkpoint_file(final / "loop.pt")
