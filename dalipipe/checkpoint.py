"""The one owner of a run's checkpoints, from capture to restore: what a checkpoint holds (the typed run
state and the model card predict reads), when a run saves (CheckpointPolicy), the consistent host copy
taken without stopping the GPU (HostStaging), the atomic write handed to the run's background writer,
best.pt as a hard link of last.pt, the repair of a folder after a kill, and the restore of a resume. A
checkpoint is loaded as plain data only.

A checkpoint (format FORMAT) is a dict of plain data: written from the typed state (RunState.to_checkpoint)
and read into typed values (SavedRun for a resume, ModelCard for predict and the run folder's rules). Its
layout is fixed by tests/data/checkpoint_layout.json: every dalipipe release writes the same keys, nesting
and types, so that older and newer ones read each other's files. Keys that an older release did not write
are read with a default.

What an exact resume needs beyond weights and optimizer is saved too: every rank's random generators and
loader position, and a partial epoch's running sums. A resumed run restores them instead of reseeding, so
that it goes on with the same sample order, augmentation draws and dropout masks as it would have without
the interruption.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dalipipe import distributed
from dalipipe.atomic import fsync_folder, write_atomic
from dalipipe.config import Normalization, TrainConfig
from dalipipe.constants import CKPT_BEST, CKPT_LAST, MODEL_NAME
from dalipipe.distributed import World
from dalipipe.errors import DataError
from dalipipe.versions import versions

if TYPE_CHECKING:
    from dalipipe.ema import WeightAverage

FORMAT = "dalipipe-checkpoint-1"

# Under torchrun the time-based decision to save is rank 0's, shared every this many steps (a small
# collective; every step would cost a little on every step).
DECIDE_EVERY_STEPS = 10

# Testing aids. DALIPIPE_KILL_AT_STEP=N: SIGKILL right after training step N, as a pre-emption would, once
# the checkpoints handed over until then are written. DALIPIPE_KILL_IN_CHECKPOINT_WRITE=N: SIGKILL in the
# middle of writing the N-th checkpoint (its temporary file written, not yet renamed over last.pt).
KILL_AT_STEP = "DALIPIPE_KILL_AT_STEP"
KILL_IN_WRITE = "DALIPIPE_KILL_IN_CHECKPOINT_WRITE"


# --- the typed state ---------------------------------------------------------------------------------

@dataclass
class Progress:
    """How far the run has got: saved in every checkpoint, restored on resume."""
    epochs_done: int = 0
    best: float = -1.0
    last_score: float = -1.0
    history: list[dict] = field(default_factory=list)
    # The best epoch's validation confusion matrix: {"epoch", "matrix" (rows: true class), "title"}. Saved, so
    # that a resumed run's TensorBoard log (whose restart drops every earlier point) can show it again.
    best_confusion: dict | None = None

    def record(self, row: dict, score: float) -> bool:
        """An epoch done with this validation score: its metrics row kept; whether it is a new best. Better
        by more than float noise: equal balanced accuracies of different predictions can differ in the last
        bit, and a tie is not a new best (best.pt stays the earlier epoch's)."""
        improved = score > self.best + 1e-9
        self.history.append(row)
        self.epochs_done, self.last_score = row["epoch"], score
        self.best = max(self.best, score)
        return improved

    def last_epoch_was_best(self) -> bool:
        """Whether the last epoch done is the run's best, by the training loop's rule (a tie is not a new
        best): the best epoch is recorded with its confusion matrix. (Checkpoints of an older dalipipe: by
        score.)"""
        if self.best_confusion is not None:
            return self.best_confusion["epoch"] == self.epochs_done
        return self.last_score >= self.best


@dataclass(frozen=True)
class RankState:
    """One process's generators and loader position, and its running sums in the middle of an epoch."""
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    loader: dict | None
    loader_key: str | None
    loss_sum: torch.Tensor | None = None
    seen: int = 0

    def to_dict(self) -> dict:
        return {"rng_cpu": self.rng_cpu, "rng_cuda": self.rng_cuda, "loader": self.loader,
                "loader_key": self.loader_key, "loss_sum": self.loss_sum, "seen": self.seen}

    @classmethod
    def from_dict(cls, d: dict) -> RankState:
        return cls(d["rng_cpu"], d.get("rng_cuda"), d.get("loader"), d.get("loader_key"), d.get("loss_sum"),
                   d.get("seen", 0))


@dataclass(frozen=True)
class PartialEpoch:
    """Where a mid-epoch checkpoint stopped: the steps done in the epoch and this rank's running sums."""
    steps: int
    loss_sum: torch.Tensor | None
    seen: int


@dataclass(frozen=True)
class Split:
    train_ids: list[int]
    val_ids: list[int]
    folds: int | None = None
    fold: int | None = None

    def to_dict(self) -> dict:
        return {"train_ids": self.train_ids, "val_ids": self.val_ids, "folds": self.folds, "fold": self.fold}


@dataclass(frozen=True)
class ModelCard:
    """What predicting with a checkpoint, and the run folder's rules, read of it."""
    class_names: tuple[str, ...]
    norm: Normalization
    image_size: int
    model_name: str
    weights: dict  # what to predict with: the weight average of a run trained with --ema, else the model's
    split: Split | None  # None in a checkpoint of a release that did not save it
    config: dict  # the run's TrainConfig, as TrainConfig.to_dict wrote it
    epoch: int  # epochs done
    partial_steps: int | None  # steps done in the next epoch, for a mid-epoch checkpoint

    @classmethod
    def of(cls, ck: dict) -> ModelCard:
        split = ck.get("split")
        return cls(class_names=tuple(ck["class_names"]), norm=Normalization(tuple(ck["mean"]), tuple(ck["std"])),
                   image_size=int(ck["image_size"]), model_name=ck.get("model_name", MODEL_NAME),
                   weights=ck["ema"]["model"] if ck.get("ema") else ck["model"],
                   split=Split(split.get("train_ids", []), split.get("val_ids", []), split.get("folds"), split.get("fold"))
                   if split else None,
                   config=ck["config"], epoch=int(ck["epoch"]),
                   partial_steps=ck["partial"]["steps"] if ck.get("partial") else None)

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        """A checkpoint file, or a run folder's best checkpoint (resolve)."""
        return cls.of(load(path))


@dataclass(frozen=True)
class SavedRun:
    """Everything a checkpoint holds for a resume, typed."""
    card: ModelCard
    progress: Progress
    model: dict
    optimizer: dict
    scaler: dict
    ema: dict | None
    ranks: list[RankState] | None  # None from a release that saved no generators
    partial_steps: int | None

    @classmethod
    def of(cls, ck: dict) -> SavedRun:
        ranks = ck.get("ranks")
        return cls(card=ModelCard.of(ck),
                   progress=Progress(ck["epoch"], ck["best_score"], ck["val_balanced_accuracy"], ck["history"],
                                     ck.get("best_confusion")),
                   model=ck["model"], optimizer=ck["optimizer"], scaler=ck["scaler"], ema=ck.get("ema"),
                   ranks=None if ranks is None else [RankState.from_dict(r) for r in ranks],
                   partial_steps=ck["partial"]["steps"] if ck.get("partial") else None)

    @classmethod
    def read(cls, path: str | Path) -> SavedRun:
        return cls.of(load(path))


@dataclass
class RunState:
    """The live state of a training run that its checkpoints save (held by reference: the loop changes the
    model, optimizer and progress in place)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: WeightAverage | None
    class_weights: list[float] | None
    progress: Progress
    class_names: tuple[str, ...]
    norm: Normalization
    split: Split
    config: TrainConfig

    def to_checkpoint(self, ranks: list[RankState], partial_steps: int | None, config: dict,
                      made_by: dict) -> dict[str, Any]:
        """Everything predict and an exact resume need; partial_steps: saved in the middle of an epoch.
        config, made_by: the run's config.to_dict() and versions(), taken once per run by the caller.
        (The keys and their order: tests/data/checkpoint_layout.json.)"""
        p, cfg = self.progress, self.config
        return {"model_name": MODEL_NAME, "class_names": list(self.class_names), "mean": list(self.norm.mean),
                "std": list(self.norm.std), "image_size": cfg.augment.image_size,
                "config": config,
                "epoch": p.epochs_done, "best_score": p.best, "history": p.history,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "split": self.split.to_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(), "class_weights": self.class_weights,
                "val_balanced_accuracy": p.last_score, "best_confusion": p.best_confusion,
                "versions": made_by, "ranks": [r.to_dict() for r in ranks],
                "partial": None if partial_steps is None else {"steps": partial_steps}}


# --- capture and restore of every rank's generators and loader -------------------------------------------

def loader_key(kind: str, decoder: str, device: torch.device, stored: bool = False) -> str:
    """What a loader state fits: DALI's belongs to one pipeline graph (CPU, or GPU with this decoding; or
    reading the decoded store). The torch loader's state (epoch, batches done) fits it read from PNGs or
    from the store alike: its samples and their augmentation are a function of the seed, the epoch and the
    sample."""
    if kind == "torch":
        return "torch"
    if stored:
        return f"dali/{device.type}/store"
    return f"dali/{device.type}" + (f"/{decoder}" if device.type == "cuda" else "")


def capture(loader, *, key: str, device: torch.device, world: World, loss_sum: torch.Tensor | None = None,
            seen: int = 0) -> list[RankState]:
    """Every rank's generators, loader state and partial-epoch sums, gathered (in rank order) on every rank."""
    mine = RankState(rng_cpu=torch.get_rng_state(),
                     rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     loader=loader.state(), loader_key=key,
                     loss_sum=None if loss_sum is None else loss_sum.detach().cpu().clone(), seen=seen)
    return distributed.gather(mine, world)


def restore(ranks: list[RankState] | None, *, partial_steps: int | None, key: str, device: torch.device, world: World,
            run: str) -> RankState | None:
    """This rank's saved state (generators restored here), or None where the run has none to give (a run
    from an older dalipipe, or another number of processes at an epoch's end: then the loaders reseed).
    A loader state saved for another loader, device or decoding is dropped at an epoch's end (the loader
    reseeds) and refused in the middle of one (its order cannot be continued)."""
    if not ranks:
        return None
    if len(ranks) != world.size:
        if partial_steps:
            raise DataError(f"{run}: the run was saved in the middle of an epoch with {len(ranks)} process(es); "
                            f"resume it with {len(ranks)} (got {world.size})")
        return None
    mine = ranks[world.rank]
    if mine.loader_key != key:
        if partial_steps:
            raise DataError(f"{run}: the run was saved in the middle of an epoch with the loader {mine.loader_key}; "
                            f"resume it with the same --loader, --device, --decoder and --[no-]decode-once (got {key})")
        mine = dataclasses.replace(mine, loader=None)
    torch.set_rng_state(mine.rng_cpu)
    if device.type == "cuda" and mine.rng_cuda is not None:
        torch.cuda.set_rng_state(mine.rng_cuda, device)
    return mine


# --- the host copy ----------------------------------------------------------------------------------------

class HostStaging:
    """A consistent copy of a training state in host memory, taken without stopping the GPU.

    The state a checkpoint holds must be the state at one step, although training goes on while it is
    written. Serializing the live tensors in a background thread would mix steps (Lightning's
    AsyncCheckpointIO met this and now clones first), so every tensor is copied here, in the training
    thread, into host buffers kept and reused from one save to the next (like torch.distributed.checkpoint's
    cached staging): after the first save nothing is allocated. A buffer is overwritten by the next stage():
    the caller must be done with the previous copy (the Checkpointer writes one at a time).

    On a GPU the buffers are pinned and the copies are queued with non_blocking on the training stream: the
    host does not wait for them and goes on queueing the next steps, and the stream runs them in order,
    before any later kernel changes a weight. wait() (in the writer's thread) waits on an event recorded
    after the copies."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.gpu: torch.device | None = None  # the device of the GPU tensors staged, if any
        self.event: torch.cuda.Event | None = None

    def stage(self, state: Any) -> Any:
        """The copy (its tensors valid once wait() returns)."""
        self.gpu = None
        tree = self._copy(state, ())
        self.event = None
        if self.gpu is not None:
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(self.gpu))
        return tree

    def wait(self) -> None:
        """Until the queued copies of the last stage() are done."""
        if self.event is not None:
            self.event.synchronize()

    def _buffer(self, path: tuple, t: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.is_pinned() != t.is_cuda:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            self.buffers[path] = buf
        return buf

    def _copy(self, x: Any, path: tuple) -> Any:
        # Containers are rebuilt (the training loop appends to lists such as the history it hands over);
        # strings, numbers and None are immutable and shared.
        if isinstance(x, torch.Tensor):
            buf = self._buffer(path, x)
            buf.copy_(x.detach(), non_blocking=x.is_cuda)
            if x.is_cuda:
                self.gpu = x.device
            return buf
        if isinstance(x, dict):
            return {k: self._copy(v, path + (k,)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self._copy(v, path + (i,)) for i, v in enumerate(x))
        return x


# --- when to save -----------------------------------------------------------------------------------------

class TimeLimitReached(Exception):
    """Raised after a mid-epoch checkpoint when --time-limit has passed: the run stops there, resumable."""


class CheckpointPolicy:
    """When to save in the middle of an epoch (--checkpoint-every steps, counted over the whole run, and/or
    --checkpoint-minutes; never at an epoch's last step, where the epoch's own checkpoint follows) and when
    --time-limit stops the run. Time is rank 0's clock: under torchrun its reading is shared every
    DECIDE_EVERY_STEPS steps, so that every rank saves, and stops, at the same step."""

    def __init__(self, every: int | None, minutes: float | None, time_limit_minutes: float | None, start: float,
                 world: World):
        self.every, self.world = every, world
        self.seconds = None if minutes is None else 60 * minutes
        self.deadline = None if time_limit_minutes is None else start + 60 * time_limit_minutes
        self.last_save = time.perf_counter()

    def _clock(self, global_step: int | None) -> tuple[bool, bool]:
        """(the time limit has passed, the checkpoint interval's time has passed), by rank 0's clock."""
        if self.world.size > 1 and global_step is not None and global_step % DECIDE_EVERY_STEPS:
            return False, False
        now = time.perf_counter()
        reading = (self.deadline is not None and now > self.deadline,
                   self.seconds is not None and now - self.last_save >= self.seconds)
        if self.world.size > 1:
            reading = tuple(distributed.broadcast(reading, self.world))
        return reading

    def at_step(self, global_step: int, last_step_of_epoch: bool) -> tuple[bool, bool]:
        """(save now, then stop the run)."""
        if last_step_of_epoch:
            return False, False
        every = self.every is not None and global_step % self.every == 0
        if self.deadline is None and self.seconds is None:
            return every, False
        time_up, interval_passed = self._clock(global_step)
        return time_up or every or interval_passed, time_up

    def time_up_at_epoch_end(self) -> bool:
        return self.deadline is not None and self._clock(None)[0]

    def saved(self) -> None:
        self.last_save = time.perf_counter()


# --- the owner ---------------------------------------------------------------------------------------------

class Checkpointer:
    """Saves a run's last.pt (and best.pt) when the policy says so: captures every rank's state, stages a host
    copy, and hands its write to the run's background writer (run_recorder.RunRecorder), which writes it by
    the atomic rule while training goes on. At most one checkpoint is in flight: the next save waits for it,
    so that its host buffers can be reused and memory stays bounded. Under torchrun every rank captures (a
    collective) and rank 0 alone writes.

    state: the live run state; loader: the training loader, whose position is saved; key: loader_key's."""

    def __init__(self, out: str | Path, writer, state: RunState | None = None, *, loader=None, key: str = "torch",
                 device: torch.device = torch.device("cpu"), world: World = World(),
                 policy: CheckpointPolicy | None = None):
        self.out, self.writer, self.state = Path(out), writer, state
        self.loader, self.key, self.device, self.world = loader, key, device, world
        # (without one: no mid-epoch checkpoint and no time limit)
        self.policy = policy or CheckpointPolicy(None, None, None, time.perf_counter(), world)
        self.staging = HostStaging()
        self.written = threading.Event()  # the previous checkpoint is on disk (or its write failed)
        self.written.set()
        self.saves = 0
        kill = os.environ.get(KILL_IN_WRITE)
        self.kill_in_write = int(kill) if kill else None
        kill = os.environ.get(KILL_AT_STEP)
        self.kill_at_step = int(kill) if kill else None
        # Constant over the run: taken once, not at every save.
        self.config = state.config.to_dict() if state is not None else None
        self.made_by = versions() if state is not None else None

    def after_step(self, step: int, global_step: int, loss_sum: torch.Tensor, seen: int, steps_per_epoch: int) -> None:
        """After each training step: last.pt in the middle of the epoch when the policy says so, then a stop
        (TimeLimitReached) when --time-limit has passed. step: of the epoch, from 1; global_step: of the run."""
        if self.kill_at_step == global_step:  # every rank waits for rank 0's writes, then all are killed
            self.writer.wait()
            distributed.barrier(self.world)
            os.kill(os.getpid(), signal.SIGKILL)
        save, stop = self.policy.at_step(global_step, last_step_of_epoch=step == steps_per_epoch)
        if save:
            self._save_state(partial_steps=step, loss_sum=loss_sum, seen=seen)
        if stop:
            raise TimeLimitReached(step)

    def epoch_end(self, best: bool) -> None:
        """last.pt at an epoch's end (and best.pt, the same file, when the epoch is the best so far)."""
        self._save_state(partial_steps=None, best=best)

    def time_up(self) -> bool:
        """--time-limit has passed, by rank 0's clock (the same answer on every rank)."""
        return self.policy.time_up_at_epoch_end()

    def _save_state(self, partial_steps: int | None, best: bool = False, loss_sum: torch.Tensor | None = None,
                    seen: int = 0) -> None:
        ranks = capture(self.loader, key=self.key, device=self.device, world=self.world, loss_sum=loss_sum, seen=seen)
        self.save(self.state.to_checkpoint(ranks, partial_steps, self.config, self.made_by), best=best)
        self.policy.saved()

    def save(self, checkpoint: dict, best: bool = False) -> None:
        """last.pt (and best.pt) as `checkpoint` is now: a host copy staged here, written in the background."""
        if not self.writer.active:
            return
        self.writer.check()
        self.written.wait()  # the previous copy's buffers are about to be reused
        self.writer.check()
        staged = self.staging.stage(checkpoint)
        self.saves += 1
        kill = self.kill_in_write == self.saves
        self.written.clear()

        def job() -> None:  # in the writer's thread
            self.staging.wait()
            # last first, then best: a kill between the two is repaired on resume (repair).
            write_atomic(self.out / CKPT_LAST, lambda tmp: _write_then_maybe_die(staged, tmp, kill), make_parent=False)
            if best:  # the same file, not a second copy of it (the next last.pt is a new file)
                with self.writer.writing(self.out / CKPT_BEST):
                    link_or_copy(self.out / CKPT_LAST, self.out / CKPT_BEST)

        self.writer.in_background(self.out / CKPT_LAST, job, then=self.written.set)


def _write_then_maybe_die(state: dict, tmp: str, kill: bool) -> None:
    write(state, tmp)
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)


def repair(out: Path, saved: SavedRun) -> None:
    """A run folder after a kill: temporary files dropped, and best.pt made last.pt when the last epoch was the
    best and the kill fell between the two."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink()
    best = out / CKPT_BEST
    # (A mid-epoch last.pt was written after its epoch's best.pt had been made: nothing to repair.)
    if saved.partial_steps is None and saved.progress.last_epoch_was_best() and (
            not best.exists() or ModelCard.read(best).epoch != saved.card.epoch):
        link_or_copy(out / CKPT_LAST, best)


# --- the file -----------------------------------------------------------------------------------------------

class _File:
    """A file for torch.save that keeps the OSError of a failed write: torch's writer reports a full disk
    as its own RuntimeError ("enforce fail ... unexpected pos"), which names no cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write(obj: dict[str, Any], path: str | Path) -> None:
    """The checkpoint file itself (not atomic: Checkpointer.save writes it through atomic.write_atomic). A
    full disk is an OSError (ENOSPC), as for any other file. Through a Python file: of torch.save's ways to
    write (a path, a buffer, a file), the one that holds the GIL least (measured: about a tenth of its time),
    which matters in the writer's thread, beside the training thread."""
    with open(path, "wb") as f:
        out = _File(f)
        try:
            torch.save({"format": FORMAT, **obj}, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def copy(src: str | Path, dst: str | Path) -> None:
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """dst as the same file as src (a hard link: a checkpoint is written and fsynced once, not twice), or a
    copy where the file system has no hard links. The link is made under a temporary name and renamed over
    dst, so that a kill leaves the old dst or the new. src stays dst's bytes until dst is replaced: the
    next write of src is a new file renamed over src's name (atomic.write_atomic), not a write into it."""
    src, dst = Path(src), Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)  # only the name was wanted: os.link makes it
    try:
        os.link(src, tmp)
    except OSError:  # EPERM, EXDEV, ENOTSUP, EMLINK...: no hard link here
        copy(src, dst)
        return
    try:
        os.replace(tmp, dst)
        fsync_folder(dst.parent)
    finally:
        # (rename leaves both names where they already are the same file)
        if os.path.lexists(tmp):
            os.unlink(tmp)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run directory: its best checkpoint, the model of its best validated epoch. A
    run without one (stopped or still in its first epoch) is refused: its last.pt was never validated, and is
    used only when named."""
    p = Path(path)
    if p.is_dir():
        if (p / CKPT_BEST).is_file():
            return p / CKPT_BEST
        if (p / CKPT_LAST).is_file():
            raise DataError(f"{p}: no {CKPT_BEST} (no epoch of this run validated yet, or the file was removed: "
                            f"`dalipipe train --resume {p}` makes it again); to predict with its {CKPT_LAST} anyway, "
                            f"give {p / CKPT_LAST}")
        raise DataError(f"{p}: run directory holds no {CKPT_BEST} or {CKPT_LAST}")
    if not p.is_file():
        raise DataError(f"{p}: checkpoint not found")
    return p


# What torch.save writes begins with one of these: a zip archive (torch >= 1.6), or a bare pickle.
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def _not_a_checkpoint(p: Path, why: str) -> DataError:
    return DataError(f"{p}: not a dalipipe checkpoint ({why}); give a run folder or its best.pt or last.pt")


def load(path: str | Path) -> dict[str, Any]:
    p = resolve(path)
    with open(p, "rb") as f:
        head = f.read(4)
    if not head.startswith(_TORCH_FILE_STARTS):
        raise _not_a_checkpoint(p, "not a file that torch.save wrote")
    try:
        # weights_only: a checkpoint is plain data (tensors, numbers, strings, lists, dicts). A pickle that
        # needs anything else could run code on load, and checkpoints are shared between people.
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # a damaged or foreign file, not a dangerous one
            raise _not_a_checkpoint(p, "its data does not read as a checkpoint's") from None
        raise DataError(f"{p}: refused: the file holds more than plain data (tensors, numbers, strings), so "
                        "loading it could run code; a dalipipe checkpoint never does") from None
    except Exception as e:
        raise _not_a_checkpoint(p, f"unreadable: {type(e).__name__}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise _not_a_checkpoint(p, "a torch file of something else")
    return ck
