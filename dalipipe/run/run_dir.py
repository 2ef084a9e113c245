"""The run folder's rules: one run at a time, writable before any long work, resume settings checked,
and repaired after a kill."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

from dalipipe import atomic, checkpoint
from dalipipe import device as dev
from dalipipe import distributed
from dalipipe.checkpoint import ModelCard, SavedRun
from dalipipe.config import (RESUME_MAY_CHANGE, TRAIN_OPTIONS, AugmentSpec, TrainConfig, check_store_option,
                             may_change_text)
from dalipipe.config import spelling as option
from dalipipe.constants import CKPT_LAST, CONFIG_FILE, LOCK_FILE, METRICS_FILE
from dalipipe.errors import DataError
from dalipipe.options import spoken
from dalipipe.run.run_recorder import metrics_text

log = logging.getLogger("dalipipe")

@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[None]:
    """Hold the run folder for the life of a run. An OS lock, released by the OS when the process ends,
    however it ends, so that a kill never leaves a stale lock behind. A POSIX record lock (lockf), not
    flock: flock's lock is shared with forked children (loader workers), which can outlive a killed run
    by seconds and would keep its folder locked against the resume."""
    folder = Path(folder)
    with open(folder / LOCK_FILE, "a") as f:
        if not _try_lock(f):
            raise DataError(f"{folder}: another dalipipe train is running in this folder; wait for it to end "
                            "or choose another --out")
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def held_by_another_run(folder: Path) -> bool:
    """Whether another process holds the folder's run lock. Only where this process does not hold it: a
    POSIX lock is the process's, and closing any descriptor of the file would release it."""
    if not (folder / LOCK_FILE).exists():
        return False
    with open(folder / LOCK_FILE, "a") as f:
        if not _try_lock(f):
            return True
        fcntl.lockf(f, fcntl.LOCK_UN)
    return False


def _try_lock(f) -> bool:
    """Take the run lock on the open lock file; False where another process holds it."""
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        return False
    return True


def check_run_dir(out: Path, resume: bool, holding_lock: bool = False) -> None:
    has_run = (out / CKPT_LAST).exists() or (out / METRICS_FILE).exists()
    if has_run and not resume:
        raise DataError(f"{out}: already holds a run; continue it with --resume {out} or choose another --out")
    if resume and not (out / CKPT_LAST).exists():
        if not holding_lock and held_by_another_run(out):
            raise DataError(f"{out}: another dalipipe train is running in this folder and has not saved its first "
                            "checkpoint yet; wait for it to end, then resume")
        raise DataError(f"{out}: no {CKPT_LAST} to resume from")


def repair_run_dir(out: Path, saved: SavedRun) -> None:
    """After a kill: the checkpoints repaired (checkpoint.repair), and the metrics file rewritten from the
    checkpoint's history (a kill can fall between the two)."""
    checkpoint.repair(out, saved)
    lines = metrics_text(saved.progress.history)
    atomic.write_atomic(out / METRICS_FILE, lambda tmp: Path(tmp).write_text(lines))


def resume_point(card: ModelCard) -> str:
    """Where a checkpoint resumes, in the words of the progress bar (epochs and steps from 1)."""
    if card.partial_steps:
        return f"resumed at epoch {card.epoch + 1}, after step {card.partial_steps}"
    return f"resumed after epoch {card.epoch}"


def interrupt_hint(out: Path) -> str:
    """What is true when Ctrl-C stops a train command: the last checkpoint, if any, is complete."""
    if (out / CKPT_LAST).exists():
        return f"{out / CKPT_LAST} is complete; continue with: dalipipe train --resume {out}"
    return "no checkpoint was written yet; run the same command again to start over"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def resume_config(resume_dir: str, given: dict[str, Any], images_dir: str | None, labels_csv: str | None,
                  out_dir: str | None) -> TrainConfig:
    """The run's own config, with what may change changed. The same command given again with --resume
    added is accepted; a different value for a fixed setting is refused, naming both values."""
    run = Path(resume_dir)
    if out_dir is not None and Path(out_dir).resolve() != run.resolve():
        raise DataError(f"--resume {run} --out {out_dir}: a resumed run stays in its own folder; "
                        "drop --out (or give the same folder)")
    check_run_dir(run, resume=True)
    # The time limit was the earlier command's (its job's slot): this one has its own, or none.
    card = ModelCard.read(run / CKPT_LAST)
    cfg = dataclasses.replace(TrainConfig.from_dict(card.config), time_limit_minutes=None)
    if given.get("epochs", cfg.epochs) < card.epoch:  # the run's config would then say less than it did
        raise DataError(f"--resume {run} --epochs {given['epochs']}: the run has trained {card.epoch} epochs "
                        "already; give more to train more")
    fixed = {k: v for k, v in given.items() if k not in RESUME_MAY_CHANGE}
    current = {**dataclasses.asdict(cfg), "image_size": cfg.augment.image_size}
    for name, value in fixed.items():
        if name == "weights":
            value = str(Path(value).resolve())
        if not _same(current[name], value):
            raise DataError(f"--resume {run}: {option(name)} is {spoken(current[name])} in the run, got {spoken(value)}; "
                            f"only {may_change_text().replace('`', '')} may change")
    changes = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    if changes.get("store"):
        changes["store"] = str(Path(changes["store"]).expanduser().resolve())
    # Moved data: new paths are accepted; training checks that classes and split are the run's.
    if images_dir:
        changes["images_dir"] = str(Path(images_dir).resolve())
    if labels_csv:
        changes["labels_csv"] = str(Path(labels_csv).resolve())
    warn_if_config_edited(run, card.config)
    return fit_to_device(dataclasses.replace(cfg, out_dir=str(run.resolve()), **changes), given)


def check_data_is_there(cfg: TrainConfig) -> None:
    """A resumed run's data where the run says it is: if not, the data moved, and a resume can be told where."""
    for path, what in ((cfg.images_dir, "images folder"), (cfg.labels_csv, "labels file")):
        if not Path(path).exists():
            raise DataError(f"{path}: not found; it is the {what} of the run in {cfg.out_dir}; if the data moved, "
                            f"give its new place: dalipipe train --resume {cfg.out_dir} IMAGES_DIR LABELS_CSV")


def warn_if_config_edited(run: Path, saved: dict) -> None:
    """config.json is a record of the run's settings (written by each command), not read back: a resume takes
    the checkpoint's. One line when the file says otherwise, so that an edit is not silently undone."""
    try:
        on_disk = json.loads((run / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return
    saved = json.loads(json.dumps(saved))  # as the file writes it (tuples become lists)
    if not isinstance(on_disk, dict) or distributed.launched_rank() != 0:
        return
    # Only what no command changes: each command writes the file at its start, with what it may change
    # (--epochs, moved data, ...) before its first checkpoint records them; and a key one release lacks
    # (a run of an older dalipipe) is no edit.
    may_differ = set(RESUME_MAY_CHANGE) | {"images_dir", "labels_csv", "out_dir"}
    names = sorted(k for k in set(on_disk) & set(saved) if k not in may_differ and on_disk[k] != saved[k])
    if not names:
        return
    log.warning(f"warning: {run / CONFIG_FILE} differs from the run's checkpoint ({', '.join(names)}); it is a "
                "record of the settings, not read back: the checkpoint's are used and the file is written again; "
                "to change a setting, give its option with --resume")


def fit_to_device(cfg: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """A run resumed without a GPU keeps only the settings of its own that this command can honour: the
    run's GPU-only ones (the table's gpu_values) are dropped, back to their defaults, with one line saying
    so. Given again in this command, they are checked as for a new run (a one-line error where they cannot
    apply)."""
    kind = dev.resolve(cfg.device).type
    if kind == "cuda":
        return cfg
    dropped, changes = [], {}
    for o in TRAIN_OPTIONS:
        value = getattr(cfg, o.name, None)
        if o.name in given or value not in o.spec.gpu_values:
            continue
        dropped.append(o.flag if o.type is bool else f"{o.flag} {value}")
        changes[o.name] = o.default
    if dropped and distributed.launched_rank() == 0:  # one voice under torchrun
        log.warning(f"warning: this run was started with {' and '.join(dropped)}, which need"
                    f"{'s' if len(dropped) == 1 else ''} a GPU; resumed on {kind} without "
                    f"{'it' if len(dropped) == 1 else 'them'}")
    return dataclasses.replace(cfg, **changes)


def new_config(images_dir: str, labels_csv: str, out_dir: str, given: dict[str, Any]) -> TrainConfig:
    """A new run's config, with every path stored resolved, so that the run resumes from any folder."""
    given = dict(given)
    if "folds" in given and "val_fraction" in given:
        raise DataError("--folds and --val-fraction exclude each other: with --folds K, fold I of K is the "
                        "validation split")
    image_size = given.pop("image_size", None)
    if given.get("weights"):
        given["weights"] = str(Path(given["weights"]).resolve())
    check_store_option(given.get("store"), given.get("decode_once"))
    if given.get("store"):
        given["store"] = str(Path(given["store"]).expanduser().resolve())
    augment = AugmentSpec() if image_size is None else AugmentSpec(image_size=image_size)
    return TrainConfig(images_dir=str(Path(images_dir).resolve()), labels_csv=str(Path(labels_csv).resolve()),
                       out_dir=str(Path(out_dir).resolve()), augment=augment, **given)
