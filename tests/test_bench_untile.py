"""benchmarks/bench_untile.py: on a GPU its rows (each untile and tiled GEMM checked against the packed
codes'); without one, a single line saying so (tests/test_bench_timing.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_untile.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows_on_a_gpu(tmp_path):
    out = tmp_path / "untile.json"
    result = _run("--nk", "256", "512", "--bits", "2", "4", "--tokens", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["N"], r["K"], r["bits"]) for r in rows] == [(256, 512, 2), (256, 512, 4)]
    assert all(r["untile_us"] > 0 and r["gemm_packed_us"] > 0 and r["gemm_tiled_us"] > 0 for r in rows)
