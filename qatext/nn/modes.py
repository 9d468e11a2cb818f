"""One QuantLinear class per mode: what it stores, how it computes, how it merges into `packed`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import knobs, ops
from ..quant import rtn_codes
from ..quant.primitives import grouped, qmax, symmetric_zero
from .quant_linear import QuantLinear, positive
from .shared_input import version_stamp


def _f32(device):
    return dict(device=device, dtype=torch.float32)


class FakeQuantLinear(QuantLinear, mode="fake"):
    """Full QAT and Block-AP: float weight, scale and zero all trained through fq(W)."""

    def _build(self, device, dtype):
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, device=device, dtype=dtype))
        self.scale = nn.Parameter(torch.ones(self.qshape, **_f32(device)))
        zero = torch.full(self.qshape, symmetric_zero(self.spec.bits), **_f32(device))
        if self.spec.symmetric:
            self.register_buffer("zero", zero)
        else:
            self.zero = nn.Parameter(zero)

    def _init_from(self, w, scale, zero):
        self.weight.copy_(w)
        self.scale.copy_(scale)
        self.zero.copy_(zero)

    def quantized_weight(self):
        # The op keeps the scale positive and the trained zero integer (straight-through), so merging
        # is exact; inside the kernel, not as six more launches a forward.
        return ops.fake_quant(self.weight, self.scale, self.zero, self.spec.bits, self.group_size)

    def _forward(self, x):
        x = self._input(x)
        return F.linear(x, self.quantized_weight().to(x.dtype), self._bias_for(x))

    def _merged(self):
        scale, zero = positive(self.scale.detach().float()), torch.round(self.zero.detach().float())
        return ops.pack(rtn_codes(self.weight.detach(), scale, zero, self.spec), self.spec.bits), scale, zero


class LRQATLinear(QuantLinear, mode="lrqat"):
    """LR-QAT: frozen P = phi(W0 / s0) (packed codes or uint8 fixed point), trained A, B and scale."""

    OPTIONS = ("rank", "alpha", "frac_bits", "act_bits", "checkpointing")

    def _build(self, device, dtype):
        if self.rank <= 0:
            raise ValueError(f"QuantLinear: mode 'lrqat' needs rank > 0, got {self.rank}")
        p_shape = self.packed_shape if self.frac_bits == 0 else (self.out_features, self.in_features)
        self.register_buffer("p", torch.zeros(p_shape, device=device, dtype=torch.uint8))
        self.lora_a = nn.Parameter(torch.zeros(self.out_features, self.rank, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(self.rank, self.in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_b, a=math.sqrt(5))
        self.scale = nn.Parameter(torch.ones(self.qshape, **_f32(device)))
        self.register_buffer("zero", torch.zeros(self.qshape, **_f32(device)))

    def _init_from(self, w, scale, zero):
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        if self.frac_bits == 0:
            self.p.copy_(ops.pack(rtn_codes(w, scale, zero, self.spec), self.spec.bits))
        else:  # phi(W0 / s0) in code space as fixed point with frac_bits fractional bits
            x = grouped(w.float(), self.group_size) / scale[..., None] + zero[..., None]
            fixed = torch.round(torch.clamp(x, 0, self.spec.qmax) * (1 << self.frac_bits))
            self.p.copy_(fixed.reshape(w.shape).to(torch.uint8))

    def _p_values(self) -> torch.Tensor:
        """P in code space as float: the unpacked codes, or the fixed point divided out."""
        if self.frac_bits == 0:
            return ops.unpack(self.p, self.spec.bits, self.in_features).float()
        return self.p.float() / (1 << self.frac_bits)

    def quantized_weight(self):
        return ops.lrqat_weight(self.p, self.lora_a, self.lora_b, self.scale, self.zero, self.lora_scale,
                                self.spec.bits, self.group_size, self.frac_bits)

    def _forward(self, x):
        x = self._input(x)
        # fp32 adapters (e.g. FSDP's fp32 masters) enter in the 16-bit activation dtype, as one
        # process's bf16 model has them, so the tensor-core kernels apply; gradients flow back in fp32.
        half = x.dtype in (torch.bfloat16, torch.float16)
        a, b = (self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)) if half else (self.lora_a, self.lora_b)
        # The kernels keep the trained scale >= MIN_SCALE (straight-through): no clamp ops a forward.
        return ops.lrqat_linear(x, self.p, a, b, self.scale, self.zero, self.lora_scale, self.spec.bits,
                                self.group_size, self.frac_bits, self.bias)

    def _merged(self):
        u = self._p_values() + self.lora_scale * (self.lora_a.float() @ self.lora_b.float())
        codes = torch.clamp(torch.round(u), 0, qmax(self.spec.bits)).to(torch.uint8)
        return ops.pack(codes, self.spec.bits), positive(self.scale.detach().float()), self.zero.detach().float()


class _FrozenCodes(QuantLinear):
    """Modes over frozen packed codes: e2eqp (trained scale), qalora (adapter), packed (inference)."""

    TRAINED_SCALE = False

    def _build(self, device, dtype):
        self.register_buffer("packed", torch.zeros(self.packed_shape, device=device, dtype=torch.uint8))
        self.register_buffer("zero", torch.zeros(self.qshape, **_f32(device)))
        scale = torch.ones(self.qshape, **_f32(device))
        if self.TRAINED_SCALE:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def _init_from(self, w, scale, zero):
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        self.packed.copy_(ops.pack(rtn_codes(w, scale, zero, self.spec), self.spec.bits))

    def packed_codes(self) -> torch.Tensor:
        """The codes in the packed layout ([N, K * bits / 8] uint8)."""
        return self.packed

    def quantized_weight(self):
        return ops.dequant(self.packed_codes(), self.scale, self.zero, self.spec.bits, self.group_size,
                           self.in_features)

    def _scale(self) -> torch.Tensor:
        """The scale the kernels read: clamped positive only where an optimiser moves it (a frozen one
        was checked when made or loaded, and the clamp would cost three launches a forward)."""
        return positive(self.scale) if self.TRAINED_SCALE else self.scale

    def _matmul(self, x):
        """x @ deq(q)^T + b for an input already through _input."""
        return ops.dequant_matmul(x, self.packed_codes(), self._scale(), self.zero, self.spec.bits, self.group_size,
                                  self._bias_for(x))

    def _forward(self, x):
        return self._matmul(self._input(x))

    def _merged(self):
        return self.packed_codes(), positive(self.scale.detach().float()), self.zero.detach().float()


class E2EQPLinear(_FrozenCodes, mode="e2eqp"):
    """EfficientQAT's E2E-QP: frozen codes and zeros, trained step sizes."""

    TRAINED_SCALE = True


class QALoRALinear(_FrozenCodes, mode="qalora"):
    """QA-LoRA: frozen group-wise codes, an adapter on the group-pooled input, merged into the zeros."""

    OPTIONS = ("rank", "alpha", "act_bits", "checkpointing")

    def _build(self, device, dtype):
        if self.rank <= 0:
            raise ValueError(f"QuantLinear: mode 'qalora' needs rank > 0, got {self.rank}")
        super()._build(device, dtype)
        # A sees the group-pooled input [.., K / g]; B [N, r] starts at zero.
        self.lora_a = nn.Parameter(torch.empty(self.rank, self.qshape[1], device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, self.rank, device=device, dtype=dtype))

    def quantized_weight(self):
        w = super().quantized_weight()
        delta = ops.qalora_delta(self.lora_a, self.lora_b, self.lora_scale, self.group_size)
        return w + delta[:, :, None].expand(-1, -1, self.group_size).reshape(w.shape)

    def _forward(self, x):
        # The adapter sees the input pooled over each group [.., K / g] (ops.qalora_linear).
        x = self._input(x)
        return ops.qalora_linear(x, self.packed, self.scale, self.zero, self.lora_a, self.lora_b, self.lora_scale,
                                 self.spec.bits, self.group_size, self._bias_for(x))

    def _merged(self):
        packed, scale, zero = super()._merged()
        return packed, scale, ops.qalora_merged_zero(zero, scale, self.lora_a, self.lora_b, self.lora_scale,
                                                     self.group_size)


class PackedLinear(_FrozenCodes, mode="packed"):
    """Inference: frozen codes, scales and zeros. Each forward takes the fastest path by itself: on a
    GPU, where no gradient is needed, with a 16-bit input of few tokens (decode: up to the crossover that
    `tile_for_decode` measured for the shape, or `decode_gemm_max_m` where that is set), the decode kernel
    on a tiled copy of the codes; otherwise the packed path (fused kernel or dequant + cuBLAS, see
    dequant_matmul; from the tiled codes where the layer holds only those, see dequant_matmul_tiled).

    After `tile_for_decode()` the tiled codes are the layer's only copy (the `packed` buffer is
    dropped): `packed_codes()`, the state dict, merges and exports lay them out as `packed` again when
    asked, and a state dict loaded in is tiled into place, so checkpoints and files are unchanged."""

    def _build(self, device, dtype):
        super()._build(device, dtype)
        # The decode kernel's layout needs bits 2..4, N % 16 == 0 and K % 64 == 0.
        self._tileable = self.spec.bits in (2, 3, 4) and self.out_features % 16 == 0 and self.in_features % 64 == 0

    def _forward(self, x):
        x = self._input(x)
        if self._decodes(x):
            shared = getattr(self, "_shared_input", None)  # (group, index): one GEMM with siblings
            if shared is not None:
                return shared[0].output(shared[1], x)
        elif self.holds_packed or self._needs_grad(x):
            return self._matmul(x)
        # The decode kernel, or beyond it on tiled-only codes (a prefill: dequantised straight from them,
        # no untiled copy made first).
        return ops.dequant_matmul_tiled(x, self._current_tiled(), self._scale(), self.zero, self.spec.bits,
                                        self.group_size, self._bias_for(x))

    def _needs_grad(self, x) -> bool:
        # Grad mode alone needs none (a loop without no_grad over frozen weights): only a gradient that
        # something would need, which the tiled ops have no backward for.
        return torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))

    def _decodes(self, x) -> bool:
        if self._needs_grad(x) or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
            return False
        # Traced by torch.compile, the copy must exist already (models.tile_for_decode before compiling).
        if not self._tileable or (torch.compiler.is_compiling() and getattr(self, "tiled", None) is None):
            return False
        return x.numel() <= self._decode_max_tokens(x.device) * self.in_features

    def _decode_max_tokens(self, device) -> int:
        """decode_gemm_max_m where it is set, else the crossover measured for the GEMM this layer's decode
        runs (its own shape, or its shared-input group's), read once and kept (under torch.compile it
        must be known already: tile_for_decode)."""
        max_m = knobs.current("decode_gemm_max_m")
        if max_m >= 0:
            return max_m
        if getattr(self, "_decode_crossover", None) is None:
            shared = getattr(self, "_shared_input", None)
            self._decode_crossover = (shared[0].crossover(device) if shared is not None else
                                      ops.decode_gemm_crossover(device, self.out_features, self.in_features,
                                                                self.spec.bits, self.group_size))
        return self._decode_crossover

    @torch.no_grad()
    def tile_for_decode(self, tune: bool = True, keep_packed: bool = False) -> PackedLinear:
        """Lay the codes out for the decode GEMM now (bits 2, 3 or 4; out_features % 16 == 0, in_features %
        64 == 0), as the layer's storage: the `packed` buffer is dropped unless `keep_packed` (then the tiled
        copy is a non-persistent buffer of bits / 8 more bytes per weight, re-tiled by itself if `packed`
        changes). Decode forwards make a kept copy by themselves on first use; call this before
        torch.compile or CUDA-graph capture. On a GPU, `tune` also times the decode kernel's variants for
        this weight shape once (ops.tune_decode_gemm; it synchronises the GPU)."""
        if self.holds_packed:
            tiled = ops.tile_packed(self.packed, self.spec.bits, self.in_features)
            self.register_buffer("tiled", tiled, persistent=False)
            self._tiled_from = self.codes_stamp()
            if not keep_packed:
                self.drop_packed()
        if tune and self.tiled.is_cuda:
            ops.tune_decode_gemm(self.tiled, self._scale(), self.zero, self.spec.bits, self.group_size,
                                 self.in_features)
        self._decode_crossover = None  # read again: tuning may have measured it
        if self.tiled.is_cuda:
            self._decode_max_tokens(self.tiled.device)
        return self

    @property
    def holds_packed(self) -> bool:
        """Whether the codes are (also) held in the packed layout, or only tiled (see tile_for_decode)."""
        return "packed" in self._buffers

    @torch.no_grad()
    def drop_packed(self) -> None:
        """Keep the codes only in the tiled layout (made now if it is not current)."""
        self._current_tiled()
        del self._buffers["packed"]

    def packed_codes(self) -> torch.Tensor:
        if self.holds_packed:
            return self.packed
        return ops.untile_packed(self.tiled, self.spec.bits, self.in_features)

    def codes_stamp(self) -> tuple:
        """Changes when the stored codes are replaced or written in place (either layout)."""
        return version_stamp(self.packed if self.holds_packed else self.tiled)

    @torch.no_grad()
    def _current_tiled(self) -> torch.Tensor:
        if torch.compiler.is_compiling() or not self.holds_packed:  # (compiled after tile_for_decode)
            return self.tiled
        if getattr(self, "tiled", None) is None or getattr(self, "_tiled_from", None) != self.codes_stamp():
            # A copy beside `packed`; a forward never synchronises the GPU to time kernels.
            self.tile_for_decode(tune=False, keep_packed=True)
        return self.tiled

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The state dict a packed layer always had. Tiled only: `packed` laid out again, in its place
        before `zero`. A scale or zero that is a view of a larger tensor (a shared-input group's, an expert
        stack's) copied out, so that no two tensors of a state dict share storage (safetensors refuses them)."""
        local = {}
        super()._save_to_state_dict(local, prefix, keep_vars)
        for key, value in local.items():
            if key == prefix + "zero" and not self.holds_packed:
                destination[prefix + "packed"] = self.packed_codes()
            if key in (prefix + "scale", prefix + "zero") and value.untyped_storage().nbytes() != value.nbytes:
                value = value.clone()
            destination[key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Tiled only: `packed` from the state dict is tiled into the tiled storage in place."""
        key = prefix + "packed"
        if not self.holds_packed:
            if key in state_dict:
                packed = state_dict[key]
                if tuple(packed.shape) != tuple(self.packed_shape) or packed.dtype != torch.uint8:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(packed.shape)} "
                                      f"({packed.dtype}), the shape in current model is {tuple(self.packed_shape)} "
                                      "(torch.uint8).")
                else:
                    with torch.no_grad():
                        self.tiled.copy_(ops.tile_packed(packed.to(self.tiled.device), self.spec.bits,
                                                         self.in_features))
                state_dict = {k: v for k, v in state_dict.items() if k != key}
            elif strict:
                missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
