"""What a run's bookkeeping costs per epoch: the wall time of an epoch outside its training and validation
steps (checkpoints, plots, predictions CSV, metrics), measured as a slope so that start-up cancels out.

For each setting, `dalipipe train` runs twice in this process, with few and with many epochs:
    per-epoch wall   = (wall(many) - wall(few)) / (many - few)      the whole run, closing writes included
    per-epoch steps  = the same slope of the training + validation step time the run reports
    outside steps    = per-epoch wall - per-epoch steps
A background writer that slows the steps it overlaps shows up in `per-epoch steps` (compare with a run
that writes in the foreground); a slow disk shows up in `outside steps`. The slope also holds the machine's
drift between the two runs, so the column `in loop` measures the same thing inside each epoch: its wall time
after the steps and validation, which is what the training loop waits for at the epoch's end.

    python benchmarks/record_cost.py                      # tiny epochs and 105-step epochs, local disk and slow fsync
    python benchmarks/record_cost.py --fsync-delay 0.1    # every fsync takes 0.1 s longer (a busy network filesystem)
    python benchmarks/record_cost.py --json out.json

Runs on the CPU (the bookkeeping is the same on a GPU; its share of an epoch is not: see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Tiny epochs, where bookkeeping dominates; and epochs of the reference recipe's step count (6,742 training
# samples at batch 64: 105 steps), here at batch 16 on 32 px inputs so that the CPU gets through them.
SETTINGS = {
    "tiny": {"subset": 96, "epochs": (2, 12)},
    "105 steps": {"subset": 2400, "epochs": (2, 4)},
}
COMMON = {"image_size": 32, "batch_size": 16, "device": "cpu", "loader": "dali"}


@contextlib.contextmanager
def slow_fsync(delay: float):
    """Every os.fsync takes `delay` seconds longer, as on a busy network filesystem."""
    real = os.fsync
    if delay:
        def fsync(fd):
            time.sleep(delay)
            real(fd)
        os.fsync = fsync
    try:
        yield
    finally:
        os.fsync = real


def one_run(data: Path, work: Path, name: str, subset: int, epochs: int) -> dict:
    from dalipipe.config import AugmentSpec, TrainConfig
    from dalipipe.run.train import train

    cfg = TrainConfig(images_dir=str(data / "images_train"), labels_csv=str(data / "y_train.csv"),
                      out_dir=str(work / name), augment=AugmentSpec(image_size=COMMON["image_size"]),
                      epochs=epochs, subset=subset, batch_size=COMMON["batch_size"], device=COMMON["device"],
                      loader=COMMON["loader"])
    # train's callback, on this clock: ("epochs", steps per epoch) as the first epoch starts, ("epoch_end", n)
    # after each whole epoch (steps, validation, the hand-off of its checkpoint and records)
    events: list[tuple[str, int, float]] = []
    t = time.perf_counter()
    result = train(cfg, observe=lambda event, value: events.append((event, value, time.perf_counter())))
    wall = time.perf_counter() - t
    steps = sum(h["epoch_seconds"] for h in result.history)  # each epoch's steps and validation
    scores = [h["val_balanced_accuracy"] for h in result.history]
    improved = sum(s > max(scores[:i], default=-1.0) for i, s in enumerate(scores))
    # Measured inside each epoch: its wall time after the steps and validation (what the loop itself waits
    # for at the epoch's end), without the machine's drift between two runs that the slope also holds.
    ends = [at for event, _, at in events if event in ("epochs", "epoch_end")]
    in_loop = [b - a - h["epoch_seconds"] for a, b, h in zip(ends, ends[1:], result.history)]
    steps_per_epoch = next(value for event, value, _ in events if event == "epochs")
    return {"wall_s": wall, "steps_s": steps, "steps_per_epoch": steps_per_epoch, "improved": improved,
            "in_loop_s": statistics.mean(in_loop)}


def measure(data: Path, work: Path, label: str, setting: dict, delay: float, repeats: int) -> dict:
    few, many = setting["epochs"]
    walls, steps, improved, in_loop = [], [], [], []
    with slow_fsync(delay):
        for r in range(repeats):
            a = one_run(data, work, f"{label}-{delay}-{r}-few", setting["subset"], few)
            b = one_run(data, work, f"{label}-{delay}-{r}-many", setting["subset"], many)
            walls.append((b["wall_s"] - a["wall_s"]) / (many - few))
            steps.append((b["steps_s"] - a["steps_s"]) / (many - few))
            improved.append(b["improved"])
            in_loop.append(b["in_loop_s"])
    wall, step = statistics.median(walls), statistics.median(steps)
    return {"setting": label, "fsync_delay_s": delay, "steps_per_epoch": a["steps_per_epoch"], "epochs": [few, many],
            "per_epoch_wall_s": round(wall, 3), "per_epoch_steps_s": round(step, 3),
            "outside_steps_s": round(wall - step, 3), "epoch_end_in_loop_s": round(statistics.median(in_loop), 3),
            "repeats": repeats,
            # epochs of the longer run that improved on the best so far (each writes best.pt, CSV and a plot)
            "improved_epochs": improved}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fsync-delay", type=float, action="append",
                    help="Seconds added to every fsync (repeatable). [default: 0 and 0.1]")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--repeats", type=int, default=1, help="Pairs of runs per row; the median slope is kept.")
    ap.add_argument("--epochs", type=int, nargs=2, metavar=("FEW", "MANY"),
                    help="Epochs of the two runs of every setting. [default: 2 12 for tiny, 2 4 for 105 steps]")
    ap.add_argument("--json", type=Path, help="Also write the rows here.")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from dalipipe.atomic import save_json
    from dalipipe.data.synthetic import generate
    from dalipipe.settings import SynthSpec

    delays = args.fsync_delay or [0.0, 0.1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dalipipe-record-cost-") as tmp:
        tmp = Path(tmp)
        n = max(SETTINGS[s]["subset"] for s in args.settings)
        generate(tmp / "data", SynthSpec(n_train=n, n_test=18, n_classes=4))
        one_run(tmp / "data", tmp, "warm-up", SETTINGS[args.settings[0]]["subset"], 1)  # caches, imports
        print(f"{'setting':>10} {'fsync +s':>8} {'steps':>5} {'epoch s':>8} {'steps s':>8} {'outside s':>9} {'in loop s':>9} improved")
        for label in args.settings:
            for delay in delays:
                setting = dict(SETTINGS[label], **({"epochs": tuple(args.epochs)} if args.epochs else {}))
                row = measure(tmp / "data", tmp, label, setting, delay, args.repeats)
                rows.append(row)
                print(f"{label:>10} {delay:8.2f} {row['steps_per_epoch']:5d} {row['per_epoch_wall_s']:8.3f} "
                      f"{row['per_epoch_steps_s']:8.3f} {row['outside_steps_s']:9.3f} "
                      f"{row['epoch_end_in_loop_s']:9.3f} {row['improved_epochs']}", flush=True)
    if args.json:
        save_json({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                   "common": COMMON, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
