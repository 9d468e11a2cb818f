"""benchmarks/moe_host_calls.py: a grouped block's host calls stay about one a trained tensor (the gradient's
AccumulateGrad) plus a fixed number, whatever the expert count; the loop's grow with the experts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("transformers")


def _rows(*args):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_host_calls.py"), "--hidden", "64",
                           "--inter", "32", "--tokens", "24", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {row["mode"]: row for row in json.loads(proc.stdout.strip().splitlines()[-1])["rows"]}


def test_a_grouped_blocks_host_calls_are_one_a_trained_tensor_and_a_fixed_number():
    few, many = _rows("--experts", "4"), _rows("--experts", "16")
    for mode, row in many.items():
        fixed = row["top_level_calls"] - row["trained_tensors"]
        # (before the stacks' gradients went back in one op: 3 calls a trained tensor, e.g. LR-QAT 3572 at 128 experts)
        assert fixed == few[mode]["top_level_calls"] - few[mode]["trained_tensors"], (mode, row, few[mode])
        assert fixed < 200, (mode, row)
    loop = _rows("--experts", "16", "--loop")
    assert all(loop[m]["top_level_calls"] > many[m]["top_level_calls"] for m in many)
