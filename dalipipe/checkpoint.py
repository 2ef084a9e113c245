"""Self-describing checkpoints, written atomically, loaded as plain data only."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dalipipe.atomic import fsync_folder, write_atomic
from dalipipe.constants import CKPT_BEST, CKPT_LAST
from dalipipe.errors import DataError

FORMAT = "dalipipe-checkpoint-1"


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
    """The checkpoint file itself (not atomic: the run recorder writes it through atomic.write_atomic). A
    full disk is an OSError (ENOSPC), as for any other file. Through a Python file: of torch.save's ways to
    write (a path, a buffer, a file), the one that holds the GIL least (measured: about a tenth of its time),
    which matters in the recorder's thread, beside the training thread."""
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
