"""The command line's edges, run as a user runs it (a subprocess per command): nothing of the user's
is lost, resume never mixes runs, eval never silently uses another tokenizer, and every common
mistake ends in one line and exit code 2."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

TRAIN = ["--bits", "4", "--group-size", "32", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
         "--calib-samples", "4", "--checkpoint-every", "2", "--device", "cpu"]


def qatext(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qatext", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def last_line(stderr: str) -> str:
    """The one message qatext ends with (progress bars may stand before it; no traceback may)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("qatext ") and ": warning:" not in line]
    assert len(ours) == 1 and lines[-1] == ours[0], stderr[-3000:]
    return ours[0]


def one_line_error(proc, *fragments):
    """Exit code 2 and one `qatext <command>: ...` line, the last, holding every fragment."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = last_line(proc.stderr)
    for fragment in fragments:
        assert fragment in line, line
    return line


def snapshot(root: Path) -> dict:
    """Every file under root with its content hash (what must not change)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, bpe_model_dir):
    """One finished lrqat run with a real tokenizer: OUTPUT/{checkpoints, model, train_log.json}."""
    out = tmp_path_factory.mktemp("run") / "lrqat"
    proc = qatext("train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", out, *TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fresh run" in proc.stdout and "BPE" not in proc.stderr
    return out


# ---------------------------------------------------------------- nothing of the user's is lost


def test_export_refuses_a_users_directory_and_a_file(tmp_path, trained_run):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(mine)
    one_line_error(qatext("export", "--model", trained_run / "model", "--output", mine), "not written by qatext")
    one_line_error(qatext("export", "--model", trained_run / "model", "--output", mine, "--overwrite"),
                   "not written by qatext")
    assert snapshot(mine) == before
    a_file = tmp_path / "export.txt"
    a_file.write_text("mine")
    one_line_error(qatext("export", "--model", trained_run / "model", "--output", a_file), "is a file")
    assert a_file.read_text() == "mine" and not list(tmp_path.glob(".export.txt*"))


def test_export_round_zeros_checks_its_window_before_writing(tmp_path, trained_run):
    """--round-zeros evaluates held-out windows: a --seq-len or --max-windows below 1 is one line naming
    the flag, before the model loads; a --seq-len beyond the model's positions is refused as train and
    eval refuse it (not silently cut); by default the window is the model's positions where it has fewer
    than 2048, and nothing is written before the export succeeds."""
    model = trained_run / "model"
    positions = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    out = tmp_path / "export"
    cmd = ["export", "--model", model, "--output", out, "--format", "gptq", "--round-zeros", "--max-windows", "2"]
    one_line_error(qatext(*cmd, "--seq-len", "0"), "--seq-len must be >= 1, got 0")
    one_line_error(qatext(*cmd[:-2], "--max-windows", "0"), "--max-windows must be >= 1, got 0")
    one_line_error(qatext(*cmd, "--seq-len", positions + 1),
                   f"--seq-len {positions + 1} exceeds the model's {positions} positions", f"--seq-len {positions}")
    assert not out.exists()
    proc = qatext(*cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{positions}-token windows" in proc.stdout and (out / "config.json").exists()


def test_export_refuses_to_write_over_the_model_it_reads(trained_run):
    model = trained_run / "model"
    before = snapshot(model)
    for output in (model, f"{model}/", model / ".." / "model"):
        one_line_error(qatext("export", "--model", model, "--output", output, "--overwrite"),
                       f"--output {output} is the directory the model was read from")
    assert snapshot(model) == before


def test_export_overwrite_replaces_only_qatexts_files(tmp_path, trained_run):
    out = tmp_path / "export"
    assert qatext("export", "--model", trained_run / "model", "--output", out).returncode == 0
    (out / "README.md").write_text("my model card")
    one_line_error(qatext("export", "--model", trained_run / "model", "--output", out), "--overwrite")
    proc = qatext("export", "--model", trained_run / "model", "--output", out, "--overwrite", "--format", "hqq")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "README.md").read_text() == "my model card"
    assert (out / "qmodel.pt").exists() and not (out / "model.safetensors").exists()  # the GPTQ files went


def test_train_rerun_keeps_the_users_files_in_model_dir(tmp_path, bpe_model_dir):
    out = tmp_path / "run"
    assert qatext("train", "--method", "rtn", "--model", bpe_model_dir, "--output-dir", out, *TRAIN).returncode == 0
    (out / "model" / "notes.txt").write_text("mine")
    proc = qatext("train", "--method", "rtn", "--model", bpe_model_dir, "--output-dir", out, *TRAIN)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model" / "notes.txt").read_text() == "mine"


def test_train_refuses_a_foreign_output_dir_and_a_file(tmp_path, bpe_model_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    one_line_error(qatext("train", "--method", "rtn", "--model", bpe_model_dir, "--output-dir", mine, *TRAIN),
                   "not a qatext run directory")
    assert snapshot(mine) == {"thesis.tex": hashlib.sha256(b"x").hexdigest()}
    (tmp_path / "f").write_text("y")
    one_line_error(qatext("train", "--method", "rtn", "--model", bpe_model_dir, "--output-dir", tmp_path / "f",
                          *TRAIN), "is a file")


def test_train_with_a_group_size_the_model_cannot_take_writes_nothing(tmp_path, bpe_model_dir):
    """The tiny model's attention layers have 64 inputs: --group-size 128 is refused before the run is
    recorded, so the corrected rerun needs no --restart."""
    out = tmp_path / "run"
    args = dict(zip(TRAIN[::2], TRAIN[1::2]), **{"--group-size": "128"})
    flat = [x for kv in args.items() for x in kv]
    one_line_error(qatext("train", "--method", "qalora", "--model", bpe_model_dir, "--output-dir", out, *flat),
                   "--group-size 128 must divide", "has 64", "use --group-size 64")
    assert not out.exists()


def test_a_model_with_fused_experts_in_another_layout_is_refused_before_writing(tmp_path):
    """A GPT-OSS (experts stacked transposed, with biases: a layout qatext does not take apart): quantizing
    only its attention would leave most of the block weights in full precision under a W4 label, so the
    run is refused, naming the tensors and the share, before anything is written."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, head_dim=16)
    transformers.GptOssForCausalLM(cfg).save_pretrained(tmp_path / "gpt_oss")
    out = tmp_path / "run"
    one_line_error(qatext("train", "--method", "rtn", "--model", tmp_path / "gpt_oss", "--byte-tokens",
                          "--group-size", "32", "--output-dir", out, "--device", "cpu"),
                   "2 stacked weight tensors outside nn.Linear", "model.layers.0.mlp.experts.gate_up_proj [4, 64, 256]",
                   "of GptOssExperts", "in a layout qatext does not take apart")
    assert not out.exists()


def test_a_group_size_that_does_not_divide_an_experts_width_is_refused_before_writing(tmp_path):
    """The experts' widths (hidden for gate/up, moe_intermediate_size for down) are checked as the dense
    layers' are, though they are not nn.Linear until quantize_model takes them apart."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=64, moe_intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                      head_dim=16)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    out = tmp_path / "run"
    one_line_error(qatext("train", "--method", "rtn", "--model", tmp_path / "moe", "--byte-tokens", "--group-size", "32",
                          "--output-dir", out, "--device", "cpu"),
                   "--group-size 32 must divide", "layer 0.mlp.experts.0.down_proj has 48", "use --group-size 16")
    assert not out.exists()


def test_a_mixture_of_experts_trains_evaluates_generates_and_exports_on_request(tmp_path, bpe_model_dir):
    """A Qwen3-MoE with a real tokenizer, as a user runs it: every expert quantized and trained, the model
    evaluated and generating; the default export, whose loaders would build the experts stacked and
    random, is refused in one line and writes nothing; --format gptq writes them one module an expert
    (for GPTQModel, vLLM, SGLang)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(vocab_size=384, hidden_size=64, moe_intermediate_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                      num_experts_per_tok=2, head_dim=16, max_position_embeddings=128)
    source = tmp_path / "qwen3_moe"
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bpe_model_dir / name, source / name)
    out = tmp_path / "run"
    proc = qatext("train", "--method", "lrqat", "--model", source, "--output-dir", out, *TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "model" / "qatext_config.json").read_text())["layers"]
    assert len(saved) == 2 * (4 + 4 * 3) and "model.layers.1.mlp.experts.3.down_proj" in saved
    proc = qatext("eval", "--model", out / "model", "--max-windows", "2", "--seq-len", "32", "--device", "cpu")
    assert proc.returncode == 0 and '"ppl"' in proc.stdout, proc.stderr[-3000:]
    proc = qatext("generate", "--model", out / "model", "--prompt", "In the beginning", "--max-new-tokens", "4",
                  "--device", "cpu")
    assert proc.returncode == 0 and proc.stdout.startswith("In the beginning"), proc.stderr[-3000:]
    one_line_error(qatext("export", "--model", out / "model", "--output", tmp_path / "gptq"),
                   "24 of 32 quantized layers (e.g. model.layers.0.mlp.experts.0.gate_proj) are not modules of "
                   "Qwen3MoeForCausalLM as transformers builds it", "give format 'gptq' (--format gptq)")
    assert not (tmp_path / "gptq").exists()
    proc = qatext("export", "--model", out / "model", "--output", tmp_path / "gptq", "--format", "gptq",
                  "--checkpoint-format", "gptq_v2")
    assert proc.returncode == 0 and "one module an expert" in proc.stdout, proc.stderr[-3000:]
    assert (tmp_path / "gptq" / "tokenizer.json").exists()


# ---------------------------------------------------------------- resume is safe


@pytest.mark.parametrize("change,expected", [(["--bits", "3"], "spec.bits 4 -> 3"),
                                             (["--group-size", "64"], "spec.group_size 32 -> 64"),
                                             (["--lr", "5e-3"], "lr (default) -> 0.005")])
def test_resume_with_other_settings_is_refused(trained_run, bpe_model_dir, change, expected):
    before = snapshot(trained_run)
    args = dict(zip(TRAIN[::2], TRAIN[1::2]))
    args.update(dict(zip(change[::2], change[1::2])))
    flat = [x for kv in args.items() for x in kv]
    one_line_error(qatext("train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", trained_run, *flat),
                   expected, "--restart")
    assert snapshot(trained_run) == before


def test_resume_with_another_method_is_refused_and_restart_starts_over(tmp_path, bpe_model_dir):
    out = tmp_path / "run"
    assert qatext("train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", out, *TRAIN).returncode == 0
    one_line_error(qatext("train", "--method", "qalora", "--model", bpe_model_dir, "--output-dir", out, *TRAIN),
                   "method lrqat -> qalora")
    proc = qatext("train", "--method", "qalora", "--model", bpe_model_dir, "--output-dir", out, *TRAIN, "--restart")
    assert proc.returncode == 0 and "fresh run" in proc.stdout, proc.stderr[-2000:]
    assert json.loads((out / "train_log.json").read_text())["method"] == "qalora"
    assert json.loads((out / "model" / "qatext_config.json").read_text())["layers"]


@pytest.mark.parametrize("content,why", [(b"", "is empty"), (b"PK\x03\x04 truncated", "is truncated or not a torch"),
                                         (None, "is truncated or not a torch"),
                                         (os.urandom(4096), "is truncated or not a torch")],
                         ids=["empty", "zip-header", "cut-short", "random"])
def test_corrupt_checkpoint_is_one_line(trained_run, bpe_model_dir, tmp_path, content, why):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(content if content is not None else last.read_bytes()[:1000])  # None: cut short
    one_line_error(qatext("train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", run, *TRAIN),
                   f"last.pt {why}", "--restart")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def test_checkpoint_crafted_to_run_code_is_refused(trained_run, bpe_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _RunsCode.marker = tmp_path / "pwned"
    torch.save({"model": _RunsCode(), "optimizer": {}, "step": 1}, run / "checkpoints" / "last.pt",
               pickle_protocol=2)
    one_line_error(qatext("train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", run, *TRAIN),
                   "loading it could run code: refused")
    assert not _RunsCode.marker.exists()


def test_block_ap_resumes_after_its_last_finished_block(tmp_path, monkeypatch):
    """Interrupted after block 1 of 2, a rerun finishes block 2 only and ends with the same model."""
    from test_recipes import tiny_llama

    from qatext import QuantSpec, data

    eq = sys.modules["qatext.methods.efficientqat"]  # the package exports a function of the same name

    tokens = data.ByteTokenizer().encode(data.load_kjv()[:50_000])
    kwargs = dict(n_samples=4, seq_len=32, batch_size=2, epochs=1, progress=False)
    reference = eq.block_ap(tiny_llama(), QuantSpec(3, 32), tokens, **kwargs)

    calls = []
    real = eq.convert_layers

    def interrupt_second_block(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(eq, "convert_layers", interrupt_second_block)
    with pytest.raises(KeyboardInterrupt):
        eq.block_ap(tiny_llama(), QuantSpec(3, 32), tokens, checkpoint_dir=tmp_path, **kwargs)
    assert torch.load(tmp_path / "block_ap.pt", weights_only=True)["done"] == 1
    calls.clear()
    monkeypatch.setattr(eq, "convert_layers", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    resumed = eq.block_ap(tiny_llama(), QuantSpec(3, 32), tokens, checkpoint_dir=tmp_path, **kwargs)
    assert len(calls) == 1  # only the second block was trained again
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- tokenizer and lengths


def test_eval_needs_the_models_tokenizer(tmp_path, tiny_model_dir, trained_run):
    one_line_error(qatext("eval", "--model", tiny_model_dir, "--seq-len", "32"), "no tokenizer files", "--byte-tokens")
    proc = qatext("eval", "--model", trained_run / "model", "--seq-len", "32", "--max-windows", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["vocab_size"] == 384 and str(trained_run / "model") in result["tokenizer"]
    one_line_error(qatext("eval", "--model", trained_run / "model", "--seq-len", "4096"),
                   "exceeds the model's 128 positions")


def test_seq_len_defaults_to_what_the_model_can_take(trained_run):
    """Without --seq-len, eval windows are 2048 tokens or the model's positions where it has fewer (128 here)."""
    proc = qatext("eval", "--model", trained_run / "model", "--max-windows", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["seq_len"] == 128


# ---------------------------------------------------------------- one clear line


def test_common_mistakes_are_one_line(tmp_path, bpe_model_dir, trained_run):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", tmp_path / "a", "--lr", "-1"],
         "--lr must be a positive number"),
        (["train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", tmp_path / "a", "--steps", "0"],
         "--steps must be >= 1"),
        (["train", "--method", "lrqat", "--model", trained_run / "model", "--output-dir", tmp_path / "b"],
         "already quantized"),
        (["eval", "--model", trained_run], f"its trained model is {trained_run / 'model'}"),
        (["eval", "--model", tmp_path / "nowhere"], "is not a directory"),
        (["eval", "--model", trained_run / "model", "--data", empty, "--seq-len", "32"], "is empty"),
        (["eval", "--model", trained_run / "model", "--max-windows", "0"], "--max-windows must be >= 1"),
        (["export", "--model", bpe_model_dir, "--output", tmp_path / "x"],
         "no quantized layers (a full-precision model); export the model `qatext train` wrote"),
    ]
    for args, fragment in cases:
        one_line_error(qatext(*args), fragment)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "x").exists()


def test_nan_loss_is_one_line_with_step_and_lr(tmp_path, bpe_model_dir):
    line = one_line_error(qatext("train", "--method", "full_qat", "--model", bpe_model_dir, "--output-dir",
                                 tmp_path / "run", *TRAIN, "--lr", "1e30"), "loss became", "at step", "(lr ")
    assert "lower the learning rate" in line


def test_ctrl_c_is_one_line_naming_the_checkpoints(tmp_path, bpe_model_dir):
    args = ["train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", tmp_path / "run",
            "--bits", "4", "--group-size", "32", "--steps", "100000", "--batch-size", "2", "--seq-len", "32",
            "--checkpoint-every", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A terminal's Ctrl-C: the child must start with SIGINT's default action. Run as a background job, this
    # process inherits SIGINT ignored, which exec passes on (and Python then installs no KeyboardInterrupt);
    # a handler here is reset to the default in the child instead.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "qatext", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "fresh run" in proc.stdout.readline()
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    line = last_line(err)
    assert "interrupted" in line and str(tmp_path / "run" / "checkpoints") in line and "resumes" in line


def test_help_documents_every_option_with_its_default():
    import argparse

    from qatext.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"qatext {name} {action.option_strings}: no help text"
            if action.default not in (None, False):
                assert f"(default: {action.default})" in text, f"qatext {name} {action.option_strings}: no default"
        # Where leaving an option out means None, its help says what that does, once.
        assert "(default: None)" not in text, f"qatext {name}: an option's help shows '(default: None)'"
    proc = qatext("train", "--help")
    assert proc.returncode == 0 and "weight bits, 2..8 (default: 4)" in " ".join(proc.stdout.split())


def test_ignored_option_warns(tmp_path, bpe_model_dir):
    proc = qatext("train", "--method", "full_qat", "--model", bpe_model_dir, "--output-dir", tmp_path / "r", *TRAIN,
                  "--rank", "8")
    assert proc.returncode == 0 and "warning: --rank is ignored by --method full_qat" in proc.stderr


def test_lrqat_storage_reaches_the_layers_and_a_changed_one_is_refused(tmp_path, bpe_model_dir):
    out = tmp_path / "r"
    proc = qatext("train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", out, *TRAIN,
                  "--lrqat-storage", "fixed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "checkpoints" / "run.json").read_text())["lrqat_storage"] == "fixed"
    from qatext.cli import _method_kwargs, build_parser

    args = build_parser().parse_args(["train", "--method", "lrqat", "--model", "m", "--output-dir", "o",
                                      "--lrqat-storage", "fixed"])
    assert _method_kwargs(args) == {"storage": "fixed"}  # what methods.lrqat receives
    proc = qatext("train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", out, *TRAIN,
                  "--lrqat-storage", "int")
    assert proc.returncode == 2 and "lrqat_storage" in proc.stderr and "Traceback" not in proc.stderr
    warned = qatext("train", "--method", "qalora", "--model", bpe_model_dir, "--output-dir", tmp_path / "q", *TRAIN,
                    "--lrqat-storage", "fixed")
    assert warned.returncode == 0 and "warning: --lrqat-storage is ignored by --method qalora" in warned.stderr


def test_the_same_model_moved_elsewhere_still_resumes(tmp_path, bpe_model_dir, trained_run):
    moved = tmp_path / "moved"
    shutil.copytree(bpe_model_dir, moved)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    proc = qatext("train", "--method", "lrqat", "--model", moved, "--output-dir", run, *TRAIN)
    assert proc.returncode == 0 and "resuming from" in proc.stdout, proc.stderr[-2000:]


def test_generate_streams_a_continuation(trained_run, tiny_model_dir):
    proc = qatext("generate", "--model", trained_run / "model", "--prompt", "In the beginning", "--max-new-tokens", "8",
                  "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("In the beginning") and len(proc.stdout.strip()) > len("In the beginning")
    one_line_error(qatext("generate", "--model", tiny_model_dir, "--prompt", "x"), "no tokenizer files")
    one_line_error(qatext("generate", "--model", trained_run / "model", "--prompt", "x", "--max-new-tokens", "999"),
                   "exceed the model's 128 positions")


def test_jsonl_data_is_its_records_text(tmp_path, trained_run):
    """A .jsonl corpus (C4's, RedPajama's layout) is read as its records' "text", not as JSON syntax; a
    line that is not JSON, or a record without "text", is one line naming the line before the model loads."""
    from qatext import data

    corpus = tmp_path / "c4.jsonl"
    corpus.write_text('{"text": "In the beginning", "url": "x"}\n\n{"text": "God created"}\n')
    assert data.load_text(corpus) == "In the beginning\n\nGod created"
    proc = qatext("eval", "--model", trained_run / "model", "--data", corpus, "--seq-len", "4", "--val-fraction",
                  "0.5", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for content, fragment in [('{"text": "a"}\n{"messages": []}\n', "line 2 has no string field 'text' (keys ['messages'])"),
                              ('{"text": "a"}\n{"text": \n', "line 2 is not JSON"),
                              ('["a"]\n', "line 1 has no string field 'text' (a list)")]:
        corpus.write_text(content)
        one_line_error(qatext("eval", "--model", tmp_path / "absent", "--data", corpus), f"--data {corpus} {fragment}")


def test_parquet_data_is_its_text_column(tmp_path):
    """A Parquet corpus (the hub's layout) is read as its "text" column; a file without one, or not
    Parquet at all, is named."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from qatext import data

    corpus = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["In the beginning", None, "God created"], "id": [1, 2, 3]}), corpus)
    assert data.load_text(corpus) == "In the beginning\n\nGod created"
    pq.write_table(pa.table({"content": ["x"]}), corpus)
    with pytest.raises(ValueError, match=r"has no column 'text' \(columns \['content'\]\)"):
        data.load_text(corpus)
    corpus.write_text("not parquet")
    one_line_error(qatext("eval", "--model", tmp_path / "absent", "--data", corpus),
                   f"--data {corpus} is not a readable Parquet file")


def test_generate_chat_sends_the_prompt_through_the_chat_template(tmp_path, trained_run):
    """An instruct model continues a user turn, not raw text: --chat applies the tokenizer's own template
    (the streamed text starts with it); a tokenizer without one is refused before the model loads."""
    one_line_error(qatext("generate", "--model", trained_run / "model", "--prompt", "x", "--chat"),
                   "--chat: the tokenizer in --model", "has no chat template", "leave out --chat")
    model = tmp_path / "chat"
    shutil.copytree(trained_run / "model", model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    proc = qatext("generate", "--model", model, "--prompt", "In the beginning", "--chat", "--max-new-tokens", "4",
                  "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("<|user|>In the beginning\n<|assistant|>"), proc.stdout


@pytest.mark.parametrize("command", ["train", "eval", "export"])
@pytest.mark.parametrize("flags, fragment", [
    (["--data", "missing.txt"], "--data 'missing.txt' is neither 'kjv' nor a readable text file"),
    (["--val-fraction", "0"], "--val-fraction must be in (0, 1), got 0.0"),
])
def test_text_options_are_checked_before_the_model_loads(tmp_path, command, flags, fragment):
    # The model directory does not exist: --data and --val-fraction are refused before it is looked at.
    args = {"train": ["--method", "rtn", "--output-dir", tmp_path / "out"], "eval": [],
            "export": ["--output", tmp_path / "out", "--format", "gptq", "--round-zeros"]}[command]
    one_line_error(qatext(command, "--model", tmp_path / "absent", *args, *flags), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--bits", "1"], "--bits must be an int in 2..8, got 1"),
    (["--group-size", "0"], "--group-size must be a positive int or -1 (per-channel), got 0"),
])
def test_quantization_flags_are_named_in_their_errors(tmp_path, flags, fragment):
    one_line_error(qatext("train", "--method", "rtn", "--model", tmp_path / "absent", "--output-dir", tmp_path / "o",
                          *flags), fragment)


def test_training_text_shorter_than_a_window_is_refused_before_writing(tmp_path, bpe_model_dir):
    short = tmp_path / "short.txt"
    short.write_text("In the beginning was the word.\n")
    out = tmp_path / "run"
    one_line_error(qatext("train", "--method", "lrqat", "--model", bpe_model_dir, "--output-dir", out, *TRAIN,
                          "--data", short), "is shorter than one window of --seq-len 32")
    assert not out.exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--temperature", "0.7", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
])
def test_generate_checks_its_sampling_options_before_loading(tmp_path, flags, fragment):
    # The model directory does not exist: the sampling options are refused before it is looked at.
    one_line_error(qatext("generate", "--model", tmp_path / "absent", "--prompt", "x", *flags), fragment)


@pytest.mark.parametrize("device, fragment", [
    ("foo", "--device foo: qatext runs on cpu or cuda"),
    ("mps", "--device mps: qatext runs on cpu or cuda"),
    ("cuda:7", "--device cuda:7"),
])
@pytest.mark.parametrize("command", ["train", "eval", "generate", "demo"])
def test_a_device_qatext_cannot_use_is_one_line_before_any_work(tmp_path, bpe_model_dir, command, device, fragment):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    out = tmp_path / "out"
    args = {"train": ["--method", "rtn", "--model", bpe_model_dir, "--output-dir", out],
            "eval": ["--model", bpe_model_dir],
            "generate": ["--model", bpe_model_dir, "--prompt", "x"],
            "demo": ["--out", out, "--quick"]}[command]
    one_line_error(qatext(command, *args, "--device", device), fragment)
    assert not out.exists()  # nothing written first


def test_an_hqq_export_is_named_not_misread(tmp_path, trained_run):
    out = tmp_path / "hqq"
    assert qatext("export", "--model", trained_run / "model", "--output", out, "--format", "hqq").returncode == 0
    for command in ("eval", "generate"):
        one_line_error(qatext(command, "--model", out, "--prompt" if command == "generate" else "--seq-len",
                              "x" if command == "generate" else "32"), "is an HQQ export")
    # export and train name it before loading it, as they name a GPTQ export (which transformers would load)
    one_line_error(qatext("export", "--model", out, "--output", tmp_path / "again"),
                   "is already quantized (hqq), not a qatext model; export the model `qatext train` wrote")
    one_line_error(qatext("train", "--method", "rtn", "--model", out, "--output-dir", tmp_path / "run"),
                   "is already quantized (hqq); train from the full-precision model it came from")
    gptq = tmp_path / "gptq"
    assert qatext("export", "--model", trained_run / "model", "--output", gptq, "--format", "gptq").returncode == 0
    one_line_error(qatext("export", "--model", gptq, "--output", tmp_path / "again"),
                   "is already quantized (gptq), not a qatext model")
    assert not (tmp_path / "again").exists() and not (tmp_path / "run").exists()


def test_demo_writes_only_its_own_results(tmp_path):
    cache = tmp_path / "cache"
    demo = ["demo", "--quick", "--cache-dir", cache, "--device", "cpu", "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my own results\n")
    one_line_error(qatext(*demo, mine), "is not empty and was not written by qatext")
    assert (mine / "results.md").read_text() == "my own results\n"
    assert not cache.exists()  # refused before the run
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_error(qatext(*demo, a_file), "is a file, not a directory")
    out = tmp_path / "out"
    assert qatext(*demo, out).returncode == 0
    (out / "notes.txt").write_text("mine")
    rerun = qatext(*demo, out)  # an earlier demo's directory: its results replaced, the user's file kept
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "results.json").read_text())["runs"]


@pytest.mark.parametrize("command, hint", [
    ("train", "add --activation-checkpointing (the run resumes with it)"),
    ("eval", "lower --batch-size"),
    ("generate", "or --device cpu"),
])
def test_running_out_of_gpu_memory_is_one_line_with_what_to_change(monkeypatch, capsys, command, hint):
    from qatext import cli

    def out_of_memory(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                          "capacity of 79.10 GiB of which 3.94 GiB is free. Including non-PyTorch ...")

    monkeypatch.setattr(cli, f"cmd_{command}", out_of_memory)
    required = {"train": ["--method", "rtn", "--model", "m", "--output-dir", "o"], "eval": ["--model", "m"],
                "generate": ["--model", "m", "--prompt", "x"]}[command]
    assert cli.main([command, *required]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qatext {command}: the GPU ran out of memory (CUDA out of memory. "
                                                "Tried to allocate 20.00 GiB); ") and hint in err[0]


def test_a_damaged_or_newer_saved_model_is_one_line(tmp_path, trained_run):
    """A saved model whose qatext_config.json is damaged or from a newer qatext (it would load with the
    new fields ignored), or whose weights file is cut short (a safetensors traceback before)."""
    def damaged(name, change):
        model = tmp_path / name
        shutil.copytree(trained_run / "model", model)
        change(model)
        return model

    def newer(model):
        config = json.loads((model / "qatext_config.json").read_text())
        (model / "qatext_config.json").write_text(json.dumps({**config, "version": config["version"] + 1}))

    cases = [(damaged("json", lambda m: (m / "qatext_config.json").write_text("{cut")), "qatext_config.json is not valid JSON"),
             (damaged("newer", newer), "was written by a newer qatext (format version 2; this one reads 1); upgrade"),
             (damaged("cut", lambda m: os.truncate(m / "model.safetensors", 1000)),
              "model.safetensors is damaged (Error while deserializing header")]
    for model, fragment in cases:
        one_line_error(qatext("eval", "--model", model, "--device", "cpu"), f"load_quantized: {model}", fragment)


def test_a_broken_model_directory_is_one_line(tmp_path):
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    one_line_error(qatext("train", "--method", "rtn", "--model", bad_json, "--output-dir", tmp_path / "o"),
                   f"--model {bad_json}: its config.json is not valid JSON")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no_such_architecture"}')
    # transformers' message goes on for paragraphs; the user gets its first line
    one_line_error(qatext("eval", "--model", unknown, "--device", "cpu"), "no_such_architecture")

