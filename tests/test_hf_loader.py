"""transformers' from_pretrained on a saved qatext model (`import qatext.hf`): the same layers and the
same logits as load_quantized; without the import, transformers names the method it does not know."""

import json
import subprocess
import sys

import pytest
import torch
from test_recipes import tiny_llama

from qatext import QuantSpec, export_model, load_quantized, merge_model, quantize_model, save_quantized

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("mode", ["packed", "lrqat"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_from_pretrained_equals_load_quantized(tmp_path, mode, dtype):
    import qatext.hf  # noqa: F401  (registers quant_method "qatext")

    model = quantize_model(tiny_llama(), QuantSpec(4, 32, symmetric=mode == "lrqat"), method="lrqat", rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.add_(0.01 * torch.randn_like(p))  # trained: adapters away from their start
    if mode == "packed":
        merge_model(model)
    save_quantized(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]["quant_method"] == "qatext"
    ours = load_quantized(tmp_path / "saved", dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=dtype)
    for (name, a), (_, b) in zip(ours.named_modules(), theirs.named_modules()):
        assert type(a) is type(b), name
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(input_ids=x).logits, rtol=0, atol=0)
    layer = theirs.model.layers[0].mlp.up_proj
    assert layer.scale.dtype == torch.float32  # scales stay fp32 whatever the model's dtype
    # What it writes next carries its own quantization_config, not "qatext" (hqq's loader reads none)
    export_model(theirs, tmp_path / "hqq", format="hqq")
    assert "quantization_config" not in json.loads((tmp_path / "hqq" / "config.json").read_text())


def test_a_newer_format_and_an_unregistered_loader_are_named(tmp_path):
    save_quantized(merge_model(quantize_model(tiny_llama(), QuantSpec(4, 32))), tmp_path / "saved")
    config_path = tmp_path / "saved" / "config.json"
    script = f"import transformers; transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'saved')!r})"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "Unknown quantization type, got qatext" in proc.stdout + proc.stderr
    import qatext.hf  # noqa: F401

    config = json.loads(config_path.read_text())
    config["quantization_config"]["version"] += 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="from_pretrained: this qatext model was written by a newer qatext"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")


def test_save_pretrained_points_at_save_quantized(tmp_path, monkeypatch):
    """transformers' refusal says only 'check out the warnings from the logger': the warning says where to go."""
    import qatext.hf

    save_quantized(merge_model(quantize_model(tiny_llama(), QuantSpec(4, 32))), tmp_path / "saved")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    said = []
    monkeypatch.setattr(qatext.hf.logger, "warning", said.append)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "again")
    assert said and said[0].startswith("qatext models are saved by qatext.save_quantized(model, directory)")
    assert not (tmp_path / "again" / "model.safetensors").exists()
