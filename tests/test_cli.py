"""The command line end to end: demo (quick), train with resume, eval, export; clear errors."""

import json

import pytest

from qatext.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {(r["method"], r["bits"]) for r in results["runs"]} == {
        (m, b) for m in ("rtn", "lrqat", "qalora", "efficientqat") for b in (4, 3, 2)}
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    assert "W2 g64" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lrqat", "efficientqat"])
def test_train_eval_export(tmp_path, tiny_model_dir, method, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", method, "--model", str(tiny_model_dir), "--bits", "4", "--group-size", "32",
            "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--calib-samples", "4", "--output-dir", str(out),
            "--device", "cpu", "--checkpoint-every", "1"]
    assert main(args) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["loss"]) == 3 and (out / "checkpoints" / "last.pt").exists()
    assert main(["eval", "--model", str(out / "model"), "--seq-len", "32", "--max-windows", "4", "--device", "cpu"]) == 0
    assert '"ppl"' in capsys.readouterr().out
    assert main(["export", "--model", str(out / "model"), "--output", str(tmp_path / "gptq")]) == 0
    assert (tmp_path / "gptq" / "model.safetensors").exists()


def test_bad_arguments(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "awq", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path)])
    assert main(["train", "--method", "rtn", "--model", str(tiny_model_dir), "--bits", "9",
                 "--output-dir", str(tmp_path)]) == 2
    assert "bits must be an int in 2..8" in capsys.readouterr().err
    assert main(["train", "--method", "rtn", "--model", str(tiny_model_dir), "--group-size", "48",
                 "--output-dir", str(tmp_path)]) == 2
    assert "must divide in_features" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.txt")]) == 2


def test_train_under_torchrun_with_fsdp(tmp_path, tiny_model_dir):
    """`qatext train` takes the same flags under torchrun (2 CPU processes, gloo, FSDP2)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "qatext.cli", "train", "--method", "lrqat", "--model", str(tiny_model_dir), "--bits", "4",
           "--group-size", "32", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
           "--distributed", "fsdp", "--checkpoint-every", "2", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["loss"]) == 3 and log["world_size"] == 2
    assert (out / "checkpoints" / "dcp" / "loop.pt").exists() and (out / "model").is_dir()
    assert main(["eval", "--model", str(out / "model"), "--seq-len", "32", "--max-windows", "2", "--device", "cpu"]) == 0
