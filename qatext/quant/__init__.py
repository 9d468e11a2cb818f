"""Quantizer specification, scale / zero initialisers, round-to-nearest codes."""

from .initializers import init_qparams, lp_search_qparams, minmax_qparams, rtn_codes
from .spec import QuantSpec

__all__ = ["QuantSpec", "init_qparams", "lp_search_qparams", "minmax_qparams", "rtn_codes"]
