"""The recipe's options end to end through the command line: test-time flips, ensembles of runs, k-fold
runs, and what a run with them records."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dalipipe import checkpoint
from dalipipe.data.index import build_index
from dalipipe.data.split import kfold_split
from dalipipe.run.recipe import Schedule, balanced_class_weights
from tests.test_cli import assert_one_line_error, dalipipe

# 16 px from 32 px: every prediction goes through each loader's resize, which must commute with the flips.
TINY = ["--epochs", "2", "--image-size", "16", "--batch-size", "32", "--device", "cpu", "--workers", "2"]
RECIPE = ["--ema", "0.9", "--class-weights", "balanced", "--schedule", "cosine", "--warmup-epochs", "0.5",
          "--label-smoothing", "0.1", "--tta-val"]


@pytest.fixture(scope="module")
def fold_runs(small_synth, tmp_path_factory):
    """Two runs on folds 1 and 2 of 3: the first with the reference recipe, the second with every option."""
    d, root = small_synth, tmp_path_factory.mktemp("folds")
    for fold, extra in ((1, []), (2, RECIPE)):
        dalipipe("train", d / "images_train", d / "y_train.csv", "--out", root / f"fold{fold}", *TINY,
                 "--folds", "3", "--fold", fold, *extra)
    return root


def probs_of(csv) -> pd.DataFrame:
    frame = pd.read_csv(csv).set_index("file_id").sort_index()
    return frame[[c for c in frame.columns if c.startswith("p_")]]


def flipped_copy(src, dst, flip) -> None:
    dst.mkdir(parents=True)
    for png in src.glob("*.png"):
        arr = np.asarray(Image.open(png))
        Image.fromarray(np.ascontiguousarray(flip(arr))).save(dst / png.name)


FLIPS = {"none": lambda a: a, "h": lambda a: a[:, ::-1], "v": lambda a: a[::-1, :], "hv": lambda a: a[::-1, ::-1]}


def tta_and_plain_predictions(run, images, tmp_path, opts) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """predict --tta's probabilities, and the plain predictions of the images flipped on disk (each view)."""
    plain = []
    for name, flip in FLIPS.items():
        flipped_copy(images, tmp_path / name, flip)
        dalipipe("predict", run, tmp_path / name, "--out", tmp_path / f"{name}.csv", *opts)
        plain.append(probs_of(tmp_path / f"{name}.csv"))
    dalipipe("predict", run, images, "--out", tmp_path / "tta.csv", "--tta", *opts)
    tta = probs_of(tmp_path / "tta.csv")
    assert all(p.index.equals(tta.index) and list(p.columns) == list(tta.columns) for p in plain)
    return tta, plain


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_tta_equals_the_mean_of_plain_predictions_of_flipped_images(small_synth, fold_runs, tmp_path, loader):
    run = fold_runs / "fold2"  # trained with --ema: predict uses the average
    opts = ["--loader", loader, "--device", "cpu", "--workers", "2", "--probs"]
    tta, plain = tta_and_plain_predictions(run, small_synth / "images_test", tmp_path, opts)
    mean = sum(p.to_numpy() for p in plain) / 4
    assert np.abs(tta.to_numpy() - mean).max() < 1e-5
    # Not a vacuous check: the model tells the flipped copies apart.
    assert np.abs(plain[0].to_numpy() - plain[1].to_numpy()).max() > 1e-3
    assert np.abs(plain[0].to_numpy() - plain[2].to_numpy()).max() > 1e-3


def test_an_ensemble_is_the_mean_of_its_members(small_synth, fold_runs, tmp_path):
    test_dir = small_synth / "images_test"
    for k in (1, 2):
        dalipipe("predict", fold_runs / f"fold{k}", test_dir, "--out", tmp_path / f"m{k}.csv", "--probs",
                 "--device", "cpu")
    r = dalipipe("predict", fold_runs / "fold1", fold_runs / "fold2" / "best.pt", test_dir, "--out",
                 tmp_path / "ens.csv", "--probs", "--device", "cpu")
    assert "ensemble of 2 models" in r.stdout
    ens, m1, m2 = (probs_of(tmp_path / f"{n}.csv") for n in ("ens", "m1", "m2"))
    assert np.abs(ens.to_numpy() - (m1.to_numpy() + m2.to_numpy()) / 2).max() < 2e-6
    assert np.abs(m1.to_numpy() - m2.to_numpy()).max() > 1e-3  # two different models
    labels = pd.read_csv(tmp_path / "ens.csv").set_index("file_id").sort_index()["cell_line"]
    assert_labels_follow_probabilities(labels, ens)


def assert_labels_follow_probabilities(labels: pd.Series, probs: pd.DataFrame) -> None:
    """Each label is a class of the highest probability as written. Written probabilities are rounded to
    6 decimals, so classes within 2e-6 of the top one are all acceptable: the label was chosen before the
    rounding, and saturated models give near or exact ties (0.5/0.5), which must not decide the test."""
    p = probs.to_numpy()
    top = p.max(1, keepdims=True)
    names = np.array([c.removeprefix("p_") for c in probs.columns])
    for label, row, best in zip(labels, p, top[:, 0]):
        assert label in set(names[row >= best - 2e-6]), (label, dict(zip(names, row)))
    # Not vacuous: most rows have a single clear winner.
    assert ((p >= top - 2e-6).sum(1) == 1).mean() > 0.5


def test_an_ensemble_of_runs_with_other_classes_is_refused(small_synth, fold_runs, tmp_path):
    ck = checkpoint.load(fold_runs / "fold1" / "best.pt")
    ck["class_names"] = ["a", "b", "c", "d"]
    torch.save(ck, tmp_path / "other.pt")
    r = dalipipe("predict", fold_runs / "fold1", tmp_path / "other.pt", small_synth / "images_test", "--out",
                 tmp_path / "s.csv", check=False)
    assert_one_line_error(r, "other.pt", "classes (a, b, c, d) differ from those of", "fold1")
    assert not (tmp_path / "s.csv").exists()


def test_a_fold_run_records_its_fold_weights_schedule_and_average(small_synth, fold_runs):
    index = build_index(small_synth / "images_train", small_synth / "y_train.csv")
    plain, full = (checkpoint.load(fold_runs / f"fold{k}" / "last.pt") for k in (1, 2))
    for k, ck in ((1, plain), (2, full)):
        train, val = kfold_split(index, 3, k, seed=42)
        assert ck["split"] == {"train_ids": train.file_id.tolist(), "val_ids": val.file_id.tolist(),
                               "folds": 3, "fold": k}
    assert plain["ema"] is None and plain["class_weights"] is None
    train, _ = kfold_split(index, 3, 2, seed=42)
    assert full["class_weights"] == pytest.approx(balanced_class_weights(train["y"].to_numpy(), 4).tolist())
    steps = -(-len(train) // 32)  # 160 samples: 5 steps an epoch
    assert full["ema"]["updates"] == 2 * steps and full["ema"]["decay"] == 0.9
    assert set(full["ema"]["model"]) == set(full["model"])
    assert not all(torch.equal(full["ema"]["model"][k], full["model"][k]) for k in full["model"])
    cfg = full["config"]
    schedule = Schedule("cosine", cfg["lr"], round(0.5 * steps), 2 * steps)
    rows = [json.loads(line) for line in (fold_runs / "fold2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([schedule.epoch_mean(e, steps) for e in range(2)])
    assert rows[1]["lr"] < rows[0]["lr"] < cfg["lr"]
    plain_rows = [json.loads(line) for line in (fold_runs / "fold1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in plain_rows] == [1e-3, 1e-3]  # the reference: constant


def test_a_short_run_from_scratch_tells_samples_apart(fold_runs):
    """With PyTorch's default init, a short run predicted one constant probability vector for every
    sample (balanced accuracy exactly 1/K)."""
    frame = pd.read_csv(fold_runs / "fold1" / "val_predictions.csv")
    p = frame[[c for c in frame.columns if c.startswith("p_")]].to_numpy()
    assert p.std(0).max() > 1e-3
    assert len({tuple(row) for row in np.round(p, 4)}) > len(p) // 2


def test_folds_and_val_fraction_exclude_each_other(small_synth, tmp_path):
    d = small_synth
    # (a short run's settings: were a refusal missing, the run would end soon, not train the whole recipe)
    short = ["--epochs", "1", "--image-size", "16", "--batch-size", "32", "--device", "cpu", "--time-limit", "0.001"]
    r = dalipipe("train", d / "images_train", d / "y_train.csv", "--out", tmp_path / "r", "--folds", "3", "--fold",
                 "1", "--val-fraction", "0.2", *short, check=False)
    assert_one_line_error(r, "--folds and --val-fraction exclude each other")
    r = dalipipe("train", d / "images_train", d / "y_train.csv", "--out", tmp_path / "r", "--folds", "70",
                 "--fold", "1", *short, check=False)
    assert_one_line_error(r, "--folds 70: every class needs at least 70 samples")
