"""The reference augmentation as one 2x3 affine matrix per sample, for the torch loader.

Crop, rotation and flips compose into one matrix in normalized coordinates (affine_grid with
align_corners=False), so each sample costs one grid_sample. Images larger than the model input are
shrunk first, antialiased, by DALI's rule (shrink). DALI's pipeline applies the same AugmentSpec with
its own operators (dali_loader.py); tests check that both follow the spec and agree.
"""

from __future__ import annotations

import functools
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
    """Evaluation geometry, after shrink: bilinear, half-pixel centres (as DALI's INTERP_LINEAR resize). It
    only enlarges (or keeps) a side here, where antialiasing would change nothing."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def shrink(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """images (B, C, H, W) float, each side shrunk to (height, width) where that is smaller (AugmentSpec.
    working_shape), antialiased as DALI's linear resize does it: a triangle filter as wide as the scale.
    torch's antialiased interpolate computes the same, except where the filter reaches past the image's
    edge: torch leaves those pixels out and renormalizes, DALI repeats the edge pixel, which moved the
    outermost output pixels by up to 14 gray levels (noise, 512 -> 224). Those few rows and columns are
    recomputed here by DALI's rule, so that the two loaders agree everywhere. One interpolate over both
    sides, and the edges as thin products with DALI's weights (a few rows each): at 512 px this is about a
    third of the time that shrinking one side after the other took, on one CPU core."""
    n_h, n_w = images.shape[2], images.shape[3]
    out_h, out_w = min(height, n_h), min(width, n_w)
    if (out_h, out_w) == (n_h, n_w):
        return images
    out = F.interpolate(images, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    rows, along_h = _dali_weights(n_h, out_h)
    cols, along_w = _dali_weights(n_w, out_w)
    if len(rows):
        out[:, :, rows, :] = along_h[rows] @ images @ along_w.T
    if len(cols):  # (as rows of the transposed image: a thin product is many times faster that way round)
        out[:, :, :, cols] = along_h @ (along_w[cols] @ images.transpose(2, 3)).transpose(2, 3)
    return out


# A few sizes: each entry is a dense matrix (up to 224 x 2048 float32, 1.8 MB, per side and loader worker).
@functools.lru_cache(maxsize=8)
def _dali_weights(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DALI's linear antialiased resize of one side as a matrix, (n_out, n_in), and the output indices whose
    filter reaches past either edge (where DALI repeats the edge pixel and torch does not): (rows,), matrix.
    n_out == n_in: the identity, and no such rows."""
    if n_out == n_in:
        return torch.zeros(0, dtype=torch.long), torch.eye(n_in)
    scale = n_in / n_out
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale  # in source pixels, edges at 0 and n_in
    taps = torch.floor(centre - scale - 0.5).long()[:, None] + torch.arange(math.ceil(2 * scale) + 2)
    w = (1 - (taps + 0.5 - centre[:, None]).abs() / scale).clamp(min=0)
    rows = torch.nonzero(((taps < 0) | (taps >= n_in)).logical_and(w > 0).any(1)).flatten()
    dense = torch.zeros(n_out, n_in, dtype=torch.float64)
    dense.scatter_add_(1, taps.clamp(0, n_in - 1), w)
    return rows, (dense / dense.sum(1, keepdim=True)).float()
