"""What a new user runs into: options that must be refused up front, messages that must say what is true,
one CSV rule, help for every option, plots and tables for any class name."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from dalipipe import checkpoint
from dalipipe.constants import EXIT_INTERRUPTED, EXIT_TIME_LIMIT, MIN_IMAGE_SIZE
from dalipipe.data.csv_files import read_labels
from dalipipe.data.index import build_index
from dalipipe.data.split import stratified_split, stratified_subset
from dalipipe.distributed import World
from dalipipe.errors import DataError
from tests import processes
from tests.conftest import write_labels, write_sample
from tests.test_cli import COMMAND_TIMEOUT_S, assert_one_line_error, dalipipe


def invoke(*args):
    from dalipipe.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_the_smallest_image_size_is_the_models_real_minimum():
    from dalipipe.model import build_model

    model = build_model(3)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            model(torch.randn(2, 3, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE))
            with pytest.raises(RuntimeError, match="Kernel size"):
                model(torch.randn(2, 3, MIN_IMAGE_SIZE - 1, MIN_IMAGE_SIZE - 1))


@pytest.mark.parametrize("option,fragment", [
    (["--image-size", "12"], f"--image-size must be at least {MIN_IMAGE_SIZE}"),
    (["--image-size", "0"], f"--image-size must be at least {MIN_IMAGE_SIZE}"),  # once read as "not given"
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
])
def test_options_that_would_do_something_else_are_refused_before_any_work(small_synth, tmp_path, option, fragment):
    d = small_synth
    r = dalipipe("train", d / "images_train", d / "y_train.csv", "--out", tmp_path / "run", "--device", "cpu",
                 *option, check=False)
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "run" / "last.pt").exists() and "train images" not in r.stderr  # no data check ran


@pytest.mark.parametrize("option,fragment", [(["--batch-size", "0"], "--batch-size must be at least 1"),
                                             (["--workers", "0"], "--workers must be at least 1")])
def test_predict_checks_its_options_first(small_synth, tmp_path, option, fragment):
    r = dalipipe("predict", tmp_path, small_synth / "images_test", "--out", tmp_path / "s.csv", *option, check=False)
    assert_one_line_error(r, fragment)


def test_a_split_too_small_for_a_training_step_on_every_process_is_refused_before_the_image_check(small_synth):
    from dalipipe.config import TrainConfig
    from dalipipe.run.train_setup import prepare_data

    cfg = TrainConfig(images_dir=str(small_synth / "images_train"), labels_csv=str(small_synth / "y_train.csv"),
                      out_dir="", subset=12, batch_size=2)
    # 12 labelled -> 8 training samples: over 8 processes, one each, no batch of 2 anywhere.
    with pytest.raises(DataError, match="8 training samples over 8 process"):
        prepare_data(cfg, World(rank=0, size=8, local_rank=0))


def test_subset_too_small_names_the_samples_it_gives_the_classes_and_the_smallest_that_works(small_synth):
    import re

    index = build_index(small_synth / "images_train", small_synth / "y_train.csv")  # 4 classes
    given = stratified_subset(index, 5, 42)  # what --subset 5 draws (at least one per class)
    with pytest.raises(DataError) as e:
        stratified_subset(index, 5, 42, val_fraction=0.3)
    message = str(e.value)
    assert f"--subset 5 gives {len(given)} samples" in message and "[0" not in message  # no class indices
    singles = given.cell_line.value_counts()
    assert all(f"'{name}' (1)" in message for name in singles[singles == 1].index)
    smallest = int(re.search(r"the smallest --subset that can be split is (\d+)", message).group(1))
    train, val = stratified_split(stratified_subset(index, smallest, 42, val_fraction=0.3), 0.3, 42)
    assert len(train) > 0 and len(val) > 0
    with pytest.raises(DataError, match="smallest --subset"):
        stratified_subset(index, smallest - 1, 42, val_fraction=0.3)


def test_a_split_impossible_for_the_validation_share_says_why_in_words(small_synth):
    index = build_index(small_synth / "images_train", small_synth / "y_train.csv").iloc[::20]  # 12 samples
    with pytest.raises(DataError, match=r"--val-fraction 0.1 holds out 2 and keeps 10; each part needs at least "
                                        r"one sample of each of the 4 classes"):
        stratified_split(index, 0.1, 0)


def test_time_limit_applies_to_its_command_only_and_exits_with_its_own_status(small_synth, tmp_path):
    d, run = small_synth, tmp_path / "run"
    opts = ["--epochs", "2", "--image-size", "16", "--batch-size", "32", "--device", "cpu", "--workers", "1"]
    r = dalipipe("train", d / "images_train", d / "y_train.csv", "--out", run, *opts, "--time-limit", "1e-6",
                 check=False)
    assert r.returncode == EXIT_TIME_LIMIT, r.stderr[-2000:]
    assert "reached at step 1 of epoch 1" in r.stderr and f"dalipipe train --resume {run}" in r.stderr
    saved = checkpoint.load(run / "last.pt")
    assert saved["partial"] == {"steps": 1} and saved["config"]["time_limit_minutes"] == pytest.approx(1e-6)
    # The resume gives no limit: it runs to the end (it stopped again at its first step when it inherited it).
    r = dalipipe("train", "--resume", run)
    assert "resumed at epoch 1, after step 1" in r.stderr
    assert checkpoint.load(run / "last.pt")["epoch"] == 2

    # predict: a file that is not a checkpoint is named as such; samples of the model's own split warned of.
    r = dalipipe("predict", run / "config.json", d / "images_test", "--out", tmp_path / "s.csv", check=False)
    assert_one_line_error(r, "config.json: not a dalipipe checkpoint")
    train_ids = checkpoint.load(run / "last.pt")["split"]["train_ids"]
    pd.DataFrame({"file_id": train_ids[:5]}).to_csv(tmp_path / "ids.csv", index=False)
    r = dalipipe("predict", run, d / "images_train", "--out", tmp_path / "s.csv", "--ids", tmp_path / "ids.csv",
                 "--device", "cpu")
    assert "5 of the 5 samples" in r.stderr and "training split" in r.stderr
    r = dalipipe("predict", run, d / "images_test", "--out", tmp_path / "t.csv", "--device", "cpu")
    assert "training split" not in r.stderr


def test_ctrl_c_says_what_is_true_at_that_moment(small_synth, tmp_path, monkeypatch):
    import dalipipe.infer.predict
    import dalipipe.run.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dalipipe.infer.predict, "predict", interrupted)
    r = invoke("predict", tmp_path, small_synth / "images_test", "--out", tmp_path / "s.csv")
    assert r.exit_code == EXIT_INTERRUPTED and f"nothing was written to {tmp_path / 's.csv'}" in r.output
    assert "--resume" not in r.output

    monkeypatch.setattr(dalipipe.run.train, "train", interrupted)
    run = tmp_path / "run"
    r = invoke("train", small_synth / "images_train", small_synth / "y_train.csv", "--out", run)
    assert r.exit_code == EXIT_INTERRUPTED and "no checkpoint was written yet" in r.output
    run.mkdir()
    (run / "last.pt").write_bytes(b"")  # once a checkpoint is on disk, resuming is the way on
    from dalipipe.run import run_dir

    assert f"continue with: dalipipe train --resume {run}" in run_dir.interrupt_hint(run)


def test_every_csv_is_read_by_column_name_and_extra_columns_are_ignored(small_synth, tmp_path):
    labels = pd.read_csv(small_synth / "y_train.csv")
    extra = labels.assign(notes="x", plate=1)[["notes", "cell_line", "plate", "file_id"]]
    extra.to_csv(tmp_path / "extra.csv", index=False)
    assert read_labels(tmp_path / "extra.csv").file_id.tolist() == labels.file_id.tolist()
    r = invoke("check", small_synth / "images_train", tmp_path / "extra.csv")
    assert r.exit_code == 0 and "no problems found" in r.output, r.output
    sub = labels.assign(p_x=0.5)[["p_x", "file_id", "cell_line"]]
    sub.to_csv(tmp_path / "sub.csv", index=False)
    r = invoke("score", tmp_path / "sub.csv", small_synth / "y_train.csv")
    assert r.exit_code == 0 and "balanced accuracy 1.0000" in r.output


def test_every_option_of_every_command_says_what_it_does():
    from dalipipe.cli import cli

    bare = [(name, p.name) for name, cmd in cli.commands.items() for p in cmd.params
            if getattr(p, "param_type_name", "") == "option" and p.name != "help" and not p.help]
    assert not bare
    text = " ".join(invoke("score", "--help").output.split())
    assert "a missing one is an error" in text and "ignored with a warning" in text


def test_plots_carry_any_class_name_with_one_notice_instead_of_a_warning_per_glyph(tmp_path, caplog, monkeypatch):
    from dalipipe.viz import plots

    # CJK (a font may or may not have it), Latin accents, and U+0378, a code point Unicode leaves unassigned,
    # which no font maps: the notice is due on every machine.
    names = ["RT4", "\u4e09\u56db\u4e94 A", "\u00dcn\u00efc\u00f6d\u00e9 \u00b5", "X\u0378"]
    cm = np.array([[3, 1, 0, 0], [0, 4, 1, 0], [1, 0, 5, 0], [0, 0, 1, 2]])
    # "Said once" is remembered per process: a fresh memory, whatever other tests of this worker drew.
    monkeypatch.setattr(plots, "_told", set())

    def notices_of_one_plot(k):
        caplog.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a glyph warning would fail here
            with caplog.at_level(logging.WARNING, logger="dalipipe"):
                plots.confusion_png(cm, names, "t", str(tmp_path / f"cm{k}.png"))
        return [r.getMessage() for r in caplog.records if "no installed font has" in r.getMessage()]

    first, second = notices_of_one_plot(0), notices_of_one_plot(1)
    assert len(first) == 1 and "\u0378" in first[0] and repr(names[3]) in first[0], first
    assert second == []  # told once: the same names again say nothing
    assert (tmp_path / "cm1.png").stat().st_size > 1000
    # Another name with the same missing character, in a later plot (the first batch drew fewer classes than
    # the confusion matrix): named too, not left out because its characters were reported before.
    names[0] = "Y\u0378"
    (third,) = notices_of_one_plot(2)
    assert repr(names[0]) in third and repr(names[3]) not in third, third


def test_check_table_aligns_wide_class_names(tmp_path):
    names = ["RT4", "\u7d30\u80de\u682a", "HeLa"]
    rows = []
    for fid in range(1, 31):
        write_sample(tmp_path / "img", fid, *[np.full((16, 16), 40 + fid % 7)] * 3)
        rows.append((fid, names[fid % 3]))
    write_labels(tmp_path / "y.csv", rows)
    r = invoke("check", tmp_path / "img", tmp_path / "y.csv")
    assert r.exit_code == 0, r.output
    from dalipipe.data.check import display_width

    table = [line for line in r.output.splitlines() if line.startswith("  ") and "%" in line]
    ends = {display_width(line.rsplit("%", 1)[0]) for line in table}
    assert len(table) == 3 and len(ends) == 1, table


def test_matplotlib_keeps_its_info_lines_to_itself():
    """In a process of its own: pytest's logging set-up (its handlers on the root logger, which make the
    command's basicConfig a no-op) would hide whether the command itself keeps matplotlib's INFO lines out."""
    import sys

    code = ("import logging\n"
            "from dalipipe.cli import cli\n"
            "cli(['check', '--help'], standalone_mode=False)\n"  # the group's set-up runs before any command
            "logging.getLogger('matplotlib.font_manager').info('matplotlib-info-line')\n"
            "logging.getLogger('matplotlib').warning('matplotlib-warning-line')\n"
            "logging.getLogger('dalipipe').info('dalipipe-info-line')\n")
    r = processes.run([sys.executable, "-c", code], timeout=COMMAND_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-2000:]
    # dalipipe's INFO lines and matplotlib's warnings reach the user; matplotlib's INFO lines do not.
    assert "dalipipe-info-line" in r.stderr and "matplotlib-warning-line" in r.stderr, r.stderr[-2000:]
    assert "matplotlib-info-line" not in r.stderr


def test_check_workers_leave_ctrl_c_to_the_main_process():
    """Ctrl-C reaches every process of the terminal's group: the image check's workers ignore it (the main
    process reports it in one line), instead of each printing a KeyboardInterrupt traceback (seen before)."""
    import signal

    from dalipipe.child_processes import worker_pool

    pool = worker_pool(2)
    try:
        handlers = list(pool.map(signal.getsignal, [signal.SIGINT] * 4))
    finally:
        pool.shutdown()
    assert handlers == [signal.SIG_IGN] * 4


def test_tqdm_disable_silences_the_bars_a_command_shows(small_synth, tmp_path):
    """Progress bars are for a terminal; TQDM_DISABLE=1 (a job's log, a script collecting output) turns them
    off. dalipipe's bars pass their own rule for when they show, which must leave that to tqdm's default."""
    d, env = small_synth, dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "dalipipe", "train", str(d / "images_train"), str(d / "y_train.csv"), "--epochs",
            "1", "--image-size", "16", "--batch-size", "32", "--device", "cpu", "--subset", "96", "--no-cache"]
    shown = processes.run([*args, "--out", str(tmp_path / "a")], env=env, timeout=COMMAND_TIMEOUT_S)
    quiet = processes.run([*args, "--out", str(tmp_path / "b")], env=dict(env, TQDM_DISABLE="1"),
                          timeout=COMMAND_TIMEOUT_S)
    assert shown.returncode == quiet.returncode == 0, quiet.stderr
    for bar in ("checking images", "epoch 1/1:"):
        assert bar in shown.stderr and bar not in quiet.stderr, bar
    assert "epoch 1/1  train loss" in quiet.stdout  # the epoch's line is not a bar: it stays


def test_a_subset_larger_than_the_labelled_set_says_it_uses_all(small_synth, caplog):
    from dalipipe.config import TrainConfig
    from dalipipe.run.train_setup import prepare_data

    cfg = TrainConfig(images_dir=str(small_synth / "images_train"), labels_csv=str(small_synth / "y_train.csv"),
                      out_dir="", subset=500)
    with caplog.at_level(logging.INFO, logger="dalipipe"):
        train, val, *_ = prepare_data(cfg, World())[1:]
    assert len(train) + len(val) == 240
    assert [r.getMessage() for r in caplog.records if "--subset" in r.getMessage()] == [
        f"--subset 500: {cfg.labels_csv} labels 240 samples; using all of them"]


@pytest.mark.parametrize("args, fragment", [
    (["train", "imgs", "labels.csv"], "IMAGES_DIR, LABELS_CSV and --out RUN_DIR are required"),
    (["train", "--epochs", "abc"], "Invalid value for '--epochs': 'abc' is not a valid integer"),
    (["train", "--loader", "foo"], "Invalid value for '--loader'"),
    (["train", "--bogus"], "No such option '--bogus'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["predict", ".", "imgs"], "Missing option '--out'"),  # a required option of the table
])
def test_a_usage_error_is_one_line_naming_the_help_to_read(args, fragment):
    r = dalipipe(*args, check=False)
    assert_one_line_error(r, fragment, "--help)")
    assert "Usage:" not in r.stderr and "Try " not in r.stderr


def test_a_bare_dalipipe_prints_its_help():
    r = dalipipe(check=False)
    assert r.returncode == 0 and "Usage: dalipipe" in r.stdout and "train" in r.stdout


def test_sigterm_stops_a_run_as_ctrl_c_does_and_it_resumes(small_synth, tmp_path):
    """`kill PID` (docker stop, a scheduler's notice) once the run has saved a checkpoint: one line saying
    what is on disk, exit 143, no traceback, and the run resumes from there."""
    d, run = small_synth, tmp_path / "run"
    # So many epochs that the run is still going when the signal comes, whatever the machine's speed.
    args = [sys.executable, "-m", "dalipipe", "train", str(d / "images_train"), str(d / "y_train.csv"), "--out",
            str(run), "--epochs", "1000", "--image-size", "16", "--batch-size", "32", "--device", "cpu",
            "--checkpoint-every", "1"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    with processes.started(args, timeout=COMMAND_TIMEOUT_S, stdout=subprocess.PIPE, text=True,
                           stderr=open(tmp_path / "stderr", "w"), env=dict(env, PYTHONUNBUFFERED="1")) as proc:
        # The first epoch's line comes after its checkpoints were handed over (a blocking read: no polling).
        assert any(line.startswith("epoch 1/") for line in proc.stdout), (tmp_path / "stderr").read_text()[-3000:]
        proc.terminate()  # SIGTERM to the main process only, as `kill PID`
        proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert f"continue with: dalipipe train --resume {run}" in line
    # The resumed run starts from the checkpoint (a time limit stops it again at its first step).
    r = processes.run([sys.executable, "-m", "dalipipe", "train", "--resume", str(run), "--time-limit", "0.001"],
                      env=env, timeout=COMMAND_TIMEOUT_S)
    assert r.returncode == 75 and "resumed " in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("command", ["check", "train", "preview", "synth"])
@pytest.mark.parametrize("seed", ["-1", "99999999999"])
def test_a_seed_out_of_range_is_a_one_line_error_before_any_work(small_synth, tmp_path, command, seed):
    d = small_synth
    args = {"check": [d / "images_train"], "train": [d / "images_train", d / "y_train.csv", "--out", tmp_path / "run"],
            "preview": [d / "images_train", d / "y_train.csv", "--out", tmp_path / "p.png"],
            "synth": [tmp_path / "s"]}[command]
    r = invoke(command, *args, "--seed", seed)
    assert r.exit_code == 2 and r.output.strip() == f"Error: --seed must be in [0, 4294967295], got {seed}", r.output
    assert list(tmp_path.iterdir()) == []  # no run folder, no picture, no data set


@pytest.mark.parametrize("option, value, message", [
    ("--size", "100000", "--size must be in [16, 4096], got 100000"),
    ("--n-train", "99999999999999999999", "--n-train must be at most 1000000, got 99999999999999999999"),
    ("--n-test", "1000001", "--n-test must be in [0, 1000000], got 1000001"),
])
def test_synth_sizes_past_what_it_can_draw_are_one_line_errors(tmp_path, option, value, message):
    r = invoke("synth", tmp_path / "s", option, value)
    assert r.exit_code == 2 and r.output.strip() == f"Error: {message}", r.output


def test_ctrl_c_in_synth_says_nothing_was_written(tmp_path, monkeypatch):
    import dalipipe.data.synthetic

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dalipipe.data.synthetic, "render", interrupted)
    r = invoke("synth", tmp_path / "s", "--n-train", "8", "--n-test", "0", "--classes", "2", "--size", "16")
    assert r.exit_code == EXIT_INTERRUPTED, r.output
    assert r.output.strip().splitlines()[-1] == (f"interrupted: nothing was written to {tmp_path / 's'}; run the "
                                                 "command again")
    assert list(tmp_path.iterdir()) == []


def test_bound_errors_say_the_value_as_a_user_writes_it():
    r = invoke("train", "i", "l.csv", "--out", "o", "--lr", "0")
    assert r.exit_code == 2 and r.output.strip().endswith("--lr must be positive, got 0"), r.output
