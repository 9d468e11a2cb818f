"""Pure-PyTorch reference of every qatext op: the math, written to be read.

The compiled kernels must agree with these functions (tests compare them), and autograd through
these functions defines the gradients the kernels' backward must produce. Conventions:

* a weight is ``[N, K]``; quantization groups of ``group_size`` run along K (``-1`` = per-channel);
  scales and zeros are ``[N, K // group_size]``;
* codes are unsigned ``q in [0, 2**bits - 1]``; dequant is ``(q - z) * s``;
* ``fq(w) = (clamp(round(w / s) + z, 0, 2**bits - 1) - z) * s`` with round half to even, a
  straight-through round in backward and a clamp that passes gradients on its boundaries;
  everything is computed in float32. A weight's trained scale and zero enter as
  ``max(s, MIN_SCALE)`` and ``round(z)``, both straight-through.
"""

from __future__ import annotations

import torch


def qmax(bits: int) -> int:
    return (1 << bits) - 1


MIN_SCALE = 1e-6  # the least scale a weight fake-quant computes with


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp() whose gradient passes where lo <= x <= hi, boundaries included.

    A value that rounds onto the first or last code is representable, so its gradient flows
    (LSQ's rule). torch.clamp's own backward excludes the boundaries in recent releases, which
    would freeze every weight on an extreme code (half of all codes at 2 bits).
    """
    return torch.where((x >= lo) & (x <= hi), x, torch.clamp(x, lo, hi).detach())


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [.., K] as [.., G, g]."""
    k = t.shape[-1]
    g = k if group_size == -1 else group_size
    return t.reshape(*t.shape[:-1], k // g, g)


def ste_clamp_min(x: torch.Tensor, lo: float) -> torch.Tensor:
    """max(x, lo) in value, the identity in gradient."""
    return x.clamp(min=lo).detach() + (x - x.detach())


def fake_quant(w, scale, zero, bits: int, group_size: int):
    """fq(w) group-wise; differentiable in w, scale and zero (LSQ-style via ste_round). The trained
    scale is kept >= MIN_SCALE and the zero rounded, both straight-through."""
    wg = _grouped(w.float(), group_size)
    s = ste_clamp_min(scale.float(), MIN_SCALE).unsqueeze(-1)
    z = ste_round(zero.float()).unsqueeze(-1)
    q = clamp_ste(ste_round(wg / s) + z, 0, qmax(bits))
    return ((q - z) * s).reshape(w.shape).to(w.dtype)


def token_qparams(x: torch.Tensor, bits: int, symmetric: bool):
    """Dynamic per-token (last-dim row) scale and zero, as float32 [..., 1]."""
    x = x.float()
    # Divide by a full tensor: torch turns division by a Python scalar into a multiplication by
    # its reciprocal on CUDA, which is not the correctly rounded quotient the kernels compute.
    if symmetric:
        absmax = x.abs().amax(dim=-1, keepdim=True)
        s = torch.clamp(absmax / torch.full_like(absmax, (1 << (bits - 1)) - 1), min=1e-8)
        return s, torch.full_like(s, float(1 << (bits - 1)))
    lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0)
    s = torch.clamp((hi - lo) / torch.full_like(hi, qmax(bits)), min=1e-8)
    z = torch.clamp(torch.round(-lo / s), 0, qmax(bits))
    return s, z


def fake_quant_per_token(x, bits: int, symmetric: bool):
    """Dynamic per-token activation fake-quant; scales are treated as constants in backward."""
    s, z = token_qparams(x.detach(), bits, symmetric)
    q = clamp_ste(ste_round(x.float() / s) + z, 0, qmax(bits))
    return ((q - z) * s).to(x.dtype)


def packed_row_bytes(in_features: int, bits: int) -> int:
    return (in_features * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes along the last dim as a little-endian bit stream (code k at bits k*b...)."""
    k = codes.shape[-1]
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.long().unsqueeze(-1) >> shifts) & 1).reshape(*codes.shape[:-1], k * bits)
    pad = packed_row_bytes(k, bits) * 8 - k * bits
    stream = torch.nn.functional.pad(stream, (0, pad))
    octets = stream.reshape(*codes.shape[:-1], -1, 8)
    return (octets << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack."""
    stream = (packed.long().unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(*packed.shape[:-1], -1)[..., : in_features * bits]
    per_code = stream.reshape(*packed.shape[:-1], in_features, bits)
    return (per_code << torch.arange(bits, device=packed.device)).sum(-1).to(torch.uint8)


def dequant(packed, scale, zero, bits: int, group_size: int, in_features: int, dtype=torch.float32):
    codes = _grouped(unpack(packed, bits, in_features).float(), group_size)
    w = (codes - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(packed.shape[0], in_features).to(dtype)


def dequant_matmul(x, packed, scale, zero, bits: int, group_size: int, bias=None):
    """x @ deq(W)^T + bias; differentiable in x, scale and bias (E2E-QP trains the scale)."""
    w = dequant(packed, scale, zero, bits, group_size, x.shape[-1], torch.float32)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def group_sum(x, group_size: int):
    """x [.., K] -> [.., K / g]: each group of g inputs summed in fp32, then x's dtype."""
    k = x.shape[-1]
    g = k if group_size == -1 else group_size
    return x.float().unflatten(-1, (k // g, g)).sum(-1).to(x.dtype)


def group_expand(t, group_size: int):
    """t [.., G] -> [.., G * g]: each value over its group's g columns."""
    return t.repeat_interleave(group_size, dim=-1)


def qalora_linear(x, packed, scale, zero, lora_a, lora_b, lora_scale: float, bits: int, group_size: int, bias=None):
    """QA-LoRA: x @ deq(W)^T + bias + (lora_scale / g) (pool_g(x) A^T) B^T, pool_g summing each group of
    g inputs; differentiable in x, A, B and bias."""
    g = x.shape[-1] if group_size == -1 else group_size
    pooled = group_sum(x.float(), group_size)
    delta = (pooled @ lora_a.float().t()) @ lora_b.float().t()
    return (dequant_matmul(x.float(), packed, scale, zero, bits, group_size, bias) + lora_scale / g * delta).to(x.dtype)


def _tile_planes(bits: int):
    """(width, byte offset in the tile, lowest code bit) of each plane (see csrc/core/tile_layout.h)."""
    return [(2, 0, 0), (1, 256, 2)] if bits == 3 else [(bits, 0, 0)]


def _tile_positions(rows: int, in_features: int, bits: int, device, width: int, offset: int):
    """Byte and bit of one plane's field of every code (n, k) in the decode GEMM's tiled layout."""
    n = torch.arange(rows, device=device).unsqueeze(1)
    k = torch.arange(in_features, device=device).unsqueeze(0)
    tile = (n // 16) * (in_features // 64) + k // 64
    g, c = n % 8, (k % 64) // 16
    j, e = (k % 16) // 4, k % 4
    word, step_in_word = j // (4 // width), j % (4 // width)
    reg = (n % 16) // 8 + 2 * (e // 2)
    bit = width * (reg + 4 * step_in_word) + 16 * (e % 2)
    byte = tile * (128 * bits) + offset + (4 * g + c) * (4 * width) + 4 * word + bit // 8
    return byte, bit % 8


def tile_packed(packed, bits: int, in_features: int) -> torch.Tensor:
    """Packed [N, K * bits / 8] -> the same codes in the decode GEMM's tiled layout (bits 2, 3 or 4)."""
    rows = packed.shape[0]
    codes = unpack(packed, bits, in_features).long()
    out = torch.zeros(packed.numel(), dtype=torch.long, device=packed.device)
    for width, offset, low in _tile_planes(bits):
        byte, shift = _tile_positions(rows, in_features, bits, packed.device, width, offset)
        field = ((codes >> low) & ((1 << width) - 1)) << shift
        out.scatter_add_(0, byte.flatten(), field.flatten())  # fields are disjoint: the sum is the bitwise or
    return out.to(torch.uint8).reshape(packed.shape)


def untile_packed(tiled, bits: int, in_features: int) -> torch.Tensor:
    flat = tiled.flatten().long()
    codes = 0
    for width, offset, low in _tile_planes(bits):
        byte, shift = _tile_positions(tiled.shape[0], in_features, bits, tiled.device, width, offset)
        codes = codes + (((flat[byte] >> shift) & ((1 << width) - 1)) << low)
    return pack(codes.to(torch.uint8), bits)


def dequant_tiled(tiled, scale, zero, bits: int, group_size: int, in_features: int, dtype=torch.float32):
    """dequant of tiled codes."""
    return dequant(untile_packed(tiled, bits, in_features), scale, zero, bits, group_size, in_features, dtype)


def dequant_matmul_tiled(x, tiled, scale, zero, bits: int, group_size: int, bias=None):
    return dequant_matmul(x, untile_packed(tiled, bits, x.shape[-1]), scale, zero, bits, group_size, bias)


def swiglu_matmul_tiled(x, tiled, scale, zero, bits: int, group_size: int, bias=None):
    """silu(gate) * up of y = x @ deq(W)^T + bias, W = [gate; up] (fp32 throughout, rounded once)."""
    y = dequant_matmul_tiled(x.float(), tiled, scale, zero, bits, group_size, None if bias is None else bias.float())
    gate, up = y.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def grouped_matmul_tiled(x, offs, tiled, scale, zero, bits: int, group_size: int, swiglu: bool = False):
    """Each expert's rows of x (offs: the rows of experts 0..e) times its own weight of the stacked tiled codes;
    swiglu: silu(gate) * up of each. Rows past offs[-1] are zeros."""
    n = tiled.shape[0] // offs.numel()
    out = x.new_zeros(x.shape[0], n // 2 if swiglu else n)
    first = 0
    for e, last in enumerate(offs.tolist()):
        w = slice(e * n, (e + 1) * n)
        matmul = swiglu_matmul_tiled if swiglu else dequant_matmul_tiled
        out[first:last] = matmul(x[first:last], tiled[w], scale[w], zero[w], bits, group_size).to(x.dtype)
        first = last
    return out


def dequant_scale_grad(grad_w, packed, zero, bits: int, group_size: int):
    """d loss / d scale[n, g] of dequant = sum_{k in g} (q[n, k] - z[n, g]) * grad_w[n, k], in fp32."""
    codes = unpack(packed, bits, grad_w.shape[-1]).float()
    prod = _grouped(grad_w.float(), group_size) * (_grouped(codes, group_size) - zero.float().unsqueeze(-1))
    return prod.sum(-1)


def e2eqp_scale_grad(x, grad_y, packed, zero, bits: int, group_size: int):
    """d loss / d scale of x @ deq(W)^T: dequant_scale_grad of dW = grad_y^T x."""
    dw = grad_y.reshape(-1, grad_y.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
    return dequant_scale_grad(dw, packed, zero, bits, group_size)


def lrqat_p_values(p, bits: int, frac_bits: int, in_features: int) -> torch.Tensor:
    """LR-QAT's frozen P in code space: packed b-bit codes, or uint8 fixed point (Q4.4 etc.)."""
    if frac_bits == 0:
        return unpack(p, bits, in_features).float()
    return p.float() / (1 << frac_bits)


def lrqat_rank_grads(grad_u, a, b):
    """LR-QAT's adapter gradients given dU = d loss / d (A B): dA = dU B^T and dB = A^T dU in fp32 (each expert
    its own where stacked: grad_u [E, N, K], a [E, N, r], b [E, r, K])."""
    u = grad_u.float()
    return u @ b.float().mT, a.float().mT @ u


def lrqat_weight(p, a, b, scale, zero, lora_scale: float, bits: int, group_size: int, frac_bits: int):
    """W = s * (clamp(round(P + lora_scale * A B), 0, 2^b - 1) - z); differentiable in A, B, s. The trained s
    enters as max(s, MIN_SCALE), straight-through. Stacked experts: a [E, N, r], b [E, r, K], p, scale and zero
    [E, N, ..] -> [E, N, K]."""
    k = b.shape[-1]
    u = lrqat_p_values(p, bits, frac_bits, k) + lora_scale * (a.float() @ b.float())
    q = _grouped(clamp_ste(ste_round(u), 0, qmax(bits)), group_size)
    w = (q - zero.float().unsqueeze(-1)) * ste_clamp_min(scale.float(), MIN_SCALE).unsqueeze(-1)
    return w.reshape(*a.shape[:-1], k).to(a.dtype)
