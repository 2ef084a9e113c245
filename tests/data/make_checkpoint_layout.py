"""Writes tests/data/checkpoint_layout.json from two checkpoints of tiny runs (one CPU process, --ema):
one saved at an epoch's end, one in the middle of an epoch (--time-limit). Run from the repository root: python tests/data/make_checkpoint_layout.py"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dalipipe import checkpoint  # noqa: E402
from dalipipe.config import AugmentSpec, TrainConfig  # noqa: E402
from dalipipe.data.synthetic import generate  # noqa: E402
from dalipipe.run.train import train  # noqa: E402
from dalipipe.settings import SynthSpec  # noqa: E402
from tests.checkpoint_layout import LAYOUT_FILE, describe  # noqa: E402


def layouts(data: Path, work: Path) -> dict:
    """The layout of this release's checkpoints, from two tiny runs in `work` on the synthetic data."""
    cfg = dict(images_dir=str(data / "images_train"), labels_csv=str(data / "y_train.csv"), batch_size=32,
               device="cpu", workers=1, loader="torch", augment=AugmentSpec(image_size=16), ema=0.9)
    train(TrainConfig(out_dir=str(work / "end"), epochs=1, **cfg))
    train(TrainConfig(out_dir=str(work / "mid"), epochs=1, time_limit_minutes=1e-6, **cfg))
    return {"format": checkpoint.FORMAT,
            "epoch_end": describe(checkpoint.load(work / "end" / "last.pt")),
            "mid_epoch": describe(checkpoint.load(work / "mid" / "last.pt"))}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "data", SynthSpec(n_train=240, n_test=60, n_classes=4, image_size=32, seed=3))
        layout = layouts(data, Path(tmp))
    LAYOUT_FILE.write_text(json.dumps(layout, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
