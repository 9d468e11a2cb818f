"""A SwiGLU MLP's gate and up projections as one tiled GEMM with silu(gate) * up in its epilogue
(ops.swiglu_matmul_tiled, CPU and CUDA, against the reference), and transformers' Llama-family MLPs
taking it by themselves after models.tile_for_decode (same outputs, one kernel fewer, only where the
MLP's forward is that formula)."""

import copy
import functools
import io

import pytest
import torch
from conftest import kernel_names, knob
from test_decode_gemm import _weight
from torch import nn

from qatext import QuantSpec, methods, models, ops, reference
from qatext.nn.modes import PackedLinear
from qatext.nn.shared_input import is_swiglu_mlp

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def _assert_close_to_reference(y, x, tiled, scale, zero, bits, g, bias=None, fused=False):
    """Within the roundings each path makes (u: the dtype's unit roundoff; fp32 sums count as exact).
    The decode kernel rounds silu(gate) * up once: u |out|. Beyond it (and on a CPU) the weight is
    rounded to x's dtype for the GEMM (u |x| |W| per output), gate and up are rounded, then silu and the
    product, as an unfused MLP rounds them. An error e in gate moves the output by e |silu'(gate) up|, one
    in up by e |silu(gate)|; then 2u |out|."""
    k = x.shape[-1]
    h = reference.dequant_matmul_tiled(x.float(), tiled, scale, zero, bits, g, None if bias is None else bias.float())
    gate, up = h.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    u = UNIT_ROUNDOFF[y.dtype]
    if fused:
        bound = u * expected.abs()
    else:
        w = reference.dequant(reference.untile_packed(tiled, bits, k), scale, zero, bits, g, k, torch.float32)
        gate_abs, up_abs = (x.float().abs() @ w.abs().t()).chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        slope = sig * (1 + gate * (1 - sig))
        bound = (u * (gate_abs + gate.abs()) * (slope * up).abs() + u * (up_abs + up.abs()) * (gate * sig).abs()
                 + 2 * u * expected.abs())
    excess = (y.float() - expected).abs() - bound - 1e-3 * u * expected.abs().max()
    assert excess.max() <= 0, f"off by up to {excess.max().item():.3g} past the rounding bound"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("half,k,g", [(64, 256, 64), (48, 192, -1), (11008, 128, 64), (520, 512, 128)])
@pytest.mark.parametrize("m", [1, 5, 8, 16, 17, 40])
def test_matches_reference(device, bits, half, k, g, m):
    """Both halves of every row tile reach the epilogue: 1-4 token tiles, 2 and 4 row tiles a block
    (11008 rows a half: 4), gate/up halves of an odd count of row tiles, bias on odd m."""
    _, tiled, scale, zero = _weight(2 * half, k, bits, g) if device == "cuda" else _cpu_weight(2 * half, k, bits, g)
    dtype = torch.bfloat16
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(2 * half, device=device).to(dtype) if m % 2 else None
    with knob("decode_gemm_max_m", 64):
        y = ops.swiglu_matmul_tiled(x, tiled, scale, zero, bits, g, bias)
    assert y.dtype == dtype and y.shape == (m, half)
    # (The decode kernel's epilogue needs each half in whole 16-row tiles; 520 rows a half take the path beyond.)
    _assert_close_to_reference(y, x, tiled, scale, zero, bits, g, bias, fused=device == "cuda" and half % 16 == 0)
    # The reference itself (fp32 throughout, rounded once) is within the same bound.
    _assert_close_to_reference(reference.swiglu_matmul_tiled(x, tiled, scale, zero, bits, g, bias), x, tiled, scale,
                               zero, bits, g, bias, fused=True)


def _cpu_weight(n, k, bits, g):
    from conftest import random_qparams

    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    packed = ops.pack(codes, bits)
    scale, zero = random_qparams(n, k, bits, g, False, "cpu")
    return packed, ops.tile_packed(packed, bits, k), scale, zero


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes_and_leading_dims(device, dtype):
    _, tiled, scale, zero = _cpu_weight(128, 256, 4, 128)
    tiled, scale, zero = tiled.to(device), scale.to(device), zero.to(device)
    x = torch.randn(2, 3, 256, device=device).to(dtype)
    y = ops.swiglu_matmul_tiled(x, tiled, scale, zero, 4, 128)
    assert y.shape == (2, 3, 64) and y.dtype == dtype
    _assert_close_to_reference(y, x, tiled, scale, zero, 4, 128, fused=device == "cuda" and dtype != torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_kernel_on_the_decode_path_and_beyond_it_the_unfused_formula():
    _, tiled, scale, zero = _weight(2 * 256, 512, 4, 128)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    with knob("decode_gemm_max_m", 16):
        names = kernel_names(lambda: ops.swiglu_matmul_tiled(x, tiled, scale, zero, 4, 128))
        assert names.count("decode_gemm_kernel") == 1 and "silu" not in names.lower()
    with knob("decode_gemm_max_m", 0):  # beyond: bit for bit what an unfused MLP computes
        y = ops.swiglu_matmul_tiled(x, tiled, scale, zero, 4, 128)
        gate, up = ops.dequant_matmul_tiled(x, tiled, scale, zero, 4, 128).chunk(2, -1)
    torch.testing.assert_close(y, torch.nn.functional.silu(gate) * up, rtol=0, atol=0)


def test_bad_arguments_name_themselves():
    _, tiled, scale, zero = _cpu_weight(64, 128, 4, 64)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="swiglu_matmul_tiled.*bias"):
        ops.swiglu_matmul_tiled(x, tiled, scale, zero, 4, 64, torch.randn(63))
    with pytest.raises(ValueError, match="swiglu_matmul_tiled.*bits"):
        ops.swiglu_matmul_tiled(x, tiled, scale, zero, 5, 64)


def _llama(layers=1, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return methods.rtn(LlamaForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False), QuantSpec(4, 64, False))


def test_which_mlps_are_swiglu():
    from transformers.models.llama.modeling_llama import LlamaMLP

    class GatedOnUp(LlamaMLP):  # the halves the other way round: not the formula the kernel computes
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    mlp = _llama().model.layers[0].mlp
    assert is_swiglu_mlp(mlp)
    other = GatedOnUp(mlp.config)
    assert not is_swiglu_mlp(other)
    mlp.config.pretraining_tp = 2  # (older transformers slice the weights in this forward then)
    assert not is_swiglu_mlp(mlp)
    mlp.config.pretraining_tp = 1
    mlp.act_fn = nn.GELU()  # Gemma's MLP: the same forward, another activation
    assert not is_swiglu_mlp(mlp)


@pytest.fixture
def decode_everywhere(device, monkeypatch):
    """On a CPU, forwards take the decode path too (its CPU fallback), so the fused MLP runs there."""
    if device == "cpu":
        monkeypatch.setattr(PackedLinear, "_decodes", lambda self, x: True)


def test_tiled_llama_mlp_fuses_with_the_same_outputs(device, decode_everywhere, monkeypatch):
    model = _llama(layers=2).to(device)
    unfused = copy.deepcopy(model)
    keys = set(model.state_dict())
    models.tile_for_decode(model)
    assert set(model.state_dict()) == keys
    calls = []
    real = ops.swiglu_matmul_tiled
    monkeypatch.setattr(ops, "swiglu_matmul_tiled", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    ids = torch.randint(0, 100, (1, 1), device=device)
    with torch.no_grad():
        expected = unfused(ids).logits.float()
        got = model(ids).logits.float()
        assert len(calls) == 2  # one a layer
        # A copy's forward (deep copy, or a whole model pickled by torch.save) is bound to the copy.
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            mlp = twin.model.layers[0].mlp
            assert mlp.forward.args == (mlp, mlp.decode_gate_up)
            torch.testing.assert_close(twin(ids).logits.float(), got, rtol=0, atol=0)
    # CPU: the same roundings as the unfused MLP. GPU: one rounding of silu(gate) * up, other sums.
    torch.testing.assert_close(got, expected, rtol=0, atol=0 if device == "cpu" else 0.05 * expected.abs().max().item())


def test_knob_off_runs_the_mlps_own_forward(monkeypatch):
    monkeypatch.setattr(PackedLinear, "_decodes", lambda self, x: True)
    model = _llama()
    models.tile_for_decode(model)
    calls = []
    real = ops.swiglu_matmul_tiled
    monkeypatch.setattr(ops, "swiglu_matmul_tiled", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    ids = torch.randint(0, 100, (1, 1))
    with torch.no_grad():
        fused = model(ids).logits
        with knob("decode_swiglu", 0):
            unfused = model(ids).logits
    assert len(calls) == 1
    torch.testing.assert_close(fused, unfused, rtol=0, atol=0)  # (CPU: the same roundings)


def test_an_mlp_whose_forward_another_library_wrapped_is_left_alone(monkeypatch):
    """accelerate's device hooks replace a module's forward by a wrapper of the old one: fusing over it would
    drop the hook (the fused forward's fallback is the class's forward), so such an MLP keeps it."""
    monkeypatch.setattr(PackedLinear, "_decodes", lambda self, x: True)
    model = _llama()
    mlp = model.model.layers[0].mlp
    seen = []

    def hooked(module, x):
        seen.append(x.shape)
        return type(module).forward(module, x)

    mlp.forward = functools.partial(hooked, mlp)
    models.tile_for_decode(model)
    assert mlp.forward.func is hooked and model.model.layers[0].mlp.decode_gate_up is not None
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 1)))
    assert len(seen) == 1


def test_an_mlp_whose_layers_change_runs_its_own_forward(monkeypatch):
    monkeypatch.setattr(PackedLinear, "_decodes", lambda self, x: True)
    model = _llama()
    models.tile_for_decode(model)
    mlp = model.model.layers[0].mlp
    mlp.up_proj = nn.Linear(128, 256, bias=False).to(torch.bfloat16)  # replaced after grouping
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefill_takes_the_mlps_own_forward_and_compiled_decode_the_fused_one(monkeypatch):
    model = _llama().cuda()
    models.tile_for_decode(model)
    calls = []
    real = ops.swiglu_matmul_tiled
    monkeypatch.setattr(ops, "swiglu_matmul_tiled", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    with torch.no_grad(), knob("decode_gemm_max_m", 4):
        model(torch.randint(0, 100, (1, 9), device="cuda"))  # 9 tokens: past the decode kernel
        assert calls == []
        ids = torch.randint(0, 100, (1, 1), device="cuda")
        expected = model(ids).logits
        assert len(calls) == 1
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # (inductor would fuse other roundings)
        torch.testing.assert_close(compiled(ids).logits, expected, rtol=0, atol=0)
        assert len(calls) == 2
