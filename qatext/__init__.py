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


def set_value_checks(enabled: bool) -> None:
    """Turn the data-dependent checks (scale > 0, codes < 2^bits) on or off.

    They are on by default; each one reads a value back from the GPU, so a tight training loop
    whose inputs are known good may turn them off.
    """
    set_tuning(value_checks=enabled)


def value_checks(enabled: bool):
    """set_value_checks(enabled) for a block, then the previous setting back."""
    return tuning(value_checks=enabled)
