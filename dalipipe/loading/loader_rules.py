"""Rules both loaders follow, below both of them in the imports: how many workers, and what a training
epoch covers on each process."""

from __future__ import annotations

import os

from dalipipe.constants import MAX_DEFAULT_WORKERS, MIN_TRAIN_BATCH
from dalipipe.data.index import available_cores
from dalipipe.errors import DataError


def local_processes() -> int:
    """The training processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def default_workers() -> int:
    """The cores of this machine shared among its training processes, at most MAX_DEFAULT_WORKERS.
    `dalipipe train`, `predict` and the benchmark's rows all use this."""
    return max(1, min(MAX_DEFAULT_WORKERS, available_cores() // local_processes()))


def default_threads(workers: int) -> int:
    """torch's threads in a training (or predicting) process: the cores of its share of the machine that
    its loader's `workers` leave free, at least 1. torch's own default is every core of the machine; its
    threads then spin against the loader's and against every other busy process, and a step slowed down
    many times over on a busy machine (measured: see docs/loaders.md, "Threads")."""
    return max(1, available_cores() // local_processes() - workers)


def train_plan(n: int, batch_size: int, num_shards: int) -> tuple[int, int]:
    """(samples each process trains on per epoch, training steps per epoch), the same on every rank.

    Every rank trains on n // num_shards samples (shards differ by at most one: the extra sample is left
    out, a different one each epoch as the order is reshuffled), and a last batch of fewer than
    MIN_TRAIN_BATCH samples is dropped: BatchNorm cannot train on one sample, an empty batch has a NaN
    loss, and under DDP every rank must run the same number of steps or the collectives hang. batch_size:
    at least MIN_TRAIN_BATCH, the options table's bound on a training batch (train's --batch-size, preview's
    --n, the benchmark's --batch-size).
    """
    per_rank = n // num_shards
    full, rest = divmod(per_rank, batch_size)
    steps = full + (1 if rest >= MIN_TRAIN_BATCH else 0)
    if steps == 0:
        raise DataError(f"{n} training samples over {num_shards} process(es) give {per_rank} per process, fewer than "
                        f"one training batch of at least {MIN_TRAIN_BATCH} (BatchNorm); use more samples, a smaller "
                        "--val-fraction or fewer processes")
    return per_rank, steps
