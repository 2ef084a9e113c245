"""Verify a GPU machine in one command: `python scripts/gpu_check.py --out DIR` (CONTRIBUTING.md: the steps).

Each step runs what the project has (`pytest -m gpu`, benchmarks/loader_speed.py, train and predict) in a
process group of its own, killed at its timeout, a share of --budget-s: a crash or a hang costs one step.
DIR/report.json and report.md are rewritten after every step. --quick: tiny sizes, with which the test suite
runs the check on the CPU, so that it cannot rot between the rare runs on a GPU machine.
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
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# Light modules only (no torch, nor tqdm, which reads TQDM_DISABLE when it is imported: main sets it first).
from dalipipe.atomic import save_json, write_atomic  # noqa: E402
from dalipipe.child_processes import die_with_parent  # noqa: E402
from dalipipe.config import AugmentSpec, TrainConfig  # noqa: E402
from dalipipe.constants import REAL_N_TEST, REAL_N_TRAIN  # noqa: E402
from dalipipe.settings import PredictSettings, SynthSpec  # noqa: E402
from dalipipe.versions import versions  # noqa: E402

TARGET_RECIPE_S = 120.0          # the reference recipe's training, all included, on one H100
TARGET_DALI_OF_CEILING = 0.95    # DALI's training images/s against the no-loading ceiling
TARGET_DALI_OVER_TORCH = 5.0     # DALI's loading images/s against the torch loader at equal workers
BUDGET_GPU_S, BUDGET_CPU_S = 420.0, 300.0  # a rented GPU's time is dear, and a rerun pays the start-up again
STEPS = {"env": "environment", "data": "synthetic data", "torch": "GPU tests without DALI", "smoke": "DALI smoke",
         "tests": "GPU tests with DALI", "recipe": "reference recipe", "bench": "loader benchmark"}
# Each step's share of the budget among the selected steps' (the environment takes seconds). While a step
# runs, the shares of the selected steps after it are kept back; what it leaves unused goes to them.
SHARES = {"env": 0.0, "data": 0.05, "torch": 0.07, "smoke": 0.05, "tests": 0.25, "recipe": 0.38, "bench": 0.2}
RECIPE_TRAIN_SHARE = 0.7  # of the recipe step's time, its --time-limit; the rest ends its step and predicts
# The end-to-end GPU tests (slow) stay out: the recipe trains and predicts on the GPU. Collecting a module
# imports it, and the DALI GPU tests' module asks DALI for a GPU at import: the torch step leaves it out.
TORCH_TESTS, DALI_TESTS = "gpu and not dali and not slow", "gpu and dali and not slow"
BENCH_ROWS = ["torch", "dali", "dali-cpudec", "torch-store", "dali-store", "ceiling"]  # loader_speed.py runs those that apply
SMOKE_SAMPLES = 32
QUICK_SIZES = dict(n_train=120, n_test=40, classes=3, synth_size=32, image_size=32, epochs=2, batch_size=16,
                   bench_limit=64)


class StepFailed(RuntimeError):
    """A failure that keeps what the step measured (partial) or what its process wrote (process)."""

    def __init__(self, message: str, partial: dict | None = None, process=None):
        super().__init__(message)
        self.partial, self.process = partial, process


class StepTimeout(StepFailed):
    pass


class Check:
    """Runs steps under one time budget, and rewrites the report after every step."""

    def __init__(self, out: Path, work: Path, budget_s: float, report: dict, selected: tuple = tuple(STEPS)):
        self.out, self.work, self.t0, self.budget_s, self.report = out, work, time.perf_counter(), budget_s, report
        self.selected, self.steps = selected, []
        self.keep, self.on_cpu = 0.0, True  # kept back for the later steps (keep_back); until a GPU is found
        self.log = open(out / "gpu_check.log", "a")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def say(self, text: str, log_only: bool = False) -> None:
        if not log_only:
            click.echo(text)
        self.log.write(text + "\n")
        self.log.flush()

    def skip(self, name: str, why: str) -> None:
        self.steps.append({"step": STEPS[name], "status": "skipped", "seconds": 0.0, "error": why})
        self.say(f"== {STEPS[name]}: skipped ({why})")
        self.save()

    def step(self, name: str, fn, min_s: float = 5.0, key: str | None = None):
        self.keep = keep_back(self.selected, name, self.budget_s)
        if self.left() < min_s:
            return self.skip(name, f"time budget spent ({self.left():.0f} of {self.budget_s:.0f} s left, "
                                   f"needs {min_s:.0f})")
        self.say(f"== {STEPS[name]} ({self.left():.0f} s of budget left)")
        t, status, error = time.perf_counter(), "ok", None
        try:
            result = fn()
        except Exception as e:  # record and go on: the next step may still tell us something
            status, error, result = "failed", f"{type(e).__name__}: {e}", getattr(e, "partial", None)
            self.say(traceback.format_exc(), log_only=True)
            self.say(f"   failed: {error.splitlines()[0]}")
        self.steps.append({"step": STEPS[name], "status": status, "seconds": round(time.perf_counter() - t, 1),
                           "error": error})
        self.report[key or name] = result
        self.save()
        return result

    def save(self) -> None:
        """report.json and report.md as they stand now, written atomically: a kill mid-write leaves the last."""
        report = dict(self.report, steps=self.steps, seconds=round(time.perf_counter() - self.t0, 1),
                      finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        report = json.loads(json.dumps(dict(report, verdict=verdict(report)), default=str))  # paths as strings
        save_json(report, self.out / "report.json")
        write_atomic(self.out / "report.md", lambda tmp, text=markdown(report): Path(tmp).write_text(text))

    def timeout(self, parts: int = 1) -> float:
        """What is left of the budget less what the later steps keep back, shared among the `parts` processes
        the step has still to run (under 10 s, the step, earlier and so worth more, takes the later steps')."""
        avail = self.left() - self.keep
        return max(1.0, (avail if avail >= 10 else self.left()) / parts)

    def run(self, cmd: list, parts: int = 1, stdout_file: Path | None = None) -> subprocess.CompletedProcess:
        """cmd in a process group of its own, killed with its children at its timeout. stdout_file: its output
        goes there as it is written, so that what it wrote before a timeout stays."""
        cmd, timeout = [str(c) for c in cmd], self.timeout(parts)
        # On a CPU one OpenMP thread each (unless set): on a few busy cores torch's threads spin against each
        # other and the loader's (a step of the ceiling took 1.6 s on a busy 2-core machine, 0.28 s with one).
        env = {**({"OMP_NUM_THREADS": "1"} if self.on_cpu else {}), **os.environ, "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "TQDM_DISABLE": "1",
               "PYTHONUNBUFFERED": "1", "DALIPIPE_CACHE_DIR": str(self.work / "check-cache")}
        self.say(f"$ {' '.join(cmd)}  (timeout {timeout:.0f} s)", log_only=True)
        sink = open(stdout_file, "w") if stdout_file else subprocess.PIPE
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                start_new_session=True, preexec_fn=die_with_parent)
        try:
            (out, err), timed_out = proc.communicate(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            (out, err), timed_out = proc.communicate(), True
        if stdout_file:
            sink.close()
            out = Path(stdout_file).read_text(errors="replace")
        self.say(out[-20000:] + err[-20000:], log_only=True)
        done = subprocess.CompletedProcess(cmd, -signal.SIGKILL if timed_out else proc.returncode, out, err)
        if timed_out:
            what = cmd[2] if cmd[1] in ("-c", "-m") else Path(cmd[1]).name  # pytest, loader_speed.py, ...
            raise StepTimeout(f"{what} ran past its {timeout:.0f} s", process=done)
        return done

    def attempt(self, cmd: list, parts: int = 1, stdout_file: Path | None = None):
        """run(), whatever ends it: (the process, what went wrong or None)."""
        try:
            r = self.run(cmd, parts, stdout_file)
            return r, f"exit {r.returncode}: {last_line(r.stderr)}" if r.returncode else None
        except StepTimeout as e:
            return e.process, str(e)


def last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


def keep_back(steps: tuple[str, ...], name: str, budget_s: float) -> float:
    """Seconds kept back, while step `name` runs, for the selected steps after it: their shares of the budget."""
    later = sum(SHARES[n] for n in steps if list(STEPS).index(n) > list(STEPS).index(name))
    return budget_s * later / (sum(SHARES[n] for n in steps) or 1.0)


def environment(device_name: str) -> dict:
    import torch

    from dalipipe import device as dev
    from dalipipe.loading.loader_rules import default_workers

    def output(cmd: list) -> str | None:  # or what went wrong
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
            return r.stdout.strip().replace("\n", "; ") or last_line(r.stderr) or None
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)

    device = dev.resolve(device_name)
    cuda = device.type == "cuda"
    return {**versions(), "cuda": torch.version.cuda, "device": str(device), "bf16": dev.has_bf16(device),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "nvidia_smi": output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"]) if cuda else None,
            **{d.metadata["Name"].lower(): d.version for d in metadata.distributions()
               if (d.metadata["Name"] or "").lower() in ("pandas", "pytest")},
            "cpu_cores": os.cpu_count(), "workers": default_workers(),
            # the torch loader's workers hand batches over in shared memory: 224 px batches need room there
            "dev_shm_free_gib": round(shutil.disk_usage("/dev/shm").free / 2**30, 1)
            if os.path.isdir("/dev/shm") else None,
            # where `import tests` leads, as pytest imports the test modules: an installed `tests` would shadow ours
            "tests_package": output([sys.executable, "-c", "import tests; print(list(tests.__path__)[0])"])}


def gpu_tests(check: Check, marks: str, out_name: str, paths: tuple[str, ...] = ("tests",)) -> dict:
    """`pytest -m MARKS -v`, written to DIR/out_name as each test ends: a step cut by its timeout still
    reports every test that finished, by name."""
    cmd = [sys.executable, "-m", "pytest", "-m", marks, "-v", "-rfEs", "-p", "no:cacheprovider", *paths]
    r, failure = check.attempt(cmd, stdout_file=check.out / out_name)
    cut = failure if r.returncode == -signal.SIGKILL else None  # by its timeout (or out of memory)
    # one line per test as pytest -v writes it when the test ends: "tests/x.py::name[param] PASSED [ 10%]"
    outcomes = dict(re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", r.stdout, flags=re.M))
    failed = [name for name, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
    tail = (f"cut: {cut}; {len(outcomes)} test(s) finished" if cut
            else last_line(r.stdout).strip("= ") or r.stderr[-300:])  # pytest's summary line
    result = {"marks": marks, "exit_code": r.returncode, "summary": tail, "failed": failed, "outcomes": outcomes,
              "counts": {k.lower(): list(outcomes.values()).count(k) for k in set(outcomes.values())},
              "cut": cut is not None}
    if cut or failed or r.returncode not in (0, 5):  # exit 5: nothing selected here, not a failure
        raise StepFailed(f"GPU tests ({marks}): {tail}", result)
    return result


def loader_speed(check: Check, data: Path, sizes, device: str, json_out: Path, *args):
    """benchmarks/loader_speed.py on `data`: (the rows it finished, what stopped it, its process)."""
    cmd = [sys.executable, ROOT / "benchmarks" / "loader_speed.py", "--data", data, "--device", device,
           "--image-size", sizes.image_size, "--batch-size", sizes.batch_size, "--json", json_out, *args]
    r, failure = check.attempt(cmd)
    rows = json.loads(json_out.read_text())["results"] if json_out.exists() else []
    return rows, failure, r


def dali_smoke(check: Check, data: Path, sizes, device: str) -> dict:
    """`import nvidia.dali` (where it fails, its error is the answer, in its own words), then an epoch of
    loader_speed.py's dali row on a few samples, its batches on the device."""
    (r, failure), rows = check.attempt([sys.executable, "-c", "import nvidia.dali"], parts=2), []
    if not failure:
        rows, failure, r = loader_speed(check, data, sizes, device, check.work / "smoke.json", "--rows",
                                        "dali", "--limit", SMOKE_SAMPLES, "--epochs", 1, "--workers", 1)
    on = "cpu" if check.on_cpu else "cuda"
    if not failure and not (rows and rows[0]["device"].startswith(on)
                            and rows[0]["images_per_epoch"] == SMOKE_SAMPLES):
        failure = f"no whole epoch on the device ({on}): {rows}"
    if failure:
        stderr = [line for line in r.stderr.splitlines() if line.strip()]
        raise StepFailed(f"DALI smoke {failure}", {"exit_code": r.returncode, "stderr_tail": stderr[-15:]})
    return {"ok": True, "device": rows[0]["device"], "images": SMOKE_SAMPLES}


def benchmark(check: Check, data: Path, sizes, device: str, rows: list[str]) -> dict:
    """loader_speed.py --train with these rows: one timed epoch after its warm-up."""
    results, failure, r = loader_speed(check, data, sizes, device, check.out / "benchmark.json", "--train", "--limit",
                                       sizes.bench_limit, "--epochs", 1, *[a for row in rows for a in ("--rows", row)])
    if not results:
        raise RuntimeError(failure or "loader_speed.py wrote no results")
    summary = {f"{x['row']}_{'train' if x['train'] else 'load'}_images_per_s": round(x["images_per_s"], 1)
               for x in results}
    out = {"command": " ".join(r.args[1:]), "table": r.stdout.strip(), "summary": summary, "rows_done": len(results),
           "workers": results[0]["workers"]}
    if failure:
        raise StepFailed(f"benchmark incomplete ({failure}); {len(results)} row(s) finished", out)
    return out


def timed_train(cfg, clock=time.perf_counter) -> tuple:
    """train(cfg), timed on this clock through its observe callback: (its result, the times). setup_s: to its
    first epoch; epoch_walls: each whole epoch (steps, validation, the hand-off of its checkpoint and records);
    partial_*: those of an epoch --time-limit stopped; record_wait_s: from the last epoch's end to train()'s: the
    last writes waited for, and the loaders closed."""
    from dalipipe.run.train import train

    t0, marks = clock(), []
    result = train(cfg, observe=lambda event, value: marks.append((event, value, clock())))
    end, since = clock(), [t0] + [t for _, _, t in marks]  # each event's previous one
    times = {"wall_s": end - t0, "setup_s": None, "steps_per_epoch": None, "epoch_walls": [], "partial_steps": 0,
             "partial_s": 0.0, "record_wait_s": end - since[-1]}
    for (event, value, t), last in zip(marks, since):
        if event == "epochs":
            times.update(setup_s=t - t0, steps_per_epoch=value)
        elif event == "epoch_end":
            times["epoch_walls"].append(t - last)
        elif event == "stopped":
            times.update(partial_steps=value, partial_s=t - last)
    return result, times


def project_recipe(setup_s: float, epoch_walls: list[float], epochs: int, steps_per_epoch: int,
                   partial_steps: int, partial_s: float) -> tuple[float | None, str]:
    """The whole recipe's training time from what a stopped run measured, and how it was projected.
    Whole-epoch wall times hold everything an epoch costs the loop, so per-epoch costs count once per epoch.
    The first epoch also pays the warm-ups (cuDNN autotuning, DALI's first batches): it counts once."""
    if len(epoch_walls) >= 2:
        return (setup_s + epoch_walls[0] + (epochs - 1) * statistics.mean(epoch_walls[1:]),
                f"start-up + epoch 1 + {epochs - 1} x the mean of epochs 2-{len(epoch_walls)}")
    if len(epoch_walls) == 1:
        return setup_s + epochs * epoch_walls[0], f"start-up + {epochs} x epoch 1 (with its warm-up: high)"
    if partial_steps:
        return (setup_s + epochs * steps_per_epoch * partial_s / partial_steps,
                "training steps only, validation and epoch-end writes not measured: a lower bound")
    return None, "no training step finished"


def recipe(check: Check, data: Path, sizes, device: str) -> dict:
    """The recipe's training under a time limit, then predict and score the test set, in a child process."""
    run = Path(tempfile.mkdtemp(prefix="recipe-", dir=check.work))
    job = {"data": str(data), "run": str(run), "sizes": vars(sizes), "device": device,
           "limit_s": max(10.0, RECIPE_TRAIN_SHARE * check.timeout()), "result": str(run / "recipe.json")}
    # past its time limit the child still finishes its step, saves, and predicts
    _, failure = check.attempt([sys.executable, __file__, "--recipe-job", json.dumps(job)])
    out = json.loads(Path(job["result"]).read_text()) if Path(job["result"]).exists() else None
    if failure or out is None:
        raise StepFailed(f"recipe: {failure or 'it wrote no result'}", out)
    return out


def recipe_child(job: dict) -> None:
    """The figures are written after training and again after predict: a failure in predict keeps the first."""
    import torch

    from dalipipe.infer.predict import predict
    from dalipipe.infer.score import score

    data, run, sizes = Path(job["data"]), Path(job["run"]), SimpleNamespace(**job["sizes"])
    res, t = timed_train(TrainConfig(
        images_dir=str(data / "images_train"), labels_csv=str(data / "y_train.csv"), out_dir=str(run),
        epochs=sizes.epochs, batch_size=sizes.batch_size, device=job["device"],
        augment=AugmentSpec(image_size=sizes.image_size), time_limit_minutes=job["limit_s"] / 60))
    history, walls = res.history, t["epoch_walls"]
    out = {"epochs_planned": sizes.epochs, "epochs_done": len(history), "stopped_early": res.stopped_early,
           **{k: round(t[k], 1) for k in ("wall_s", "setup_s", "record_wait_s") if t[k] is not None},
           "epoch_wall_s": [round(w, 2) for w in walls],
           # what an epoch costs the loop besides its steps and validation: its checkpoint and records
           "epoch_records_s": round(statistics.mean(w - h["epoch_seconds"] for w, h in zip(walls, history)), 2)
           if walls else None,
           "train_images_per_s": round(statistics.mean(h["train_images_per_s"] for h in history[1:] or history), 1)
           if history else None, "val_balanced_accuracy_best": round(res.best_val_balanced_accuracy, 4)}
    if torch.cuda.is_available() and job["device"] != "cpu":
        # torch's allocator; DALI's own pools are apart (the benchmark's device column counts both)
        out["peak_device_memory_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    if res.stopped_early:  # projected, plus the end (the last writes, the loaders closed)
        projected, basis = project_recipe(t["setup_s"], walls, sizes.epochs, t["steps_per_epoch"],
                                          t["partial_steps"], t["partial_s"])
        out.update(steps_done_in_last_epoch=t["partial_steps"], projection=basis,
                   projected_recipe_s=None if projected is None else round(projected + t["record_wait_s"], 1))
    save_json(out, job["result"])
    if history:  # a run stopped before its first epoch's end has no best.pt to predict with
        t0, sub = time.perf_counter(), run / "submission.csv"
        predict(PredictSettings(checkpoints=(str(run),), images_dir=str(data / "images_test"), out_csv=str(sub),
                                device=job["device"], batch_size=sizes.batch_size))
        save_json(dict(out, predict_s=round(time.perf_counter() - t0, 1),
                       test_balanced_accuracy=round(score(str(sub), str(data / "y_test.csv")), 4)), job["result"])


def verdict(report: dict) -> list[dict]:
    rec, bench = report.get("recipe") or {}, (report.get("benchmark") or {}).get("summary", {})
    on_gpu = bool((report.get("environment") or {}).get("gpu"))  # the targets are a GPU's: n/a elsewhere
    applies, rows = on_gpu and not report["quick"], []
    smoke = next((x for x in report["steps"] if x["step"] == STEPS["smoke"] and x["status"] != "skipped"), None)
    if smoke:  # one line for what DALI's failure costs: the steps that need it are skipped, not failed in turn
        what = ("three mixed decoders and a GPU warp_affine" if on_gpu else
                "CPU decoders and a CPU warp_affine: no GPU here, its mixed and GPU operators not tried")
        ok = smoke["status"] == "ok"
        rows.append((f"DALI's training pipeline runs an epoch on this machine ({what})",
                     "ok" if ok else f"{smoke['error']}; the steps that need DALI were skipped", ok))
    finished = rec and not rec.get("stopped_early")
    recipe_s = rec.get("wall_s") if finished else rec.get("projected_recipe_s")
    note = ("" if finished else f" (projected: {rec.get('projection')})")
    note += " (quick sizes: not the recipe)" if report["quick"] else ""
    # a lower bound over the target is a sure miss; under it, it proves nothing
    met = (None if recipe_s is None or not applies else False if recipe_s > TARGET_RECIPE_S
           else None if "lower bound" in rec.get("projection", "") else True)
    rows.append((f"reference recipe (training, all included) <= {TARGET_RECIPE_S:.0f} s on one H100",
                 None if recipe_s is None else f"{recipe_s:.0f} s{note}", met))
    for a, b, target, goal, fmt in (
            ("dali_train", "ceiling_train", f"DALI in training >= {TARGET_DALI_OF_CEILING:.0%} of the ceiling",
             TARGET_DALI_OF_CEILING, "{:.1%}"),
            ("dali_load", "torch_load", f"DALI loading >= {TARGET_DALI_OVER_TORCH:.0f}x the torch loader "
             "(same workers)", TARGET_DALI_OVER_TORCH, "{:.2f}x")):
        x, y = bench.get(f"{a}_images_per_s"), bench.get(f"{b}_images_per_s")
        ratio = x / y if x and y else None
        rows.append((target, ratio and fmt.format(ratio), None if ratio is None or not applies else ratio >= goal))
    return [dict(zip(("target", "measured", "met"), row)) for row in rows]


def markdown(report: dict) -> str:
    """The steps, the verdict and the key numbers; report.json holds the rest."""
    env, rec, bench = (report.get(k) or {} for k in ("environment", "recipe", "benchmark"))
    tests = [t for t in map(report.get, ("torch_tests", "gpu_tests")) if t]
    numbers = {**{f"`pytest -m \"{t['marks']}\"`": t["summary"] for t in tests},
               **{f"recipe: {k}": v for k, v in rec.items() if k != "epoch_wall_s"}, **bench.get("summary", {})}
    device = (f"{env['gpu']} ({env['nvidia_smi']}), CUDA {env['cuda']}" if env.get("gpu")
              else f"no GPU ({env.get('device', 'device unknown')})")
    met = {None: "n/a", True: "yes", False: "NO"}
    return "\n".join([
        f"# gpu_check report ({report.get('finished')})", "",
        f"{device}; torch {env.get('torch')}, DALI {env.get('dali')}; {env.get('cpu_cores')} CPU cores, "
        f"{env.get('workers')} loader workers. {'Quick' if report['quick'] else 'Full'} sizes; "
        f"{report.get('seconds')} s of a {report['budget_s']:.0f} s budget.",
        "", "## Steps", "", "| step | status | seconds | note |", "| --- | --- | ---: | --- |",
        *[f"| {s['step']} | {s['status']} | {s['seconds']} | {(s['error'] or ' ').splitlines()[0]} |"
          for s in report["steps"]],
        "", "## Verdict", "", "| target | measured | met |", "| --- | --- | --- |",
        *[f"| {v['target']} | {v['measured'] or 'not measured'} | {met[v['met']]} |" for v in report["verdict"]],
        "", "## Key numbers", "", *[f"- {k}: {v}" for k, v in numbers.items()], ""])


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--budget-s", type=float, help=f"Stop all work within this many seconds. [default: "
                                             f"{BUDGET_GPU_S:.0f} on a GPU, {BUDGET_CPU_S:.0f} without one]")
@click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True)
@click.option("--quick", is_flag=True, help="Tiny sizes (for the CPU, and the test suite).")
@click.option("--work", "work_dir", type=click.Path(), help="Data and runs. [default: a temporary folder, removed]")
@click.option("--steps", "steps_text", help=f"Comma-separated steps, of {','.join(STEPS)}. [default: all]")
def main(out_dir, budget_s, device, quick, work_dir, steps_text):
    """Verify this machine's GPU path and measure it against the project's targets."""
    # Progress bars would fill the log with redrawn lines. tqdm reads this when it is imported (torch imports
    # it): before anything imports either. The children get it too (Check.run).
    os.environ["TQDM_DISABLE"] = "1"
    asked = [t.strip() for t in (steps_text or ",".join(STEPS)).split(",") if t.strip()]
    if not asked or set(asked) - set(STEPS):
        raise click.BadParameter(f"{', '.join(set(asked) - set(STEPS)) or 'nothing'}: the steps are "
                                 f"{', '.join(STEPS)}", param_hint="--steps")
    steps = tuple(t for t in STEPS if t in asked)  # always in the check's order
    if budget_s is None:
        import torch

        budget_s = BUDGET_GPU_S if device != "cpu" and torch.cuda.is_available() else BUDGET_CPU_S
    d = TrainConfig(images_dir="", labels_csv="", out_dir="")  # the recipe's defaults
    sizes = SimpleNamespace(**QUICK_SIZES) if quick else SimpleNamespace(
        n_train=REAL_N_TRAIN, n_test=REAL_N_TEST, classes=9, synth_size=64, image_size=AugmentSpec().image_size,
        epochs=d.epochs, batch_size=d.batch_size, bench_limit=1024)
    out, work = Path(out_dir), Path(work_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    for folder in (out, work):
        folder.mkdir(parents=True, exist_ok=True)
    check = Check(out, work, budget_s, {"quick": quick, "budget_s": budget_s, "sizes": vars(sizes),
                                        "steps_asked": list(steps), "started": time.strftime("%Y-%m-%d %H:%M:%S")},
                  steps)
    try:
        run_steps(check, sizes, device)
    finally:
        if not work_dir:  # ours: do not leave data and runs behind
            shutil.rmtree(work, ignore_errors=True)
    check.say("\n" + (out / "report.md").read_text())
    check.say(f"report: {out / 'report.md'}, {out / 'report.json'}; log: {out / 'gpu_check.log'}"
              + (f"; work: {work}" if work_dir else ""))
    failed = [s["step"] for s in check.steps if s["status"] == "failed"]
    if failed:  # a script sees at once that something did not pass
        check.say(f"failed: {', '.join(failed)}")
        sys.exit(1)


def run_steps(check: Check, sizes, device: str) -> None:
    from dalipipe.data.synthetic import generate

    steps, path = check.selected, check.work / f"synthetic-{sizes.n_train}-{sizes.synth_size}"
    env = check.step("env", lambda: environment(device), min_s=0, key="environment")
    check.on_cpu = not (env and env["gpu"])
    after = [n for n in steps if n in ("smoke", "tests", "recipe", "bench")]  # they need data, and the smoke
    spec = SynthSpec(n_train=sizes.n_train, n_test=sizes.n_test, n_classes=sizes.classes,
                     image_size=sizes.synth_size, seed=0)
    data = None  # made here, or by an earlier call with this --work
    if after or "data" in steps:
        data = check.step("data", lambda: path if (path / "y_test.csv").exists() else generate(path, spec, force=True))
    if "torch" in steps:
        check.step("torch", lambda: gpu_tests(check, TORCH_TESTS, "torch_tests.txt",
                                              paths=("--ignore=tests/test_gpu.py", "tests")), min_s=20,
                   key="torch_tests")
    if data is None or not after:
        for name in after:
            check.skip(name, "no synthetic data")
        return
    check.step("smoke", lambda: dali_smoke(check, data, sizes, device), min_s=10, key="smoke")
    smoke, dali = check.steps[-1], check.steps[-1]["status"] == "ok"  # the smoke decides what runs after it
    for name in [n for n in steps if n in ("tests", "recipe") and not dali]:
        check.skip(name, f"DALI smoke {smoke['status']}: {(smoke['error'] or '').splitlines()[0]}")
    if "tests" in steps and dali:
        check.step("tests", lambda: gpu_tests(check, DALI_TESTS, "gpu_tests.txt"), min_s=30, key="gpu_tests")
    if "recipe" in steps and dali:
        check.step("recipe", lambda: recipe(check, data, sizes, device), min_s=60, key="recipe")
    if "bench" in steps:  # without DALI, the ceiling only (it needs none)
        check.step("bench", lambda: benchmark(check, data, sizes, device, BENCH_ROWS if dali else ["ceiling"]),
                   min_s=30, key="benchmark")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--recipe-job"]:  # the recipe step's child
        recipe_child(json.loads(sys.argv[2]))
    else:
        main()
