"""Self-describing checkpoints, written atomically, loaded as plain data only."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from dalipipe.atomic import write_atomic
from dalipipe.constants import CKPT_BEST, CKPT_LAST
from dalipipe.errors import DataError

FORMAT = "dalipipe-checkpoint-1"


def save(obj: dict[str, Any], path: str | Path) -> None:
    write_atomic(path, lambda tmp: torch.save({"format": FORMAT, **obj}, tmp))


def copy(src: str | Path, dst: str | Path) -> None:
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


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
