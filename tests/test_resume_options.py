"""On/off options on a resume: each can be turned off as well as on, and a run resumed on a device that
cannot do what it was started with drops that, in one line, instead of refusing to go on."""

from __future__ import annotations

import logging

import pytest
import torch
from click.testing import CliRunner

from dalipipe import checkpoint, cli
from dalipipe import device as dev
from dalipipe.checkpoint import Progress
from dalipipe.config import TrainConfig
from dalipipe.constants import CKPT_LAST
from dalipipe.errors import DataError
from dalipipe.run import run_dir
from tests import checkpoint_layout

ON_OFF = ("decode_once", "compile", "check_cache", "tensorboard", "tta_val", "pretrained")


def saved_run(folder, epochs_done: int = 1, **settings) -> str:
    """A run folder whose last.pt is laid out as every checkpoint (placeholder weights); resume_config
    reads the run's config and progress."""
    folder.mkdir()
    cfg = TrainConfig(images_dir="/data/i", labels_csv="/data/y.csv", out_dir=str(folder), **settings)
    ck = checkpoint_layout.build(checkpoint_layout.pinned()["epoch_end"],
                                 {("model",): {}, ("optimizer",): {}, ("scaler",): {}, ("ema",): None,
                                  ("config",): cfg.to_dict(), ("epoch",): epochs_done})
    ck.pop("format")  # checkpoint.write's
    checkpoint.write(ck, folder / CKPT_LAST)
    return str(folder)


def given_by(*args) -> dict:
    """What `dalipipe train ARGS` hands resume_config: the options the command line gave."""
    seen = {}

    def capture(resume_dir, given, images_dir, labels_csv, out_dir):
        seen["given"] = given
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_dir, "resume_config", capture)
        r = CliRunner().invoke(cli.cli, ["train", "--resume", "somewhere", *args], catch_exceptions=False)
    assert "given" in seen, r.output  # the command line was accepted and reached the resume
    return seen["given"]


def test_every_on_off_option_has_both_spellings_and_not_given_means_none():
    assert given_by() == {}  # nothing given: a resume keeps every setting of the run
    for name in ON_OFF:
        flag = run_dir.option(name).replace("--[no-]", "")
        assert given_by(f"--{flag}") == {name: True}, name
        assert given_by(f"--no-{flag}") == {name: False}, name


@pytest.mark.parametrize("name, flag", [("compile", "compile"), ("check_cache", "cache"),
                                        ("tensorboard", "tensorboard")])
def test_a_resume_turns_an_option_off_and_on_again(tmp_path, name, flag):
    run = saved_run(tmp_path / "run", **{name: True})
    assert getattr(run_dir.resume_config(run, given_by(f"--no-{flag}"), None, None, None), name) is False
    assert getattr(run_dir.resume_config(run, given_by(), None, None, None), name) is True  # the run's own
    off = saved_run(tmp_path / "off", **{name: False})
    assert getattr(run_dir.resume_config(off, given_by(f"--{flag}"), None, None, None), name) is True


def test_a_gpu_run_resumed_on_the_cpu_drops_what_the_cpu_cannot_do(tmp_path, caplog):
    run = saved_run(tmp_path / "run", precision="bf16")
    with caplog.at_level(logging.WARNING, logger="dalipipe"):
        cfg = run_dir.resume_config(run, given_by("--device", "cpu"), None, None, None)
    assert cfg.device == "cpu" and cfg.precision == "auto"
    assert dev.amp_dtype(torch.device("cpu"), cfg.precision) is None  # the check that refused the resume now passes
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "--precision bf16" in lines[0] and "a GPU" in lines[0] and "cpu" in lines[0], lines


def test_a_gpu_resume_with_another_loader_or_decoder_keeps_the_gpu_settings(tmp_path, caplog, monkeypatch):
    """On a GPU (a stand-in: the device is only named here) a forced half precision applies to any loader."""
    monkeypatch.setattr(run_dir.dev, "resolve", lambda name, local_rank=0: torch.device("cuda", 0))
    run = saved_run(tmp_path / "run", precision="bf16")
    with caplog.at_level(logging.WARNING, logger="dalipipe"):
        cfg = run_dir.resume_config(run, given_by("--loader", "torch", "--decoder", "cpu"), None, None, None)
    assert cfg.precision == "bf16" and cfg.loader == "torch" and not caplog.records


def test_a_gpu_only_option_given_again_on_the_cpu_is_still_refused(tmp_path):
    run = saved_run(tmp_path / "run", precision="bf16", device="cpu")
    cfg = run_dir.resume_config(run, given_by("--precision", "bf16"), None, None, None)
    assert cfg.precision == "bf16"  # kept, as asked: the run's device check refuses it in one line
    with pytest.raises(DataError, match="--precision bf16 needs a CUDA GPU"):
        dev.amp_dtype(torch.device("cpu"), cfg.precision)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_resume_keeps_the_gpu_settings(tmp_path):
    run = saved_run(tmp_path / "run", precision="bf16")
    cfg = run_dir.resume_config(run, given_by("--device", "gpu"), None, None, None)
    assert cfg.precision == "bf16"


def test_only_rank_0_says_what_a_resume_dropped(tmp_path, caplog, monkeypatch):
    run = saved_run(tmp_path / "run", precision="fp16")
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.WARNING, logger="dalipipe"):
        cfg = run_dir.resume_config(run, given_by("--device", "cpu"), None, None, None)
    assert cfg.precision == "auto" and not caplog.records


def test_a_run_of_a_release_without_the_decoded_store_resumes_without_it(tmp_path):
    """Its config has no decode_once: its DALI loader state fits the graph that decodes PNGs (a mid-epoch
    resume needs that graph), so the run goes on as it was, unless --decode-once is given."""
    run = saved_run(tmp_path / "run")
    ck = checkpoint.load(tmp_path / "run" / CKPT_LAST)
    del ck["config"]["decode_once"], ck["config"]["store"]
    checkpoint.write(ck, tmp_path / "run" / CKPT_LAST)
    assert run_dir.resume_config(run, given_by(), None, None, None).decode_once is False
    assert run_dir.resume_config(run, given_by("--decode-once"), None, None, None).decode_once is True
    new = saved_run(tmp_path / "new")
    assert run_dir.resume_config(new, given_by(), None, None, None).decode_once is True


@pytest.mark.parametrize("epoch, best_epoch, score, best, expected", [
    (2, 2, 0.8, 0.8, True),   # this epoch set the best
    (2, 1, 0.8, 0.8, False),  # a tie with epoch 1: not a new best (the loop's rule), best.pt stays epoch 1's
    (2, 1, 0.7, 0.8, False),
    (2, None, 0.8, 0.8, True),  # a checkpoint of an older dalipipe: by score
])
def test_the_repair_after_a_kill_follows_the_loops_best_epoch(epoch, best_epoch, score, best, expected):
    progress = Progress(epochs_done=epoch, best=best, last_score=score,
                        best_confusion=None if best_epoch is None else {"epoch": best_epoch})
    assert progress.last_epoch_was_best() is expected


def test_a_resume_of_a_run_still_before_its_first_checkpoint_says_it_is_running(tmp_path):
    """The run's lock held by another process (a train still in its first epoch, no last.pt yet)."""
    import subprocess
    import sys

    from tests import processes

    folder = tmp_path / "run"
    folder.mkdir()
    with processes.started([sys.executable, "-c", (
            "import sys; from dalipipe.run import run_dir\n"
            f"with run_dir.locked({str(folder)!r}):\n    print('held', flush=True); sys.stdin.read()")],
            timeout=120,  # (it imports dalipipe and takes a lock: a second or two)
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match="another dalipipe train is running in this folder"):
            run_dir.check_run_dir(folder, resume=True)
        holder.communicate("")
    with pytest.raises(DataError, match="no last.pt to resume from"):  # nobody holds it now
        run_dir.check_run_dir(folder, resume=True)


def test_a_resume_may_not_ask_for_fewer_epochs_than_the_run_has_trained(tmp_path):
    run = saved_run(tmp_path / "run", epochs_done=3, epochs=3)
    with pytest.raises(DataError, match="--epochs 2: the run has trained 3 epochs already; give more"):
        run_dir.resume_config(run, given_by("--epochs", "2"), None, None, None)
    assert run_dir.resume_config(run, given_by("--epochs", "3"), None, None, None).epochs == 3  # nothing to do
    assert run_dir.resume_config(run, given_by("--epochs", "5"), None, None, None).epochs == 5
