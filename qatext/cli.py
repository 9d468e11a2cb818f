"""qatext command line: train | eval | export | generate | demo (also `python -m qatext`).

Every user mistake ends in one line, `qatext <command>: <what> ...<what to do>`, and exit code 2."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


NEXT_WORD_TASK = "qatext_next_word"  # the local zero-shot task: the next word of held-out text among 4


def _device(name: str | None) -> torch.device:
    """--device as a torch device qatext runs on and this machine has (default: cuda when available), or
    one line saying what to give instead."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: qatext runs on cpu or cuda; give cpu, cuda or cuda:N")
    gpus = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.is_available() else 0
    if device.type == "cuda" and gpus == 0:
        raise ValueError(f"--device {name}: no CUDA GPU is visible here; give --device cpu (or leave it out)")
    if device.type == "cuda" and device.index is not None and device.index >= gpus:
        raise ValueError(f"--device {name}: this machine has {gpus} CUDA GPU{'s' if gpus > 1 else ''} "
                         f"(cuda:0{f'..cuda:{gpus - 1}' if gpus > 1 else ''})")
    return device


def _model_dir(path: str) -> Path:
    """--model as a Hugging Face model directory, or one line saying what it is instead."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"--model {path} is not a directory; give a Hugging Face model directory")
    if not (p / "config.json").is_file():
        if (p / "model" / "config.json").is_file():
            raise ValueError(f"--model {path} is a qatext run directory; its trained model is {p / 'model'}")
        raise ValueError(f"--model {path} is not a Hugging Face model directory (no config.json in it)")
    return p


def _load_model(path: str, device, decode_layout: bool | None = None):
    from transformers import AutoModelForCausalLM

    from .io import load_quantized

    quantized = _quantized_by(path)  # (which checks the directory first)
    p = Path(path)
    if quantized == "qatext":
        return load_quantized(p, device=device, decode_layout=decode_layout)
    if quantized == "hqq":
        raise ValueError(f"--model {path} is an HQQ export, which the hqq library loads "
                         "(AutoHQQHFModel.from_quantized); give the qatext model it was exported from")
    return AutoModelForCausalLM.from_pretrained(p, local_files_only=True).to(device)


def _quantized_by(path: str) -> str | None:
    """Who quantized the model at --model: 'qatext', another tool's quant_method (its config.json's
    quantization_config, e.g. a GPTQ export), or None (full precision)."""
    from .export.hqq import WEIGHTS_NAME as HQQ_WEIGHTS
    from .io import CONFIG_NAME

    p = _model_dir(path)
    if (p / CONFIG_NAME).exists():
        return "qatext"
    if (p / HQQ_WEIGHTS).exists():  # hqq writes no quantization_config
        return "hqq"
    try:
        config = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--model {path}: its config.json is not valid JSON ({e})") from None
    return config.get("quantization_config", {}).get("quant_method")


def _refuse_quantized_input(path: str) -> None:
    if quantized := _quantized_by(path):
        takes = "" if quantized == "hqq" else " (qatext eval and generate take this one)"
        raise ValueError(f"--model {path} is already quantized ({'by qatext' if quantized == 'qatext' else quantized}); "
                         f"train from the full-precision model it came from{takes}")


def _refuse_non_qatext_export_input(path: str) -> None:
    """export reads qatext's own models; anything else is named before it is loaded."""
    quantized = _quantized_by(path)
    if quantized == "qatext":
        return
    what = (f"is already quantized ({quantized}), not a qatext model" if quantized
            else "has no quantized layers (a full-precision model)")
    raise ValueError(f"--model {path} {what}; export the model `qatext train` wrote (OUTPUT/model)"
                     + ("" if quantized else ", or quantize this one first (qatext train --method rtn)"))


def _tokenizer(model_dir: str, byte_tokens: bool, model):
    """(encode: str -> LongTensor, description) for the model's own tokenizer, or bytes on request."""
    from . import data
    from .io import has_tokenizer

    vocab = model.get_input_embeddings().num_embeddings
    if byte_tokens:
        if vocab < 256:
            raise ValueError(f"--byte-tokens needs an embedding of at least 256 tokens; the model has {vocab}")
        return data.ByteTokenizer().encode, {"tokenizer": "bytes (UTF-8, --byte-tokens)", "kind": "bytes",
                                             "vocab_size": 256}
    if not has_tokenizer(model_dir):
        raise ValueError(f"--model {model_dir} has no tokenizer files (tokenizer.json, tokenizer.model, ...); add "
                         "the model's tokenizer there, or pass --byte-tokens to use UTF-8 bytes as tokens")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if len(tok) > vocab:
        raise ValueError(f"the tokenizer in {model_dir} has {len(tok)} tokens but the model embeds only {vocab}")

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    kind = f"{type(tok).__name__}, {len(tok)} tokens"  # not the path: a moved model is the same run
    return encode, {"tokenizer": f"{type(tok).__name__} ({model_dir})", "kind": kind, "vocab_size": len(tok)}


DEFAULT_SEQ_LEN = 2048  # --seq-len when not given: this, or the model's positions where it has fewer


def _resolve_seq_len(model, seq_len: int | None) -> int:
    """--seq-len as given (refused past the model's positions), or by default DEFAULT_SEQ_LEN capped at them."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, positions) if positions else DEFAULT_SEQ_LEN
    if positions is not None and seq_len > positions:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's {positions} positions (max_position_embeddings); "
                         f"use --seq-len {positions} or less")
    return seq_len


def _check_group_size(model, spec) -> None:
    """--group-size must divide the in_features of every linear layer the methods quantize (the decoder's),
    checked before anything is written: a run that cannot start leaves no record to --restart over."""
    from .models import decoder_layers
    from .nn.experts import is_stacked_experts

    widths = {}
    for name, m in decoder_layers(model).named_modules():
        if isinstance(m, torch.nn.Linear):
            widths[name] = m.in_features
        elif is_stacked_experts(m):  # as quantize_model will take them apart: expert 0 names them all
            widths[f"{name}.0.gate_proj"], widths[f"{name}.0.down_proj"] = m.down_proj.shape[1:]
    if spec.group_size == -1 or not widths:
        return
    bad = next((name for name, k in widths.items() if k % spec.group_size), None)
    if bad is not None:
        fits = math.gcd(spec.group_size, *widths.values())
        raise ValueError(f"--group-size {spec.group_size} must divide in_features of every decoder linear layer, "
                         f"but layer {bad} has {widths[bad]}; use --group-size {fits} (or a divisor of it), or -1 "
                         "for per-channel scales")


def _positive(**values) -> None:
    for name, (value, low) in values.items():
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


# The train options only some methods take: for each, the methods and the recipe keyword it becomes.
METHOD_OPTIONS = {
    "lr": {"full_qat": "lr", "lrqat": "lr", "qalora": "lr", "efficientqat": "e2e_lr"},
    "rank": {"lrqat": "rank", "qalora": "rank"},
    "calib_samples": {"efficientqat": "n_samples"},
    "lrqat_storage": {"lrqat": "storage"},
}


def _method_kwargs(args) -> dict:
    """The recipe keywords of the options given; an option the method ignores is a warning."""
    kwargs = {}
    for option, keywords in METHOD_OPTIONS.items():
        value = getattr(args, option)
        if value is None:
            continue
        if args.method not in keywords:
            print(f"qatext train: warning: --{option.replace('_', '-')} is ignored by --method {args.method}",
                  file=sys.stderr)
            continue
        kwargs[keywords[args.method]] = value
    if args.method == "efficientqat":  # Block-AP's calibration: its own keywords
        kwargs["block_ap_kwargs"] = {"n_samples": kwargs.pop("n_samples", 128), "batch_size": min(args.batch_size, 2)}
    return kwargs


def cmd_train(args) -> int:
    from . import data, distributed, methods, runs
    from .io import has_tokenizer, save_quantized
    from .models import check_no_fused_experts, merge_model
    from .quant import QuantSpec

    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    _positive(steps=(args.steps, 1), batch_size=(args.batch_size, 1), seq_len=(args.seq_len, 1),
              rank=(args.rank, 1), calib_samples=(args.calib_samples, 1), checkpoint_every=(args.checkpoint_every, 0))
    kwargs = _method_kwargs(args)
    QuantSpec.check(args.bits, args.group_size, "--bits", "--group-size")
    spec = QuantSpec(args.bits, args.group_size, args.symmetric)
    text = _read_text(args)
    _refuse_quantized_input(args.model)
    out = Path(args.output_dir)
    runs.check_run_dir(out)

    distributed.init_from_env()  # under torchrun: join the group, one GPU per rank
    device = _device(args.device)
    model = _load_model(args.model, device, decode_layout=False)
    args.seq_len = _resolve_seq_len(model, args.seq_len)
    _check_group_size(model, spec)
    check_no_fused_experts(model)
    encode, tok_info = _tokenizer(args.model, args.byte_tokens, model)
    tokens = encode(text)
    train_tokens, _ = data.train_val_split(tokens, args.val_fraction)
    if not data.fits_a_window(train_tokens, args.seq_len):  # before anything is written
        raise ValueError(f"the training part of --data ({len(train_tokens)} tokens, all but --val-fraction "
                         f"{args.val_fraction}) is shorter than one window of --seq-len {args.seq_len}; give more "
                         "text or a shorter --seq-len")
    identity = {"method": args.method, "spec": spec.to_dict(), "lr": args.lr, "rank": args.rank,
                "calib_samples": args.calib_samples, "steps": args.steps, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "seed": args.seed, "val_fraction": args.val_fraction,
                "model": runs.model_fingerprint(args.model), "tokenizer": tok_info["kind"],
                "data": {"source": args.data, "tokens": len(tokens), "sha256": runs.tokens_sha256(tokens)},
                **({"lrqat_storage": args.lrqat_storage} if args.lrqat_storage else {}),  # older runs lack it
                "world_size": distributed.world_size(),
                "distributed": args.distributed if distributed.world_size() > 1 else None}
    resumed = runs.check_resume(out, identity, args.restart)  # every rank, before anything is written
    distributed.barrier()
    if distributed.is_main():
        runs.record_run(out, identity, args.restart)
        params = sum(p.numel() for p in model.parameters())
        print(f"qatext train: {args.method} W{spec.bits} group_size {spec.group_size} "
              f"{'symmetric' if spec.symmetric else 'asymmetric'} on {args.model} ({type(model).__name__}, "
              f"{params / 1e6:.1f}M parameters), {tok_info['tokenizer']}, {len(train_tokens)} training tokens in "
              f"sequences of {args.seq_len}, "
              f"{device}; {'resuming from ' + str(out / 'checkpoints') if resumed else 'fresh run'}", flush=True)
    distributed.barrier()

    cfg = methods.default_config(args.method, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                 seed=args.seed, checkpoint_dir=str(out / "checkpoints"),
                                 checkpoint_every=args.checkpoint_every, distributed=args.distributed,
                                 activation_checkpointing=args.activation_checkpointing, compile=args.compile)
    model, history = methods.run(args.method, model, spec, train_tokens, cfg, **kwargs)
    merge_model(model)
    if distributed.is_main():  # every rank holds the full merged model; one writes it
        # The run owns OUTPUT/model: its earlier files are replaced, anything else there is kept.
        save_quantized(model, out / "model", tokenizer=args.model if has_tokenizer(args.model) else None,
                       overwrite=True)
        log = {**identity, "loss": history}
        runs.atomic_write_text(out / runs.LOG_NAME, json.dumps(log))
        print(f"saved {out / 'model'}")
    distributed.barrier()
    return 0


def _read_text(args) -> str:
    """--data's text, with --val-fraction checked: both before the model loads (a typo found only after
    a 7B model has loaded costs the user a minute)."""
    from . import data

    data.check_val_fraction(args.val_fraction, "--val-fraction")
    try:
        return data.load_text(args.data)
    except ValueError as e:
        raise ValueError(f"--data {e}") from None


def _held_out(args, model, text: str):
    """The held-out part of `text` (--data) as tokens (and the tokenizer's description), at least one
    window of --seq-len long."""
    from . import data

    encode, tok_info = _tokenizer(args.model, args.byte_tokens, model)
    _, val = data.train_val_split(encode(text), args.val_fraction)
    if len(val) <= args.seq_len:
        raise ValueError(f"the held-out part of --data ({len(val)} tokens, --val-fraction {args.val_fraction}) is "
                         f"shorter than one window of --seq-len {args.seq_len}; give more text or a shorter --seq-len")
    return val, tok_info


def cmd_eval(args) -> int:
    from . import evaluate

    _positive(seq_len=(args.seq_len, 1), batch_size=(args.batch_size, 1), max_windows=(args.max_windows, 1),
              limit=(args.limit, 1))
    if args.tasks is not None:
        return _eval_tasks(args)
    text = _read_text(args)
    device = _device(args.device)
    model = _load_model(args.model, device, decode_layout=False)
    args.seq_len = _resolve_seq_len(model, args.seq_len)
    val, tok_info = _held_out(args, model, text)
    result = evaluate.perplexity(model, val, seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_windows=args.max_windows)
    print(json.dumps({"model": args.model, "data": args.data, "seq_len": args.seq_len,
                      "tokenizer": tok_info["tokenizer"], "vocab_size": tok_info["vocab_size"], **result}, indent=1))
    return 0


def _eval_tasks(args) -> int:
    """lm-eval zero-shot tasks; NEXT_WORD_TASK is built from the held-out part of --data."""
    import tempfile

    from . import data, zero_shot
    from .io import has_tokenizer

    zero_shot.require_lm_eval()  # one line now if lm-eval is missing, before the model loads
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: give lm-eval task names separated by commas, e.g. --tasks "
                         f"{NEXT_WORD_TASK},arc_easy")
    if args.tasks_dir is not None and not Path(args.tasks_dir).is_dir():
        raise ValueError(f"--tasks-dir {args.tasks_dir} is not a directory of lm-eval task YAML files")
    text = _read_text(args) if NEXT_WORD_TASK in tasks else None
    _model_dir(args.model)
    if not has_tokenizer(args.model):
        raise ValueError(f"--tasks needs the model's tokenizer files in --model {args.model} (lm-eval scores text); "
                         "add them there")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = _load_model(args.model, _device(args.device), decode_layout=False)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [args.tasks_dir] if args.tasks_dir else []
        if NEXT_WORD_TASK in tasks:
            _, held_out = data.train_val_split(text, args.val_fraction)
            dirs.append(zero_shot.write_next_word_task(held_out, tmp, name=NEXT_WORD_TASK, n=args.limit or 500))
        results = zero_shot.run_tasks(model, tokenizer, tasks, tasks_dir=dirs or None, batch_size=args.batch_size,
                                      limit=args.limit)
    print(json.dumps({"model": args.model, "tasks": results}, indent=1))
    return 0


def cmd_export(args) -> int:
    from . import evaluate
    from .export import export_model, round_zeros
    from .io import has_tokenizer
    from .outdir import check_not_source, check_target

    # Flags and the target before any work.
    _positive(seq_len=(args.seq_len, 1), max_windows=(args.max_windows, 1))
    if args.round_zeros and args.format != "gptq":
        raise ValueError("--round-zeros changes the model and only serves --format gptq; "
                         "the default picks a format that keeps it exact")
    text = _read_text(args) if args.round_zeros else None
    check_not_source(args.output, args.model, "--output")
    check_target(args.output, args.overwrite)
    _refuse_non_qatext_export_input(args.model)
    model = _load_model(args.model, torch.device("cpu"))
    if args.round_zeros:
        args.seq_len = _resolve_seq_len(model, args.seq_len)
        val, _ = _held_out(args, model, text)

        def ppl():
            return evaluate.perplexity(model, val, seq_len=args.seq_len, max_windows=args.max_windows,
                                       progress=False)["ppl"]

        before = ppl()
        moved = round_zeros(model)
        after = ppl()
        print(f"rounded {moved} fractional zero points: held-out perplexity {before:.4f} -> {after:.4f} "
              f"({100 * (after / before - 1):+.2f}%, {args.seq_len}-token windows of {args.data})")
    result = export_model(model, args.output, format=args.format, checkpoint_format=args.checkpoint_format,
                          tokenizer=args.model if has_tokenizer(args.model) else None, overwrite=args.overwrite)
    config = result["quantization_config"]
    detail = f", checkpoint_format {config['checkpoint_format']}" if "checkpoint_format" in config else ""
    print(f"wrote {result['path']}: {result['format']} (W{config['bits']} group_size {config['group_size']}{detail}); "
          f"{result['reason']}")
    return 0


def cmd_generate(args) -> int:
    """Continue a prompt with the model, printing the new text as it is generated."""
    from transformers import AutoTokenizer, TextStreamer

    from .io import has_tokenizer

    _positive(max_new_tokens=(args.max_new_tokens, 1), temperature=(args.temperature, 0))
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        raise ValueError("--prompt is empty; give the text the model should continue")
    if not has_tokenizer(args.model):
        _model_dir(args.model)
        raise ValueError(f"--model {args.model} has no tokenizer files (tokenizer.json, tokenizer.model, ...); "
                         "generation needs the model's tokenizer")
    device = _device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if args.chat and not tok.chat_template:
        raise ValueError(f"--chat: the tokenizer in --model {args.model} has no chat template (chat_template.jinja or "
                         "tokenizer_config.json's chat_template); leave out --chat to continue the prompt as text")
    model = _load_model(args.model, device)
    if args.chat:  # the prompt as one user turn, in the model's own template, ending where the reply starts
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")["input_ids"].to(device)
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids.to(device)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and ids.shape[1] + args.max_new_tokens > positions:
        raise ValueError(f"the prompt ({ids.shape[1]} tokens) and --max-new-tokens {args.max_new_tokens} exceed the "
                         f"model's {positions} positions; shorten either")
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else \
        {"do_sample": False}
    if args.seed is not None:
        torch.manual_seed(args.seed)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                       streamer=TextStreamer(tok, skip_special_tokens=True),
                       pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, **sampling)
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(args.out, device=_device(args.device), cfg=DemoConfig.quick() if args.quick else None,
             cache_dir=args.cache_dir)
    return 0


def _text_options(p: argparse.ArgumentParser, held_out: str) -> None:
    """--data, --byte-tokens and --val-fraction: the text a command reads and how it is tokenized."""
    p.add_argument("--data", default="kjv",
                   help="'kjv' (bundled corpus), a UTF-8 text file, or a .jsonl or .parquet file (its records' \"text\")")
    p.add_argument("--byte-tokens", action="store_true",
                   help="use UTF-8 bytes as tokens (vocab 256) where the model directory has no tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.05, help=f"tail of --data {held_out}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except None: there the help says what leaving it out does
    (or the option is required), and "(default: None)" would only repeat or contradict it."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="qatext", description="Quantization-aware training for LLMs",
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", formatter_class=fmt,
                       help="quantize and train a model with one method, save the merged integer model")
    t.add_argument("--method", required=True, choices=METHODS, help="training method")
    t.add_argument("--model", required=True, help="full-precision Hugging Face model directory (local)")
    _text_options(t, "held out (never trained on)")
    t.add_argument("--bits", type=int, default=4, help="weight bits, 2..8")
    t.add_argument("--group-size", type=int, default=128, help="weights per scale along in_features; -1: per channel")
    t.add_argument("--symmetric", action="store_true", help="fixed zero point 2^(bits-1)")
    t.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    t.add_argument("--lr", type=float, default=None, help="main learning rate (default: the method's paper value)")
    t.add_argument("--rank", type=int, default=None, help="adapter rank for lrqat / qalora (default: the paper's)")
    t.add_argument("--lrqat-storage", choices=("int", "fixed"), default=None,
                   help="LR-QAT's frozen P: int, packed b-bit codes (the least memory; the default), or fixed, "
                        "uint8 fixed point with 8 - b fractional bits (the paper's Q4.4; recovers far more at 2 and "
                        "3 bits, see README Accuracy)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step (global under torchrun)")
    t.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per training sequence (default: {DEFAULT_SEQ_LEN}, or the model's positions if fewer)")
    t.add_argument("--calib-samples", type=int, default=None, help="EfficientQAT Block-AP calibration windows "
                   "(default 128)")
    t.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: only at the end)")
    t.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    t.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp"),
                   help="under torchrun: DDP or FSDP2 (sharded parameters and checkpoints)")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="decoder layers keep only their input and recompute the rest in backward (less memory)")
    t.add_argument("--compile", action="store_true",
                   help="decoder layers run as torch.compile'd graphs: faster when the GPU waits on Python (small "
                   "batches); the first steps compile")
    t.add_argument("--restart", action="store_true",
                   help="start over: delete OUTPUT's checkpoints instead of resuming them")
    t.add_argument("--output-dir", required=True,
                   help="run directory: checkpoints/ (a rerun with the same settings resumes), model/, train_log.json")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", formatter_class=fmt, help="perplexity on held-out text (non-overlapping windows)")
    e.add_argument("--model", required=True, help="a model directory (Hugging Face, or OUTPUT/model of qatext train)")
    _text_options(e, "evaluated")
    e.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per window (default: {DEFAULT_SEQ_LEN}, or the model's positions if fewer)")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows (default: all)")
    e.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    e.add_argument("--tasks", default=None,
                   help="instead of perplexity, lm-eval zero-shot tasks, comma-separated (needs pip install "
                        f"'qatext[eval]'); {NEXT_WORD_TASK} is built from the held-out part of --data, offline")
    e.add_argument("--tasks-dir", default=None, help="a directory of your own lm-eval task YAML files")
    e.add_argument("--limit", type=int, default=None,
                   help="--tasks: at most this many examples per task (default: every example)")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", formatter_class=fmt,
                       help="export a saved quantized model to a format other tools load (GPTQ, HQQ)")
    x.add_argument("--model", required=True, help="a model directory written by `qatext train` (OUTPUT/model)")
    x.add_argument("--output", required=True, help="directory to write (new, empty, or an earlier export)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier export in --output (other files there are kept)")
    x.add_argument("--format", default="auto", choices=("auto", "gptq", "hqq"),
                   help="auto: GPTQ when every zero point is an integer, else HQQ (float zeros, exact)")
    x.add_argument("--checkpoint-format", default=None, choices=("gptq", "gptq_v2"),
                   help="GPTQ layout: gptq (v1, stores zero - 1; the default unless a zero is 0) or gptq_v2")
    x.add_argument("--round-zeros", action="store_true",
                   help="with --format gptq: round fractional zero points (changes the model; the held-out "
                        "perplexity before and after is printed)")
    _text_options(x, "evaluated by --round-zeros")
    x.add_argument("--seq-len", type=int, default=None,
                   help=f"--round-zeros evaluation window (default: {DEFAULT_SEQ_LEN}, or the model's positions if "
                   "fewer)")
    x.add_argument("--max-windows", type=int, default=32, help="--round-zeros evaluation windows")
    x.set_defaults(fn=cmd_export)

    g = sub.add_parser("generate", formatter_class=fmt, help="continue a prompt with a model, streaming the text")
    g.add_argument("--model", required=True, help="a model directory with its tokenizer (OUTPUT/model, an HF model)")
    g.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    g.add_argument("--chat", action="store_true",
                   help="send --prompt as a user message through the tokenizer's chat template (instruct models)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling at this temperature")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (default: unseeded)")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", formatter_class=fmt,
                       help="FP vs RTN vs LR-QAT vs QA-LoRA vs EfficientQAT on a small Llama")
    d.add_argument("--out", default="demo_out",
                   help="directory for results.{json,md,png}: new, empty, or an earlier demo's (its results replaced)")
    d.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    d.add_argument("--cache-dir", default=None, help="where the pretrained demo model is cached "
                   "(default ~/.cache/qatext)")
    d.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    d.set_defaults(fn=cmd_demo)
    return parser


# What to change when a command runs out of GPU memory (a run resumes only with the same settings).
OUT_OF_MEMORY_HINTS = {
    "train": "add --activation-checkpointing (the run resumes with it), or lower --batch-size or --seq-len "
             "with --restart",
    "eval": "lower --batch-size (windows a forward) or --seq-len",
    "generate": "give a shorter --prompt or fewer --max-new-tokens, or --device cpu",
    "demo": "give --device cpu",
}


def main(argv=None) -> int:
    import logging

    from .train import LossNotFinite

    # torchao (imported by transformers where installed) registers enums that torch >= 2.14 logs a
    # deprecation line for, at every start; it is not the user's concern.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    prefix = f"qatext {args.command}:"
    try:
        return args.fn(args)
    except (ValueError, LossNotFinite, ImportError) as e:  # ImportError: a loader's missing package, named by it
        # One line: a library's message may go on with paragraphs of advice (transformers' unknown model type).
        message = str(e).strip()
        print(f"{prefix} {message.splitlines()[0] if message else type(e).__name__}", file=sys.stderr)
    except OSError as e:
        where = f" {e.filename}:" if e.filename else ""
        print(f"{prefix}{where} {e.strerror or e}", file=sys.stderr)
    except torch.cuda.OutOfMemoryError as e:
        what = ". ".join(str(e).split(". ")[:2]).splitlines()[0]  # "CUDA out of memory. Tried to allocate 2 GiB"
        hint = OUT_OF_MEMORY_HINTS.get(args.command, "free the GPU's memory")
        print(f"{prefix} the GPU ran out of memory ({what}); {hint}", file=sys.stderr)
    except KeyboardInterrupt:
        hint = ""
        if args.command == "train":
            hint = (f"; checkpoints (every --checkpoint-every steps) are in {Path(args.output_dir) / 'checkpoints'}, "
                    "and rerunning the same command resumes")
        print(f"\n{prefix} interrupted{hint}", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
