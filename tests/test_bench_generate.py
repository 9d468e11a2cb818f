"""benchmarks/bench_generate.py's code paths on a CPU (tiny model, eager): every variant asked for is
measured or reported as skipped, bf16 is always the reference, and a wrong --variants is one line."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_generate.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--backend", "eager", *args],
                          capture_output=True, text=True, timeout=600)


def test_tiny_run_measures_each_variant_against_bf16(tmp_path):
    out = tmp_path / "generate.json"
    r = _run("--prompt", "8", "--new-tokens", "12", "--repeats", "3", "--batches", "1,2",
             "--variants", "qatext W4 g128,qatext W2 g64", "--profile", "1000", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["variant"], row["batch"]) for row in rows] == [
        ("bf16", 1), ("bf16", 2), ("qatext W4 g128", 1), ("qatext W4 g128", 2), ("qatext W2 g64", 1),
        ("qatext W2 g64", 2)]
    for row in rows:
        assert row["decode_tokens_per_s"] > 0 and row["time_to_first_token_s"] > 0
        assert row["first_token_same_as_eager"] == 1.0
        ops = {op["op"]: op for op in row["ops_per_generate"]}
        # Every op (a table of the 30 costliest could leave the cheap lookup out on a busy machine).
        assert ops["aten::embedding"]["calls"] == 12  # the prefill and 11 decode steps, one lookup each
    w4, w2, bf16 = (next(r["model_GB"] for r in rows if r["variant"] == v) for v in
                    ("qatext W4 g128", "qatext W2 g64", "bf16"))
    assert w2 < w4 < bf16  # the packed layers hold fewer bytes than the bf16 ones


def test_unknown_variant_is_one_line():
    r = _run("--variants", "W4")
    assert r.returncode == 2
    assert "--variants: unknown ['W4']" in r.stderr and "qatext W4 g128" in r.stderr
    assert "Traceback" not in r.stderr


def test_tuning_knobs_for_the_run_and_a_second_measurement(tmp_path):
    """--tuning sets knobs for the whole run (recorded in the JSON); --also-tuning measures each qatext
    variant again under other knobs, as a row of its own with those knobs named."""
    out = tmp_path / "generate.json"
    r = _run("--prompt", "8", "--new-tokens", "4", "--repeats", "1", "--batches", "1", "--variants", "qatext W4 g128",
             "--tuning", "decode_gemm_min_slice=4", "--also-tuning", "decode_gemm_max_m=0", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["tuning"]["decode_gemm_min_slice"] == 4 and result["tuning"]["decode_gemm_max_m"] == -1
    assert [(row["variant"], row["tuning"]) for row in result["rows"]] == [
        ("bf16", {}), ("qatext W4 g128", {}), ("qatext W4 g128 [decode_gemm_max_m=0]", {"decode_gemm_max_m": 0})]


def test_bad_tuning_is_one_line():
    for flag, value, expected in [("--tuning", "no_such_knob=1", "--tuning: unknown knob(s) ['no_such_knob']"),
                                  ("--tuning", "decode_gemm_min_slice=x", "--tuning 'decode_gemm_min_slice=x': expected"),
                                  ("--tuning", "decode_gemm_min_slice=0", "decode_gemm_min_slice must be in [1, "),
                                  ("--also-tuning", "decode_gemm_max_m", "--also-tuning 'decode_gemm_max_m': expected"),
                                  ("--also-tuning", "no_such_knob=1", "--also-tuning: unknown knob(s) ['no_such_knob']"),
                                  ("--also-tuning", "decode_gemm_row_tiles=3", "decode_gemm_row_tiles must be 1, 2 or 4")]:
        r = _run(flag, value)
        assert r.returncode == 2, r.stderr[-2000:]
        assert expected in r.stderr and "Traceback" not in r.stderr
