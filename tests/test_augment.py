"""The affine composition used by the torch loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalipipe.config import AugmentSpec
from dalipipe.loading import augment

NONE = dict(crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), max_rotation=0.0, hflip_p=0.0, vflip_p=0.0)


def test_no_augmentation_is_the_identity_and_warp_equals_resize():
    theta = augment.sample_affine(np.random.default_rng(0), AugmentSpec(**NONE), 40, 40)
    assert np.allclose(theta, [[1, 0, 0], [0, 1, 0]])
    img = torch.rand(2, 3, 40, 40) * 255
    t = torch.from_numpy(theta)[None].repeat(2, 1, 1)
    diff = (augment.warp(img, t, 96) - augment.resize(img, 96)).abs()
    # Inside, identical; at the outermost output pixels the warp blends with its zero fill (as DALI's
    # warp_affine with fill_value=0 does) where resize repeats the edge.
    assert diff[..., 2:-2, 2:-2].max() < 1e-2  # 0-255 scale: float rounding of the sampling grid
    assert diff[..., 0, :].max() > 1


def test_certain_flips_mirror_the_image():
    spec = AugmentSpec(**dict(NONE, hflip_p=1.0, vflip_p=1.0))
    img = torch.rand(1, 3, 16, 16)
    theta = torch.from_numpy(augment.sample_affine(np.random.default_rng(0), spec, 16, 16))[None]
    assert torch.allclose(augment.warp(img, theta, 16), img.flip(2, 3), atol=1e-5)


@pytest.mark.parametrize("ratio, expected", [((2.0, 3.0), (0.0, 16.0, 64.0, 32.0)), ((0.2, 0.5), (16.0, 0.0, 32.0, 64.0))])
def test_crop_fallback_is_the_largest_centred_crop_in_range(ratio, expected):
    spec = AugmentSpec(crop_area=(1.0, 1.0), crop_ratio=ratio)
    assert augment.sample_crop(np.random.default_rng(0), spec, 64, 64) == pytest.approx(expected)
