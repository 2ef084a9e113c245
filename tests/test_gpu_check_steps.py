"""The GPU check's parts that decide what a single timed run on a GPU machine brings back, on the CPU: steps
run apart against one --work, the DALI smoke's failure path, GPU tests cut by their timeout keeping the
outcomes written so far, timeouts that are shares of the budget, and what the children are given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests import processes
from tests.test_gpu_check import SCRIPT, check_env, gpu_check_module

# A call of the quick check with some of its steps: up to 25 s here (2026-12-06, 2-core CPU, two tests at
# once; the two calls of the longest test, 36 s).
CHECK_TIMEOUT_S = 180


def run_check(*args, env=None, status=0):
    r = processes.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", *map(str, args)],
                       timeout=CHECK_TIMEOUT_S, env=env)
    assert r.returncode == status, r.stderr[-3000:]
    return r


def steps_of(out: Path) -> dict:
    return {s["step"]: s for s in json.loads((out / "report.json").read_text())["steps"]}


def test_steps_run_apart_against_one_work(tmp_path):
    work = tmp_path / "work"
    r = run_check("--steps", "env,data", "--out", tmp_path / "one", "--work", work, env=check_env())
    assert list(steps_of(tmp_path / "one")) == ["environment", "synthetic data"]
    # No progress bars: tqdm reads TQDM_DISABLE when it is imported, which the check sets before anything
    # imports it (or torch, which imports it).
    assert "sample/s" not in r.stderr and "%|" not in r.stderr, r.stderr[-2000:]
    env = json.loads((tmp_path / "one" / "report.json").read_text())["environment"]
    assert env["pytest"] and env["pandas"] and env["tests_package"] == str(Path(SCRIPT).parents[1] / "tests")
    assert (work / "synthetic-120-32" / "y_test.csv").exists()

    run_check("--steps", "torch", "--out", tmp_path / "two", "--work", work)
    steps = steps_of(tmp_path / "two")
    assert list(steps) == ["environment", "GPU tests without DALI"]  # no data: not needed
    assert all(s["status"] == "ok" for s in steps.values()), steps
    # Only the GPU tests without DALI were selected (all skip here: no GPU).
    outcomes = json.loads((tmp_path / "two" / "report.json").read_text())["torch_tests"]["outcomes"]
    assert outcomes and all("test_gpu.py" not in name for name in outcomes)
    assert (tmp_path / "two" / "torch_tests.txt").exists()


def test_without_dali_the_smoke_fails_in_one_line_and_the_dali_steps_are_skipped(tmp_path):
    """`import nvidia.dali` made to fail (a package `nvidia` without DALI, first on the path), as on a GPU
    machine where DALI is missing or its CUDA does not load."""
    shim = tmp_path / "shim" / "nvidia"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "report"
    r = run_check("--steps", "env,smoke,tests,recipe,bench", "--out", out, env=env, status=1)  # a step failed
    assert r.stdout.strip().splitlines()[-1] == "failed: DALI smoke"
    steps = steps_of(out)
    assert steps["DALI smoke"]["status"] == "failed" and "No module named 'nvidia.dali'" in steps["DALI smoke"]["error"]
    for name in ("GPU tests with DALI", "reference recipe"):
        assert steps[name]["status"] == "skipped" and steps[name]["error"].startswith("DALI smoke failed"), steps
    # The benchmark measures what needs no DALI: the model-only ceiling.
    report = json.loads((out / "report.json").read_text())
    assert steps["loader benchmark"]["status"] == "ok" and report["benchmark"]["rows_done"] == 1
    assert report["benchmark"]["summary"]["ceiling_train_images_per_s"] > 0
    (line,) = [v for v in report["verdict"] if v["target"].startswith("DALI's training pipeline")]
    assert line["met"] is False and "nvidia.dali" in line["measured"]
    assert any("ModuleNotFoundError" in ln for ln in report["smoke"]["stderr_tail"])  # the exact error


def test_gpu_tests_cut_by_their_timeout_keep_every_outcome_written_so_far(tmp_path, monkeypatch):
    """Two tests: the first passes, the second hangs. The timeout is made to fall once the second has
    started (a stand-in for communicate's timeout: deterministic, not a race against the clock)."""
    gc = gpu_check_module()
    tests = tmp_path / "t"
    tests.mkdir()
    started = tmp_path / "second-started"  # a named pipe: the second test opens it to write, once begun
    os.mkfifo(started)
    (tests / "test_two.py").write_text(
        "import time\n\n"
        "def test_first():\n    assert True\n\n"
        f"def test_second():\n    open({str(started)!r}, 'w').close()\n    time.sleep(600)\n")
    real = subprocess.Popen.communicate
    calls, ours = [], []

    def communicate(self, input=None, timeout=None):
        if timeout is not None and not calls:
            calls.append(timeout)

            def writer_end_when_the_tests_end():  # so that the open below returns, however they end
                self.wait()
                ours.append(os.open(started, os.O_RDWR))

            threading.Thread(target=writer_end_when_the_tests_end, daemon=True).start()
            open(started).close()  # returns once the second test has begun (a blocking open: no polling)
            raise subprocess.TimeoutExpired(self.args, timeout)
        return real(self, input, timeout)

    monkeypatch.setattr(subprocess.Popen, "communicate", communicate)
    (tmp_path / "out").mkdir()
    check = gc.Check(tmp_path / "out", tmp_path, 300, {})
    with pytest.raises(gc.StepFailed) as e:
        gc.gpu_tests(check, "not nothing", "tests.txt", paths=(str(tests),))
    result = e.value.partial
    assert result["cut"] and result["failed"] == []
    ((name, outcome),) = result["outcomes"].items()  # the hanging test has no outcome
    assert name.endswith("test_two.py::test_first") and outcome == "PASSED"
    assert "test_first PASSED" in (tmp_path / "out" / "tests.txt").read_text()  # the file came back too


def test_a_step_timeout_never_runs_past_the_budget(tmp_path):
    gc = gpu_check_module()
    (tmp_path / "out").mkdir()
    check = gc.Check(tmp_path / "out", tmp_path, budget_s=3, report={})
    check.left = lambda: 3.0  # what is left of the budget when the step starts, whatever the machine's speed
    with pytest.raises(gc.StepTimeout) as e:
        check.run([sys.executable, "-c", "import time; time.sleep(120)"])
    assert "ran past its 3 s" in str(e.value), str(e.value)
    assert e.value.process.returncode < 0  # killed, what it wrote kept


def test_the_childrens_timeouts_are_shares_of_the_budget(tmp_path):
    """Ten times the budget gives every step's processes ten times the time: none has a fixed timeout of its
    own (a fixed 120 s for the ceiling failed the quick check on a busy machine, whatever its budget)."""
    gc = gpu_check_module()
    (tmp_path / "out").mkdir()
    timeouts = {}
    for budget in (300.0, 3000.0):
        check = gc.Check(tmp_path / "out", tmp_path, budget, {})
        check.left = lambda: budget  # at the start of the check
        for step, parts in (("torch", 1), ("smoke", 2), ("recipe", 1), ("bench", 1)):
            check.keep = gc.keep_back(gc.STEPS, step, budget)
            timeouts[budget, step] = check.timeout(parts)
    for step in ("torch", "smoke", "recipe", "bench"):
        assert timeouts[3000.0, step] == pytest.approx(10 * timeouts[300.0, step]), step
    assert timeouts[300.0, "bench"] == pytest.approx(300)  # the last step: whatever is left
    # the steps selected: the shares of the others are not kept back
    assert gc.keep_back(("env", "data", "torch"), "torch", 300.0) == 0.0


def test_on_a_cpu_the_children_get_one_openmp_thread_each(tmp_path, monkeypatch):
    """Unless set: on a busy 2-core machine a step of the ceiling took 1.6 s with torch's own default, 0.28 s
    with one thread. On a GPU the children keep torch's default."""
    gc = gpu_check_module()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "out").mkdir()
    check = gc.Check(tmp_path / "out", tmp_path, 60, {})
    show = [sys.executable, "-c", "import os; print(os.environ.get('OMP_NUM_THREADS'), os.environ['TQDM_DISABLE'])"]
    assert check.run(show).stdout.split() == ["1", "1"]
    check.on_cpu = False
    assert check.run(show).stdout.split() == ["None", "1"]
