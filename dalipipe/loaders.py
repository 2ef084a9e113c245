"""One entry point for both loaders: the caller names the kind, everything else is shared."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dalipipe.config import AugmentSpec, Normalization
from dalipipe.data import PATH_COLUMNS
from dalipipe.errors import DataError


def default_workers() -> int:
    """The cores of this machine shared among its training processes (torchrun's LOCAL_WORLD_SIZE), at most 8."""
    import os

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // local))


def make_loader(kind: str, index: pd.DataFrame, targets: np.ndarray, spec: AugmentSpec, norm: Normalization,
                train: bool, device: torch.device, batch_size: int, workers: int, seed: int, shard_id: int = 0,
                num_shards: int = 1, out_dtype: torch.dtype = torch.float32):
    """An iterable of (images, targets) over the rows of `index`; targets[i] belongs to row i.
    workers=0 or None: default_workers()."""
    workers = workers or default_workers()
    paths = index[PATH_COLUMNS].values.tolist()
    if len(paths) == 0:
        raise DataError("no samples to load")
    if kind == "dali":
        from dalipipe.dali_loader import DaliLoader, dali_available

        if not dali_available():
            raise DataError("--loader dali: nvidia-dali is not installed (pip install nvidia-dali-cuda120), "
                            "or use --loader torch")
        cls = DaliLoader
    elif kind == "torch":
        from dalipipe.torch_loader import TorchLoader as cls
    else:
        raise DataError(f"--loader must be dali or torch, got '{kind}'")
    return cls(paths, targets, spec, norm, train, device, batch_size, workers, seed, shard_id, num_shards, out_dtype)
