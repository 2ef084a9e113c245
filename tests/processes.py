"""Commands that tests start. A command that outlives its timeout is killed with its whole process tree
(torchrun starts each rank under setsid, in a process group of its own, and the loader's workers live below
the ranks: killing the direct child alone leaves them running), and the test fails with the command's output and the Python
stacks of every process of the tree, where the hang is, instead of a bare TimeoutExpired.

The stacks come from py-spy (in the test extra), which reads a running Python process from outside,
whatever it is stuck in; where it is missing or may not attach, the report says so.
"""

from __future__ import annotations

import contextlib
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

STDOUT_TAIL, STDERR_TAIL, STACKS_TAIL = 4_000, 8_000, 6_000  # characters of each kept in a failure
SPY_TIMEOUT_S = 30  # one stack dump (it takes well under a second)
KILL_WAIT_S = 60  # for a killed process to be gone (a moment, unless the machine is swapping)
_timer = threading.Timer  # what started() times the block with (its test makes the timeout fall at will)


def run(cmd, *, timeout: float, env: dict | None = None, cwd=None, input: str | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) whose timeout kills the tree and fails the test
    with the output and the stacks. check: a nonzero exit status fails the test with the output."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else None, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks, killed = stop(proc.pid)
        out, err = _rest_of_output(proc)
        pytest.fail(report(cmd, timeout, killed, stacks, out, err), pytrace=False)
    except BaseException:  # an interrupted test: nothing of the command stays behind
        stop(proc.pid, dump=False)
        proc.wait()
        raise
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with status {result.returncode}\n{_tails(out, err)}", pytrace=False)
    return result


@contextlib.contextmanager
def started(cmd, *, timeout: float, **popen_args):
    """subprocess.Popen(cmd, **popen_args) for a test that talks to the running command. When the block
    outlives `timeout`, the tree is killed (so that a read of its pipes or a wait returns) and the test fails
    with the stacks and the output written to files given as stdout or stderr; whatever is still running
    when the block ends (an assertion failed) is killed with its tree."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, **popen_args)
    expired: list[tuple[str, list]] = []

    def expire():
        if proc.poll() is None:
            expired.append(stop(proc.pid))

    timer = _timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        yield proc
    finally:
        timer.cancel()
        timer.join()  # an expiry in progress finishes first
        stop(proc.pid, dump=False)
        proc.wait()
        if expired:
            (stacks, killed), = expired
            outputs = [_read(popen_args.get(k)) for k in ("stdout", "stderr")]
            pytest.fail(report(cmd, timeout, killed, stacks, *outputs), pytrace=False)


def stop(pid: int, dump: bool = True) -> tuple[str, list[str]]:
    """Kill the process `pid` and all its descendants: (their Python stacks taken just before, if dump;
    one line per process killed). Stopped (SIGSTOP) before they are killed, so that none starts another
    one in between."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return "", []
    tree = _tree(root)
    stacks = "\n".join(_stack(p) for p in tree) if dump else ""
    stopped: dict[int, psutil.Process] = {}
    while True:  # until a walk finds no process it had not stopped
        new = [p for p in _tree(root) + list(stopped.values()) if p.pid not in stopped]
        new += [c for p in stopped.values() for c in _children(p) if c.pid not in stopped]
        if not new:
            break
        for p in new:
            _signal(p, signal.SIGSTOP)
            stopped[p.pid] = p
    killed = [f"{p.pid} {_name(p)}" for p in stopped.values()]
    ends = [_end_of(p) for p in stopped.values()]
    for p in stopped.values():
        _signal(p, signal.SIGKILL)
    for end in ends:  # a kill takes effect a moment later: wait for it, so that none runs on after this
        if end is not None:
            select.select([end], [], [], KILL_WAIT_S)
            os.close(end)
    return stacks, killed


def report(cmd: list[str], timeout: float, killed: list[str], stacks: str, out: str, err: str) -> str:
    return (f"{' '.join(cmd)}\nran past its {timeout:g} s timeout; killed with its {len(killed)} process(es): "
            f"{', '.join(killed)}\n{_tails(out, err)}\n--- Python stacks at the timeout ---\n"
            f"{stacks[-STACKS_TAIL * max(len(killed), 1):]}")


def _tails(out: str, err: str) -> str:
    return f"--- stdout (tail) ---\n{(out or '')[-STDOUT_TAIL:]}\n--- stderr (tail) ---\n{(err or '')[-STDERR_TAIL:]}"


def _tree(root: psutil.Process) -> list[psutil.Process]:
    return [root] + _children(root)


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _end_of(p: psutil.Process) -> int | None:
    """A descriptor that turns readable when the process has ended (a pidfd), or None if it has."""
    try:
        return os.pidfd_open(p.pid)
    except ProcessLookupError:
        return None


def _signal(p: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.Error):
        p.send_signal(sig)


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()).replace("\n", " ")[:120] or p.name()
    except psutil.Error:
        return "(gone)"


def _stack(p: psutil.Process) -> str:
    """py-spy's dump of one process, or why there is none."""
    try:
        exe = Path(p.exe()).name
    except psutil.Error as e:
        return f"{p.pid}: no stack ({type(e).__name__})"
    if not exe.startswith("python"):
        return f"{p.pid} {_name(p)}: not Python"
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return f"{p.pid}: no stack (py-spy is not installed: pip install py-spy)"
    try:
        r = subprocess.run([spy, "dump", "--pid", str(p.pid)], capture_output=True, text=True,
                           timeout=SPY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{p.pid}: no stack (py-spy took over {SPY_TIMEOUT_S} s)"
    return r.stdout if r.returncode == 0 else f"{p.pid}: no stack (py-spy: {(r.stderr or r.stdout).strip()[-300:]})"


def _rest_of_output(proc: subprocess.Popen) -> tuple[str, str]:
    """What the killed command wrote (a process outside the tree that still holds its pipes: no more)."""
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.stdout.close()
        proc.stderr.close()
        proc.wait()
        return "(its output: held open by a process outside the tree)", ""


def _read(target) -> str:
    """The text of a file object or path given as stdout or stderr, or ''."""
    name = getattr(target, "name", target)
    if isinstance(name, (str, Path)) and Path(name).is_file():
        return Path(name).read_text(errors="replace")
    return ""
