"""One entry point for both loaders: the caller names the kind, everything else is shared."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
from dalipipe.constants import MIN_TRAIN_BATCH
from dalipipe.data import PATH_COLUMNS
from dalipipe.errors import DataError


def default_workers() -> int:
    """The cores of this machine shared among its training processes (torchrun's LOCAL_WORLD_SIZE), at most 8."""
    import os

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // local))


def train_plan(n: int, batch_size: int, num_shards: int) -> tuple[int, int]:
    """(samples each process trains on per epoch, training steps per epoch), the same on every rank.

    Every rank trains on n // num_shards samples (shards differ by at most one: the extra sample is left
    out, a different one each epoch as the order is reshuffled), and a last batch of fewer than
    MIN_TRAIN_BATCH samples is dropped: BatchNorm cannot train on one sample, an empty batch has a NaN
    loss, and under DDP every rank must run the same number of steps or the collectives hang.
    """
    per_rank = n // num_shards
    full, rest = divmod(per_rank, batch_size)
    steps = full + (1 if rest >= MIN_TRAIN_BATCH else 0)
    if steps == 0:
        raise DataError(f"{n} training samples are too few for {num_shards} process(es): each needs at least "
                        f"{MIN_TRAIN_BATCH}")
    return per_rank, steps


def make_loader(index: pd.DataFrame, targets: np.ndarray, spec: AugmentSpec, norm: Normalization, train: bool,
                device: torch.device, settings: LoaderSettings = LoaderSettings(), state: dict | None = None):
    """An iterable of (images, targets) over the rows of `index`; targets[i] belongs to row i.
    state: what the same loader's state() returned, to continue exactly where it was."""
    if not settings.workers:
        settings = dataclasses.replace(settings, workers=default_workers())
    paths = index[PATH_COLUMNS].values.tolist()
    if len(paths) == 0:
        raise DataError("no samples to load")
    if settings.kind == "dali":
        from dalipipe.dali_loader import DaliLoader, dali_available

        if not dali_available():
            raise DataError("--loader dali: nvidia-dali is not installed (pip install nvidia-dali-cuda120), "
                            "or use --loader torch")
        cls = DaliLoader
    else:
        from dalipipe.torch_loader import TorchLoader as cls
    return cls(paths, targets, spec, norm, train, device, settings, state)
