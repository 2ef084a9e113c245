"""The pure-torch loader: PIL decode and CPU transforms in DataLoader workers, as the reference did.

It is the benchmark's baseline and the fallback where DALI is missing. Output contract (shared with
dali_loader.py): batches of (images, targets), images normalized float NCHW on the target device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
from dalipipe.constants import MIN_TRAIN_BATCH
from dalipipe.data.pngio import read_gray
from dalipipe.loading import augment
from dalipipe.loading.loader_rules import train_plan


class ChannelDataset(Dataset):
    """Sample i -> (normalized float32 (3, S, S), target i). Augmentation randomness is a function of
    (seed, epoch, i), so that it does not depend on which worker draws the sample. Normalization runs
    here, in the workers, as the reference's transforms did: the main process only collates."""

    def __init__(self, paths: list[list[str]], targets: np.ndarray, *, spec: AugmentSpec, norm: Normalization,
                 train: bool, seed: int):
        self.paths, self.targets, self.spec, self.train, self.seed = paths, targets, spec, train, seed
        self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = torch.from_numpy(np.stack([read_gray(p) for p in self.paths[i]])).float()[None]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            theta = torch.from_numpy(augment.sample_affine(rng, self.spec, img.shape[2], img.shape[3]))
            out = augment.warp(img, theta[None], self.spec.image_size)
        else:
            out = augment.resize(img, self.spec.image_size)
        return (out[0] - self.mean) * self.inv_std, int(self.targets[i])


class _ResumableSampler(DistributedSampler):
    """DistributedSampler whose next pass can start part-way (at `start`), for a resumed epoch."""

    start = 0

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(list(super().__iter__())[start:])


class TorchLoader:
    """Iterable of (images, targets) with len(); each epoch a new seeded order (train) or file order."""

    def __init__(self, paths, targets, *, spec: AugmentSpec, norm: Normalization, train: bool, device: torch.device,
                 settings: LoaderSettings, state: dict | None = None):
        batch_size, seed = settings.batch_size, settings.seed
        shard_id, num_shards = settings.shard_id, settings.num_shards
        self.dataset = ChannelDataset(paths, np.asarray(targets), spec=spec, norm=norm, train=train, seed=seed)
        # DistributedSampler also serves one process; without shuffling it keeps file order. Evaluation:
        # shards padded by repeating a few samples (de-duplicated by the caller). Training: every rank the
        # same n // num_shards samples and steps, a last batch too small for BatchNorm dropped
        # (loader_rules.train_plan).
        self.plan = train_plan(len(paths), batch_size, num_shards) if train else None
        self.sampler = _ResumableSampler(self.dataset, num_replicas=num_shards, rank=shard_id, shuffle=train,
                                          seed=seed, drop_last=train)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=settings.workers,
                                 pin_memory=device.type == "cuda", drop_last=False,
                                 persistent_workers=False,  # workers restart per epoch to see the new epoch
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
        self.dataset.epoch = self.epoch
        for images, targets in self.loader:
            if self.plan and len(targets) < MIN_TRAIN_BATCH:
                continue
            with torch.profiler.record_function("h2d_copy"):
                images = images.to(self.device, non_blocking=True).to(self.out_dtype)
                targets = targets.to(self.device, non_blocking=True)
            self.done += 1
            yield images, targets
        self.epoch, self.done = self.epoch + 1, 0

    def close(self) -> None:
        pass
