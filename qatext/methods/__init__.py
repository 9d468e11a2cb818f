"""Training recipes: RTN, full QAT (LSQ), LR-QAT, QA-LoRA, EfficientQAT (Block-AP + E2E-QP).

`run(name, model, spec, tokens, cfg, **kwargs)` applies one by name; each method's module holds its
paper defaults. `default_config(name, **overrides)` gives the optimiser settings each paper uses.
"""

from __future__ import annotations

from ..train import TrainConfig
from .efficientqat import block_ap, e2e_qp, efficientqat
from .full_qat import full_qat
from .lrqat import lrqat
from .ptq import rtn
from .qalora import qalora

METHODS = ("rtn", "full_qat", "lrqat", "qalora", "efficientqat")

_DEFAULTS = {
    "rtn": {},
    "full_qat": dict(schedule="cosine", clip=1.0),
    "lrqat": dict(schedule="linear", betas=(0.9, 0.95), weight_decay=0.0, clip=1.0),
    "qalora": dict(schedule="constant", betas=(0.9, 0.999), clip=0.3),
    "efficientqat": dict(schedule="cosine", clip=1.0),
}


def default_config(name: str, **overrides) -> TrainConfig:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
    cfg = {**_DEFAULTS[name], **overrides}
    if name == "lrqat" and "warmup_steps" not in overrides:
        cfg["warmup_steps"] = max(1, cfg.get("steps", 100) // 10)
    return TrainConfig(**cfg)


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
