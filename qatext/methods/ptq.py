"""Round-to-nearest post-training quantization (the baseline every QAT method must beat)."""

from __future__ import annotations

from ..models import quantize_model
from ..quant import QuantSpec
from .common import TrainDefaults

TRAIN_DEFAULTS = TrainDefaults(schedule="linear")  # nothing trains


def rtn(model, spec: QuantSpec, init: str = "minmax", target_modules=None):
    """Quantize every decoder Linear to frozen integer codes with min-max (or searched) scales."""
    return quantize_model(model, spec, method="packed", init=init, target_modules=target_modules)
