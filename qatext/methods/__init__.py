"""Training recipes: RTN, full QAT (LSQ), LR-QAT, QA-LoRA, EfficientQAT (Block-AP + E2E-QP).

`run(name, model, spec, tokens, cfg, **kwargs)` applies one by name; each method's module holds its
paper defaults. `default_config(name, **overrides)` gives the optimiser settings each paper uses.
"""

from __future__ import annotations

from ..train import TrainConfig
from . import efficientqat as _efficientqat
from . import full_qat as _full_qat
from . import lrqat as _lrqat
from . import ptq as _ptq
from . import qalora as _qalora
from .efficientqat import block_ap, e2e_qp, efficientqat
from .full_qat import full_qat
from .lrqat import lrqat
from .ptq import rtn
from .qalora import qalora

METHODS = ("rtn", "full_qat", "lrqat", "qalora", "efficientqat")
_MODULES = {"rtn": _ptq, "full_qat": _full_qat, "lrqat": _lrqat, "qalora": _qalora, "efficientqat": _efficientqat}


def default_config(name: str, **overrides) -> TrainConfig:
    """The TrainConfig of method `name` with its paper's optimiser settings (its TRAIN_DEFAULTS)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
    return TrainConfig(**_MODULES[name].TRAIN_DEFAULTS.config(**overrides))


def run(name: str, model, spec, tokens, cfg: TrainConfig, **kwargs):
    """Apply method `name`; returns (model, loss history)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
    if name == "rtn":
        return rtn(model, spec, **kwargs), []
    fn = {"full_qat": full_qat, "lrqat": lrqat, "qalora": qalora, "efficientqat": efficientqat}[name]
    return fn(model, spec, tokens, cfg, **kwargs)


__all__ = ["METHODS", "block_ap", "default_config", "e2e_qp", "efficientqat", "full_qat", "lrqat", "qalora", "rtn",
           "run"]
