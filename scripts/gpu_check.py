"""Verify a GPU machine in one command: environment, GPU tests, loader benchmark, the reference recipe.

    python scripts/gpu_check.py --out DIR [--budget-s 420] [--device auto|gpu|cpu] [--quick] [--work DIR]

Runs from a checkout with no install step and no network (the packages must already be importable; it
never calls pip). Each step is timed; a failing step is recorded and the next one still runs; the whole
check stops itself within --budget-s. Writes DIR/report.json, DIR/report.md and DIR/gpu_check.log, and
prints the tables. Run folders, checkpoints and data go to --work (a temporary folder by default), never
to DIR, so that DIR holds only the few files worth bringing back.

--quick (with --device cpu in the test suite): tiny data and sizes, so that the script is exercised on
every CI run and cannot rot between the rare sessions that have a GPU.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# The project's targets (README, issue "Ready for the first GPU run").
TARGET_RECIPE_S = 120.0          # the reference recipe, all included, on one H100
TARGET_DALI_OF_CEILING = 0.95    # DALI's training images/s against the no-loading ceiling
TARGET_DALI_OVER_TORCH = 5.0     # DALI's loading images/s against the torch loader at equal cores
PREDICT_RESERVE_S = 45.0         # kept back from the recipe's training for predict and the report
RECIPE_RESERVE_S = PREDICT_RESERVE_S + 60.0  # kept back from the benchmark for the recipe


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
                   bench_limit=1024, bench_epochs=2)


class Check:
    """Runs steps in order under one time budget; records each step's time, result or failure."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.t0, self.budget_s = out, time.perf_counter(), budget_s
        self.steps: list[dict] = []
        self.log = open(out / "gpu_check.log", "a")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def say(self, text: str) -> None:
        click.echo(text)
        self.log.write(text + "\n")
        self.log.flush()

    def step(self, name: str, fn, min_s: float = 5.0) -> dict | None:
        if self.left() < min_s:
            self.steps.append({"step": name, "status": "skipped", "seconds": 0.0,
                               "error": f"time budget spent ({self.budget_s:.0f} s)"})
            self.say(f"== {name}: skipped (time budget spent)")
            return None
        self.say(f"== {name} ({self.left():.0f} s of budget left)")
        t = time.perf_counter()
        try:
            result = fn()
            status, error = "ok", None
        except Exception as e:  # record and go on: the next step may still tell us something
            result, status, error = None, "failed", f"{type(e).__name__}: {e}"
            self.log.write(traceback.format_exc())
            self.say(f"   failed: {error.splitlines()[0] if error else ''}")
        self.steps.append({"step": name, "status": status, "seconds": round(time.perf_counter() - t, 1),
                           "error": error, "result": result})
        return result

    def run(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   PYTHONWARNINGS="ignore")
        self.log.write("$ " + " ".join(cmd) + "\n")
        # Its own process group, so that a timeout stops the benchmark's row processes too, not only it.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            self.log.write(out[-20000:] + err[-20000:] + "\n")
            raise RuntimeError(f"{' '.join(Path(c).name for c in cmd[1:3])} ran past its {timeout:.0f} s") from None
        self.log.write(out[-20000:] + err[-20000:] + "\n")
        self.log.flush()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def environment(device_name: str) -> dict:
    import numpy
    import torch

    from dalipipe import device as dev

    def version(module: str) -> str | None:
        try:
            return __import__(module, fromlist=["__version__"]).__version__
        except Exception:
            return None

    device = dev.resolve(device_name)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "dali": version("nvidia.dali"), "efficientnet_pytorch": version("efficientnet_pytorch"),
            "numpy": numpy.__version__, "cpu_cores": os.cpu_count(), "device": str(device),
            "gpu": None, "gpu_memory_gib": None, "driver": None, "bf16": dev.has_bf16(device)}
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


def gpu_tests(check: Check) -> dict:
    """`pytest -m gpu`; without pytest on the machine, the same test functions called directly."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return _gpu_tests_without_pytest()
    r = check.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                  timeout=min(240.0, check.left() - 5))
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail)}
    failed = re.findall(r"^FAILED (\S+)", r.stdout, flags=re.M) + re.findall(r"^ERROR (\S+)", r.stdout, flags=re.M)
    return {"runner": "pytest", "exit_code": r.returncode, "summary": tail, "counts": counts, "failed": failed}


def _gpu_tests_without_pytest() -> dict:
    import inspect

    import torch

    if not torch.cuda.is_available():
        return {"runner": "direct", "counts": {"skipped": 1}, "summary": "no CUDA GPU: skipped", "failed": []}
    from dalipipe.synthetic import SynthSpec, generate
    from tests import test_gpu

    counts, failed = {"passed": 0, "failed": 0}, []
    with tempfile.TemporaryDirectory() as tmp:
        small = generate(Path(tmp) / "small", SynthSpec(n_train=240, n_test=60, n_classes=4, image_size=32, seed=3))
        for name, fn in inspect.getmembers(test_gpu, inspect.isfunction):
            if not name.startswith("test_"):
                continue
            case = Path(tempfile.mkdtemp(dir=tmp))
            kwargs = {"small_synth": small, "tmp_path": case}
            try:
                fn(**{p: kwargs[p] for p in inspect.signature(fn).parameters})
                counts["passed"] += 1
            except Exception as e:
                counts["failed"] += 1
                failed.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
    return {"runner": "direct", "counts": counts, "summary": f"{counts['passed']} passed, {counts['failed']} failed",
            "failed": failed}


def synthetic_data(work: Path, sizes: Sizes) -> Path:
    from dalipipe.synthetic import SynthSpec, generate

    path = work / f"synthetic-{sizes.n_train}-{sizes.synth_size}"
    if not (path / "y_test.csv").exists():
        generate(path, SynthSpec(n_train=sizes.n_train, n_test=sizes.n_test, n_classes=sizes.classes,
                                 image_size=sizes.synth_size, seed=0), force=True)
    return path


def benchmark(check: Check, data: Path, sizes: Sizes, device: str, out: Path) -> dict:
    json_out = out / "benchmark.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "loader_speed.py"), "--train", "--data", str(data),
           "--device", device, "--limit", str(sizes.bench_limit), "--epochs", str(sizes.bench_epochs),
           "--image-size", str(sizes.image_size), "--batch-size", str(sizes.batch_size), "--json", str(json_out),
           "--plot", str(out / "benchmark.png")]
    try:
        r = check.run(cmd, timeout=min(300.0, check.left() - RECIPE_RESERVE_S))
        failure = None if r.returncode == 0 else f"loader_speed.py exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        table_text = r.stdout.strip()
    except RuntimeError as e:  # ran past its time: the rows it finished are in the JSON
        failure, table_text = str(e), ""
    if not json_out.exists():
        raise RuntimeError(failure or "loader_speed.py wrote no results")
    results = json.loads(json_out.read_text())["results"]
    rows = {(x["row"], x["train"]): x for x in results}
    summary = {f"{row}_{'train' if train else 'load'}_images_per_s": round(x["images_per_s"], 1)
               for (row, train), x in rows.items()}
    summary.update({f"{row}_train_data_wait": round(x["data_wait_fraction"], 4)
                    for (row, train), x in rows.items() if train})
    if failure:
        check.say(f"   benchmark incomplete ({failure}); {len(results)} row(s) finished")
    return {"command": " ".join(cmd[1:]), "table": table_text or json.dumps(summary, indent=1), "summary": summary,
            "complete": failure is None}


def recipe(check: Check, data: Path, sizes: Sizes, device: str, work: Path) -> dict:
    """`dalipipe train` with the recipe's defaults, then `dalipipe predict` on the test set and its score."""
    from dalipipe.config import AugmentSpec, TrainConfig
    from dalipipe.predict import predict, score
    from dalipipe.train import train

    run = Path(tempfile.mkdtemp(prefix="recipe-", dir=work))
    limit_s = max(10.0, check.left() - PREDICT_RESERVE_S)
    cfg = TrainConfig(images_dir=str(data / "images_train"), labels_csv=str(data / "y_train.csv"), out_dir=str(run),
                      epochs=sizes.epochs, batch_size=sizes.batch_size, device=device,
                      augment=AugmentSpec(image_size=sizes.image_size), time_limit_minutes=limit_s / 60)
    t = time.perf_counter()
    result = train(cfg)
    train_wall = time.perf_counter() - t
    history = result["history"]
    t = time.perf_counter()
    sub = run / "submission.csv"
    if history:  # a run stopped before its first epoch's end has no best.pt to predict with
        predict(str(run), str(data / "images_test"), str(sub), device=device, batch_size=sizes.batch_size)
    predict_s = time.perf_counter() - t
    epochs_done = len(history)
    per_epoch = (result["timings"]["train_s"] - result["partial_train_s"]) / max(epochs_done, 1)
    per_val = result["timings"]["val_s"] / max(epochs_done, 1)
    out = {"epochs_planned": sizes.epochs, "epochs_done": epochs_done, "stopped_early": result["stopped_early"],
           "train_wall_s": round(train_wall, 1), "predict_s": round(predict_s, 1),
           **{k: round(v, 1) for k, v in result["timings"].items()},
           # checkpoints, plots, metrics: what the phases above leave out
           "other_s": round(result["timings"]["total_s"] - sum(v for k, v in result["timings"].items()
                                                               if k != "total_s"), 1),
           "train_s_per_epoch": round(per_epoch, 2), "val_s_per_epoch": round(per_val, 2),
           "train_images_per_s": round(sum(h["train_images_per_s"] for h in history[1:] or history)
                                       / len(history[1:] or history), 1) if history else None,
           "val_balanced_accuracy_best": round(result["best_val_balanced_accuracy"], 4) if history else None,
           "test_balanced_accuracy": round(score(str(sub), str(data / "y_test.csv")), 4) if history else None}
    if result["stopped_early"]:  # what the whole recipe would take at the measured pace (labelled as such)
        out["steps_done_in_last_epoch"] = result["partial_steps"]
        fixed = train_wall - result["timings"]["train_s"] - result["timings"]["val_s"]
        steps = epochs_done * result["steps_per_epoch"] + result["partial_steps"]
        per_step = result["timings"]["train_s"] / max(steps, 1)
        per_val = per_val if epochs_done else 0.0  # not measured: left out of the projection
        out["projected_recipe_s"] = round(fixed + sizes.epochs * (result["steps_per_epoch"] * per_step + per_val), 1)
    return out


def verdict(report: dict) -> list[dict]:
    rec, bench = report.get("recipe") or {}, (report.get("benchmark") or {}).get("summary", {})
    rows = []
    recipe_s = rec.get("train_wall_s") if rec and not rec.get("stopped_early") else rec.get("projected_recipe_s")
    on_gpu = bool((report.get("environment") or {}).get("gpu"))  # the targets are a GPU's: n/a elsewhere
    rows.append({"target": f"reference recipe (training, all included) <= {TARGET_RECIPE_S:.0f} s on one H100",
                 "measured": None if recipe_s is None else
                 f"{recipe_s:.0f} s" + (" (projected from the steps done)" if rec.get("stopped_early") else "")
                 + (" (quick sizes: not the recipe)" if report["quick"] else ""),
                 "met": None if recipe_s is None or report["quick"] or not on_gpu else recipe_s <= TARGET_RECIPE_S})
    dali_t, ceil_t = bench.get("dali_train_images_per_s"), bench.get("ceiling_train_images_per_s")
    ratio = dali_t / ceil_t if dali_t and ceil_t else None
    rows.append({"target": f"DALI in training >= {TARGET_DALI_OF_CEILING:.0%} of the ceiling",
                 "measured": None if ratio is None else f"{ratio:.1%}",
                 "met": None if ratio is None or not on_gpu else ratio >= TARGET_DALI_OF_CEILING})
    dali_l, torch_l = bench.get("dali_load_images_per_s"), bench.get("torch_load_images_per_s")
    ratio = dali_l / torch_l if dali_l and torch_l else None
    rows.append({"target": f"DALI loading >= {TARGET_DALI_OVER_TORCH:.0f}x the torch loader (same cores)",
                 "measured": None if ratio is None else f"{ratio:.2f}x",
                 "met": None if ratio is None or not on_gpu else ratio >= TARGET_DALI_OVER_TORCH})
    return rows


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    lines = [f"# gpu_check report ({report['finished']})", "",
             f"Device: {env.get('gpu') or env.get('device')}, {env.get('gpu_memory_gib')} GiB; driver "
             f"{env.get('driver')}; CUDA {env.get('cuda')}; torch {env.get('torch')}; DALI {env.get('dali')}; "
             f"efficientnet-pytorch {env.get('efficientnet_pytorch')}; Python {env.get('python')}; "
             f"{env.get('cpu_cores')} CPU cores; bf16 {env.get('bf16')}. "
             f"Mode: {'quick' if report['quick'] else 'full'}, budget {report['budget_s']:.0f} s.", "",
             "## Steps", "", "| step | status | seconds | error |", "| --- | --- | ---: | --- |"]
    for s in report["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {(s['error'] or '').splitlines()[0] if s['error'] else ''} |")
    tests = report.get("gpu_tests") or {}
    lines += ["", "## GPU tests", "", f"{tests.get('summary', 'not run')}"]
    lines += [f"- failed: {f}" for f in tests.get("failed", [])]
    bench = report.get("benchmark") or {}
    lines += ["", "## Loader benchmark (--train)", "", f"`{bench.get('command', 'not run')}`", "", "```",
              bench.get("table", ""), "```"]
    rec = report.get("recipe") or {}
    lines += ["", "## Reference recipe", "", "| measure | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in rec.items()]
    lines += ["", "## Verdict", "", "| target | measured | met |", "| --- | --- | --- |"]
    for v in report.get("verdict", []):
        met = "n/a" if v["met"] is None else "yes" if v["met"] else "NO"
        lines.append(f"| {v['target']} | {v['measured'] or 'not measured'} | {met} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--budget-s", default=420.0, show_default=True, help="Stop all work within this many seconds.")
@click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True)
@click.option("--quick", is_flag=True, help="Tiny sizes (for the CPU, and the test suite).")
@click.option("--work", "work_dir", type=click.Path(file_okay=False), help="Data and run folders. [default: a temporary folder]")
def main(out_dir, budget_s, device, quick, work_dir):
    """Verify this machine's GPU path and measure it against the project's targets."""
    from dalipipe.atomic import save_json, write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out, budget_s)
    sizes = Sizes.pick(quick)
    report: dict = {"quick": quick, "budget_s": budget_s, "sizes": sizes.__dict__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    report["environment"] = check.step("environment", lambda: environment(device), min_s=0)
    report["gpu_tests"] = check.step("gpu tests", lambda: gpu_tests(check), min_s=30)
    data = check.step("synthetic data", lambda: synthetic_data(work, sizes))
    if data is not None:
        report["benchmark"] = check.step("loader benchmark", lambda: benchmark(check, data, sizes, device, out),
                                         min_s=60 + RECIPE_RESERVE_S)
        report["recipe"] = check.step("reference recipe", lambda: recipe(check, data, sizes, device, work), min_s=30)
    report["verdict"] = verdict(report)
    report["steps"] = [{k: v for k, v in s.items() if k != "result"} for s in check.steps]
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["seconds"] = round(time.perf_counter() - check.t0, 1)
    report = json.loads(json.dumps(report, default=str))  # paths and the like as strings
    save_json(report, out / "report.json")
    text = markdown(report)
    write_atomic(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    check.say("\n" + text)
    check.say(f"report: {out / 'report.md'}, {out / 'report.json'}; log: {out / 'gpu_check.log'}; work: {work}")


if __name__ == "__main__":
    main()
