"""Python face of the compiled kernels: ``torch.ops.qatext.*`` and their fake kernels (their
autograd is registered in C++, csrc/ops/autograd.cpp: one home, and no Python per call).

Every op here has a pure-PyTorch twin in :mod:`qatext.reference` with the same arguments.
``group_size=-1`` means per-channel. Scales and zeros may be any float dtype; the kernels compute
in float32 and return their gradients in the dtype of the input they belong to.
"""

from __future__ import annotations

import warnings

import torch

from . import _C  # registers torch.ops.qatext
from .quant.primitives import packed_row_bytes

_ops = torch.ops.qatext


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


# ----------------------------------------------------------------------------- public functions


def fake_quant(w, scale, zero, bits: int, group_size: int = -1) -> torch.Tensor:
    """fq(w) = (clamp(round(w/s) + z, 0, 2^b - 1) - z) * s; STE backward to w, s and z. The trained s and z
    enter as max(s, 1e-6) and round(z), straight-through (no separate clamp and round ops per forward)."""
    return _ops.fake_quant(w, scale, zero, bits, group_size)


def fake_quant_per_token(x, bits: int = 8, symmetric: bool = False) -> torch.Tensor:
    """Dynamic per-token (last dim) activation fake-quant; STE backward with the clip mask."""
    return _ops.fake_quant_per_token(x, bits, symmetric)


def pack(codes, bits: int) -> torch.Tensor:
    """uint8 codes [..., K] -> packed uint8 [..., ceil(K * bits / 8)] (little-endian bit stream)."""
    return _ops.pack(codes, bits)


def unpack(packed, bits: int, in_features: int) -> torch.Tensor:
    return _ops.unpack(packed, bits, in_features)


def dequant(packed, scale, zero, bits: int, group_size: int, in_features: int, dtype=torch.float32):
    """(q - z) s of packed codes, [N, in_features] in dtype; backward to the scale (dequant_scale_grad)."""
    return _ops.dequant(packed, scale, zero, bits, group_size, in_features, dtype)


def dequant_scale_grad(grad_w, packed, zero, bits: int, group_size: int) -> torch.Tensor:
    """d loss / d scale of dequant given grad_w = d loss / d W [N, K]: [N, groups] in fp32."""
    return _ops.dequant_scale_grad(grad_w, packed, zero, bits, group_size)


def dequant_matmul(x, packed, scale, zero, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """x @ deq(W)^T + bias; backward to x, bias and scale (E2E-QP)."""
    return _ops.dequant_matmul(x, packed, scale, zero, bits, group_size, bias)


def tile_packed(packed, bits: int, in_features: int) -> torch.Tensor:
    """Packed codes -> the decode GEMM's tiled layout (bits 2, 3 or 4; N % 16 == 0, K % 64 == 0). Exact."""
    return _ops.tile_packed(packed, bits, in_features)


def untile_packed(tiled, bits: int, in_features: int) -> torch.Tensor:
    """The inverse of :func:`tile_packed`."""
    return _ops.untile_packed(tiled, bits, in_features)


def dequant_tiled(tiled, scale, zero, bits: int, group_size: int, in_features: int, dtype=torch.float32):
    """:func:`dequant` of codes in the tiled layout, straight from it (no untiled copy made)."""
    return _ops.dequant_tiled(tiled, scale, zero, bits, group_size, in_features, dtype)


def dequant_matmul_tiled(x, tiled, scale, zero, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """x @ deq(W)^T + bias for a weight in the tiled layout (inference: no backward).

    On CUDA with 16-bit x and at most ``decode_gemm_max_m`` tokens (by default the crossover that
    ``tune_decode_gemm`` measured for the shape, see ``decode_gemm_crossover``) this is the register-direct
    decode kernel; beyond it, up to ``staged_gemm_max_m`` tokens (by default the limit ``tune_decode_gemm``
    measured, see ``staged_gemm_limit``; none where it measured nothing) the staged kernel, which stages a
    block's tokens once in shared memory and dequantises the weight to 16 bits in registers, as dequant does;
    beyond that the fused kernel on the codes untiled where dequant_matmul would take it (at most
    ``dequant_gemm_max_m`` tokens), else the weight dequantised straight from the tiled layout and one GEMM.
    """
    return _ops.dequant_matmul_tiled(x, tiled, scale, zero, bits, group_size, bias)


def swiglu_matmul_tiled(x, tiled, scale, zero, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """silu(gate) * up, where y = x @ deq(W)^T + bias and W (tiled) holds a SwiGLU MLP's gate rows, then its up
    rows: silu(y[..., :N / 2]) * y[..., N / 2:] (inference: no backward). Where dequant_matmul_tiled would take
    the decode kernel, this is that kernel with silu(gate) * up in its epilogue (from the fp32 sums, rounded
    once: one kernel where there were two); beyond it, the GEMM, then silu(gate) * up in x's dtype (as an
    unfused MLP computes them).
    """
    return _ops.swiglu_matmul_tiled(x, tiled, scale, zero, bits, group_size, bias)


def grouped_matmul_tiled(x, offs, tiled, scale, zero, bits: int, group_size: int, swiglu: bool = False) -> torch.Tensor:
    """A block's experts on tiled codes (inference: no backward): x [S, K] sorted by expert, offs int32 [experts]
    the rows of experts 0..e (as torch's grouped_mm takes them), tiled / scale / zero the experts' [N, K] weights
    stacked ([experts * N] rows). Each expert's rows times its deq(W_e)^T, [S, N]; with swiglu, silu(gate) * up of
    them (each W_e its gate rows then its up rows), [S, N / 2]. Rows past offs[-1] are zeros. On CUDA (16-bit x)
    one launch of the decode kernel, each token tile one expert's rows: only the chosen experts' weights are read,
    and nothing on the host (CUDA graphs can hold it); elsewhere one dequant_matmul_tiled an expert.
    """
    return _ops.grouped_matmul_tiled(x, offs, tiled, scale, zero, bits, group_size, swiglu)


def tune_decode_gemm(tiled, scale, zero, bits: int, group_size: int, in_features: int) -> bool:
    """Time the decode kernel's variants (ring depth, split-K reduction and shape) on this weight for 1, 8 and 16
    tokens, once per device and weight shape, and let every later decode call on that shape take the
    fastest (``decode_gemm_autotune``); with ``decode_gemm_max_m`` at -1 (the default) also time it against
    the path beyond it at 32, 64 and 128 tokens for the shape's crossover. It synchronises the GPU: call it
    ahead of inference, as ``tile_for_decode`` does; a forward never tunes. A no-op on CPU tensors and for
    shapes already timed. Where the GPU has no memory left for its timing copies of the weight (about twice
    the L2 cache), it warns and returns False: the shape keeps the default variant and crossover, and a
    later call tunes it.
    """
    if _C.tune_decode_gemm(tiled, scale, zero, bits, group_size, in_features):
        return True
    warnings.warn(f"qatext: no GPU memory left to time the decode kernel on a {tiled.shape[0]} x {in_features} "
                  "weight; its decode calls keep the default variant and crossover (free memory, then call "
                  "tile_for_decode() again to tune it)", RuntimeWarning, stacklevel=2)
    return False


def decode_gemm_crossover(device, out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """The token count up to which the decode kernel beat the path beyond it (see dequant_matmul_tiled) for
    this weight shape on a CUDA device, as ``tune_decode_gemm`` measured it: 16, 32, 64 or
    128; 16 where it has measured nothing. With ``decode_gemm_max_m`` at -1, packed layers and
    ``dequant_matmul_tiled`` take the decode kernel up to this many tokens."""
    device = torch.device(device)
    # (-1, no CUDA device: nothing was measured there)
    index = -1 if device.type != "cuda" else torch.cuda.current_device() if device.index is None else device.index
    return _C.decode_gemm_crossover(index, out_features, in_features, bits, group_size)


def staged_gemm_limit(device, out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """The token count up to which the staged kernel beat the path beyond it (the fused kernel or dequant +
    cuBLAS) for this weight shape on a CUDA device, as ``tune_decode_gemm`` measured it: 0 (it lost at 32
    tokens), 32, 64 or 128; 0 where it has measured nothing. With ``staged_gemm_max_m`` at -1, packed layers
    and ``dequant_matmul_tiled`` take the staged kernel beyond the decode kernel up to this many tokens."""
    device = torch.device(device)
    index = -1 if device.type != "cuda" else torch.cuda.current_device() if device.index is None else device.index
    return _C.staged_gemm_limit(index, out_features, in_features, bits, group_size)


def decode_gemm_choice(device, out_features: int, in_features: int, bits: int, group_size: int,
                       tokens: int) -> dict | None:
    """What tune_decode_gemm chose for this weight shape at this many tokens on a CUDA device:
    ``{"stages": 2, 3, 4 or 8, "cluster": bool, "min_slice": 4, 8 or 16, "row_tiles": 1, 2 or 4, "warp_split": bool}``
    (with warp split, the warps of a block split K: min_slice 0, cluster False), or None where it has measured
    nothing for this many tokens' bucket (1, up to 8, 16, 32, 64, 128; a call then takes the choice of the
    nearest smaller bucket measured, or else the knobs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    stages, cluster, min_slice, row_tiles, warp_split = _C.decode_gemm_choice(index, out_features, in_features, bits,
                                                                              group_size, tokens)
    if not stages:
        return None
    return {"stages": stages, "cluster": cluster, "min_slice": min_slice, "row_tiles": row_tiles,
            "warp_split": warp_split}


def e2eqp_scale_grad(x, grad_y, packed, zero, bits: int, group_size: int) -> torch.Tensor:
    return _ops.e2eqp_scale_grad(x, grad_y, packed, zero, bits, group_size)


def lrqat_weight(p, a, b, scale, zero, lora_scale: float, bits: int, group_size: int, frac_bits: int = 0):
    """LR-QAT's W = s * (clamp(round(P + lora_scale * A B), 0, 2^b - 1) - z).

    ``p`` holds P in code space: packed b-bit codes (``frac_bits=0``) or uint8 fixed point with
    ``frac_bits`` fractional bits (Q4.4 is ``bits=4, frac_bits=4``). Backward to a, b and scale; the
    trained scale enters as max(s, 1e-6), straight-through. Stacked experts (a [E, N, r], b [E, r, K],
    p, scale and zero [E, N, ..]) give W [E, N, K], each expert's A B its own, in one call.
    """
    return _ops.lrqat_weight(p, a, b, scale, zero, lora_scale, bits, group_size, frac_bits)


def qalora_delta(lora_a, lora_b, lora_scale: float, group_size: int) -> torch.Tensor:
    """QA-LoRA's adapter as a per-group weight offset: c * (B A) / g, fp32 [N, K / g]."""
    return lora_scale * (lora_b.float() @ lora_a.float()) / group_size


def qalora_merged_zero(zero, scale, lora_a, lora_b, lora_scale: float, group_size: int) -> torch.Tensor:
    """The zero points that absorb a QA-LoRA adapter exactly: (q - z) s + d = (q - (z - d / s)) s."""
    return zero.float() - qalora_delta(lora_a, lora_b, lora_scale, group_size) / scale.float()


def lrqat_linear(x, p, a, b, scale, zero, lora_scale: float, bits: int, group_size: int, frac_bits: int = 0,
                 bias=None) -> torch.Tensor:
    """x @ lrqat_weight(...)^T + bias, holding only x for backward: the N x K weight lives during the
    forward GEMM and is recomputed for grad_x (LR-QAT's built-in checkpointing). One op with its
    autograd in C++, so that torch.compile cannot merge the recomputation with the forward's weight
    and keep it (as two ops it did: 2x a 7B step's memory)."""
    return _ops.lrqat_linear(x, p, a, b, scale, zero, bias, lora_scale, bits, group_size, frac_bits)


def qalora_linear(x, packed, scale, zero, lora_a, lora_b, lora_scale: float, bits: int, group_size: int,
                  bias=None) -> torch.Tensor:
    """QA-LoRA's linear: x @ deq(W)^T + bias + (lora_scale / g) (pool_g(x) A^T) B^T, pool_g summing each
    group of g inputs; the codes, scale and zero frozen. One op with its autograd in C++ (the layer's
    ops one by one cost host time a host-bound step does not have); holds the pooled input and the
    adapter's hidden for backward, not x."""
    return _ops.qalora_linear(x, packed, scale, zero, lora_a, lora_b, bias, lora_scale, bits, group_size)


def group_sum(x, group_size: int) -> torch.Tensor:
    """QA-LoRA's pooling: x [.., K] -> [.., K / g], each group of g inputs summed (in fp32, one rounding to
    x's dtype); group_size -1 is the whole row."""
    return _ops.group_sum(x, group_size)


def group_expand(t, group_size: int) -> torch.Tensor:
    """The pooling's transpose: t [.., G] -> [.., G * g], each value repeated over its group's g columns."""
    return _ops.group_expand(t, group_size)


# ----------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("qatext::fake_quant")
def _(w, scale, zero, bits, group_size):
    return _empty(w.shape, w)


@torch.library.register_fake("qatext::fake_quant_backward")
def _(grad, w, scale, zero, bits, group_size):
    return _empty(w.shape, w), _empty(scale.shape, scale), _empty(zero.shape, zero)


@torch.library.register_fake("qatext::fake_quant_per_token")
def _(x, bits, symmetric):
    return _empty(x.shape, x)


@torch.library.register_fake("qatext::fake_quant_per_token_backward")
def _(grad, x, bits, symmetric):
    return _empty(x.shape, x)


@torch.library.register_fake("qatext::pack")
def _(codes, bits):
    return _empty((*codes.shape[:-1], packed_row_bytes(codes.shape[-1], bits)), codes)


@torch.library.register_fake("qatext::unpack")
def _(packed, bits, in_features):
    return _empty((*packed.shape[:-1], in_features), packed)


@torch.library.register_fake("qatext::dequant")
def _(packed, scale, zero, bits, group_size, in_features, dtype):
    return _empty((packed.shape[0], in_features), packed, dtype)


@torch.library.register_fake("qatext::dequant_matmul")
def _(x, packed, scale, zero, bits, group_size, bias):
    return _empty((*x.shape[:-1], packed.shape[0]), x)


@torch.library.register_fake("qatext::dequant_matmul_grad_input")
def _(grad_y, packed, scale, zero, bits, group_size, in_features):
    return _empty((*grad_y.shape[:-1], in_features), grad_y)


@torch.library.register_fake("qatext::tile_packed")
def _(packed, bits, in_features):
    return torch.empty_like(packed)


@torch.library.register_fake("qatext::untile_packed")
def _(tiled, bits, in_features):
    return torch.empty_like(tiled)


@torch.library.register_fake("qatext::dequant_tiled")
def _(tiled, scale, zero, bits, group_size, in_features, dtype):
    return _empty((tiled.shape[0], in_features), tiled, dtype)


@torch.library.register_fake("qatext::dequant_matmul_tiled")
def _(x, tiled, scale, zero, bits, group_size, bias):
    return _empty((*x.shape[:-1], tiled.shape[0]), x)


@torch.library.register_fake("qatext::swiglu_matmul_tiled")
def _(x, tiled, scale, zero, bits, group_size, bias):
    return _empty((*x.shape[:-1], tiled.shape[0] // 2), x)


@torch.library.register_fake("qatext::grouped_matmul_tiled")
def _(x, offs, tiled, scale, zero, bits, group_size, swiglu):
    n = tiled.shape[0] // offs.shape[0]
    return _empty((x.shape[0], n // 2 if swiglu else n), x)


@torch.library.register_fake("qatext::e2eqp_scale_grad")
def _(x, grad_y, packed, zero, bits, group_size):
    return _empty(zero.shape, zero, torch.float32)


@torch.library.register_fake("qatext::dequant_scale_grad")
def _(grad_w, packed, zero, bits, group_size):
    return _empty(zero.shape, zero, torch.float32)


@torch.library.register_fake("qatext::lrqat_weight")
def _(p, a, b, scale, zero, lora_scale, bits, group_size, frac_bits):
    return _empty((*a.shape[:-1], b.shape[-1]), a)


@torch.library.register_fake("qatext::lrqat_weight_backward")
def _(grad_w, p, a, b, scale, zero, lora_scale, bits, group_size, frac_bits):
    return _empty(a.shape, a), _empty(b.shape, b), _empty(scale.shape, scale)


@torch.library.register_fake("qatext::lrqat_rank_grads")
def _(grad_u, a, b):
    return _empty(a.shape, grad_u), _empty(b.shape, grad_u)


@torch.library.register_fake("qatext::lrqat_linear")
def _(x, p, a, b, scale, zero, bias, lora_scale, bits, group_size, frac_bits):
    return _empty((*x.shape[:-1], a.shape[0]), x)


@torch.library.register_fake("qatext::lrqat_linear_backward")
def _(grad_y, x, p, a, b, scale, zero, lora_scale, bits, group_size, frac_bits, grad_input):
    grad_x = _empty(x.shape, x) if grad_input else _empty((0,), x)
    return grad_x, _empty(a.shape, a), _empty(b.shape, b), _empty(scale.shape, scale)


@torch.library.register_fake("qatext::qalora_linear")
def _(x, packed, scale, zero, a, b, bias, lora_scale, bits, group_size):
    return _empty((*x.shape[:-1], b.shape[0]), x)


@torch.library.register_fake("qatext::group_sum")
def _(x, group_size):
    return _empty((*x.shape[:-1], 1 if group_size == -1 else x.shape[-1] // group_size), x)


@torch.library.register_fake("qatext::group_expand")
def _(t, group_size):
    return _empty((*t.shape[:-1], t.shape[-1] * group_size), t)
