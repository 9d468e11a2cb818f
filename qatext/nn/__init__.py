"""Quantized modules."""

from .quant_linear import MODES, QuantLinear

__all__ = ["MODES", "QuantLinear"]
