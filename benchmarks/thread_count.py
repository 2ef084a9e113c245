"""What torch's thread count does to CPU training, on a quiet machine and beside busy processes.

    python benchmarks/thread_count.py --data data/synthetic [--threads 1 2] [--busy 0 2] [--repeats 2]

For each number of busy processes (each spins one core, as another job on a shared machine would) and
each --threads value, in turn and repeated (A B A B ...: a drift of the machine's speed falls on every
setting alike), it runs `dalipipe train` for two short epochs and reads the training images/s of the second
epoch (the first also starts the loader and warms the caches) from the run's metrics.jsonl. The default
settings are `dalipipe train`'s own apart from the thread count: the loader, its workers, the model.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

SPIN = "while True: pass"


def one_run(data: Path, threads: int, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "dalipipe", "train", str(data / "images_train"), str(data / "y_train.csv"),
           "--out", str(out), "--threads", str(threads), "--device", "cpu", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if r.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["train_images_per_s"]


@click.command()
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Challenge-layout folder (images_train/, y_train.csv).")
@click.option("--threads", "thread_counts", type=int, multiple=True, default=(1, 2), show_default=True)
@click.option("--busy", "busy_counts", type=int, multiple=True, default=(0, 2), show_default=True,
              help="Processes spinning beside the training, one core each.")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--train-args", default="--epochs 2 --batch-size 16 --image-size 32 --subset 600", show_default=True,
              help="The rest of the train command.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the numbers here.")
def main(data, thread_counts, busy_counts, repeats, train_args, json_out):
    """Training images/s at each thread count, quiet and beside busy processes."""
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for busy in busy_counts:
            spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
            try:
                for k in range(repeats):
                    for threads in thread_counts:
                        key = f"busy {busy}, threads {threads}"
                        speed = one_run(data, threads, Path(tmp) / f"{busy}-{threads}-{k}", train_args.split())
                        results.setdefault(key, []).append(speed)
                        click.echo(f"{key}: {speed:.1f} images/s", err=True)
            finally:
                for s in spinners:
                    s.kill()
                    s.wait()
    click.echo(f"{'setting':24} {'images/s (each run)':>28} {'median':>8}")
    for key, speeds in results.items():
        click.echo(f"{key:24} {' '.join(f'{v:.1f}' for v in speeds):>28} {statistics.median(speeds):>8.1f}")
    if json_out:
        json_out.write_text(json.dumps({"cores": os.cpu_count(), "train_args": train_args, "images_per_s": results},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
