"""One entry point for both loaders: the caller names the kind, everything else is shared."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
from dalipipe.data.index import PATH_COLUMNS, STORE_COLUMN
from dalipipe.device import dali_package
from dalipipe.errors import DataError
from dalipipe.loading.loader_rules import default_workers


def make_loader(index: pd.DataFrame, targets: np.ndarray, *, spec: AugmentSpec, norm: Normalization, train: bool,
                device: torch.device, settings: LoaderSettings = LoaderSettings(), state: dict | None = None):
    """An iterable of (images, targets) over the rows of `index`; targets[i] belongs to row i. The pixels come
    from the decoded store where the data check built one (the index's STORE_COLUMN), else from the PNGs.
    state: what the same loader's state() returned, to continue exactly where it was."""
    if settings.workers is None:
        settings = dataclasses.replace(settings, workers=default_workers())
    paths = index[PATH_COLUMNS].values.tolist()
    if len(paths) == 0:
        raise DataError("no samples to load")
    stored = index[STORE_COLUMN].tolist() if STORE_COLUMN in index.columns else None
    if settings.kind == "dali":
        from dalipipe.loading.dali_loader import DaliLoader, dali_available

        if not dali_available():
            raise DataError(f"--loader dali: NVIDIA DALI is not installed (pip install {dali_package()}), "
                            "or use --loader torch")
        # A graph without the shrink step where no image needs it (the torch loader decides per image)
        return DaliLoader(paths, targets, spec=spec, norm=norm, train=train, device=device, settings=settings,
                          state=state, largest_side=largest_side(index), stored=stored)
    from dalipipe.loading.torch_loader import TorchLoader

    return TorchLoader(paths, targets, spec=spec, norm=norm, train=train, device=device, settings=settings,
                       state=state, stored=stored)


def largest_side(index: pd.DataFrame) -> int | None:
    """The longest image side among these samples, from the data check's columns; None without them."""
    if not {"height", "width"} <= set(index.columns):
        return None
    return int(max(index["height"].max(), index["width"].max()))
