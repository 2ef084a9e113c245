"""Self-describing checkpoints, written atomically (temporary file, fsync, rename)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from dalipipe.constants import CKPT_BEST, CKPT_LAST
from dalipipe.errors import DataError

FORMAT = "dalipipe-checkpoint-1"


def ensure_writable(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and prove that a file can be written there, before any long work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DataError(f"{folder}: cannot write the {what} there ({e.strerror or type(e).__name__})") from None
    return folder


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) and rename it over path: a kill at any moment leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates the file 0600; outputs follow the user's umask like any other file.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(obj: dict[str, Any], path: str | Path) -> None:
    write_atomic(path, lambda tmp: torch.save({"format": FORMAT, **obj}, tmp))


def copy(src: str | Path, dst: str | Path) -> None:
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def save_json(obj: Any, path: str | Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    write_atomic(path, write)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its best checkpoint, else its last)."""
    p = Path(path)
    if p.is_dir():
        for name in (CKPT_BEST, CKPT_LAST):
            if (p / name).is_file():
                return p / name
        raise DataError(f"{p}: run directory holds no {CKPT_BEST} or {CKPT_LAST}")
    if not p.is_file():
        raise DataError(f"{p}: checkpoint not found")
    return p


def load(path: str | Path) -> dict[str, Any]:
    p = resolve(path)
    try:
        # weights_only: a checkpoint is plain data (tensors, numbers, strings, lists, dicts). A pickle that
        # needs anything else could run code on load, and checkpoints are shared between people.
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{p}: refused: the file holds more than plain data (tensors, numbers, strings), so "
                        "loading it could run code; a dalipipe checkpoint never does") from None
    except Exception as e:
        raise DataError(f"{p}: cannot read checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise DataError(f"{p}: not a dalipipe checkpoint")
    return ck
