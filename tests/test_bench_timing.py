"""benchmarks/timing.py's op table: each op's calls and time per call of the profiled function."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import timing


def test_profile_ops_counts_each_op_per_call():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # profile_ops times the GPU where there is one
    a, b = torch.randn(64, 64, device=device), torch.randn(64, 64, device=device)

    def fn():
        return (a @ b).relu() @ b

    rows = timing.profile_ops(fn, steps=4)
    mm = next(r for r in rows if r["op"] == "aten::mm")
    assert mm["calls"] == 2 and 0 < mm["self_us"] <= mm["us"]
    assert next(r for r in rows if r["op"] == "aten::relu")["calls"] == 1
    assert [r["us"] for r in rows] == sorted((r["us"] for r in rows), reverse=True)


def test_host_time_is_the_time_inside_one_call():
    calls = []

    def fn():
        calls.append(1)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 2e-3:  # 2 ms of host work
            pass

    us = timing.host_time_us(fn, warmup=1, repeats=5)
    assert len(calls) == 6 and 2000 <= us < 20000


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cold_cycles_copies_past_twice_the_l2():
    w = torch.ones(4 << 20, device="cuda")  # 16 MB
    seen = []
    fn = timing.cold(lambda t: seen.append(t.data_ptr()), w)
    for _ in range(130):
        fn()
    copies, l2 = len(set(seen)), torch.cuda.get_device_properties(w.device).L2_cache_size
    assert copies >= 2 and (copies * w.nbytes >= 2 * l2 or copies == 64)
    assert seen[:copies] == seen[copies:2 * copies]  # cycled in order: each call's weight the least recent


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_interleaved_timing_times_every_fn_in_each_round_in_rotating_order():
    a = torch.randn(2048, 2048, device="cuda")
    calls = []

    def fn(name, n):
        def run():
            calls.append(name)
            for _ in range(n):
                a @ a
        return run

    ms = timing.cuda_time_interleaved_ms({"one": fn("one", 1), "four": fn("four", 4)}, warmup=2, repeats=3, inner=2,
                                         settle_s=0)
    assert list(ms) == ["one", "four"] and 2.5 < ms["four"] / ms["one"] < 6
    assert calls[:4] == ["one", "one", "four", "four"]  # warm-up
    assert calls[4:] == ["one"] * 2 + ["four"] * 2 + ["four"] * 2 + ["one"] * 2 + ["one"] * 2 + ["four"] * 2


@pytest.mark.parametrize("group_size", ["100", "0"])
def test_bench_decode_refuses_a_group_size_the_layout_cannot_take(group_size):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    run = subprocess.run([sys.executable, str(script), "--group-size", group_size], capture_output=True, text=True, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"--group-size: expected a positive multiple of 64 or -1 (one group a row), got {group_size}" in run.stderr


def test_save_rows_writes_the_rows_after_device_torch_and_extras(tmp_path):
    out = tmp_path / "rows.json"
    timing.save_rows(str(out), [{"N": 16, "us": 1.5}], copy_TBps=4.3)
    result = json.loads(out.read_text())
    assert list(result) == ["device", "torch", "copy_TBps", "rows"]
    assert result["rows"] == [{"N": 16, "us": 1.5}] and result["copy_TBps"] == 4.3
    assert result["torch"] == torch.__version__
    timing.save_rows(None, [{"N": 16}])  # no --out: nothing written, no error


GPU_BENCHMARKS = ["bench_decode", "bench_dequant", "bench_e2eqp", "bench_gemm", "bench_l2_prefetch", "bench_layer",
                  "bench_lowrank", "bench_untile", "step_host_gpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without a GPU")
@pytest.mark.parametrize("name", GPU_BENCHMARKS)
def test_a_gpu_benchmark_without_a_gpu_stops_in_one_line(name):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "benchmarks" / f"{name}.py")], cwd=root, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"{name}.py: error: needs a CUDA GPU (it times the CUDA kernels)"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script, args, flag", [
    ("step_host_gpu.py", ["--variants", "bf16,qatext W9"], "--variants"),
    ("bench_l2_prefetch.py", ["--layers", "0"], "--layers"),
    ("bench_l2_prefetch.py", ["--repeats", "0"], "--repeats"),
    ("bench_layer.py", ["--also-tuning", "no_such_knob=1"], "--also-tuning"),
    ("bench_layer.py", ["--also-tuning", "lrqat_rank_kernel=5"], "--also-tuning"),
])
def test_step_diagnostics_refuse_bad_arguments_in_one_line(script, args, flag):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    run = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert flag in run.stderr.strip().splitlines()[-1]


def test_bench_layer_step_under_knobs_sets_them_for_forward_and_backward_only():
    """--also-tuning's rows: the knobs hold through the step's forward and backward (an A/B in one run), and
    are back to what they were after it."""
    import bench_layer

    import qatext

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", qatext.get_tuning("lrqat_rank_kernel")))
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", qatext.get_tuning("lrqat_rank_kernel")))
            return grad

    x = torch.randn(3, 4, requires_grad=True)
    bench_layer.step(Probe.apply, x, torch.ones(3, 4), {"lrqat_rank_kernel": 0})()
    assert qatext.get_tuning("lrqat_rank_kernel") == 1
    bench_layer.step(Probe.apply, x, torch.ones(3, 4))()
    assert seen == [("forward", 0), ("backward", 0), ("forward", 1), ("backward", 1)]


def test_bench_staged_variants_set_their_row_tiles_with_the_tuner_off():
    """Each staged variant times its own row tiles: with autotune on, the row tiles tune_decode_gemm chose
    would replace the variant's and every variant would time the same kernel."""
    import bench_staged

    import qatext

    row_tiles = set()
    for knobs in bench_staged.STAGED_VARIANTS.values():
        assert knobs["decode_gemm_autotune"] == 0
        with qatext.tuning(**knobs):
            applied = qatext.get_tuning()
            assert all(applied[name] == value for name, value in knobs.items())
        row_tiles.add(knobs["decode_gemm_row_tiles"])
    assert row_tiles == {1, 2}
