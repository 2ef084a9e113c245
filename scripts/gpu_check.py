"""Verify a GPU machine in one command: environment, GPU tests, the reference recipe, the GPU-only paths,
the loader benchmark.

    python scripts/gpu_check.py --out DIR [--budget-s S] [--device auto|gpu|cpu] [--quick] [--work DIR]
                                [--steps env,data,torch,smoke,tests,recipe,resume,paths,bench,compile]

Runs from a checkout with no install step and no network (the packages must already be importable; it
never calls pip). Steps run in order of value, each timed, each but the first in a process of its own
(its own process group, killed at its timeout), so that a crash, a native abort or a hang in one step
costs that step only. A failing step is recorded and the next one still runs; the whole check stops
itself within --budget-s (420 s on a GPU, 300 s without one, by default), and every step's timeout is
bounded by what is left. DIR/report.json and DIR/report.md are rewritten after every step, so that
whatever ends the check (a kill from outside included) leaves the finished steps' report behind.

--steps runs some steps only, against the same --work: for example `env,data` (the environment and the
synthetic data, which later calls with this --work reuse) and `torch` (what needs no DALI: the model-only
training-step ceiling and the GPU tests that do not import DALI); a later call without --steps then skips
the torch step done before with this --work and carries its result into its report. The DALI smoke step
(one batch through a mixed decoder and a GPU warp_affine) runs before every step that needs DALI: when
DALI does not import or the smoke fails, those steps are skipped with one verdict line, the exact error
in the report. The compile row runs only when asked (--steps ...,compile): its compilation takes
minutes that a check within one budget does not have.

Exit status: 0 when every step that ran passed, 1 when one failed (the report says what each found).

DIR receives only a few small files (report.md, report.json, gpu_check.log, gpu_tests.txt,
torch_tests.txt, benchmark.json, benchmark.png, benchmark-compile.json); data, run folders and checkpoints
go to --work (a temporary folder, removed at the end, by default).

--quick (with --device cpu in the test suite): tiny data and sizes, so that the script is exercised on
every CI run and cannot rot between the rare runs on a GPU machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
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

# The project's targets.
TARGET_RECIPE_S = 120.0          # the reference recipe's training, all included, on one H100
TARGET_DALI_OF_CEILING = 0.95    # DALI's training images/s against the no-loading ceiling
TARGET_DALI_OVER_TORCH = 5.0     # DALI's loading images/s against the torch loader at equal workers
# The whole check's budget when --budget-s is not given: 420 s on a GPU (a rented GPU's time is dear, and
# a rerun pays the start-up again); without a GPU (the quick run of the test suite) 300.
BUDGET_GPU_S = 420.0
BUDGET_CPU_S = 300.0
# Steps, in the order they run. The default is all but the compile row (see the module's docstring).
STEPS = ("env", "data", "torch", "smoke", "tests", "recipe", "resume", "paths", "bench", "compile")
DEFAULT_STEPS = STEPS[:-1]
NEEDS_DALI = frozenset({"tests", "recipe", "resume", "paths", "bench", "compile"})
# What the report calls each step.
TITLES = {"env": "environment", "data": "synthetic data", "torch": "torch: ceiling and GPU tests without DALI",
          "smoke": "DALI smoke", "tests": "GPU tests with DALI", "recipe": "reference recipe",
          "resume": "exact resume", "paths": "fp16 and --decoder cpu", "bench": "loader benchmark",
          "compile": "compile row"}
COMPILE_MIN_S = 60.0             # below this, the compile row cannot finish its compilation: skipped
# Seconds kept back, while a step runs, for the selected steps after it (what each needs at least): every
# child process's timeout is bounded by what is left minus this.
RESERVE_S = {"data": 20.0, "torch": 30.0, "smoke": 10.0, "tests": 40.0, "recipe": 60.0, "resume": 75.0,
             "paths": 30.0, "bench": 60.0, "compile": COMPILE_MIN_S}
PREDICT_RESERVE_S = 40.0         # predict of the test set, after the recipe's training
GPU_TESTS_MAX_S = 150.0          # the GPU tests' own timeout at most (they need 30-60 s without the slow ones)
# The model-only ceiling of the torch step: warm-up steps (cuDNN autotuning, allocator), then timed steps.
CEILING_WARMUP_STEPS, CEILING_STEPS = 10, 40
# pytest's selections: the torch step runs the GPU tests that need no DALI; the tests step the others. The
# end-to-end tests (marked slow: each starts dalipipe processes, with two CUDA contexts and checkpoints)
# stay out of the check, whose recipe, exact-resume and fp16 steps already train and predict on the GPU.
TORCH_TESTS = "gpu and not dali and not slow"
DALI_TESTS = "gpu and dali and not slow"
# Collecting a module imports it, deselected or not: the DALI GPU tests' module asks DALI for a GPU at
# import, which must not decide the tests that exist to run without DALI.
TORCH_TESTS_IGNORE = ("--ignore", "tests/test_gpu.py")
# Exact resume on a GPU: the same samples in the same order, losses equal within this relative difference
# (cuDNN's autotuner may pick other algorithms in the resumed process and some backward kernels add with
# atomics in any order, so the last bits differ and drift; on the CPU the run is bit-exact).
GPU_RESUME_LOSS_RTOL = 0.02


@dataclass(frozen=True)
class Sizes:
    """What each step runs on: the real recipe, or tiny sizes for --quick."""

    n_train: int
    n_test: int
    classes: int
    synth_size: int
    image_size: int
    epochs: int
    batch_size: int
    bench_limit: int
    bench_epochs: int

    @classmethod
    def pick(cls, quick: bool) -> "Sizes":
        if quick:
            return cls(n_train=120, n_test=40, classes=3, synth_size=32, image_size=32, epochs=2, batch_size=16,
                       bench_limit=64, bench_epochs=1)
        from dalipipe.config import AugmentSpec, TrainConfig
        from dalipipe.constants import REAL_N_TEST, REAL_N_TRAIN

        d = TrainConfig(images_dir="", labels_csv="", out_dir="")
        return cls(n_train=REAL_N_TRAIN, n_test=REAL_N_TEST, classes=9, synth_size=64,
                   image_size=AugmentSpec().image_size, epochs=d.epochs, batch_size=d.batch_size,
                   bench_limit=1024, bench_epochs=1)


# The GPU-only paths run on this small set, whatever the mode: they check behaviour, not speed.
PATHS = Sizes.pick(quick=True)
# 84 training samples at batch 16: 6 steps an epoch (5 of 16, one of 4). Checkpoints every 2 steps; the
# kill after global step 3 falls in epoch 1 of 3, after the checkpoint of step 2: the resumed run finishes
# that epoch and trains two whole ones after it, where a resume that mistook them for the partial one
# would go wrong.
RESUME_KILL_AT = 3
RESUME_EPOCHS = 3
RESUME_OPTS = ["--epochs", str(RESUME_EPOCHS), "--image-size", str(PATHS.image_size), "--batch-size",
               str(PATHS.batch_size), "--checkpoint-every", "2", "--workers", "2"]
RESUME_RUN_S = 90.0  # each of its three runs at most (bounded by what is left)


class Check:
    """Runs steps in order under one time budget; records each step's time, result or failure, and
    rewrites the report after every step."""

    def __init__(self, out: Path, work: Path, budget_s: float, report: dict):
        self.out, self.work, self.t0, self.budget_s = out, work, time.perf_counter(), budget_s
        self.report = report
        self.steps: list[dict] = []
        self.keep = 0.0  # seconds kept back for the steps after the current one (run_steps sets it)
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
            self.skip(name, f"time budget spent ({self.left():.0f} of {self.budget_s:.0f} s left, needs {min_s:.0f})")
            return None
        self.say(f"== {name} ({self.left():.0f} s of budget left)")
        t = time.perf_counter()
        try:
            result = fn()
            status, error = "ok", None
        except Exception as e:  # record and go on: the next step may still tell us something
            result, status, error = None, "failed", f"{type(e).__name__}: {e}"
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
        report["verdict"] = verdict(report)
        report = json.loads(json.dumps(report, default=str))  # paths and the like as strings
        save_json(report, self.out / "report.json")
        text = markdown(report)
        write_atomic(self.out / "report.md", lambda tmp: Path(tmp).write_text(text))

    def env(self, **extra: str) -> dict:
        return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    PYTHONWARNINGS="ignore", DALIPIPE_CACHE_DIR=str(self.work / "check-cache"), **extra)

    def run(self, cmd: list, timeout: float, env: dict | None = None,
            stdout_file: Path | None = None) -> subprocess.CompletedProcess:
        """cmd in a process group of its own, stopped at `timeout` or when only the time kept back for the
        later steps is left, whichever comes first (where that would leave under 10 s, the step, earlier and
        so worth more, may use the later steps' time up to the budget's end). stdout_file: its output goes
        there as it is written (what it wrote before a timeout stays), and the result's stdout is read back
        from it."""
        from dalipipe.child_processes import die_with_parent

        cmd = [str(c) for c in cmd]
        avail = self.left() - self.keep
        timeout = max(1.0, min(timeout, avail if avail >= 10 else self.left()))
        self.log.write(f"$ {' '.join(cmd)}  (timeout {timeout:.0f} s)\n")
        self.log.flush()
        sink = open(stdout_file, "w") if stdout_file else subprocess.PIPE
        # Its own process group, so that a timeout stops its children too (loader workers, benchmark rows).
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.PIPE, text=True,
                                env=env or self.env(), cwd=ROOT, start_new_session=True, preexec_fn=die_with_parent)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        if stdout_file:
            sink.close()
            out = Path(stdout_file).read_text(errors="replace")
        self.log.write(out[-20000:] + err[-20000:] + "\n")
        self.log.flush()
        if timed_out:
            raise StepTimeout(f"{' '.join(Path(c).name for c in cmd[1:4])} ran past its {timeout:.0f} s",
                              subprocess.CompletedProcess(cmd, -signal.SIGKILL, out, err))
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def dalipipe(self, *args, timeout: float, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        r = self.run([sys.executable, "-m", "dalipipe", *args], timeout, self.env(**env))
        if check and r.returncode != 0:
            raise RuntimeError(f"dalipipe {args[0]} exit {r.returncode}: {last_line(r.stderr)}")
        return r


class StepTimeout(RuntimeError):
    """A child process stopped at its timeout; `process` holds what it wrote until then."""

    def __init__(self, message: str, process: subprocess.CompletedProcess):
        super().__init__(message)
        self.process = process


class StepFailed(RuntimeError):
    """A step's failure that still carries what it measured."""

    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.partial = partial


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def environment(device_name: str) -> dict:
    import numpy
    import torch

    from dalipipe import device as dev
    from dalipipe.loading.loader_rules import default_workers

    def version(module: str) -> str | None:
        try:
            return __import__(module, fromlist=["__version__"]).__version__
        except Exception:
            return None

    device = dev.resolve(device_name)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "dali": version("nvidia.dali"), "efficientnet_pytorch": version("efficientnet_pytorch"),
            "numpy": numpy.__version__,
            **{name: version(name) for name in ("pandas", "sklearn", "six", "packaging", "pytest", "tqdm")},
            "cpu_cores": os.cpu_count(), "device": str(device),
            "gpu": None, "gpu_memory_gib": None, "driver": None, "bf16": dev.has_bf16(device),
            "workers": default_workers(),
            # the torch loader's workers hand batches over in shared memory: 224 px batches need room there
            "dev_shm_free_gib": _free_gib("/dev/shm"),
            # the tests import `tests.x`: another installed package named `tests` would shadow the project's
            "tests_package": _tests_package()}
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


def _free_gib(path: str) -> float | None:
    try:
        return round(shutil.disk_usage(path).free / 2**30, 1)
    except OSError:
        return None


def _tests_package() -> str | None:
    """Where `import tests` leads from the project's root, as pytest imports the test modules."""
    r = subprocess.run([sys.executable, "-c", "import tests; print(list(tests.__path__)[0])"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    return r.stdout.strip() or last_line(r.stderr) or None


# One line per test as pytest -v writes it when the test ends: "tests/x.py::name[param] PASSED [ 10%]".
_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", flags=re.M)


def gpu_tests(check: Check, marks: str, out_name: str, timeout: float, paths: tuple[str, ...] = ("tests",),
              extra: tuple[str, ...] = ()) -> dict:
    """`pytest -m MARKS -v` with its output written to DIR/out_name as each test ends, so that a step cut by
    its timeout still reports every test that finished, by name (the tests import pytest for their marks
    and fixtures: it must be installed)."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        raise RuntimeError("pytest is not installed here (pip install pytest): the GPU tests need it") from None
    cmd = [sys.executable, "-m", "pytest", "-m", marks, "-v", "-rfEs", "-p", "no:cacheprovider", *extra, *paths]
    env = check.env(PYTHONUNBUFFERED="1")
    cut = None
    try:
        r = check.run(cmd, timeout=timeout, env=env, stdout_file=check.out / out_name)
    except StepTimeout as e:
        r, cut = e.process, str(e)
    outcomes = dict(_OUTCOME.findall(r.stdout))
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    failed = [name for name, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
    tail = f"cut: {cut}; {len(outcomes)} test(s) finished" if cut else (last_line(r.stdout) or r.stderr[-300:])
    result = {"marks": marks, "exit_code": r.returncode, "summary": tail, "counts": counts, "failed": failed,
              "outcomes": outcomes, "cut": cut is not None}
    # exit 5: nothing selected (a machine without such tests) is not a failure
    if cut or failed or r.returncode not in (0, 5):
        raise StepFailed(f"GPU tests ({marks}): {tail}", result)
    return result


def model_ceiling(check: Check, sizes: Sizes, device: str) -> dict:
    """The training step alone, in a child process: efficientnet-b1 at the recipe's image size and batch,
    with the device's precision, channels_last and fused Adam, on tensors already on the device. The upper
    bound of what any loader lets the recipe reach, measured without DALI."""
    job = {"device": device, "image_size": sizes.image_size, "batch_size": sizes.batch_size,
           "classes": sizes.classes, "result": str(check.work / "ceiling.json")}
    job_file = check.work / "ceiling-job.json"
    job_file.write_text(json.dumps(job))
    r = check.run([sys.executable, __file__, "--child", "ceiling", "--work", job_file], timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"ceiling exit {r.returncode}: {last_line(r.stderr)}")
    return json.loads(Path(job["result"]).read_text())


def _ceiling_child(job_file: Path) -> None:
    import torch
    import torch.nn.functional as F

    from dalipipe import device as dev
    from dalipipe.atomic import save_json
    from dalipipe.loading.loader_rules import default_threads, default_workers
    from dalipipe.model import build_model
    from dalipipe.run.train import train_step
    from dalipipe.run.train_setup import make_optimizer

    job = json.loads(Path(job_file).read_text())
    device = dev.resolve(job["device"])
    t = time.perf_counter()
    model = dev.place_model(build_model(job["classes"]), device)
    dev.configure(device, default_threads(default_workers()))  # as `dalipipe train`
    opt = make_optimizer(model, 1e-3, 1e-6, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.needs_grad_scaler(device))
    n, size = job["batch_size"], job["image_size"]
    x = dev.batch_layout(torch.randn(n, 3, size, size, device=device), device)
    y = torch.randint(0, job["classes"], (n,), device=device)
    build_s = time.perf_counter() - t

    def step():  # the training loop's own step
        train_step(model, x, y, opt=opt, scaler=scaler, device=device, precision="auto", loss_fn=F.cross_entropy)

    model.train()
    for _ in range(CEILING_WARMUP_STEPS):
        step()
    dev.synchronize(device)
    t = time.perf_counter()
    for _ in range(CEILING_STEPS):
        step()
    dev.synchronize(device)
    seconds = time.perf_counter() - t
    amp = dev.amp_dtype(device)
    save_json({"device": str(device), "image_size": size, "batch_size": n, "precision": str(amp or "fp32"),
               "channels_last": device.type == "cuda", "fused_adam": device.type == "cuda",
               "model_build_s": round(build_s, 2), "step_ms": round(1000 * seconds / CEILING_STEPS, 2),
               "images_per_s": round(n * CEILING_STEPS / seconds, 1),
               "peak_device_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
               if device.type == "cuda" else None}, job["result"])


def torch_step(check: Check, sizes: Sizes, device: str) -> dict:
    """What needs no DALI: the model-only ceiling, then the GPU tests that do not import DALI. A number for
    the recipe's upper bound even when DALI fails."""
    out: dict = {}
    failures = []
    for key, run in (("ceiling", lambda: model_ceiling(check, sizes, device)),
                     ("gpu_tests", lambda: gpu_tests(check, TORCH_TESTS, "torch_tests.txt", 60.0,
                                                     extra=TORCH_TESTS_IGNORE))):
        try:
            out[key] = run()
        except Exception as e:  # the other half may still tell us something
            out[key] = getattr(e, "partial", None)
            failures.append(f"{key}: {type(e).__name__}: {e}")
    if failures:
        raise StepFailed("; ".join(failures), out)
    return out


def dali_smoke(check: Check, device: str) -> dict:
    """One batch through the pipeline dalipipe trains with (three mixed decoders and a GPU warp_affine on a
    GPU; CPU operators without one), on two tiny samples, in a child process: the exact error if it fails
    (a native abort included)."""
    job = {"device": device, "folder": str(check.work / "smoke"), "result": str(check.work / "smoke.json")}
    job_file = check.work / "smoke-job.json"
    job_file.write_text(json.dumps(job))
    r = check.run([sys.executable, __file__, "--child", "smoke", "--work", job_file], timeout=90)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        raise StepFailed(f"DALI smoke exit {r.returncode}: {last_line(r.stderr)}",
                         {"exit_code": r.returncode, "stderr_tail": lines[-15:]})
    return json.loads(Path(job["result"]).read_text())


def _smoke_child(job_file: Path) -> None:
    import numpy as np
    from PIL import Image

    job = json.loads(Path(job_file).read_text())
    import nvidia.dali  # first: an import failure is the answer, in its own words

    from dalipipe import device as dev
    from dalipipe.atomic import save_json
    from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
    from dalipipe.data.index import scan_images
    from dalipipe.loading.loaders import make_loader

    folder = Path(job["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for fid in (1, 2):
        for channel in ("yellow", "red", "blue"):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{fid:05d}_{channel}.png")
    device = dev.resolve(job["device"])
    t = time.perf_counter()
    loader = make_loader(scan_images(folder), np.arange(2), spec=AugmentSpec(image_size=32),
                         norm=Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), train=True, device=device,
                         settings=LoaderSettings(kind="dali", batch_size=2, workers=1, seed=0))
    images, targets = next(iter(loader))
    ok = images.shape == (2, 3, 32, 32) and images.device.type == device.type and bool(images.isfinite().all())
    loader.close()
    save_json({"dali": nvidia.dali.__version__, "device": str(images.device), "shape": list(images.shape),
               "seconds": round(time.perf_counter() - t, 2), "ok": ok}, job["result"])
    if not ok:
        raise SystemExit(f"DALI smoke: unexpected batch {tuple(images.shape)} on {images.device}")


def synthetic_data(work: Path, sizes: Sizes) -> Path:
    from dalipipe.data.synthetic import generate
    from dalipipe.settings import SynthSpec

    path = work / f"synthetic-{sizes.n_train}-{sizes.synth_size}"
    if not (path / "y_test.csv").exists():
        generate(path, SynthSpec(n_train=sizes.n_train, n_test=sizes.n_test, n_classes=sizes.classes,
                                 image_size=sizes.synth_size, seed=0), force=True)
    return path


def project_recipe(setup_s: float, epoch_walls: list[float], epochs: int, steps_per_epoch: int,
                   partial_steps: int, partial_s: float) -> tuple[float | None, str]:
    """The whole recipe's training time from what a stopped run measured, with how it was projected.
    Whole-epoch wall times hold everything an epoch costs the loop (steps, validation, the hand-off of its
    checkpoint and records, and any wait for the previous checkpoint's write), so per-epoch costs count
    once per epoch. The first epoch also pays the warm-ups (cuDNN autotuning,
    DALI's first batches): it counts once, the later epochs' mean for the rest."""
    if len(epoch_walls) >= 2:
        rest = statistics.mean(epoch_walls[1:])
        return (setup_s + epoch_walls[0] + (epochs - 1) * rest,
                f"start-up + epoch 1 + {epochs - 1} x the mean of epochs 2-{len(epoch_walls)}")
    if len(epoch_walls) == 1:
        return setup_s + epochs * epoch_walls[0], f"start-up + {epochs} x epoch 1 (with its warm-up: high)"
    if partial_steps:
        return (setup_s + epochs * steps_per_epoch * partial_s / partial_steps,
                "training steps only, validation and epoch-end writes not measured: a lower bound")
    return None, "no training step finished"


def recipe(check: Check, data: Path, sizes: Sizes, device: str, reserve_s: float) -> dict:
    """`dalipipe train` with the recipe's defaults, then `dalipipe predict` of the test set, in a child
    process with its own timeout; the projection when the budget stopped it. reserve_s: kept for the steps
    after it."""
    run = Path(tempfile.mkdtemp(prefix="recipe-", dir=check.work))
    # The child's time limit; past it the child still finishes its step, saves, and predicts (30 s of margin).
    limit_s = max(10.0, check.left() - reserve_s - PREDICT_RESERVE_S - 30)
    job = {"data": str(data), "run": str(run), "sizes": asdict(sizes), "device": device, "limit_s": limit_s,
           "result": str(run / "recipe.json")}
    job_file = check.work / "recipe-job.json"
    job_file.write_text(json.dumps(job))
    t = time.perf_counter()
    failure = None
    try:
        # Past the time limit the child still finishes its step, saves, and predicts.
        r = check.run([sys.executable, __file__, "--child", "recipe", "--work", job_file],
                      timeout=limit_s + PREDICT_RESERVE_S + 30)
        if r.returncode != 0:
            failure = f"exit {r.returncode}: {last_line(r.stderr)}"
    except StepTimeout as e:
        failure = str(e)
    process_s = time.perf_counter() - t
    if not Path(job["result"]).exists():
        raise RuntimeError(failure or "the recipe wrote no result")
    res = json.loads(Path(job["result"]).read_text())
    out = summarize_recipe(res, sizes)
    out["process_s"] = round(process_s, 1)
    if failure:
        raise StepFailed(f"recipe: {failure}", out)
    return out


def summarize_recipe(res: dict, sizes: Sizes) -> dict:
    history, timings = res["history"], res["timings"]
    walls = res["epoch_walls"]
    out = {"epochs_planned": sizes.epochs, "epochs_done": len(history), "stopped_early": res["stopped_early"],
           "train_wall_s": round(res["train_wall_s"], 1),
           **{k: round(v, 1) for k, v in timings.items()},
           "setup_s": round(res["setup_s"], 1),
           "epoch_wall_s": [round(w, 2) for w in walls],
           # what an epoch costs the loop besides its steps and validation: handing its checkpoint and records
           # to the background writer (and waiting, when the previous checkpoint is still being written)
           "epoch_records_s": round(statistics.mean(w - h["epoch_seconds"] for w, h in zip(walls, history)), 2)
           if walls else None,
           "train_images_per_s": round(statistics.mean(h["train_images_per_s"] for h in history[1:] or history), 1)
           if history else None,
           "val_balanced_accuracy_best": round(res["best_val_balanced_accuracy"], 4) if history else None,
           "peak_device_memory_mb": res.get("peak_device_memory_mb")}
    if "predict_s" in res:
        out["predict_s"] = round(res["predict_s"], 1)
        out["test_balanced_accuracy"] = round(res["test_balanced_accuracy"], 4)
    if res["stopped_early"]:
        projected, basis = project_recipe(res["setup_s"], walls, sizes.epochs, res["steps_per_epoch"],
                                          res["partial_steps"], res["partial_train_s"])
        out["steps_done_in_last_epoch"] = res["partial_steps"]
        # plus the last writes, which the run waits for at its end
        projected = None if projected is None else projected + timings.get("record_wait_s", 0.0)
        out["projected_recipe_s"] = None if projected is None else round(projected, 1)
        out["projection"] = basis
    return out


def _recipe_child(job_file: Path) -> None:
    """Child: train with the recipe's defaults under the time limit, then predict; the result is written
    after training and again after predict, so that a failure in predict keeps the training figures."""
    import torch

    from dalipipe.atomic import save_json
    from dalipipe.config import AugmentSpec, TrainConfig
    from dalipipe.infer.predict import predict
    from dalipipe.infer.score import score
    from dalipipe.run.train import train
    from dalipipe.settings import PredictSettings

    job = json.loads(Path(job_file).read_text())
    data, run, sizes = Path(job["data"]), Path(job["run"]), Sizes(**job["sizes"])
    cfg = TrainConfig(images_dir=str(data / "images_train"), labels_csv=str(data / "y_train.csv"), out_dir=str(run),
                      epochs=sizes.epochs, batch_size=sizes.batch_size, device=job["device"],
                      augment=AugmentSpec(image_size=sizes.image_size), time_limit_minutes=job["limit_s"] / 60)
    t = time.perf_counter()
    trained = train(cfg)
    result = {**trained.to_dict(), "train_wall_s": time.perf_counter() - t}
    if torch.cuda.is_available() and job["device"] != "cpu":
        # torch's allocator; DALI's own pools are apart (the benchmark's device column counts both)
        result["peak_device_memory_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    save_json(result, job["result"])
    if trained.history:  # a run stopped before its first epoch's end has no best.pt to predict with
        t = time.perf_counter()
        sub = run / "submission.csv"
        predict(PredictSettings(checkpoints=(str(run),), images_dir=str(data / "images_test"), out_csv=str(sub),
                                device=job["device"], batch_size=sizes.batch_size))
        result["predict_s"] = time.perf_counter() - t
        result["test_balanced_accuracy"] = score(str(sub), str(data / "y_test.csv"))
        save_json(result, job["result"])


def sample_log(folder: Path) -> dict[int, list[int]]:
    """DALIPIPE_SAMPLE_LOG's record of rank 0: epoch -> the file ids trained on, in order (appended)."""
    out: dict[int, list[int]] = {}
    for line in (folder / "rank0.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["epoch"], []).extend(row["file_ids"])
    return out


def exact_resume(check: Check, data: Path, device: str, gpu: bool) -> dict:
    """A run killed mid-epoch (SIGKILL) and resumed, against its uninterrupted twin: the same samples in the
    same order, and losses equal (bit for bit on the CPU; within GPU_RESUME_LOSS_RTOL on a GPU)."""
    from dalipipe.run_state import SavedRun

    base = [data / "images_train", data / "y_train.csv", *RESUME_OPTS, "--device", device]
    twin, run = check.work / "resume-twin", check.work / "resume-run"
    logs = {name: check.work / f"samples-{name}" for name in ("twin", "run")}
    for path in (twin, run, *logs.values()):
        shutil.rmtree(path, ignore_errors=True)
    check.dalipipe("train", *base, "--out", twin, timeout=RESUME_RUN_S, DALIPIPE_SAMPLE_LOG=str(logs["twin"]))
    r = check.dalipipe("train", *base, "--out", run, timeout=RESUME_RUN_S, check=False,
                       DALIPIPE_SAMPLE_LOG=str(logs["run"]), DALIPIPE_KILL_AT_STEP=str(RESUME_KILL_AT))
    if r.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run to be killed at step {RESUME_KILL_AT} ended with exit {r.returncode}")
    saved = SavedRun.read(run / "last.pt")
    check.dalipipe("train", "--resume", run, timeout=RESUME_RUN_S, DALIPIPE_SAMPLE_LOG=str(logs["run"]))
    a, b = sample_log(logs["twin"]), sample_log(logs["run"])
    # The killed process ended inside epoch 1 (a rank logs its samples at an epoch's end): the resumed one
    # logs epoch 1 from the step after the checkpoint on, then the later epochs whole.
    resumed = b.get(1, [])
    skipped = saved.partial_steps * PATHS.batch_size  # the steps before the checkpoint: not trained again
    same_samples = (len(resumed) > 0 and len(a.get(1, [])) - len(resumed) == skipped
                    and a.get(1, [])[-len(resumed):] == resumed
                    and all(a.get(e) == b.get(e) for e in range(2, RESUME_EPOCHS + 1)))
    metrics = [[json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()] for path in (twin, run)]
    diffs = [abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(*metrics) for k in ("train_loss", "val_loss")]
    wa, wb = SavedRun.read(twin / "last.pt").model, SavedRun.read(run / "last.pt").model
    weights_diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].is_floating_point())
    rtol = GPU_RESUME_LOSS_RTOL if gpu else 0.0
    out = {"killed_at_global_step": RESUME_KILL_AT, "resumed_from": {"epoch": saved.card.epoch + 1, "steps": saved.partial_steps},
           "same_samples_same_order": same_samples, "epochs_compared": len(diffs) // 2,
           "max_loss_rel_diff": max(diffs) if diffs else None, "loss_rtol": rtol,
           "max_weight_abs_diff": weights_diff}
    if not same_samples or len(metrics[0]) != len(metrics[1]) or not diffs or max(diffs) > rtol:
        raise StepFailed("the resumed run differs from its twin", out)
    return out


def precision_and_decoder(check: Check, data: Path, device: str, gpu: bool) -> dict:
    """One epoch through `train` with the fp16 + GradScaler path forced (--precision fp16; on the CPU,
    where fp16 is refused with a one-line error, fp32) and DALI decoding on the CPU (--decoder cpu)."""
    from dalipipe.run_state import SavedRun

    precision = "fp16" if gpu else "fp32"
    run = check.work / "fp16-cpudec"
    shutil.rmtree(run, ignore_errors=True)
    check.dalipipe("train", data / "images_train", data / "y_train.csv", "--out", run, "--epochs", "1",
                   "--image-size", str(PATHS.image_size), "--batch-size", str(PATHS.batch_size), "--device", device,
                   "--precision", precision, "--decoder", "cpu", timeout=90)
    saved = SavedRun.read(run / "last.pt")
    row = saved.progress.history[0]
    out = {"precision": precision, "decoder": "cpu", "train_loss": row["train_loss"], "val_loss": row["val_loss"],
           "grad_scaler_scale": float(saved.scaler["scale"]) if saved.scaler else None}
    if not gpu:  # the option's promise on the CPU: a one-line error, exit 2
        r = check.dalipipe("train", data / "images_train", data / "y_train.csv", "--out", check.work / "fp16-cpu",
                           "--precision", "fp16", "--device", "cpu", timeout=60, check=False)
        out["fp16_on_cpu"] = f"exit {r.returncode}: {last_line(r.stderr)}"
        if r.returncode != 2:
            raise StepFailed("--precision fp16 on the CPU was not refused with exit 2", out)
    if not all(math.isfinite(row[k]) for k in ("train_loss", "val_loss")):
        raise StepFailed("non-finite loss", out)
    if gpu and out["grad_scaler_scale"] is None:
        raise StepFailed("--precision fp16 ran without a gradient scaler", out)
    return out


def benchmark(check: Check, data: Path, sizes: Sizes, device: str, rows: list[str], name: str, plot: Path,
              timeout: float) -> dict:
    json_out = check.out / f"{name}.json"
    cmd = [sys.executable, ROOT / "benchmarks" / "loader_speed.py", "--train", "--data", data, "--device", device,
           "--limit", sizes.bench_limit, "--epochs", sizes.bench_epochs, "--image-size", sizes.image_size,
           "--batch-size", sizes.batch_size, "--json", json_out, "--plot", plot, *[a for r in rows for a in ("--rows", r)]]
    failure, table_text = None, ""
    try:
        r = check.run(cmd, timeout=timeout)
        failure = None if r.returncode == 0 else f"loader_speed.py exit {r.returncode}: {last_line(r.stderr)}"
        table_text = r.stdout.strip()
    except StepTimeout as e:  # the rows it finished are in the JSON
        failure = str(e)
    if not json_out.exists():
        raise RuntimeError(failure or "loader_speed.py wrote no results")
    results = json.loads(json_out.read_text())["results"]
    summary = {f"{x['row']}_{'train' if x['train'] else 'load'}_images_per_s": round(x["images_per_s"], 1)
               for x in results}
    summary.update({f"{x['row']}_train_data_wait": round(x["data_wait_fraction"], 4) for x in results if x["train"]})
    summary.update({f"{x['row']}_{'train' if x['train'] else 'load'}_device_mb": x["peak_device_memory_mb"]
                    for x in results if x.get("peak_device_memory_mb") is not None})
    out = {"command": " ".join(str(c) for c in cmd[1:]), "table": table_text or json.dumps(summary, indent=1),
           "summary": summary, "rows_done": len(results), "workers": results[0]["workers"] if results else None}
    if failure:
        raise StepFailed(f"benchmark incomplete ({failure}); {len(results)} row(s) finished", out)
    return out


def verdict(report: dict) -> list[dict]:
    rec = report.get("recipe") or {}
    bench = (report.get("benchmark") or {}).get("summary", {})
    on_gpu = bool((report.get("environment") or {}).get("gpu"))  # the targets are a GPU's: n/a elsewhere
    applies = on_gpu and not report["quick"]
    rows = []
    smoke = next((x for x in report["steps"] if x["step"] == "DALI smoke"), None)
    if smoke is not None and smoke["status"] != "skipped":
        # One line for what DALI's failure costs: every step that needs it is skipped, not failed in turn.
        # Say what ran on this device: on a machine without a GPU the smoke runs DALI's CPU operators only.
        what = ("three mixed decoders and a GPU warp_affine" if on_gpu else
                "CPU decoders and a CPU warp_affine: no GPU here, its mixed and GPU operators not tried")
        rows.append({"target": f"DALI's training pipeline runs one batch on this machine ({what})",
                     "measured": "ok" if smoke["status"] == "ok" else
                     f"{smoke['error']}; the steps that need DALI were skipped",
                     "met": smoke["status"] == "ok"})
    finished = rec and not rec.get("stopped_early")
    recipe_s = rec.get("train_wall_s") if finished else rec.get("projected_recipe_s")
    lower_bound = "lower bound" in (rec.get("projection") or "")
    met = None
    if recipe_s is not None and applies:
        # A lower bound over the target is a sure miss; under it, it proves nothing.
        met = recipe_s <= TARGET_RECIPE_S if not lower_bound else (False if recipe_s > TARGET_RECIPE_S else None)
    rows.append({"target": f"reference recipe (training, all included) <= {TARGET_RECIPE_S:.0f} s on one H100",
                 "measured": None if recipe_s is None else
                 f"{recipe_s:.0f} s" + ("" if finished else f" (projected: {rec.get('projection')})")
                 + (" (quick sizes: not the recipe)" if report["quick"] else ""), "met": met})
    dali_t, ceil_t = bench.get("dali_train_images_per_s"), bench.get("ceiling_train_images_per_s")
    ratio = dali_t / ceil_t if dali_t and ceil_t else None
    rows.append({"target": f"DALI in training >= {TARGET_DALI_OF_CEILING:.0%} of the ceiling",
                 "measured": None if ratio is None else f"{ratio:.1%}",
                 "met": None if ratio is None or not applies else ratio >= TARGET_DALI_OF_CEILING})
    dali_l, torch_l = bench.get("dali_load_images_per_s"), bench.get("torch_load_images_per_s")
    ratio = dali_l / torch_l if dali_l and torch_l else None
    rows.append({"target": f"DALI loading >= {TARGET_DALI_OVER_TORCH:.0f}x the torch loader (same workers)",
                 "measured": None if ratio is None else f"{ratio:.2f}x",
                 "met": None if ratio is None or not applies else ratio >= TARGET_DALI_OVER_TORCH})
    return rows


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    if env.get("gpu"):
        device = f"{env['gpu']}, {env['gpu_memory_gib']} GiB; driver {env['driver']}; CUDA {env['cuda']}"
    else:
        device = f"no GPU ({env.get('device', 'device unknown')})"
    lines = [f"# gpu_check report ({report.get('finished')})", "",
             f"Device: {device}; torch {env.get('torch')}; DALI {env.get('dali')}; "
             f"efficientnet-pytorch {env.get('efficientnet_pytorch')}; Python {env.get('python')}; "
             f"{env.get('cpu_cores')} CPU cores, {env.get('workers')} loader workers; bf16 {env.get('bf16')}. "
             f"Mode: {'quick' if report['quick'] else 'full'}, budget {report['budget_s']:.0f} s, "
             f"{report.get('seconds')} s used.", "",
             "## Steps", "", "| step | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for s in report["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {(s['error'] or '').splitlines()[0] if s['error'] else ''} |")

    def table(title: str, d: dict | None) -> list[str]:
        if not d:
            return ["", f"## {title}", "", "not run"]
        return ["", f"## {title}", "", "| measure | value |", "| --- | --- |",
                *[f"| {k} | {v} |" for k, v in d.items() if k not in ("table", "summary")]]

    torch_part = report.get("torch") or {}
    lines += table("Model-only training-step ceiling (no DALI)", torch_part.get("ceiling"))
    smoke = report.get("smoke") or {}
    lines += table("DALI smoke", {k: v for k, v in smoke.items() if k != "stderr_tail"})
    lines += [f"    {line}" for line in smoke.get("stderr_tail", [])]
    for title, tests in (("GPU tests without DALI", torch_part.get("gpu_tests") or {}),
                         ("GPU tests with DALI", report.get("gpu_tests") or {})):
        lines += ["", f"## {title}", "", f"{tests.get('summary', 'not run')}"]
        lines += [f"- failed: {f}" for f in tests.get("failed", [])]
    lines += table("Reference recipe", report.get("recipe"))
    lines += table("Exact resume", report.get("exact_resume"))
    lines += table("Precision and decoder paths", report.get("precision_decoder"))
    for key, title in (("benchmark", "Loader benchmark (--train)"), ("benchmark_compile", "torch.compile row")):
        bench = report.get(key) or {}
        lines += ["", f"## {title}", "", f"`{bench.get('command', 'not run')}`", "", "```", bench.get("table", ""), "```"]
    lines += ["", "## Verdict", "", "| target | measured | met |", "| --- | --- | --- |"]
    for v in report.get("verdict", []):
        met = "n/a" if v["met"] is None else "yes" if v["met"] else "NO"
        lines.append(f"| {v['target']} | {v['measured'] or 'not measured'} | {met} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Report folder (a few small files).")
@click.option("--budget-s", type=float,
              help=f"Stop all work within this many seconds. [default: {BUDGET_GPU_S:.0f} on a GPU, "
                   f"{BUDGET_CPU_S:.0f} without one]")
@click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True)
@click.option("--quick", is_flag=True, help="Tiny sizes (for the CPU, and the test suite).")
@click.option("--work", "work_dir", type=click.Path(), help="Data and run folders. [default: a temporary folder, removed at the end]")
@click.option("--steps", "steps_text", help=f"Comma-separated steps to run, of {','.join(STEPS)}. "
                                             f"[default: all but compile]")
@click.option("--child", type=click.Choice(["recipe", "ceiling", "smoke"]), hidden=True)
def main(out_dir, budget_s, device, quick, work_dir, steps_text, child):
    """Verify this machine's GPU path and measure it against the project's targets."""
    if child:
        return {"recipe": _recipe_child, "ceiling": _ceiling_child, "smoke": _smoke_child}[child](Path(work_dir))
    if not out_dir:
        raise click.UsageError("--out DIR is required")
    steps = parse_steps(steps_text)
    if budget_s is None:
        import torch

        budget_s = BUDGET_GPU_S if device != "cpu" and torch.cuda.is_available() else BUDGET_CPU_S
    # Progress bars are for people at a terminal: here they would fill the log (and the steps' output)
    # with redrawn lines. tqdm reads this in this process and in every step's.
    os.environ["TQDM_DISABLE"] = "1"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.pick(quick)
    report: dict = {"quick": quick, "budget_s": budget_s, "sizes": asdict(sizes), "steps_asked": list(steps),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    check = Check(out, work, budget_s, report)
    try:
        run_steps(check, sizes, device, steps, explicit=steps_text is not None)
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


def parse_steps(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_STEPS
    asked = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in asked if t not in STEPS]
    if unknown or not asked:
        raise click.BadParameter(f"{', '.join(unknown) or 'nothing'}: the steps are {', '.join(STEPS)}",
                                 param_hint="--steps")
    return tuple(t for t in STEPS if t in asked)  # always in the check's order


def run_steps(check: Check, sizes: Sizes, device: str, steps: tuple[str, ...], explicit: bool) -> None:
    def reserve(after: str) -> float:
        """What the selected steps after this one need at least."""
        later = STEPS[STEPS.index(after) + 1:]
        return sum(RESERVE_S.get(name, 0.0) for name in later if name in steps)

    def step(name: str, fn, **kw):
        check.keep = reserve(name)
        return check.step(TITLES[name], fn, **kw)

    # What a torch step's result was measured on: carried over only to a call on the same.
    measured_on = {"device": device, "quick": sizes == Sizes.pick(True), "sizes": asdict(sizes)}
    done_file = check.work / "torch-step.json"
    env = step("env", lambda: environment(device), min_s=0, key="environment")
    gpu = bool(env and env["gpu"])
    data = small = None
    if "data" in steps or any(name in steps for name in ("recipe", "resume", "paths", "bench", "compile")):
        check.keep = reserve("data")
        data = check.step("synthetic data", lambda: synthetic_data(check.work, sizes))
        small = check.step("small data", lambda: synthetic_data(check.work, PATHS), min_s=2)
    if "torch" in steps:
        earlier = json.loads(done_file.read_text()) if done_file.exists() else None
        if not explicit and earlier and earlier.get("measured_on") == measured_on:
            # Done by an earlier call with this --work (its report came back with it): carried over.
            check.report["torch"] = earlier["result"]
            check.skip(TITLES["torch"], "done by an earlier call with this --work (result carried over from "
                                        f"{done_file.name}; its test log is in that call's --out)")
        else:
            result = step("torch", lambda: torch_step(check, sizes, device), min_s=20, key="torch")
            if result is not None and check.steps[-1]["status"] == "ok":
                done_file.write_text(json.dumps({"measured_on": measured_on, "result": result}))
    if not NEEDS_DALI.intersection(steps) and "smoke" not in steps:
        return
    step("smoke", lambda: dali_smoke(check, device), min_s=10, key="smoke")
    if check.steps[-1]["status"] != "ok":
        why = f"DALI smoke {check.steps[-1]['status']}: {(check.steps[-1]['error'] or '').splitlines()[0]}"
        for name in steps:
            if name in NEEDS_DALI:
                check.skip(TITLES[name], why)
        return
    if "tests" in steps:
        step("tests", lambda: gpu_tests(check, DALI_TESTS, "gpu_tests.txt", GPU_TESTS_MAX_S), min_s=30,
             key="gpu_tests")
    if "recipe" in steps and data is not None:
        step("recipe", lambda: recipe(check, data, sizes, device, reserve("recipe")),
             min_s=30 + PREDICT_RESERVE_S, key="recipe")
    if "resume" in steps and small is not None:
        step("resume", lambda: exact_resume(check, small, device, gpu), min_s=30, key="exact_resume")
    if "paths" in steps and small is not None:
        step("paths", lambda: precision_and_decoder(check, small, device, gpu), min_s=15, key="precision_decoder")
    if "bench" in steps and data is not None:
        rows = ["torch", "dali", "dali-cpudec", "dali-cache", "ceiling"]
        step("bench", lambda: benchmark(check, data, sizes, device, rows, "benchmark", check.out / "benchmark.png",
                                        check.left() - reserve("bench")), min_s=30, key="benchmark")
    if "compile" in steps:
        if not gpu:
            check.skip(TITLES["compile"], "no GPU: inductor compiles for minutes on a CPU")
        elif data is not None:
            step("compile", lambda: benchmark(check, data, sizes, device, ["ceiling-compile"], "benchmark-compile",
                                              check.work / "compile.png", check.left() - 2),
                 min_s=COMPILE_MIN_S, key="benchmark_compile")
    elif not explicit:
        check.skip(TITLES["compile"], "not in the default steps: its compilation takes minutes that a check "
                                      "within one budget does not have; ask for it with --steps ...,compile")


if __name__ == "__main__":
    main()
