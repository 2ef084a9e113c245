"""What a training run writes to its folder, written in the background so that the GPU never waits for a disk.

The training loop hands over what to write and goes on at once. One writer thread writes it, in the order
handed over, each file by the atomic rule (temporary file, fsync, rename: a kill at any moment leaves the
previous complete file). Checkpoints are handed to the same thread by their owner (checkpoint.Checkpointer,
through in_background), so that an epoch's checkpoint is on disk before its records.

The plots and the validation predictions CSV are drawn in a worker process, which the writer thread waits
for: matplotlib and pandas hold Python's GIL for most of their work, and a thread of the training process
drawing a plot made the training thread's own Python (each kernel launch, each loader call) wait for the
GIL: measured, a loop of small torch operations ran 10x slower while a plot was drawn beside it. Writing a
checkpoint holds the GIL for a small part of its time only (about a tenth).

A write that fails (disk full, folder removed, no permission) stops the run at the next hand-off, or at
the end, with a one-line error naming the file; a normal end, --time-limit and Ctrl-C all wait for the
pending writes, so that last.pt on disk is then the last state handed over. Under torchrun only rank 0
records; the other ranks hand over nothing and never wait for its disk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from dalipipe.atomic import write_atomic, write_file
from dalipipe.child_processes import worker_pool
from dalipipe.config import Normalization
from dalipipe.constants import (CONFIG_FILE, CONFUSION_PNG, CURVES_PNG, LABELS_FILE, METRICS_FILE,
                                TENSORBOARD_DIR, TRAIN_BATCH_PNG, VAL_PER_CLASS, VAL_PREDICTIONS)
from dalipipe.errors import DataError
from dalipipe.viz import plots, tensorboard_log
from dalipipe.viz.display import display_images

_to_csv = functools.partial(pd.DataFrame.to_csv, index=False)  # (frame, path): picklable, for the worker


@dataclass(frozen=True)
class BestEpoch:
    """What is written when an epoch is the best so far, besides best.pt."""
    predictions: pd.DataFrame  # the validation predictions, to see which samples it gets wrong
    per_class: pd.DataFrame  # each class's precision, recall, F1 and support (class_report)
    confusion: np.ndarray
    class_names: list[str]
    title: str


@dataclass(frozen=True)
class EpochRecord:
    """What an epoch's end hands over to be written."""
    row: dict  # its metrics
    history: list[dict]  # every epoch's metrics so far (a copy: the loop appends)
    best: BestEpoch | None  # when it is the best epoch so far


@dataclass(frozen=True)
class FirstBatch:
    """The first training batch as the model receives it, for train_batch.png: its images normalized, copied
    to the host; turned back into pictures in the worker process (pictures), not in the training thread."""
    images: np.ndarray  # (N, 3, H, W) float32
    norm: Normalization
    captions: list[str]
    title: str

    def pictures(self) -> np.ndarray:
        return display_images(self.images, self.norm)  # (in NumPy: no torch operation in the forked worker)


def _first_batch_png(batch: FirstBatch, path: str) -> None:
    plots.batch_grid_png(batch.pictures(), batch.captions, batch.title, path)


def _first_batch_tensorboard(batch: FirstBatch) -> None:
    tensorboard_log.image("train/first_batch", mosaic(batch.pictures()), tensorboard_log.FIRST_BATCH_STEP)


# When a run file is written.
AT_START, FIRST_BATCH, EPOCH_END, NEW_BEST = "once at start", "first batch", "every epoch end", "at a new best"
# Where: drawn in the worker process (what holds the GIL: plots, pandas), or written by the writer thread.
IN_WORKER, IN_WRITER = "worker process", "writer thread"


def _write_text(text: str, path: str) -> None:
    Path(path).write_text(text)


def _write_json(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


@dataclass(frozen=True)
class RunFile:
    """One file of the run folder besides its checkpoints: render(*args(what), tmp_path) writes it, where
    `what` is the hand-off of its moment (the run's config and class names; a FirstBatch; an EpochRecord)."""
    name: str
    when: str
    where: str
    render: Callable[..., None]
    args: Callable[[Any], tuple]


# Every run file but last.pt and best.pt (checkpoint.Checkpointer), in the order they are handed over at
# their moment; an epoch's end first writes its checkpoint, then its files (the order a resume's repair
# expects). A new run file is one entry here.
RUN_FILES = (
    RunFile(CONFIG_FILE, AT_START, IN_WRITER, _write_json, lambda start: (start[0],)),
    RunFile(LABELS_FILE, AT_START, IN_WRITER, _write_json, lambda start: (start[1],)),
    RunFile(TRAIN_BATCH_PNG, FIRST_BATCH, IN_WORKER, _first_batch_png, lambda b: (b,)),
    RunFile(VAL_PREDICTIONS, NEW_BEST, IN_WORKER, _to_csv, lambda e: (e.best.predictions,)),
    RunFile(VAL_PER_CLASS, NEW_BEST, IN_WORKER, _to_csv, lambda e: (e.best.per_class,)),
    RunFile(CONFUSION_PNG, NEW_BEST, IN_WORKER, plots.confusion_png,
            lambda e: (e.best.confusion, e.best.class_names, e.best.title)),
    # The whole file again (one short line per epoch), to a temporary name and renamed, as every other
    # file: an append in place would leave a torn last line after a kill in mid-write.
    RunFile(METRICS_FILE, EPOCH_END, IN_WRITER, _write_text, lambda e: (metrics_text(e.history),)),
    RunFile(CURVES_PNG, EPOCH_END, IN_WORKER, plots.learning_curves_png, lambda e: (e.history,)),
)


class RecordFailed(Exception):
    """A write of the user's disk failed (an OSError): raised in the training thread as a DataError."""


class RunRecorder:
    """Create it before the run builds its model and loaders: its worker process is forked then, from a
    process that has no CUDA context and no loader threads yet."""

    def __init__(self, out: Path, active: bool, interrupt_hint: Callable[[], str]):
        self.out, self.active, self.hint = Path(out), active, interrupt_hint
        self.jobs: queue.Queue = queue.Queue()
        self.failure: BaseException | None = None
        self.failure_raised = False
        self.thread = self.worker = None
        self.tensorboard = False
        if active:
            self.worker = worker_pool(1)
            self.worker.submit(plots.warm_up)  # matplotlib's imports, while the run checks its data
            # A daemon: a second Ctrl-C while the first waits for a write still ends the process (the atomic
            # rule keeps the previous file, and a resume removes the temporary one).
            self.thread = threading.Thread(target=self._work, name="dalipipe-recorder", daemon=True)
            self.thread.start()

    # --- hand-offs (training thread) -----------------------------------------------------------------

    def in_background(self, path: Path, job: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        """job() in the writer thread, in turn (an OSError in it is a failure to write path); then(), if
        given, after it, also when the job is skipped after an earlier failure."""
        self.jobs.put((job, path, then))

    def run_start(self, config: dict, class_names: list[str]) -> None:
        """The files of a run's start (its settings and classes), written before this returns."""
        if not self.active:
            return
        self._write_now((config, class_names), AT_START)

    def epoch_end(self, record: EpochRecord) -> None:
        """Every file of an epoch's end (and of a new best), after the epoch's checkpoint."""
        if not self.active:
            return
        self.check()
        self._hand_over(record, EPOCH_END, NEW_BEST if record.best is not None else None)
        if self.tensorboard:
            self._call_in_worker(self.out / TENSORBOARD_DIR, tensorboard_log.epoch, record.row)
            if record.best is not None:
                best = record.best
                self._call_in_worker(self.out / TENSORBOARD_DIR, tensorboard_log.confusion, best.confusion,
                                     best.class_names, best.title, record.row["epoch"])

    def first_batch(self, batch: FirstBatch) -> None:
        if not self.active:
            return
        self._hand_over(batch, FIRST_BATCH)
        if self.tensorboard:
            self._call_in_worker(self.out / TENSORBOARD_DIR, _first_batch_tensorboard, batch)

    def _hand_over(self, what: Any, *moments: str | None) -> None:
        """Every run file of these moments, in RUN_FILES' order, to the writer thread or the worker."""
        for f in RUN_FILES:
            if f.when in moments:
                args = f.args(what)
                if f.where == IN_WORKER:
                    self._in_worker(self.out / f.name, f.render, *args)
                else:
                    path = self.out / f.name
                    self.in_background(path, lambda f=f, args=args, path=path: write_atomic(
                        path, lambda tmp: f.render(*args, tmp), make_parent=False))

    def _write_now(self, what: Any, moment: str) -> None:
        for f in RUN_FILES:
            if f.when == moment:
                args = f.args(what)
                write_atomic(self.out / f.name, lambda tmp: f.render(*args, tmp))

    def start_tensorboard(self, history: list[dict], resumed: bool, best: dict | None = None,
                          class_names: list[str] | None = None) -> None:
        """From here on, every epoch is also logged for TensorBoard (history: the epochs already done; best:
        their best epoch's confusion matrix, logged again after a resume's restart marker)."""
        if not self.active:
            return
        self.tensorboard = True
        log_dir = self.out / TENSORBOARD_DIR
        self._call_in_worker(log_dir, tensorboard_log.open_log, str(log_dir), list(history), resumed)
        if resumed and best is not None:
            self._call_in_worker(log_dir, tensorboard_log.confusion, np.asarray(best["matrix"]), class_names,
                                 best["title"], best["epoch"])

    def end_tensorboard(self, hparams: dict | None, best: float, epochs: int) -> None:
        """hparams: the run's settings once it has finished its epochs (None when it stopped early)."""
        if self.tensorboard:
            self._call_in_worker(self.out / TENSORBOARD_DIR, tensorboard_log.close_log, hparams, best, epochs)
            self.tensorboard = False

    def wait(self) -> None:
        """Until everything handed over so far is written (or a write failed: raised here)."""
        if self.thread is not None:
            self.jobs.join()
        self.check()

    def close(self, failed: bool = False) -> None:
        """Wait for every pending write. Unless the run already failed, raise a write's failure."""
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None
            self.worker.shutdown(cancel_futures=True)
        if not failed:
            self.check()

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Also at Ctrl-C and on an error: what was handed over is written before the process ends.
        self.close(failed=exc_type is not None)

    # --- the writer thread ---------------------------------------------------------------------------

    def _in_worker(self, path: Path, render: Callable[..., None], *args: Any) -> None:
        """A file drawn by render(*args, tmp) in the worker process, renamed over path."""
        self._call_in_worker(path, write_file, str(path), render, *args)

    def _call_in_worker(self, path: Path, fn: Callable[..., None], *args: Any) -> None:
        """fn(*args) in the worker process, in turn; path: what it writes, for a failure's message."""
        self.in_background(path, lambda: self.worker.submit(fn, *args).result())

    @contextlib.contextmanager
    def writing(self, path: Path) -> Iterator[None]:
        """An OSError while writing path is the user's disk (full, folder gone, no permission)."""
        try:
            yield
        except OSError as e:
            raise self._cannot_write(path, e) from None

    def _cannot_write(self, path: Path, e: OSError) -> RecordFailed:
        return RecordFailed(f"{path}: cannot write it ({e.strerror or type(e).__name__}); the run stopped; "
                            f"{self.hint()}")

    def _work(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                self.jobs.task_done()
                return
            job, path, then = item
            try:
                if self.failure is None:  # after a failure nothing more is written
                    with self.writing(path):
                        job()
            except BaseException as e:  # kept for the training thread, which raises it
                self.failure = e
            finally:
                if then is not None:  # (whoever waits for this job is not left waiting)
                    then()
                self.jobs.task_done()

    def check(self) -> None:
        """Raise the failure of a background write, once (a failure of the user's disk as a DataError)."""
        e = self.failure
        if e is None or self.failure_raised:
            return
        self.failure_raised = True
        if isinstance(e, RecordFailed):
            raise DataError(str(e)) from None
        raise e  # not the user's disk: a bug, with the writer's traceback


def metrics_text(history: list[dict]) -> str:
    """metrics.jsonl: one JSON line per epoch."""
    return "".join(json.dumps(row) + "\n" for row in history)


def mosaic(pictures: np.ndarray, columns: int = 8) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows * H, columns * W, 3) picture, left to right, top to bottom."""
    n, h, w, c = pictures.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=pictures.dtype)
    for i, picture in enumerate(pictures):
        r, k = divmod(i, columns)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = picture
    return grid


