"""The GPU mode of the same code: skipped cleanly on machines without a CUDA GPU."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dalipipe.config import AugmentSpec, LoaderSettings
from dalipipe.data.index import build_index, inspect_images
from dalipipe.data.stats import channel_stats
from dalipipe.loading.loaders import make_loader
from tests.test_loaders import RAW, _coded_dataset, _codes, decoder_outputs
from tests.test_tta_and_ensembles import tta_and_plain_predictions


def gpu_here() -> bool:
    """torch and DALI both see a CUDA GPU: the GPU tests run, and pass, only where both do. DALI is asked
    only where torch sees one (it would find none anyway)."""
    if not torch.cuda.is_available():
        return False
    try:
        from nvidia.dali import backend

        return backend.GetCUDADeviceCount() > 0
    except Exception:  # not installed, or built for a CUDA this machine cannot load: the tests skip
        return False


GPU_HERE = gpu_here()
# dali: these need DALI besides the GPU (the GPU check runs the GPU tests without DALI apart, before DALI
# is there: tests/test_gpu_torch.py).
pytestmark = [pytest.mark.gpu, pytest.mark.dali,
              pytest.mark.skipif(not GPU_HERE, reason="needs a CUDA GPU that torch and DALI see")]
GPU = torch.device("cuda", 0)
# Probabilities of one model under predict's autocast (bf16, or fp16 on GPUs without native bf16),
# computed in two batch arrangements: cuDNN picks its kernels per shape, each layer's output is rounded
# to bf16's 8 significant bits (0.4%; fp16 keeps 11), so different kernels' sums differ in the logits.
# On the CPU, two bf16 kernel arrangements of the TTA test's model (channels_last against contiguous)
# differed by at most 0.005 per view and 0.0013 on the mean of the four views, where the views
# themselves differ from their mean by 0.35 or more.
HALF_PRECISION_PROBABILITY_TOLERANCE = 0.02


def _all(loader):
    xs, ts = zip(*[(x, t) for x, t in loader])
    return torch.cat(xs), torch.cat(ts)


def test_gpu_dali_equals_cpu_torch_without_augmentation(small_synth):
    idx = inspect_images(build_index(small_synth / "images_train", small_synth / "y_train.csv"), progress=False)
    norm, spec = channel_stats(idx), AugmentSpec(image_size=96)
    xg, tg = _all(make_loader(idx, np.arange(len(idx)), spec=spec, norm=norm, train=False, device=GPU,
                              settings=LoaderSettings(kind="dali", batch_size=64, workers=2, seed=0)))
    xc, tc = _all(make_loader(idx, np.arange(len(idx)), spec=spec, norm=norm, train=False, device=torch.device("cpu"),
                                settings=LoaderSettings(kind="torch", batch_size=64, workers=2, seed=0)))
    assert xg.is_cuda and xg.dtype == torch.float32 and xg.shape == (240, 3, 96, 96)
    assert tg.cpu().tolist() == tc.tolist() == list(range(240))
    assert (xg.cpu() - xc).abs().max().item() < 1e-3


def test_gpu_epochs_cover_each_sample_once_with_channels_together(tmp_path):
    idx = _coded_dataset(tmp_path / "img", 301)
    loader = make_loader(idx, np.arange(301), spec=AugmentSpec(image_size=16), norm=RAW, train=True, device=GPU,
                         settings=LoaderSettings(kind="dali", batch_size=64, workers=2, seed=5))
    assert len(loader) == 5
    orders = []
    for _ in range(3):
        x, t = _all(loader)
        assert sorted(t.cpu().tolist()) == list(range(301))
        expected = torch.tensor([_codes(int(idx.file_id[int(i)])) for i in t.cpu()], dtype=torch.float32)
        assert (x[:, :, 8, 8].cpu() - expected).abs().max().item() < 1e-3
        orders.append(t.cpu().tolist())
    assert orders[0] != orders[1] != orders[2]


def test_gpu_fp16_output(small_synth):
    idx = build_index(small_synth / "images_test")
    loader = make_loader(idx, np.arange(len(idx)), spec=AugmentSpec(image_size=64), norm=RAW, train=False, device=GPU,
                         settings=LoaderSettings(kind="dali", batch_size=32, workers=2, seed=0, out_dtype="float16"))
    x, _ = next(iter(loader))
    assert x.is_cuda and x.dtype == torch.float16


@pytest.mark.slow  # starts dalipipe processes (CUDA contexts, cuDNN autotuning, checkpoints)
def test_gpu_train_and_predict_end_to_end(small_synth, tmp_path):
    from tests.test_cli import assert_same_predictions, dalipipe

    d = small_synth
    dalipipe("train", d / "images_train", d / "y_train.csv", "--out", tmp_path / "run", "--epochs", "2",
             "--image-size", "64", "--batch-size", "32", "--device", "gpu")
    subs = {}
    for loader in ("dali", "torch"):
        dalipipe("predict", tmp_path / "run", d / "images_test", "--out", tmp_path / f"{loader}.csv", "--device", "gpu",
                 "--loader", loader, "--probs")
        subs[loader] = pd.read_csv(tmp_path / f"{loader}.csv")
    # Inputs that agree to 1e-3, under half-precision autocast: probabilities within its tolerance, classes
    # wherever the top two are clearly apart (on the CPU, half of the rows of such a run are 0.04 apart).
    assert_same_predictions(subs["dali"], subs["torch"], tolerance=HALF_PRECISION_PROBABILITY_TOLERANCE,
                            min_clear=0.2)


def test_gpu_decoder_arrangements_agree_and_arrive_channels_last(small_synth):
    mixed, cpu = decoder_outputs(build_index(small_synth / "images_test"), GPU, 64)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in mixed + cpu)
    assert torch.equal(torch.cat(mixed), torch.cat(cpu))


@pytest.mark.parametrize("dropped", [False, True])
def test_gpu_batches_handed_out_without_a_copy_stay_intact_while_the_host_runs_ahead(small_synth, dropped):
    """DALI hands out views of its own buffers. A batch's checksum queued on arrival must equal one queued
    behind a long GPU wait (torch.cuda._sleep) while the host fetched several more batches: a buffer reused
    under a batch still to be read would change it. dropped: the host lets go of the batch once the read is
    queued, as the training loop does when it takes the next batch while the step's kernels still run."""
    idx = build_index(small_synth / "images_test")
    loader = make_loader(idx, np.arange(len(idx)), spec=AugmentSpec(image_size=64), norm=RAW, train=False, device=GPU,
                         settings=LoaderSettings(kind="dali", batch_size=8, workers=2, seed=0))
    it = iter(loader)
    first, _ = next(it)
    on_arrival = first.double().sum()  # queued now, on the current stream
    torch.cuda._sleep(200_000_000)  # the GPU stays busy; the host goes on
    after = first.double().sum()  # queued behind the wait: reads the buffer only then
    if dropped:
        del first
    later = [next(it) for _ in range(4)]  # more than DALI's prefetch depth
    assert torch.equal(on_arrival, after), (on_arrival.item(), after.item())
    assert len(later) == 4
    loader.close()


@pytest.mark.parametrize("train", [True, False])
def test_gpu_store_gives_the_batches_of_the_pngs(small_synth, tmp_path, train):
    """The decode-once path on the device: DALI reading the decoded store (CPU numpy reader, one copy a
    batch) hands out the batches that decoding the PNGs does, augmented or not, with the same seed."""
    index = build_index(small_synth / "images_test")
    plain = inspect_images(index, progress=False, cache=False)
    stored = inspect_images(index, progress=False, cache=False, store=tmp_path / "store")
    settings = LoaderSettings(kind="dali", batch_size=16, workers=2, seed=7)
    batches = []
    for idx in (plain, stored):
        loader = make_loader(idx, np.arange(len(idx)), spec=AugmentSpec(image_size=32), norm=RAW, train=train,
                             device=GPU, settings=settings)
        batches.append([(x.clone(), y.clone()) for _ in range(2) for x, y in loader])
        loader.close()
    assert len(batches[0]) == len(batches[1])
    for (a, ya), (b, yb) in zip(*batches):
        assert torch.equal(ya, yb) and torch.equal(a, b)


@pytest.mark.slow  # starts dalipipe processes (CUDA contexts, cuDNN autotuning, checkpoints)
def test_gpu_recipe_options_train_and_tta_equals_plain_predictions_of_flipped_copies(small_synth, tmp_path):
    """--ema, the cosine schedule, class weights and --tta-val on the device; then predict --tta, on a GPU
    one forward pass of each batch's 4n views, against the mean of plain predictions of the test images
    flipped on disk (four runs of n), as tests/test_tta_and_ensembles.py does on the CPU. Both run at the
    precision predict uses on this GPU (bf16 autocast where it is native), so they agree to bf16's
    rounding, not to fp32's."""
    from dalipipe import checkpoint
    from tests.test_cli import dalipipe

    d, run = small_synth, tmp_path / "run"
    dalipipe("train", d / "images_train", d / "y_train.csv", "--out", run, "--epochs", "2", "--image-size", "64",
             "--batch-size", "32", "--device", "gpu", "--ema", "0.99", "--schedule", "cosine",
             "--class-weights", "balanced", "--tta-val")
    assert checkpoint.load(run / "best.pt")["ema"]["updates"] > 0
    tta, plain = tta_and_plain_predictions(run, d / "images_test", tmp_path, ["--device", "gpu", "--probs"])
    mean = sum(p.to_numpy() for p in plain) / len(plain)
    error = np.abs(tta.to_numpy() - mean).max()
    assert error < HALF_PRECISION_PROBABILITY_TOLERANCE, error
    # Not a vacuous check: each view differs from the mean by more than three times the tolerance, so that
    # a TTA leaving out any one view (off by a third of that view's difference) fails above. (On the CPU
    # the same run's views differ from their mean by 0.35 to 0.51.)
    spreads = [np.abs(p.to_numpy() - mean).max() for p in plain]
    assert min(spreads) > 3 * HALF_PRECISION_PROBABILITY_TOLERANCE, spreads
