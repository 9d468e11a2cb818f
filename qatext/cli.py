"""qatext command line: train | eval | export | demo (also `python -m qatext`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(path: str, device):
    from transformers import AutoModelForCausalLM

    from .io import CONFIG_NAME, load_quantized

    p = Path(path)
    if not p.is_dir():
        raise SystemExit(f"qatext: --model {path!r} is not a directory holding a Hugging Face model")
    if (p / CONFIG_NAME).exists():
        return load_quantized(p, device=device)
    return AutoModelForCausalLM.from_pretrained(p, local_files_only=True).to(device)


def _tokens(model_dir: str, source: str) -> torch.Tensor:
    from . import data
    from .io import has_tokenizer

    text = data.load_text(source)
    if has_tokenizer(model_dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return data.ByteTokenizer().encode(text)


def cmd_train(args) -> int:
    from . import data, distributed, methods
    from .io import has_tokenizer, save_quantized
    from .models import merge_model
    from .quant import QuantSpec

    distributed.init_from_env()  # under torchrun: join the group, one GPU per rank
    device = _device(args.device)
    spec = QuantSpec(args.bits, args.group_size, args.symmetric)
    model = _load_model(args.model, device)
    tokens = _tokens(args.model, args.data)
    train_tokens, _ = data.train_val_split(tokens, args.val_fraction)
    out = Path(args.output_dir)
    cfg = methods.default_config(args.method, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                 seed=args.seed, checkpoint_dir=str(out / "checkpoints"),
                                 checkpoint_every=args.checkpoint_every, distributed=args.distributed,
                                 activation_checkpointing=args.activation_checkpointing)
    kwargs = {}
    if args.lr is not None:
        kwargs["e2e_lr" if args.method == "efficientqat" else "lr"] = args.lr
    if args.rank is not None:
        kwargs["rank"] = args.rank
    if args.method == "efficientqat":
        kwargs["block_ap_kwargs"] = {"n_samples": args.calib_samples, "batch_size": min(args.batch_size, 2)}
    model, history = methods.run(args.method, model, spec, train_tokens, cfg, **kwargs)
    merge_model(model)
    if distributed.is_main():  # every rank holds the full merged model; one writes it
        save_quantized(model, out / "model", tokenizer=args.model if has_tokenizer(args.model) else None)
        (out / "train_log.json").write_text(json.dumps({"method": args.method, "spec": spec.to_dict(),
                                                        "loss": history, "world_size": distributed.world_size()}))
        print(f"saved {out / 'model'}")
    distributed.barrier()
    return 0


def cmd_eval(args) -> int:
    from . import data, evaluate

    device = _device(args.device)
    model = _load_model(args.model, device)
    _, val = data.train_val_split(_tokens(args.model, args.data), args.val_fraction)
    result = evaluate.perplexity(model, val, seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_windows=args.max_windows)
    print(json.dumps(result, indent=1))
    return 0


def cmd_export(args) -> int:
    from . import data, evaluate
    from .export import export_model, round_zeros
    from .io import has_tokenizer

    model = _load_model(args.model, torch.device("cpu"))
    if args.round_zeros:
        if args.format != "gptq":
            raise ValueError("--round-zeros changes the model and only serves --format gptq; "
                             "the default picks a format that keeps it exact")
        _, val = data.train_val_split(_tokens(args.model, args.data), args.val_fraction)
        seq_len = min(args.seq_len, getattr(model.config, "max_position_embeddings", args.seq_len))

        def ppl():
            return evaluate.perplexity(model, val, seq_len=seq_len, max_windows=args.max_windows,
                                       progress=False)["ppl"]

        before = ppl()
        moved = round_zeros(model)
        after = ppl()
        print(f"rounded {moved} fractional zero points: held-out perplexity {before:.4f} -> {after:.4f} "
              f"({100 * (after / before - 1):+.2f}%, {seq_len}-token windows of {args.data})")
    result = export_model(model, args.output, format=args.format, checkpoint_format=args.checkpoint_format,
                          tokenizer=args.model if has_tokenizer(args.model) else None)
    config = result["quantization_config"]
    detail = f", checkpoint_format {config['checkpoint_format']}" if "checkpoint_format" in config else ""
    print(f"wrote {result['path']}: {result['format']} (W{config['bits']} group_size {config['group_size']}{detail}); "
          f"{result['reason']}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(args.out, device=args.device, cfg=DemoConfig.quick() if args.quick else None, cache_dir=args.cache_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    parser = argparse.ArgumentParser(prog="qatext", description="Quantization-aware training for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="quantize and train a model with one method, save the merged integer model")
    t.add_argument("--method", required=True, choices=METHODS)
    t.add_argument("--model", required=True, help="Hugging Face model directory (local)")
    t.add_argument("--data", default="kjv", help="'kjv' (bundled corpus) or a UTF-8 text file")
    t.add_argument("--bits", type=int, default=4)
    t.add_argument("--group-size", type=int, default=128)
    t.add_argument("--symmetric", action="store_true")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=None, help="main learning rate (default: the paper's)")
    t.add_argument("--rank", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=2048)
    t.add_argument("--calib-samples", type=int, default=128, help="EfficientQAT Block-AP calibration windows")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--val-fraction", type=float, default=0.05)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    t.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp"),
                   help="under torchrun: DDP or FSDP2 (sharded parameters and checkpoints); --batch-size is global")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="decoder layers keep only their input and recompute the rest in backward (less memory)")
    t.add_argument("--output-dir", required=True, help="checkpoints/ (resumed on rerun), model/, train_log.json")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="perplexity on held-out text (non-overlapping windows)")
    e.add_argument("--model", required=True)
    e.add_argument("--data", default="kjv")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--val-fraction", type=float, default=0.05)
    e.add_argument("--device", default=None)
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="export a saved quantized model to a format other tools load (GPTQ, HQQ)")
    x.add_argument("--model", required=True, help="a model directory written by `qatext train` (OUTPUT/model)")
    x.add_argument("--output", required=True, help="directory to write")
    x.add_argument("--format", default="auto", choices=("auto", "gptq", "hqq"),
                   help="auto (default): GPTQ when every zero point is an integer, else HQQ (float zeros, exact)")
    x.add_argument("--checkpoint-format", default=None, choices=("gptq", "gptq_v2"),
                   help="GPTQ layout: gptq (v1, stores zero - 1; the default unless a zero is 0) or gptq_v2")
    x.add_argument("--round-zeros", action="store_true",
                   help="with --format gptq: round fractional zero points (changes the model; the held-out "
                        "perplexity before and after is printed)")
    x.add_argument("--data", default="kjv", help="held-out text for --round-zeros: 'kjv' or a UTF-8 text file")
    x.add_argument("--seq-len", type=int, default=2048, help="--round-zeros evaluation window (capped at the model's)")
    x.add_argument("--max-windows", type=int, default=32, help="--round-zeros evaluation windows")
    x.add_argument("--val-fraction", type=float, default=0.05)
    x.set_defaults(fn=cmd_export)

    d = sub.add_parser("demo", help="FP vs RTN vs LR-QAT vs QA-LoRA vs EfficientQAT on a small Llama")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--device", default=None)
    d.add_argument("--cache-dir", default=None)
    d.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    d.set_defaults(fn=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"qatext {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
