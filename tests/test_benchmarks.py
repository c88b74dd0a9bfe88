"""The benchmark scripts (``benchmarks/``) at their smallest settings, so they cannot rot.

The slow tests run ``throughput.py`` and ``accuracy.py`` end to end as a user would (a subprocess each, real
Fashion-MNIST, real FFCV loaders, real training and evaluation; the sslrun side only, no lightly environment and no
plots) and parse the ``--json`` last line. The fast tests check the pure pieces the published figures depend on:
the steady-state rate, the budget-to-schedule translation, the evaluation list and the GPU peak table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import accuracy  # noqa: E402
import gpu  # noqa: E402
import throughput  # noqa: E402
from _common import LoadSampler, StepTimer, steady_rate  # noqa: E402


def _run(script: str, *args: str, timeout: int = 300) -> tuple[dict[str, Any], str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


# ---- end to end (slow) --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_throughput_script_sslrun_side(session_data_dir: str, fashion_mnist_dir: str) -> None:
    out, text = _run(
        "throughput.py",
        *("--skip-lightly", "--methods", "simclr", "--steps", "2", "--warmup-steps", "1", "--max-samples", "256"),
        *("--batch-size", "32", "--threads", "1", "--workers", "1", "--json"),
        *("--data-dir", session_data_dir, "--root", fashion_mnist_dir),
    )
    r = out["results"]["simclr"]
    assert "lightly" not in r and "ratio" not in r
    s = r["sslrun"]
    assert s["steps"] == 2 and s["images_per_s"] > 0 and s["seconds"] > 0
    assert s["images_per_s"] == pytest.approx(2 * 32 / s["seconds"])
    assert s["torch_threads"] == 1  # the --threads setting reached the trainer
    assert s["startup_s"] > 0
    assert s["load"]["load_max"] >= s["load"]["load_mean"] >= 0  # the load was sampled while the side ran
    assert s["all_images_per_s"] == [s["images_per_s"]]  # one run per side by default
    assert out["settings"]["batch_size"] == 32 and out["settings"]["skip_lightly"] is True
    assert "sslrun img/s" in text and "skipped" in text  # the table, with the lightly column marked skipped


@pytest.mark.slow
def test_accuracy_script_quick_run(tmp_path: Path, session_data_dir: str, fashion_mnist_dir: str) -> None:
    out, text = _run(
        "accuracy.py",
        *("--methods", "simclr", "--minutes", "0.05", "--steps-per-s", "1", "--max-samples", "256"),
        *("--batch-size", "32", "--eval-max-samples", "256", "--evals", "knn,linear@0.1", "--linear-iters", "5"),
        *("--threads", "1", "--workers", "1", "--no-monitor", "--no-plots", "--json", "--output", str(tmp_path)),
        *("--data-dir", session_data_dir, "--root", fashion_mnist_dir),
    )
    m = out["methods"]["simclr"]
    train = m["train"]
    # 0.05 min at the given 1 step/s plans 3 steps (fewer than one epoch of 8 batches: cut by max_steps)
    assert train["plan"] == {"epochs": 1, "max_steps": 3, "warmup_epochs": 0.1, "knn_every": 0, "planned_steps": 3}
    assert 1 <= train["steps"] <= 3
    assert train["load"]["load_max"] >= train["load"]["load_mean"] >= 0
    assert Path(train["checkpoint"]).is_file()
    assert (Path(train["run_dir"]) / "metrics.jsonl").is_file()
    knn, lin = m["evals"]["knn"], m["evals"]["linear@0.1"]
    # real features on real data: far above the 10% of chance even after 3 steps, and the 10% subset is used
    assert 0.2 < knn["top1"] <= 1.0 and knn["num_labelled"] == 256 and knn["num_test"] == 256
    assert 0.1 < lin["top1"] <= 1.0 and 15 <= lin["num_labelled"] <= 35
    assert json.loads((tmp_path / "accuracy.json").read_text())["methods"]["simclr"]["evals"]["knn"] == knn
    assert (tmp_path / "simclr" / "result.json").is_file()
    assert "knn %" in text and "linear@0.1 %" in text
    assert out["targets"]["best_linear"] is None  # no full-label probe was asked for: no verdict is invented


@pytest.mark.slow
def test_gpu_script_smoke_run_on_cpu(tmp_path: Path) -> None:
    """``gpu.py --smoke``: both sides (sslrun's FFCV trainer and the torchvision DataLoader) train resnet18 for a
    few steps on synthetic JPEGs, each in its own process, and the FLOP count and table come out."""
    out, text = _run("gpu.py", "--smoke", "--json", "--data-dir", str(tmp_path))
    assert out["device"] == "cpu" and out["peak_tflops"] is None
    r = out["results"]["resnet18"]
    assert r["flops_per_step"] > 0
    for side in ("sslrun", "torchvision"):
        assert r[side]["steps"] == 2 and r[side]["images_per_s"] > 0, side
        assert r[side]["mfu"] is None  # no peak for a CPU: no utilisation is invented
    assert r["speedup"] == pytest.approx(r["sslrun"]["images_per_s"] / r["torchvision"]["images_per_s"])
    assert "fp32 (CPU smoke run)" in text and "sslrun img/s" in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_launch_script_two_workers(session_data_dir: str, fashion_mnist_dir: str) -> None:
    """``launch.py`` on the embedded local Ray (loopback only): 2 CPU workers (gloo DDP), 2 steps, with Ray's
    start-up, the time to the first step and the throughput in its JSON (one worker count: each costs a worker
    group and FFCV's JIT; the scaling efficiency needs a 1-worker run and is None without one)."""
    data = [f"data.root={fashion_mnist_dir}", f"data.data_dir={session_data_dir}", "data.max_samples=256"]
    out, text = _run(
        "launch.py",
        *("--workers", "2", "--steps", "2", "--batch-size", "32", "--json"),
        *(arg for item in data for arg in ("--set", item)),
        timeout=280,
    )
    assert out["benchmark"] == "launch" and out["global_batch"] == 32 and out["ray_start_s"] > 0
    (run,) = out["runs"]
    assert run["workers"] == 2 and run["steps"] == 2 and run["loader_threads"] == 1
    assert run["time_to_first_step_s"] > 0 and run["images_per_second"] > 0
    assert run["scaling_efficiency"] is None
    assert "2 worker(s): first step after" in text


def test_gpu_script_refuses_cpu_without_smoke() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the CPU refusal does not apply")
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "--smoke" in done.stderr


# ---- pure pieces (fast) ---------------------------------------------------------------------------------------
def test_steady_rate_excludes_warmup_steps() -> None:
    # 2 slow warm-up steps (JIT), then steps of exactly 0.5 s
    times = [0.0, 10.0, 20.0, 20.5, 21.0, 21.5, 22.0]
    r = steady_rate(times, warmup=2, images_per_step=100)
    assert r["steps"] == 4 and r["seconds"] == pytest.approx(2.0)
    assert r["images_per_s"] == pytest.approx(200.0) and r["median_step_s"] == pytest.approx(0.5)
    assert r["images_per_s_median_step"] == pytest.approx(200.0)
    # one step slowed down by another process: the mean rate shows it, the median-step rate does not
    r = steady_rate([0.0, 0.5, 1.0, 4.0, 4.5, 5.0], warmup=0, images_per_step=100)
    assert r["images_per_s"] == pytest.approx(100.0) and r["images_per_s_median_step"] == pytest.approx(200.0)
    with pytest.raises(ValueError, match="at least 4"):
        steady_rate(times[:3], warmup=2, images_per_step=100)


def test_step_timer_budget_and_monitor_time() -> None:
    timer = StepTimer(budget_s=1000.0)
    assert timer.should_stop() is False and timer.start_unix is not None
    timer.on_log(10, {"knn/top1": 50.0, "knn/time_s": 3.0})
    assert timer.monitor_s == 3.0 and timer.logs[0][1] == 10
    assert timer.training_s() < 0  # the monitor's 3 s are not training time (only microseconds have passed)
    assert not timer.hit_budget
    timer.budget_s = -10.0
    assert timer.should_stop() is True and timer.hit_budget


def test_throughput_reports_the_median_run() -> None:
    runs = [{"images_per_s": 300.0, "id": 0}, {"images_per_s": 100.0, "id": 1}, {"images_per_s": 200.0, "id": 2}]
    best = throughput._median_run(runs)
    assert best["id"] == 2 and best["all_images_per_s"] == [300.0, 100.0, 200.0]
    assert throughput._median_run(runs[:2])["id"] == 1  # even count: the lower middle run, never flattering


def test_load_sampler_records_during_the_block() -> None:
    with LoadSampler(interval=0.01) as load:
        sum(i * i for i in range(200_000))
    assert len(load.samples) >= 2  # at least the first sample and the one at exit
    summary = load.summary()
    assert set(summary) == {"load_mean", "load_max", "runnable_mean"}
    assert 0 <= summary["load_mean"] <= summary["load_max"] and summary["runnable_mean"] >= 1  # this process runs


@pytest.mark.parametrize(
    ("budget_s", "rate", "spe", "points", "expected"),
    [
        (1800, 2.0, 234, 8, {"epochs": 15, "max_steps": None, "warmup_epochs": 1.5, "knn_every": 2}),
        (600, 1.0, 234, 8, {"epochs": 2, "max_steps": None, "warmup_epochs": 0.2, "knn_every": 1}),
        (30, 1.0, 234, 0, {"epochs": 1, "max_steps": 30, "warmup_epochs": 0.1, "knn_every": 0}),
        (36000, 5.0, 234, 8, {"epochs": 769, "max_steps": None, "warmup_epochs": 10.0, "knn_every": 96}),
    ],
)
def test_plan_schedule_fits_the_budget(
    budget_s: float, rate: float, spe: int, points: int, expected: dict[str, Any]
) -> None:
    plan = accuracy.plan_schedule(budget_s, rate, spe, points)
    assert {k: plan[k] for k in expected} == expected
    assert plan["planned_steps"] <= budget_s * rate  # never planned past the budget


def test_parse_evals() -> None:
    assert accuracy.parse_evals("knn, linear@0.1,finetune@0.01") == [
        ("knn", 1.0),
        ("linear", 0.1),
        ("finetune", 0.01),
    ]
    assert [accuracy.eval_key(*e) for e in accuracy.parse_evals(",".join(accuracy.DEFAULT_EVALS))] == list(
        accuracy.DEFAULT_EVALS
    )
    with pytest.raises(ValueError, match="unknown evaluation 'svm'"):
        accuracy.parse_evals("svm")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        accuracy.parse_evals("linear@2")
    assert accuracy.parse_evals("linear-grid2@0.01,knn-grid4") == [("linear-grid2", 0.01), ("knn-grid4", 1.0)]
    assert accuracy.split_kind("linear-grid2") == ("linear", "grid2") and accuracy.split_kind("knn") == (
        "knn",
        "pooled",
    )
    for bad in ("finetune-grid2", "linear-conv5", "linear-grid0"):
        with pytest.raises(ValueError, match="unknown evaluation"):
            accuracy.parse_evals(bad)


def test_accuracy_targets_are_judged_only_on_measured_figures() -> None:
    def entry(top1: float) -> dict[str, float]:
        return {"top1": top1}

    report = {
        "methods": {
            "simclr": {"evals": {"linear": entry(0.905), "finetune@0.01": entry(0.71), "linear@0.01": entry(0.74)}},
            "byol": {"evals": {"linear": entry(0.893)}},
        },
        "scratch": {"finetune@0.01": entry(0.62)},
    }
    t = accuracy.targets(report)
    assert t["best_linear"] == {"method": "simclr", "top1": 0.905, "met": True}
    assert t["one_percent"]["best"] == "simclr/linear@0.01"
    assert t["one_percent"]["gain"] == pytest.approx(0.12) and t["one_percent"]["met"] is True
    del report["scratch"]
    assert accuracy.targets(report)["one_percent"]["met"] is None  # no baseline measured: no verdict
    # a probe of the pooled-to-grid feature map counts as a linear probe too, at every label fraction
    report["methods"]["byol"]["evals"] |= {"linear-grid2": entry(0.912), "linear-grid2@0.01": entry(0.80)}
    report["scratch"] = {"finetune@0.01": entry(0.62)}
    t = accuracy.targets(report)
    assert t["best_linear"] == {"method": "byol/linear-grid2", "top1": 0.912, "met": True}
    assert t["one_percent"]["best"] == "byol/linear-grid2@0.01"


def test_gpu_peak_table() -> None:
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.5
    assert gpu.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu.peak_tflops("NVIDIA H200", None) == 989.5
    assert gpu.peak_tflops("NVIDIA H200 NVL", None) == 835.5
    assert gpu.peak_tflops("NVIDIA L40S", None) == 362.0  # not L4's figure although "L4" is in the name
    assert gpu.peak_tflops("NVIDIA GeForce GTX 1080", None) is None
    assert gpu.peak_tflops("NVIDIA GeForce GTX 1080", 50.0) == 50.0
