"""The reference augmentation as one 2x3 affine matrix per sample, for the torch loader.

Crop, rotation and flips compose into one matrix in normalized coordinates (affine_grid with
align_corners=False), so each sample costs one grid_sample. DALI's pipeline applies the same
AugmentSpec with its own operators (dali_loader.py); tests check that both follow the spec.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dalipipe.config import AugmentSpec


def sample_crop(rng: np.random.Generator, spec: AugmentSpec, h: int, w: int) -> tuple[float, float, float, float]:
    """RandomResizedCrop's rule (torchvision's get_params, continuous): returns (x0, y0, cw, ch) in pixels."""
    area = h * w
    log_lo, log_hi = math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*spec.crop_area)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if cw <= w and ch <= h:
            return rng.uniform(0, w - cw), rng.uniform(0, h - ch), cw, ch
    # Fallback as torchvision: the largest centred crop whose ratio is inside the range.
    cw, ch = float(w), float(h)
    if w / h < spec.crop_ratio[0]:
        ch = w / spec.crop_ratio[0]
    elif w / h > spec.crop_ratio[1]:
        cw = h * spec.crop_ratio[1]
    return (w - cw) / 2, (h - ch) / 2, cw, ch


def sample_affine(rng: np.random.Generator, spec: AugmentSpec, h: int, w: int) -> np.ndarray:
    """One 2x3 matrix mapping output coordinates to input coordinates (both normalized to [-1, 1])."""
    x0, y0, cw, ch = sample_crop(rng, spec, h, w)
    angle = math.radians(rng.uniform(-spec.max_rotation, spec.max_rotation))
    fx = -1.0 if rng.random() < spec.hflip_p else 1.0
    fy = -1.0 if rng.random() < spec.vflip_p else 1.0
    c, s = math.cos(angle), math.sin(angle)
    rot_flip = np.array([[c * fx, -s * fy], [s * fx, c * fy]])
    scale = np.diag([cw / w, ch / h])
    shift = np.array([2 * (x0 + cw / 2) / w - 1, 2 * (y0 + ch / 2) / h - 1])
    return np.concatenate([scale @ rot_flip, shift[:, None]], axis=1).astype(np.float32)


def warp(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """images (B, C, H, W) float, theta (B, 2, 3) -> (B, C, size, size); zero fill outside, bilinear."""
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation geometry: bilinear, half-pixel centres, no antialias (as DALI's INTERP_LINEAR resize)."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
