"""What the data check has already verified, remembered in the user's cache folder.

A sample's check (its three PNGs decode by the gray rule, agree in size; their means) is remembered
under the files' names, sizes and modification times: a file that changed in any of these is checked
again. One JSON file per images folder. Only samples that passed are remembered; errors are found again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dalipipe.atomic import save_json
from dalipipe.data.pngio import GRAY_RULE

# Raise when the check or what it records changes, so that older memories are not trusted.
CHECK_VERSION = 1


def cache_dir() -> Path:
    """$DALIPIPE_CACHE_DIR, else $XDG_CACHE_HOME/dalipipe, else ~/.cache/dalipipe."""
    if os.environ.get("DALIPIPE_CACHE_DIR"):
        return Path(os.environ["DALIPIPE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dalipipe"


def file_signature(paths: list[str]) -> list[int] | None:
    """What says that files are unchanged: their sizes and modification times (None if one is missing). The
    data check's memory and the decoded store both trust a file by this rule."""
    try:
        stats = [os.stat(p) for p in paths]
    except OSError:
        return None
    return [v for st in stats for v in (st.st_size, st.st_mtime_ns)]


class CheckCache:
    def __init__(self, folder: str | Path):
        self.folder = str(Path(folder).resolve())
        key = hashlib.sha256(self.folder.encode()).hexdigest()[:20]
        self.path = cache_dir() / "checked" / f"{key}.json"
        self.entries: dict[str, list] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
            # (a memory without the gray rule's version is of its first version)
            if (data.get("version") == CHECK_VERSION and data.get("gray_rule", 1) == GRAY_RULE
                    and data.get("folder") == self.folder):
                self.entries = data["entries"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # no memory yet, or an unreadable one: check everything

    @staticmethod
    def _key(paths: list[str]) -> str:
        return "|".join(os.path.basename(p) for p in paths)  # (not Path: its parsing was most of a warm check)

    def get(self, paths: list[str], signature: list[int] | None = None) -> tuple | None:
        """The remembered result of inspect_sample(paths), if none of the files changed since. signature: the
        files' file_signature, if the caller has it (one stat per file, not two)."""
        entry = self.entries.get(self._key(paths))
        if entry is None or entry[0] != (signature or file_signature(paths)):
            return None
        return tuple(entry[1])

    def put(self, paths: list[str], result: tuple, signature: list[int] | None = None) -> None:
        """Remember a check's result. signature: the files' file_signature taken before they were decoded, if
        the caller has it: a file changed during the decode then differs from it and is checked again."""
        sig = signature or file_signature(paths)
        if sig is not None:
            self.entries[self._key(paths)] = [sig, list(result)]
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            save_json({"version": CHECK_VERSION, "gray_rule": GRAY_RULE, "folder": self.folder,
                       "entries": self.entries}, self.path)
        except OSError:
            pass  # a read-only home costs only the speed-up
        self.dirty = False
