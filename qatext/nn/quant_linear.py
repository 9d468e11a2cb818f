"""QuantLinear: a small base class and one class per training mode (modes.py), all merging losslessly
into `packed`.

| mode     | frozen (buffers)          | trained (parameters) | forward                                     |
| fake     | -                         | weight, scale, zero  | x @ fq(W)^T  (full QAT, Block-AP)           |
| lrqat    | P (packed INT-b or Q-fmt) | lora_a, lora_b, scale| x @ (s * (clamp(round(P + c A B)) - z))^T  |
| qalora   | packed q, scale, zero     | lora_a, lora_b       | x @ deq(q)^T + c * B A pool_g(x)            |
| e2eqp    | packed q, zero            | scale                | x @ deq(q, s)^T                             |
| packed   | packed q, scale, zero     | -                    | x @ deq(q)^T  (inference)                   |

`QuantLinear(in, out, spec, mode, ...)` and `QuantLinear.from_linear(linear, spec, mode=...)` are the
factory: they build the mode's class (each a QuantLinear), so saved models load by mode name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..quant import QuantSpec, init_qparams

MIN_SCALE = 1e-6


def positive(scale: torch.Tensor) -> torch.Tensor:
    """scale clamped to >= MIN_SCALE in value, with the gradient passed through unchanged, so an
    optimiser step past zero cannot make the quantizer divide by zero or flip sign."""
    return scale + (scale.clamp(min=MIN_SCALE) - scale).detach()


@dataclass(frozen=True)
class LayerOptions:
    """Per-layer options; each mode reads the ones it uses (`QuantLinear.OPTIONS`) and requires the
    others to keep their defaults."""

    rank: int = 0  # adapter rank (lrqat, qalora)
    alpha: float = 1.0  # adapter scaling alpha / rank (lrqat, qalora)
    frac_bits: int = 0  # LR-QAT's P: 0 = packed codes, else uint8 fixed point with this many fractional bits
    act_bits: int | None = None  # per-token activation fake-quant bits (W4A8: 8)
    checkpointing: bool = False  # recompute the weight in backward instead of holding it

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"QuantLinear: rank must be an int >= 0, got {self.rank!r}")
        if self.act_bits is not None and not 2 <= self.act_bits <= 8:
            raise ValueError(f"QuantLinear: act_bits must be in 2..8 or None, got {self.act_bits}")
        if not 0 <= self.frac_bits <= 6:
            raise ValueError(f"QuantLinear: frac_bits must be in 0..6, got {self.frac_bits}")


class QuantLinear(nn.Module):
    """A linear layer y = x W^T + b whose W is b-bit group-wise quantized; see the module docstring."""

    mode: ClassVar[str]
    OPTIONS: ClassVar[tuple[str, ...]] = ("act_bits", "checkpointing")
    MODES: ClassVar[dict[str, type[QuantLinear]]] = {}

    def __init_subclass__(cls, mode: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if mode is not None:
            cls.mode = mode
            QuantLinear.MODES[mode] = cls

    def __new__(cls, *args, **kwargs):
        if cls is QuantLinear:  # the factory: QuantLinear(in, out, spec, mode, ...)
            mode = args[3] if len(args) > 3 else kwargs.get("mode", "packed")
            if mode not in QuantLinear.MODES:
                raise ValueError(f"QuantLinear: unknown mode {mode!r}; expected one of {tuple(QuantLinear.MODES)}")
            cls = QuantLinear.MODES[mode]
        return super().__new__(cls)

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, mode: str | None = None,
                 bias: bool = False, device=None, dtype=torch.float32, **options):
        super().__init__()
        if mode is not None and mode != self.mode:
            raise ValueError(f"{type(self).__name__}: mode is {self.mode!r}, not {mode!r}")
        opts = LayerOptions(**options)
        unused = [f.name for f in fields(LayerOptions)
                  if f.name not in self.OPTIONS and getattr(opts, f.name) != f.default]
        if unused:
            raise ValueError(f"QuantLinear: mode {self.mode!r} takes no {', '.join(unused)}")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.options = opts
        self.group_size = spec.resolved_group_size(in_features)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._build(device, dtype)

    # Read-only views of the options (saved per layer, see io.py).
    rank = property(lambda self: self.options.rank)
    alpha = property(lambda self: self.options.alpha)
    frac_bits = property(lambda self: self.options.frac_bits)
    act_bits = property(lambda self: self.options.act_bits)
    checkpointing = property(lambda self: self.options.checkpointing)

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def qshape(self) -> tuple[int, int]:
        return self.out_features, self.spec.groups(self.in_features)

    @property
    def packed_shape(self) -> tuple[int, int]:
        return self.out_features, ops.packed_row_bytes(self.in_features, self.spec.bits)

    # ------------------------------------------------------------------ per mode

    def _build(self, device, dtype) -> None:
        """Create the mode's parameters and buffers."""
        raise NotImplementedError

    def _init_from(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Fill them from a float weight and its initial scale / zero (no grad)."""
        raise NotImplementedError

    def quantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with, in full precision (for inspection and merging)."""
        raise NotImplementedError

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed codes, scale, zero) of the same weight as frozen integers (no grad)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, mode: str = "fake", init: str = "minmax",
                    **options) -> QuantLinear:
        """Quantize an nn.Linear into `mode`, scales from `init` ('minmax', 'mse' or 'l4'). The layer's
        bias keeps the source's requires_grad."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = QuantLinear(linear.in_features, linear.out_features, spec, mode, bias=linear.bias is not None,
                            device=w.device, dtype=w.dtype, **options)
        scale, zero = init_qparams(w, spec, init)
        with torch.no_grad():
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
                layer.bias.requires_grad_(linear.bias.requires_grad)
            layer._init_from(w, scale, zero)
        return layer

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = ops.fake_quant_per_token(x, self.act_bits, False)
        return x

    def _bias_for(self, x: torch.Tensor):
        return None if self.bias is None else self.bias.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input's last dimension must be {self.in_features}, got {tuple(x.shape)}")
        if self.checkpointing and self.mode != "lrqat" and self.training and torch.is_grad_enabled():
            # Recompute the N x K weight in backward instead of holding it (lrqat_linear always does).
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _derived(self, mode: str, **options) -> QuantLinear:
        """An empty layer of `mode` with this layer's shape, spec, bias (and its requires_grad) and
        activation bits."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        out = QuantLinear(self.in_features, self.out_features, self.spec, mode, bias=self.bias is not None,
                          device=self.scale.device, dtype=dtype, act_bits=self.act_bits, **options)
        if self.bias is not None:
            with torch.no_grad():
                out.bias.copy_(self.bias)
            out.bias.requires_grad_(self.bias.requires_grad)
        return out

    @torch.no_grad()
    def to_packed(self) -> QuantLinear:
        """The same layer as frozen integer codes (mode 'packed'): same outputs, no adapter."""
        packed, scale, zero = self._merged()
        out = self._derived("packed")
        out.packed.copy_(packed)
        out.scale.copy_(scale)
        out.zero.copy_(zero)
        return out

    def to_mode(self, mode: str, **options) -> QuantLinear:
        """Convert a packed (or mergeable) layer into another frozen-integer mode, e.g. packed -> e2eqp."""
        packed = self.to_packed()
        if mode == "packed":
            return packed
        if mode not in ("e2eqp", "qalora"):
            raise ValueError(f"QuantLinear.to_mode: can convert to 'packed', 'e2eqp' or 'qalora', not {mode!r}")
        out = packed._derived(mode, **options)
        with torch.no_grad():
            for name in ("packed", "scale", "zero"):
                getattr(out, name).copy_(getattr(packed, name))
        return out

    def tile_for_decode(self):
        raise ValueError(f"QuantLinear.tile_for_decode: only mode 'packed' serves inference, not {self.mode!r}")

    def extra_repr(self) -> str:
        extra = f", rank={self.rank}, alpha={self.alpha}" if self.rank else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"bits={self.spec.bits}, group_size={self.spec.group_size}, symmetric={self.spec.symmetric}{extra}")


from . import modes  # noqa: E402,F401  (registers the mode classes)

MODES = tuple(QuantLinear.MODES)
