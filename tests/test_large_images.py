"""Images larger than the model input: both loaders shrink them antialiased (AugmentSpec.working_shape), in
training and in evaluation, and agree with each other; images smaller than it are enlarged as before.

Without antialiasing, the geometry reads 2x2 source pixels per output pixel at any scale: a one-pixel
checkerboard at 512 px came out of either loader with a gray-level std of 41.6 (moire), where a faithful
smaller image is uniform gray. Measured with antialiasing: at most 0.14 at 512, 1024 and 640x1024 -> 224."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
from dalipipe.data.index import scan_images
from dalipipe.loading import augment, dali_state
from dalipipe.loading.loaders import make_loader
from tests.conftest import write_sample

KINDS = ["dali", "torch"]
RAW = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # outputs stay on the 0-255 scale
SIZE = 224
SHAPES = [(512, 512), (1024, 1024), (640, 1024)]  # (height, width): 2.3x and 4.6x, and not square
N = 4


def no_augmentation(height: int, width: int) -> AugmentSpec:
    """The training geometry without its randomness: the whole image (the crop's aspect ratio is the
    image's own), no rotation, no flips."""
    return AugmentSpec(image_size=SIZE, crop_area=(1.0, 1.0), crop_ratio=(width / height,) * 2, max_rotation=0.0,
                       hflip_p=0.0, vflip_p=0.0)


def batch(kind, folder, spec, train) -> torch.Tensor:
    loader = make_loader(scan_images(folder), np.arange(N), spec=spec, norm=RAW, train=train, device=torch.device("cpu"),
                         settings=LoaderSettings(kind=kind, batch_size=N, workers=1, seed=3))
    xs, ts = zip(*loader)
    loader.close()
    x = torch.cat(xs)[torch.argsort(torch.cat(ts))]  # in file order (training shuffles)
    assert x.shape == (N, 3, SIZE, SIZE)
    return x


@pytest.fixture(scope="module")
def checkerboards(tmp_path_factory):
    out = {}
    for h, w in SHAPES:
        board = (np.indices((h, w)).sum(0) % 2 * 255).astype(np.uint8)
        out[h, w] = folder = tmp_path_factory.mktemp(f"checkerboard{h}x{w}")
        for fid in range(1, N + 1):
            write_sample(folder, fid, board, board, board)
    return out


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """Every pixel independent: the hardest case for two resamplers to agree on."""
    rng = np.random.default_rng(7)
    out = {}
    for h, w in SHAPES:
        out[h, w] = folder = tmp_path_factory.mktemp(f"noise{h}x{w}")
        for fid in range(1, N + 1):
            write_sample(folder, fid, *rng.integers(0, 256, (3, h, w)))
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_one_pixel_checkerboard_comes_out_uniform_gray(checkerboards, kind, train, shape):
    """With the full reference augmentation in training (random crops, rotation, flips): inside the central
    disc, which a rotated crop never takes outside the image (its corners are zero fill)."""
    x = batch(kind, checkerboards[shape], AugmentSpec(image_size=SIZE), train)
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5 - SIZE / 2
    inside = x[:, :, torch.from_numpy(np.hypot(yy, xx) < SIZE / 2 - 2)]
    assert inside.std(dim=-1).max().item() < 1.0  # gray levels
    assert inside.mean().item() == pytest.approx(127.5, abs=0.5)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_smooth_gradient_keeps_its_values(tmp_path, kind, train):
    """A horizontal ramp at 1024 px, shrunk 4.6x: each output pixel is the ramp's value at its centre (the
    filter is symmetric and its weights sum to one), to within the PNG's rounding, except the outermost
    pixels, where the filter reaches past the edge and repeats it."""
    h, w = 1024, 1024
    ramp = np.broadcast_to(np.floor((np.arange(w) + 0.5) * 256 / w), (h, w)).astype(np.uint8)
    for fid in range(1, N + 1):
        write_sample(tmp_path, fid, ramp, ramp, ramp)
    x = batch(kind, tmp_path, no_augmentation(h, w), train)
    centres = (np.arange(SIZE) + 0.5) * w / SIZE - 0.5  # output pixel centres in source pixels
    expected = torch.from_numpy((centres + 0.5) * 256 / w - 0.5).float()  # the ramp's value there, unrounded
    error = (x - expected)[..., 2:-2].abs()
    assert error.max().item() < 0.6 and error.mean().item() < 0.3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_the_loaders_agree_when_shrinking(noise, train, shape):
    """Tolerance: both compute the same filter (a triangle as wide as the scale, the edge pixel repeated past
    the edge) in float32; measured max 0.0035 gray levels and mean 0.0005 on noise over these shapes, float
    rounding. torch's own antialiased resize, which renormalizes at the edges instead of repeating the
    edge pixel, differed from DALI's by up to 14 gray levels in the outermost pixels (mean 0.06)."""
    h, w = shape
    spec = no_augmentation(h, w) if train else AugmentSpec(image_size=SIZE)
    dali, torch_ = (batch(kind, noise[shape], spec, train) for kind in KINDS)
    diff = (dali - torch_).abs()
    assert diff.max().item() < 0.01 and diff.mean().item() < 0.002
    assert torch_.std().item() > 5  # shrunk noise is smoothed, not flattened: there is something to compare


def test_images_no_larger_than_the_model_input_are_enlarged_as_before(small_synth):
    """The challenge's case (64 px to 224, here 32 px to 80): no shrink step; the torch loader's images
    are exactly one bilinear resize (evaluation) or one warp (training) of the source, as before."""
    from dalipipe.data.pngio import read_gray

    index = scan_images(small_synth / "images_test").iloc[:N]
    spec = AugmentSpec(image_size=80)
    source = torch.stack([torch.from_numpy(np.stack([read_gray(p) for p in row])).float()
                          for row in index[["path_yellow", "path_red", "path_blue"]].values.tolist()])
    assert augment.shrink(source, *spec.working_shape(32, 32)) is source
    for train in (False, True):
        loader = make_loader(index, np.arange(N), spec=spec, norm=RAW, train=train, device=torch.device("cpu"),
                             settings=LoaderSettings(kind="torch", batch_size=N, workers=0, seed=3))
        (x, t), = list(loader)
        x = x[torch.argsort(t)]  # training shuffles
        if train:
            theta = torch.stack([torch.from_numpy(augment.sample_affine(np.random.default_rng([3, 0, i]), spec, 32, 32))
                                 for i in range(N)])
            expected = augment.warp(source, theta, 80)
        else:
            expected = torch.nn.functional.interpolate(source, size=(80, 80), mode="bilinear", align_corners=False)
        assert torch.equal(x, expected)


def test_dali_leaves_the_shrink_step_out_where_no_image_needs_it(small_synth):
    """Where the data check found no image larger than the model input, DALI's training graph is the one
    without the shrink step (the step's resize to the images' own size cost 64 px loading 18% on a 2-core
    CPU), and it gives the same images as the graph with it."""
    from dalipipe.data.index import inspect_images

    scanned = scan_images(small_synth / "images_test").iloc[:8]
    checked = inspect_images(scanned, progress=False)
    spec = AugmentSpec(image_size=48)
    out, graphs = {}, {}
    for name, index in (("checked", checked), ("sizes unknown", scanned), ("larger", checked.assign(height=49))):
        loader = make_loader(index, np.arange(8), spec=spec, norm=RAW, train=True, device=torch.device("cpu"),
                             settings=LoaderSettings(kind="dali", batch_size=8, workers=1, seed=3, checkpointing=True))
        graphs[name] = set(dali_state._split(loader.pipe.checkpoint())[0])  # the graph's operators, by name
        (out[name], _), = list(loader)
        loader.close()
    assert "shrink" not in graphs["checked"]
    assert "shrink" in graphs["sizes unknown"] and "shrink" in graphs["larger"]  # a side of 49 > 48: needed
    assert torch.equal(out["checked"], out["sizes unknown"])
