"""`make demo`: synthetic data (if absent) -> train -> predict -> score against the synthetic answers.

With a GPU it runs the reference recipe. Without one it picks, and says that it picks, a configuration
that finishes in a few minutes on a laptop CPU and still learns visibly. Stopped (Ctrl-C, a kill) before
its predictions were written, the next demo goes on with the same run: it resumes the training where the
last checkpoint left it, then predicts and scores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dalipipe.child_processes import die_with_parent
from dalipipe.cli import NO_INTERRUPT_HINT, Terminated
from dalipipe.constants import CKPT_LAST, CONFIG_FILE, EXIT_INTERRUPTED, EXIT_TERMINATED, METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]
SUBMISSION = "submission.csv"


def run(*args: str) -> None:
    print("$ dalipipe " + " ".join(args), flush=True)
    # On Ctrl-C the demo says in one line what `make demo` does next; dalipipe's own line would point at
    # `dalipipe train --resume`, which leaves out the demo's predict and score.
    child = subprocess.Popen([sys.executable, "-m", "dalipipe", *args], env={**os.environ, NO_INTERRUPT_HINT: "1"})
    try:
        code = child.wait()
    except Terminated:
        # A SIGTERM for the demo (or for `make demo`, passed on by stop_with_make) did not reach dalipipe:
        # pass it on, and let dalipipe stop as it does at a SIGTERM of its own (its pending writes done).
        child.send_signal(signal.SIGTERM)
        child.wait()
        raise
    except KeyboardInterrupt:
        # Ctrl-C reached dalipipe too: let it finish stopping cleanly (it says what it leaves on disk).
        child.wait()
        raise
    if code in (EXIT_TERMINATED, -signal.SIGTERM):
        raise Terminated
    if code in (EXIT_INTERRUPTED, -signal.SIGINT):
        raise KeyboardInterrupt
    if code != 0:
        sys.exit(code)


def plan(runs: Path) -> tuple[Path, str]:
    """The demo's run folder and what to do there: "predict" with the latest demo run if it trained all
    its epochs but wrote no predictions yet, "resume" it if it has a checkpoint, "train" again in it if it
    was stopped before its first checkpoint, else "train" a new run. Folder names sort by their start time."""
    latest = max((p for p in runs.glob("demo-*") if p.is_dir()), default=None)
    if latest is not None and not (latest / SUBMISSION).exists():
        if (latest / CKPT_LAST).exists():
            return latest, "predict" if trained_to_the_end(latest) else "resume"
        if not (latest / METRICS_FILE).exists():
            return latest, "train"
    return runs / time.strftime("demo-%Y%m%d-%H%M%S"), "train"


def trained_to_the_end(run_dir: Path) -> bool:
    """Every epoch of its config in metrics.jsonl (written after each epoch's checkpoint)."""
    try:
        epochs = json.loads((run_dir / CONFIG_FILE).read_text())["epochs"]
        return len((run_dir / METRICS_FILE).read_text().splitlines()) >= epochs
    except (OSError, ValueError, KeyError):
        return False


def train_options() -> list[str]:
    """The options of a new demo run, said in words."""
    import torch

    if torch.cuda.is_available():
        print(f"GPU found ({torch.cuda.get_device_name(0)}): the reference recipe, 224 px, 30 epochs, all samples.")
        return []
    print("No GPU found: a CPU demo configuration that finishes in a few minutes: 64 px images (the native\n"
          "size, no upscaling), a stratified subset of 1,800 labelled samples, 6 epochs, batch 32,\n"
          "learning rate 1e-3 from scratch. The reference recipe (224 px, 30 epochs, 9,632 samples) would take days on a CPU.")
    return ["--image-size", "64", "--subset", "1800", "--epochs", "6", "--batch-size", "32", "--device", "cpu"]


def demo(root: Path) -> None:
    data = root / "data" / "synthetic"
    if not (data / "y_train.csv").exists():
        run("synth", str(data))
    run_dir, action = plan(root / "runs")
    t0 = time.time()
    if action == "resume":
        print(f"Continuing the unfinished demo run {run_dir.relative_to(root)} with its own settings.")
        run("train", "--resume", str(run_dir))
    elif action == "predict":
        print(f"The demo run {run_dir.relative_to(root)} has trained all its epochs: on to its predictions.")
    else:
        opts = train_options()
        run("train", str(data / "images_train"), str(data / "y_train.csv"), "--out", str(run_dir), *opts)
    sub = run_dir / SUBMISSION
    run("predict", str(run_dir), str(data / "images_test"), "--out", str(sub), "--ids",
        str(data / "sample_submission.csv"))
    run("score", str(sub), str(data / "y_test.csv"))
    print(f"demo done in {time.time() - t0:.0f} s; run directory {run_dir.relative_to(root)} "
          "(metrics.jsonl, learning_curves.png, confusion_matrix.png, train_batch.png: what the model is fed, "
          "best.pt, submission.csv); to see the loaders' output beside the stored channels: "
          f"dalipipe preview {data.relative_to(root) / 'images_train'} {data.relative_to(root) / 'y_train.csv'}")


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the stopping (dalipipe's pending writes) goes on
    raise Terminated()


def stop_with_make() -> None:
    """A SIGTERM for `make demo` (`kill`, a scheduler) ends make at once and would leave this script running
    on its own, unseen: Linux is asked to send it a SIGTERM when its parent ends, and a SIGTERM stops the demo
    as Ctrl-C does, saying what is on disk."""
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _terminated)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # it ended before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def main(root: Path = ROOT) -> None:
    try:
        stop_with_make()
        demo(root)
    except KeyboardInterrupt as e:
        run_dir, action = plan(root / "runs")  # what the next demo will do
        name = run_dir.relative_to(root)
        what = {"resume": f"resumes {name} from its last checkpoint, then predicts and scores",
                "predict": f"predicts with {name} and scores"}.get(action) or (
            f"trains {name} again from the start" if run_dir.exists() else "starts a new run")
        how = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"\ndemo {how}; run `make demo` again: it {what}", file=sys.stderr)
        sys.exit(EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
