"""The one-command GPU verification runs on the CPU too (tiny sizes), so that it cannot rot between the
rare runs on a GPU machine; and its report survives whatever stops it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import processes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
# The quick check takes 62 s here (2026-12-06, 2-core CPU): its budget (what its steps' timeouts are shares
# of) is several times that, so that a busy machine does not decide the test, and the test's timeout a
# little past it.
QUICK_BUDGET_S = 480
# Up to the killing of the check (its fourth step begins): 10 s here.
CHECK_TIMEOUT_S = 120
# The check's own GPU test steps, narrowed (pytest reads PYTEST_ADDOPTS) to one GPU test that builds a DALI
# GPU pipeline: it passes where torch and DALI see a GPU and skips elsewhere, in seconds either way (the
# step without DALI then selects nothing). The whole GPU suite is the outer run's, not to be run a second
# time inside this one.
ONE_GPU_TEST = "test_gpu_fp16_output"


def check_env() -> dict:
    """Without the settings the test suite makes for its own processes, which the check must make itself for
    its children: one OpenMP thread each on a CPU, no progress bars."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TQDM_DISABLE")}
    return dict(env, PYTEST_ADDOPTS=f"-k {ONE_GPU_TEST}")


def gpu_check_module():
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclasses look themselves up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_gpu_check_quick_on_the_cpu_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    r = processes.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out),
                       "--budget-s", str(QUICK_BUDGET_S)], timeout=QUICK_BUDGET_S + 120, env=check_env())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["environment", "synthetic data", "GPU tests without DALI", "DALI smoke",
                           "GPU tests with DALI", "reference recipe", "loader benchmark"]
    assert all(s["status"] == "ok" for s in steps.values()), report["steps"]
    assert "sample/s" not in r.stderr and "%|" not in r.stderr  # no progress bars, in the check or its children
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["gpu"] is None
    # The GPU test runs on a machine with a GPU and skips on one without, and fails on neither.
    from tests.test_gpu import GPU_HERE  # here, not at import: it asks DALI for a GPU

    ran, not_ran = ("passed", "skipped") if GPU_HERE else ("skipped", "passed")
    counts = report["gpu_tests"]["counts"]
    assert counts.get(ran) == 1 and not counts.get(not_ran) and not counts.get("failed"), counts
    assert not report["gpu_tests"]["failed"] and report["gpu_tests"]["marks"] == "gpu and dali and not slow"
    assert report["torch_tests"]["counts"] == {} and report["smoke"]["ok"]  # the one test narrowed to needs DALI
    bench = report["benchmark"]
    for key in ("torch_load_images_per_s", "dali_load_images_per_s", "dali_train_images_per_s",
                "torch-store_load_images_per_s", "dali-store_train_images_per_s", "ceiling_train_images_per_s"):
        assert bench["summary"][key] > 0, key
    assert bench["workers"] == env["workers"]  # the rows use what `dalipipe train` would use here
    rec = report["recipe"]
    assert rec["epochs_done"] == rec["epochs_planned"] == 2 and not rec["stopped_early"]
    assert len(rec["epoch_wall_s"]) == 2 and rec["epoch_records_s"] >= 0 and rec["record_wait_s"] >= 0
    assert 0 < rec["setup_s"] < rec["wall_s"] and 0 <= rec["test_balanced_accuracy"] <= 1
    smoke_line, *targets = report["verdict"]
    assert smoke_line["met"] is True and len(targets) == 3 and all(v["met"] is None for v in targets)  # not a GPU
    md = (out / "report.md").read_text()
    assert "no GPU (cpu)" in md and "None GiB" not in md
    # report.md: every step's line, every verdict line and the key numbers (report.json has the rest)
    for text in ("## Steps", "## Verdict", "## Key numbers", *steps, *(v["target"] for v in report["verdict"]),
                 "gpu and dali and not slow", "gpu and not dali and not slow", "recipe: test_balanced_accuracy",
                 "recipe: wall_s", "dali_train_images_per_s", "ceiling_train_images_per_s"):
        assert text in md, text
    # Only the report's few small files: runs, data and checkpoints went to the temporary work folder,
    # which is gone.
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json", "benchmark.png", "gpu_check.log",
                                                     "gpu_tests.txt", "report.json", "report.md", "torch_tests.txt"]
    assert all(p.stat().st_size < 1_000_000 for p in out.iterdir())
    assert "work:" not in r.stdout.splitlines()[-1]


def test_the_report_is_on_disk_after_every_step_even_when_the_check_is_killed(tmp_path):
    out = tmp_path / "report"
    with processes.started([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out),
                            "--work", str(tmp_path / "work")], timeout=CHECK_TIMEOUT_S, stdout=subprocess.PIPE,
                           stderr=open(tmp_path / "stderr", "w"), text=True, start_new_session=True,
                           env=check_env()) as proc:
        # Each step starts with a line "== STEP", said once the report holds every step before it: the
        # fourth's means three are on disk. (A blocking read of the check's output: no polling.)
        headers = 0
        for line in proc.stdout:
            headers += line.startswith("== ")
            if headers == 4:
                break
        assert headers == 4, "the check ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # as a time limit or a native crash would: no chance to clean up
        proc.wait()
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]][:3] == ["environment", "synthetic data", "GPU tests without DALI"]
    assert report["environment"]["device"] == "cpu"
    assert "## Steps" in (out / "report.md").read_text()


@pytest.mark.parametrize("walls,partial,expected,basis", [
    # two whole epochs: the first once (warm-ups), the mean of the rest for the other 28
    ([5.0, 3.0], (0, 0.0), 10 + 5 + 29 * 3.0, "mean of epochs 2-2"),
    ([5.0, 3.0, 4.0], (0, 0.0), 10 + 5 + 29 * 3.5, "mean of epochs 2-3"),
    ([5.0], (0, 0.0), 10 + 30 * 5.0, "epoch 1"),
    # stopped inside the first epoch: steps only, a lower bound
    ([], (10, 2.0), 10 + 30 * 100 * 0.2, "lower bound"),
])
def test_projection_counts_every_epoch_cost_per_epoch(walls, partial, expected, basis):
    projected, how = gpu_check_module().project_recipe(10.0, walls, 30, 100, *partial)
    assert projected == pytest.approx(expected) and basis in how


def test_projection_of_a_run_with_a_known_cost_per_epoch(small_synth, tmp_path, monkeypatch):
    """Each epoch's end is made to cost 0.5 s more in the training loop (as a hand-off that has to wait for a
    slow disk would), on a stand-in clock, of the loop and of the check's callback, that only this cost and
    the steps (1 s each) advance: the projection for 10 epochs from the 2 measured must include 10 such costs,
    not 2."""
    from dalipipe.config import AugmentSpec, TrainConfig
    from dalipipe.run import train as loop
    from dalipipe.run.run_recorder import RunRecorder
    from tests.test_data_wait import Clock

    extra, clock = 0.5, Clock()
    hand_off, step = RunRecorder.epoch_end, loop.Step.__call__
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(loop.Step, "__call__", lambda *a, **k: (clock.advance(1.0), step(*a, **k))[1])
    monkeypatch.setattr(RunRecorder, "epoch_end", lambda *a, **k: (clock.advance(extra), hand_off(*a, **k)))
    cfg = TrainConfig(images_dir=str(small_synth / "images_train"), labels_csv=str(small_synth / "y_train.csv"),
                      out_dir=str(tmp_path / "run"), epochs=2, batch_size=32, device="cpu", subset=96,
                      augment=AugmentSpec(image_size=16))
    result, times = gpu_check_module().timed_train(cfg, clock=clock)
    steps = times["steps_per_epoch"]
    assert times["setup_s"] == 0.0 and times["epoch_walls"] == [steps + extra] * 2 and times["record_wait_s"] == 0
    projected, _ = gpu_check_module().project_recipe(times["setup_s"], times["epoch_walls"], 10, steps, 0, 0.0)
    assert [h["epoch_seconds"] for h in result.history] == [steps] * 2  # steps and validation, no records
    assert projected == 10 * (steps + extra)


@pytest.mark.parametrize("gpu", [None, "NVIDIA H100 80GB HBM3"])
def test_the_smoke_verdict_says_what_ran_on_this_machine(gpu):
    check = gpu_check_module()
    report = {"quick": False, "environment": {"gpu": gpu}, "recipe": {}, "benchmark": {},
              "steps": [{"step": "DALI smoke", "status": "ok"}]}
    (row,) = [r for r in check.verdict(report) if r["target"].startswith("DALI's")]
    if gpu:
        assert "three mixed decoders and a GPU warp_affine" in row["target"], row
    else:  # not a GPU result: nothing of the GPU path ran here
        assert "CPU decoders and a CPU warp_affine: no GPU here" in row["target"] and "mixed decoders" not in row["target"]
