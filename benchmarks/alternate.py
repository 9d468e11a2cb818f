"""Two benchmark commands run alternately, A B A B ..., each in a process of its own, and the ratio B / A of
one number from their results: for differences that one process of each cannot resolve. An eager 7B step
moves ±25% from one process to the next (it is host-bound), and a second compile in one process is not a
fair generate row (benchmarks/NOTES.md). Each command is a script of benchmarks/ (or a path) with its
arguments; it runs with this Python and `--out FILE` appended, and --metric picks the number from FILE.

    python benchmarks/alternate.py --pairs 3 --metric tokens_per_s \\
        --a "bench_step.py --method peft_lora" --b "bench_step.py --method lrqat" --out step_pairs.json
    python benchmarks/alternate.py --pairs 3 --metric "rows[variant=qatext W4 g128].decode_tokens_per_s" \\
        --a "bench_generate.py --batches 1 --variants 'qatext W4 g128' --tuning decode_swiglu=0" \\
        --b "bench_generate.py --batches 1 --variants 'qatext W4 g128'" --out swiglu_pairs.json

--metric is a path of keys separated by dots; `name[field=value,...]` takes the first element of the list
`name` whose fields print as the values given.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_STEP = re.compile(r"^([^\[\]]+)(?:\[([^\]]*)\])?$")


def pick(result, metric: str) -> float:
    """The number at `metric` in a result; ValueError naming the step that found nothing."""
    value = result
    for step in metric.split("."):
        match = _STEP.match(step)
        if match is None:
            raise ValueError(f"'{step}' is not a key or a key[field=value,...]")
        key, where = match.groups()
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"no key '{key}' (keys there: {sorted(value) if isinstance(value, dict) else '-'})")
        value = value[key]
        if where is not None:
            wanted = dict(pair.split("=", 1) for pair in where.split(",") if "=" in pair)
            rows = [row for row in value if isinstance(row, dict)] if isinstance(value, list) else []
            found = [row for row in rows if all(str(row.get(f)) == v for f, v in wanted.items())]
            if not found:
                raise ValueError(f"no element of '{key}' with {where}")
            value = found[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{metric}' is {value!r}, not a number")
    return float(value)


def command(text: str) -> list[str]:
    """The argv that runs a benchmark command: this Python, the script (from benchmarks/ unless a path
    that exists is given), its arguments."""
    words = shlex.split(text)
    if not words:
        raise ValueError("empty command")
    script = Path(words[0])
    if not script.exists():
        script = HERE / words[0]
    if not script.exists():
        raise ValueError(f"no script {words[0]} here or in {HERE}")
    return [sys.executable, str(script), *words[1:]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, help="the first command, e.g. \"bench_step.py --method peft_lora\"")
    p.add_argument("--b", required=True, help="the second command; the ratio is B / A")
    p.add_argument("--metric", required=True, help="the number to compare, e.g. tokens_per_s")
    p.add_argument("--pairs", type=int, default=3, help="A B pairs, run in turn (default 3)")
    p.add_argument("--out", default=None, help="write every run's result and the ratios here as JSON")
    args = p.parse_args()
    if args.pairs < 1:
        p.error(f"--pairs: expected a positive number of pairs, got {args.pairs}")
    argv = {}
    for side in ("a", "b"):
        try:
            argv[side] = command(getattr(args, side))
        except ValueError as e:
            p.error(f"--{side}: {e}")

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(1, args.pairs + 1):
            for side in ("a", "b"):
                out = Path(tmp) / f"{side}{pair}.json"
                print(f"pair {pair} {side.upper()}: {getattr(args, side)} ...", flush=True)
                done = subprocess.run([*argv[side], "--out", str(out)], capture_output=True, text=True)
                if done.returncode != 0 or not out.exists():
                    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
                    sys.exit(f"alternate.py: run {side}{pair} ({getattr(args, side)}) exited {done.returncode} "
                             f"without a result; its last line: {tail[0]}")
                result = json.loads(out.read_text())
                try:
                    value = pick(result, args.metric)
                except ValueError as e:
                    sys.exit(f"alternate.py: --metric {args.metric!r} in run {side}{pair}'s result: {e}")
                runs.append({"side": side, "pair": pair, "value": value, "result": result})
                print(f"pair {pair} {side.upper()}: {args.metric} = {value:.6g}", flush=True)

    a = [r["value"] for r in runs if r["side"] == "a"]
    b = [r["value"] for r in runs if r["side"] == "b"]
    if 0.0 in a:
        sys.exit(f"alternate.py: A's {args.metric} was 0 in a run, so B / A has no value; see each run above")
    ratios = [y / x for x, y in zip(a, b)]
    summary = {"a": args.a, "b": args.b, "metric": args.metric, "pairs": args.pairs,
               "ratios_b_over_a": ratios, "median_ratio": statistics.median(ratios),
               "pooled_ratio": sum(b) / sum(a), "runs": runs}
    print(f"B / A by pair: {', '.join(f'{r:.3f}' for r in ratios)}; median {summary['median_ratio']:.3f}, "
          f"pooled {summary['pooled_ratio']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
