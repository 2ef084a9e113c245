"""The normalization statistics of the training split."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dalipipe.config import Normalization
from dalipipe.data.index import MEAN_COLUMNS, MEANSQ_COLUMNS


def channel_stats(index: pd.DataFrame) -> Normalization:
    """Per-channel mean and std (0-255 scale) of the given samples (the training split), each sample
    weighted equally whatever its size (equal to per-pixel statistics when all images share a size)."""
    if MEAN_COLUMNS[0] not in index:
        raise ValueError("channel_stats needs an index from inspect_images")
    mean = [float(index[c].mean()) for c in MEAN_COLUMNS]
    var = [float(index[q].mean()) - m * m for q, m in zip(MEANSQ_COLUMNS, mean)]
    # Floor at one grey level: a constant channel would otherwise divide by ~0.
    std = [float(max(np.sqrt(max(v, 0.0)), 1.0)) for v in var]
    return Normalization(tuple(float(m) for m in mean), tuple(std))
