"""DALI against the pure-torch loader, and the data stall in training, on this machine.

    python benchmarks/loader_speed.py [--data DIR] [--device auto|gpu|cpu] [--batch-size 64]
        [--image-size 224] [--workers N] [--epochs E] [--limit N] [--train] [--sweep] [--json OUT]
    python benchmarks/loader_speed.py --source-sizes 64,256,512,1024 [--gpu-step-rate R] [--json OUT]

Rows (identical AugmentSpec and output contract: normalized NCHW float on the target device):
  torch    PIL decode + augmentation in DataLoader workers, then the copy to the device;
  dali     the DALI pipeline on the target device (mixed decoding + GPU operators with a GPU, cpu without);
  dali-cpudec  (GPU only) the same with decoding in DALI's CPU pool and one copy per batch (--decoder cpu);
  torch-store, dali-store  the torch and dali rows reading the decoded store (decoded_store.py: one .npy of
           raw pixels per sample, written by the data check) instead of decoding the PNGs in every epoch. The
           store is built for the run in an empty folder in the cache, timed (the data check's decode and the
           store's writes in one pass, the check's memory off), and removed at the end; the other rows read
           the PNGs;
  ceiling-compile  (--train on a GPU) the ceiling with the model through torch.compile (`train --compile`);
  ceiling  (--train only) a few batches already on the device, cycled: no loading at all, the bound that
           any loader can reach in training. Without a training step it would measure nothing. Its batches
           are made by the torch loader: the ceiling rows need no DALI.
Each row runs in its own process, so that CPU time (process and children, from the OS) and peak host
memory are its own. Images/s is the median over the timed epochs after one warm-up epoch, with the device
synchronized before clocks are read. --train adds an efficientnet-b1 forward/backward step per batch and
reports the fraction of the step time spent waiting for data. Workers default to what `dalipipe train`
uses on this machine (the cores, at most 8), so that the rows describe the loader training gets. --sweep
repeats torch and dali with 1, 2, 4, ... workers up to the core count. --rows picks rows (for example the
compile row apart, as its compilation takes long). --source-sizes: what each source image size costs, the data
check and the loading rows on a synthetic set per size (cost_by_size.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from probes import DeviceMemory, cpu_delta, cpu_snapshot, descendants_peak_rss_kb, peak_host_memory_mb  # noqa: E402  (beside this script)
from step_profile import StepRanges, profiler  # noqa: E402

from dalipipe.cli import options_of  # noqa: E402  (light: click and the options table)
from dalipipe.errors import DataError  # noqa: E402
from dalipipe.settings import LoaderSpeedSettings  # noqa: E402

CEILING_BATCHES = 16
# Loaders fill their prefetch queues (DALI 2 batches per pipeline, torch 2 per worker) while the previous
# epoch ends: an epoch of only a few batches is timed mostly on batches made before its clock started.
MIN_TIMED_BATCHES = 10
ROWS = ("torch", "dali", "dali-cpudec", "torch-store", "dali-store", "ceiling", "ceiling-compile")
# The rows that read the decoded store, and the row of the same loader that reads the PNGs.
STORE_ROWS = {"torch-store": "torch", "dali-store": "dali"}
# (row, train) in the order rows run; the others (sweep rows) after them.
# First the rows that answer the open defaults: DALI in training against the ceiling, DALI against torch
# loading at equal workers, the decoded store against the PNGs, --decoder cpu; then the rest.
PRIORITY = [("ceiling", True), ("dali", True), ("dali-store", True), ("dali", False), ("torch", False),
            ("dali-store", False), ("torch-store", False), ("dali-cpudec", True), ("torch", True),
            ("torch-store", True), ("dali-cpudec", False), ("ceiling-compile", True)]


def ensure_data(data: str | None) -> Path:
    """The user's data, or a full-size synthetic set generated once into the cache."""
    if data:
        return Path(data)
    from dalipipe.settings import SynthSpec

    return cached_synthetic("bench-synthetic-v1", SynthSpec(), "the synthetic benchmark set")


def cached_synthetic(name: str, spec, what: str) -> Path:
    """The synthetic set `spec` (a SynthSpec) in the cache folder `name`, generated there the first time."""
    from dalipipe.data.check_cache import cache_dir
    from dalipipe.data.synthetic import generate

    path = cache_dir() / name
    if not (path / "y_train.csv").exists():
        click.echo(f"generating {what} in {path} (once)", err=True)
        generate(path, spec, force=True)
    return path


def scratch_store() -> tempfile.TemporaryDirectory:
    """An empty folder for a decoded store in the cache folder (where `dalipipe train` keeps its own, on the
    same disk as the synthetic sets), removed when the benchmark ends."""
    from dalipipe.data.check_cache import cache_dir

    cache_dir().mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="bench-store-", dir=cache_dir())


def disk_mb(folder: str | Path) -> float:
    """What the files under `folder` take on disk (allocated blocks), in MB."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total / 1e6


def timed_checks(index, store: str):
    """The data check with its memory off (every PNG decoded: a first run's check), timed; then the same with
    the empty store `store`: each sample decoded once, checked and written to the store in one pass, as a
    first `dalipipe train` with --decode-once does. (The PNG index, the store index, the store's figures.)"""
    from dalipipe.data.index import inspect_images

    t0 = time.perf_counter()
    checked = inspect_images(index, cache=False, progress=False)
    check_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stored = inspect_images(index, cache=False, progress=False, store=store)
    build_s = time.perf_counter() - t0
    n = len(index)
    build = {"samples": n, "case": "cold: the check's memory off and the store empty; each sample's PNGs decoded "
                                   "once, checked and written to the store in one pass",
             "check_alone_seconds": check_s, "check_alone_samples_per_s": n / check_s,
             "build_seconds": build_s, "build_samples_per_s": n / build_s, "disk_mb": disk_mb(store)}
    return checked, stored, build


def store_text(b: dict) -> str:
    return (f"decoded store: {b['samples']} samples checked and stored in {b['build_seconds']:.1f} s "
            f"({b['build_samples_per_s']:.0f} samples/s; {b['case']}); the check alone "
            f"{b['check_alone_seconds']:.1f} s ({b['check_alone_samples_per_s']:.0f} samples/s); "
            f"{b['disk_mb']:.0f} MB on disk")


def warn_if_short(samples: int, batch_size: int) -> int:
    """The batches of an epoch; a warning when they are too few to time."""
    batches = -(-samples // batch_size)
    if batches < MIN_TIMED_BATCHES:
        click.echo(f"warning: an epoch of {samples} samples is {batches} batch(es) of {batch_size}: too short to "
                   f"measure (the loaders' prefetched batches would be timed as instant); use at least "
                   f"{MIN_TIMED_BATCHES} batches, --limit {MIN_TIMED_BATCHES * batch_size} or more", err=True)
    return batches


def machine() -> dict:
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except ImportError:
        dali = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "dali": dali, "numpy": numpy.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}


class _Cycle:
    """The ceiling: batches already on the device, replayed for as many batches as an epoch has."""

    def __init__(self, batches, n):
        self.batches, self.n = batches, n

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield self.batches[i % len(self.batches)]

    def close(self):
        pass


def measure_row(job: dict) -> dict:
    """Runs inside the row's own process."""
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from dalipipe import device as dev
    from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
    from dalipipe.data.index import STORE_COLUMN
    from dalipipe.loading.loaders import make_loader

    index = pd.read_csv(job["index_csv"])
    if (STORE_COLUMN in index.columns) != (job["row"] in STORE_ROWS):
        raise RuntimeError(f"row {job['row']}: its index {'lacks' if job['row'] in STORE_ROWS else 'has'} the "
                           f"decoded store's column")
    norm = Normalization(tuple(job["mean"]), tuple(job["std"]))
    spec = AugmentSpec(image_size=job["image_size"])
    device = dev.resolve(job["device"])
    dev.configure(device, job["threads"])  # torch's threads, cuDNN and TF32, as `dalipipe train` sets them
    kind, workers, bs = job["row"], job["workers"], job["batch_size"]
    # The ceilings cycle a few batches already on the device: the loader that made them is not timed, and the
    # torch loader makes them without DALI (the GPU check measures the ceiling before it knows DALI works).
    build = "torch" if kind in ("torch", "torch-store") or kind.startswith("ceiling") else "dali"
    decoder = "cpu" if kind == "dali-cpudec" else "mixed"
    loader = make_loader(index, index["y"].to_numpy(), spec=spec, norm=norm, train=True, device=device,
                         settings=LoaderSettings(kind=build, batch_size=bs, workers=workers, decoder=decoder))
    if kind.startswith("ceiling"):
        # in the layout of the step (DALI's batches arrive so; the torch loader's are made so here, once)
        batches = [(dev.batch_layout(x, device).clone(), y.clone()) for _, (x, y) in zip(range(CEILING_BATCHES), loader)]
        n_batches = len(loader)
        loader.close()
        loader = _Cycle(batches, n_batches)
    model = opt = None
    if job["train"]:
        from dalipipe.model import build_model

        model = dev.place_model(build_model(int(index["y"].max()) + 1), device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
        if kind == "ceiling-compile":  # as `dalipipe train --compile`; the compile falls in the warm-up epoch
            from dalipipe.model import compiled

            model = compiled(model)
    ranges = StepRanges(device, exact=bool(job.get("profile_dir")))
    memory = DeviceMemory(device)

    def step(x, y):
        x = dev.batch_layout(x, device)
        with ranges("forward"), dev.autocast(device):
            loss = F.cross_entropy(model(x), y)
        with ranges("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with ranges("optimizer_step"):
            opt.step()

    def batches(epoch):
        """(x, y) with the time waited for each; progress on stderr for the parent's bar."""
        it = iter(loader)
        for i in range(len(loader) + 1):
            tw = time.perf_counter()
            with ranges("data_wait"):
                try:
                    x, y = next(it)
                except StopIteration:
                    return
                if job["train"]:
                    dev.synchronize(device)  # the batch is really there: the rest of the step is compute
            yield x, y, time.perf_counter() - tw
            print(f"@progress {epoch} {i + 1} {len(loader)}", file=sys.stderr, flush=True)

    per_epoch = []
    for epoch in range(job["epochs"] + 1):  # epoch 0 warms up (pipeline build, cuDNN autotune, compile)
        dev.synchronize(device)
        cpu0, t0 = cpu_snapshot(), time.perf_counter()
        wait, n = 0.0, 0
        for x, y, waited in batches(epoch):
            if job["train"]:
                wait += waited
                step(x, y)
                dev.synchronize(device)
            memory.sample()
            n += len(y)
        dev.synchronize(device)
        dt = time.perf_counter() - t0
        if epoch == 0:
            warmup_s = dt
            ranges.totals.clear()
        else:
            per_epoch.append({"seconds": dt, "images": n, "cpu": cpu_delta(cpu0, cpu_snapshot()), "wait": wait})
    profile = None
    if job.get("profile_dir"):
        profile = profile_steps(job, batches, step, ranges, memory, device)
    live_kb = descendants_peak_rss_kb()  # torch's workers, before close ends them (they are not our children)
    loader.close()
    ips = [e["images"] / e["seconds"] for e in per_epoch]
    images = sum(e["images"] for e in per_epoch)

    def per_1000(kind):
        if not all(kind in e["cpu"] for e in per_epoch):
            return None
        return 1000 * sum(e["cpu"][kind] for e in per_epoch) / images

    result = {"row": kind, "workers": workers, "device": str(device), "train": job["train"],
              "reads": "decoded store" if kind in STORE_ROWS else "PNG",
              "images_per_s": statistics.median(ips), "images_per_s_epochs": ips,
              "cpu_s_per_1000_images": per_1000("total"),
              # The loader's own threads and worker processes, and the training loop's main thread, apart.
              "loader_cpu_s_per_1000_images": per_1000("loader"), "main_cpu_s_per_1000_images": per_1000("main"),
              "peak_host_memory_mb": peak_host_memory_mb(live_kb), "images_per_epoch": per_epoch[0]["images"],
              # pipeline build, cuDNN autotuning, and for ceiling-compile the compilation
              "warmup_epoch_seconds": warmup_s, **memory.result()}
    if job["train"]:
        result["data_wait_fraction"] = statistics.median(e["wait"] / e["seconds"] for e in per_epoch)
    if profile:
        result["profile"] = profile
    return result


def profile_steps(job, batches, step, ranges, memory, device) -> dict:
    """A few dozen training steps under torch.profiler, after the timed epochs: a trace and a table."""
    ranges.totals.clear()
    ranges.steps = 0
    out = Path(job["profile_dir"])
    out.mkdir(parents=True, exist_ok=True)
    with profiler(device) as prof:
        epoch = 0
        while ranges.steps < job["profile_steps"]:
            epoch += 1
            for x, y, _ in batches(f"profile{epoch}"):
                step(x, y)
                memory.sample()
                ranges.steps += 1
                if ranges.steps >= job["profile_steps"]:
                    break
    trace = out / f"{job['row']}.pt.trace.json"  # the name TensorBoard's profiler plugin looks for
    prof.export_chrome_trace(str(trace))
    h2d = [e for e in prof.key_averages() if e.key == "h2d_copy"]
    rows, text = ranges.table(h2d_ms=h2d[0].cpu_time_total / 1000 if h2d else None)
    top = prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                    row_limit=15)
    (out / f"{job['row']}.ops.txt").write_text(top + "\n")
    return {"steps": ranges.steps, "ranges": rows, "table": text, "trace": str(trace)}


def run_row(job: dict, label: str) -> dict:
    """The row in its own process; its progress lines drive a bar here, the rest of stderr is kept for errors."""
    from tqdm.auto import tqdm

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    err: list[str] = []
    try:
        proc = subprocess.Popen([sys.executable, __file__, "--row-job", f.name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        with tqdm(desc=label, unit="batch", leave=False) as bar:
            for line in proc.stderr:
                if line.startswith("@progress "):
                    epoch, i, n = line.split()[1:]
                    name = "warm-up" if epoch == "0" else epoch if epoch.startswith("profile") else f"epoch {epoch}"
                    bar.total = int(n)
                    bar.set_postfix_str(name, refresh=False)
                    bar.n = int(i)
                    bar.refresh()
                else:
                    err.append(line)
        out = proc.stdout.read()
        proc.wait()
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise click.ClickException(f"row {job['row']} failed:\n{''.join(err)[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """The printed table; adds each row's ratio_to_torch and, to a store row, ratio_to_png (against the same
    loader reading the PNGs, in the same mode)."""
    base = {(r["train"], r["workers"], r.get("sweep", False)): r["images_per_s"] for r in results if r["row"] == "torch"}
    rate = {(r["row"], r["train"], r["workers"], r.get("sweep", False)): r["images_per_s"] for r in results}
    gpu = any("peak_device_memory_mb" in r for r in results)
    head = (f"{'row':15} {'mode':6} {'workers':>7} {'images/s':>10} {'x torch':>8} {'x PNG':>6} {'loader CPU s/1k':>15} "
            f"{'main CPU s/1k':>13} {'host MB':>8} {'data wait':>9}" + (f" {'device MB':>9}" if gpu else ""))
    lines = [head, "-" * len(head)]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in results:
        ref = base.get((r["train"], r["workers"], r.get("sweep", False)))
        ratio = f"{r['images_per_s'] / ref:.2f}" if ref else "-"
        wait = f"{100 * r['data_wait_fraction']:.1f}%" if "data_wait_fraction" in r else "-"
        r["ratio_to_torch"] = r["images_per_s"] / ref if ref else None
        png = rate.get((STORE_ROWS.get(r["row"]), r["train"], r["workers"], r.get("sweep", False)))
        if r["row"] in STORE_ROWS:
            r["ratio_to_png"] = r["images_per_s"] / png if png else None
        mode = "train" if r["train"] else "sweep" if r.get("sweep") else "load"
        lines.append(f"{r['row']:15} {mode:6} {r['workers']:>7} {r['images_per_s']:>10.0f} {ratio:>8} "
                     f"{num(r.get('ratio_to_png'), '.2f'):>6} "
                     f"{num(r.get('loader_cpu_s_per_1000_images'), '.2f'):>15} "
                     f"{num(r.get('main_cpu_s_per_1000_images'), '.2f'):>13} {r['peak_host_memory_mb']:>8.0f} {wait:>9}"
                     + (f" {num(r.get('peak_device_memory_mb'), '.0f'):>9}" if gpu else ""))
    return "\n".join(lines)


def plot(results: list[dict], info: dict, settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dalipipe.atomic import write_atomic

    main = [r for r in results if not r.get("sweep")]
    sweep = [r for r in results if r.get("sweep")]
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(11 if sweep else 6, 4), squeeze=False)
    ax = axes[0][0]
    labels = [f"{r['row']}\n{'train' if r['train'] else 'load'}" for r in main]
    bars = ax.bar(range(len(main)), [r["images_per_s"] for r in main],
                  color=[{"torch": "C0", "dali": "C2", "torch-store": "C9", "dali-store": "C8"}.get(r["row"], "C7")
                         for r in main])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks(range(len(main)), labels)
    ax.set_ylabel("images/s")
    ax.set_title(f"{info['gpu'] or info['cpu']} ({info['cpu_count']} CPUs)\n{settings['samples']} samples, batch "
                 f"{settings['batch_size']}, {settings['image_size']} px", fontsize=9)
    if sweep:
        ax2 = axes[0][1]
        for kind, color in (("torch", "C0"), ("dali", "C2")):
            pts = sorted((r["workers"], r["images_per_s"]) for r in sweep if r["row"] == kind)
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=kind)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("workers (processes for torch, threads for DALI)")
        ax2.set_ylabel("images/s")
        ax2.legend()
        ax2.grid(alpha=0.3)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


@click.command()
@click.option("--data", type=click.Path(file_okay=False), help="Challenge-layout folder (images_train/, y_train.csv). Default: a cached synthetic set.")
# --device, --batch-size, --image-size, --workers, --threads, --epochs, --limit, --profile-steps: declared, with
# their defaults and bounds, in the options table (settings.LoaderSpeedSettings), which checks them.
@options_of(LoaderSpeedSettings)
@click.option("--train", "train_mode", is_flag=True, help="Also time an efficientnet-b1 training step per batch.")
@click.option("--sweep", is_flag=True, help="Repeat torch and dali with 1, 2, 4, ... workers.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write all numbers and the machine here.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False),
              help="PNG of the table. [default: next to --json, else loader_speed.png (cost_by_size.png with "
                   "--source-sizes)]")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False),
              help="Profile training steps of --loader after its timed epochs: a trace per row and a table of ranges.")
@click.option("--loader", "profile_rows", multiple=True,
              type=click.Choice(ROWS),
              help="With --profile: the row(s) to profile (repeatable). [default: dali]")
@click.option("--rows", "only_rows", multiple=True, type=click.Choice(ROWS),
              help="Run only these rows (repeatable; rows that do not apply on this device are left out). [default: all]")
@click.option("--row-job", hidden=True, type=click.Path())
def main(data, train_mode, sweep, json_out, plot_out, profile_dir, profile_rows, only_rows, row_job, **opts):
    """Images/s, CPU time and memory of each loader, and the data stall in training."""
    command = " ".join(["python", "benchmarks/loader_speed.py", *sys.argv[1:]])
    if row_job:
        job = json.loads(Path(row_job).read_text())
        if job["row"] == "check":
            from cost_by_size import measure_check

            print(json.dumps(measure_check(job)))
        else:
            print(json.dumps(measure_row(job)))
        return
    try:
        s = LoaderSpeedSettings(**opts)  # the table's check of every option's bounds and choices
        sizes = s.source_size_list if s.source_sizes else None
    except DataError as e:
        raise click.ClickException(str(e)) from None
    if sizes:
        given = [flag for flag, on in (("--data", data), ("--train", train_mode), ("--sweep", sweep),
                                       ("--profile", profile_dir)) if on]
        if given:
            raise click.ClickException(f"--source-sizes draws its own synthetic sets and times loading only: "
                                       f"without {' and '.join(given)}")
        from cost_by_size import LOADERS

        if only_rows and not set(only_rows) & set(LOADERS):
            raise click.ClickException(f"--source-sizes runs the {', '.join(LOADERS)} rows: --rows picks among them")
        from cost_by_size import run

        try:
            run(s, only_rows, json_out, plot_out, command)
        except DataError as e:
            raise click.ClickException(str(e)) from None
        return
    if s.gpu_step_rate is not None:
        raise click.ClickException("--gpu-step-rate is set against the projections of --source-sizes: give both")
    device, batch_size, image_size, workers, threads, epochs, limit, profile_steps = (
        s.device, s.batch_size, s.image_size, s.workers, s.threads, s.epochs, s.limit, s.profile_steps)

    from dalipipe import device as dev
    from dalipipe.data.index import build_index, inspect_images
    from dalipipe.data.split import stratified_subset
    from dalipipe.data.stats import channel_stats

    try:
        torch_device = dev.resolve(device)
        root = ensure_data(data)
        index = build_index(root / "images_train", root / "y_train.csv")
    except DataError as e:
        raise click.ClickException(str(e)) from None
    on_cpu = torch_device.type == "cpu"
    from dalipipe.loading.loader_rules import default_threads, default_workers

    cores = os.cpu_count() or 1
    workers = default_workers() if workers is None else workers
    threads_given = threads
    train_mode = train_mode or bool(profile_dir)
    if epochs is None:
        epochs = 1 if train_mode and on_cpu else 3
    if limit is None and train_mode and on_cpu:
        limit = 128
        click.echo("no GPU: --train uses 128 samples and 1 timed epoch (a CPU step is ~100x slower than loading)", err=True)
    if limit is not None:
        index = stratified_subset(index, limit, 0)
    # On a GPU the DALI decoder arrangement is a choice (--decoder): both rows. On the CPU they are one.
    loaders = ("torch", "dali", "dali-cpudec", *STORE_ROWS) if not on_cpu else ("torch", "dali", *STORE_ROWS)
    jobs = [dict(row=row, workers=workers, train=False) for row in loaders]
    if profile_dir:
        jobs = [dict(row=row, workers=workers, train=True, profile_dir=str(Path(profile_dir).resolve()),
                     profile_steps=profile_steps) for row in (profile_rows or ("dali",))]
    elif train_mode:
        # torch.compile: on a GPU only (inductor compiles for minutes on a CPU).
        ceilings = ("ceiling",) if on_cpu else ("ceiling", "ceiling-compile")
        jobs += [dict(row=row, workers=workers, train=True) for row in (*loaders, *ceilings)]
    if sweep and not profile_dir:
        counts = [w for w in (1, 2, 4, 8, 16, 32, 64, 128) if w <= cores]
        jobs += [dict(row=row, workers=w, train=False, sweep=True) for w in counts for row in ("torch", "dali")]
    if only_rows and not profile_dir:
        jobs = [job for job in jobs if job["row"] in only_rows]
        if not jobs:
            raise click.ClickException(f"--rows {' '.join(only_rows)}: none of these rows runs here "
                                       f"({'no GPU; ' if on_cpu else ''}the compile and ceiling rows need --train)")
    for job in jobs:  # torch's threads as `dalipipe train` would give them beside the row's workers
        job["threads"] = threads_given or default_threads(job["workers"])
    # Most telling first (PRIORITY), so that a run stopped part-way (a time limit) still answers the main
    # questions.
    jobs.sort(key=lambda j: (bool(j.get("sweep")), PRIORITY.index((j["row"], j["train"]))
                             if (j["row"], j["train"]) in PRIORITY else len(PRIORITY)))
    with_store = any(job["row"] in STORE_ROWS for job in jobs)
    from dalipipe.atomic import save_json

    with tempfile.TemporaryDirectory() as tmp, scratch_store() if with_store else contextlib.nullcontext() as store:
        build = None
        try:
            if with_store:  # the PNG rows' index and the store rows', from the two timed checks
                index, stored, build = timed_checks(index, store)
                click.echo(store_text(build), err=True)
            else:
                index = inspect_images(index)
        except DataError as e:
            raise click.ClickException(str(e)) from None
        norm = channel_stats(index)
        batches = warn_if_short(len(index), batch_size)
        info = machine()
        settings = {"batch_size": batch_size, "image_size": image_size, "epochs": epochs,
                    "threads": threads_given or "as train: the cores the row's workers leave free",
                    "samples": len(index), "batches_per_epoch": batches,
                    "too_short_to_measure": batches < MIN_TIMED_BATCHES, "data": str(root), "command": command}
        index_csv = Path(tmp) / "index.csv"
        index.to_csv(index_csv, index=False)
        if with_store:
            store_csv = Path(tmp) / "index-store.csv"
            stored.to_csv(store_csv, index=False)
        base = {"mean": list(norm.mean), "std": list(norm.std), "image_size": image_size, "device": device,
                "batch_size": batch_size, "epochs": epochs}
        jobs = [dict(base, **job, index_csv=str(store_csv if job["row"] in STORE_ROWS else index_csv)) for job in jobs]

        def report(complete: bool) -> dict:
            return {"machine": info, "settings": settings, "store_build": build, "results": results,
                    "complete": complete}

        results = []
        for k, job in enumerate(jobs):
            label = f"[{k + 1}/{len(jobs)}] {job['row']} ({'train' if job['train'] else 'load'}, {job['workers']} workers)"
            res = run_row(job, label)
            res["sweep"] = bool(job.get("sweep"))
            results.append(res)
            click.echo(f"{label}: {res['images_per_s']:.0f} images/s", err=True)
            if json_out:  # after every row: a run stopped part-way still leaves the rows it finished
                save_json(report(False), json_out)
    text = table(results)  # adds each row's ratio_to_torch and ratio_to_png
    if json_out:
        save_json(report(True), json_out)
    plot_path = (Path(plot_out) if plot_out else Path(json_out).with_suffix(".png") if json_out
                 else Path(profile_dir) / "loader_speed.png" if profile_dir else Path("loader_speed.png"))
    plot(results, info, settings, plot_path)
    click.echo(f"\n{info['gpu'] or 'no GPU'}; {info['cpu']} x{info['cpu_count']}; torch {info['torch']}, DALI {info['dali']}; "
               f"{len(index)} samples, batch {batch_size}, {image_size} px, median of {epochs} epoch(s)"
               + (f"; epochs of {batches} batch(es) are too short to measure: the rates are overstated"
                  if batches < MIN_TIMED_BATCHES else ""))
    click.echo(text)
    if build:
        click.echo(store_text(build))
    for r in results:
        if "profile" in r:
            p = r["profile"]
            click.echo(f"\nprofile of {r['row']} (train, {r['workers']} workers), ranges synchronized at their ends:\n"
                       f"{p['table']}\ntrace (Perfetto, chrome://tracing, TensorBoard): {p['trace']}")
    click.echo(f"plot: {plot_path}" + (f"; numbers: {json_out}" if json_out else ""))


if __name__ == "__main__":
    main()
