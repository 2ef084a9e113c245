"""The run recorder and the checkpointer: checkpoints and records written in the background, each file
complete or not at all, the state written being the state handed over, and a failed write ending the run
with a one-line error."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import threading

import pytest
import torch

from dalipipe import checkpoint
from dalipipe.checkpoint import KILL_IN_WRITE, Checkpointer, SavedRun
from dalipipe.config import AugmentSpec, TrainConfig
from dalipipe.errors import DataError
from dalipipe.run import train_setup
from dalipipe.run.run_recorder import EpochRecord, RunRecorder
from dalipipe.run.train import train
from tests import processes
from tests.test_cli import COMMAND_TIMEOUT_S, assert_one_line_error, dalipipe
from tests.test_exact_resume import assert_twins


def recorder(out):
    return RunRecorder(out, active=True, interrupt_hint=lambda: "the hint")


def saver(rec):
    """The save of the recorder's one Checkpointer, as the training loop has it: a whole checkpoint handed
    to the recorder's writer."""
    if not hasattr(rec, "checkpointer"):
        rec.checkpointer = Checkpointer(rec.out, rec)
    return rec.checkpointer.save


@pytest.fixture
def gated(monkeypatch):
    """Checkpoint writes wait until the gate opens: what the training thread does meanwhile is seen."""
    gate = threading.Event()
    write = checkpoint.write

    def held(state, path):
        gate.wait(timeout=60)
        write(state, path)

    monkeypatch.setattr(checkpoint, "write", held)
    return gate


def small_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_the_file_holds_the_state_handed_over_while_training_goes_on(tmp_path, gated):
    model, opt = small_state()
    history = [{"epoch": 1}]
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    moment = opt.state_dict()["state"][0]["exp_avg"].clone()
    with recorder(tmp_path) as rec:
        saver(rec)({"model": model.state_dict(), "optimizer": opt.state_dict(), "history": history})
        # Training goes on while the write waits: weights, moments, history all change in place.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model[1].running_mean.add_(5.0)
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        history.append({"epoch": 2})
        gated.set()
    saved = checkpoint.load(tmp_path / "last.pt")
    assert all(torch.equal(saved["model"][k], expected[k]) for k in expected)
    assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], moment)
    assert saved["history"] == [{"epoch": 1}]


def test_one_checkpoint_in_flight_the_next_hand_off_waits_for_it(tmp_path, gated, monkeypatch):
    """The order of what happens, as the code does it: the second hand-off is made while the first
    checkpoint's write is held, and stages its snapshot only once that write has finished."""
    model, opt = small_state()
    events, second_waits = [], threading.Event()
    write = checkpoint.write  # the gated one
    monkeypatch.setattr(checkpoint, "write", lambda state, path: (write(state, path),
                                                                   events.append(f"write {state['n']}")))
    with recorder(tmp_path) as rec:
        ck = Checkpointer(tmp_path, rec)
        stage, wait = ck.staging.stage, ck.written.wait
        monkeypatch.setattr(ck.staging, "stage", lambda state: (events.append(f"stage {state['n']}"), stage(state))[1])

        def waiting(*args):
            if threading.current_thread().name == "second hand-off":
                events.append("hand-off 2 waits")
                second_waits.set()
            return wait(*args)

        monkeypatch.setattr(ck.written, "wait", waiting)
        ck.save({"model": model.state_dict(), "n": 1})
        second = threading.Thread(target=ck.save, args=({"model": model.state_dict(), "n": 2},),
                                  name="second hand-off")
        second.start()
        assert second_waits.wait(timeout=60), "the second hand-off never began"
        gated.set()
        second.join(timeout=60)
        assert not second.is_alive()
    assert events == ["stage 1", "hand-off 2 waits", "write 1", "stage 2", "write 2"], events
    assert checkpoint.load(tmp_path / "last.pt")["n"] == 2


def test_best_pt_is_written_from_the_same_snapshot(tmp_path):
    model, _ = small_state()
    with recorder(tmp_path) as rec:
        saver(rec)({"model": model.state_dict(), "epoch": 3}, best=True)
    last, best = checkpoint.load(tmp_path / "last.pt"), checkpoint.load(tmp_path / "best.pt")
    assert best["epoch"] == last["epoch"] == 3
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_best_pt_is_last_pt_itself_until_a_later_last_pt_replaces_it(tmp_path):
    model, _ = small_state()
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    with recorder(tmp_path) as rec:
        saver(rec)({"model": model.state_dict(), "epoch": 3}, best=True)
        rec.wait()
        assert os.stat(best).st_ino == os.stat(last).st_ino  # one file, written once
        with torch.no_grad():
            model[0].weight.add_(1.0)
        saver(rec)({"model": model.state_dict(), "epoch": 4})  # not a best
    assert os.stat(best).st_ino != os.stat(last).st_ino
    kept, latest = checkpoint.load(best), checkpoint.load(last)
    assert kept["epoch"] == 3 and latest["epoch"] == 4
    assert not torch.equal(kept["model"]["0.weight"], latest["model"]["0.weight"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_where_hard_links_are_refused_best_pt_is_a_copy(tmp_path, monkeypatch):
    def refused(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refused)
    model, _ = small_state()
    with recorder(tmp_path) as rec:
        saver(rec)({"model": model.state_dict(), "epoch": 3}, best=True)
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    assert os.stat(best).st_ino != os.stat(last).st_ino
    assert best.read_bytes() == last.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_background_write_stops_the_run_at_the_next_hand_off(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rec = recorder(out)
    shutil.rmtree(out)  # the run folder removed mid-run: not made again
    saver(rec)({"epoch": 1})
    with pytest.raises(DataError) as e:
        saver(rec)({"epoch": 2})  # waits for the first write, which failed
    msg = str(e.value)
    assert str(out / "last.pt") in msg and "No such file or directory" in msg and "the hint" in msg
    assert "\n" not in msg
    rec.close(failed=True)
    assert not out.exists()


def test_a_failed_write_at_the_end_is_raised_by_close(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rec = recorder(out)
    shutil.rmtree(out)
    row = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_balanced_accuracy": 0.5}
    saver(rec)({"epoch": 1})
    rec.epoch_end(EpochRecord(row, [row], None))
    with pytest.raises(DataError, match="last.pt: cannot write it"):
        rec.close()


def test_a_bug_in_the_writer_is_raised_as_itself(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise TypeError("a bug")

    monkeypatch.setattr(checkpoint, "write", broken)
    rec = recorder(tmp_path)
    saver(rec)({"epoch": 1})
    with pytest.raises(TypeError, match="a bug"):
        rec.close()


def test_a_bug_in_the_drawing_worker_is_raised_as_itself(tmp_path):
    rec = recorder(tmp_path)
    rec.epoch_end(EpochRecord({"epoch": 1}, [{"epoch": 1}], None))  # a history row without its losses
    with pytest.raises(KeyError, match="train_loss"):
        rec.close()


def test_an_inactive_recorder_writes_nothing_and_never_waits(tmp_path):
    rec = RunRecorder(tmp_path, active=False, interrupt_hint=lambda: "")
    saver(rec)({"epoch": 1})
    rec.epoch_end(EpochRecord({"epoch": 1}, [], None))
    rec.close()
    assert list(tmp_path.iterdir()) == []


def test_a_normal_end_leaves_last_pt_equal_to_the_final_state(small_synth, tmp_path, monkeypatch):
    built = []
    build = train_setup.build_model
    monkeypatch.setattr(train_setup, "build_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    cfg = TrainConfig(images_dir=str(small_synth / "images_train"), labels_csv=str(small_synth / "y_train.csv"),
                      out_dir=str(tmp_path / "run"), epochs=2, batch_size=32, device="cpu", subset=96,
                      augment=AugmentSpec(image_size=16))
    result = train(cfg)
    final = built[0].state_dict()
    saved = SavedRun.read(tmp_path / "run" / "last.pt")
    assert saved.progress.epochs_done == 2 and saved.progress.history == result.history
    assert final.keys() == saved.model.keys() and all(torch.equal(final[k], saved.model[k]) for k in final)
    # best.pt is last.pt's file when the last epoch was the best, else an earlier epoch's
    same = os.stat(tmp_path / "run" / "best.pt").st_ino == os.stat(tmp_path / "run" / "last.pt").st_ino
    assert same == saved.progress.last_epoch_was_best()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == result.history
    assert not list((tmp_path / "run").glob(".*.tmp"))


TINY = ["--epochs", "2", "--image-size", "16", "--batch-size", "32", "--device", "cpu", "--workers", "2",
        "--subset", "96"]


def test_killed_while_a_background_write_is_in_flight_keeps_the_previous_last_pt_and_resumes(small_synth, tmp_path):
    d = small_synth
    args = [d / "images_train", d / "y_train.csv", *TINY]
    dalipipe("train", *args, "--out", tmp_path / "twin")
    # Killed while the second checkpoint (epoch 2's end) is being written: its temporary file is complete,
    # not yet renamed over last.pt.
    env = dict(os.environ, PYTHONWARNINGS="ignore", **{KILL_IN_WRITE: "2"})
    r = processes.run([sys.executable, "-m", "dalipipe", "train", *map(str, args), "--out", str(tmp_path / "run")],
                      env=env, timeout=COMMAND_TIMEOUT_S)
    assert r.returncode == -9, r.stderr[-2000:]
    run = tmp_path / "run"
    assert list(run.glob(".last.pt.*.tmp")), "the kill was meant to fall in the middle of a write"
    assert checkpoint.load(run / "last.pt")["epoch"] == 1
    dalipipe("train", "--resume", run)
    assert not list(run.glob(".*.tmp"))
    assert_twins(tmp_path / "twin", run)


def _can_mount_tmpfs(where) -> bool:
    if shutil.which("unshare") is None:
        return False
    r = processes.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
                      timeout=COMMAND_TIMEOUT_S)
    return r.returncode == 0


def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_previous_checkpoint(small_synth, tmp_path):
    """A filesystem with room for one checkpoint and not two (mounted in a private mount namespace): the
    first mid-epoch checkpoint fits, the second does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a small tmpfs here (needs unshare and user or root namespaces)")
    size_mb = 150  # a checkpoint of efficientnet-b1 with Adam's moments is about 94 MB
    d = small_synth
    train_cmd = " ".join([sys.executable, "-m", "dalipipe", "train", str(d / "images_train"), str(d / "y_train.csv"),
                          *TINY, "--checkpoint-every", "1", "--out", str(disk / "run")])
    # Inside the namespace: train, then report what is on the small disk (it vanishes with the namespace).
    look = tmp_path / "look.py"
    look.write_text("import json, os, sys\nfrom dalipipe import checkpoint\nrun = sys.argv[1]\n"
                    "s = checkpoint.load(os.path.join(run, 'last.pt'))\n"
                    "print(json.dumps({'partial': s['partial'], 'epoch': s['epoch'], 'files': sorted(os.listdir(run))}))\n")
    script = (f"mount -t tmpfs -o size={size_mb}m tmpfs {disk} && {{ {train_cmd} 2> {tmp_path}/stderr; "
              f"echo $? > {tmp_path}/rc; {sys.executable} {look} {disk}/run > {tmp_path}/saved.json; }}")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    processes.run(["unshare", "-rm", "sh", "-c", script], env=env, timeout=COMMAND_TIMEOUT_S, check=True)

    class R:
        returncode = int((tmp_path / "rc").read_text())
        stderr = (tmp_path / "stderr").read_text()

    assert_one_line_error(R, str(disk / "run" / "last.pt"), "No space left on device", "--resume")
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved["epoch"] == 0 and saved["partial"] == {"steps": 1}, saved
    assert not [f for f in saved["files"] if f.endswith(".tmp")], saved


def test_metrics_jsonl_is_replaced_whole_at_each_epoch_never_appended_in_place(tmp_path):
    """A kill in the middle of an append would leave a torn last line: the file is written to a temporary
    name and renamed, as every other record (a new file each epoch, holding the whole history)."""
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.0, "val_balanced_accuracy": 0.5} for e in (1, 2)]
    rec = recorder(tmp_path)
    rec.epoch_end(EpochRecord(rows[0], rows[:1], None))
    rec.wait()
    first = (tmp_path / "metrics.jsonl").stat().st_ino
    rec.epoch_end(EpochRecord(rows[1], rows, None))
    rec.close()
    assert (tmp_path / "metrics.jsonl").stat().st_ino != first  # renamed over, not opened for appending
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows


def test_a_save_waiting_for_a_skipped_checkpoint_gets_the_earlier_failure(tmp_path, monkeypatch):
    """After a failed write, the writer skips what comes next, a checkpoint included; a save waiting for that
    checkpoint's write is told all the same (or it would wait forever for a write that never happens)."""
    out = tmp_path / "run"
    out.mkdir()
    rec = recorder(out)
    rows = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_balanced_accuracy": 0.5}]
    gate, waiting, raised = threading.Event(), threading.Event(), []
    rec.in_background(out / "held", lambda: gate.wait(timeout=60))  # the writer busy until the folder is gone
    rec.epoch_end(EpochRecord(rows[0], rows, None))  # metrics.jsonl: will fail, the folder being removed
    saver(rec)({"epoch": 1})  # queued behind the failure: skipped
    wait = rec.checkpointer.written.wait
    monkeypatch.setattr(rec.checkpointer.written, "wait", lambda *a: (waiting.set(), wait(*a))[1])

    def save_again():
        try:
            saver(rec)({"epoch": 2})
        except DataError as e:
            raised.append(str(e))

    # (a daemon: a save that hangs fails this test, not the whole suite)
    second = threading.Thread(target=save_again, name="second save", daemon=True)
    second.start()
    try:
        assert waiting.wait(timeout=60), "the second save never began to wait"
        shutil.rmtree(out)
        gate.set()
        second.join(timeout=60)
        assert not second.is_alive(), "the second save waits for a skipped write"
    finally:
        gate.set()
        rec.close(failed=True)
    assert len(raised) == 1 and str(out / "metrics.jsonl") in raised[0] and "\n" not in raised[0], raised


def test_a_second_run_in_one_process_after_torch_ran_on_several_threads_ends(small_synth, tmp_path):
    """The recorder's drawing worker is forked from the training process; a torch operation there can hang on
    the OpenMP threads torch ran before the fork (train_batch.png of a second run in one process, with two
    torch threads, once did): the worker runs none."""
    d = small_synth
    script = (
        "import sys\nfrom dalipipe.config import AugmentSpec, TrainConfig\nfrom dalipipe.run.train import train\n"
        "for name in ('a', 'b'):\n"
        f"    train(TrainConfig(images_dir={str(d / 'images_train')!r}, labels_csv={str(d / 'y_train.csv')!r},\n"
        f"                      out_dir={str(tmp_path)!r} + '/' + name, epochs=1, subset=96, batch_size=32,\n"
        "                      device='cpu', workers=1, threads=2, augment=AugmentSpec(image_size=16)))\n"
        "print('both ended')\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    r = processes.run([sys.executable, "-c", script], env=env, timeout=COMMAND_TIMEOUT_S, check=True)
    assert "both ended" in r.stdout
    assert (tmp_path / "b" / "train_batch.png").is_file()
