"""benchmarks/accuracy.py's report, rebuilt from the committed H200 results: the table NOTES quotes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def test_report_from_committed_results(tmp_path):
    for step in ("grid", "sweep", "probes"):
        shutil.copy(ROOT / "benchmarks" / "results" / f"accuracy_h200_{step}.json", tmp_path / f"{step}.json")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "report", "--work", str(tmp_path),
                        "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "accuracy.md").read_text()
    assert "control, its best lr 3e-05) 9.532 ± 0.016 (n = 3)" in table  # a control cell in grid and probes counts once
    assert "| W2 g64 | 23.133 | 11.472 ± 0.054 (86%) | 11.714 ± 0.032 (84%) | 13.765 ± 0.069 (69%) | 11.752 ± 0.036 (84%) |" in table
    assert "| W3 g128 | 10.898 | 10.119 ± 0.043 (57%) | 10.110 ± 0.016 (58%) | 10.455 ± 0.009 (32%) | 9.986 ± 0.013 (67%) |" in table
    assert "lrqat: lr 0.01; qalora: lr 0.02; efficientqat: lr 0.0005." in table  # each method's settings, from its cells
    assert "| W2 g64 | 72.7 | 79.3 ± 0.7 | 79.5 ± 0.8 | 77.5 ± 0.7 | 79.1 ± 0.9 |" in table  # next-word accuracy
    assert "1e-02: 10.279" in table  # the sweep
    assert "| lrqat | W2 g64 | lr 0.01, 900 steps, storage int | 3 | 12.051 ± 0.052 | 81% |" in table  # a probe, 3 seeds
    assert "| efficientqat | W3 g128 | lr 0.0005, 300 steps, n_samples 1024, batch_size 8, epochs 2, weight_lr 0.0001 | 1 | 9.981 | 67% |" in table
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000


def test_grid_takes_each_methods_best_lr_at_its_own_settings(tmp_path):
    """The grid's learning rates come from sweep and probe cells that ran as the grid runs (LR-QAT's
    fixed-point P, the larger Block-AP), never from cells at other settings; without any, it stops."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import accuracy
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit, match="run the sweep step"):
        accuracy.best_lrs(tmp_path, accuracy.Setup())
    for step in ("sweep", "probes"):
        shutil.copy(ROOT / "benchmarks" / "results" / f"accuracy_h200_{step}.json", tmp_path / f"{step}.json")
    lrs = accuracy.best_lrs(tmp_path, accuracy.Setup())
    # lrqat: the fixed-point probes (1e-2 best of 3e-3, 1e-2, 3e-2), not the integer-P sweep;
    # efficientqat: the one Block-AP-1024 cell at the grid's weight lr (5e-4).
    assert lrs == {"full_qat": 2e-4, "lrqat": 1e-2, "qalora": 2e-2, "efficientqat": 5e-4}
    # A cell of another config at the grid's settings does not compete, however low its perplexity.
    probes = json.loads((tmp_path / "probes.json").read_text())
    probes["cells"].append({"method": "qalora", "config": "W4 g128", "seed": 0, "lr": 5e-2, "ppl": 1.0})
    (tmp_path / "probes.json").write_text(json.dumps(probes))
    assert accuracy.best_lrs(tmp_path, accuracy.Setup())["qalora"] == 2e-2
    shutil.copy(ROOT / "benchmarks" / "results" / "accuracy_h200_sweep.json", tmp_path / "probes.json")
    with pytest.raises(SystemExit, match="lrqat, efficientqat"):
        accuracy.best_lrs(tmp_path, accuracy.Setup())  # the sweep alone ran them at other settings
