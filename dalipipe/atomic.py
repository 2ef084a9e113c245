"""Files written so that a kill at any moment leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from dalipipe.errors import DataError


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


def write_atomic(path: str | Path, write: Callable[[str], None], make_parent: bool = True,
                 replace: bool = True) -> None:
    """Call write(tmp_path) and rename it over path: a kill at any moment leaves the old file or the new.
    make_parent=False: a missing folder is an error (a run folder removed mid-run is not made again).
    replace=False: FileExistsError if path exists when the file is complete, even if it was made since
    the caller checked (another command writing the same file): theirs is left as it is."""
    path = Path(path)
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates the file 0600; outputs follow the user's umask like any other file.
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _move_new(tmp, path)
        fsync_folder(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_folder(folder: Path) -> None:
    """Make the rename itself durable: until the folder's entry is on disk, a power loss can bring back the
    old file (or none) although the new one's bytes were synced."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform or file system that cannot open a folder (Windows): nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder (EINVAL): the rename is as durable as they allow
        pass
    finally:
        os.close(fd)


def _move_new(tmp: str, path: Path) -> None:
    """Rename tmp to path unless path exists; checking and renaming in one step (a hard link), since a
    check before a rename leaves a moment in which another command's file would be replaced."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT): reserve the name, then rename onto it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def refuse_existing(path: str | Path, force: bool) -> None:
    """A command's --out: refused if it exists, unless --force. Checked before any long work, and again
    by write_output once the file is complete."""
    if not force and Path(path).exists():
        raise _exists(path)


def write_output(path: str | Path, write: Callable[[str], None], force: bool) -> None:
    """write_atomic for a command's --out: without force, it never replaces a file, not even one that
    another command wrote after refuse_existing passed."""
    try:
        write_atomic(path, write, replace=force)
    except FileExistsError:
        raise _exists(path) from None


def _exists(path: str | Path) -> DataError:
    return DataError(f"{path}: exists; choose another --out or pass --force to replace it")


def write_file(path: str, render: Callable[..., None], *args: Any) -> None:
    """render(*args, tmp_path), renamed over path; the folder must exist. A job that a worker process can
    run: every argument is picklable."""
    write_atomic(path, lambda tmp: render(*args, tmp), make_parent=False)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(obj: Any, path: str | Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    write_atomic(path, write)
