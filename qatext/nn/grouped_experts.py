"""A block's routed experts as grouped GEMMs: each projection's weights stacked over the experts, built
by the layers' own op in one call ([experts * N, K] is a matrix like any other to a row-wise quantizer),
then one grouped GEMM over the tokens sorted by expert, the experts' token counts as its offsets.

One projection of a block (gate and up together, where they are one kind) is then a few op calls where
`ExpertList`'s loop makes a few an expert (LR-QAT's stacked op still launches its tile kernels once an expert,
from C++), and nothing reads a count on the host: no synchronisation, so CUDA graphs can hold it. The stacked
weight lives only inside the call: backward builds it again (as lrqat_linear does a layer's), so a block's
N x K weights of every expert (GBs at Qwen3-30B-A3B) are never held for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..distributed import in_own_dtype
from .quant_linear import QuantLinear, positive

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

# The modes whose stacked weight this file builds (every one qatext has).
MODES = ("fake", "lrqat", "e2eqp", "qalora", "packed")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, K] sorted by group, w [E, K, N] -> [S, N], rows offs[e - 1]:offs[e] times w[e]; or, for a
    2-D w [S, N], the per-group products x[rows].T @ w[rows] as [E, K, N] (a weight gradient)."""
    return _grouped_mm(x, w, offs=offs)


def _aligned(x: torch.Tensor) -> int:
    """Elements of x's dtype in 16 bytes: the grouped GEMM's operand rows are whole multiples of it."""
    return 16 // x.element_size()


def grouped_mm_serves(x: torch.Tensor, dims) -> bool:
    """Whether torch's grouped GEMM takes x's device and dtype (bf16 on CUDA GPUs from sm_80, any float dtype
    on the CPU) and operands whose rows are `dims` long (each row 16-byte aligned)."""
    if _grouped_mm is None or not all(d % _aligned(x) == 0 for d in dims):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


class _StackedLinear(torch.autograd.Function):
    """grouped_mm(x, W^T) for W = make(*stacks) [E, N, K], each stack the join (torch.stack or torch.cat) of `count`
    of `tensors`, the layers' own: what backward holds is references, not stacked copies, and W is built again
    there (not held). Each stack's gradient is taken whole and handed back to the layers' tensors as views of it
    (one unbind or split a stack), not one autograd op a layer: an expert's parameters would otherwise cost a few
    host calls each, thousands a block."""

    @staticmethod
    def forward(ctx, make, join, count, x, offs, *tensors):
        ctx.make, ctx.join, ctx.count = make, join, count
        ctx.save_for_backward(x, offs, *tensors)
        with torch.no_grad():
            w = make(*_stacks(join, count, tensors))
        return grouped_mm(x, w.mT, offs)

    @staticmethod
    def backward(ctx, grad_y):
        x, offs, *tensors = ctx.saved_tensors
        count = ctx.count
        grad_y = grad_y.contiguous()
        needs = ctx.needs_input_grad[5:]
        wanted = [any(needs[i:i + count]) for i in range(0, len(tensors), count)]
        with torch.enable_grad():
            stacks = [s.requires_grad_() if want else s for s, want in zip(_stacks(ctx.join, count, tensors), wanted)]
            w = ctx.make(*stacks)
        grad_x = grouped_mm(grad_y, w.detach(), offs) if ctx.needs_input_grad[3] else None
        grads = [None] * len(tensors)
        if any(wanted):
            grad_w = grouped_mm(grad_y.mT, x, offs)  # [E, N, K]; an expert without tokens: zeros
            taken = torch.autograd.grad(w, [s for s, want in zip(stacks, wanted) if want], grad_w.to(w.dtype))
            for n, g in zip((n for n, want in enumerate(wanted) if want), taken):
                part = tensors[n * count:(n + 1) * count]
                pieces = g.unbind(0) if ctx.join is torch.stack else g.split([t.shape[0] for t in part])
                grads[n * count:(n + 1) * count] = [p if need else None for p, need in
                                                     zip(pieces, needs[n * count:(n + 1) * count])]
        return None, None, None, grad_x, None, *grads


class _Stack(torch.autograd.Function):
    """torch.stack whose backward hands each tensor its gradient by one unbind (torch.stack's takes a select a
    tensor: a host call an expert)."""

    @staticmethod
    def forward(ctx, *tensors):
        return torch.stack(tensors)

    @staticmethod
    def backward(ctx, grad):
        return grad.unbind(0)


def _stacks(join, count: int, tensors):
    """The layers' tensors joined `count` at a time: one stack a name (every layer's first, then second, ...)."""
    with torch.no_grad():
        return [join(tensors[i:i + count]) for i in range(0, len(tensors), count)]


def _dequant(codes, tiled: bool, scale, zero, layer: QuantLinear, shape, dtype) -> torch.Tensor:
    """deq(q) = (q - z) s of the stacked codes, [E, N, K] in dtype. A scale that takes a gradient (E2E-QP) gets it
    from dequant's own backward (dequant_scale_grad: no fp32 copy of the weight); tiled codes, which have none,
    take it as (q - z) in fp32 times s, rounded once to dtype as dequant rounds it."""
    bits, g, k = layer.spec.bits, layer.group_size, layer.in_features
    if not tiled:
        return ops.dequant(codes, scale, zero, bits, g, k, dtype).view(shape)
    if not scale.requires_grad:
        return ops.dequant_tiled(codes, scale, zero, bits, g, k, dtype).view(shape)
    q = ops.dequant_tiled(codes, torch.ones_like(scale.detach()), zero, bits, g, k)
    return (q.unflatten(-1, (scale.shape[-1], -1)) * scale[..., None].float()).to(dtype).view(shape)


def _plan(layers, x: torch.Tensor, fused: int):
    """(make, join, tensors): the layers' own tensors, every layer's first, then every layer's second, ..., and
    make(*stacks) their stacked weight [E, fused * N, K] in x's dtype, a stack being the join of one name's
    tensors over the layers (as _StackedLinear stacks them). `layers` (all one kind) are `fused` projections of
    each expert in turn (gate, up of expert 0, then of expert 1, ...): stacked as E * fused matrices of N rows,
    they are E of fused * N rows, each expert's projections side by side. Tiled-only packed layers (after
    tile_for_decode) keep their layout, which is row-tile-major: the layers' tiled codes stacked are the
    stack's."""
    first, dtype, count = layers[0], x.dtype, len(layers)
    shape = (count // fused, fused * first.out_features, first.in_features)
    mode = getattr(first, "mode", None)
    bits, g = (first.spec.bits, first.group_size) if mode else (None, None)
    if mode is None:  # nn.Linear
        names, make = ("weight",), lambda w: w.view(shape).to(dtype)
    elif mode == "fake":
        names, make = ("weight", "scale", "zero"), lambda w, s, z: ops.fake_quant(w, s, z, bits, g).view(shape).to(dtype)
    elif mode == "lrqat":  # a [E, N, r], b [E, r, K]: each expert's A B its own
        half = dtype in (torch.bfloat16, torch.float16)  # (as LRQATLinear._forward: 16-bit adapters for the kernels)
        names = ("p", "lora_a", "lora_b", "scale", "zero")

        def make(p, a, b, s, z):
            a, b = (a.to(dtype), b.to(dtype)) if half else (a, b)
            return ops.lrqat_weight(p, a, b, s, z, first.lora_scale, bits, g, first.frac_bits).to(dtype).view(shape)
    else:  # e2eqp, qalora, packed: frozen codes
        tiled = not all(getattr(layer, "holds_packed", True) for layer in layers)
        names = ("tiled" if tiled else "packed", "scale", "zero")

        def make(c, s, z):
            return _dequant(c, tiled, positive(s) if mode == "e2eqp" else s, z, first, shape, dtype)
    tensors = [layer._current_tiled() if name == "tiled" else in_own_dtype(layer, name) for name in names
               for layer in layers]
    return make, torch.stack if mode == "lrqat" else torch.cat, tensors


def stacked_linear(projections, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Every expert's projections (`projections`: lists of layers, one an expert, all one kind) of its rows of x
    (sorted by expert, offs the running token counts), side by side: [S, sum of N], as one grouped GEMM. QA-LoRA's
    adapters run beside the frozen base, on the group-pooled rows, as two grouped GEMMs of rank r a projection
    (its layers' qalora_linear, stacked)."""
    layers = [layer for expert in zip(*projections) for layer in expert]
    make, join, tensors = _plan(layers, x, len(projections))
    y = _StackedLinear.apply(make, join, len(layers), x, offs, *tensors)
    first = layers[0]
    if getattr(first, "mode", None) != "qalora":
        return y
    groups = first.qshape[1]
    pooled = x.unflatten(-1, (groups, -1)).sum(-1, dtype=torch.float32).to(x.dtype)
    # The groups padded with zeros to 16-byte rows (e.g. 768 / 128 = 6 groups), as the GEMM needs.
    pooled = F.pad(pooled, (0, (-groups) % _aligned(x)))
    delta = torch.cat([_pooled_adapter(p, pooled, offs) for p in projections], -1)
    return torch.add(y, delta, alpha=first.lora_scale / (first.in_features // groups))


def _pooled_adapter(layers, pooled: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """QA-LoRA's B A of every expert's rows of the pooled input (groups already padded to 16-byte rows), unscaled:
    A's columns padded as the groups are, the rank padded with zeros to 16-byte rows too."""
    a = _Stack.apply(*(in_own_dtype(l, "lora_a") for l in layers)).to(pooled.dtype)
    b = _Stack.apply(*(in_own_dtype(l, "lora_b") for l in layers)).to(pooled.dtype)
    extra_rank = (-a.shape[1]) % _aligned(pooled)
    a, b = F.pad(a, (0, pooled.shape[-1] - a.shape[-1], 0, extra_rank)), F.pad(b, (0, extra_rank))
    return grouped_mm(grouped_mm(pooled, a.mT, offs), b.mT, offs)


def same_kind(layers) -> bool:
    """Whether these layers (one projection of every expert) can be stacked: all nn.Linear without bias, or all
    QuantLinear of one mode this file builds, one shape, spec and options, without bias or activation
    fake-quant."""
    first = layers[0]
    if type(first) is nn.Linear:
        return all(type(l) is nn.Linear and l.bias is None and l.weight.shape == first.weight.shape for l in layers)
    if not isinstance(first, QuantLinear) or first.mode not in MODES:
        return False
    return all(type(l) is type(first) and l.bias is None and l.act_bits is None and l.spec == first.spec
               and l.options == first.options and (l.in_features, l.out_features) == (first.in_features, first.out_features)
               for l in layers)


def route(top_k_index: torch.Tensor, count: int):
    """The (token, slot) pairs sorted by expert, stably: (order, offs, tokens, routed), offs [count] int32 the
    pairs routed to experts 0..e (grouped_mm's offsets), tokens each sorted pair's token, routed [pairs, 1]
    whether its expert is in the list (expert-parallel sentinels past it sort last). Nothing read on the host."""
    flat = top_k_index.reshape(-1)
    order = flat.argsort(stable=True)
    ids = flat[order]
    # (found in the sorted ids: bincount would read a max on the host)
    offs = torch.searchsorted(ids, torch.arange(count, device=ids.device, dtype=ids.dtype), right=True, out_int32=True)
    return order, offs, order // top_k_index.shape[-1], (ids < count)[:, None]


def grouped_experts(projections, act_fn, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, gate_up_fused: bool):
    """ExpertList's forward as grouped GEMMs (see the module docstring): `projections` the gate, up and down layers
    over the experts, act_fn the gate's activation. The caller checked `same_kind` and `grouped_mm_serves` for
    each projection and, for `gate_up_fused`, for gate and up together: then they run as one GEMM of 2 * inter
    columns, as transformers' gate_up_proj. Pairs routed past the list (expert-parallel sentinels) sort last,
    past every offset: the GEMMs leave their rows unwritten, so they enter as zeros and leave as zeros."""
    gate, up, down = projections
    order, offs, tokens, routed = route(top_k_index, len(down))
    x = torch.where(routed, hidden_states[tokens], 0)
    if gate_up_fused:
        g, u = stacked_linear([gate, up], x, offs).chunk(2, dim=-1)
    else:
        g, u = stacked_linear([gate], x, offs), stacked_linear([up], x, offs)
    y = stacked_linear([down], act_fn(g) * u, offs)
    y = torch.where(routed, y, 0) * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden_states).index_add_(0, tokens, y.to(hidden_states.dtype))
