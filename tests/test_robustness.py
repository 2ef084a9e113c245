"""A new user's bad inputs and habits: each gets a one-line error or the right result, never a traceback
and never a silently wrong number."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dalipipe import atomic, checkpoint
from dalipipe.cli import cli
from dalipipe.config import may_change_text
from dalipipe.data.index import build_index, inspect_images
from dalipipe.data.stats import channel_stats
from dalipipe.errors import DataError
from dalipipe.run import run_dir
from tests.conftest import write_labels, write_sample

SMALL = ["--epochs", "1", "--image-size", "16", "--batch-size", "32", "--device", "cpu", "--workers", "1"]


def invoke(*args, cwd: Path | None = None):
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_line_error(r, *fragments):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, r.output
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_synth):
    """A one-epoch run, started from inside the data's parent with relative paths (as users type them)."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(small_synth, root / "data")
    r = invoke("train", "data/images_train", "data/y_train.csv", "--out", "run", *SMALL, cwd=root)
    assert r.exit_code == 0, r.output
    return root


# 1. Security
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": checkpoint.FORMAT, "model": Evil()}, tmp_path / "evil.pt")
    r = invoke("predict", tmp_path / "evil.pt", tmp_path, "--out", tmp_path / "s.csv")
    one_line_error(r, "evil.pt", "refused")
    assert not marker.exists()


def test_dalipipe_checkpoints_load_as_plain_data(trained):
    ck = checkpoint.load(trained / "run" / "last.pt")
    assert ck["epoch"] == 1 and ck["versions"]["torch"] == torch.__version__ and ck["versions"]["dali"]


# 2-5. The run folder
def test_a_second_training_into_a_busy_folder_is_refused(small_synth, tmp_path):
    from tests.test_cli import assert_one_line_error, dalipipe

    run = tmp_path / "run"
    run.mkdir()
    with run_dir.locked(run):  # held by this process; the second training is another process, as in life
        r = dalipipe("train", small_synth / "images_train", small_synth / "y_train.csv", "--out", run, *SMALL,
                     check=False)
        assert_one_line_error(r, str(run), "another dalipipe train is running")
    assert not (run / "last.pt").exists()
    # Released when its holder let go: the same command now runs.
    dalipipe("train", small_synth / "images_train", small_synth / "y_train.csv", "--out", run, *SMALL)


def test_resume_refuses_another_out_and_different_values_but_accepts_the_same_command(trained, tmp_path):
    root = trained
    r = invoke("train", "--resume", root / "run", "--out", tmp_path / "other")
    one_line_error(r, "--out", "stays in its own folder")
    r = invoke("train", "data/images_train", "data/y_train.csv", "--resume", "run", *SMALL[:2], "--batch-size", "16",
               cwd=root)
    one_line_error(r, "--batch-size is 32 in the run, got 16")
    # The same command again with --resume and more epochs, from another folder: paths were stored resolved.
    r = invoke("train", root / "data/images_train", root / "data/y_train.csv", "--out", root / "run", "--resume",
               root / "run", *[a if a != "1" else "2" for a in SMALL], cwd=tmp_path)
    assert r.exit_code == 0, r.output
    rows = (root / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in rows] == [1, 2]
    cfg = json.loads((root / "run" / "config.json").read_text())
    assert Path(cfg["images_dir"]).is_absolute() and cfg["lr"] == 1e-3  # the rate used, not null


def test_resume_with_moved_data(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    moved = tmp_path / "moved"
    shutil.copytree(trained / "data", moved)
    r = invoke("train", "--resume", run, "--epochs", "3", cwd=tmp_path)  # the old paths still exist: fine
    assert r.exit_code == 0, r.output
    shutil.move(trained / "data", tmp_path / "gone")  # now they do not
    try:
        r = invoke("train", "--resume", run, "--epochs", "4")
        one_line_error(r, f"{trained / 'data' / 'images_train'}: not found; it is the images folder of the run in "
                          f"{run}; if the data moved, give its new place: dalipipe train --resume {run} IMAGES_DIR "
                          "LABELS_CSV")
        r = invoke("train", moved / "images_train", moved / "y_train.csv", "--resume", run, "--epochs", "4")
        assert r.exit_code == 0, r.output
    finally:
        shutil.move(tmp_path / "gone", trained / "data")
    assert json.loads((run / "config.json").read_text())["images_dir"] == str(moved / "images_train")
    # Other labels: the refusal says what differs.
    labels = (moved / "y_train.csv").read_text().replace(",", ",x-", 1).replace("file_id,x-cell_line", "file_id,cell_line")
    relabelled = moved / "y_other.csv"
    relabelled.write_text("".join(line.rsplit(",", 1)[0] + ",Other\n" if k % 2 else line + "\n"
                                  for k, line in enumerate(labels.splitlines())))
    r = invoke("train", moved / "images_train", relabelled, "--resume", run, "--epochs", "5")
    one_line_error(r, "the data differs from the run being resumed (classes not in the run: Other")


def test_resumed_data_differences_are_said_in_words():
    from types import SimpleNamespace

    from dalipipe.run.train_setup import resumed_data_differs

    card = SimpleNamespace(class_names=("A", "B"), split=SimpleNamespace(val_ids=[1, 2, 3]))
    assert resumed_data_differs(card, ["A", "B"], [1, 2, 3]) is None
    assert resumed_data_differs(card, ["A", "C"], [1, 2, 3]) == "classes of the run missing now: B; classes not in the run: C"
    assert resumed_data_differs(card, ["B", "A"], [1, 2, 3]) == "the classes are in another order"
    assert resumed_data_differs(card, ["A", "B"], [1, 2, 4, 5]) == (
        "the validation split is not the run's: 1 of its 3 validation samples are not in it now, and it has 2 others")


def test_an_edited_config_json_is_named_and_the_checkpoints_settings_are_kept(trained, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    config = json.loads((run / "config.json").read_text())
    done = str(checkpoint.load(run / "last.pt")["epoch"])  # (other tests of this module may have trained it on)
    (run / "config.json").write_text(json.dumps({**config, "lr": 0.5, "seed": 7}))
    with caplog.at_level(logging.WARNING, logger="dalipipe"):
        r = invoke("train", "--resume", run, "--epochs", done)
    assert r.exit_code == 0, r.output
    said = [rec.getMessage() for rec in caplog.records if "config.json" in rec.getMessage()]
    assert said == [f"warning: {run / 'config.json'} differs from the run's checkpoint (lr, seed); it is a record of "
                    "the settings, not read back: the checkpoint's are used and the file is written again; to change a "
                    "setting, give its option with --resume"]
    # written again from the checkpoint (in the folder the run is in now)
    assert json.loads((run / "config.json").read_text()) == {**config, "out_dir": str(run)}
    # What a command may change (--epochs, here), or a key an older release did not write, is no edit: each
    # command writes the file at its start, before its first checkpoint records what it changed.
    (run / "config.json").write_text(json.dumps({**{k: v for k, v in config.items() if k != "threads"}, "epochs": 9}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalipipe"):
        assert invoke("train", "--resume", run, "--epochs", done).exit_code == 0
    assert not [rec for rec in caplog.records if "config.json" in rec.getMessage()]


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a read-only /sys (Linux)")
def test_unwritable_outputs_fail_before_any_long_work(small_synth, trained, tmp_path):
    # /sys refuses new files even to root, whom file modes do not stop.
    r = invoke("train", small_synth / "images_train", small_synth / "y_train.csv", "--out", "/sys/dalipipe-run", *SMALL)
    one_line_error(r, "/sys/dalipipe-run", "cannot write")
    r = invoke("predict", trained / "run", small_synth / "images_test", "--out", "/sys/sub.csv")
    one_line_error(r, "/sys", "cannot write")


# 7-9. Wrong results without a word
def test_one_huge_image_neither_takes_over_the_statistics_nor_passes_unnamed(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for fid in range(1, 21):
        write_sample(tmp_path / "img", fid, *(rng.integers(20, 60, (32, 32)) for _ in range(3)))
    big = np.zeros((640, 640), dtype=np.uint8)  # 400x the pixels of the others, all black
    write_sample(tmp_path / "img", 21, big, big, big)
    with caplog.at_level(logging.WARNING, logger="dalipipe"):
        idx = inspect_images(build_index(tmp_path / "img"), progress=False)
    assert "00021_yellow.png (640x640)" in caplog.text
    mean = channel_stats(idx).mean
    # Per pixel the black image would pull the means from about 40 to about 0.1; per sample to 40 * 20/21.
    assert all(36 < m < 40 for m in mean), mean


def test_two_files_for_one_id_are_refused_by_name(synth_copy, tmp_path):
    d = synth_copy / "images_train"
    shutil.copy(d / "00001_blue.png", d / "1_blue.png")
    r = invoke("check", d, synth_copy / "y_train.csv")
    one_line_error(r, "00001_blue.png", "1_blue.png", "two blue files")


def test_one_class_is_refused(tmp_path):
    for fid in (1, 2, 3):
        write_sample(tmp_path / "img", fid, *(np.full((8, 8), 9) for _ in range(3)))
    write_labels(tmp_path / "y.csv", [(1, "HeLa"), (2, "HeLa"), (3, "HeLa")])
    one_line_error(invoke("check", tmp_path / "img", tmp_path / "y.csv"), "y.csv", "at least two classes")


# 10. score
def test_score_reads_submissions_by_the_rules_of_training(tmp_path):
    answers = tmp_path / "answers.csv"
    write_labels(answers, [(1, "A"), (2, "B"), (3, "A")])
    sub = tmp_path / "sub.csv"
    one_line_error(invoke("score", tmp_path / "nosuch.csv", answers), "nosuch.csv", "not found")
    sub.write_text("file_id,cell_line\n1,A\n2,C\n3,A\n")
    one_line_error(invoke("score", sub, answers), "sub.csv:3", "'C' is not a class")
    sub.write_text("file_id,cell_line\n1,A\n2,B\n2,A\n3,A\n")
    one_line_error(invoke("score", sub, answers), "sub.csv:4", "duplicate file_id 2")
    sub.write_text("file_id,cell_line\n1,A\nx,B\n3,A\n")
    one_line_error(invoke("score", sub, answers), "sub.csv:3", "not an integer")
    sub.write_text("file_id,cell_line,p_A,p_B\n1, A ,0.9,0.1\n2,B,0.2,0.8\n3,A ,0.7,0.3\n")
    r = invoke("score", sub, answers)
    assert r.exit_code == 0 and r.output.splitlines()[0] == "balanced accuracy 1.0000", r.output
    # each class's precision, recall, F1 and support, as scikit-learn's classification report gives them
    rows = {line.split()[0]: line.split()[1:] for line in r.output.splitlines()[1:] if line.split()[:1] in (["A"], ["B"])}
    assert rows == {"A": ["1.0000", "1.0000", "1.0000", "2"], "B": ["1.0000", "1.0000", "1.0000", "1"]}, r.output
    sub.write_text("file_id,cell_line\n1,A\n3,B\n")
    one_line_error(invoke("score", sub, answers), "answers.csv:3: no prediction for file_id 2", "1 in all")


def test_a_latin1_csv_is_a_one_line_error_not_a_bug(small_synth, tmp_path):
    answers = tmp_path / "answers.csv"
    answers.write_bytes("file_id,cell_line\n1,Café\n2,B\n".encode("cp1252"))
    write_labels(tmp_path / "sub.csv", [(1, "B"), (2, "B")])
    one_line_error(invoke("score", tmp_path / "sub.csv", answers), "answers.csv:2: not UTF-8", "save it as UTF-8")
    one_line_error(invoke("check", small_synth / "images_train", answers), "answers.csv:2: not UTF-8")


# 11-14. Papercuts
def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.save_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def test_an_atomic_write_that_must_not_replace_leaves_a_file_made_meanwhile_alone(tmp_path):
    out = tmp_path / "sub.csv"

    def write(tmp):  # another command writes the same file while this one works
        out.write_text("theirs")
        Path(tmp).write_text("mine")

    with pytest.raises(FileExistsError):
        atomic.write_atomic(out, write, replace=False)
    assert out.read_text() == "theirs" and os.listdir(tmp_path) == ["sub.csv"]  # no temporary file left
    atomic.write_atomic(out, lambda tmp: Path(tmp).write_text("mine"), replace=True)
    assert out.read_text() == "mine"


def _durability_log(monkeypatch) -> list[tuple]:
    """Every fsync (of a file or of a folder, by inode), rename and hard link, in order, as they happen."""
    events: list[tuple] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync folder" if stat.S_ISDIR(st.st_mode) else "fsync file", st.st_ino))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", Path(b).name)) or real_replace(a, b))
    monkeypatch.setattr(os, "link", lambda a, b: events.append(("link", Path(b).name)) or real_link(a, b))
    return events


@pytest.mark.parametrize("replace", [True, False])
def test_an_atomic_write_syncs_the_file_before_its_rename_and_the_folder_after(tmp_path, monkeypatch, replace):
    """Without the first fsync a power loss can leave the new name on an empty file; without the second, the
    rename itself can be lost."""
    events = _durability_log(monkeypatch)
    out = tmp_path / "metrics.jsonl"
    atomic.write_atomic(out, lambda tmp: Path(tmp).write_text("new"), replace=replace)
    monkeypatch.undo()
    assert out.read_text() == "new"
    move = ("rename" if replace else "link", "metrics.jsonl")
    assert events[0] == ("fsync file", out.stat().st_ino), events  # the bytes under the new name
    assert move in events and events.index(move) > 0
    assert events[-1] == ("fsync folder", tmp_path.stat().st_ino), events  # the new name itself


def test_best_pt_linked_to_last_pt_is_made_durable_too(tmp_path, monkeypatch):
    (tmp_path / "last.pt").write_bytes(b"checkpoint")
    events = _durability_log(monkeypatch)
    checkpoint.link_or_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    monkeypatch.undo()
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")
    assert events[-2:] == [("rename", "best.pt"), ("fsync folder", tmp_path.stat().st_ino)], events


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    out = tmp_path / "labels.json"
    out.write_text("old")

    def write(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.write_atomic(out, write)
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["labels.json"]


def test_a_run_folder_stands_for_its_best_checkpoint_and_an_unvalidated_one_is_used_only_when_named(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"last")
    with pytest.raises(DataError, match=f"no best.pt \\(no epoch of this run validated yet.*give {tmp_path / 'last.pt'}"):
        checkpoint.resolve(tmp_path)
    assert checkpoint.resolve(tmp_path / "last.pt") == tmp_path / "last.pt"  # a file is itself
    (tmp_path / "best.pt").write_bytes(b"best")
    assert checkpoint.resolve(tmp_path) == tmp_path / "best.pt"


@pytest.mark.parametrize("partial", [None, {"steps": 7}])
def test_predict_names_a_checkpoint_from_the_middle_of_an_epoch_as_never_validated(tmp_path, caplog, partial):
    from dalipipe.infer.predict import load_models

    path = tmp_path / "last.pt"
    checkpoint.write({"class_names": ["a", "b"], "mean": [0.0] * 3, "std": [1.0] * 3, "image_size": 16, "model": {},
                      "config": {}, "epoch": 2, "partial": partial}, path)
    with caplog.at_level(logging.WARNING, logger="dalipipe"):
        load_models([str(path)])
    said = [r.getMessage() for r in caplog.records]
    if partial is None:  # an epoch's end: that epoch was validated
        assert said == []
    else:
        assert said == [f"warning: {path} is the model in the middle of epoch 3 (after step 7), never validated; a "
                        "run's best.pt holds its best validated epoch"]


def test_predicting_a_models_own_samples_is_named_once_per_model(trained, tmp_path, caplog):
    run = trained / "run"
    shutil.copytree(run, tmp_path / "twin")
    with caplog.at_level(logging.WARNING, logger="dalipipe"):
        r = invoke("predict", run, tmp_path / "twin", trained / "data" / "images_train", "--out", tmp_path / "s.csv",
                   "--device", "cpu", "--workers", "1")
    assert r.exit_code == 0, r.output
    said = [rec.getMessage() for rec in caplog.records if "overstates" in rec.getMessage()]
    assert len(said) == 2, said
    assert f"split of {run / 'best.pt'} and" in said[0] and f"split of {tmp_path / 'twin' / 'best.pt'} and" in said[1]
    assert all(text.startswith("warning: 168 of the 240 samples") for text in said)


def test_an_error_that_quotes_a_line_break_stays_one_line(tmp_path):
    for fid in (1, 2, 3):
        write_sample(tmp_path / "img", fid, *(np.full((8, 8), 9) for _ in range(3)))
    (tmp_path / "y.csv").write_text('file_id,cell_line\n1,HeLa\n2,HeLa\n3,"Lonely\nline"\n')
    r = invoke("check", tmp_path / "img", tmp_path / "y.csv")
    one_line_error(r, "y.csv:4: class 'Lonely\\nline' has 1 sample(s)")
    assert len(r.output.strip().splitlines()) == 1, r.output


def _epoch_end_checkpoint(path: Path, run: Path, epoch: int, best_epoch: int) -> None:
    """An epoch-end checkpoint as every release lays it out (placeholder weights), at this epoch and best."""
    from dalipipe.config import TrainConfig
    from tests import checkpoint_layout

    history = [{"epoch": e, "val_balanced_accuracy": 0.1 * e} for e in range(1, epoch + 1)]
    ck = checkpoint_layout.build(checkpoint_layout.pinned()["epoch_end"], {
        ("model",): {}, ("optimizer",): {}, ("scaler",): {}, ("ema",): None, ("partial",): None,
        ("config",): TrainConfig("/d/i", "/d/y.csv", str(run)).to_dict(), ("epoch",): epoch, ("history",): history,
        ("best_confusion",): {"epoch": best_epoch, "matrix": [[1]], "title": f"epoch {best_epoch}"}})
    ck.pop("format")  # checkpoint.write's
    checkpoint.write(ck, path)


@pytest.mark.parametrize("best_epoch", [2, 1])
def test_the_repair_after_a_kill_between_last_and_best_links_best_pt_when_the_last_epoch_was_the_best(tmp_path,
                                                                                                     best_epoch):
    """A kill after epoch 2's last.pt was renamed into place and before best.pt followed: the resume's repair
    makes best.pt that last.pt when epoch 2 was the best, leaves epoch 1's best.pt when it was not; and removes
    temporary files and writes metrics.jsonl from the checkpoint's history either way."""
    from dalipipe.checkpoint import SavedRun

    run = tmp_path / "run"
    run.mkdir()
    _epoch_end_checkpoint(run / "best.pt", run, epoch=1, best_epoch=1)
    _epoch_end_checkpoint(run / "last.pt", run, epoch=2, best_epoch=best_epoch)
    (run / ".metrics.jsonl.x.tmp").write_text("half")
    run_dir.repair_run_dir(run, SavedRun.read(run / "last.pt"))
    assert os.path.samefile(run / "best.pt", run / "last.pt") is (best_epoch == 2)
    assert checkpoint.load(run / "best.pt")["epoch"] == best_epoch
    assert not list(run.glob(".*.tmp"))
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_an_existing_out_is_refused_before_any_work(small_synth, tmp_path, monkeypatch):
    """Checked first, not only when the predictions are written: a long inference is not spent to be refused."""
    import dalipipe.infer.predict

    (tmp_path / "sub.csv").write_text("mine")
    monkeypatch.setattr(dalipipe.infer.predict, "load_models", lambda paths: pytest.fail("work began"))
    one_line_error(invoke("predict", tmp_path, small_synth / "images_test", "--out", tmp_path / "sub.csv"),
                   "sub.csv: exists; choose another --out or pass --force")
    assert (tmp_path / "sub.csv").read_text() == "mine"


def test_two_predictions_to_one_file_at_once_the_second_refuses(trained, small_synth, monkeypatch):
    import dalipipe.infer.predict

    out = trained / "race.csv"
    real = dalipipe.infer.predict.prediction_frame

    def meanwhile(*args, **kwargs):  # the other predict writes --out after this one's start check
        out.write_text("theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(dalipipe.infer.predict, "prediction_frame", meanwhile)
    r = invoke("predict", trained / "run", small_synth / "images_test", "--out", out, "--device", "cpu",
               "--workers", "1")
    one_line_error(r, "race.csv: exists", "--force")
    assert "wrote" not in r.output and out.read_text() == "theirs"
    r = invoke("predict", trained / "run", small_synth / "images_test", "--out", out, "--device", "cpu",
               "--workers", "1", "--force")
    assert r.exit_code == 0 and "wrote 60 predictions" in r.output, r.output
    assert out.read_text().startswith("file_id,cell_line")


def test_help_describes_every_option_and_bad_weights_fail_first(small_synth, tmp_path):
    text = "".join(invoke("train", "--help").output.split())  # whatever the wrapping (it may break at hyphens)
    for described in ("--epochs INTEGER Passes over", "--image-size INTEGER Side of the square model input, in pixels",
                      "--seed INTEGER Seeds the split", "--weight-decay FLOAT Adam's L2 penalty",
                      f"{may_change_text().replace('`', '')} may change"):
        assert "".join(described.split()) in text, described
    r = invoke("train", small_synth / "images_train", small_synth / "y_train.csv", "--out", tmp_path / "r",
               "--weights", tmp_path / "nosuch.pth")
    assert r.exit_code == 2 and "nosuch.pth" in r.output and not (tmp_path / "r").exists()


def test_check_reports_what_a_run_would_use(small_synth):
    r = invoke("check", small_synth / "images_train", small_synth / "y_train.csv")
    assert r.exit_code == 0, r.output
    assert "240 samples" in r.output and "4 classes" in r.output and "32x32 (240)" in r.output
    assert "train on 168 and validate on 72" in r.output and "no problems found" in r.output
    assert invoke("check", small_synth / "images_test").exit_code == 0
