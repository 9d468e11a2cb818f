"""The one Python home of the quantizer's building blocks the library computes with.

`qatext/reference.py` writes the same math out again, independently, as the tests' oracle; nothing
in the library imports it."""

from __future__ import annotations

import torch

EPS = 1e-8  # smallest scale a range maps to (an all-zero group)


def qmax(bits: int) -> int:
    """The largest unsigned code, 2^b - 1."""
    return (1 << bits) - 1


def symmetric_zero(bits: int) -> float:
    """The fixed zero point of symmetric quantization, 2^(b-1)."""
    return float(1 << (bits - 1))


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round() (half to even) whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one row of b-bit codes packed along K."""
    return (in_features * bits + 7) // 8


def grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [N, K] as [N, K / g, g] (g = K for -1, per-channel)."""
    n, k = t.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"group_size ({group_size}) must divide in_features ({k})")
    return t.reshape(n, k // g, g)


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Scale and (integer) zero mapping [lo, hi] onto the codes, elementwise over groups or tokens.

    Asymmetric: s = (max(hi, 0) - min(lo, 0)) / (2^b - 1), z = round(-lo / s). Symmetric:
    s = absmax / (2^(b-1) - 1), z = 2^(b-1). The divisors are full tensors: CUDA turns division by a
    Python scalar into multiplication by its reciprocal, which is not the correctly rounded quotient
    the kernels compute."""
    if symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.clamp(absmax / torch.full_like(absmax, (1 << (bits - 1)) - 1), min=EPS)
        return scale, torch.full_like(scale, symmetric_zero(bits))
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = torch.clamp((hi - lo) / torch.full_like(hi, qmax(bits)), min=EPS)
    return scale, torch.clamp(torch.round(-lo / scale), 0, qmax(bits))


def quantize_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """clamp(round(w / s) + z, 0, 2^b - 1) over grouped [N, G, g] weights and [N, G] scale / zero
    (float; integer-valued where z is)."""
    return torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, qmax(bits))
