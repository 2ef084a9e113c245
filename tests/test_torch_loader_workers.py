"""The torch loader's worker processes: a stuck worker ends in one line that names the loader and the batch,
and the persistent workers draw each epoch's augmentation as a function of (seed, epoch, sample)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dalipipe import constants
from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
from dalipipe.errors import DataError
from dalipipe.loading.torch_loader import TorchLoader

CPU = torch.device("cpu")
NORM = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def loader(paths, *, train=True, state=None, batch_size=8):
    return TorchLoader(paths, np.arange(len(paths)), spec=AugmentSpec(image_size=16), norm=NORM, train=train,
                       device=CPU, settings=LoaderSettings(kind="torch", batch_size=batch_size, workers=2, seed=5),
                       state=state)


@pytest.mark.parametrize("train, which", [(True, "training batch 1 of epoch 1"),
                                          (False, "evaluation batch 1 of pass 1")])
def test_a_stuck_worker_is_one_line_naming_the_loader_and_the_batch(tmp_path, monkeypatch, train, which):
    """Every image is a named pipe that no one writes: a worker's read blocks for good, as on a file system
    that hangs."""
    fifo = tmp_path / "00001_blue.png"
    os.mkfifo(fifo)
    monkeypatch.setattr(constants, "TORCH_LOADER_TIMEOUT_S", 1.0)
    stuck = loader([[str(fifo)] * 3] * 4, train=train, batch_size=2)
    try:
        with pytest.raises(DataError) as e:
            next(iter(stuck))
        message = str(e.value)
        assert message.startswith(f"the torch loader's workers gave no {which} in 1 s: a worker is stuck")
        assert "\n" not in message
    finally:
        # Release the workers: a writer opens the pipe (the blocked opens return), the name goes (every later
        # open fails at once), the writer closes (the reads end); then they stop when told to. (O_RDWR: on
        # Linux it never blocks nor fails, whether or not a worker has opened the pipe yet.)
        try:
            writer = os.open(fifo, os.O_RDWR)
            fifo.unlink()
            os.close(writer)
        finally:
            stuck.close()


def test_persistent_workers_draw_each_epoch_from_seed_epoch_and_sample(small_synth):
    """The workers outlive the epochs: epoch 2 of a loader that ran epoch 1 equals epoch 2 of a loader
    started there (as a resumed run's is), and differs from epoch 1."""
    from dalipipe.data.index import PATH_COLUMNS, build_index

    index = build_index(str(small_synth / "images_train"), str(small_synth / "y_train.csv"))
    paths = index[PATH_COLUMNS].values.tolist()[:48]

    def epoch(it):
        images, targets = zip(*it)
        return torch.cat(images), torch.cat(targets)

    running = loader(paths)
    first, second = epoch(running), epoch(running)
    running.close()
    resumed = loader(paths, state={"epoch": 1, "done": 0})
    again = epoch(resumed)
    resumed.close()
    assert torch.equal(second[1], again[1]) and torch.equal(second[0], again[0])
    assert not torch.equal(first[1], second[1])  # a new order
    same_sample = torch.argsort(first[1]), torch.argsort(second[1])
    assert not torch.equal(first[0][same_sample[0]], second[0][same_sample[1]])  # a new augmentation


def test_a_file_that_went_bad_in_a_worker_is_its_own_one_line_error(tmp_path):
    """Checked before the run, damaged since: the worker's DataError reaches the user as itself, not as
    DataLoader's report of a worker's traceback."""
    bad = tmp_path / "00001_blue.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    broken = loader([[str(bad)] * 3] * 4, train=False, batch_size=2)
    try:
        with pytest.raises(DataError) as e:
            next(iter(broken))
    finally:
        broken.close()
    assert str(e.value).startswith(f"{bad}: PNG does not decode") and "\n" not in str(e.value), str(e.value)
