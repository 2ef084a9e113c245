"""The processes dalipipe starts for its own work (image checks, the run's plots): they leave Ctrl-C to the
command and die with it."""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor


def ignore_interrupts() -> None:
    """Ctrl-C (and a SIGTERM sent to the whole group) reaches every process of the group; the main process
    ends the command with one line, and its workers must not each print a traceback or die under it before
    its last writes (they die with it: die_with_parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """On Linux, get `sig` (by default be killed) when the process (the thread) that started this one ends,
    however it ends: a kill -9 of a run must not leave its workers behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def _worker_init() -> None:
    ignore_interrupts()
    die_with_parent()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes, started now by fork in the calling thread. fork, as torch's DataLoader workers:
    the children start at once and need no `if __name__ == "__main__"` guard in the caller's script (spawn
    does); they never touch CUDA."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init)
    pool.submit(int).result()  # fork here and now, not later from whichever thread first submits
    return pool
