"""Seeing what the model is fed: `dalipipe preview`, train_batch.png, and the TensorBoard log of a run."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from dalipipe.config import AugmentSpec, TrainConfig
from dalipipe.errors import DataError
from dalipipe.run.train import train
from dalipipe.settings import PreviewSettings
from dalipipe.viz import plots, tensorboard_log
from dalipipe.viz.preview import preview
from tests import processes
from tests.conftest import pngsuite
from tests.test_cli import assert_one_line_error, dalipipe
from tests.test_exact_resume import OPTS

# The killed run and its resume: 40 s together here (2026-12-06, 2-core CPU, two tests at once).
RUN_TIMEOUT_S = 180

# 6 steps an epoch (see OPTS): the kill after global step 9 falls in epoch 2, after epoch 1 was logged.
KILL_IN_EPOCH_2 = 9


def picture(path):
    return np.asarray(Image.open(path).convert("RGB"))


def expected_size(rows, cols):
    """(height, width) in pixels of a preview with this grid."""
    return (round(plots.GRID_DPI * (plots.TITLE_IN + plots.CELL_IN * rows)),
            round(plots.GRID_DPI * (plots.LABEL_IN + plots.CELL_IN * cols)))


@pytest.mark.parametrize("loader, columns", [("dali", 4), ("torch", 4), ("both", 5)])
def test_preview_draws_a_row_per_sample_and_a_column_per_channel_and_loader(small_synth, tmp_path, loader, columns):
    d = small_synth
    shown = preview(PreviewSettings(str(d / "images_train"), str(d / "y_train.csv"), out_png=str(tmp_path / "p.png"), loader=loader, n=5,
                    image_size=32, device="cpu"))
    assert shown["samples"] == 5 and len(set(shown["file_ids"])) == 5
    image = picture(tmp_path / "p.png")
    assert image.shape[:2] == expected_size(5, columns)
    assert image.std() > 20, "a blank picture"
    for images in shown["images"].values():
        assert images.shape == (5, 32, 32, 3) and images.std() > 5


def test_without_augmentation_both_loaders_draw_the_same_images(small_synth, tmp_path):
    d = small_synth
    shown = preview(PreviewSettings(str(d / "images_train"), str(d / "y_train.csv"), out_png=str(tmp_path / "p.png"), loader="both", n=6,
                    augment=False, image_size=48, device="cpu"))
    dali, torch_ = (shown["images"][k].astype(int) for k in ("dali", "torch"))
    assert np.abs(dali - torch_).max() <= 1 and shown["max_difference"] <= 1
    # Augmented, the two draw their own crops: the picture says nothing about their agreement.
    shown = preview(PreviewSettings(str(d / "images_train"), str(d / "y_train.csv"), out_png=str(tmp_path / "p.png"), loader="both", n=6,
                    image_size=48, device="cpu", force=True))
    assert shown["max_difference"] is None


def test_preview_of_bad_data_gives_the_one_line_errors_of_train(synth_copy, tmp_path):
    d = synth_copy
    r = dalipipe("preview", d / "images_train", d / "y_train.csv", "--out", tmp_path / "p.png", check=False)
    assert r.returncode == 0 and "wrote 16 samples (dali and torch, augmented)" in r.stdout
    r = dalipipe("preview", d / "images_train", d / "y_train.csv", "--out", tmp_path / "p.png", check=False)
    assert_one_line_error(r, "p.png", "--force")
    shutil.copy(pngsuite() / "xcsn0g01.png", d / "images_train" / "00003_red.png")
    r = dalipipe("preview", d / "images_train", d / "y_train.csv", "--out", tmp_path / "q.png", check=False)
    assert_one_line_error(r, "00003_red.png", "does not decode")
    assert not (tmp_path / "q.png").exists()
    r = dalipipe("preview", d / "images_train", d / "missing.csv", "--out", tmp_path / "q.png", check=False)
    assert_one_line_error(r, "missing.csv", "not found")


def test_a_preview_that_another_command_wrote_meanwhile_is_left_alone(small_synth, tmp_path, monkeypatch):
    out = tmp_path / "p.png"
    real = plots.preview_picture

    def meanwhile(*args):  # the other preview writes --out after this one's start check
        out.write_bytes(b"theirs")
        real(*args)

    monkeypatch.setattr(plots, "preview_picture", meanwhile)
    with pytest.raises(DataError, match=r"p\.png: exists; choose another --out or pass --force"):
        preview(PreviewSettings(str(small_synth / "images_train"), str(small_synth / "y_train.csv"), out_png=str(out), loader="torch", n=2,
                image_size=16, device="cpu"))
    assert out.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["p.png"]

def test_tensorboard_without_its_package_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_log.importlib.util, "find_spec", lambda name: None)
    cfg = TrainConfig(images_dir=str(tmp_path / "no-such-folder"), labels_csv=str(tmp_path / "no.csv"),
                      out_dir=str(tmp_path / "run"), device="cpu", tensorboard=True, augment=AugmentSpec(image_size=16))
    with pytest.raises(DataError, match=r"dalipipe\[tensorboard\]"):
        train(cfg)


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    return ({t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]},
            {t: [e.step for e in events.Images(t)] for t in tags["images"]})


def test_train_batch_and_tensorboard_after_a_kill_and_resume(small_synth, tmp_path):
    """A run killed in epoch 2 (after a mid-epoch checkpoint) and resumed: each scalar has exactly one point
    per epoch, the first batch is drawn once (train_batch.png is not drawn again by the resumed run), and the
    confusion matrix of the best epoch before the kill, which the restart drops, is logged again."""
    pytest.importorskip("tensorboard")
    d, run = small_synth, tmp_path / "run"
    args = ["train", d / "images_train", d / "y_train.csv", *OPTS, "--epochs", "3", "--tensorboard", "--out", run]
    env = dict(os.environ, DALIPIPE_KILL_AT_STEP=str(KILL_IN_EPOCH_2), PYTHONWARNINGS="ignore")
    r = processes.run([sys.executable, "-m", "dalipipe", *map(str, args)], env=env,
                       timeout=RUN_TIMEOUT_S)
    assert r.returncode == -9, r.stderr[-2000:]
    batch = run / "train_batch.png"
    drawn = batch.stat().st_mtime_ns
    assert picture(batch).std() > 20
    before, _ = scalars(run / "tensorboard")
    assert before["loss/train"][0][0] == 1  # epoch 1 was logged before the kill

    dalipipe("train", "--resume", run)
    assert batch.stat().st_mtime_ns == drawn
    points, images = scalars(run / "tensorboard")
    rows = [__import__("json").loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for key, tag in tensorboard_log.SCALARS.items():
        if key not in rows[0]:  # a GPU's memory, on the CPU
            assert tag not in points and key.endswith("_mb"), tag
            continue
        assert [s for s, _ in points[tag]] == [1, 2, 3], tag
        assert [v for _, v in points[tag]] == pytest.approx([row[key] for row in rows], rel=1e-6), tag
    best = max(row["val_balanced_accuracy"] for row in rows)
    # metrics.jsonl rounds to 5 decimals; TensorBoard has the score itself (as float32)
    assert points[tensorboard_log.BEST_METRIC] == [(3, pytest.approx(best, abs=1e-5))]
    assert images["train/first_batch"] == [tensorboard_log.FIRST_BATCH_STEP]
    # One matrix at epoch 1 (the best before the kill: the only epoch done), then one at each later epoch that
    # improved on the best so far.
    scores = [row["val_balanced_accuracy"] for row in rows]
    improved = [e for e in (2, 3) if scores[e - 1] > max(scores[:e - 1])]
    assert images["validation/confusion_matrix"] == [1, *improved]


def test_the_preview_is_written_in_the_format_its_name_says(small_synth, tmp_path):
    with pytest.raises(DataError, match=r"--out .*pv\.gif: name a \.png, \.jpg, \.jpeg, \.pdf, \.svg file"):
        PreviewSettings("i", "y.csv", out_png=str(tmp_path / "pv.gif"))
    starts = {"pv.jpg": b"\xff\xd8\xff", "pv.png": b"\x89PNG", "pv.pdf": b"%PDF"}
    for name, magic in starts.items():
        preview(PreviewSettings(str(small_synth / "images_train"), str(small_synth / "y_train.csv"),
                                out_png=str(tmp_path / name), loader="torch", n=2, image_size=16, device="cpu"))
        assert (tmp_path / name).read_bytes().startswith(magic), name


def test_each_learning_curve_panels_labels_clear_the_panel_before_it():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "val_balanced_accuracy": 0.1 * e, "lr": 1e-3 * e,
             "data_wait_share": 0.01 * e} for e in (1, 2, 3)]
    fig = plots.learning_curves_figure(rows)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for left, right in zip(fig.axes, fig.axes[1:]):
        # the y label and the tick labels of a panel start clear of everything the panel before it draws (a
        # few hundredths of an inch, not touching it)
        starts = min(right.yaxis.label.get_window_extent(renderer).x0,
                     *(t.get_window_extent(renderer).x0 for t in right.get_yticklabels() if t.get_text()))
        assert starts - left.get_tightbbox(renderer).x1 >= 0.04 * fig.dpi, (left.get_ylabel(), right.get_ylabel())


def test_a_resume_with_nothing_to_train_writes_no_tensorboard_log(small_synth, tmp_path):
    pytest.importorskip("tensorboard")
    import dataclasses

    d = small_synth
    cfg = TrainConfig(images_dir=str(d / "images_train"), labels_csv=str(d / "y_train.csv"), out_dir=str(tmp_path / "r"),
                      epochs=1, batch_size=32, device="cpu", workers=1, augment=AugmentSpec(image_size=16),
                      tensorboard=True)
    train(cfg)
    logs = sorted(p.name for p in (tmp_path / "r" / "tensorboard").rglob("*") if p.is_file())
    assert logs
    for _ in range(2):  # already trained for its epochs: it says so, and logs nothing
        assert train(dataclasses.replace(cfg), resume=True).epochs == 1
    assert sorted(p.name for p in (tmp_path / "r" / "tensorboard").rglob("*") if p.is_file()) == logs
