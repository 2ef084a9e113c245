"""`make demo` stopped by Ctrl-C stops in one line, and run again continues its own run."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from tests import processes

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"
# The demo of these tests (one epoch at 16 px, predict, score): both runs of it 16 s together here
# (2026-12-06, 2-core CPU, two tests at once).
DEMO_TIMEOUT_S = 120


def demo_module():
    spec = importlib.util.spec_from_file_location("demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_continues_its_latest_run_unless_that_one_is_done(tmp_path):
    demo = demo_module()
    runs = tmp_path / "runs"
    fresh, action = demo.plan(runs)
    assert action == "train" and fresh.parent == runs and fresh.name.startswith("demo-")
    old, latest = runs / "demo-20260101-000000", runs / "demo-20260102-000000"
    for folder in (old, latest):
        folder.mkdir(parents=True)
    (runs / "mine").mkdir()  # not the demo's
    assert demo.plan(runs) == (latest, "train")  # stopped before its first checkpoint: trained again there
    (latest / "last.pt").write_bytes(b"")
    assert demo.plan(runs) == (latest, "resume")  # stopped in training
    (latest / "config.json").write_text('{"epochs": 2}')
    (latest / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert demo.plan(runs) == (latest, "resume")  # one epoch of two
    (latest / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    assert demo.plan(runs) == (latest, "predict")  # trained, stopped before its predictions
    (latest / "submission.csv").write_text("file_id,cell_line\n")
    new, action = demo.plan(runs)  # done: the next demo is a new run
    assert action == "train" and new not in (old, latest) and new.parent == runs
    (old / "last.pt").write_bytes(b"")
    shutil.rmtree(latest)
    (old / "metrics.jsonl").write_text("")
    assert demo.plan(runs) == (old, "resume")


# The demo with a configuration that trains in seconds; its folders are those of a copy of the repository.
WRAPPER = """
import importlib.util, signal, sys
from pathlib import Path
# Ctrl-C as at a terminal, even where this test runs in a background job (whose shell starts every command
# with SIGINT ignored, and an ignored signal stays ignored in every process started below it).
signal.signal(signal.SIGINT, signal.default_int_handler)
spec = importlib.util.spec_from_file_location("demo", sys.argv[1])
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)
demo.train_options = lambda: ["--epochs", "1", "--image-size", "16", "--batch-size", "32", "--device", "cpu",
                              "--workers", "1"]
demo.main(Path(sys.argv[2]))
"""


@contextlib.contextmanager
def holding_the_pipe(image: Path, proc):
    """The write end of the named pipe `image` (predict blocks reading it), opened once predict has opened it
    to read (no polling); yields an event set when `proc` has ended. A watcher opens the read end when `proc`
    ends, so that the open returns however the demo ends; at the end `proc` is stopped if it still runs."""
    ended, ours = threading.Event(), []

    def read_end_when_it_ends():
        proc.wait()
        ended.set()
        ours.append(os.open(image, os.O_RDONLY | os.O_NONBLOCK))

    watcher = threading.Thread(target=read_end_when_it_ends, daemon=True)
    watcher.start()
    fd = os.open(image, os.O_WRONLY)
    try:
        yield ended
    finally:
        os.close(fd)
        if proc.poll() is None:  # an assertion failed before it was stopped
            processes.stop(proc.pid, dump=False)
        watcher.join()
        os.close(ours[0])


def test_ctrl_c_stops_the_demo_in_one_line_and_the_next_demo_goes_on_from_there(small_synth, tmp_path):
    root = tmp_path / "repo"
    data = root / "data" / "synthetic"
    shutil.copytree(small_synth, data)
    # One test image is a named pipe: predict blocks reading it until this test, holding the other end,
    # presses Ctrl-C, so that the moment of the interrupt is known whatever the machine's speed.
    image = sorted((data / "images_test").glob("*_blue.png"))[0]
    image.unlink()
    os.mkfifo(image)
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    command = [sys.executable, str(tmp_path / "wrapper.py"), str(SCRIPT), str(root)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with open(tmp_path / "out1", "w") as out, open(tmp_path / "err1", "w") as err, \
            processes.started(command, timeout=DEMO_TIMEOUT_S, stdout=out, stderr=err, env=env,
                              # its own process group, as a terminal's foreground job: Ctrl-C reaches the
                              # demo and its dalipipe
                              start_new_session=True) as proc, holding_the_pipe(image, proc) as ended:
        assert not ended.is_set(), (tmp_path / "err1").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait() == 130
    stderr = (tmp_path / "err1").read_text()
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "\r" not in ln]
    run = next((root / "runs").iterdir())
    assert lines[-1].startswith("demo interrupted") and f"runs/{run.name}" in lines[-1], stderr
    assert not [ln for ln in lines if ln.startswith("interrupted")], stderr  # one line: the demo's, not dalipipe's
    # Stopped in its predictions, after the whole training: the next demo predicts and scores.
    assert "make demo" in lines[-1] and "predicts with" in lines[-1]
    assert not (run / "submission.csv").exists()

    image.unlink()
    shutil.copy(small_synth / "images_test" / image.name, image)
    r = processes.run(command, env=env, timeout=DEMO_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "has trained all its epochs" in r.stdout and "$ dalipipe train" not in r.stdout, r.stdout
    assert f"$ dalipipe predict {run}" in r.stdout and "balanced accuracy" in r.stdout, r.stdout
    assert [p.name for p in (root / "runs").iterdir()] == [run.name] and (run / "submission.csv").is_file()


def test_a_sigterm_for_make_stops_the_demo_as_ctrl_c_does(small_synth, tmp_path):
    """`kill` of `make demo` (or a scheduler's SIGTERM) ends make at once: the demo, make's child, is then
    sent a SIGTERM by Linux, passes it on to its dalipipe, and says in one line what the next demo does."""
    root = tmp_path / "repo"
    data = root / "data" / "synthetic"
    shutil.copytree(small_synth, data)
    image = sorted((data / "images_test").glob("*_blue.png"))[0]  # predict blocks on it (see the Ctrl-C test)
    image.unlink()
    os.mkfifo(image)
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    # A stand-in for make: a shell that runs the demo as its child and waits for it.
    make = ["sh", "-c", '"$@"; exit $?', "make", sys.executable, str(tmp_path / "wrapper.py"), str(SCRIPT), str(root)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with processes.started(make, timeout=DEMO_TIMEOUT_S, stderr=subprocess.PIPE, text=True, env=env) as proc, \
            holding_the_pipe(image, proc) as ended:
        assert not ended.is_set(), proc.stderr.read()[-3000:]
        (demo,) = psutil.Process(proc.pid).children()
        demo_ended = os.pidfd_open(demo.pid)
        proc.send_signal(signal.SIGTERM)  # make alone, as `kill PID`
        assert proc.wait() == -signal.SIGTERM
        # The demo is make's no more: it must end by itself (a pidfd turns readable when it has).
        if not select.select([demo_ended], [], [], DEMO_TIMEOUT_S)[0]:
            processes.stop(demo.pid, dump=False)
            pytest.fail("the demo went on after make ended")
        stderr = proc.stderr.read()
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "\r" not in ln]
    run = next((root / "runs").iterdir())
    assert lines[-1].startswith("demo stopped by SIGTERM; run `make demo` again: it predicts with"), stderr
    assert f"runs/{run.name}" in lines[-1] and not (run / "submission.csv").exists()
