"""Images as the model receives them, turned back into pictures people can look at."""

from __future__ import annotations

import numpy as np
import torch

from dalipipe.config import Normalization


def display_images(images: torch.Tensor | np.ndarray, norm: Normalization) -> np.ndarray:
    """Normalized (N, 3, H, W) images, a tensor on any device and in any float dtype or a NumPy array ->
    uint8 (N, H, W, 3) for display: the normalization undone, values clipped to 0-255. In NumPy: the run
    recorder's drawing worker is forked from the training process, and a torch operation there can hang
    on the OpenMP threads torch ran before the fork."""
    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else images.astype(np.float32)
    mean = np.asarray(norm.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(norm.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray(np.round(np.clip(x * std + mean, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1))
