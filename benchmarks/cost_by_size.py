"""What each source image size costs: `loader_speed.py --source-sizes 64,256,512,1024`.

For each side given, a synthetic set of that size (generated once into the cache, as the default set is),
then, each in its own process (loader_speed.run_row):
  check cold, check warm  `dalipipe check` over the set with its memory of checked files empty, then again
           over the unchanged files (the memory the cold run left). Timed inside the process: Python's start
           and imports are not in it. The files are in the OS's page cache both times (just written or read);
  check store  `dalipipe check --decode-once` with its memory empty and an empty store (in the cache folder,
           removed at the end): each sample decoded once, checked and written to the decoded store in one
           pass, the time a first run's check takes with the store; its store_disk_mb is the store's size;
  torch, dali, torch-store, dali-store  the loader_speed.py rows, loading only, at --image-size; the store
           rows read the store that check store built.
Per loader, images/s per core is 1000 / (CPU s per 1,000 images, the row's process and its children), and
the projection is that rate times --projected-cores: an estimate of what the loader delivers on a GPU machine
with that many cores, assuming decoding spreads over them as well as here and that they are as fast. On a GPU
the PNGs are still decoded on CPU threads (there is no GPU PNG codec, even for DALI's mixed decoder), while the
resize and augmentation move to the GPU: the CPU measured here is an upper bound of what is left there. It is
set against --gpu-step-rate, a training step's images/s on a GPU given by the user: nothing here measures a
GPU step. Host memory: the peak of the row's process (VmHWM) or of its largest worker.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
from loader_speed import MIN_TIMED_BATCHES, STORE_ROWS, cached_synthetic, disk_mb, machine, run_row, scratch_store, warn_if_short
from probes import cpu_delta, cpu_snapshot, peak_host_memory_mb

from dalipipe.settings import SynthSpec

LOADERS = ("torch", "dali", *STORE_ROWS)
ESTIMATE = ("estimate: images/s per core measured here x {cores} cores; assumes decoding spreads over them "
            "as well as here and that they are as fast; on a GPU, the resize and augmentation leave the CPU, "
            "the PNG decoding does not")


def ensure_sized(size: int, n: int) -> Path:
    """A synthetic set of n training samples of size x size px (no test set), generated once into the cache."""
    return cached_synthetic(f"bench-synthetic-{size}px-n{n}-v1", SynthSpec(n_train=n, n_test=0, image_size=size),
                            f"a {size} px synthetic set of {n} samples")


def measure_check(job: dict) -> dict:
    """Runs inside the row's own process: `dalipipe check` of the set, with the check's memory in job's folder."""
    os.environ["DALIPIPE_CACHE_DIR"] = job["cache_dir"]  # read when the check opens its memory
    import sklearn.model_selection  # noqa: F401  (the split's, imported once per command: not a per-sample cost)

    from dalipipe.data.check import summarize
    from dalipipe.data.check_cache import CheckCache
    from dalipipe.settings import CheckSettings

    remembered = len(CheckCache(job["images_dir"]).entries)  # 0 when cold; every sample when warm
    store = job.get("store")
    cpu0, t0 = cpu_snapshot(), time.perf_counter()
    summarize(CheckSettings(job["images_dir"], job["labels_csv"], decode_once=bool(store), store=store))
    seconds = time.perf_counter() - t0
    cpu = cpu_delta(cpu0, cpu_snapshot())["total"]
    return {"seconds": seconds, "samples": job["samples"], "remembered_before": remembered,
            "images_per_s": job["samples"] / seconds, "cpu_s_per_1000_images": 1000 * cpu / job["samples"],
            "peak_host_memory_mb": peak_host_memory_mb()}


def project(r: dict, cores: int, step_rate: float | None) -> None:
    """Adds the rate per core, its projection to `cores` cores and, with a step rate, which one limits."""
    cpu = r.get("cpu_s_per_1000_images")
    per_core = 1000 / cpu if cpu else None  # a row shorter than a clock tick has no CPU figure
    r["images_per_s_per_core"] = per_core
    r["projected_images_per_s"] = per_core * cores if per_core else None
    r["limit"] = (None if step_rate is None or per_core is None
                  else "decoding limits" if per_core * cores < step_rate else "keeps up")


def run(s, rows: tuple[str, ...], json_out: str | None, plot_out: str | None, command: str) -> None:
    """The mode: every size in turn, a JSON after every row, then the table and the plot."""
    from dalipipe import device as dev
    from dalipipe.atomic import save_json
    from dalipipe.data.index import build_index, inspect_images
    from dalipipe.data.stats import channel_stats
    from dalipipe.loading.loader_rules import default_threads, default_workers

    dev.resolve(s.device)  # a GPU asked for and missing is refused before any set is drawn
    loaders = [r for r in LOADERS if not rows or r in rows]
    n = s.limit or MIN_TIMED_BATCHES * s.batch_size  # the fewest samples whose epoch is long enough to time
    classes = SynthSpec.n_classes  # the default: the challenge's cell lines
    if n < 2 * classes:  # the synthetic set's own rule, said here in this command's terms
        raise click.ClickException(f"--limit: at least {2 * classes} with --source-sizes (two samples of each of "
                                   f"the synthetic set's {classes} classes), got {n}")
    workers = s.workers or default_workers()
    epochs = s.epochs or 3
    batches = warn_if_short(n, s.batch_size)
    info = machine()
    settings = {"source_sizes": list(s.source_size_list), "samples_per_size": n, "image_size": s.image_size,
                "batch_size": s.batch_size, "workers": workers, "epochs": epochs, "batches_per_epoch": batches,
                "too_short_to_measure": batches < MIN_TIMED_BATCHES, "projected_cores": s.projected_cores,
                "projection": ESTIMATE.format(cores=s.projected_cores),
                "gpu_step_rate_images_per_s": s.gpu_step_rate,
                "gpu_step_rate_source": "given with --gpu-step-rate, not measured" if s.gpu_step_rate else None,
                "command": command}
    results: list[dict] = []

    def done(complete: bool) -> None:
        if json_out:
            save_json({"machine": info, "settings": settings, "results": results, "complete": complete}, json_out)

    with_store = any(row in STORE_ROWS for row in loaders)
    total = len(settings["source_sizes"]) * (2 + with_store + len(loaders))
    for size in settings["source_sizes"]:
        root = ensure_sized(size, n)
        with tempfile.TemporaryDirectory() as tmp, scratch_store() as store:
            check = {"row": "check", "images_dir": str(root / "images_train"), "labels_csv": str(root / "y_train.csv"),
                     "samples": n, "cache_dir": str(Path(tmp) / "check-cache")}  # empty: the cold run fills it
            states = [("cold", check), ("warm", check)]
            if with_store:  # its own empty memory: the one pass of a first run's check with the store
                states.append(("store", dict(check, cache_dir=str(Path(tmp) / "check-cache-store"), store=store)))
            for state, job in states:
                label = f"[{len(results) + 1}/{total}] {size} px: check ({state})"
                results.append({"source_size": size, "row": f"check-{state}", **run_row(job, label)})
                if state == "store":
                    results[-1]["store_disk_mb"] = disk_mb(store)
                click.echo(f"{label}: {results[-1]['images_per_s']:.0f} samples/s", err=True)
                done(False)
            index = build_index(root / "images_train", root / "y_train.csv")
            stored = inspect_images(index, store=store) if with_store else None  # all there: nothing decoded
            index = inspect_images(index)
            norm = channel_stats(index)
            index_csv, store_csv = Path(tmp) / "index.csv", Path(tmp) / "index-store.csv"
            index.to_csv(index_csv, index=False)
            if with_store:
                stored.to_csv(store_csv, index=False)
            for row in loaders:
                job = {"row": row, "index_csv": str(store_csv if row in STORE_ROWS else index_csv),
                       "mean": list(norm.mean), "std": list(norm.std),
                       "image_size": s.image_size, "device": s.device, "batch_size": s.batch_size, "epochs": epochs,
                       "workers": workers, "threads": s.threads or default_threads(workers), "train": False}
                label = f"[{len(results) + 1}/{total}] {size} px: {row} (load, {workers} workers)"
                res = {"source_size": size, **run_row(job, label)}
                project(res, s.projected_cores, s.gpu_step_rate)
                results.append(res)
                click.echo(f"{label}: {res['images_per_s']:.0f} images/s", err=True)
                done(False)
    done(True)
    plot_path = (Path(plot_out) if plot_out else Path(json_out).with_suffix(".png") if json_out
                 else Path("cost_by_size.png"))
    plot(results, info, settings, plot_path)
    click.echo(f"\n{info['gpu'] or 'no GPU'}; {info['cpu']} x{info['cpu_count']}; torch {info['torch']}, DALI "
               f"{info['dali']}; {n} samples per size, batch {s.batch_size}, output {s.image_size} px, {workers} "
               f"workers, median of {epochs} epoch(s)"
               + ("; epochs this short are overstated" if batches < MIN_TIMED_BATCHES else ""))
    click.echo(table(results, settings))
    click.echo(f"plot: {plot_path}" + (f"; numbers: {json_out}" if json_out else ""))


def table(results: list[dict], settings: dict) -> str:
    cores, step = settings["projected_cores"], settings["gpu_step_rate_images_per_s"]
    est = f"x{cores} cores (est.)"
    head = (f"{'source px':>9}  {'row':11} {'images/s':>9} {'CPU s/1k':>9} {'host MB':>8} {'per core':>9} "
            f"{est:>18}  vs GPU step")
    lines = [head, "-" * len(head)]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in results:
        loader = r["row"] in LOADERS
        lines.append(f"{r['source_size']:>9}  {r['row'].replace('-', ' '):11} {r['images_per_s']:>9.0f} "
                     f"{num(r['cpu_s_per_1000_images'], '.2f'):>9} {r['peak_host_memory_mb']:>8.0f} "
                     f"{num(r.get('images_per_s_per_core') if loader else None, '.0f'):>9} "
                     f"{num(r.get('projected_images_per_s') if loader else None, '.0f'):>18}  "
                     f"{(r.get('limit') or '-') if loader else ''}".rstrip())
    lines.append(f"images/s: samples of three PNGs per second (the check's samples/s). {est}: per core x {cores}, "
                 "an estimate, not a measurement.")
    stores = [f"{r['source_size']} px {r['store_disk_mb']:.1f} MB" for r in results if "store_disk_mb" in r]
    if stores:
        lines.append("check store: the cold check that also writes the decoded store (one pass); the store on disk: "
                     + ", ".join(stores))
    lines.append(f"training step on a GPU: {step:g} images/s, given with --gpu-step-rate, not measured"
                 if step else "training step on a GPU: not given (--gpu-step-rate) and not measured here")
    return "\n".join(lines)


def plot(results: list[dict], info: dict, settings: dict, path: Path) -> None:
    """Left: what each row measured against the source size; right: the loaders' projection and the step rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dalipipe.atomic import write_atomic

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"torch": ("C0", "o-"), "dali": ("C2", "o-"), "torch-store": ("C0", "^--"), "dali-store": ("C2", "^--"),
              "check-cold": ("C7", "s--"), "check-warm": ("C7", "s:"), "check-store": ("C5", "s-.")}
    for row, (color, style) in styles.items():
        pts = [(r["source_size"], r["images_per_s"]) for r in results if r["row"] == row]
        if pts:
            ax.plot(*zip(*pts), style, color=color, label=row.replace("-", " "))
        proj = [(r["source_size"], r["projected_images_per_s"]) for r in results
                if r["row"] == row and r.get("projected_images_per_s")]
        if proj:
            ax2.plot(*zip(*proj), style, color=color, label=f"{row}, estimate")
    if settings["gpu_step_rate_images_per_s"]:
        ax2.axhline(settings["gpu_step_rate_images_per_s"], color="C3", ls="--", label="GPU step (given, not measured)")
    ax.set_title(f"measured: {info['gpu'] or info['cpu']} ({info['cpu_count']} CPUs)\n"
                 f"{settings['samples_per_size']} samples, output {settings['image_size']} px", fontsize=9)
    ax2.set_title(f"projected to {settings['projected_cores']} cores (per-core rate x {settings['projected_cores']})",
                  fontsize=9)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(settings["source_sizes"], [str(s) for s in settings["source_sizes"]])
        a.minorticks_off()
        a.set_yscale("log")
        a.set_xlabel("source image side (px)")
        a.set_ylabel("images/s")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
