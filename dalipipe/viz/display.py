"""Images as the model receives them, turned back into pictures people can look at."""

from __future__ import annotations

import numpy as np
import torch

from dalipipe.config import Normalization


def display_images(images: torch.Tensor, norm: Normalization) -> np.ndarray:
    """Normalized (N, 3, H, W) images, on any device and in any float dtype -> uint8 (N, H, W, 3) for display:
    the normalization undone, values clipped to 0-255."""
    x = images.detach().float().cpu()
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
