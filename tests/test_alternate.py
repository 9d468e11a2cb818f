"""benchmarks/alternate.py: two commands in turn, each in its own process, and the ratio of one number
from their results; a failing run, a wrong --metric or a wrong command is one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import alternate  # noqa: E402

FAKE = """
import argparse, json
p = argparse.ArgumentParser()
p.add_argument("--value", type=float)
p.add_argument("--fail", action="store_true")
p.add_argument("--out")
a = p.parse_args()
with open({log!r}, "a") as f:
    f.write(f"{{a.value}}\\n")
if a.fail:
    raise SystemExit("the benchmark broke")
json.dump({{"tokens_per_s": a.value, "rows": [{{"variant": "bf16", "batch": 1, "speed": 1.0}},
                                              {{"variant": "W4 g128", "batch": 1, "speed": 2 * a.value}}]}},
          open(a.out, "w"))
"""


@pytest.fixture
def fake(tmp_path):
    log = tmp_path / "calls.txt"
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE.format(log=str(log)))
    return script, log


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "alternate.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_runs_alternate_and_give_the_ratio_of_the_metric(fake, tmp_path):
    script, log = fake
    out = tmp_path / "pairs.json"
    r = _run("--a", f"{script} --value 2", "--b", f"{script} --value 3", "--pairs", "2",
             "--metric", "rows[variant=W4 g128,batch=1].speed", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert log.read_text().split() == ["2.0", "3.0", "2.0", "3.0"]  # A B A B
    result = json.loads(out.read_text())
    assert result["ratios_b_over_a"] == [1.5, 1.5] and result["pooled_ratio"] == 1.5
    assert [(run["side"], run["pair"], run["value"]) for run in result["runs"]] == [
        ("a", 1, 4.0), ("b", 1, 6.0), ("a", 2, 4.0), ("b", 2, 6.0)]
    assert "median 1.500, pooled 1.500" in r.stdout


def test_a_failing_run_stops_in_one_line(fake):
    script, _ = fake
    r = _run("--a", f"{script} --value 2", "--b", f"{script} --value 3 --fail", "--metric", "tokens_per_s")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "run b1" in r.stderr and "the benchmark broke" in r.stderr


@pytest.mark.parametrize("metric, message", [("speed", "no key 'speed'"),
                                             ("rows[variant=W8].speed", "no element of 'rows' with variant=W8"),
                                             ("rows", "not a number")])
def test_a_wrong_metric_is_one_line(fake, metric, message):
    script, _ = fake
    r = _run("--a", f"{script} --value 2", "--b", f"{script} --value 3", "--pairs", "1", "--metric", metric)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"--metric {metric!r}" in r.stderr and message in r.stderr


@pytest.mark.parametrize("args, message", [(["--pairs", "0"], "--pairs: expected a positive number"),
                                           (["--a", "no_such_bench.py"], "--a: no script no_such_bench.py")])
def test_wrong_arguments_are_one_line(fake, args, message):
    script, _ = fake
    base = {"--a": f"{script} --value 2", "--b": f"{script} --value 3", "--metric": "tokens_per_s"}
    base.update(dict(zip(args[::2], args[1::2])))
    r = _run(*[x for kv in base.items() for x in kv])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_pick_follows_keys_and_selections():
    result = {"rows": [{"variant": "bf16", "batch": 1, "v": 1}, {"variant": "W4", "batch": 8, "v": 5}], "n": 3}
    assert alternate.pick(result, "n") == 3.0
    assert alternate.pick(result, "rows[variant=W4,batch=8].v") == 5.0
    assert alternate.pick(result, "rows[batch=1].v") == 1.0
    with pytest.raises(ValueError, match="not a number"):
        alternate.pick({"flag": True}, "flag")


def test_a_zero_in_a_is_one_line(fake):
    script, _ = fake
    r = _run("--a", f"{script} --value 0", "--b", f"{script} --value 3", "--pairs", "1", "--metric", "tokens_per_s")
    assert r.returncode == 1 and "was 0 in a run" in r.stderr and "Traceback" not in r.stderr
