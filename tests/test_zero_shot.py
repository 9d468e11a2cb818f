"""Evaluation beyond perplexity: lm-eval zero-shot tasks on qatext models offline (the local next-word task,
`qatext eval --tasks`), and the interval that a few seeds give."""

import json
import os
import subprocess
import sys

import pytest
import torch

from qatext import data, zero_shot

HELD_OUT = data.load_kjv()[-60_000:]


def test_next_word_task_layout(tmp_path):
    out = zero_shot.write_next_word_task(HELD_OUT, tmp_path, name="nw", n=40, n_choices=4, context_words=12, seed=3)
    docs = [json.loads(line) for line in (out / "nw.jsonl").read_text().splitlines()]
    assert len(docs) == 40
    words = HELD_OUT.split()
    text = " ".join(words)
    for d in docs:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        target = d["choices"][d["label"]]
        assert f"{d['context']} {target}" in text  # the labelled choice is the word that follows the passage
        assert {len(c) for c in d["choices"]} == {len(target)}  # distractors match the target's length
        assert len(d["context"].split()) == 12
    again = zero_shot.write_next_word_task(HELD_OUT, tmp_path / "again", name="nw", n=40, n_choices=4,
                                           context_words=12, seed=3)
    assert (again / "nw.jsonl").read_text() == (out / "nw.jsonl").read_text()  # reproducible
    assert "task: nw" in (out / "nw.yaml").read_text()


@pytest.mark.parametrize("kwargs, match", [({"name": "bad name"}, "name"), ({"n_choices": 1}, "n_choices"),
                                           ({"context_words": 10**6}, "too few")])
def test_next_word_task_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        zero_shot.write_next_word_task(HELD_OUT, tmp_path, **kwargs)


def test_run_tasks_scores_the_quantized_model(tmp_path, bpe_model_dir):
    """lm-eval's accuracy on a W4 RTN model equals the argmax of the choices' log-likelihoods computed
    here with the same model: the quantized layers are what lm-eval scores."""
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qatext import QuantSpec, methods

    tok = AutoTokenizer.from_pretrained(bpe_model_dir, local_files_only=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir, local_files_only=True).eval()
    with torch.no_grad():  # a random model's choices tie within rounding; sharper logits separate them
        model.lm_head.weight.mul_(30)
    methods.rtn(model, QuantSpec(4, 32, False))
    tasks_dir = zero_shot.write_next_word_task(HELD_OUT, tmp_path, name="nw_test", n=24, context_words=12)
    result = zero_shot.run_tasks(model, tok, ["nw_test"], tasks_dir=tasks_dir, batch_size=4)["nw_test"]
    docs = [json.loads(line) for line in (tasks_dir / "nw_test.jsonl").read_text().splitlines()]
    scores = zero_shot.choice_scores(model, lambda text: tok(text, add_special_tokens=False)["input_ids"], docs,
                                     batch_size=5)
    top2 = scores.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-2  # no near-tie for batching's rounding to flip
    hits = (scores.argmax(1) == torch.tensor([d["label"] for d in docs])).sum().item()
    assert result["sample_len"] == 24
    assert 0 < hits < 24  # the comparison can fail both ways
    assert result["acc"] == pytest.approx(hits / len(docs))


def test_choice_scores_sum_the_continuation_tokens(bpe_model_dir):
    """Each choice's score is the log-likelihood of its own tokens after the context, whatever the batch
    (padding never leaks in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_model_dir, local_files_only=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir, local_files_only=True).eval()
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    docs = zero_shot.next_word_docs(HELD_OUT, n=6, context_words=10, seed=1)
    scores = zero_shot.choice_scores(model, encode, docs, batch_size=3)
    for d_i, d in enumerate(docs):
        for c_i, c in enumerate(d["choices"]):
            ctx, whole = encode(d["context"]), encode(d["context"] + " " + c)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            expected = sum(logp[p - 1, whole[p]].item() for p in range(len(ctx), len(whole)))
            assert scores[d_i, c_i].item() == pytest.approx(expected, abs=1e-3)
    assert zero_shot.choice_accuracy(model, encode, docs) == pytest.approx(
        (scores.argmax(1) == torch.tensor([d["label"] for d in docs])).double().mean().item())


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'qatext\[eval\]'"):
        zero_shot.require_lm_eval()


def test_run_tasks_unknown_task(tmp_path, bpe_model_dir):
    pytest.importorskip("lm_eval")
    with pytest.raises(ValueError, match="no_such_task not found"):
        zero_shot.run_tasks(None, None, ["no_such_task"], tasks_dir=tmp_path)


def _qatext(*args, cwd):
    return subprocess.run([sys.executable, "-m", "qatext", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def test_cli_eval_tasks(tmp_path, bpe_model_dir):
    pytest.importorskip("lm_eval")
    r = _qatext("eval", "--model", str(bpe_model_dir), "--tasks", "qatext_next_word", "--limit", "16", "--device",
                "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    scores = json.loads(r.stdout[r.stdout.index("{"):])["tasks"]["qatext_next_word"]
    assert scores["sample_len"] == 16 and 0 <= scores["acc"] <= 1


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "no_such_task"], "no_such_task not found among lm-eval's tasks"),
    (["--tasks", " , "], "--tasks: give lm-eval task names"),
    (["--tasks", "x", "--tasks-dir", "missing_dir"], "--tasks-dir missing_dir is not a directory"),
    (["--tasks", "x", "--limit", "0"], "--limit must be >= 1"),
    (["--tasks", "qatext_next_word", "--val-fraction", "2"], "--val-fraction must be in (0, 1)"),
])
def test_cli_eval_tasks_bad_input(tmp_path, bpe_model_dir, extra, message):
    pytest.importorskip("lm_eval")
    r = _qatext("eval", "--model", str(bpe_model_dir), "--device", "cpu", *extra, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_eval_tasks_needs_a_tokenizer(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval")
    r = _qatext("eval", "--model", str(tiny_model_dir), "--tasks", "qatext_next_word", cwd=tmp_path)
    assert r.returncode == 2 and "needs the model's tokenizer files" in r.stderr


def test_mean_interval():
    from qatext.evaluate import mean_interval

    assert mean_interval([3.0]) == (3.0, 0.0)
    mean, half = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / 3**0.5)
    _, half = mean_interval([0.0, 1.0] * 10)  # 19 degrees of freedom: t = 2.093
    assert half == pytest.approx(2.093 * (20 / 19 / 4) ** 0.5 / 20**0.5, rel=1e-3)
    with pytest.raises(ValueError):
        mean_interval([])
