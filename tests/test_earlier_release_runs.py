"""Runs written by an earlier release still predict and resume with this one: the release at b43d380 (before
the checkpoint's owner was one module, and before its layout was pinned), run from its own sources in the
repository's history. A clone without that history (a shallow one) skips; the layout tests
(test_checkpoint_layout.py) still hold the format there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dalipipe import checkpoint
from tests import processes
from tests.test_cli import COMMAND_TIMEOUT_S, dalipipe

EARLIER = "b43d380"
ROOT = Path(__file__).resolve().parents[1]
# 168 training samples, batch 32: 6 steps an epoch.
TINY = ["--image-size", "16", "--batch-size", "32", "--device", "cpu", "--workers", "1"]


@pytest.fixture(scope="module")
def earlier_release(tmp_path_factory) -> Path:
    """The earlier release's sources, unpacked from the repository's history."""
    have = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{EARLIER}^{{commit}}"], capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"the repository's history lacks {EARLIER} (a shallow clone or no git)")
    dst = tmp_path_factory.mktemp("earlier")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", EARLIER, "dalipipe"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive.stdout, check=True)
    where = subprocess.run([sys.executable, "-c", "import dalipipe; print(dalipipe.__file__)"], cwd=dst,
                           env=dict(os.environ, PYTHONPATH=str(dst)), capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(dst), where.stdout  # its own sources, not this release's
    return dst


def earlier(release: Path, *args) -> subprocess.CompletedProcess:
    """A command of the earlier release: `earlier(release, "train", ...)`."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(release))
    return processes.run([sys.executable, "-m", "dalipipe", *map(str, args)], env=env, cwd=release,
                         timeout=COMMAND_TIMEOUT_S)


def test_a_run_of_the_earlier_release_predicts_and_resumes_after_an_epoch(earlier_release, small_synth, tmp_path):
    d, run = small_synth, tmp_path / "run"
    r = earlier(earlier_release, "train", d / "images_train", d / "y_train.csv", "--epochs", "1", *TINY, "--out", run)
    assert r.returncode == 0, r.stderr[-3000:]
    dalipipe("predict", run, d / "images_test", "--out", tmp_path / "sub.csv", "--device", "cpu", "--workers", "1")
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert len(sub) == 60 and set(sub.columns) >= {"file_id", "cell_line"}
    dalipipe("train", "--resume", run, "--epochs", "2")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert checkpoint.SavedRun.read(run / "last.pt").progress.epochs_done == 2


def test_a_mid_epoch_checkpoint_of_the_earlier_release_resumes(earlier_release, small_synth, tmp_path):
    d, run = small_synth, tmp_path / "run"
    r = earlier(earlier_release, "train", d / "images_train", d / "y_train.csv", "--epochs", "1", *TINY,
                      "--time-limit", "0.000001", "--out", run)
    saved = checkpoint.SavedRun.read(run / "last.pt")
    assert saved.partial_steps == 1 and saved.progress.epochs_done == 0, r.stderr[-3000:]
    dalipipe("train", "--resume", run)
    saved = checkpoint.SavedRun.read(run / "last.pt")
    assert saved.partial_steps is None and saved.progress.epochs_done == 1
    assert (run / "best.pt").is_file()


def test_a_model_of_the_earlier_release_predicts_as_before_on_images_it_enlarges(earlier_release, small_synth,
                                                                                    tmp_path):
    """The challenge's case, images no larger than the model input (here 32 px to 48): the loaders enlarge
    them as before, only larger images are now shrunk antialiased first. From the same checkpoint, the
    earlier release and this one write the same predictions and probabilities, with either loader."""
    d, run = small_synth, tmp_path / "run"
    r = earlier(earlier_release, "train", d / "images_train", d / "y_train.csv", "--epochs", "1", "--image-size", "48",
                "--batch-size", "32", "--device", "cpu", "--workers", "1", "--out", run)
    assert r.returncode == 0, r.stderr[-3000:]
    for loader in ("dali", "torch"):
        args = ["predict", run, d / "images_test", "--probs", "--loader", loader, "--device", "cpu", "--workers", "1"]
        r = earlier(earlier_release, *args, "--out", tmp_path / f"before_{loader}.csv")
        assert r.returncode == 0, r.stderr[-3000:]
        dalipipe(*args, "--out", tmp_path / f"now_{loader}.csv")
        before, now = (pd.read_csv(tmp_path / f"{when}_{loader}.csv") for when in ("before", "now"))
        assert len(now) == 60 and now.filter(like="p_").shape[1] == 4
        pd.testing.assert_frame_equal(now, before, check_exact=True)
