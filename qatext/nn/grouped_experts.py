"""A block's routed experts as grouped GEMMs: each projection's weights stacked over the experts, built
by the layers' own op in one call ([experts * N, K] is a matrix like any other to a row-wise quantizer),
then one grouped GEMM over the tokens sorted by expert, the experts' token counts as its offsets.

One projection of a block is then a few op calls where `ExpertList`'s loop makes a few an expert (LR-QAT's
stacked op still launches its tile kernels once an expert, from C++), and nothing reads a count on the host:
no synchronisation, so CUDA graphs can hold it. The stacked weight
lives only inside the call: backward builds it again (as lrqat_linear does a layer's), so a block's
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
    """grouped_mm(x, W^T) for W = build(*tensors) [E, N, K], built again in backward (not held). `tensors` are the
    experts' own (build stacks them), so what backward holds is references, not stacked copies."""

    @staticmethod
    def forward(ctx, build, x, offs, *tensors):
        ctx.build = build
        ctx.save_for_backward(x, offs, *tensors)
        with torch.no_grad():
            w = build(*tensors)
        return grouped_mm(x, w.mT, offs)

    @staticmethod
    def backward(ctx, grad_y):
        x, offs, *tensors = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        needs = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() if need else t for t, need in zip(tensors, needs)]
            w = ctx.build(*inputs)
        grad_x = grouped_mm(grad_y, w.detach(), offs) if ctx.needs_input_grad[1] else None
        grads = [None] * len(tensors)
        wanted = [i for i, need in enumerate(needs) if need]
        if wanted:
            grad_w = grouped_mm(grad_y.mT, x, offs)  # [E, N, K]; an expert without tokens: zeros
            for i, g in zip(wanted, torch.autograd.grad(w, [inputs[i] for i in wanted], grad_w.to(w.dtype))):
                grads[i] = g
        return None, grad_x, None, *grads


def _dequant(codes, tiled: bool, scale, zero, layer: QuantLinear, shape, dtype) -> torch.Tensor:
    """deq(q) = (q - z) s of the stacked codes, [E, N, K] in dtype. With a scale that takes a gradient (E2E-QP),
    (q - z) in fp32 times s, rounded once to dtype as dequant rounds it."""
    bits, g, k = layer.spec.bits, layer.group_size, layer.in_features
    dequant = ops.dequant_tiled if tiled else ops.dequant
    if not scale.requires_grad:
        return dequant(codes, scale, zero, bits, g, k, dtype).view(shape)
    q = dequant(codes, torch.ones_like(scale.detach()), zero, bits, g, k)
    return (q.unflatten(-1, (scale.shape[-1], -1)) * scale[..., None].float()).to(dtype).view(shape)


def _plan(layers, x: torch.Tensor):
    """(build, tensors): the experts' own tensors, every expert's first, then every expert's second, ..., and
    build(*tensors) their stacked weight [E, N, K] in x's dtype, for one projection of every expert (`layers`,
    all one kind). Tiled-only packed layers (after tile_for_decode) keep their layout, which is row-tile-major:
    the experts' tiled codes stacked are the stack's."""
    first, dtype, count = layers[0], x.dtype, len(layers)
    shape = (count, first.out_features, first.in_features)
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
            return ops.lrqat_weight(p, a, b, s, z, first.lora_scale, bits, g, first.frac_bits).to(dtype)
    else:  # e2eqp, qalora, packed: frozen codes
        tiled = not all(getattr(layer, "holds_packed", True) for layer in layers)
        names = ("tiled" if tiled else "packed", "scale", "zero")

        def make(c, s, z):
            return _dequant(c, tiled, positive(s) if mode == "e2eqp" else s, z, first, shape, dtype)
    tensors = [layer._current_tiled() if name == "tiled" else in_own_dtype(layer, name) for name in names
               for layer in layers]
    join = torch.stack if mode == "lrqat" else torch.cat

    def build(*flat):
        return make(*(join(flat[i:i + count]) for i in range(0, len(flat), count)))

    return build, tensors


def stacked_linear(layers, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Every expert's projection (`layers`, one an expert) of its rows of x (sorted by expert, offs the
    running token counts): [S, N]. QA-LoRA's adapter runs beside the frozen base, on the group-pooled rows,
    as two grouped GEMMs of rank r (its layers' qalora_linear, stacked)."""
    build, tensors = _plan(layers, x)
    y = _StackedLinear.apply(build, x, offs, *tensors)
    first = layers[0]
    if getattr(first, "mode", None) != "qalora":
        return y
    groups = first.qshape[1]
    pooled = x.unflatten(-1, (groups, -1)).sum(-1, dtype=torch.float32).to(x.dtype)
    a, b = torch.stack([l.lora_a for l in layers]).to(x.dtype), torch.stack([l.lora_b for l in layers]).to(x.dtype)
    # The groups and the rank padded with zeros to 16-byte rows (e.g. 768 / 128 = 6 groups), as the GEMM needs.
    extra_groups, extra_rank = (-groups) % _aligned(x), (-first.rank) % _aligned(x)
    pooled, a, b = F.pad(pooled, (0, extra_groups)), F.pad(a, (0, extra_groups, 0, extra_rank)), F.pad(b, (0, extra_rank))
    delta = grouped_mm(grouped_mm(pooled, a.mT, offs), b.mT, offs)
    return torch.add(y, delta, alpha=first.lora_scale / (first.in_features // groups))


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


def grouped_experts(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """ExpertList's forward as grouped GEMMs (see the module docstring); the caller checked `same_kind` and
    `grouped_mm_serves`. Pairs routed past the list (expert-parallel sentinels) sort last, past every offset:
    the GEMMs leave their rows unwritten, so they enter as zeros and leave as zeros."""
    k, count = top_k_index.shape[-1], len(experts)
    flat = top_k_index.reshape(-1)
    order = flat.argsort(stable=True)
    ids = flat[order]
    # offs[e]: the pairs routed to experts 0..e, found in the sorted ids (bincount would read a max on the host)
    offs = torch.searchsorted(ids, torch.arange(count, device=ids.device, dtype=ids.dtype), right=True, out_int32=True)
    tokens = order // k
    routed = (ids < count)[:, None]
    x = torch.where(routed, hidden_states[tokens], 0)
    first = experts[0]
    h = first.act_fn(stacked_linear([e.gate_proj for e in experts], x, offs)) * stacked_linear(
        [e.up_proj for e in experts], x, offs)
    y = stacked_linear([e.down_proj for e in experts], h, offs)
    y = torch.where(routed, y, 0) * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden_states).index_add_(0, tokens, y.to(hidden_states.dtype))
