"""Zero-shot tasks through lm-eval-harness (EfficientQAT reports these), and a local task of our own.

`run_tasks(model, tokenizer, ["piqa", "arc_easy"])` scores any model qatext trained or loaded (its
QuantLinear layers included) with lm-eval's Hugging Face adapter. lm-eval's own tasks read their
data sets from the Hugging Face hub (or its local cache). `write_next_word_task` builds a task from
any held-out text instead, with nothing to download: a passage, then the true next word among
distractors drawn from the same text; lm-eval scores each choice by its log-likelihood.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import torch

INSTALL_HINT = "lm-eval is not installed: pip install 'qatext[eval]' (or pip install lm-eval)"


def require_lm_eval():
    """lm-eval's entry points, or one ImportError that says how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return lm_eval, HFLM, TaskManager


def run_tasks(model, tokenizer, tasks, tasks_dir=None, batch_size: int = 8, limit: int | None = None,
              num_fewshot: int = 0) -> dict:
    """Scores of `model` on lm-eval `tasks` ({task: {metric: value}}); `tasks_dir` (one directory or a
    list) holds extra task YAMLs, for example from write_next_word_task."""
    lm_eval, HFLM, TaskManager = require_lm_eval()  # noqa: N806 (classes)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("tasks: give at least one lm-eval task name")
    dirs = [tasks_dir] if isinstance(tasks_dir, (str, Path)) else list(tasks_dir or [])
    manager = TaskManager(include_path=[str(d) for d in dirs] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {', '.join(map(str, dirs))}" if dirs else " (give the directory of your task YAMLs)"
        raise ValueError(f"tasks: {', '.join(unknown)} not found among lm-eval's tasks{where}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                                  log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if k != "alias" and isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


def next_word_docs(text: str, n: int = 500, n_choices: int = 4, context_words: int = 48, seed: int = 0) -> list[dict]:
    """`n` passages of `context_words` words from `text`, each with its true next word among n_choices
    words of the text ({"context", "choices", "label"}; the distractors never equal the target)."""
    if n < 1 or n_choices < 2 or context_words < 1:
        raise ValueError(f"n >= 1, n_choices >= 2 and context_words >= 1 expected, got {n}, {n_choices}, "
                         f"{context_words}")
    words = text.split()
    # Distractors are other words of the text of the target's length, drawn by frequency: a model
    # that only counts characters or tokens, or favours common words, gains nothing (a random model
    # scores chance).
    by_len: dict[int, list[str]] = {}
    for w in words:
        if w.isalpha():
            by_len.setdefault(len(w), []).append(w)
    if len(words) <= context_words or sum(len(set(v)) for v in by_len.values()) < n_choices:
        raise ValueError(f"text: {len(words)} words are too few for {context_words}-word passages with "
                         f"{n_choices} choices")
    rng = random.Random(seed)

    def distractors(target: str) -> list[str] | None:
        pool = [w for w in by_len[len(target)] if w != target]
        if len(set(pool)) < n_choices - 1:
            return None
        picked: list[str] = []
        while len(picked) < n_choices - 1:
            w = rng.choice(pool)
            if w not in picked:
                picked.append(w)
        return picked

    starts = [i for i in range(0, len(words) - context_words) if words[i + context_words].isalpha()]
    rng.shuffle(starts)
    docs = []
    for start in starts:
        target = words[start + context_words]
        others = distractors(target)
        if others is None:
            continue
        choices = [target] + others
        rng.shuffle(choices)
        docs.append({"context": " ".join(words[start:start + context_words]), "choices": choices,
                     "label": choices.index(target)})  # lm-eval puts its target_delimiter, " ", between
        if len(docs) == n:
            break
    return docs


def write_next_word_task(text: str, out_dir, name: str = "next_word", n: int = 500, n_choices: int = 4,
                         context_words: int = 48, seed: int = 0) -> Path:
    """Write `name`.yaml and `name`.jsonl (next_word_docs) to out_dir. Returns out_dir, for
    run_tasks(tasks_dir=...)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"name: a task name of letters, digits and '_' expected, got {name!r}")
    docs = next_word_docs(text, n, n_choices, context_words, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (out_dir / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n", encoding="utf-8")
    return out_dir


@torch.no_grad()
def choice_scores(model, encode, docs: list[dict], batch_size: int = 64) -> torch.Tensor:
    """Log-likelihood of each choice of each doc [docs, choices] (-inf where a doc has fewer), as lm-eval
    scores a multiple-choice task: the summed log-probabilities of the tokens of context + " " + choice
    beyond those of the context alone. `encode(str) -> list[int]` is the tokenizer without special
    tokens. tests/test_zero_shot.py checks the accuracy it gives against lm-eval's."""
    device = next(model.parameters()).device
    rows = []  # (doc, choice, token ids, number of context tokens)
    for d_i, d in enumerate(docs):
        n_ctx = len(encode(d["context"]))
        rows += [(d_i, c_i, encode(d["context"] + " " + c), n_ctx) for c_i, c in enumerate(d["choices"])]
    scores = torch.full((len(docs), max(len(d["choices"]) for d in docs)), -math.inf, dtype=torch.float64)
    rows.sort(key=lambda r: len(r[2]))  # similar lengths share a batch: little padding
    was_training = model.training
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        ids = torch.zeros(len(chunk), max(len(r[2]) for r in chunk), dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, :len(r[2])] = torch.tensor(r[2])  # right padding: a causal model never sees it
        logp = torch.log_softmax(model(input_ids=ids.to(device), use_cache=False).logits.float(), -1)
        sums = [logp[j, n_ctx - 1:len(tokens) - 1].gather(-1, torch.tensor(tokens[n_ctx:], device=device)[:, None]).sum()
                for j, (_, _, tokens, n_ctx) in enumerate(chunk)]  # logits at p predict token p + 1
        for (d_i, c_i, _, _), value in zip(chunk, torch.stack(sums).double().cpu().tolist()):
            scores[d_i, c_i] = value
    model.train(was_training)
    return scores


def choice_accuracy(model, encode, docs: list[dict], batch_size: int = 64) -> float:
    """lm-eval's `acc` of a multiple-choice task (choice_scores' argmax against the labels)."""
    labels = torch.tensor([d["label"] for d in docs])
    return (choice_scores(model, encode, docs, batch_size).argmax(1) == labels).double().mean().item()
