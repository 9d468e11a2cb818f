"""Exports leave qatext intact: each method x format x bits is written, read back by the third-party
loader (GPTQ: transformers + optimum + gptqmodel's torch kernel; HQQ: the hqq library), and computes
the logits of load_quantized's model (GPTQ: with the scales and biases rounded to fp16, as GPTQ stores
them; HQQ: exactly)."""

import json
import warnings

import pytest
import torch
from test_recipes import FAST, tiny_llama

from qatext import QuantSpec, data, evaluate, export_model, load_quantized, methods, models, ops, save_quantized
from qatext.export import gptq, hqq, round_zeros
from qatext.export.layers import read_quantized

transformers = pytest.importorskip("transformers")


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


needs_gptq_loader = pytest.mark.skipif(not (_has("gptqmodel") and _has("optimum")),
                                       reason="needs the 'export' extra (optimum, gptqmodel)")
needs_hqq_loader = pytest.mark.skipif(not _has("hqq"), reason="needs the 'export' extra (hqq)")


@pytest.fixture(scope="module")
def tokens():
    return data.ByteTokenizer().encode(data.load_kjv()[:100_000])


_TRAINED = {}


def trained(name: str, bits: int, tokens, symmetric=False, group_size=32, lr=None, steps=8):
    """A tiny Llama trained by `name` for a few steps, merged, saved and loaded back (cached)."""
    key = (name, bits, symmetric, group_size, lr, steps)
    if key not in _TRAINED:
        model = tiny_llama(seed=1, tie=False)
        spec = QuantSpec(bits, group_size, symmetric)
        cfg = methods.default_config(name, steps=steps, batch_size=4, seq_len=32, progress=False)
        kwargs = dict(FAST.get(name, {}))
        if lr is not None:
            kwargs["lr"] = lr
        model, _ = methods.run(name, model, spec, tokens, cfg, **kwargs)
        models.merge_model(model)
        _TRAINED[key] = model
    return _TRAINED[key]


def roundtrip(model, tmp_path):
    save_quantized(model, tmp_path / "saved")
    return load_quantized(tmp_path / "saved")


def with_fp16_scales(model):
    """The model GPTQ stores: scales and biases of the quantized layers rounded to fp16."""
    with torch.no_grad():
        for _, layer in models.quant_layers(model):
            layer.scale.copy_(layer.scale.half().float())
            if layer.bias is not None:
                layer.bias.copy_(layer.bias.half().float())
    return model


def load_gptq(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", quantization_config=transformers.GPTQConfig(bits=4, backend="torch"))


def load_hqq(path):
    from hqq.models.hf.base import AutoHQQHFModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoHQQHFModel.from_quantized(str(path), compute_dtype=torch.float32, device="cpu")


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# (method, bits, symmetric, group size); every method at 2/3/4 bits, plus 8 bits, symmetric and per-channel.
CASES = [(m, b, m == "lrqat", 32) for m in ("rtn", "full_qat", "lrqat", "qalora", "efficientqat") for b in (2, 3, 4)]
CASES += [("rtn", 8, False, 32), ("rtn", 4, True, 32), ("rtn", 3, False, -1), ("full_qat", 4, False, -1)]


@needs_gptq_loader
@pytest.mark.parametrize("method,bits,symmetric,group_size", [c for c in CASES if c[0] != "qalora"])
def test_gptq_export_loads_in_transformers(tmp_path, tokens, method, bits, symmetric, group_size):
    model = roundtrip(trained(method, bits, tokens, symmetric, group_size), tmp_path)
    result = export_model(model, tmp_path / "gptq")
    assert result["format"] == "gptq"
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["sym"]) == (bits, group_size, symmetric)
    assert_gptq_loads_as(tmp_path / "gptq", model, tokens[:48].unsqueeze(0))


def assert_gptq_loads_as(path, model, x):
    """Every layer's weight as gptqmodel dequantizes it equals ours with fp16 scales, up to the fp16
    rounding of (q - z) * s that its kernel may apply (2^-11 relative); then the whole model's logits."""
    loaded = load_gptq(path)
    model = with_fp16_scales(model)
    for name, layer in models.quant_layers(model):
        ours = ops.dequant(layer.packed, layer.scale, layer.zero, layer.spec.bits, layer.group_size, layer.in_features)
        theirs = loaded.get_submodule(name).dequantize_weight().t().float()
        torch.testing.assert_close(theirs, ours, rtol=2**-11, atol=1e-8)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=1e-3)


@needs_hqq_loader
@pytest.mark.parametrize("method,bits,symmetric,group_size", CASES)
def test_hqq_export_is_exact(tmp_path, tokens, method, bits, symmetric, group_size):
    model = roundtrip(trained(method, bits, tokens, symmetric, group_size), tmp_path)
    result = export_model(model, tmp_path / "hqq", format="hqq")
    assert result["format"] == "hqq"
    x = tokens[:48].unsqueeze(0)
    torch.testing.assert_close(logits(load_hqq(tmp_path / "hqq"), x), logits(model, x), rtol=1e-5, atol=1e-5)


# Families whose layers differ from Llama's: q/k/v biases (Qwen2), q/k norms (Qwen3), Gemma 2's head size
# and soft-capping, fused qkv_proj / gate_up_proj (Phi-3), GPT-NeoX's fused query_key_value, Cohere.
FAMILIES = {"Qwen2Config": {}, "Qwen3Config": {}, "Gemma2Config": dict(head_dim=16), "Phi3Config": {},
            "GPTNeoXConfig": {}, "CohereConfig": {}}


@needs_gptq_loader
@needs_hqq_loader
@pytest.mark.parametrize("arch", FAMILIES)
def test_other_families_export_to_both_loaders(tmp_path, tokens, arch):
    torch.manual_seed(0)
    cfg = getattr(transformers, arch)(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=None, bos_token_id=None, eos_token_id=None, **FAMILIES[arch])
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = roundtrip(models.merge_model(models.quantize_model(model, QuantSpec(4, 32))), tmp_path)
    x = tokens[:48].unsqueeze(0)
    export_model(model, tmp_path / "hqq", format="hqq")
    torch.testing.assert_close(logits(load_hqq(tmp_path / "hqq"), x), logits(model, x), rtol=1e-5, atol=1e-5)
    assert export_model(model, tmp_path / "gptq")["format"] == "gptq"
    assert_gptq_loads_as(tmp_path / "gptq", model, x)


@needs_hqq_loader
@pytest.mark.parametrize("lr", [2e-4, 2e-3])
def test_trained_qalora_exports_its_trained_perplexity(tmp_path, tokens, lr):
    """QA-LoRA merges into fractional zeros: auto picks HQQ, whose perplexity is the trained one; GPTQ
    refuses (rounding the zeros would undo the training)."""
    model = trained("qalora", 4, tokens, lr=lr, steps=40)
    fractional = sum(int((layer.zero != torch.round(layer.zero)).sum()) for _, layer in models.quant_layers(model))
    assert fractional > 0
    result = export_model(model, tmp_path / "auto")
    assert result["format"] == "hqq" and "fractional zero" in result["reason"]
    with pytest.raises(ValueError, match="fractional zero point"):
        export_model(model, tmp_path / "gptq", format="gptq")
    assert not (tmp_path / "gptq").exists()
    _, val = data.train_val_split(tokens)
    ppl = evaluate.perplexity(model, val, seq_len=64, max_windows=16, progress=False)["ppl"]
    exported = evaluate.perplexity(load_hqq(tmp_path / "auto"), val, seq_len=64, max_windows=16, progress=False)["ppl"]
    assert exported == pytest.approx(ppl, rel=1e-6)


@needs_gptq_loader
def test_zero_of_zero_exports_as_gptq_v2(tmp_path, tokens):
    model = roundtrip(trained("rtn", 4, tokens), tmp_path)
    layer = dict(models.quant_layers(model))["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.zero[0, 0] = 0.0
    result = export_model(model, tmp_path / "v2")
    assert result["quantization_config"]["checkpoint_format"] == "gptq_v2"
    with pytest.raises(ValueError, match="use 'gptq_v2'"):
        export_model(model, tmp_path / "v1", checkpoint_format="gptq")
    assert_gptq_loads_as(tmp_path / "v2", model, tokens[:48].unsqueeze(0))


def test_round_zeros_makes_gptq_possible(tmp_path, tokens):
    model = roundtrip(trained("qalora", 4, tokens, lr=2e-3, steps=40), tmp_path)
    assert round_zeros(model) > 0
    assert round_zeros(model) == 0
    assert export_model(model, tmp_path / "gptq", format="gptq")["format"] == "gptq"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_bit_stream_matches_an_independent_reading(bits):
    """Value i occupies bits [i*b, (i+1)*b) of the stream of 32-bit words (AutoGPTQ's 3-bit layout
    included: value 10 spans words 0 and 1, value 21 words 1 and 2)."""
    values = torch.randint(0, 1 << bits, (64, 5))
    words = gptq.pack_int32(values, bits, 0)
    assert words.shape == (64 * bits // 32, 5) and words.dtype == torch.int32
    stream = [(int(w) & 0xFFFFFFFF) >> j & 1 for row in words.tolist() for w in [row[2]] for j in range(32)]
    read = [sum(stream[i * bits + j] << j for j in range(bits)) for i in range(64)]
    assert read == values[:, 2].tolist()
    assert torch.equal(gptq.unpack_int32(words, bits, 64, 0), values)


def test_gptq_three_bit_hand_placed():
    values = torch.zeros(32, 1, dtype=torch.int64)
    values[10] = 0b101  # bits 30, 31 of word 0 and bit 0 of word 1
    words = gptq.pack_int32(values, 3, 0)
    assert [int(w) & 0xFFFFFFFF for w in words[:, 0]] == [0b01 << 30, 0b1, 0]


@needs_hqq_loader
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hqq_packing_is_what_hqq_unpacks(bits):
    from hqq.core.quantize import Quantizer

    q = torch.randint(0, 1 << bits, (40, 16), dtype=torch.uint8)
    packing = hqq._PACKING[bits]
    unpacked = Quantizer.unpack[packing](hqq.pack_rows(q, bits), dtype=torch.uint8)[:40]
    assert torch.equal(unpacked, q)


def test_export_refuses_what_it_cannot_hold(tmp_path, tokens):
    model = models.quantize_model(tiny_llama(), QuantSpec(5, 32), method="packed")
    assert export_model(model, tmp_path / "w5")["format"] == "hqq"  # GPTQ has no 5-bit packing
    with pytest.raises(ValueError, match="GPTQ packs"):
        export_model(model, tmp_path / "gptq5", format="gptq")
    with pytest.raises(ValueError, match="format must be"):
        export_model(model, tmp_path / "x", format="awq")
    with pytest.raises(ValueError, match="no quantized layers"):
        export_model(tiny_llama(), tmp_path / "fp")
    model = models.quantize_model(tiny_llama(), QuantSpec(4, 32), method="lrqat", rank=4, act_bits=8)
    with pytest.raises(ValueError, match="act_bits=8"):
        export_model(model, tmp_path / "w4a8")


@pytest.mark.parametrize("fmt", ["auto", "gptq", "hqq"])
def test_export_refuses_linear_subclasses_the_loaders_skip(tmp_path, fmt):
    """Falcon builds its layers as FalconLinear: transformers' GPTQ loader and hqq swap exact nn.Linear
    only, so such an export loaded with those layers randomly initialised (measured: logits off by their
    own size) or failed. Refused, naming the class; nothing is written."""
    cfg = transformers.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=True)
    model = models.merge_model(models.quantize_model(transformers.FalconForCausalLM(cfg), QuantSpec(4, 32)))
    with pytest.raises(ValueError, match=rf"export \({fmt}\): 8 of 8 quantized layers "
                                         r"\(e.g. transformer.h.0.self_attention.query_key_value\) are FalconLinear, not "
                                         r"nn.Linear, in FalconForCausalLM"):
        export_model(model, tmp_path / "out", format=fmt)
    assert not (tmp_path / "out").exists()


def test_export_refuses_the_directory_its_model_was_loaded_from(tmp_path, monkeypatch):
    """Even with overwrite=True and after the working directory changed: the export would replace the
    saved model (load_quantized records where it read it, absolute)."""
    saved = tmp_path / "saved"
    save_quantized(models.quantize_model(tiny_llama(), QuantSpec(4, 32), method="packed"), saved)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    monkeypatch.chdir(tmp_path)
    model = load_quantized("saved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError, match="export: out_dir ../saved is the directory the model was read from"):
        export_model(model, "../saved", overwrite=True)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert export_model(model, "export")["path"] == "export" and (elsewhere / "export" / "config.json").exists()


def test_scales_beyond_fp16_refuse_gptq(tmp_path):
    model = models.quantize_model(tiny_llama(), QuantSpec(4, 32), method="packed")
    with torch.no_grad():
        models.quant_layers(model)[0][1].scale[0, 0] = 1e5
    with pytest.raises(ValueError, match="beyond the fp16 GPTQ stores"):
        export_model(model, tmp_path / "inf", format="gptq")
    assert export_model(model, tmp_path / "auto")["format"] == "hqq"


# GPTQModel's loader, in a process of its own: it patches transformers' MoE classes for the rest of the
# process (they would then build unstacked experts). Writes every quantized layer's weight as it
# dequantizes it, and the logits of `x`.
GPTQMODEL_READ = """
import sys, torch
from gptqmodel import BACKEND, GPTQModel
path, names, x, out = sys.argv[1], sys.argv[2].split(","), torch.load(sys.argv[3]), sys.argv[4]
model = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
with torch.no_grad():
    torch.save({"weights": {n: model.get_submodule(n).dequantize_weight().t().float() for n in names},
                "logits": model(input_ids=x).logits.float()}, out)
"""


@needs_gptq_loader
@pytest.mark.parametrize("family,symmetric", [("qwen3_moe", False), ("qwen2_moe", True), ("olmoe", True)])
def test_moe_gptq_export_loads_in_gptqmodel(tmp_path, bpe_model_dir, family, symmetric):
    """A mixture's experts, written one module an expert (--format gptq), read back by GPTQModel's own
    loader, which takes transformers' stacked experts apart: every expert's weight as it dequantizes it
    (fp16 compute: 2^-11 relative) equals ours with fp16 scales, and the routers stay in full precision.
    GPTQModel reads an asymmetric model from gptq_v2 only; auto and HQQ, whose loaders build the experts
    stacked, refuse and write nothing."""
    import subprocess
    import sys

    from test_experts import moe

    model = models.merge_model(models.quantize_model(moe(family), QuantSpec(4, 32, symmetric)))
    layers = models.quant_layers(model)
    assert not any(name.endswith("gate") for name, _ in layers)  # routers stay in full precision
    for fmt, fragment in [("auto", "give format 'gptq'"), ("hqq", "hqq's loader")]:
        with pytest.raises(ValueError, match=rf"export \({fmt}\): 24 of {len(layers)} quantized layers \(e.g. "
                                             rf"model.layers.0.mlp.experts.0.gate_proj\) are not modules of .*{fragment}"):
            export_model(model, tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()
    result = export_model(model, tmp_path / "gptq", format="gptq", tokenizer=bpe_model_dir,
                          checkpoint_format=None if symmetric else "gptq_v2")
    assert "one module an expert" in result["reason"]
    x = torch.randint(0, 256, (2, 16))
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", GPTQMODEL_READ, str(tmp_path / "gptq"), ",".join(n for n, _ in layers),
                           str(tmp_path / "x.pt"), str(tmp_path / "read.pt")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = torch.load(tmp_path / "read.pt")
    model = with_fp16_scales(model)
    for name, layer in layers:
        ours = ops.dequant(layer.packed, layer.scale, layer.zero, layer.spec.bits, layer.group_size, layer.in_features)
        torch.testing.assert_close(read["weights"][name], ours, rtol=2**-10, atol=1e-8)
    # fp16 routing may pick another expert where two nearly tie (a token's logits then move a little); random
    # experts would move every logit
    close = (read["logits"] - logits(model, x)).abs() <= 2e-3
    assert close.float().mean() > 0.9, close.float().mean()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_neox"])
def test_gptq_export_names_its_tensors_as_save_pretrained_does(tmp_path, family):
    """The hub's names, which vLLM and SGLang read: transformers renames some weights in memory and
    stacks experts (Mixtral's block_sparse_moe.experts.E.w1 / w3 / w2 are mlp.experts.gate_up_proj /
    down_proj; GPT-NeoX's embed_out is lm_head), and save_pretrained writes them back under the hub's
    names; the export's modules are save_pretrained's, each expert's projection under its own name.
    (GPTQModel 7.7 under transformers 5 reads Mixtral's in-memory names instead, so it is not asked here.)"""
    from safetensors.torch import load_file
    from test_experts import moe

    if family == "gpt_neox":
        torch.manual_seed(0)
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            tie_word_embeddings=False))
    else:
        model = moe(family)
    model.save_pretrained(tmp_path / "hf")
    written = {k.rpartition(".")[0] for k in load_file(tmp_path / "hf" / "model.safetensors")}
    model = models.merge_model(models.quantize_model(model, QuantSpec(4, 32)))
    export_model(model, tmp_path / "gptq", format="gptq")
    exported = load_file(tmp_path / "gptq" / "model.safetensors")
    assert {k.rpartition(".")[0] for k in exported} == written
    # each layer's codes under its own hub name (Mixtral: w1 the gate, w3 the up, w2 the down projection)
    hub = {"mixtral": {"mlp.experts.3.gate_proj": "block_sparse_moe.experts.3.w1",
                       "mlp.experts.3.up_proj": "block_sparse_moe.experts.3.w3",
                       "mlp.experts.3.down_proj": "block_sparse_moe.experts.3.w2"},
           "qwen3_moe": {f"mlp.experts.3.{p}": f"mlp.experts.3.{p}" for p in ("gate_proj", "up_proj", "down_proj")},
           "gpt_neox": {"mlp.dense_h_to_4h": "mlp.dense_h_to_4h"}}[family]
    prefix = "gpt_neox.layers.1." if family == "gpt_neox" else "model.layers.1."
    weights = {w.name: w for w in read_quantized(model, "gptq")}
    for ours, theirs in hub.items():
        codes = gptq.layer_tensors(weights[prefix + ours], "gptq")["qweight"]
        assert torch.equal(exported[f"{prefix}{theirs}.qweight"], codes), (ours, theirs)
