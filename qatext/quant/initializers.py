"""Scale / zero initialisers for group-wise weight quantization, and round-to-nearest codes."""

from __future__ import annotations

import torch

from .primitives import grouped, quantize_codes, range_qparams
from .spec import QuantSpec


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[N, K] as float [N, K / g, g], after checking that the group divides K."""
    return grouped(w.float(), spec.resolved_group_size(w.shape[1]))


def _range_qparams(lo, hi, spec: QuantSpec):
    return range_qparams(lo, hi, spec.bits, spec.symmetric)


def minmax_qparams(w: torch.Tensor, bits: int | QuantSpec, group_size: int = -1, symmetric: bool = False):
    """Scale and zero [N, K/g] (float32) mapping each group's min/max onto [0, 2^b - 1].

    Asymmetric: s = (max - min) / (2^b - 1), z = round(-min / s). Symmetric: s = absmax / (2^(b-1) - 1),
    z = 2^(b-1).
    """
    spec = bits if isinstance(bits, QuantSpec) else QuantSpec(bits, group_size, symmetric)
    wg = _grouped(w, spec)
    return _range_qparams(wg.amin(-1), wg.amax(-1), spec)


def lp_search_qparams(w: torch.Tensor, spec: QuantSpec, p: float = 2.0, grid: int = 40, min_shrink: float = 0.5):
    """Per-group clipping search: shrink the min/max range by factors in [min_shrink, 1] and keep,
    for every group, the one minimising ||fq(w) - w||_p^p (p = 2: MSE; LR-QAT uses p = 4)."""
    wg = _grouped(w, spec)
    lo, hi = wg.amin(-1), wg.amax(-1)
    best_err = torch.full(lo.shape, float("inf"), device=w.device)
    best_s, best_z = _range_qparams(lo, hi, spec)
    for alpha in torch.linspace(1.0, min_shrink, grid).tolist():
        s, z = _range_qparams(lo * alpha, hi * alpha, spec)
        q = quantize_codes(wg, s, z, spec.bits)
        err = ((q - z[..., None]) * s[..., None] - wg).abs().pow(p).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def init_qparams(w: torch.Tensor, spec: QuantSpec, method: str = "minmax"):
    """method: 'minmax', 'mse' (L2 search) or 'l4' (L4-norm search, LR-QAT's choice)."""
    if method == "minmax":
        return minmax_qparams(w, spec)
    if method in ("mse", "l2"):
        return lp_search_qparams(w, spec, p=2.0)
    if method == "l4":
        return lp_search_qparams(w, spec, p=4.0)
    raise ValueError(f"unknown scale init {method!r}; expected 'minmax', 'mse' or 'l4'")


def rtn_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """uint8 codes clamp(round(w / s) + z, 0, 2^b - 1) for integer-valued zeros."""
    wg = _grouped(w, spec)
    return quantize_codes(wg, scale.float(), zero.float(), spec.bits).reshape(w.shape).to(torch.uint8)
