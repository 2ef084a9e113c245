"""Verify a GPU machine in one command: the environment, the GPU tests, the reference recipe and the loader
benchmark, measured against the project's targets.

    python scripts/gpu_check.py --out DIR [--budget-s S] [--device auto|gpu|cpu] [--quick] [--work DIR]
                                [--steps env,data,torch,smoke,tests,recipe,bench]

Runs from a checkout, with no install step and no network. The steps call what the project has: `pytest -m
gpu` (`torch`: the GPU tests that need no DALI; `tests`: the others, exact resume on the GPU included),
benchmarks/loader_speed.py (`smoke`: an epoch of DALI's pipeline; `bench`: the loader benchmark and the
model-only training-step ceiling) and `dalipipe train` and `predict` (`recipe`), each in a process group of
its own killed at its timeout: a crash or a hang costs one step, and the next one runs. The check stops
within --budget-s (420 s on a GPU, 300 s without one, by default): each step has a share of it (SHARES), and
while a step runs the shares of the selected steps after it are kept back. DIR/report.json and report.md
are rewritten after every step: whatever ends the check leaves the finished steps' report.

--steps runs some steps only, against the same --work: `env,data` makes the synthetic data that later calls
with this --work reuse. When the DALI smoke fails, the GPU tests with DALI and the recipe are skipped with
one verdict line, the exact error in the report, and the benchmark measures the ceiling only (it needs no
DALI). Exit status: 0 when every step that ran passed, 1 when one failed. DIR receives a few small files
(report.md, report.json, gpu_check.log, gpu_tests.txt, torch_tests.txt, benchmark.json, benchmark.png);
data and runs go to --work (by default a temporary folder, removed at the end). --quick: tiny sizes, with
which the test suite runs the check on the CPU (--device cpu), so that it cannot rot between the rare runs
on a GPU machine. The torch.compile row is loader_speed.py's (--train --rows ceiling-compile): it compiles
for minutes that a check within one budget does not have.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

TARGET_RECIPE_S = 120.0          # the reference recipe's training, all included, on one H100
TARGET_DALI_OF_CEILING = 0.95    # DALI's training images/s against the no-loading ceiling
TARGET_DALI_OVER_TORCH = 5.0     # DALI's loading images/s against the torch loader at equal workers
BUDGET_GPU_S, BUDGET_CPU_S = 420.0, 300.0  # a rented GPU's time is dear, and a rerun pays the start-up again
STEPS = ("env", "data", "torch", "smoke", "tests", "recipe", "bench")
NEEDS_DALI = ("tests", "recipe")  # and the benchmark's rows but the ceiling
TITLES = {"env": "environment", "data": "synthetic data", "torch": "GPU tests without DALI",
          "smoke": "DALI smoke", "tests": "GPU tests with DALI", "recipe": "reference recipe",
          "bench": "loader benchmark"}
# Each step's share of the budget, among the selected steps' (the environment takes seconds). What a step
# leaves unused goes to the steps after it.
SHARES = {"data": 0.05, "torch": 0.07, "smoke": 0.05, "tests": 0.25, "recipe": 0.38, "bench": 0.2}
RECIPE_TRAIN_SHARE = 0.7  # of the recipe step's time, its --time-limit; the rest ends its step and predicts
# The end-to-end GPU tests (slow) stay out: the recipe trains and predicts on the GPU. Collecting a module
# imports it, and the DALI GPU tests' module asks DALI for a GPU at import: the torch step leaves it out.
TORCH_TESTS, DALI_TESTS = "gpu and not dali and not slow", "gpu and dali and not slow"
BENCH_ROWS = ["torch", "dali", "dali-cpudec", "dali-cache", "ceiling"]  # loader_speed.py runs those that apply
SMOKE_SAMPLES = 32


@dataclass(frozen=True)
class Sizes:
    """What the steps run on: the real recipe's sizes, or tiny ones for --quick."""

    n_train: int
    n_test: int
    classes: int
    synth_size: int
    image_size: int
    epochs: int
    batch_size: int
    bench_limit: int

    @classmethod
    def pick(cls, quick: bool) -> "Sizes":
        if quick:
            return cls(120, 40, 3, synth_size=32, image_size=32, epochs=2, batch_size=16, bench_limit=64)
        from dalipipe.config import AugmentSpec, TrainConfig
        from dalipipe.constants import REAL_N_TEST, REAL_N_TRAIN

        d = TrainConfig(images_dir="", labels_csv="", out_dir="")
        return cls(REAL_N_TRAIN, REAL_N_TEST, 9, synth_size=64, image_size=AugmentSpec().image_size,
                   epochs=d.epochs, batch_size=d.batch_size, bench_limit=1024)


class StepFailed(RuntimeError):
    """A step's failure that still carries what it measured (partial), or what a process wrote (process)."""

    def __init__(self, message: str, partial: dict | None = None, process=None):
        super().__init__(message)
        self.partial, self.process = partial, process


class StepTimeout(StepFailed):
    """A child process stopped at its timeout."""


class Check:
    """Runs steps in order under one time budget; records each step's time, result or failure, and rewrites
    the report after every step."""

    def __init__(self, out: Path, work: Path, budget_s: float, report: dict):
        self.out, self.work, self.t0, self.budget_s, self.report = out, work, time.perf_counter(), budget_s, report
        self.steps: list[dict] = []
        self.keep = 0.0  # seconds kept back for the steps after the current one (keep_back)
        self.on_cpu = True  # until the environment step finds a GPU
        self.log = open(out / "gpu_check.log", "a")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def say(self, text: str) -> None:
        click.echo(text)
        self.log.write(text + "\n")
        self.log.flush()

    def skip(self, name: str, why: str) -> None:
        self.steps.append({"step": name, "status": "skipped", "seconds": 0.0, "error": why})
        self.say(f"== {name}: skipped ({why})")
        self.save()

    def step(self, name: str, fn, min_s: float = 5.0, key: str | None = None):
        if self.left() < min_s:
            return self.skip(name, f"time budget spent ({self.left():.0f} of {self.budget_s:.0f} s left, "
                                   f"needs {min_s:.0f})")
        self.say(f"== {name} ({self.left():.0f} s of budget left)")
        t, status, error = time.perf_counter(), "ok", None
        try:
            result = fn()
        except Exception as e:  # record and go on: the next step may still tell us something
            status, error = "failed", f"{type(e).__name__}: {e}"
            self.log.write(traceback.format_exc())
            self.say(f"   failed: {error.splitlines()[0]}")
            result = getattr(e, "partial", None)  # what the step measured before it failed
        self.steps.append({"step": name, "status": status, "seconds": round(time.perf_counter() - t, 1),
                           "error": error})
        if key:
            self.report[key] = result
        self.save()
        return result

    def save(self) -> None:
        """report.json and report.md as they stand now (atomically: a kill mid-write leaves the last one)."""
        from dalipipe.atomic import save_json, write_atomic

        report = dict(self.report, steps=self.steps, seconds=round(time.perf_counter() - self.t0, 1),
                      finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        report = json.loads(json.dumps(dict(report, verdict=verdict(report)), default=str))  # paths as strings
        save_json(report, self.out / "report.json")
        write_atomic(self.out / "report.md", lambda tmp, text=markdown(report): Path(tmp).write_text(text))

    def env(self, **extra: str) -> dict:
        """The children's environment. On a CPU one OpenMP thread each (unless set): on a few busy cores
        torch's threads spin against each other and the loader's (a step of the ceiling took 1.6 s on a busy
        2-core machine, 0.28 s with one)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   PYTHONWARNINGS="ignore", TQDM_DISABLE="1", DALIPIPE_CACHE_DIR=str(self.work / "check-cache"))
        if self.on_cpu:
            env.setdefault("OMP_NUM_THREADS", "1")
        return dict(env, **extra)

    def timeout(self, parts: int = 1) -> float:
        """A child's timeout: what is left of the budget less what the later steps keep back, shared among
        the `parts` processes the step has still to run (where that leaves under 10 s, the step, earlier and
        so worth more, may use the later steps' time up to the budget's end)."""
        avail = self.left() - self.keep
        return max(1.0, (avail if avail >= 10 else self.left()) / parts)

    def run(self, cmd: list, parts: int = 1, env: dict | None = None,
            stdout_file: Path | None = None) -> subprocess.CompletedProcess:
        """cmd in a process group of its own (a timeout stops its children too), stopped at its timeout.
        stdout_file: its output goes there as it is written (what it wrote before a timeout stays)."""
        from dalipipe.child_processes import die_with_parent

        cmd, timeout = [str(c) for c in cmd], self.timeout(parts)
        self.log.write(f"$ {' '.join(cmd)}  (timeout {timeout:.0f} s)\n")
        self.log.flush()
        sink = open(stdout_file, "w") if stdout_file else subprocess.PIPE
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.PIPE, text=True, env=env or self.env(),
                                cwd=ROOT, start_new_session=True, preexec_fn=die_with_parent)
        try:
            (out, err), timed_out = proc.communicate(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            (out, err), timed_out = proc.communicate(), True
        if stdout_file:
            sink.close()
            out = Path(stdout_file).read_text(errors="replace")
        self.log.write(out[-20000:] + err[-20000:] + "\n")
        self.log.flush()
        done = subprocess.CompletedProcess(cmd, -signal.SIGKILL if timed_out else proc.returncode, out, err)
        if timed_out:
            raise StepTimeout(f"{' '.join(Path(c).name for c in cmd[1:4])} ran past its {timeout:.0f} s",
                              process=done)
        return done


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def keep_back(steps: tuple[str, ...], name: str, budget_s: float) -> float:
    """Seconds kept back, while step `name` runs, for the selected steps after it: their shares of the budget."""
    later = sum(SHARES.get(n, 0.0) for n in STEPS[STEPS.index(name) + 1:] if n in steps)
    return budget_s * later / (sum(SHARES.get(n, 0.0) for n in steps) or 1.0)


def environment(device_name: str) -> dict:
    import torch

    from dalipipe import device as dev
    from dalipipe.loading.loader_rules import default_workers
    from dalipipe.versions import versions

    def version(module: str) -> str | None:
        try:
            return __import__(module, fromlist=["__version__"]).__version__
        except Exception:
            return None

    device = dev.resolve(device_name)
    # where `import tests` leads from the project's root, as pytest imports the test modules: another
    # installed package named `tests` would shadow the project's
    tests = subprocess.run([sys.executable, "-c", "import tests; print(list(tests.__path__)[0])"], cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
    info = {**versions(), "cuda": torch.version.cuda,
            **{m: version(m) for m in ("numpy", "pandas", "sklearn", "six", "packaging", "pytest", "tqdm")},
            "cpu_cores": os.cpu_count(), "device": str(device), "gpu": None, "gpu_memory_gib": None, "driver": None,
            "bf16": dev.has_bf16(device), "workers": default_workers(),
            # the torch loader's workers hand batches over in shared memory: 224 px batches need room there
            "dev_shm_free_gib": round(shutil.disk_usage("/dev/shm").free / 2**30, 1)
            if os.path.isdir("/dev/shm") else None,
            "tests_package": tests.stdout.strip() or last_line(tests.stderr) or None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def synthetic_data(work: Path, sizes: Sizes) -> Path:
    from dalipipe.data.synthetic import generate
    from dalipipe.settings import SynthSpec

    path = work / f"synthetic-{sizes.n_train}-{sizes.synth_size}"
    if not (path / "y_test.csv").exists():
        generate(path, SynthSpec(n_train=sizes.n_train, n_test=sizes.n_test, n_classes=sizes.classes,
                                 image_size=sizes.synth_size, seed=0), force=True)
    return path


# One line per test as pytest -v writes it when the test ends: "tests/x.py::name[param] PASSED [ 10%]".
_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", flags=re.M)


def gpu_tests(check: Check, marks: str, out_name: str, paths: tuple[str, ...] = ("tests",),
              extra: tuple[str, ...] = ()) -> dict:
    """`pytest -m MARKS -v`, its output written to DIR/out_name as each test ends, so that a step cut by its
    timeout still reports every test that finished, by name."""
    cmd = [sys.executable, "-m", "pytest", "-m", marks, "-v", "-rfEs", "-p", "no:cacheprovider", *extra, *paths]
    cut = None
    try:
        r = check.run(cmd, env=check.env(PYTHONUNBUFFERED="1"), stdout_file=check.out / out_name)
    except StepTimeout as e:
        r, cut = e.process, str(e)
    outcomes = dict(_OUTCOME.findall(r.stdout))
    failed = [name for name, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
    tail = f"cut: {cut}; {len(outcomes)} test(s) finished" if cut else (last_line(r.stdout) or r.stderr[-300:])
    result = {"marks": marks, "exit_code": r.returncode, "summary": tail, "failed": failed, "outcomes": outcomes,
              "counts": {k.lower(): list(outcomes.values()).count(k) for k in set(outcomes.values())},
              "cut": cut is not None}
    if cut or failed or r.returncode not in (0, 5):  # exit 5: nothing selected here, not a failure
        raise StepFailed(f"GPU tests ({marks}): {tail}", result)
    return result


def loader_speed(check: Check, data: Path, sizes: Sizes, device: str, json_out: Path, *args, parts: int = 1):
    """benchmarks/loader_speed.py on `data` at these sizes: (the command, its rows, its table, what stopped it
    or None, the process). The rows it finished are in its JSON, whatever stopped it."""
    cmd = [sys.executable, ROOT / "benchmarks" / "loader_speed.py", "--data", data, "--device", device,
           "--image-size", sizes.image_size, "--batch-size", sizes.batch_size, "--json", json_out, *args]
    try:
        r = check.run(cmd, parts)
        failure = f"loader_speed.py exit {r.returncode}: {last_line(r.stderr)}" if r.returncode else None
    except StepTimeout as e:
        r, failure = e.process, str(e)
    rows = json.loads(json_out.read_text())["results"] if json_out.exists() else []
    return " ".join(str(c) for c in cmd[1:]), rows, r.stdout.strip(), failure, r


def benchmark(check: Check, data: Path, sizes: Sizes, device: str, rows: list[str], json_out: Path) -> dict:
    """loader_speed.py --train with these rows (one timed epoch after its warm-up), summed up for the verdict."""
    cmd, results, text, failure, _ = loader_speed(check, data, sizes, device, json_out, "--train", "--limit",
                                                  sizes.bench_limit, "--epochs", 1,
                                                  *[a for r in rows for a in ("--rows", r)])
    if not results:
        raise RuntimeError(failure or "loader_speed.py wrote no results")
    mode = {True: "train", False: "load"}
    summary = {f"{x['row']}_{mode[x['train']]}_images_per_s": round(x["images_per_s"], 1) for x in results}
    summary.update({f"{x['row']}_train_data_wait": round(x["data_wait_fraction"], 4) for x in results if x["train"]})
    summary.update({f"{x['row']}_{mode[x['train']]}_device_mb": x["peak_device_memory_mb"]
                    for x in results if x.get("peak_device_memory_mb") is not None})
    out = {"command": cmd, "table": text or json.dumps(summary, indent=1), "summary": summary,
           "rows_done": len(results), "workers": results[0]["workers"]}
    if failure:
        raise StepFailed(f"benchmark incomplete ({failure}); {len(results)} row(s) finished", out)
    return out


def dali_smoke(check: Check, data: Path, sizes: Sizes, device: str) -> dict:
    """`import nvidia.dali` (where it fails, its error is the answer, in its own words), then an epoch of DALI's
    training pipeline on a few samples (loader_speed.py's dali row: three mixed decoders and a GPU
    warp_affine on a GPU, CPU operators without one), its batches on the device."""
    r = check.run([sys.executable, "-c", "import nvidia.dali as d; print(d.__version__)"], parts=2)
    version, rows = last_line(r.stdout), []
    failure = f"exit {r.returncode}: {last_line(r.stderr)}" if r.returncode else None
    if not failure:
        _, rows, _, failure, r = loader_speed(check, data, sizes, device, check.work / "smoke.json", "--rows",
                                              "dali", "--limit", SMOKE_SAMPLES, "--epochs", 1, "--workers", 1)
    on = "cpu" if check.on_cpu else "cuda"
    if not failure and not (rows and rows[0]["device"].startswith(on)
                            and rows[0]["images_per_epoch"] == SMOKE_SAMPLES):
        failure = f"no whole epoch on the device ({on}): {rows}"
    if failure:
        stderr = [line for line in r.stderr.splitlines() if line.strip()]
        raise StepFailed(f"DALI smoke {failure}", {"exit_code": r.returncode, "stderr_tail": stderr[-15:]})
    return {"dali": version, "device": rows[0]["device"], "images": SMOKE_SAMPLES, "ok": True}


def timed_train(cfg, clock=time.perf_counter) -> tuple:
    """train(cfg), timed on this clock through its observe callback: (its result, the times). setup_s: to its
    first epoch's start; epoch_walls: each whole epoch (steps, validation, the hand-off of its checkpoint and
    records); partial_steps, partial_s: those of an epoch that --time-limit stopped; record_wait_s: from the
    last event to train's return (the wait for the last writes)."""
    from dalipipe.run.train import train

    marks: list[tuple[str, int, float]] = []
    t0 = clock()
    result = train(cfg, observe=lambda event, value: marks.append((event, value, clock())))
    end, last = clock(), t0
    times = {"wall_s": end - t0, "setup_s": None, "steps_per_epoch": None, "epoch_walls": [], "partial_steps": 0,
             "partial_s": 0.0}
    for event, value, t in marks:
        if event == "epochs":
            times.update(setup_s=t - t0, steps_per_epoch=value)
        elif event == "epoch_end":
            times["epoch_walls"].append(t - last)
        elif event == "stopped":
            times.update(partial_steps=value, partial_s=t - last)
        last = t
    return result, dict(times, record_wait_s=end - last)


def project_recipe(setup_s: float, epoch_walls: list[float], epochs: int, steps_per_epoch: int,
                   partial_steps: int, partial_s: float) -> tuple[float | None, str]:
    """The whole recipe's training time from what a stopped run measured, with how it was projected.
    Whole-epoch wall times hold everything an epoch costs the loop (steps, validation, the hand-off of its
    checkpoint and records), so per-epoch costs count once per epoch. The first epoch also pays the warm-ups
    (cuDNN autotuning, DALI's first batches): it counts once, the later epochs' mean for the rest."""
    if len(epoch_walls) >= 2:
        return (setup_s + epoch_walls[0] + (epochs - 1) * statistics.mean(epoch_walls[1:]),
                f"start-up + epoch 1 + {epochs - 1} x the mean of epochs 2-{len(epoch_walls)}")
    if len(epoch_walls) == 1:
        return setup_s + epochs * epoch_walls[0], f"start-up + {epochs} x epoch 1 (with its warm-up: high)"
    if partial_steps:
        return (setup_s + epochs * steps_per_epoch * partial_s / partial_steps,
                "training steps only, validation and epoch-end writes not measured: a lower bound")
    return None, "no training step finished"


def recipe(check: Check, data: Path, sizes: Sizes, device: str) -> dict:
    """`dalipipe train` with the recipe's defaults (train() in a child process, clocked through its observe
    callback) under a time limit, then `dalipipe predict` of the test set; a projection where it was stopped."""
    run = Path(tempfile.mkdtemp(prefix="recipe-", dir=check.work))
    job = {"data": str(data), "run": str(run), "sizes": asdict(sizes), "device": device,
           "limit_s": max(10.0, RECIPE_TRAIN_SHARE * check.timeout()), "result": str(run / "recipe.json")}
    (check.work / "recipe-job.json").write_text(json.dumps(job))
    failure = None
    try:  # past its time limit the child still finishes its step, saves, and predicts
        r = check.run([sys.executable, __file__, "--child", "recipe", "--work", check.work / "recipe-job.json"])
        failure = f"exit {r.returncode}: {last_line(r.stderr)}" if r.returncode else None
    except StepTimeout as e:
        failure = str(e)
    if not Path(job["result"]).exists():
        raise RuntimeError(failure or "the recipe wrote no result")
    res = json.loads(Path(job["result"]).read_text())
    history, walls = res["history"], res["epoch_walls"]
    out = {"epochs_planned": sizes.epochs, "epochs_done": len(history), "stopped_early": res["stopped_early"],
           **{k: round(res[k], 1) for k in ("wall_s", "setup_s", "record_wait_s")},
           "epoch_wall_s": [round(w, 2) for w in walls],
           # what an epoch costs the loop besides its steps and validation: its checkpoint and records
           "epoch_records_s": round(statistics.mean(w - h["epoch_seconds"] for w, h in zip(walls, history)), 2)
           if walls else None,
           "train_images_per_s": round(statistics.mean(h["train_images_per_s"] for h in history[1:] or history), 1)
           if history else None, "val_balanced_accuracy_best": round(res["best_val_balanced_accuracy"], 4),
           **{k: round(res[k], 3) for k in ("peak_device_memory_mb", "predict_s", "test_balanced_accuracy")
              if k in res}}
    if res["stopped_early"]:  # projected, plus the wait for the last writes at the end
        projected, basis = project_recipe(res["setup_s"], walls, sizes.epochs, res["steps_per_epoch"],
                                          res["partial_steps"], res["partial_s"])
        out.update(steps_done_in_last_epoch=res["partial_steps"], projection=basis,
                   projected_recipe_s=None if projected is None else round(projected + res["record_wait_s"], 1))
    if failure:
        raise StepFailed(f"recipe: {failure}", out)
    return out


def _recipe_child(job_file: Path) -> None:
    """Child: train with the recipe's defaults under the time limit, then predict; the result is written after
    training and again after predict, so that a failure in predict keeps the training figures."""
    import torch

    from dalipipe.atomic import save_json
    from dalipipe.config import AugmentSpec, TrainConfig
    from dalipipe.infer.predict import predict
    from dalipipe.infer.score import score
    from dalipipe.settings import PredictSettings

    job = json.loads(Path(job_file).read_text())
    data, run, sizes = Path(job["data"]), Path(job["run"]), Sizes(**job["sizes"])
    trained, times = timed_train(TrainConfig(
        images_dir=str(data / "images_train"), labels_csv=str(data / "y_train.csv"), out_dir=str(run),
        epochs=sizes.epochs, batch_size=sizes.batch_size, device=job["device"],
        augment=AugmentSpec(image_size=sizes.image_size), time_limit_minutes=job["limit_s"] / 60))
    result = {**trained.to_dict(), **times}
    if torch.cuda.is_available() and job["device"] != "cpu":
        # torch's allocator; DALI's own pools are apart (the benchmark's device column counts both)
        result["peak_device_memory_mb"] = torch.cuda.max_memory_reserved() / 2**20
    save_json(result, job["result"])
    if trained.history:  # a run stopped before its first epoch's end has no best.pt to predict with
        t, sub = time.perf_counter(), run / "submission.csv"
        predict(PredictSettings(checkpoints=(str(run),), images_dir=str(data / "images_test"), out_csv=str(sub),
                                device=job["device"], batch_size=sizes.batch_size))
        save_json(dict(result, predict_s=time.perf_counter() - t,
                       test_balanced_accuracy=score(str(sub), str(data / "y_test.csv"))), job["result"])


def verdict(report: dict) -> list[dict]:
    rec, bench = report.get("recipe") or {}, (report.get("benchmark") or {}).get("summary", {})
    on_gpu = bool((report.get("environment") or {}).get("gpu"))  # the targets are a GPU's: n/a elsewhere
    applies, rows = on_gpu and not report["quick"], []
    smoke = next((x for x in report["steps"] if x["step"] == TITLES["smoke"]), None)
    if smoke is not None and smoke["status"] != "skipped":
        # One line for what DALI's failure costs: every step that needs it is skipped, not failed in turn.
        what = ("three mixed decoders and a GPU warp_affine" if on_gpu else
                "CPU decoders and a CPU warp_affine: no GPU here, its mixed and GPU operators not tried")
        rows.append({"target": f"DALI's training pipeline runs an epoch on this machine ({what})",
                     "measured": "ok" if smoke["status"] == "ok" else
                     f"{smoke['error']}; the steps that need DALI were skipped", "met": smoke["status"] == "ok"})
    finished = rec and not rec.get("stopped_early")
    recipe_s = rec.get("wall_s") if finished else rec.get("projected_recipe_s")
    lower_bound, met = "lower bound" in (rec.get("projection") or ""), None
    if recipe_s is not None and applies:  # a lower bound over the target is a sure miss; under it, proves nothing
        met = recipe_s <= TARGET_RECIPE_S if not lower_bound else (False if recipe_s > TARGET_RECIPE_S else None)
    rows.append({"target": f"reference recipe (training, all included) <= {TARGET_RECIPE_S:.0f} s on one H100",
                 "measured": None if recipe_s is None else f"{recipe_s:.0f} s"
                 + ("" if finished else f" (projected: {rec.get('projection')})")
                 + (" (quick sizes: not the recipe)" if report["quick"] else ""), "met": met})
    for a, b, target, goal, fmt in (
            ("dali_train", "ceiling_train", f"DALI in training >= {TARGET_DALI_OF_CEILING:.0%} of the ceiling",
             TARGET_DALI_OF_CEILING, "{:.1%}"),
            ("dali_load", "torch_load", f"DALI loading >= {TARGET_DALI_OVER_TORCH:.0f}x the torch loader "
             "(same workers)", TARGET_DALI_OVER_TORCH, "{:.2f}x")):
        x, y = bench.get(f"{a}_images_per_s"), bench.get(f"{b}_images_per_s")
        ratio = x / y if x and y else None
        rows.append({"target": target, "measured": None if ratio is None else fmt.format(ratio),
                     "met": None if ratio is None or not applies else ratio >= goal})
    return rows


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    device = (f"{env['gpu']}, {env['gpu_memory_gib']} GiB; driver {env['driver']}; CUDA {env['cuda']}"
              if env.get("gpu") else f"no GPU ({env.get('device', 'device unknown')})")
    lines = [f"# gpu_check report ({report.get('finished')})", "",
             f"Device: {device}; torch {env.get('torch')}; DALI {env.get('dali')}; efficientnet-pytorch "
             f"{env.get('efficientnet_pytorch')}; Python {env.get('python')}; {env.get('cpu_cores')} CPU cores, "
             f"{env.get('workers')} loader workers; bf16 {env.get('bf16')}. Mode: "
             f"{'quick' if report['quick'] else 'full'}, budget {report['budget_s']:.0f} s, {report.get('seconds')} "
             "s used.", "", "## Steps", "", "| step | status | seconds | note |", "| --- | --- | ---: | --- |"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {(s['error'] or '').splitlines()[0]} |"
              if s["error"] else f"| {s['step']} | {s['status']} | {s['seconds']} |  |" for s in report["steps"]]
    for title, d in (("GPU tests without DALI", report.get("torch_tests")), ("DALI smoke", report.get("smoke")),
                     ("GPU tests with DALI", report.get("gpu_tests")), ("Reference recipe", report.get("recipe")),
                     ("Loader benchmark (--train) and the model-only ceiling", report.get("benchmark"))):
        lines += ["", f"## {title}", ""]
        if not d:
            lines.append("not run")
        elif "table" in d:  # a loader_speed.py run
            lines += [f"`{d['command']}`", "", "```", d["table"], "```"]
        elif "outcomes" in d:  # a pytest run
            lines += [d["summary"], *[f"- failed: {name}" for name in d["failed"]]]
        else:
            lines += ["| measure | value |", "| --- | --- |",
                      *[f"| {k} | {v} |" for k, v in d.items() if k != "stderr_tail"],
                      *[f"    {line}" for line in d.get("stderr_tail", [])]]
    lines += ["", "## Verdict", "", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {v['target']} | {v['measured'] or 'not measured'} | "
              f"{'n/a' if v['met'] is None else 'yes' if v['met'] else 'NO'} |" for v in report.get("verdict", [])]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Report folder (a few small files).")
@click.option("--budget-s", type=float, help=f"Stop all work within this many seconds. [default: "
                                             f"{BUDGET_GPU_S:.0f} on a GPU, {BUDGET_CPU_S:.0f} without one]")
@click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True)
@click.option("--quick", is_flag=True, help="Tiny sizes (for the CPU, and the test suite).")
@click.option("--work", "work_dir", type=click.Path(),
              help="Data and run folders. [default: a temporary folder, removed at the end]")
@click.option("--steps", "steps_text", help=f"Comma-separated steps, of {','.join(STEPS)}. [default: all]")
@click.option("--child", type=click.Choice(["recipe"]), hidden=True)
def main(out_dir, budget_s, device, quick, work_dir, steps_text, child):
    """Verify this machine's GPU path and measure it against the project's targets."""
    # Progress bars are for people at a terminal: here they would fill the log with redrawn lines. tqdm reads
    # this when it is imported (torch imports it): before anything imports either.
    os.environ["TQDM_DISABLE"] = "1"
    if child:
        return _recipe_child(Path(work_dir))
    if not out_dir:
        raise click.UsageError("--out DIR is required")
    asked = [t.strip() for t in (steps_text or ",".join(STEPS)).split(",") if t.strip()]
    if not asked or set(asked) - set(STEPS):
        raise click.BadParameter(f"{', '.join(set(asked) - set(STEPS)) or 'nothing'}: the steps are "
                                 f"{', '.join(STEPS)}", param_hint="--steps")
    steps = tuple(t for t in STEPS if t in asked)  # always in the check's order
    if budget_s is None:
        import torch

        budget_s = BUDGET_GPU_S if device != "cpu" and torch.cuda.is_available() else BUDGET_CPU_S
    out, work = Path(out_dir), Path(work_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.pick(quick)
    check = Check(out, work, budget_s, {"quick": quick, "budget_s": budget_s, "sizes": asdict(sizes),
                                        "steps_asked": list(steps), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        run_steps(check, sizes, device, steps)
    finally:
        if not work_dir:  # ours: do not leave data and runs behind
            shutil.rmtree(work, ignore_errors=True)
    check.say("\n" + markdown(json.loads((out / "report.json").read_text())))
    check.say(f"report: {out / 'report.md'}, {out / 'report.json'}; log: {out / 'gpu_check.log'}"
              + (f"; work: {work}" if work_dir else ""))
    failed = [s["step"] for s in check.steps if s["status"] == "failed"]
    if failed:  # the report says what each found; a script sees at once that something did not pass
        check.say(f"failed: {', '.join(failed)}")
        sys.exit(1)


def run_steps(check: Check, sizes: Sizes, device: str, steps: tuple[str, ...]) -> None:
    def step(name: str, fn, **kw):
        check.keep = keep_back(steps, name, check.budget_s)
        return check.step(TITLES[name], fn, **kw)

    env = step("env", lambda: environment(device), min_s=0, key="environment")
    gpu = bool(env and env["gpu"])
    check.on_cpu = not gpu
    needs_data = {"data", "smoke", "tests", "recipe", "bench"}.intersection(steps)  # the tests through the smoke
    data = step("data", lambda: synthetic_data(check.work, sizes)) if needs_data else None
    if "torch" in steps:
        step("torch", lambda: gpu_tests(check, TORCH_TESTS, "torch_tests.txt",
                                        extra=("--ignore", "tests/test_gpu.py")), min_s=20, key="torch_tests")
    if needs_data and data is None:
        for name in [n for n in steps if n in needs_data - {"data"}]:
            check.skip(TITLES[name], "no synthetic data")
        return
    dali = False
    if needs_data - {"data"}:  # the smoke decides what runs after it
        step("smoke", lambda: dali_smoke(check, data, sizes, device), min_s=10, key="smoke")
        smoke = check.steps[-1]
        dali = smoke["status"] == "ok"
        for name in [n for n in steps if n in NEEDS_DALI and not dali]:
            check.skip(TITLES[name], f"DALI smoke {smoke['status']}: {(smoke['error'] or '').splitlines()[0]}")
    if "tests" in steps and dali:
        step("tests", lambda: gpu_tests(check, DALI_TESTS, "gpu_tests.txt"), min_s=30, key="gpu_tests")
    if "recipe" in steps and dali:
        step("recipe", lambda: recipe(check, data, sizes, device), min_s=60, key="recipe")
    if "bench" in steps:
        step("bench", lambda: benchmark(check, data, sizes, device, BENCH_ROWS if dali else ["ceiling"],
                                        check.out / "benchmark.json"), min_s=30, key="benchmark")


if __name__ == "__main__":
    main()
