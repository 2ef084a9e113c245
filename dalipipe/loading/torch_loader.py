"""The pure-torch loader: PIL decode and CPU transforms in DataLoader workers, as the reference did.

It is the benchmark's baseline and the fallback where DALI is missing. Output contract (shared with
dali_loader.py): batches of (images, targets), images normalized float NCHW on the target device.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import select
import threading
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dalipipe import constants
from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
from dalipipe.constants import MIN_TRAIN_BATCH
from dalipipe.data import decoded_store
from dalipipe.data.pngio import read_sample
from dalipipe.errors import DataError
from dalipipe.loading import augment
from dalipipe.loading.loader_rules import train_plan


# How often a worker that cannot watch the training process through a pidfd asks whether it still runs (as
# often as DataLoader's own check of its parent).
WORKER_CHECK_S = 5.0


class ChannelDataset(Dataset):
    """(epoch, i) -> (normalized float32 (3, S, S), target i). The pixels come from the decoded store where
    `stored` names its files (decoded_store.py), else from the PNGs, decoded by the same rule. Augmentation
    randomness is a function of (seed, epoch, i), so that it does not depend on which worker draws the sample;
    the epoch comes with the index because the workers outlive an epoch and never see the main process's copy
    of this object.
    Normalization runs here, in the workers, as the reference's transforms did: the main process only
    collates."""

    def __init__(self, paths: list[list[str]], targets: np.ndarray, *, spec: AugmentSpec, norm: Normalization,
                 train: bool, seed: int, stored: list[str] | None = None):
        self.paths, self.targets, self.spec, self.train, self.seed = paths, targets, spec, train, seed
        self.stored = stored
        self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        pixels = decoded_store.read(self.stored[i]) if self.stored else np.stack(read_sample(self.paths[i]))
        img = torch.from_numpy(pixels).float()[None]
        height, width = img.shape[2:]
        img = augment.shrink(img, *self.spec.working_shape(height, width))
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, i])
            # drawn on the image's own shape (the crop's aspect ratio is in its pixels), in coordinates
            # relative to its size: the same on the shrunk image
            theta = torch.from_numpy(augment.sample_affine(rng, self.spec, height, width))
            out = augment.warp(img, theta[None], self.spec.image_size)
        else:
            out = augment.resize(img, self.spec.image_size)
        return (out[0] - self.mean) * self.inv_std, int(self.targets[i])


class _ResumableSampler(DistributedSampler):
    """DistributedSampler of (epoch, index) pairs (see ChannelDataset) whose next pass can start part-way
    (at `start`), for a resumed epoch."""

    start = 0

    def __iter__(self):
        start, self.start = self.start, 0
        return iter([(self.epoch, i) for i in list(super().__iter__())[start:]])


def _worker_context():
    """Where the workers come from. Forked from the training process, a worker could inherit a lock held
    by another of its threads at that moment (the run recorder writes checkpoints in the background) and
    hang; the forkserver's server is a clean single-threaded process, started once per command with torch
    and this module imported, which then forks each worker. The workers are persistent: started once per
    loader and command, they cost the same per epoch as workers forked from the training process.

    Measured 2026-12-06 on a 2-core CPU (3 epochs of 15 batches of 32 at 32 px, 2 workers, iterating only;
    3 runs each, alternated; seconds for the 3 epochs): fork per epoch (before) 1.51-1.71; fork,
    persistent 1.32-1.46; forkserver per epoch 4.05-4.59 (about 0.55 s more per epoch); forkserver,
    persistent 2.97-3.31: the server's start, about 1.7 s once per command, then 0.40-0.51 s an epoch as
    forked persistent workers (fork per epoch: 0.49-0.61)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", __name__])  # once per command: imported in the server, not per worker
    return ctx


def _end_with(pid: int, worker_id: int) -> None:
    """A worker's start (DataLoader's worker_init_fn): the worker ends when process `pid`, the training
    process, does, however it ends. Its parent is the forkserver's server, which lives as long as the
    workers do: DataLoader's own check (is my parent alive?) would keep a killed run's workers waiting
    for ever, holding its output open."""
    threading.Thread(target=_exit_when_ended, args=(pid,), daemon=True, name="dalipipe-end-with-run").start()


def _exit_when_ended(pid: int) -> None:
    try:
        ended = os.pidfd_open(pid)  # readable once the process has ended
    except (AttributeError, OSError):  # not Linux 5.3+, or refused (seccomp): ask every few seconds instead
        while _alive(pid):
            time.sleep(WORKER_CHECK_S)
    else:
        select.select([ended], [], [])
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's: not ours any more, as our run's pid was reused
        return False
    return True


def _worker_message(e: DataError) -> str:
    """A DataError raised in a worker comes back as DataLoader's report ("Caught DataError in DataLoader worker
    process 0. Original Traceback ..."), whose last line is the error itself."""
    last = str(e).strip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(("DataError: ", "dalipipe.errors.DataError: ")) else last


class TorchLoader:
    """Iterable of (images, targets) with len(); each epoch a new seeded order (train) or file order."""

    def __init__(self, paths, targets, *, spec: AugmentSpec, norm: Normalization, train: bool, device: torch.device,
                 settings: LoaderSettings, state: dict | None = None, stored: list[str] | None = None):
        batch_size, seed = settings.batch_size, settings.seed
        shard_id, num_shards = settings.shard_id, settings.num_shards
        self.dataset = ChannelDataset(paths, np.asarray(targets), spec=spec, norm=norm, train=train, seed=seed,
                                      stored=stored)
        # DistributedSampler also serves one process; without shuffling it keeps file order. Evaluation:
        # shards padded by repeating a few samples (de-duplicated by the caller). Training: every rank the
        # same n // num_shards samples and steps, a last batch too small for BatchNorm dropped
        # (loader_rules.train_plan).
        self.plan = train_plan(len(paths), batch_size, num_shards) if train else None
        self.sampler = _ResumableSampler(self.dataset, num_replicas=num_shards, rank=shard_id, shuffle=train,
                                          seed=seed, drop_last=train)
        workers = settings.workers
        self.train = train
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda", drop_last=False,
                                 persistent_workers=workers > 0,
                                 multiprocessing_context=_worker_context() if workers > 0 else None,
                                 worker_init_fn=functools.partial(_end_with, os.getpid()),
                                 # a stuck worker: an error naming the batch (see _batches), not a silent hang
                                 timeout=constants.TORCH_LOADER_TIMEOUT_S if workers > 0 else 0,
                                 # its own generator: drawing the workers' base seed from torch's global
                                 # one would shift the dropout masks of training (and break exact resume)
                                 generator=torch.Generator().manual_seed(seed))
        self.device, self.out_dtype = device, getattr(torch, settings.out_dtype)
        # The epoch being (or next to be) iterated and the batches of it already handed out. Its
        # randomness is a function of (seed, epoch, sample): these two are the whole state.
        self.epoch, self.done = (state["epoch"], state["done"]) if state else (0, 0)

    def __len__(self) -> int:
        return self.plan[1] if self.plan else math.ceil(len(self.sampler) / self.loader.batch_size)

    def state(self) -> dict:
        return {"epoch": self.epoch, "done": self.done}

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.done * self.loader.batch_size
        for images, targets in self._batches():
            if self.plan and len(targets) < MIN_TRAIN_BATCH:
                continue
            with torch.profiler.record_function("h2d_copy"):
                images = images.to(self.device, non_blocking=True).to(self.out_dtype)
                targets = targets.to(self.device, non_blocking=True)
            self.done += 1
            yield images, targets
        self.epoch, self.done = self.epoch + 1, 0

    def _batches(self):
        """The DataLoader's batches; its timeout as one line that names this loader and the batch."""
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DataError as e:  # a file that went bad since the check, raised in a worker: its own line
                raise DataError(_worker_message(e)) from None
            except RuntimeError as e:
                if not str(e).startswith("DataLoader timed out"):
                    raise
                which = (f"training batch {self.done + 1} of epoch" if self.train
                         else f"evaluation batch {self.done + 1} of pass")
                raise DataError(f"the torch loader's workers gave no {which} {self.epoch + 1} in "
                                f"{self.loader.timeout:g} s: a worker is stuck (reading from a file system that "
                                "hangs?)") from None
            yield batch

    def close(self) -> None:
        # The persistent workers live as long as the DataLoader's iterator: end them now, not whenever it is
        # collected.
        running, self.loader._iterator = self.loader._iterator, None
        if running is not None:
            running._shutdown_workers()
