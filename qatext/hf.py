"""transformers' `from_pretrained` for a directory that `save_quantized` (or `qatext train`) wrote.

`import qatext.hf` registers quantization method "qatext" with transformers, so that
`AutoModelForCausalLM.from_pretrained(dir)` builds the saved QuantLinear layers and loads their codes,
scales and zeros, as `load_quantized` does. Without it transformers names the unknown method and loads
the linear layers randomly initialised; `qatext` itself leaves transformers' quantizers unimported
(they take seconds to import).
"""

from __future__ import annotations

from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from .io import FORMAT_VERSION, build_layers, check_version, finish_loading

logger = logging.get_logger(__name__)


@register_quantization_config("qatext")
class QatextConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a qatext model: every quantized layer's mode and options."""

    def __init__(self, layers: dict | None = None, version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = "qatext"
        self.layers = layers or {}
        self.version = version
        check_version(version, "from_pretrained: this qatext model")


@register_quantizer("qatext")
class QatextHfQuantizer(HfQuantizer):
    """Loads pre-quantized qatext models only (quantize with qatext.quantize_model or `qatext train`)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        pass

    def _process_model_before_weight_loading(self, model, **kwargs):
        build_layers(model, self.quantization_config.layers)

    def _process_model_after_weight_loading(self, model, **kwargs):
        # as load_quantized: the decode layout, once, where the decode kernel runs
        finish_loading(model, "from_pretrained", decode_layout=next(model.parameters()).device.type == "cuda")
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, safe_serialization=None) -> bool:
        # Asked by save_pretrained only, whose refusal points at the logger: say where to turn.
        logger.warning("qatext models are saved by qatext.save_quantized(model, directory), which from_pretrained "
                       "reads back (after `import qatext.hf`), as do load_quantized and the qatext CLI")
        return False


__all__ = ["QatextConfig", "QatextHfQuantizer"]
