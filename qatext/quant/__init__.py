"""Quantizer parameters and their initialisers."""

from .initializers import minmax_qparams

__all__ = ["minmax_qparams"]
