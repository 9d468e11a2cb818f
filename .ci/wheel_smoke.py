"""Smoke test of the installed wheel, run from outside the source tree: every subpackage imports, the
console script and `python -m qatext` answer, and a tiny model trains, saves, exports and loads."""

import importlib
import json
import pkgutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import qatext

source_tree = Path(sys.argv[1]).resolve()
assert source_tree not in Path(qatext.__file__).resolve().parents, f"imported from the source tree: {qatext.__file__}"
names = [m.name for m in pkgutil.walk_packages(qatext.__path__, "qatext.") if m.name != "qatext.__main__"]
for name in names:
    importlib.import_module(name)
for sub in ("qatext.nn", "qatext.quant", "qatext.methods", "qatext.export"):
    assert sub in names, f"{sub} is missing from the wheel"
for api in ("quantize_model", "merge_model", "save_quantized", "load_quantized", "export_model", "QuantLinear"):
    assert hasattr(qatext, api), f"qatext.{api} is missing"
print(f"imported {len(names)} modules from {Path(qatext.__file__).parent}; build {qatext.build_info()}")

for cmd in (["qatext", "--help"], [sys.executable, "-m", "qatext", "--help"]):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert "export" in out, out

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / "tiny")

    def train(method: str, out: Path, model: str = "tiny") -> None:
        subprocess.run(["qatext", "train", "--method", method, "--model", str(tmp / model), "--bits", "3",
                        "--group-size", "32", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
                        "--byte-tokens", "--output-dir", str(out)], check=True)
        assert len(json.loads((out / "train_log.json").read_text())["loss"]) == 3

    train("lrqat", tmp / "run")
    train("qalora", tmp / "qalora")  # its backward runs the C++ autograd (dequant_matmul) of the wheel's _C
    subprocess.run(["qatext", "export", "--model", str(tmp / "run" / "model"), "--output", str(tmp / "gptq")], check=True)
    config = json.loads((tmp / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 3, config
    model = qatext.load_quantized(tmp / "run" / "model")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp / "run" / "model")  # qatext.hf, imported above
    with torch.no_grad():
        logits = model(input_ids=torch.arange(16)[None]).logits
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(hf_model(input_ids=torch.arange(16)[None]).logits, logits, rtol=0, atol=0)

    # A mixture of experts: its stacked experts taken apart (qatext.nn.experts), trained and loaded back
    moe = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                      num_experts_per_tok=2)
    transformers.Qwen3MoeForCausalLM(moe).save_pretrained(tmp / "moe")
    train("lrqat", tmp / "moe_run", model="moe")
    loaded = qatext.load_quantized(tmp / "moe_run" / "model")
    assert "model.layers.0.mlp.experts.3.down_proj" in dict(qatext.models.quant_layers(loaded))
print("wheel smoke test passed")
