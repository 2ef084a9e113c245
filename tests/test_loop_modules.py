"""One epoch's training loop reads in few files: the package modules whose functions run while train_epoch
runs (mid-epoch checkpoints included, in every thread of the process: the checkpoint's background write
too) stay at most MAX_LOOP_MODULES, so that a reader follows one step, and one save, in that many files."""

from __future__ import annotations

import sys
import threading

import pytest

from dalipipe.config import AugmentSpec, TrainConfig
from dalipipe.run import train as loop

MAX_LOOP_MODULES = 10


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_one_epochs_loop_touches_at_most_ten_package_modules(small_synth, tmp_path, monkeypatch, loader):
    touched, inside = set(), threading.Event()

    def profile(frame, event, arg):
        if event == "call" and inside.is_set():
            name = frame.f_globals.get("__name__", "")
            if name.startswith("dalipipe"):
                touched.add(name)

    epoch = loop.train_epoch

    def profiled(*args, **kwargs):
        inside.set()
        sys.setprofile(profile)
        try:
            return epoch(*args, **kwargs)
        finally:
            sys.setprofile(None)
            inside.clear()

    monkeypatch.setattr(loop, "train_epoch", profiled)
    threading.setprofile(profile)  # the threads started from here on: the recorder's writer
    try:
        d = small_synth
        # 96 samples, batch 16: 5 steps, a checkpoint after each of the first 4; each save waits for the
        # previous one's write, so that at least three writes happen whole inside the epoch.
        loop.train(TrainConfig(images_dir=str(d / "images_train"), labels_csv=str(d / "y_train.csv"),
                               out_dir=str(tmp_path / "run"), epochs=1, subset=96, batch_size=16, device="cpu",
                               workers=1, loader=loader, augment=AugmentSpec(image_size=16), checkpoint_every=1))
    finally:
        threading.setprofile(None)
    assert "dalipipe.checkpoint" in touched and "dalipipe.atomic" in touched, "the profile missed the saves"
    modules = sorted(n.removeprefix("dalipipe.") for n in touched)
    assert len(modules) <= MAX_LOOP_MODULES, f"{len(modules)} modules: {modules}"
