"""A block's packed experts decoding on one kernel launch a projection (ops.grouped_matmul_tiled).

At decode a token picks a few of many experts (8 of 128 in Qwen3-30B-A3B). Building every expert's weight
for a grouped GEMM reads all of them; a loop over the chosen experts reads only theirs but launches a few
kernels an expert and reads the token counts on the host. Here each projection is one decode-kernel launch
over the experts' stacked tiled codes, each token tile one expert's rows: only the chosen experts' bytes
are read and nothing on the host, so CUDA graphs can hold the block. Gate and up are stacked together, each
expert's gate rows then its up rows, so silu(gate) * up is the GEMM's epilogue where the experts' act_fn is
SiLU.

The stacks are the experts' storage: each layer's tiled codes, scale and zero become views of them (no second
copy), and the stacks are non-persistent buffers of the ExpertList, so state dicts and checkpoints are
unchanged (a layer's state dict copies its views out: see PackedLinear._save_to_state_dict).
"""

from __future__ import annotations

import torch

from .. import ops
from .grouped_experts import grouped_mm, route, same_kind
from .shared_input import _swiglu_mlp_forward

# (stack name, the projections stacked in it: each expert's rows of them in turn)
STACKS = (("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",)))
TENSORS = ("tiled", "scale", "zero")


def stackable(experts) -> bool:
    """Whether these experts (ExpertMLP) can decode as stacks: every projection packed, tiled only (after
    tile_for_decode), no bias, no activation fake-quant, gate and up alike, one spec and shape a projection."""
    if len(experts) < 2:
        return False
    gate, up, down = ([getattr(e, name) for e in experts] for name in ("gate_proj", "up_proj", "down_proj"))
    layers = gate + up + down
    return (all(getattr(l, "mode", None) == "packed" and l._tileable and not l.holds_packed for l in layers)
            and same_kind(gate + up) and same_kind(down) and gate[0].spec == down[0].spec)


def _layers(experts, names):
    return [getattr(e, name) for e in experts for name in names]


def _release_shared_input(expert) -> None:
    """An expert's own gate/up group (nn.shared_input), replaced by the stacks: its members' views are re-pointed
    by the caller; the group and its SwiGLU forward go."""
    for name in ("gate_proj", "up_proj"):
        layer = getattr(expert, name)
        shared = getattr(layer, "_shared_input", None)
        if shared is not None:
            layer._shared_input = None
            layer._decode_crossover = None
    if "decode_gate_up" in expert._modules:
        del expert._modules["decode_gate_up"]
    forward = expert.__dict__.get("forward")
    if forward is not None and getattr(forward, "func", None) is _swiglu_mlp_forward:
        del expert.__dict__["forward"]


@torch.no_grad()
def build(experts, owner) -> None:
    """Stack the experts' current tiled codes, scales and zeros into `owner`'s non-persistent buffers
    (decode_<stack>_<tensor>) and make each layer's tensors views of them."""
    for expert in experts:
        _release_shared_input(expert)
    for stack, names in STACKS:
        layers = _layers(experts, names)
        for tensor in TENSORS:
            parts = [layer.tiled if tensor == "tiled" else layer._scale() if tensor == "scale" else layer.zero
                     for layer in layers]
            whole = torch.cat(parts)
            owner.register_buffer(f"decode_{stack}_{tensor}", whole, persistent=False)
            for layer, view in zip(layers, whole.split([p.shape[0] for p in parts])):
                layer.register_buffer(tensor, view, persistent=tensor != "tiled")


def drop(owner) -> None:
    """Remove owner's stacks (its experts' layers keep their views, and with them what they use)."""
    for stack, _ in STACKS:
        for tensor in TENSORS:
            owner._buffers.pop(f"decode_{stack}_{tensor}", None)


def current(experts, owner) -> bool:
    """Whether owner's stacks are still the experts' storage: the first and last layer of each stack still
    views of them (a move or cast replaces every layer's tensors, and the stack's own apart)."""
    for stack, names in STACKS:
        for tensor in TENSORS:
            whole = owner._buffers.get(f"decode_{stack}_{tensor}")
            if whole is None:
                return False
            first, last = getattr(experts[0], names[0]), getattr(experts[-1], names[-1])
            start, end = whole.data_ptr(), whole.data_ptr() + whole.nbytes
            for layer in (first, last):
                t = layer._buffers.get(tensor)
                if t is None or not start <= t.data_ptr() < end or t.dtype != whole.dtype:
                    return False
    return True


def tune(experts, owner) -> None:
    """Time the decode kernel's variants for one expert's gate/up and down shapes (ops.tune_decode_gemm; the
    grouped launch takes the variant tuned for its expert shape)."""
    for stack, names in STACKS:
        first = getattr(experts[0], names[0])
        rows = len(names) * first.out_features
        tiled, scale, zero = (getattr(owner, f"decode_{stack}_{t}")[:rows] for t in TENSORS)
        if tiled.is_cuda:
            ops.tune_decode_gemm(tiled, scale, zero, first.spec.bits, first.group_size, first.in_features)


def decode_experts(owner, experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The block's output from the stacks: the token-expert pairs sorted by expert (grouped_experts.route), then
    gate/up (SwiGLU in the epilogue where act_fn is SiLU) and down, one launch each."""
    gate, down = experts[0].gate_proj, experts[0].down_proj
    bits, g = gate.spec.bits, gate.group_size
    order, offs, pair_tokens, _ = route(top_k_index, len(experts))
    x = hidden_states[pair_tokens]  # (rows past offs[-1], routed past the list, are never read: outputs zeros)
    (gate_up, down_stack) = _stacks(owner)
    act_fn = experts[0].act_fn
    if type(act_fn).__name__ in ("SiLU", "SiLUActivation"):
        h = ops.grouped_matmul_tiled(x, offs, *gate_up, bits, g, True)
    else:
        gu = ops.grouped_matmul_tiled(x, offs, *gate_up, bits, g, False).unflatten(-1, (2, -1))
        h = act_fn(gu[:, 0]) * gu[:, 1]
    y = ops.grouped_matmul_tiled(h, offs, *down_stack, down.spec.bits, down.group_size, False)
    return _combine(y, order, top_k_index, top_k_weights, hidden_states.dtype)


def prefill_experts(owner, experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The block's output from the stacks as two grouped GEMMs (more pairs an expert than the decode kernel
    takes): each stack dequantised whole by one op, as nn.grouped_experts would after joining the layers' codes
    (a copy of every expert's codes and a Python call a layer, which the stacks save)."""
    gate, down = experts[0].gate_proj, experts[0].down_proj
    order, offs, pair_tokens, routed = route(top_k_index, len(experts))
    x = torch.where(routed, hidden_states[pair_tokens], 0)
    gate_up, down_stack = _stacks(owner)
    w = ops.dequant_tiled(*gate_up, gate.spec.bits, gate.group_size, gate.in_features, x.dtype)
    g, u = grouped_mm(x, w.view(len(experts), -1, gate.in_features).mT, offs).chunk(2, dim=-1)
    w = ops.dequant_tiled(*down_stack, down.spec.bits, down.group_size, down.in_features, x.dtype)
    y = grouped_mm(experts[0].act_fn(g) * u, w.view(len(experts), -1, down.in_features).mT, offs)
    # (rows past offs[-1] are left unwritten by the grouped GEMMs: zeros for them)
    return _combine(torch.where(routed, y, 0), order, top_k_index, top_k_weights, hidden_states.dtype)


def _stacks(owner):
    """((tiled, scale, zero) of gate/up, the same of down) from owner's buffers."""
    return [tuple(owner._buffers[f"decode_{stack}_{t}"] for t in TENSORS) for stack, _ in STACKS]


def _combine(y, order, top_k_index, top_k_weights, dtype) -> torch.Tensor:
    """Each token's k expert outputs (y, rows in sorted pair order) back in (token, slot) order, weighed and
    summed in fp32 in slot order, rounded once to dtype: deterministic, where index_add_'s atomics add them in any
    order (a compiled step then decoded another token than the eager one)."""
    pairs = torch.empty_like(y)
    pairs[order] = y
    tokens, k = top_k_index.shape
    weighed = pairs.view(tokens, k, -1).float() * top_k_weights.float()[..., None]
    return weighed.sum(1).to(dtype)
