"""A mixture of experts as one gate / up / down nn.Linear trio an expert, so that qatext quantizes,
trains, merges and saves the experts as it does any linear layer.

transformers (5.x) holds a decoder block's routed experts as two stacked tensors, gate_up_proj
[experts, 2 * inter, hidden] and down_proj [experts, hidden, inter] (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V3, ...). `ExpertList` is the same computation on per-expert modules named as the hub's
per-expert checkpoints name them (`mlp.experts.{e}.gate_proj`), as transformers' own
SequentialMiniCPM5MoeExperts does for AWQ checkpoints. Other layouts (transposed, interleaved or biased
experts: Llama 4, GPT-OSS) are left fused and named by `models.check_no_fused_experts`.
"""

from __future__ import annotations

import torch
from torch import nn

from . import expert_decode
from .grouped_experts import grouped_experts, grouped_mm_serves, same_kind

EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")


class _CountsLayouts(nn.Module):
    """A module whose submodules set (replaced by a merge, a conversion, a load) move ExpertList.layouts."""

    def __setattr__(self, name, value):
        if isinstance(value, nn.Module):
            ExpertList.layouts += 1
        super().__setattr__(name, value)


class ExpertMLP(_CountsLayouts):
    """One expert: down_proj(act_fn(gate_proj(x)) * up_proj(x))."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    # Written as transformers' LlamaMLP.forward is, to the bytecode, so that a packed expert's gate/up
    # decode GEMM takes SwiGLU as its epilogue (nn.shared_input.is_swiglu_mlp) as a dense MLP's does.
    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class ExpertList(_CountsLayouts, nn.ModuleList):
    """transformers' stacked experts as a list of ExpertMLP, called as they are: (hidden_states [tokens,
    hidden], top_k_index [tokens, k], top_k_weights [tokens, k]) -> [tokens, hidden], each token's
    experts' outputs scaled by its routing weights and summed. Expert ids past the list (transformers'
    expert-parallel sentinels) are skipped. Where torch's grouped GEMM serves the input and each projection is one
    kind over the experts, every projection runs as one grouped GEMM over its experts' stacked weights
    (nn.grouped_experts); otherwise the experts run one after another, each on its tokens gathered into one
    contiguous run.

    In distributed training every trainable parameter of an expert no token chose enters the graph at
    zero weight (the grouped GEMMs' stacks hold them all; the loop adds them at zero): each rank then has a
    gradient (zeros) for every parameter, as DDP's and FSDP2's reductions need (ranks route differently; a
    missing gradient on one rank fails the step)."""

    # True / False: the experts always / never as grouped GEMMs (where they apply). None: grouped wherever a
    # gradient is taken (takes_grouped) and, without one (inference), from GROUPED_PAIRS token-expert pairs an
    # expert: below, the loop's decode kernels over the few chosen experts beat building every expert's weight
    # (H200, W4, 128 experts: loop 0.66x grouped's time at 64 pairs, grouped 0.77x the loop's at 1024).
    grouped: bool | None = None
    GROUPED_PAIRS = 4
    # With grouped None, inference on packed experts tiled for decode (models.tile_for_decode) on a GPU: up to
    # GROUPED_DECODE_PAIRS pairs an expert, one decode-kernel launch a projection over the chosen experts
    # (nn.expert_decode), the loop's reads without its launches and host sync.
    GROUPED_DECODE_PAIRS = 16
    # Counts the layers set on any ExpertList or ExpertMLP (_CountsLayouts): `groups` checks the experts' kinds
    # again only after it moved, not every forward (~0.2 ms a block of 128).
    layouts: int = 0

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # The grouped decode reads nothing on the host: torch.compile traces it (and CUDA graphs hold it).
        if self.decodes(hidden_states, top_k_index):
            return expert_decode.decode_experts(self, list(self), hidden_states, top_k_index, top_k_weights)
        return self._eager_forward(hidden_states, top_k_index, top_k_weights)

    # Eager under torch.compile (a graph break around the experts, e.g. `qatext train --compile`): traced, the
    # loop's token counts, read on the host, recompiled the block at every routing until dynamo's recompile limit.
    @torch.compiler.disable
    def _eager_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.prefills(hidden_states, top_k_index):
            return expert_decode.prefill_experts(self, list(self), hidden_states, top_k_index, top_k_weights)
        if self.takes_grouped(hidden_states, top_k_index):
            _, _, projections, gate_up_fused = self._groups
            return grouped_experts(projections, self[0].act_fn, hidden_states, top_k_index, top_k_weights, gate_up_fused)
        k = top_k_index.shape[-1]
        # The (token, slot) pairs sorted by expert, stably (each expert's tokens in order, as torch.where
        # lists them), and each expert's count: one host sync a block, where a torch.where an expert is one
        # an expert. Sentinels past the list (expert parallelism) sort last and are never run.
        flat = top_k_index.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self))[:len(self)].tolist()
        tokens = order // k
        inputs, weights = hidden_states[tokens], top_k_weights.reshape(-1)[order, None]
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                outputs.append(self[expert](inputs[start:start + count]))
                start += count
        out = torch.zeros_like(hidden_states)
        if outputs:  # (the routing weights applied once to every output: the same products as an expert at a time)
            out.index_add_(0, tokens[:start], (torch.cat(outputs) * weights[:start]).to(out.dtype))
        if torch.is_grad_enabled() and torch.distributed.is_available() and torch.distributed.is_initialized():
            idle = [p.reshape(-1)[:1] for e, count in enumerate(counts) if not count
                    for p in self[e].parameters() if p.requires_grad]
            if idle:
                out = out + 0 * torch.cat(idle).sum().to(out.dtype)
        return out

    def decodes(self, x: torch.Tensor, top_k_index: torch.Tensor) -> bool:
        """Whether this forward runs on the grouped decode kernel (nn.expert_decode): grouped None, inference (no
        gradient) in 16 bits on a GPU, up to GROUPED_DECODE_PAIRS pairs an expert, every expert packed and tiled
        for decode; the experts' stacks made again first where a move or cast replaced their tensors."""
        if (self.grouped is not None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16)
                or (torch.is_grad_enabled() and x.requires_grad)
                or top_k_index.numel() > self.GROUPED_DECODE_PAIRS * len(self) or not self.stackable()):
            return False
        # (Traced by torch.compile, the stacks must be current already, as after models.tile_for_decode.)
        if not torch.compiler.is_compiling():
            self._stack_if_stale()
        return True

    def prefills(self, x: torch.Tensor, top_k_index: torch.Tensor) -> bool:
        """Whether this forward runs as grouped GEMMs over the experts' decode stacks (expert_decode.prefill_experts):
        where it would run as grouped GEMMs (takes_grouped), inference, every expert packed and tiled for decode;
        the stacks made again first where a move or cast replaced their tensors, as for decode. No gradient is
        taken through the stacks."""
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        if not (self.takes_grouped(x, top_k_index) and self.stackable()):
            return False
        self._stack_if_stale()
        return True

    def _stack_if_stale(self) -> None:
        """The experts' stacks made (again) where they are not the layers' storage: never made, or replaced
        tensor by tensor by a move or cast (which leaves a second copy of every expert until then)."""
        experts = list(self)
        if not expert_decode.current(experts, self):
            expert_decode.build(experts, self)

    def stackable(self) -> bool:
        """Whether the experts can decode as stacks (expert_decode.stackable), checked again only after a layer
        was set anywhere (ExpertList.layouts)."""
        cached = self.__dict__.get("_stackable")
        if cached is None or cached[0] != ExpertList.layouts:
            cached = self._stackable = (ExpertList.layouts, expert_decode.stackable(list(self)))
            if not cached[1]:
                expert_decode.drop(self)  # (layers replaced: stacks of the old ones would only hold memory)
        return cached[1]

    @torch.no_grad()
    def stack_for_decode(self, tune: bool = True) -> bool:
        """Stack the experts' tiled codes for the grouped decode kernel now (their storage from then on: see
        nn.expert_decode), and on a GPU, with `tune`, time the decode kernel's variants for an expert's shapes.
        Returns whether the experts are stackable (packed, tiled only, alike)."""
        experts = list(self)
        self._stackable = (ExpertList.layouts, expert_decode.stackable(experts))  # (tiling kept no stamp)
        if not self._stackable[1]:
            return False
        expert_decode.build(experts, self)
        if tune:
            expert_decode.tune(experts, self)
        return True

    def takes_grouped(self, x: torch.Tensor, top_k_index: torch.Tensor) -> bool:
        """Whether this forward runs as grouped GEMMs (see `grouped`). A gradient is taken where grad mode is on
        and x or the experts' parameters need one (the first expert's tell: the experts train alike), not for
        grad mode alone (a loop over frozen weights without no_grad)."""
        if self.grouped is False or not self.groups(x):
            return False
        gradient = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self[0].parameters()))
        return self.grouped is True or gradient or top_k_index.numel() >= self.GROUPED_PAIRS * len(self)

    def groups(self, x: torch.Tensor) -> bool:
        """Whether this forward can run as grouped GEMMs: each projection one kind over the experts, torch's grouped
        GEMM on x's device and dtype. Cached with the projections' layers (gate, up, down over the experts) and
        whether gate and up are one kind together (then one GEMM)."""
        if len(self) < 2:
            return False
        key = (ExpertList.layouts, x.device, x.dtype)
        cached = self.__dict__.get("_groups")
        if cached is None or cached[0] != key:
            gate, up, down = ([getattr(e, name) for e in self] for name in EXPERT_LINEARS)
            dims = [d for p in (gate, up, down) for d in (p[0].in_features, p[0].out_features)]
            serves = grouped_mm_serves(x, dims) and all(same_kind(p) for p in (gate, up, down))
            cached = self._groups = (key, serves, (gate, up, down), serves and same_kind(gate + up))
        return cached[1]

    @classmethod
    def from_stacked(cls, experts: nn.Module) -> ExpertList:
        """The per-expert form of a stacked module that `is_stacked_experts` accepts, on its device and
        dtype (meta stays meta: a skeleton to load into)."""
        gate_up, down = experts.gate_up_proj, experts.down_proj
        inter = down.shape[2]

        def linear(weight: torch.Tensor) -> nn.Linear:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # (no init to discard)
            # a copy, not a view: the stacked tensor is freed once the module is replaced
            layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            return layer

        return cls(ExpertMLP(linear(gate_up[e, :inter]), linear(gate_up[e, inter:]), linear(down[e]), experts.act_fn)
                   for e in range(gate_up.shape[0]))


def is_stacked_experts(module: nn.Module) -> bool:
    """Whether `module` is transformers' stacked-experts module in the layout ExpertList computes: its
    only parameters gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I], no bias, no
    transposition, no post-expert norm, the default gating act_fn(gate) * up."""
    if not isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
        return False
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # (a transformers without stacked experts)
        return False
    params = dict(module.named_parameters())
    if set(params) != {"gate_up_proj", "down_proj"}:
        return False
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    # (transformers before the post-expert norm has no such flag, and no such norm)
    flags = [getattr(module, f, None) for f in ("has_gate", "has_bias", "is_transposed", "is_concatenated")]
    return (flags == [True, False, False, True] and not getattr(module, "has_post_expert_norm", False)
            and getattr(type(module), "_apply_gate", None) is _default_apply_gate
            and isinstance(getattr(module, "act_fn", None), nn.Module) and gate_up.dim() == down.dim() == 3
            and gate_up.shape == (down.shape[0], 2 * down.shape[2], down.shape[1]))


def unfuse_experts(model: nn.Module, holding=None) -> list[str]:
    """Replace every stacked-experts module of `model` that `is_stacked_experts` accepts by its
    ExpertList (or, given `holding`, layer names, only those that hold one of them); returns the
    replaced modules' names."""
    from ..io import replace_module  # (io builds saved layers with this module)

    names = [n for n, m in model.named_modules() if is_stacked_experts(m)]
    if holding is not None:
        names = [n for n in names if any(h.startswith(n + ".") for h in holding)]
    for name in names:
        replace_module(model, name, ExpertList.from_stacked(model.get_submodule(name)))
    return names
