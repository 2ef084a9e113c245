"""The synthetic generator: layout, determinism, and statistics near the real data's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dalipipe.constants import REAL_MEAN, REAL_STD
from dalipipe.data.synthetic import _labels, class_names, generate, render
from dalipipe.errors import DataError
from dalipipe.settings import SynthSpec


def _digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_layout_matches_the_challenge(small_synth):
    d = small_synth
    assert sorted(p.name for p in d.iterdir()) == ["images_test", "images_train", "sample_submission.csv",
                                                   "y_test.csv", "y_train.csv"]
    assert len(list((d / "images_train").glob("*.png"))) == 3 * 240
    assert (d / "images_test" / "00241_yellow.png").is_file() and (d / "images_test" / "00300_blue.png").is_file()
    y = pd.read_csv(d / "y_train.csv")
    assert list(y.columns) == ["file_id", "cell_line"] and y.file_id.tolist() == list(range(1, 241))
    sub = pd.read_csv(d / "sample_submission.csv")
    assert sub.file_id.tolist() == list(range(241, 301))


def test_deterministic_for_a_seed(tmp_path):
    spec = SynthSpec(n_train=30, n_test=10, n_classes=3, image_size=24, seed=5)
    a, b = generate(tmp_path / "a", spec), generate(tmp_path / "b", spec)
    c = generate(tmp_path / "c", SynthSpec(n_train=30, n_test=10, n_classes=3, image_size=24, seed=6))
    assert _digest(a) == _digest(b) != _digest(c)


def test_refuses_to_overwrite(tmp_path):
    spec = SynthSpec(n_train=20, n_test=4, n_classes=2, image_size=16)
    generate(tmp_path / "d", spec)
    with pytest.raises(DataError, match="not empty"):
        generate(tmp_path / "d", spec)


def test_the_data_set_follows_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = generate(tmp_path / "d", SynthSpec(n_train=4, n_test=0, n_classes=2, image_size=16))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # others can read it, as its subfolders
    assert stat.S_IMODE((out / "images_train").stat().st_mode) == 0o755


def test_a_replacement_stopped_midway_leaves_the_old_set_as_it_was(tmp_path, monkeypatch):
    import dalipipe.data.synthetic

    spec = SynthSpec(n_train=6, n_test=2, n_classes=2, image_size=16)
    out = generate(tmp_path / "d", spec)
    before = _digest(out)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dalipipe.data.synthetic, "render", stopped)
    with pytest.raises(KeyboardInterrupt):
        generate(out, SynthSpec(n_train=6, n_test=2, n_classes=2, image_size=16, seed=1), force=True)
    assert _digest(out) == before and [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folder left
    monkeypatch.undo()
    generate(out, SynthSpec(n_train=6, n_test=2, n_classes=2, image_size=16, seed=1), force=True)
    assert _digest(out) != before and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_a_replacement_that_fails_at_its_last_step_keeps_the_old_set(tmp_path, monkeypatch):
    """The new set complete, its rename into place fails (a full disk, a kill there): the old set is still
    there, as it was. (Removing the old set first would lose it.)"""
    import os

    import dalipipe.data.synthetic

    out = generate(tmp_path / "d", SynthSpec(n_train=6, n_test=2, n_classes=2, image_size=16))
    before = _digest(out)
    real = os.replace

    def failing(src, dst):
        if Path(dst) == out and ".old." not in str(src):  # the new set's rename over OUT_DIR
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(dalipipe.data.synthetic.os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        generate(out, SynthSpec(n_train=6, n_test=2, n_classes=2, image_size=16, seed=1), force=True)
    assert _digest(out) == before and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_statistics_close_to_the_real_data():
    rng = np.random.default_rng(0)
    y = _labels(1500, 9, rng, 2)
    imgs = render(y, 64, rng, 9)
    for name, arr in imgs.items():
        assert arr.mean() == pytest.approx(REAL_MEAN[name], rel=0.1), name
        assert arr.std() == pytest.approx(REAL_STD[name], rel=0.1), name
    # A dark background and a compact bright nucleus: corners dark, centre bright in blue.
    assert imgs["blue"][:, :6, :6].mean() < 5 and imgs["blue"][:, 28:36, 28:36].mean() > 120


def test_class_proportions_follow_the_real_counts():
    y = _labels(9632, 9, np.random.default_rng(0), 2)
    counts = np.bincount(y)
    assert counts.tolist() == [2100, 1626, 1378, 1082, 775, 768, 663, 632, 608]
    assert class_names(11)[-1] == "line-11" and class_names(9)[0] == "RT4"


def test_classes_differ_but_overlap():
    """Per-class mean nucleus area differs, and the spread inside a class exceeds the gap between neighbours."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(9), 150)
    blue = render(y, 64, rng, 9)["blue"]
    area = (blue > 100).sum(axis=(1, 2)).astype(float)
    means = np.array([area[y == k].mean() for k in range(9)])
    stds = np.array([area[y == k].std() for k in range(9)])
    assert means.max() > 1.5 * means.min()
    assert np.median(stds) > np.median(np.diff(np.sort(means)))
