"""Sibling packed layers that read the same input (q/k/v, gate/up) served by one decode GEMM.

A decode GEMM has a fixed cost (its ramp and split-K tail) beside its bytes, paid once per call; q, k
and v, and gate and up, read the same activations, so one call over their weights concatenated along
N does the work of three (two). `SharedInputProjections` holds that concatenation (the tiled codes,
scales, zeros and biases; the members' own codes, scales and zeros become views of it, so the group
holds no second copy) as a submodule of the members' parent, non-persistent: state dicts and
checkpoints are unchanged. The first member called with an input computes every member's output; the
others take theirs for the same input tensor (an identity check, so a member fed anything else
computes its own). Under torch.compile the bookkeeping traces away into one GEMM and slices.

A SwiGLU MLP (transformers' Llama-family MLP: down_proj(silu(gate_proj(x)) * up_proj(x))) whose gate/up
group decodes goes one step further (`fuse_swiglu`): silu(gate) * up is the group's GEMM's epilogue
(ops.swiglu_matmul_tiled), one kernel a layer fewer.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import knobs, ops

# Sibling layers (last name component) that read their parent's one input in the model families
# qatext trains (Llama, Mistral, Qwen2 / 3, Gemma, ...).
SHARED_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def version_stamp(t: torch.Tensor) -> tuple[int, int]:
    """(data pointer, version): changes when t is replaced or written in place."""
    try:
        version = t._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        version = -1
    return t.data_ptr(), version


def can_share_input(layers) -> bool:
    """Whether these packed layers can be served by one decode GEMM: same input width, quantization,
    device and dtypes, decode-tileable, no activation fake-quant (which would give each its own
    input), all with a bias or none."""
    first = layers[0]
    return all(
        layer._tileable and layer.act_bits is None
        and layer.in_features == first.in_features and layer.spec == first.spec
        and layer.scale.device == first.scale.device and layer.scale.dtype == first.scale.dtype
        and (layer.bias is None) == (first.bias is None)
        and (layer.bias is None or layer.bias.dtype == first.bias.dtype)
        for layer in layers)


class SharedInputProjections(nn.Module):
    """One decode GEMM for `members` (packed layers reading one input); see the module docstring."""

    def __init__(self, members):
        super().__init__()
        self.__dict__["members"] = tuple(members)  # not submodules: they stay where the model has them
        first = members[0]
        self.bits, self.group_size, self.in_features = first.spec.bits, first.group_size, first.in_features
        self.sizes = [m.out_features for m in members]
        self._pending = None  # (input, outputs, members still to serve) between the members' calls
        self._build()
        for index, member in enumerate(members):
            member._shared_input = (self, index)
            member._decode_crossover = None  # the group's GEMM's from now on

    def _stamp(self) -> tuple:
        return tuple(m.codes_stamp() for m in self.members) + tuple(
            version_stamp(t) for m in self.members for t in (m.scale, m.zero, m.bias) if t is not None)

    @torch.no_grad()
    def _build(self) -> None:
        """Concatenate the members' current weights; their tiled codes, scales and zeros become views of
        ours (the members' state dicts copy the views out: see PackedLinear._save_to_state_dict)."""
        members = self.members
        tiled = torch.cat([m._current_tiled() for m in members])
        scale, zero = torch.cat([m._scale() for m in members]), torch.cat([m.zero for m in members])
        for name, t in (("tiled", tiled), ("scale", scale), ("zero", zero)):
            self.register_buffer(name, t, persistent=False)
            for member, view in zip(members, t.split(self.sizes)):
                member.register_buffer(name, view, persistent=name != "tiled")  # scale, zero: its state
        bias = None if members[0].bias is None else torch.cat([m.bias for m in members])
        self.register_buffer("bias", bias, persistent=False)
        self._built_from = self._stamp()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s decode output for x (x through the member's _input)."""
        pending = self._pending
        if pending is None or pending[0] is not x:
            bias = self._current_bias(x)  # (first: it may concatenate the weights again)
            y = ops.dequant_matmul_tiled(x, self.tiled, self.scale, self.zero, self.bits, self.group_size, bias)
            pending = (x, y.split(self.sizes, dim=-1), len(self.sizes))
        # One attribute written once a call: under torch.compile each write is replayed on the host
        # after every step, so the fewer the better. Every member served: hold no activations.
        left = pending[2] - 1
        self._pending = (pending[0], pending[1], left) if left else None
        return pending[1][index]

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for x, the members being a SwiGLU MLP's gate and up projections (see fuse_swiglu)."""
        bias = self._current_bias(x)  # (first: it may concatenate the weights again)
        return ops.swiglu_matmul_tiled(x, self.tiled, self.scale, self.zero, self.bits, self.group_size, bias)

    def _current_bias(self, x: torch.Tensor):
        """The concatenated bias in x's dtype (or None), after concatenating the members' weights again
        where they changed (load_state_dict, .to()), eagerly: a compiled graph is traced after
        models.tile_for_decode, on current weights."""
        if not torch.compiler.is_compiling() and self._built_from != self._stamp():
            self._build()
        return None if self.bias is None else self.bias.to(x.dtype)

    def tune(self) -> None:
        """Time the decode kernel's variants for the concatenated shape (ops.tune_decode_gemm); the members
        then take the decode kernel up to the concatenated GEMM's crossover, not their own shapes'."""
        if self.tiled.is_cuda:
            ops.tune_decode_gemm(self.tiled, self.scale, self.zero, self.bits, self.group_size, self.in_features)
            crossover = self.crossover(self.tiled.device)
            for member in self.members:
                member._decode_crossover = crossover

    def crossover(self, device) -> int:
        """The concatenated GEMM's measured crossover (ops.decode_gemm_crossover)."""
        return ops.decode_gemm_crossover(device, sum(self.sizes), self.in_features, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={'+'.join(map(str, self.sizes))}, bits={self.bits}"


def share_inputs(parent: nn.Module) -> list[SharedInputProjections]:
    """Group `parent`'s children named in SHARED_INPUT_NAMES that can share a decode GEMM; each group
    is registered on the parent as `decode_<names>` (e.g. decode_q_k_v)."""
    groups = []
    for names in SHARED_INPUT_NAMES:
        layers = [getattr(parent, name, None) for name in names]
        if any(getattr(layer, "mode", None) != "packed" for layer in layers) or not can_share_input(layers):
            continue
        name = "decode_" + "_".join(n.removesuffix("_proj") for n in names)
        group = getattr(parent, name, None)
        if isinstance(group, SharedInputProjections) and group.members == tuple(layers):
            group._build()  # grouped already: the members' current weights
        else:
            group = SharedInputProjections(layers)
            parent.add_module(name, group)
        fuse_swiglu(parent, group)
        groups.append(group)
    return groups


def _swiglu_mlp_forward(mlp: nn.Module, group: SharedInputProjections, x: torch.Tensor) -> torch.Tensor:
    """An MLP's forward with silu(gate) * up in its gate/up GEMM (`group`) where that GEMM decodes x; else its
    own."""
    gate, up = group.members
    # (The members, packed layers, still the MLP's: a layer replaced since, by a conversion, is not.)
    if knobs.current("decode_swiglu") and mlp.gate_proj is gate and mlp.up_proj is up and gate._decodes(x):
        return mlp.down_proj(group.swiglu(x))
    return type(mlp).forward(mlp, x)


def _llama_mlp_forward():
    """transformers' LlamaMLP.forward (the MLP forward Mistral, Qwen2 / 3 and others copy), or None."""
    try:
        from transformers.models.llama.modeling_llama import LlamaMLP
    except ImportError:
        return None
    return LlamaMLP.forward


def _same_code(f, g) -> bool:
    a, b = f.__code__, g.__code__
    return (a.co_code, a.co_names, a.co_consts, a.co_varnames) == (b.co_code, b.co_names, b.co_consts, b.co_varnames)


def is_swiglu_mlp(parent: nn.Module) -> bool:
    """Whether parent computes down_proj(silu(gate_proj(x)) * up_proj(x)): its forward is (bytecode for
    bytecode) transformers' LlamaMLP.forward, its act_fn is SiLU, and no tensor-parallel slicing
    (config.pretraining_tp > 1, a branch of that forward in older transformers) applies."""
    reference = _llama_mlp_forward()
    forward = getattr(type(parent), "forward", None)
    return (reference is not None and callable(forward) and hasattr(forward, "__code__")
            and _same_code(forward, reference)
            and type(getattr(parent, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and getattr(getattr(parent, "config", None), "pretraining_tp", 1) == 1)


def fuse_swiglu(parent: nn.Module, group: SharedInputProjections) -> bool:
    """Give a SwiGLU MLP whose gate and up projections form `group` a forward that takes
    ops.swiglu_matmul_tiled where the group's GEMM decodes (else the MLP's own forward runs). The
    forward is an attribute of this module only: its class, state dict and checkpoints are unchanged.
    Returns whether it did."""
    if group.members != (getattr(parent, "gate_proj", None), getattr(parent, "up_proj", None)):
        return False
    if not is_swiglu_mlp(parent) or group.sizes[0] != group.sizes[1]:
        return False
    current = parent.__dict__.get("forward")
    if current is not None and getattr(current, "func", None) is not _swiglu_mlp_forward:
        return False  # another library's forward on this module (accelerate's device hooks): left in place
    # A partial of a module-level function (not a bound method): a pickled model (torch.save) and a
    # deep copy carry it, bound to their own MLP and group.
    parent.forward = functools.partial(_swiglu_mlp_forward, parent, group)
    return True
