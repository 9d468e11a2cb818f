"""qatext: quantization-aware training of LLMs on hand-written CUDA kernels."""

from __future__ import annotations

import torch

from . import _C, nn, ops, quant  # noqa: F401  (_C registers torch.ops.qatext)
from .export import export_model
from .io import load_quantized, save_quantized
from .models import merge_model, quantize_model
from .nn import QuantLinear
from .quant import QuantSpec
from .knobs import get_tuning, set_tuning, tuning, tuning_table

__all__ = ["QuantLinear", "QuantSpec", "build_info", "export_model", "load_quantized", "merge_model", "quantize_model",
           "save_quantized", "set_tuning", "get_tuning", "set_value_checks", "tuning", "tuning_table", "value_checks"]

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built: torch version, whether CUDA kernels were compiled, the archs."""
    info = dict(_C.build_info())
    info["torch_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info


def set_value_checks(enabled: bool | int) -> None:
    """The data-dependent checks (scale > 0 and finite, codes < 2^bits): True (or 2) runs them on every
    device, False (0) never, 1 (the default) on CPU tensors only.

    A check on a GPU tensor reads a value back and so synchronises the GPU; by default the ops skip it
    there, and QuantLinear layers check their own values once instead, where they are loaded
    (load_quantized). Turn them on to find where a bad scale comes from.
    """
    set_tuning(value_checks=_check_level(enabled))


def value_checks(enabled: bool | int):
    """set_value_checks(enabled) for a block, then the previous setting back."""
    return tuning(value_checks=_check_level(enabled))


def _check_level(enabled: bool | int) -> int:
    """True asks for every device (level 2), not the default's CPU-only level 1 that int(True) would give."""
    return 2 if enabled is True else int(enabled)
