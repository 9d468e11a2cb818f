"""Scale / zero initialisers for group-wise weight quantization."""

from __future__ import annotations

import torch


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise ValueError(f"group_size ({group_size}) must divide in_features ({k}) or be -1")
    return w.float().reshape(n, k // g, g)


def minmax_qparams(w: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = False,
                   eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [N, K/g] (float32) that map each group's range onto the codes [0, 2^b - 1].

    Asymmetric: s = (max - min) / (2^b - 1), z = round(-min / s) (float, may be fractional later).
    Symmetric:  s = absmax / (2^(b-1) - 1), z = 2^(b-1).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    wg = _grouped(w, group_size)
    qmax = (1 << bits) - 1
    if symmetric:
        scale = torch.clamp(wg.abs().amax(-1) / ((1 << (bits - 1)) - 1), min=eps)
        return scale, torch.full_like(scale, float(1 << (bits - 1)))
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = torch.clamp((hi - lo) / qmax, min=eps)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero
