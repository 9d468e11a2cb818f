"""HQQ checkpoints (read by the hqq library: `AutoHQQHFModel.from_quantized(dir)`), which keep zero
points in floating point: a merged QA-LoRA adapter or any trained fractional zero exports exactly.

HQQ's layout (axis 1, grouped along K like qatext): the [N, K] codes are viewed as [N * K / g, g] rows,
one scale and zero per row ([N * K / g, 1], here fp32 so nothing is rounded), w = (q - zero) * scale.
The rows are packed by splitting them into 8 / b (3 bits: 10) equal slices and or-ing slice i into
bits from the top: 4 bits `(q[:R/2] << 4) | q[R/2:]` in uint8, 2 bits four slices in uint8, 3 bits ten
slices in int32 (rows zero-padded to a multiple of 10), 5-8 bits one code per byte.
Files: config.json (the model's) and qmodel.pt, a dict {module name: state dict} of every leaf module
with tensors, read with torch.load(weights_only=True).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import write_hf_config
from .layers import QuantizedWeight, dense_tensors

BITS = (2, 3, 4, 5, 6, 8)
WEIGHTS_NAME = "qmodel.pt"
_PACKING = {2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8", 5: "8bit_u8", 6: "8bit_u8", 8: "8bit_u8"}


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """HQQ's bit packing of [R, g] codes along the rows."""
    if bits >= 5:
        return q.to(torch.uint8)
    slices = 10 if bits == 3 else 8 // bits
    dtype = torch.int32 if bits == 3 else torch.uint8
    rows = -(-q.shape[0] // slices) * slices if bits == 3 else q.shape[0]
    if rows % slices:
        raise ValueError(f"export (hqq): {q.shape[0]} groups do not split into {slices} slices for {bits}-bit packing")
    padded = torch.zeros((rows, q.shape[1]), dtype=dtype)
    padded[:q.shape[0]] = q.to(dtype)
    step = rows // slices
    packed = torch.zeros((step, q.shape[1]), dtype=dtype)
    for i in range(slices):
        packed |= padded[i * step:(i + 1) * step] << (bits * (slices - 1 - i))
    return packed


def layer_state(w: QuantizedWeight, compute_dtype: torch.dtype) -> dict:
    """HQQLinear.state_dict() of this layer (the keys its load_state_dict reads)."""
    if w.bits not in BITS:
        raise ValueError(f"export (hqq): {w.name} has {w.bits} bits; HQQ packs {BITS}")
    rows = w.out_features * w.in_features // w.group_size
    state = {
        "W_q": pack_rows(w.codes.reshape(rows, w.group_size), w.bits),
        "nbits": w.bits, "group_size": w.group_size, "shape": torch.Size([w.out_features, w.in_features]),
        "scale": w.scale.reshape(rows, 1).contiguous(), "zero": w.zero.reshape(rows, 1).contiguous(),
        "axis": 1, "packing": _PACKING[w.bits], "unpack_view_dtype": torch.int32 if w.bits == 3 else torch.uint8,
        "view_as_float": False, "quant_scale": False, "quant_zero": False, "compute_dtype": compute_dtype,
        "offload_meta": False, "stores_quant_config": True, "channel_wise": True, "optimize": False,
        "round_zero": False,
    }
    if w.bias is not None:
        state["bias"] = w.bias
    return state


def write(model, weights: list[QuantizedWeight], out_dir: Path) -> dict:
    """Write config.json and qmodel.pt into out_dir; returns a summary of the quantization."""
    dtype = next(model.parameters()).dtype
    modules: dict[str, dict] = {}
    # The loader sets each module's tensors as new parameters, which unties a tied lm_head: keep it.
    for key, tensor in dense_tensors(model, weights, keep_tied=True).items():
        module, _, attr = key.rpartition(".")
        modules.setdefault(module, {})[attr] = tensor
    for w in weights:
        modules[w.name] = layer_state(w, dtype)
    write_hf_config(model, out_dir)  # hqq's loader reads no quantization_config
    torch.save(modules, out_dir / WEIGHTS_NAME)
    spec = weights[0].spec
    return {"quant_method": "hqq", "bits": spec.bits, "group_size": spec.group_size, "zero_points": "float32"}
