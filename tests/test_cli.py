"""The command line as a user meets it: one-line errors, and synth -> train -> resume -> predict."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from dalipipe import checkpoint
from dalipipe.data.synthetic import generate
from dalipipe.settings import SynthSpec
from tests import processes
from tests.conftest import pngsuite

# A dalipipe command of the tests: the longest (the end-to-end training and its resume) take 122 s together
# with the predictions of their test, 45 s the killed run and its resume (2026-12-06, 2-core CPU, two tests
# at once).
COMMAND_TIMEOUT_S = 300


def dalipipe(*args, check=True, timeout=COMMAND_TIMEOUT_S):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = processes.run([sys.executable, "-m", "dalipipe", *map(str, args)], timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"dalipipe {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def assert_one_line_error(r, *fragments):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, r.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]


def test_data_errors_are_one_line_and_exit_2(synth_copy, tmp_path):
    d = synth_copy
    shutil.copy(pngsuite() / "xcsn0g01.png", d / "images_train" / "00003_red.png")
    r = dalipipe("train", d / "images_train", d / "y_train.csv", "--out", tmp_path / "run", check=False)
    assert_one_line_error(r, "00003_red.png", "does not decode")
    assert not (tmp_path / "run" / "last.pt").exists()

    (d / "bad.csv").write_text("id,label\n1,RT4\n")
    r = dalipipe("train", d / "images_train", d / "bad.csv", "--out", tmp_path / "run", check=False)
    assert_one_line_error(r, "bad.csv", "no 'file_id' or 'cell_line' column")

    r = dalipipe("predict", d / "y_train.csv", d / "images_test", "--out", tmp_path / "s.csv", check=False)
    assert_one_line_error(r, "y_train.csv", "checkpoint")

    r = dalipipe("synth", d, check=False)
    assert_one_line_error(r, "not empty")


@pytest.fixture(scope="module")
def e2e_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "data"
    return generate(out, SynthSpec(n_train=480, n_test=120, n_classes=4, image_size=64, seed=9))


def test_train_resume_predict_end_to_end(e2e_data, tmp_path):
    d, run = e2e_data, tmp_path / "run"
    # 64 px and batch 16: from scratch, efficientnet-b1 needs enough steps and pixels to learn in 7 epochs.
    common = ["--image-size", "64", "--batch-size", "16", "--device", "cpu", "--workers", "2"]
    dalipipe("train", d / "images_train", d / "y_train.csv", "--out", run, "--epochs", "3", *common)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for name in ("best.pt", "last.pt", "config.json", "labels.json", "learning_curves.png", "confusion_matrix.png"):
        assert (run / name).is_file(), name

    # A second run into the same folder would mix two runs: refused.
    r = dalipipe("train", d / "images_train", d / "y_train.csv", "--out", run, check=False)
    assert_one_line_error(r, "already holds a run")

    dalipipe("train", "--resume", run, "--epochs", "7")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 8))
    last = checkpoint.load(run / "last.pt")
    assert last["epoch"] == 7 and last["class_names"] == ["CACO-2", "HEK 293", "MCF7", "RT4"]
    assert last["config"]["augment"]["image_size"] == 64 and len(last["mean"]) == 3

    subs = {}
    for loader in ("dali", "torch"):
        out = tmp_path / f"sub_{loader}.csv"
        dalipipe("predict", run, d / "images_test", "--out", out, "--loader", loader, "--probs", "--device", "cpu")
        subs[loader] = pd.read_csv(out)
    sub = subs["dali"]
    assert sub.file_id.tolist() == list(range(481, 601))
    assert list(sub.columns[:2]) == ["file_id", "cell_line"] and len(sub.columns) == 2 + 4
    assert (sub.filter(like="p_").sum(axis=1) - 1).abs().max() < 1e-4
    # The loaders' inputs agree to 1e-3, not bit for bit: probabilities within a tolerance (seen: equal to
    # the 6 written decimals), and the classes wherever the top two are further apart than the tolerance
    # allows either to move (seen: a top-two gap of 0.0023 among these 120).
    assert_same_predictions(subs["torch"], sub, tolerance=1e-3)
    r = dalipipe("predict", run, d / "images_test", "--out", tmp_path / "sub_dali.csv", check=False)
    assert_one_line_error(r, "exists")

    # Scores that follow from the run and not from how well 7 epochs on this machine's CPU happened to
    # learn (test balanced accuracies from 0.43 to 0.61 seen between epochs): `score` of the run's own
    # validation predictions is the balanced accuracy best.pt recorded, and predict from best.pt on the
    # validation ids gives those predictions again (the same classes in the same order as in training).
    best = checkpoint.load(run / "best.pt")
    val = pd.read_csv(run / "val_predictions.csv")
    labels = pd.read_csv(d / "y_train.csv")
    labels[labels.file_id.isin(val.file_id)].to_csv(tmp_path / "val_answers.csv", index=False)
    score = float(dalipipe("score", run / "val_predictions.csv", tmp_path / "val_answers.csv").stdout.split()[2])
    assert score == pytest.approx(best["val_balanced_accuracy"], abs=1e-4)
    # the best epoch's per-class figures: their recalls average to that balanced accuracy
    per_class = pd.read_csv(run / "val_per_class.csv")
    assert sorted(per_class.cell_line) == sorted(best["class_names"]) and per_class.support.sum() == len(val)
    assert per_class.recall.mean() == pytest.approx(best["val_balanced_accuracy"], abs=1e-4)
    val[["file_id"]].to_csv(tmp_path / "val_ids.csv", index=False)
    dalipipe("predict", run / "best.pt", d / "images_train", "--out", tmp_path / "val.csv", "--ids",
             tmp_path / "val_ids.csv", "--probs", "--device", "cpu")
    assert_same_predictions(val, pd.read_csv(tmp_path / "val.csv"), tolerance=1e-3)

    ids = pd.read_csv(d / "sample_submission.csv").iloc[::-1].iloc[:30]
    ids.to_csv(tmp_path / "ids.csv", index=False)
    dalipipe("predict", run / "best.pt", d / "images_test", "--out", tmp_path / "sub_ids.csv", "--ids", tmp_path / "ids.csv")
    assert pd.read_csv(tmp_path / "sub_ids.csv").file_id.tolist() == ids.file_id.tolist()


def assert_same_predictions(a: pd.DataFrame, b: pd.DataFrame, tolerance: float, min_clear: float = 0.5) -> None:
    """The same ids, probabilities within `tolerance`, and the same class wherever the top two
    probabilities are more than twice the tolerance apart (closer ones may swap: a near tie must not
    decide the test). min_clear: the share of rows that must be that far apart, so that the classes are
    compared at all."""
    assert a.file_id.tolist() == b.file_id.tolist()
    probs = [c for c in a.columns if c.startswith("p_")]
    assert probs and (a[probs] - b[probs]).abs().to_numpy().max() < tolerance
    top2 = np.sort(a[probs].to_numpy(), 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
    assert clear.mean() > min_clear, clear.mean()
    assert (a.cell_line.to_numpy()[clear] == b.cell_line.to_numpy()[clear]).all()


def test_kill_mid_epoch_then_resume(e2e_data, tmp_path):
    d, run = e2e_data, tmp_path / "run"
    # 336 training samples, batch 16: 21 steps an epoch, a mid-epoch checkpoint every 5.
    cmd = [sys.executable, "-m", "dalipipe", "train", d / "images_train", d / "y_train.csv", "--out", run,
           "--epochs", "3", "--image-size", "32", "--batch-size", "16", "--device", "cpu", "--checkpoint-every", "5"]
    # Killed with SIGKILL inside the second epoch (as a pre-emption would), after its step 10 (global step
    # 31) and the checkpoints handed over until then, at the same point on any machine.
    r = processes.run(cmd, env=dict(os.environ, PYTHONWARNINGS="ignore", DALIPIPE_KILL_AT_STEP="31"),
                      timeout=COMMAND_TIMEOUT_S)
    assert r.returncode == -9, r.stderr[-3000:]
    # The last checkpoint written: global step 30 (every 5 over the whole run), epoch 2's step 9.
    saved = checkpoint.load(run / "last.pt")
    assert saved["epoch"] == 1 and saved["partial"]["steps"] == 9, saved["partial"]
    r = dalipipe("train", "--resume", run)
    assert "resumed at epoch 2, after step 9" in r.stderr  # the resume continues from what the file holds
    best = checkpoint.load(run / "best.pt")
    assert checkpoint.load(run / "last.pt")["epoch"] == 3
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # no epoch lost or counted twice by the kill
    assert best["val_balanced_accuracy"] == pytest.approx(max(r["val_balanced_accuracy"] for r in rows), abs=1e-5)
    assert not list(run.glob(".*.tmp")), "stale temporary files left behind"
    model_state = torch.load(run / "best.pt", weights_only=False)["model"]
    assert all(torch.isfinite(v.float()).all() for v in model_state.values())


def test_training_split_one_more_than_a_multiple_of_the_batch(tmp_path):
    # 25 labelled -> 17 training samples (8 validation) = 2 x 8 + 1: a last batch of one used to crash
    # BatchNorm and was reported as bad input.
    d = generate(tmp_path / "data", SynthSpec(n_train=25, n_test=4, n_classes=2, image_size=32, seed=1))
    for loader in ("dali", "torch"):
        run = tmp_path / f"run_{loader}"
        dalipipe("train", d / "images_train", d / "y_train.csv", "--out", run, "--epochs", "1", "--image-size", "16",
                 "--batch-size", "8", "--device", "cpu", "--loader", loader)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and all(math.isfinite(r["train_loss"]) for r in rows)


def test_internal_errors_are_reported_as_bugs_not_as_bad_input(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import dalipipe.infer.score
    from dalipipe.cli import cli

    def broken(*args):
        raise ValueError("Expected more than 1 value per channel when training")

    monkeypatch.setattr(dalipipe.infer.score, "scored", broken)
    (tmp_path / "a.csv").write_text("file_id,cell_line\n1,A\n")
    r = CliRunner().invoke(cli, ["score", str(tmp_path / "a.csv"), str(tmp_path / "a.csv")])
    assert r.exit_code == 3
    assert "internal error" in r.output and "report" in r.output
    assert not any(line.startswith("Error:") for line in r.output.splitlines())  # not disguised as bad input


def test_a_second_sigterm_does_not_break_into_the_stopping(monkeypatch):
    """The first SIGTERM stops the command as Ctrl-C does, pending writes included; a second one (a group
    signalled twice, a wrapper passing it on) is ignored from then on."""
    import signal

    from dalipipe import cli

    monkeypatch.setattr(signal, "signal", lambda sig, handler: seen.append((sig, handler)))
    seen = []
    with pytest.raises(cli.Terminated):
        cli._on_sigterm(signal.SIGTERM, None)
    assert seen == [(signal.SIGTERM, signal.SIG_IGN)]


def test_the_exit_statuses_are_the_ones_the_readme_promises():
    """Scripts and job schedulers act on these numbers (75 requeues a run): they are a promise, not a detail."""
    from pathlib import Path

    from dalipipe import constants

    promised = {"EXIT_USER": 2, "EXIT_INTERNAL": 3, "EXIT_TIME_LIMIT": 75, "EXIT_INTERRUPTED": 130,
                "EXIT_TERMINATED": 143}
    assert {name: getattr(constants, name) for name in promised} == promised
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Exit statuses", 1)[1].split("\n## ", 1)[0]
    assert all(f"`{code}`" in section for code in promised.values()), section
