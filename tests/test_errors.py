"""Bad input gets a clear error naming the argument, never a crash or a silently wrong result."""

import pytest
import torch

import qatext
from qatext import ops

W = lambda: torch.randn(8, 64)  # noqa: E731
QP = lambda g=32: (torch.full((8, 64 // g), 0.1), torch.full((8, 64 // g), 8.0))  # noqa: E731


def test_wrong_weight_dtype():
    with pytest.raises(TypeError, match="w must be float32, bfloat16 or float16, got Double"):
        ops.fake_quant(W().double(), *QP(), 4, 32)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.fake_quant_per_token(torch.ones(2, 4, dtype=torch.int32), 8, False)


def test_wrong_scale_dtype():
    s, z = QP()
    with pytest.raises(TypeError, match="scale must be float32"):
        ops.fake_quant(W(), s.to(torch.int32), z, 4, 32)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4])
def test_bits_outside_2_to_8(bits):
    with pytest.raises(ValueError, match=f"bits must be in 2..8, got {bits}"):
        ops.fake_quant(W(), *QP(), bits, 32)
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        ops.pack(torch.zeros(2, 8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        ops.fake_quant_per_token(torch.randn(2, 8), bits, False)


def test_group_size_not_dividing_k():
    with pytest.raises(ValueError, match=r"group_size \(48\) must divide K \(64\)"):
        ops.fake_quant(W(), *QP(), 4, 48)
    with pytest.raises(ValueError, match="group_size must be positive or -1"):
        ops.fake_quant(W(), *QP(), 4, 0)


def test_scale_zero_shape_mismatch():
    s, z = QP()
    with pytest.raises(ValueError, match=r"scale must have shape \[8, 2\]"):
        ops.fake_quant(W(), s[:, :1], z, 4, 32)
    with pytest.raises(ValueError, match=r"zero must have shape \[8, 2\]"):
        ops.fake_quant(W(), s, z[:4], 4, 32)
    with pytest.raises(ValueError, match="w must be 2-D"):
        ops.fake_quant(torch.randn(64), s, z, 4, 32)


def test_packed_shape_and_length():
    s, z = QP()
    packed = ops.pack(torch.zeros(8, 64, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"packed must have shape \[8, 32\], got \[8, 31\]"):
        ops.dequant(packed[:, :31], s, z, 4, 32, 64)
    with pytest.raises(ValueError, match=r"packed must have shape \[8, 24\]"):
        ops.dequant(packed, s, z, 3, 32, 64)  # 3-bit rows are 24 bytes
    with pytest.raises(ValueError, match="packed rows must hold 32 bytes"):
        ops.unpack(packed[:, :30], 4, 64)
    with pytest.raises(TypeError, match="packed must be uint8"):
        ops.dequant(packed.to(torch.int8), s, z, 4, 32, 64)
    with pytest.raises(ValueError, match=r"grad_y's last dimension must equal the weight's rows \(8\)"):
        torch.ops.qatext.dequant_matmul_grad_input(torch.randn(2, 5), packed, s, z, 4, 32, 64)


def test_lrqat_shapes():
    s, z = QP()
    p = ops.pack(torch.zeros(8, 64, dtype=torch.uint8), 4)
    a, b = torch.zeros(8, 4), torch.randn(4, 64)
    with pytest.raises(ValueError, match="must share r"):
        ops.lrqat_weight(p, a, b[:3], s, z, 1.0, 4, 32, 0)
    with pytest.raises(ValueError, match=r"frac_bits must be in 0..4"):
        ops.lrqat_weight(p, a, b, s, z, 1.0, 4, 32, 5)
    with pytest.raises(ValueError, match=r"p must have shape \[8, 64\]"):
        ops.lrqat_weight(p, a, b, s, z, 1.0, 4, 32, 4)  # Q4.4 needs one byte per element


def test_codes_out_of_range_for_bits():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\] for bits=4, found 16"):
        ops.pack(torch.full((2, 8), 16, dtype=torch.uint8), 4)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_non_positive_or_nan_scale(bad):
    s, z = QP()
    s[3, 1] = bad
    packed = ops.pack(torch.zeros(8, 64, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        ops.dequant(packed, s, z, 4, 32, 64)
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        ops.dequant_matmul(torch.randn(2, 64), packed, s, z, 4, 32)
    ops.fake_quant(W(), s, z, 4, 32)  # a trained scale: the kernel clamps it (test_fake_quant)


def test_value_checks_can_be_turned_off():
    s, z = QP()
    s[0, 0] = 0.0
    packed = ops.pack(torch.zeros(8, 64, dtype=torch.uint8), 4)
    with qatext.value_checks(False):
        ops.dequant(packed, s, z, 4, 32, 64)  # no error: the caller vouches for its inputs
    assert qatext.get_tuning("value_checks") == 1  # the default back: host tensors checked


def test_value_check_levels(device):
    """1 (the default) checks host tensors only, where it is free; True (2) every device."""
    s, z = QP()
    s[0, 0] = 0.0
    s, z = s.to(device), z.to(device)
    packed = ops.pack(torch.zeros(8, 64, dtype=torch.uint8, device=device), 4)
    if device == "cpu":
        with pytest.raises(ValueError, match="scale must be positive and finite"):
            ops.dequant(packed, s, z, 4, 32, 64)
    else:
        ops.dequant(packed, s, z, 4, 32, 64)  # no GPU sync by default
    with qatext.value_checks(True), pytest.raises(ValueError, match="scale must be positive and finite"):
        ops.dequant(packed, s, z, 4, 32, 64)
    assert qatext.get_tuning("value_checks") == 1


def test_grad_shape_mismatch():
    s, z = QP()
    with pytest.raises(ValueError, match="grad must have the shape of w"):
        torch.ops.qatext.fake_quant_backward(torch.randn(8, 32), W(), s, z, 4, 32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensors_on_different_devices():
    s, z = QP()
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        ops.fake_quant(W().cuda(), s, z, 4, 32)
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        ops.lrqat_weight(torch.zeros(8, 32, dtype=torch.uint8).cuda(), torch.zeros(8, 4).cuda(),
                         torch.zeros(4, 64), s.cuda(), z.cuda(), 1.0, 4, 32, 0)


def test_non_contiguous_inputs_are_handled():
    s, z = QP()
    w = torch.randn(64, 8).t()
    s_nc = torch.full((2, 8), 0.1).t()
    out = ops.fake_quant(w, s_nc, z, 4, 32)
    torch.testing.assert_close(out, ops.fake_quant(w.contiguous(), s_nc.contiguous(), z, 4, 32), rtol=0, atol=0)
    codes = torch.randint(0, 16, (64, 8), dtype=torch.uint8).t()
    assert torch.equal(ops.unpack(ops.pack(codes, 4), 4, 64), codes)


def test_tuning_knobs_reject_bad_values():
    import qatext

    with pytest.raises(ValueError, match=r"dequant_gemm_max_m must be in \[0, "):
        qatext.set_tuning(dequant_gemm_max_m=-1)
    with pytest.raises(ValueError, match=r"dw_chunk_elements must be in \[1, "):
        qatext.set_tuning(dw_chunk_elements=0)
    with pytest.raises(ValueError, match=r"decode_gemm_min_slice must be in \[1, "):
        qatext.set_tuning(decode_gemm_min_slice=0)
    assert qatext.get_tuning("decode_gemm_min_slice") == 8
    with pytest.raises(ValueError, match="decode_gemm_row_tiles must be 1, 2 or 4"):
        qatext.set_tuning(decode_gemm_row_tiles=3)
    with pytest.raises(ValueError, match="decode_gemm_stages must be 2, 3, 4 or 8, got 6"):
        qatext.set_tuning(decode_gemm_stages=6)
    with pytest.raises(ValueError, match=r"decode_gemm_stages must be in \[2, 8\], got 1"):
        qatext.set_tuning(decode_gemm_stages=1)
    with pytest.raises(ValueError, match="unknown knob 'decode_gemm_max_n'; known: value_checks, "):
        qatext.set_tuning(decode_gemm_max_n=3)


def test_tuning_restores_every_knob():
    import qatext

    before = qatext.get_tuning()
    assert before == {row["name"]: row["default"] for row in qatext.tuning_table()}
    with pytest.raises(RuntimeError):
        with qatext.tuning(value_checks=False, decode_gemm_max_m=64):
            assert qatext.get_tuning("value_checks") == 0 and qatext.get_tuning("decode_gemm_max_m") == 64
            raise RuntimeError
    assert qatext.get_tuning() == before


def test_model_api_misuse_is_one_clear_error(tmp_path):
    """Quantizing a quantized model or one without nn.Linear (GPT-2's Conv1D), merging a model with nothing
    to merge, loading onto a GPU that is not there: each names what is wrong and what to do, before
    anything changes."""
    from test_recipes import tiny_llama

    from qatext import QuantSpec, load_quantized, merge_model, models, quantize_model, save_quantized

    model = quantize_model(tiny_llama(), QuantSpec(4, 32), method="lrqat", rank=4)
    with pytest.raises(ValueError, match=r"quantize_model: the model is already quantized \(14 QuantLinear layers\)"):
        quantize_model(model, QuantSpec(4, 32), method="lrqat", rank=4)
    with pytest.raises(ValueError, match=r"merge_model: the model has no QuantLinear layers \(run quantize_model"):
        merge_model(tiny_llama())
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"no nn.Linear found in the decoder blocks \(its blocks hold Conv1D"):
        quantize_model(gpt2, QuantSpec(4, 32))
    gpt_oss = transformers.GptOssForCausalLM(transformers.GptOssConfig(  # experts transposed, biased, interleaved
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, head_dim=16))
    with pytest.raises(ValueError, match=r"hold 2 stacked weight tensors outside nn.Linear \(e.g. model.layers.0.mlp"
                                         r".experts.gate_up_proj \[4, 32, 128\], fused mixture-of-experts weights "
                                         r"of GptOssExperts\), 86% of their weights, in a layout qatext does not take"):
        quantize_model(gpt_oss, QuantSpec(4, 32))
    assert not models.quant_layers(gpt_oss)  # refused before any layer was replaced
    named = quantize_model(gpt_oss, QuantSpec(4, 32), target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert len(models.quant_layers(named)) == 4  # asked for by name: the attention alone, knowingly
    mamba_like = tiny_llama()  # a depthwise conv's weight [channels, 1, width] is 3-D, but no stack of matrices
    mamba_like.model.layers[0].register_parameter("conv", torch.nn.Parameter(torch.zeros(64, 1, 4)))
    assert len(models.quant_layers(quantize_model(mamba_like, QuantSpec(4, 32)))) == 14
    save_quantized(merge_model(model), tmp_path / "saved")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="load_quantized: device 'cuda', but no CUDA GPU is visible here"):
            load_quantized(tmp_path / "saved", device="cuda")
