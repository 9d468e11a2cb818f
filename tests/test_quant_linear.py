"""QuantLinear: every mode trains the right parameters and merges into `packed` without loss."""

import pytest
import torch
from torch import nn

from qatext import QuantSpec, ops, quant
from qatext.nn import QuantLinear

SPECS = [QuantSpec(4, 32, False), QuantSpec(3, 32, True), QuantSpec(2, -1, False)]
TRAINED = {"fake": {"weight", "scale", "zero", "bias"}, "lrqat": {"lora_a", "lora_b", "scale", "bias"},
           "qalora": {"lora_a", "lora_b", "bias"}, "e2eqp": {"scale", "bias"}, "packed": {"bias"}}


def _layer(mode, spec, **kw):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    kw.setdefault("rank", 4 if mode in ("lrqat", "qalora") else 0)
    layer = QuantLinear.from_linear(linear, spec, mode=mode, **kw)
    return linear, layer


def _perturb(layer):
    """Move the trainable state away from its initialisation, as training would."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name != "bias":
                p.add_(torch.randn_like(p) * (0.05 if name != "zero" else 0.6))
        if layer.mode in ("fake", "e2eqp", "lrqat"):
            layer.scale.abs_().clamp_(min=1e-3)


@pytest.mark.parametrize("mode", ["fake", "lrqat", "qalora", "e2eqp", "packed"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gradients_reach_exactly_the_trained_parameters(mode, spec):
    _, layer = _layer(mode, spec)
    if mode == "packed":
        layer.bias.requires_grad_(True)
    if mode == "fake" and spec.symmetric:
        assert "zero" not in dict(layer.named_parameters())
    _perturb(layer)  # e.g. A = 0 at init would hide B's gradient, no clipping would hide z's
    x = torch.randn(5, 96) * 3
    layer(x).square().sum().backward()
    got = {n for n, p in layer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    want = TRAINED[mode] - ({"zero"} if spec.symmetric else set())
    assert got == want


@pytest.mark.parametrize("mode", ["fake", "lrqat", "e2eqp"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_merge_is_exact(mode, spec):
    _, layer = _layer(mode, spec)
    _perturb(layer)
    x = torch.randn(7, 96)
    packed = layer.to_packed()
    assert packed.mode == "packed"
    torch.testing.assert_close(packed.quantized_weight(), layer.quantized_weight().float(), rtol=0, atol=0)
    torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_qalora_merges_into_the_zeros(spec):
    _, layer = _layer("qalora", spec)
    _perturb(layer)
    x = torch.randn(7, 96)
    packed = layer.to_packed()
    assert torch.equal(packed.packed, layer.packed) and torch.equal(packed.scale, layer.scale)
    assert not torch.equal(packed.zero, layer.zero)
    torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frac_bits", [0, 4])
def test_lrqat_starts_at_the_rtn_weight(frac_bits):
    spec = QuantSpec(4, 32, True)
    linear, layer = _layer("lrqat", spec, frac_bits=frac_bits)
    scale, zero = quant.minmax_qparams(linear.weight.detach(), spec)
    rtn = ops.fake_quant(linear.weight.detach(), scale, zero, 4, 32)
    if frac_bits == 0:
        torch.testing.assert_close(layer.quantized_weight(), rtn, rtol=0, atol=0)
    else:  # fixed point keeps 4 fractional bits: values within 1/32 of a tie may round the other way
        diff = (layer.quantized_weight() - rtn).abs()
        assert (diff > 0).float().mean() < 0.05
        assert torch.all(diff <= scale.repeat_interleave(32, 1) * 1.0001)


def test_checkpointing_gives_the_same_gradients():
    _, a = _layer("lrqat", QuantSpec(4, 32, True))
    _, b = _layer("lrqat", QuantSpec(4, 32, True), checkpointing=True)
    _perturb(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 96)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_packed_converts_to_e2eqp_and_back():
    _, layer = _layer("packed", QuantSpec(4, 32, False))
    e2e = layer.to_mode("e2eqp")
    assert isinstance(e2e.scale, nn.Parameter)
    x = torch.randn(2, 96)
    torch.testing.assert_close(e2e(x), layer(x), rtol=0, atol=0)


def test_w4a8_quantizes_activations():
    _, layer = _layer("lrqat", QuantSpec(4, 32, True), act_bits=8)
    x = torch.randn(4, 96)
    _, plain = _layer("lrqat", QuantSpec(4, 32, True))
    assert not torch.equal(layer(x), plain(x))
    torch.testing.assert_close(layer(x), plain(ops.fake_quant_per_token(x, 8, False)))


def test_bad_configs():
    with pytest.raises(ValueError, match="bits must be an int in 2..8, got 9"):
        QuantSpec(9, 32)
    with pytest.raises(ValueError, match=r"group_size \(48\) must divide in_features \(100\)"):
        QuantLinear.from_linear(nn.Linear(100, 8), QuantSpec(4, 48))
    with pytest.raises(ValueError, match="unknown mode"):
        QuantLinear(96, 8, QuantSpec(4, 32), mode="gptq")
    with pytest.raises(ValueError, match="needs rank > 0"):
        QuantLinear(96, 8, QuantSpec(4, 32), mode="lrqat")
    with pytest.raises(ValueError, match="unknown scale init"):
        QuantLinear.from_linear(nn.Linear(96, 8), QuantSpec(4, 32), init="percentile")
    with pytest.raises(ValueError, match="last dimension must be 96"):
        QuantLinear.from_linear(nn.Linear(96, 8), QuantSpec(4, 32))(torch.randn(2, 95))


@pytest.mark.parametrize("p", [2.0, 4.0])
def test_lp_search_never_worse_than_minmax(p):
    w = torch.randn(16, 256) * torch.linspace(0.1, 3, 256)
    spec = QuantSpec(3, 64)
    def err(s, z):
        return (ops.fake_quant(w, s, z, 3, 64) - w).abs().pow(p).sum()
    assert err(*quant.lp_search_qparams(w, spec, p=p)) <= err(*quant.minmax_qparams(w, spec))
    assert err(*quant.lp_search_qparams(w, spec, p=p)) < 0.95 * err(*quant.minmax_qparams(w, spec))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_qalora_bf16_forward_matches_its_float_weight(spec):
    """The bf16 forward (the input pooled per group in bf16, the adapter's factor on the add) equals x
    times the layer's fp32 weight (codes, scale, zero and the pooled adapter) to bf16 accuracy."""
    _, layer = _layer("qalora", spec)
    _perturb(layer)
    with torch.no_grad():
        layer.lora_b.normal_(0, 4.0)  # an adapter large enough that a wrong pooling or factor shows
    layer = layer.to(torch.bfloat16)
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    want = x.float() @ layer.quantized_weight().float().T + layer.bias.float()
    # Each of the output, the base GEMM's weight and the pooled input is rounded to bf16 once (2^-8
    # relative), on sums of 96 terms of either sign: well inside 3% of the output's scale.
    tol = 0.03 * want.abs().max().item()
    torch.testing.assert_close(layer(x).float(), want, rtol=0, atol=tol)
    base = x.float() @ ops.dequant(layer.packed, layer.scale, layer.zero, spec.bits, spec.group_size, 96).T
    assert (want - base - layer.bias.float()).abs().max() > 3 * tol  # the adapter's share is far above the tolerance
