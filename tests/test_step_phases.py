"""benchmarks/step_phases.py's code path on a CPU (one 7B-shaped layer, a few tokens): every phase timed
and the phases adding up to the step; a wrong --steps is one line."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_phases.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--layers", "1", "--seq-len", "8", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT / "benchmarks")


def test_each_phase_is_timed_and_they_add_up(tmp_path):
    out = tmp_path / "phases.json"
    r = _run("--method", "full_qat", "--frozen-qparams", "--steps", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(out.read_text())
    phases = [row[f"{name}_host_ms"] for name in ("forward", "backward", "loss_item", "clip", "adamw")]
    assert all(t >= 0 for t in phases) and row["forward_host_ms"] > 0 and row["backward_host_ms"] > 0
    assert abs(sum(phases) + row["end_wait_ms"] - row["step_ms"]) < 1.0
    assert row["frozen_qparams"] is True and not any(k.endswith("_gpu_ms") for k in row)  # no GPU times on a CPU


def test_too_few_steps_is_one_line():
    r = _run("--method", "qalora", "--steps", "2")
    assert r.returncode == 2 and "--steps must be at least 3" in r.stderr
