"""The helper that starts the tests' commands: a command past its timeout is killed with every process it
started, those started under setsid included (as torchrun starts its ranks), and the test fails with
the command's output and its stacks. The commands here never end: whenever the timeout falls, it falls."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from tests import processes

# A parent that starts a child under setsid and names both; both sleep forever. Any arguments go to
# the child too.
FOREVER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time\\ndef sleeping():\\n    time.sleep(10**6)\\nsleeping()",
                          *sys.argv[1:]], start_new_session=True)
print("the parent's complaint", file=sys.stderr, flush=True)
print(f"started {child.pid} beside {os.getpid()}", flush=True)
time.sleep(10**6)
"""


class HandTimer:
    """A timer that falls when the test says so."""

    def __init__(self, interval, function):
        self.interval, self.function, self.daemon = interval, function, False

    def start(self):
        HandTimer.last = self

    def cancel(self):
        pass

    def join(self):
        pass


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True


def test_a_command_past_its_timeout_is_killed_with_its_tree_and_the_test_fails_with_output_and_stacks(
        tmp_path, monkeypatch):
    monkeypatch.setattr(processes, "_timer", HandTimer)
    with pytest.raises(pytest.fail.Exception) as failed:
        with processes.started([sys.executable, "-c", FOREVER], timeout=120, stdout=subprocess.PIPE, text=True,
                               stderr=open(tmp_path / "err", "w")) as proc:
            line = proc.stdout.readline()  # both processes run from here on
            child, parent = map(int, line.split()[1::2])
            HandTimer.last.function()  # the timeout falls
            assert proc.stdout.read() == ""  # the pipe is closed: a test reading it goes on
    assert gone(child) and gone(parent)
    message = str(failed.value)
    assert "ran past its 120 s timeout; killed with its 2 process(es)" in message
    assert "the parent's complaint" in message
    assert "sleeping" in message  # the child's stack, taken before the kill


def test_run_kills_the_tree_and_shows_what_the_command_wrote(tmp_path):
    marker = str(tmp_path / "marker")
    with pytest.raises(pytest.fail.Exception) as failed:
        processes.run([sys.executable, "-c", FOREVER, marker], timeout=1)
    message = str(failed.value)
    assert "ran past its 1 s timeout; killed with its" in message and "--- stderr (tail) ---" in message
    # Whatever had started by the timeout was killed: no process of the command is left.
    left = [p for p in psutil.process_iter(["cmdline", "status"])
            if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert not left, left


def test_a_block_that_ends_in_time_leaves_nothing_running():
    with processes.started([sys.executable, "-c", FOREVER], timeout=600, stdout=subprocess.PIPE, text=True,
                           stderr=subprocess.DEVNULL) as proc:
        child, parent = map(int, proc.stdout.readline().split()[1::2])
    assert gone(child) and gone(parent)


def test_run_returns_what_the_command_did():
    r = processes.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                      timeout=600)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    with pytest.raises(pytest.fail.Exception, match="exited with status 3"):
        processes.run([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=600, check=True)
