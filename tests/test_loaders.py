"""Both loaders against one spec: equal tensors without augmentation, the spec's statistics with it,
and exact epoch coverage with channels that never mix."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
from dalipipe.data.index import build_index, inspect_images, scan_images
from dalipipe.data.stats import channel_stats
from dalipipe.loading.loaders import make_loader
from tests.conftest import pngsuite, write_sample

KINDS = ["dali", "torch"]
CPU = torch.device("cpu")
RAW = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # outputs stay on the 0-255 scale


def _epochs(kind, index, spec, norm, train, epochs=1, batch_size=64, targets=None):
    targets = np.arange(len(index)) if targets is None else targets
    loader = make_loader(index, targets, spec=spec, norm=norm, train=train, device=CPU,
                         settings=LoaderSettings(kind=kind, batch_size=batch_size, workers=2, seed=11))
    out = []
    for _ in range(epochs):
        xs, ts = zip(*[(x, t) for x, t in loader])
        out.append((torch.cat(xs), torch.cat(ts)))
    assert len(loader) == math.ceil(len(index) / batch_size)
    loader.close()
    return out


def _in_order(x, t):
    return x[torch.argsort(t)]


def test_no_augmentation_dali_equals_torch_on_synthetic(small_synth):
    idx = inspect_images(build_index(small_synth / "images_train", small_synth / "y_train.csv"), progress=False)
    norm = channel_stats(idx)
    spec = AugmentSpec(image_size=48)
    (xd, td), = _epochs("dali", idx, spec, norm, train=False)
    (xt, tt), = _epochs("torch", idx, spec, norm, train=False)
    assert xd.shape == (240, 3, 48, 48) and xd.dtype == torch.float32
    assert td.tolist() == list(range(240)) == tt.tolist()  # evaluation keeps file order
    assert (xd - xt).abs().max().item() < 1e-3


@pytest.mark.parametrize("size", [20, 27])
def test_no_augmentation_dali_equals_torch_when_shrinking(small_synth, size):
    """Images larger than the model input (32 px to 20 and 27): both loaders shrink them alike (antialiased),
    pixel for pixel; an antialiased resize in one of them alone would differ by tens of gray levels."""
    idx = inspect_images(build_index(small_synth / "images_train", small_synth / "y_train.csv"), progress=False)
    idx = idx.iloc[:64]
    spec = AugmentSpec(image_size=size)
    (xd, _), = _epochs("dali", idx, spec, RAW, train=False)
    (xt, _), = _epochs("torch", idx, spec, RAW, train=False)
    assert xd.shape == xt.shape == (64, 3, size, size)
    assert (xd - xt).abs().max().item() < 0.01  # gray levels


def _pngsuite_samples(tmp_path, predicate):
    files = sorted(f for f in pngsuite().glob("*.png") if predicate(f.name))
    folder = tmp_path / "suite"
    folder.mkdir()
    for i, f in enumerate(files):  # each file serves once as each channel, beside two others
        for k, ch in enumerate(("yellow", "red", "blue")):
            shutil.copy(files[(i + k) % len(files)], folder / f"{i + 1:05d}_{ch}.png")
    return inspect_images(scan_images(folder), progress=False), len(files)


@pytest.mark.parametrize("which", ["8bit", "16bit"])
def test_no_augmentation_dali_equals_torch_on_pngsuite_gray(tmp_path, which):
    if which == "8bit":
        pred = lambda n: n.startswith(("basn0g", "basi0g", "ftp", "f0")) and "0g16" not in n and "n2c" not in n
    else:
        pred = lambda n: n.endswith("0g16.png") and n.startswith(("basn", "basi", "oi", "g"))
    idx, n = _pngsuite_samples(tmp_path, pred)
    assert n >= 6
    norm = Normalization((30.0, 60.0, 90.0), (40.0, 50.0, 60.0))
    spec = AugmentSpec(image_size=64)
    (xd, _), = _epochs("dali", idx, spec, norm, train=False, batch_size=4)
    (xt, _), = _epochs("torch", idx, spec, norm, train=False, batch_size=4)
    assert (xd - xt).abs().max().item() < 1e-3


def _coded_dataset(folder, n, size=8):
    """Constant channels that encode the sample id, differently per channel."""
    for fid in range(1, n + 1):
        write_sample(folder, fid, *[np.full((size, size), code) for code in _codes(fid)])
    return scan_images(folder)


def _codes(fid):
    return [(fid * m) % 200 + 20 for m in (1, 7, 13)]


@pytest.mark.parametrize("kind", KINDS)
def test_each_epoch_sees_each_sample_once_and_channels_stay_together(tmp_path, kind):
    idx = _coded_dataset(tmp_path / "img", 301)
    spec = AugmentSpec(image_size=16)
    epochs = _epochs(kind, idx, spec, RAW, train=True, epochs=3, batch_size=64)
    orders = []
    for x, t in epochs:
        assert len(t) == 301 and sorted(t.tolist()) == list(range(301))
        orders.append(t.tolist())
        # The centre pixel is inside every crop and rotation: it carries the sample's three codes.
        centre = x[:, :, 8, 8]
        expected = torch.tensor([_codes(int(idx.file_id[int(i)])) for i in t], dtype=torch.float32)
        assert (centre - expected).abs().max().item() < 1e-3
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(301))


@pytest.mark.parametrize("kind", KINDS)
def test_the_channels_are_stacked_yellow_red_blue(tmp_path, kind):
    """R is the ER (yellow file), G the microtubules (red), B the nucleus (blue), as the reference stacked them."""
    size = 8
    write_sample(tmp_path / "img", 1, *[np.full((size, size), v) for v in (10, 20, 30)])  # yellow, red, blue
    write_sample(tmp_path / "img", 2, *[np.full((size, size), v) for v in (40, 50, 60)])
    idx = scan_images(tmp_path / "img")
    (x, t), = _epochs(kind, idx, AugmentSpec(image_size=size), RAW, train=False)
    assert x[torch.argsort(t)].mean((2, 3)).tolist() == [[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]


def test_dali_channel_readers_out_of_step_are_a_bug_not_a_silent_mix(tmp_path):
    """The three readers carry each sample's row position: a batch whose positions differ between the
    channels is refused, never handed to the model."""
    idx = _coded_dataset(tmp_path / "img", 8)
    loader = make_loader(idx, np.arange(8), spec=AugmentSpec(image_size=8), norm=RAW, train=False, device=CPU,
                         settings=LoaderSettings(kind="dali", batch_size=4, workers=1, seed=0))
    real = loader.iterator

    def one_reader_ahead():
        for (batch,) in real:
            yield ({**batch, "p2": batch["p2"].roll(1, 0)},)

    loader.iterator = one_reader_ahead()
    with pytest.raises(RuntimeError, match="channel readers fell out of step"):
        next(iter(loader))
    loader.close()


@pytest.mark.parametrize("kind", KINDS)
def test_each_epoch_draws_new_augmentations(tmp_path, kind):
    """The same sample is cropped, rotated and flipped anew in each epoch (the torch loader's draws are a
    function of seed, epoch and sample)."""
    def draw(img):
        img[2:12, 4:10] = 255

    idx = _marker_dataset(tmp_path / "img", 40, 16, draw)
    (x1, t1), (x2, t2) = _epochs(kind, idx, AugmentSpec(image_size=16), RAW, train=True, epochs=2)
    a, b = _in_order(x1, t1), _in_order(x2, t2)
    differ = (a - b).flatten(1).abs().amax(1) > 1.0
    assert differ.float().mean().item() > 0.9  # (the same draw twice would be a rare coincidence)


def _marker_dataset(folder, n, size, draw):
    img = np.zeros((size, size), dtype=np.uint8)
    draw(img)
    for fid in range(1, n + 1):
        write_sample(folder, fid, img, img, img)
    return scan_images(folder)


def _centroids(x):
    """Intensity centroid of channel 0 relative to the image centre, in pixels: (cx, cy)."""
    img = x[:, 0].clamp(min=0)
    s = img.shape[-1]
    coords = torch.arange(s, dtype=torch.float32) + 0.5 - s / 2
    total = img.sum((1, 2))
    return (img.sum(1) * coords).sum(1) / total, (img.sum(2) * coords).sum(1) / total


@pytest.mark.parametrize("kind", KINDS)
def test_flip_rates_follow_the_spec(tmp_path, kind):
    def draw(img):
        img[2:12, 2:12] = 255  # bright top-left quadrant

    idx = _marker_dataset(tmp_path / "img", 200, 32, draw)
    spec = AugmentSpec(image_size=32, crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), max_rotation=0.0)
    xs = torch.cat([x for x, _ in _epochs(kind, idx, spec, RAW, train=True, epochs=3)])
    cx, cy = _centroids(xs)
    # 600 draws: standard error of a rate near 0.6 is 0.02; allow four of them.
    assert abs((cx > 0).float().mean().item() - 0.6) < 0.08
    assert abs((cy > 0).float().mean().item() - 0.6) < 0.08
    assert ((cx.abs() > 5) & (cy.abs() > 5)).all()  # flipped or not, never anything else
    # Two coins, not one: both flips together at 0.6 x 0.6 = 0.36 (one coin for both would give 0.6).
    assert abs(((cx > 0) & (cy > 0)).float().mean().item() - 0.36) < 0.08


@pytest.mark.parametrize("kind", KINDS)
def test_rotation_range_follows_the_spec(tmp_path, kind):
    def draw(img):
        img[14:18, 24:28] = 255  # a dot right of the centre

    idx = _marker_dataset(tmp_path / "img", 200, 32, draw)
    spec = AugmentSpec(image_size=32, crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, vflip_p=0.0)
    xs = torch.cat([x for x, _ in _epochs(kind, idx, spec, RAW, train=True, epochs=2)])
    cx, cy = _centroids(xs)
    angle = torch.rad2deg(torch.atan2(cy, cx))
    assert angle.abs().max().item() < 45 + 3
    assert angle.min().item() < -38 and angle.max().item() > 38
    # Uniform on +-45: standard deviation 26 degrees.
    assert 22 < angle.std().item() < 30 and abs(angle.mean().item()) < 4


@pytest.mark.parametrize("kind", KINDS)
def test_crop_area_and_ratio_follow_the_spec(tmp_path, kind):
    size = 40
    ramp = np.tile(np.arange(size) * 6, (size, 1))  # value = 6 * x
    folder = tmp_path / "img"
    for fid in range(1, 201):
        write_sample(folder, fid, ramp, ramp.T, ramp)
    idx = scan_images(folder)
    spec = AugmentSpec(image_size=size, max_rotation=0.0, hflip_p=0.0, vflip_p=0.0)
    xs = torch.cat([x for x, _ in _epochs(kind, idx, spec, RAW, train=True, epochs=2)])
    q1, q3 = size // 4, 3 * size // 4
    # The ramp's slope in the output gives the crop's extent in input pixels.
    width = (xs[:, 0, size // 2, q3] - xs[:, 0, size // 2, q1]) / 6 * size / (q3 - q1)
    height = (xs[:, 1, q3, size // 2] - xs[:, 1, q1, size // 2]) / 6 * size / (q3 - q1)
    area = width * height / size**2
    ratio = width / height
    assert area.min().item() > 0.7 - 0.03 and area.max().item() < 1.0 + 0.03
    assert area.min().item() < 0.75 and area.max().item() > 0.9  # the whole range is used
    assert ratio.min().item() > 3 / 4 - 0.05 and ratio.max().item() < 4 / 3 + 0.05


def test_normalized_means_near_zero_and_loaders_agree_under_augmentation(small_synth):
    idx = inspect_images(build_index(small_synth / "images_train", small_synth / "y_train.csv"), progress=False)
    norm = channel_stats(idx)
    spec = AugmentSpec(image_size=32)
    means = {}
    for kind in KINDS:
        (x, _), = _epochs(kind, idx, spec, norm, train=True)
        means[kind] = x.mean(dim=(0, 2, 3))
        # Zero fill of rotated corners pulls means below 0, crops towards the bright centre push up.
        assert means[kind].abs().max().item() < 0.2, (kind, means[kind])
    assert (means["dali"] - means["torch"]).abs().max().item() < 0.06


def test_fp16_output_option(small_synth):
    idx = scan_images(small_synth / "images_test")
    for kind in KINDS:
        loader = make_loader(idx, np.arange(len(idx)), spec=AugmentSpec(image_size=32), norm=RAW, train=False,
                             device=CPU,
                             settings=LoaderSettings(kind=kind, batch_size=16, workers=1, seed=0, out_dtype="float16"))
        x, _ = next(iter(loader))
        assert x.dtype == torch.float16 and x.shape == (16, 3, 32, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_training_drops_a_last_batch_of_one_on_one_process(tmp_path, kind):
    idx = _coded_dataset(tmp_path / "img", 17)  # 2 x 8 + 1: the last batch would hold one sample
    loader = make_loader(idx, np.arange(17), spec=AugmentSpec(image_size=8), norm=RAW, train=True, device=CPU,
                         settings=LoaderSettings(kind=kind, batch_size=8, workers=1, seed=2))
    for _ in range(2):
        sizes = [len(t) for _, t in loader]
        assert sizes == [8, 8] and len(loader) == 2
    loader.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,batch,expected", [(9, 4, [4]), (129, 64, [64]), (13, 4, [4, 2])])
def test_sharded_training_runs_the_same_steps_on_every_rank(tmp_path, kind, n, batch, expected):
    # 129 samples on 2 ranks with batch 64: DALI's shards hold 64 and 65, its padded iterator gives
    # rank 0 a second, empty batch and rank 1 a second batch of one. Every rank must run the same steps.
    idx = _coded_dataset(tmp_path / "img", n)
    seen = []
    for rank in (0, 1):
        loader = make_loader(idx, np.arange(n), spec=AugmentSpec(image_size=8), norm=RAW, train=True, device=CPU,
                             settings=LoaderSettings(kind=kind, batch_size=batch, workers=1, seed=4, shard_id=rank,
                                                     num_shards=2))
        batches = [t for _, t in loader]
        assert [len(t) for t in batches] == expected and len(loader) == len(expected)
        seen.append(torch.cat(batches).tolist())
        loader.close()
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(seen[0]) == len(seen[1]) == n // 2


def decoder_outputs(index, device, image_size):
    """Every evaluation batch of the DALI loader with each decoder setting, in file order."""
    outs = []
    for decoder in ("mixed", "cpu"):
        loader = make_loader(index, np.arange(len(index)), spec=AugmentSpec(image_size=image_size), norm=RAW,
                             train=False, device=device,
                             settings=LoaderSettings(kind="dali", batch_size=32, workers=1, seed=0, decoder=decoder))
        outs.append([x for x, _ in loader])
        loader.close()
    return outs


def test_decoder_setting_builds_and_agrees_on_the_cpu(small_synth):
    # Without a GPU both settings decode in DALI's CPU pool (there is no copy to make): one output.
    mixed, cpu = (torch.cat(b) for b in decoder_outputs(scan_images(small_synth / "images_test"), CPU, 24))
    assert mixed.shape == (60, 3, 24, 24) and torch.equal(mixed, cpu)


@pytest.mark.parametrize("device_id,decoder,decoded_on,processed_on", [
    (None, "mixed", "cpu", "cpu"), (None, "cpu", "cpu", "cpu"),  # no GPU: the setting changes nothing
    (0, "mixed", "gpu", "gpu"),  # decoded on DALI's threads, handed on as GPU tensors
    (0, "cpu", "cpu", "gpu"),  # decoded on the CPU, one copy of the stacked batch to the GPU
])
def test_decoder_setting_places_the_decoders_and_the_processing(small_synth, device_id, decoder, decoded_on,
                                                               processed_on):
    """Where each operator's output lives, read from the pipeline's graph. A GPU pipeline can be defined
    without a GPU, only not built: its Python graph (_build_graph, _ops: DALI has no public way to list a
    pipeline's operators before building it) shows what the GPU would run."""
    from dalipipe.data.index import PATH_COLUMNS
    from dalipipe.loading.dali_loader import define_pipeline

    paths = scan_images(small_synth / "images_test")[PATH_COLUMNS].values.tolist()
    for train in (False, True):
        pipe = define_pipeline(paths, spec=AugmentSpec(image_size=16), norm=RAW, train=train, device_id=device_id,
                               settings=LoaderSettings(kind="dali", batch_size=4, workers=1, seed=0, decoder=decoder))
        pipe._build_graph()
        outputs = {}
        for op in pipe._ops:
            kind = op.name.strip("_").rsplit("_", 1)[0]
            outputs.setdefault(kind, set()).update(node.device for node in op.outputs)
        assert outputs["Image"] == {decoded_on}, outputs  # the three channels' decoders
        assert outputs["CropMirrorNormalize"] == {processed_on}, outputs
        assert outputs["WarpAffine" if train else "Resize"] == {processed_on}, outputs
