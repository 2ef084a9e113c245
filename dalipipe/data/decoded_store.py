"""The decoded store: each checked sample decoded once, by the gray rule (pngio), into raw uint8 pixels on
local disk, which both loaders read in every epoch instead of decoding its three PNGs again.

Decoding is the one part of loading that no GPU takes over (DALI decodes PNG on CPU threads even with its
mixed decoder), and at 512 px it is most of the loaders' CPU time. The data check decodes every PNG anyway;
with the store it also writes the pixels, so that a run's first check is its only decode.

Layout: one folder per images folder, one .npy file per sample: (height, width, 3) uint8, the channels in
the model's order (yellow, red, blue). A file's name is the sample's id and a hash of where its pixels come
from: the images folder, the three files' names, sizes and modification times (the data check's rule of an
unchanged file, check_cache.file_signature) and the gray rule's version. A changed PNG, rule or folder
gives another name, so that a stale file is never read; it is removed when its sample is stored again.

A file is written under a temporary name and renamed once complete: a kill leaves a complete file or none
under the name a reader looks for, and a file of the wrong size (a crash of the machine) is written again.

Why one .npy per sample: DALI's numpy reader reads a list of them with the same shuffling, sharding and
checkpointing as its file reader (the same order: tests/test_decoded_store.py), numpy reads one in a call,
and a changed sample rewrites one small file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dalipipe.constants import STORE_RESERVE_BYTES
from dalipipe.data.check_cache import cache_dir, file_signature
from dalipipe.data.pngio import GRAY_RULE, read_sample, sample_stats
from dalipipe.errors import DataError

# Raise when the layout of a stored file changes.
STORE_FORMAT = 1
# What a file system rounds each file up to: the store's size on disk is counted in these.
BLOCK = 4096
SUFFIX = ".npy"


@dataclass(frozen=True)
class Place:
    """Where a command keeps its stores, and whether it must. A place the user chose (--store DIR, or check's
    --decode-once) that cannot hold the store is refused in one line; the default place then only says so in
    one line, and the command decodes the PNGs in every epoch as with --no-decode-once (a full or read-only
    cache folder must not stop a run that would work without the store)."""

    root: Path
    required: bool = True


def store_place(settings, required: bool = False) -> Place | None:
    """A command's place for its stores, from its settings' decode_once and store (train's, predict's,
    check's): --store DIR, else the user's cache folder (check_cache.cache_dir()/decoded), required there if
    `required`; None with --no-decode-once."""
    if not settings.decode_once:
        return None
    if settings.store:  # (a ~ the shell left alone is the home folder, not a folder named ~ here)
        return Place(Path(settings.store).expanduser())
    return Place(cache_dir() / "decoded", required)


@functools.lru_cache(maxsize=256)
def file_bytes(height: int, width: int) -> int:
    """The size of one sample's file: its .npy header and 3 * height * width pixels."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (height, width, 3)})
    return header.tell() + 3 * height * width


def disk_bytes(height: int, width: int) -> int:
    return -(-file_bytes(height, width) // BLOCK) * BLOCK


def size_text(n: float) -> str:
    """Bytes as a person reads them: 118 MB, 7.6 GB, 1.23 TB (three significant digits, the unit chosen after
    rounding: 999.6 MB is 1 GB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if float(f"{n / scale:.3g}") >= 1:
            return f"{float(f'{n / scale:.3g}'):g} {unit}"
    return f"{int(n)} bytes"


class DecodedStore:
    """The store of one images folder under `root`."""

    def __init__(self, root: str | Path, images_folder: str | Path):
        self.images_folder = str(Path(images_folder).resolve())
        # absolute, as every message names it
        self.dir = Path(root).expanduser().resolve() / hashlib.sha256(self.images_folder.encode()).hexdigest()[:20]

    def file_for(self, paths: list[str], signature: list[int] | None = None) -> str | None:
        """The file that holds this sample's pixels as its PNGs are now; None if one of them is missing.
        signature: the PNGs' file_signature, if the caller has it."""
        signature = signature or file_signature(paths)
        if signature is None:
            return None
        names = [os.path.basename(p) for p in paths]  # (strings, not Paths: this runs for every sample)
        key = json.dumps([STORE_FORMAT, GRAY_RULE, self.images_folder, names, signature])
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return os.path.join(self.dir, f"{names[0].split('_')[0]}-{digest}{SUFFIX}")

    @staticmethod
    def holds(file: str, height: int, width: int) -> bool:
        """Whether `file` is there, complete."""
        try:
            return os.stat(file).st_size == file_bytes(height, width)
        except OSError:
            return False

    def room_problem(self, needed: int) -> tuple[str, str] | None:
        """What keeps the folder from taking `needed` more bytes, in words, and where to put the store instead;
        None if nothing does (the folder is then made). Not writable, or the disk would keep less than
        STORE_RESERVE_BYTES free."""
        made = not self.dir.exists()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.dir):
                pass
        except OSError as e:
            return (f"{self.dir}: cannot write the decoded store there ({e.strerror or type(e).__name__})",
                    "in a folder you can write to")
        free = shutil.disk_usage(self.dir).free
        if needed + STORE_RESERVE_BYTES > free:
            if made:  # nothing of ours left behind by a refusal
                with contextlib.suppress(OSError):
                    self.dir.rmdir()
            return (f"{self.dir}: the decoded store needs {size_text(needed)} more, and its disk has "
                    f"{size_text(free)} free, less than that and the {size_text(STORE_RESERVE_BYTES)} it always "
                    "leaves free", "on a disk with room")
        return None

    def sweep(self, files: list[str]) -> None:
        """Remove what no reader may read any more: other versions of these samples (their PNGs changed) and
        the temporary files of writers that are no longer running (killed). Another command's store of other
        samples of the folder (a --subset run) is left alone."""
        current = set(files)
        stems = {_file_stem(f) for f in files}
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.dir, name)
            if name.endswith(SUFFIX):
                stale = path not in current and _file_stem(path) in stems
            else:  # name.npy.HOST.PID.tmp: only this machine's writers can be asked whether they still run
                parts = name.rsplit(".", 3)
                stale = (name.endswith(".tmp") and len(parts) == 4 and parts[1] == _HOST
                         and not _running(parts[2]))
            if stale:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _file_stem(file: str) -> str:
    """The sample's id as its file names spell it (00042 of 00042_yellow.png, and of 00042-<hash>.npy)."""
    return os.path.basename(file).rsplit("-", 1)[0]


# This machine, in the names of temporary files: a store on a file system that several machines share (a
# home folder over NFS) gets writers from each, whose process ids mean nothing on the others.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _running(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write(file: str, arrays: list[np.ndarray]) -> None:
    """One sample's channels as (height, width, 3) uint8, renamed into place once complete. Not synced to
    disk: a file cut short by a crash of the machine has the wrong size and is written again (holds), and
    --no-cache writes every file again. A write that fails (a disk filled since the room was checked) is a
    one-line DataError naming the file."""
    tmp = f"{file}.{_HOST}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.stack(arrays, axis=2))
        os.replace(tmp, file)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise DataError(f"{file}: cannot write the decoded store's file ({e.strerror or type(e).__name__}); "
                            "give --store DIR on a disk with room, or --no-decode-once") from None
        raise


def read(file: str) -> np.ndarray:
    """A sample's (3, height, width) uint8 pixels from its file; a DataError names a file that is gone."""
    try:
        return np.ascontiguousarray(np.load(file).transpose(2, 0, 1))
    except (OSError, ValueError) as e:
        raise _gone(file, str(e)) from None


def first_gone(files) -> DataError | None:
    """The error that names the first of `files` no longer there (deleted while a command read the store: the
    folder removed, or another command's sweep after a PNG changed), or None. DALI's reader reports it as a
    failed pipeline; this says which file and what to do."""
    for file in files:
        if not os.path.isfile(file):
            return _gone(file, "no such file")
    return None


def _gone(file: str, why: str) -> DataError:
    return DataError(f"{file}: the decoded store's file of this sample is gone or damaged ({why}); run the command "
                     "again, which stores it again")


def inspect_and_store(job: tuple[list[str], str]) -> tuple:
    """pngio.inspect_sample, also writing the decoded sample to its store file: the check's one decode."""
    paths, file = job
    arrays = read_sample(paths)
    write(file, arrays)
    return sample_stats(arrays)
