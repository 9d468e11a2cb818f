"""QuantLinear: one module, one forward per training mode, all merging losslessly into `packed`.

| mode     | frozen (buffers)          | trained (parameters) | forward                                     |
| fake     | -                         | weight, scale, zero  | x @ fq(W)^T  (full QAT, Block-AP)           |
| lrqat    | P (packed INT-b or Q-fmt) | lora_a, lora_b, scale| x @ (s * (clamp(round(P + c A B)) - z))^T  |
| qalora   | packed q, scale, zero     | lora_a, lora_b       | x @ deq(q)^T + c * B A pool_g(x)            |
| e2eqp    | packed q, zero            | scale                | x @ deq(q, s)^T                             |
| packed   | packed q, scale, zero     | -                    | x @ deq(q)^T  (inference)                   |
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..quant import QuantSpec, init_qparams, rtn_codes
from ..reference import lrqat_p_values, ste_round

MODES = ("fake", "lrqat", "qalora", "e2eqp", "packed")
MIN_SCALE = 1e-6


def positive(scale: torch.Tensor) -> torch.Tensor:
    """scale clamped to >= MIN_SCALE in value, with the gradient passed through unchanged, so an
    optimiser step past zero cannot make the quantizer divide by zero or flip sign."""
    return scale + (scale.clamp(min=MIN_SCALE) - scale).detach()


class QuantLinear(nn.Module):
    """A linear layer y = x W^T + b whose W is b-bit group-wise quantized; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, mode: str = "packed", bias: bool = False,
                 rank: int = 0, alpha: float = 1.0, frac_bits: int = 0, act_bits: int | None = None,
                 checkpointing: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"QuantLinear: unknown mode {mode!r}; expected one of {MODES}")
        if mode in ("lrqat", "qalora") and rank <= 0:
            raise ValueError(f"QuantLinear: mode {mode!r} needs rank > 0, got {rank}")
        if act_bits is not None and not 2 <= act_bits <= 8:
            raise ValueError(f"QuantLinear: act_bits must be in 2..8 or None, got {act_bits}")
        groups = spec.groups(in_features)
        self.in_features, self.out_features, self.spec, self.mode = in_features, out_features, spec, mode
        self.rank, self.alpha, self.frac_bits, self.act_bits = rank, alpha, frac_bits, act_bits
        self.checkpointing = checkpointing
        self.group_size = spec.resolved_group_size(in_features)
        f32 = dict(device=device, dtype=torch.float32)
        qshape = (out_features, groups)
        packed_shape = (out_features, (in_features * spec.bits + 7) // 8)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

        if mode == "fake":
            self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            self.scale = nn.Parameter(torch.ones(qshape, **f32))
            zero = torch.full(qshape, float(1 << (spec.bits - 1)), **f32)
            if spec.symmetric:
                self.register_buffer("zero", zero)
            else:
                self.zero = nn.Parameter(zero)
            return
        if mode == "lrqat":
            p_shape = packed_shape if frac_bits == 0 else (out_features, in_features)
            self.register_buffer("p", torch.zeros(p_shape, device=device, dtype=torch.uint8))
            self.lora_a = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
            self.lora_b = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(self.lora_b, a=math.sqrt(5))
            self.scale = nn.Parameter(torch.ones(qshape, **f32))
            self.register_buffer("zero", torch.zeros(qshape, **f32))
            return
        self.register_buffer("packed", torch.zeros(packed_shape, device=device, dtype=torch.uint8))
        self.register_buffer("zero", torch.zeros(qshape, **f32))
        if mode == "e2eqp":
            self.scale = nn.Parameter(torch.ones(qshape, **f32))
        else:
            self.register_buffer("scale", torch.ones(qshape, **f32))
        if mode == "qalora":
            # QA-LoRA: A sees the group-pooled input [.., K / g]; B [N, r] starts at zero.
            self.lora_a = nn.Parameter(torch.empty(rank, groups, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, mode: str = "fake", init: str = "minmax",
                    **kwargs) -> "QuantLinear":
        """Quantize an nn.Linear into `mode`, scales from `init` ('minmax', 'mse' or 'l4')."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, spec, mode, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype, **kwargs)
        scale, zero = init_qparams(w, spec, init)
        with torch.no_grad():
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            layer.scale.copy_(scale)
            layer.zero.copy_(zero)
            if mode == "fake":
                layer.weight.copy_(w)
            elif mode == "lrqat":
                layer.p.copy_(cls._lrqat_p(w, scale, zero, spec, layer.frac_bits))
            else:
                layer.packed.copy_(ops.pack(rtn_codes(w, scale, zero, spec), spec.bits))
        return layer

    @staticmethod
    def _lrqat_p(w, scale, zero, spec: QuantSpec, frac_bits: int) -> torch.Tensor:
        """phi(W0 / s0) in code space: integer codes (packed) or fixed point with frac_bits."""
        if frac_bits == 0:
            return ops.pack(rtn_codes(w, scale, zero, spec), spec.bits)
        g = spec.resolved_group_size(w.shape[1])
        x = w.float().reshape(w.shape[0], -1, g) / scale[..., None] + zero[..., None]
        fixed = torch.round(torch.clamp(x, 0, spec.qmax) * (1 << frac_bits))
        return fixed.reshape(w.shape).to(torch.uint8)

    # ------------------------------------------------------------------ forward

    def _zero_for_forward(self) -> torch.Tensor:
        # Trained zeros stay integer in the forward (straight-through), so merging is exact.
        return ste_round(self.zero) if isinstance(self.zero, nn.Parameter) else self.zero

    def quantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with, in full precision (for inspection and merging)."""
        s = self.spec
        if self.mode == "fake":
            return ops.fake_quant(self.weight, positive(self.scale), self._zero_for_forward(), s.bits, self.group_size)
        if self.mode == "lrqat":
            return ops.lrqat_weight(self.p, self.lora_a, self.lora_b, positive(self.scale), self.zero, self.lora_scale,
                                    s.bits, self.group_size, self.frac_bits)
        w = ops.dequant(self.packed, self.scale, self.zero, s.bits, self.group_size, self.in_features)
        if self.mode == "qalora":
            delta = ops.qalora_delta(self.lora_a, self.lora_b, self.lora_scale, self.group_size)
            w = w + delta[:, :, None].expand(-1, -1, self.group_size).reshape(w.shape)
        return w

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if self.act_bits is not None:
            x = ops.fake_quant_per_token(x, self.act_bits, False)
        if self.mode == "lrqat":
            # fp32 adapters (e.g. FSDP's fp32 masters) enter in the 16-bit activation dtype, as one
            # process's bf16 model has them, so the tensor-core kernels apply; gradients flow back in fp32.
            half = x.dtype in (torch.bfloat16, torch.float16)
            a, b = (self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)) if half else (self.lora_a, self.lora_b)
            return ops.lrqat_linear(x, self.p, a, b, positive(self.scale), self.zero, self.lora_scale, s.bits,
                                    self.group_size, self.frac_bits, self.bias)
        if self.mode == "fake":
            w = self.quantized_weight()
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.mode == "packed" and getattr(self, "tiled", None) is not None and not torch.is_grad_enabled():
            return ops.dequant_matmul_tiled(x, self._current_tiled(), positive(self.scale), self.zero, s.bits,
                                            self.group_size, bias)
        y = ops.dequant_matmul(x, self.packed, positive(self.scale), self.zero, s.bits, self.group_size, bias)
        if self.mode == "qalora":
            # pool_g(x) A^T = x (A / g, each column repeated g times)^T: the pooling folds into the
            # adapter's first GEMM (no pooled copy of x, fp32 accumulation over all of K).
            a_pooled = (self.lora_a.to(x.dtype) / self.group_size).repeat_interleave(self.group_size, dim=1)
            y = y + self.lora_scale * F.linear(F.linear(x, a_pooled), self.lora_b.to(x.dtype))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input's last dimension must be {self.in_features}, got {tuple(x.shape)}")
        if self.checkpointing and self.mode != "lrqat" and self.training and torch.is_grad_enabled():
            # Recompute the N x K weight in backward instead of holding it (lrqat_linear always does).
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    # ------------------------------------------------------------------ decode

    @torch.no_grad()
    def tile_for_decode(self) -> "QuantLinear":
        """Also hold the codes in the decode GEMM's tiled layout (bits 2, 3 or 4; out_features % 16 == 0,
        in_features % 64 == 0): a non-persistent buffer of bits / 8 bytes per weight. A 'packed' layer
        then serves forward passes without gradients (inference, generation) from it; with gradients it
        keeps the packed path. Re-tiled by itself if `packed` changes (load_state_dict, .to())."""
        if self.mode != "packed":
            raise ValueError(f"QuantLinear.tile_for_decode: only mode 'packed' serves inference, not {self.mode!r}")
        self.register_buffer("tiled", ops.tile_packed(self.packed, self.spec.bits, self.in_features), persistent=False)
        self._tiled_from = self._packed_stamp()
        return self

    def _packed_stamp(self) -> tuple:
        try:
            version = self.packed._version
        except RuntimeError:  # an inference-mode tensor has no version counter
            version = -1
        return self.packed.data_ptr(), version

    @torch.no_grad()
    def _current_tiled(self) -> torch.Tensor:
        if getattr(self, "_tiled_from", None) != self._packed_stamp():
            self.tile_for_decode()
        return self.tiled

    # ------------------------------------------------------------------ merge

    @torch.no_grad()
    def to_packed(self) -> "QuantLinear":
        """The same layer as frozen integer codes (mode 'packed'): same outputs, no adapter."""
        s = self.spec
        dev, dtype = self.scale.device, (self.bias.dtype if self.bias is not None else torch.float32)
        out = QuantLinear(self.in_features, self.out_features, s, "packed", bias=self.bias is not None,
                          device=dev, dtype=dtype)
        scale, zero = positive(self.scale.detach().float()), self.zero.detach().float()
        if self.mode == "fake":
            zero = torch.round(zero)
            packed = ops.pack(rtn_codes(self.weight.detach(), scale, zero, s), s.bits)
        elif self.mode == "lrqat":
            u = lrqat_p_values(self.p, s.bits, self.frac_bits, self.in_features)
            u = u + self.lora_scale * (self.lora_a.float() @ self.lora_b.float())
            packed = ops.pack(torch.clamp(torch.round(u), 0, s.qmax).to(torch.uint8), s.bits)
        else:
            packed = self.packed
            if self.mode == "qalora":
                zero = ops.qalora_merged_zero(zero, scale, self.lora_a, self.lora_b, self.lora_scale, self.group_size)
        out.packed.copy_(packed)
        out.scale.copy_(scale)
        out.zero.copy_(zero)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.act_bits = self.act_bits
        return out

    def to_mode(self, mode: str, **kwargs) -> "QuantLinear":
        """Convert a packed (or mergeable) layer into another frozen-integer mode, e.g. packed -> e2eqp."""
        packed = self.to_packed()
        if mode == "packed":
            return packed
        if mode not in ("e2eqp", "qalora"):
            raise ValueError(f"QuantLinear.to_mode: can convert to 'packed', 'e2eqp' or 'qalora', not {mode!r}")
        out = QuantLinear(self.in_features, self.out_features, self.spec, mode, bias=self.bias is not None,
                          device=self.scale.device, dtype=packed.bias.dtype if self.bias is not None else torch.float32,
                          act_bits=self.act_bits, **kwargs)
        with torch.no_grad():
            for name in ("packed", "scale", "zero"):
                getattr(out, name).copy_(getattr(packed, name))
            if self.bias is not None:
                out.bias.copy_(packed.bias)
        return out

    def extra_repr(self) -> str:
        extra = f", rank={self.rank}, alpha={self.alpha}" if self.rank else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"bits={self.spec.bits}, group_size={self.spec.group_size}, symmetric={self.spec.symmetric}{extra}")
