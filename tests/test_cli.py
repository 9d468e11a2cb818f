"""The command line end to end: demo (quick), train with resume, eval, export; clear errors."""

import json
import math

import pytest

from qatext.cli import main

transformers = pytest.importorskip("transformers")


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {(r["method"], r["bits"]) for r in results["runs"]} == {
        (m, b) for m in ("rtn", "lrqat", "qalora", "efficientqat") for b in (4, 3, 2)}
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "W2 g64" in out
    assert "SMOKE RUN (--quick)" in out and results["config"]["smoke"]  # never presented as a comparison


def test_demo_default_is_a_comparison():
    from dataclasses import asdict

    from qatext.demo import DemoConfig

    cfg = json.loads(json.dumps(asdict(DemoConfig())))  # what results.json records
    assert cfg["smoke"] is False and cfg["seeds"] >= 3


def test_demo_table_reports_intervals():
    from qatext.demo import CONFIGS, METHOD_NAMES, format_table

    runs = [{"method": m, "bits": s.bits, "group_size": s.group_size, "seed": seed, "ppl": 5.0 + 0.01 * seed}
            for s in CONFIGS for m in METHOD_NAMES for seed in ((0,) if m == "rtn" else (0, 1, 2))]
    results = {"fp": {"ppl": 4.9}, "fp_continued": [{"ppl": 4.8}, {"ppl": 4.82}, {"ppl": 4.84}], "runs": runs,
               "config": {"seeds": 3, "smoke": False}}
    table = format_table(results)
    assert "SMOKE" not in table
    assert "4.820 ± 0.050" in table  # the control over 3 seeds: sd 0.02, t 4.303
    assert "| 5.000 | 5.010 ± 0.025 |" in table  # RTN alone, then a 3-seed cell


@pytest.mark.parametrize("method", ["lrqat", "efficientqat"])
def test_train_eval_export(tmp_path, tiny_model_dir, method, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", method, "--model", str(tiny_model_dir), "--bits", "4", "--group-size", "32",
            "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--calib-samples", "4", "--output-dir", str(out),
            "--device", "cpu", "--checkpoint-every", "1", "--byte-tokens"]
    assert main(args) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["loss"]) == 3 and (out / "checkpoints" / "last.pt").exists()
    assert main(["eval", "--model", str(out / "model"), "--seq-len", "32", "--max-windows", "4", "--device", "cpu",
                 "--byte-tokens"]) == 0
    assert '"ppl"' in capsys.readouterr().out
    assert main(["export", "--model", str(out / "model"), "--output", str(tmp_path / "gptq")]) == 0
    assert (tmp_path / "gptq" / "model.safetensors").exists()


def test_bad_arguments(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "awq", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path)])
    assert main(["train", "--method", "rtn", "--model", str(tiny_model_dir), "--bits", "9",
                 "--output-dir", str(tmp_path)]) == 2
    assert "--bits must be an int in 2..8, got 9" in capsys.readouterr().err
    assert main(["train", "--method", "rtn", "--model", str(tiny_model_dir), "--group-size", "48", "--byte-tokens",
                 "--seq-len", "64", "--output-dir", str(tmp_path)]) == 2
    assert "must divide in_features" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.txt"), "--byte-tokens",
                 "--seq-len", "64"]) == 2
    assert "--data" in (err := capsys.readouterr().err) and "neither 'kjv' nor a readable text file" in err


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
           "--distributed", "fsdp", "--checkpoint-every", "2", "--byte-tokens", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["loss"]) == 3 and log["world_size"] == 2
    assert (out / "checkpoints" / "dcp" / "loop.pt").exists() and (out / "model").is_dir()
    assert main(["eval", "--model", str(out / "model"), "--seq-len", "32", "--max-windows", "2", "--device", "cpu",
                 "--byte-tokens"]) == 0


def _train(tmp_path, model_dir, method, *extra):
    out = tmp_path / method
    assert main(["train", "--method", method, "--model", str(model_dir), "--bits", "4", "--group-size", "32",
                 "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--calib-samples", "4", "--device", "cpu",
                 "--output-dir", str(out), *extra]) == 0
    return out / "model"


def test_saved_and_exported_models_carry_the_tokenizer(tmp_path, bpe_model_dir, capsys):
    model_dir = _train(tmp_path, bpe_model_dir, "efficientqat")
    assert main(["export", "--model", str(model_dir), "--output", str(tmp_path / "export")]) == 0
    assert "gptq (W4 group_size 32, checkpoint_format gptq)" in capsys.readouterr().out
    original = transformers.AutoTokenizer.from_pretrained(bpe_model_dir)
    text = "In the beginning God created the heaven and the earth."
    for path in (model_dir, tmp_path / "export"):
        assert transformers.AutoTokenizer.from_pretrained(path)(text)["input_ids"] == original(text)["input_ids"]
        assert transformers.GenerationConfig.from_pretrained(path).max_new_tokens == 17


def test_export_keeps_qalora_exact_or_rounds_on_request(tmp_path, bpe_model_dir, capsys):
    model_dir = _train(tmp_path, bpe_model_dir, "qalora", "--lr", "2e-3")
    capsys.readouterr()
    assert main(["export", "--model", str(model_dir), "--output", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr().out
    assert ": hqq (W4 group_size 32)" in out and "fractional zero point" in out
    assert (tmp_path / "auto" / "qmodel.pt").exists() and (tmp_path / "auto" / "tokenizer.json").exists()

    assert main(["export", "--model", str(model_dir), "--output", str(tmp_path / "gptq"), "--format", "gptq"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fractional zero point" in err and "'hqq' (exact)" in err
    assert not (tmp_path / "gptq").exists()

    assert main(["export", "--model", str(model_dir), "--output", str(tmp_path / "gptq"), "--format", "gptq",
                 "--round-zeros", "--seq-len", "32", "--max-windows", "8"]) == 0
    out = capsys.readouterr().out
    assert "fractional zero points: held-out perplexity" in out and ": gptq (W4" in out


def test_python_dash_m_qatext():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "qatext", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "train" in proc.stdout and "export" in proc.stdout


def test_train_compile_flag_trains_and_is_not_part_of_the_runs_identity(tmp_path, tiny_model_dir, capsys):
    """--compile runs the decoder layers compiled; a rerun without it resumes the same run (it changes
    how the steps run, not what they compute), instead of being refused as a changed run."""
    model_dir = _train(tmp_path, tiny_model_dir, "qalora", "--byte-tokens", "--compile")
    log = json.loads((tmp_path / "qalora" / "train_log.json").read_text())
    assert len(log["loss"]) == 6 and all(math.isfinite(v) for v in log["loss"])
    assert (model_dir / "model.safetensors").exists() or any(model_dir.glob("*.safetensors"))
    capsys.readouterr()
    _train(tmp_path, tiny_model_dir, "qalora", "--byte-tokens")
    assert "resuming from" in capsys.readouterr().out
