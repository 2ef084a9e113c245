"""What each option beyond the reference recipe gives: the test set's balanced accuracy of the reference
recipe, of each option alone, of all of them together and of a k-fold ensemble, every row with the same
data, seed, image size and epochs.

    python benchmarks/recipe_table.py                                  # the synthetic set (made if absent)
    python benchmarks/recipe_table.py --subset 2400 --epochs 6 --json benchmarks/results/recipe-cpu.json
    python benchmarks/recipe_table.py --data DIR                       # DIR/images_train, y_train.csv,
                                                                       # images_test, y_test.csv

Every row trains (or reuses) runs through the command line, predicts the test images and scores them
against their answers. The test images are never seen in training; the validation split picks each run's
best epoch, as in any run. "tta" reuses the reference run and only predicts with --tta. The ensemble trains
one run per fold (the reference recipe on --folds K --fold I) and predicts with all of them at once.
"train s" is the sum of the run's epoch seconds (steps, validation, hand-off of its records) from its
metrics.jsonl; a run already in --work is reused, not trained again. On synthetic data the figures say
which options work at all, not what they give on real cells.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ALL = ["--ema", "0.999", "--class-weights", "balanced", "--schedule", "cosine", "--warmup-epochs", "1",
       "--label-smoothing", "0.1", "--tta-val"]
# name: (train options beyond the common ones, predict options); None trains nothing (reuses "reference").
ROWS = {
    "reference": ([], []),
    "tta": (None, ["--tta"]),
    "ema 0.999": (["--ema", "0.999"], []),
    "class weights balanced": (["--class-weights", "balanced"], []),
    "cosine, 1 warm-up epoch": (["--schedule", "cosine", "--warmup-epochs", "1"], []),
    "label smoothing 0.1": (["--label-smoothing", "0.1"], []),
    "all of them (+ --tta-val) + tta": (ALL, ["--tta"]),
    # The same recipe with another seed (another split, order and draws): how far rows differ by chance.
    "reference, --seed 43": (["--seed", "43"], []),
}


def dalipipe(*args, log: Path) -> float:
    """Run one command, its output appended to the log; its wall seconds."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ dalipipe " + " ".join(map(str, args)) + "\n")
        f.flush()
        r = subprocess.run([sys.executable, "-m", "dalipipe", *map(str, args)], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"dalipipe {args[0]} failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t0


def score(data: Path, work: Path, name: str, runs: list[Path], opts: list[str], log: Path) -> dict:
    sub = work / f"{name.replace(' ', '_').replace(',', '')}.csv"
    seconds = dalipipe("predict", *runs, data / "images_test", "--out", sub, "--force", "--device", "cpu", *opts,
                       log=log)
    from dalipipe.infer.score import score as balanced

    return {"test_balanced_accuracy": round(balanced(str(sub), str(data / "y_test.csv")), 4),
            "predict_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "recipe-table")
    ap.add_argument("--subset", type=int, default=2400, help="Labelled samples used (stratified); 0: all.")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    if not (args.data / "y_test.csv").exists():
        dalipipe("synth", args.data, log=Path("/dev/null"))
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "commands.log"
    common = ["--epochs", args.epochs, "--image-size", args.image_size, "--batch-size", args.batch_size,
              "--device", "cpu", *(["--subset", args.subset] if args.subset else [])]
    train = [args.data / "images_train", args.data / "y_train.csv"]

    def trained(name: str, opts: list) -> tuple[Path, float, dict]:
        """A run (trained unless its folder holds one), its epochs' seconds and its best epoch's row."""
        run = args.work / name.replace(" ", "_").replace(",", "")
        if not (run / "best.pt").exists():
            seed = [] if "--seed" in opts else ["--seed", args.seed]  # a row may bring its own
            dalipipe("train", *train, "--out", run, *common, *seed, *opts, log=log)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return run, sum(r["epoch_seconds"] for r in rows), max(rows, key=lambda r: r["val_balanced_accuracy"])

    results = []
    for name, (train_opts, predict_opts) in ROWS.items():
        run, seconds, best = trained("reference" if train_opts is None else name, train_opts or [])
        row = {"row": name, "train_options": " ".join(map(str, train_opts or [])),
               "predict_options": " ".join(predict_opts), "train_s": 0.0 if train_opts is None else round(seconds, 1),
               "best_val_balanced_accuracy": best["val_balanced_accuracy"], "best_epoch": best["epoch"],
               **score(args.data, args.work, name, [run], predict_opts, log)}
        results.append(row)
        print(json.dumps(row), flush=True)
    folds = [trained(f"fold {i} of {args.folds}", ["--folds", args.folds, "--fold", i])
             for i in range(1, args.folds + 1)]
    name = f"{args.folds}-fold ensemble"
    row = {"row": name, "train_options": f"--folds {args.folds} --fold I", "predict_options": "",
           "train_s": round(sum(f[1] for f in folds), 1),
           "best_val_balanced_accuracy": [f[2]["val_balanced_accuracy"] for f in folds],
           "best_epoch": [f[2]["epoch"] for f in folds], **score(args.data, args.work, name, [f[0] for f in folds], [], log)}
    results.append(row)
    print(json.dumps(row), flush=True)

    print("\n| recipe | test balanced accuracy | best validation | train s (epochs) | predict s |\n|---|---|---|---|---|")
    for r in results:
        val = r["best_val_balanced_accuracy"]
        val = ", ".join(f"{v:.3f}" for v in val) if isinstance(val, list) else f"{val:.3f}"
        print(f"| {r['row']} | {r['test_balanced_accuracy']:.3f} | {val} | {r['train_s']:.0f} | {r['predict_s']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"), "settings": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
