"""The data index: scan a folder of channel PNGs and a labels CSV, validate them, split, and measure.

The index is one pandas DataFrame, one row per sample:
    file_id, path_yellow, path_red, path_blue, height, width, [cell_line, y]
plus per-channel pixel sums used for the normalization statistics. Every check raises DataError with a
one-line message that names the file or CSV line, so that the CLI can stop before any pipeline is built
(a corrupt PNG inside a DALI pipeline kills the pipeline with a long C++ trace).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dalipipe.child_processes import worker_pool
from dalipipe.constants import CHANNELS, FILE_REGEX
from dalipipe.data.check_cache import CheckCache, file_signature
from dalipipe.data.csv_files import read_labels
from dalipipe.data.decoded_store import DecodedStore, Place, disk_bytes, inspect_and_store, size_text
from dalipipe.data.pngio import inspect_sample, png_shape
from dalipipe.errors import DataError
from dalipipe.progress import quiet_unless

log = logging.getLogger("dalipipe")

PATH_COLUMNS = [f"path_{c}" for c in CHANNELS]
# Per-sample mean and mean square of each channel: statistics weight every sample equally, so that one
# huge image cannot outweigh thousands of small ones.
MEAN_COLUMNS = [f"mean_{c}" for c in CHANNELS]
MEANSQ_COLUMNS = [f"meansq_{c}" for c in CHANNELS]
# Where the decoded store holds each sample's pixels (decoded_store.py), when the check built one: the loaders
# read these files instead of decoding the PNGs.
STORE_COLUMN = "store_file"
# A sample with this many times the median pixel count is called out by name (it is still used).
LARGE_IMAGE_FACTOR = 16


@dataclass(frozen=True)
class LabelMap:
    """Class name <-> integer, sorted by name; saved with every run and used to decode predictions."""

    names: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels: pd.Series) -> "LabelMap":
        return cls(tuple(sorted(set(labels))))

    def encode(self, labels: pd.Series) -> np.ndarray:
        lookup = {n: i for i, n in enumerate(self.names)}
        return labels.map(lookup).to_numpy(dtype=np.int64)

    def decode(self, ys) -> list[str]:
        return [self.names[int(y)] for y in ys]


def scan_images(images_dir: str | Path, skip_incomplete: bool = False) -> pd.DataFrame:
    """One row per sample id found in `images_dir`. A sample without all three channels is an error,
    or, with skip_incomplete (prediction), left out with a warning that names it."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    rx = re.compile(FILE_REGEX)
    found: dict[int, dict[str, str]] = {}
    for name in os.listdir(root):
        m = rx.match(name)
        if m is None or m["channel"] not in CHANNELS:
            continue
        chans = found.setdefault(int(m["file_id"]), {})
        if m["channel"] in chans:
            raise DataError(f"{root / name}: sample {int(m['file_id'])} has two {m['channel']} files "
                            f"({Path(chans[m['channel']]).name} and {name}); keep one")
        chans[m["channel"]] = str(root / name)
    if not found:
        raise DataError(f"{root}: no channel PNGs named like 00001_blue.png")
    rows, incomplete = [], []
    for fid in sorted(found):
        chans = found[fid]
        missing = [c for c in CHANNELS if c not in chans]
        if missing:
            stem = Path(next(iter(chans.values()))).name.split("_")[0]
            incomplete.append(f"{root / f'{stem}_{missing[0]}.png'}: missing channel file for sample {fid} "
                              f"(found {', '.join(sorted(chans))})")
            continue
        rows.append([fid] + [chans[c] for c in CHANNELS])
    if incomplete and not skip_incomplete:
        raise DataError(incomplete[0])
    if incomplete:
        log.warning(f"warning: {len(incomplete)} incomplete sample(s) left out, e.g. {incomplete[0]}")
    if not rows:
        raise DataError(f"{root}: no sample has all three channels ({', '.join(CHANNELS)})")
    return pd.DataFrame(rows, columns=["file_id"] + PATH_COLUMNS)


def build_index(images_dir: str | Path, labels_csv: str | Path | None = None) -> pd.DataFrame:
    """Scan images and join labels. Labels without images fail; images without labels are dropped
    with a warning. Classes with fewer than 2 samples fail (a stratified split cannot hold them)."""
    images = scan_images(images_dir)
    if labels_csv is None:
        return images
    labels = read_labels(labels_csv)
    merged = labels.merge(images, on="file_id", how="left", indicator=True)
    orphans = merged[merged["_merge"] == "left_only"]
    if len(orphans):
        row = orphans.iloc[0]
        raise DataError(
            f"{labels_csv}:{row.csv_line}: file_id {row.file_id} has no images in {images_dir} "
            f"({len(orphans)} labelled id(s) without images in all)"
        )
    unlabelled = len(images) - len(labels)
    if unlabelled > 0:
        log.warning(f"warning: {unlabelled} sample(s) in {images_dir} have no label in {labels_csv}; ignored")
    counts = labels["cell_line"].value_counts()
    if len(counts) < 2:
        raise DataError(f"{labels_csv}: every sample is labelled '{counts.index[0]}'; a classifier needs at least "
                        "two classes")
    small = counts[counts < 2]
    if len(small):
        name = small.index[0]
        line = labels.loc[labels["cell_line"] == name, "csv_line"].iloc[0]
        raise DataError(
            f"{labels_csv}:{line}: class '{name}' has {small.iloc[0]} sample(s); "
            "every class needs at least 2 for a stratified split"
        )
    merged = merged.drop(columns=["_merge", "csv_line"]).sort_values("file_id").reset_index(drop=True)
    merged["y"] = LabelMap.from_labels(merged["cell_line"]).encode(merged["cell_line"])
    return merged


# Below this many samples to check, a process pool costs more to start than it saves.
PARALLEL_FROM = 500


def inspect_images(index: pd.DataFrame, workers: int | None = None, progress: bool = True, cache: bool = True,
                   parallel_from: int = PARALLEL_FROM, store: Place | str | Path | None = None) -> pd.DataFrame:
    """Decode every PNG once, check that it decodes and that the channels of each sample agree in size;
    add height, width and per-channel means. Samples checked before and unchanged since (check_cache)
    are not decoded again; the others are checked on all cores, in processes (decoding here is bound by
    Python and the GIL: threads were slower than one loop). The first bad sample, in index order,
    raises its one-line DataError, whatever the number of processes.

    store: where the decoded store lives (decoded_store.store_place; a folder: required there), or None for no
    store. With one, every sample not in the store yet is decoded (checked again, if the check remembered it)
    and written there, and STORE_COLUMN names each sample's file; one line says how big the store is and how
    much of it is written now (when progress is on). A store its disk cannot hold is refused before anything is
    decoded, or, in a place not required, left out with one line."""
    paths = index[PATH_COLUMNS].values.tolist()
    memory = CheckCache(Path(paths[0][0]).parent) if cache and paths else None
    place = store if isinstance(store, Place) or store is None else Place(Path(store))
    decoded = DecodedStore(place.root, Path(paths[0][0]).parent) if place is not None and paths else None
    signatures = [file_signature(p) for p in paths] if memory or decoded else [None] * len(paths)
    results = [memory.get(p, sig) if memory else None for p, sig in zip(paths, signatures)]
    files = [decoded.file_for(p, sig) for p, sig in zip(paths, signatures)] if decoded else [None] * len(paths)
    # (height, width) where the check remembers it, else from the PNG's header: the store's size before decoding
    # (without a store nothing needs it, and each header read is a file opened)
    shapes = [r[:2] if r else png_shape(p[0]) or (0, 0) for r, p in zip(results, paths)] if decoded else []
    # Without the check's memory (--no-cache) every file is written again: the decode is paid for anyway, and
    # it repairs a file that a crash of the machine left of the right size with the wrong bytes.
    to_store = {i for i, f in enumerate(files) if f is not None and not (cache and DecodedStore.holds(f, *shapes[i]))}
    if decoded and not _room_for(decoded, shapes, to_store, place.required, progress):
        decoded, files, to_store = None, [None] * len(paths), set()
    todo = [i for i, r in enumerate(results) if r is None or i in to_store]
    jobs = [(paths[i], files[i] if i in to_store else None) for i in todo]
    workers = workers or available_cores()
    bar = tqdm(total=len(todo), desc="checking images and storing them" if to_store else "checking images", unit="sample",
               leave=False, **quiet_unless(progress and bool(todo)))
    try:
        if len(todo) < parallel_from or workers == 1:
            for i, r in zip(todo, map(_check, jobs)):
                results[i] = r
                bar.update()
        else:
            pool = worker_pool(min(workers, len(todo)))  # they only decode with PIL and numpy
            try:
                chunk = max(1, min(256, len(todo) // (4 * workers)))
                for i, r in zip(todo, pool.map(_check, jobs, chunksize=chunk)):
                    results[i] = r
                    bar.update()
            except BaseException:  # a bad file or Ctrl-C: stop now, not after every queued chunk
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    finally:
        bar.close()
        if memory:  # what passed is remembered, even when a later sample failed
            for i in todo:
                if results[i] is not None:
                    memory.put(paths[i], results[i], signatures[i])
            memory.save()
    out = index.copy()
    out["height"] = [r[0] for r in results]
    out["width"] = [r[1] for r in results]
    for k in range(len(CHANNELS)):
        out[MEAN_COLUMNS[k]] = [r[2 + k] for r in results]
        out[MEANSQ_COLUMNS[k]] = [r[2 + len(CHANNELS) + k] for r in results]
    if decoded:
        out[STORE_COLUMN] = files
        decoded.sweep(files)
    warn_large_images(out)
    return out


def _check(job: tuple[list[str], str | None]) -> tuple:
    """One sample's check, and its store file written where one is named (in the check's worker processes)."""
    paths, file = job
    return inspect_sample(paths) if file is None else inspect_and_store(job)


def _room_for(store: DecodedStore, shapes: list[tuple[int, int]], to_store: set[int], required: bool,
              say: bool) -> bool:
    """Before any decoding: whether the store can hold what is to be written (if not: a one-line refusal where
    it is required, else False and one line saying so), and one line saying what it holds and what is written
    to it now."""
    total = sum(disk_bytes(*s) for s in shapes)
    needed = sum(disk_bytes(*shapes[i]) for i in to_store)
    problem = store.room_problem(needed) if to_store else None
    if problem and required:
        raise DataError(f"{problem[0]}; give --store DIR {problem[1]}, or --no-decode-once to decode the PNGs each "
                        "time")
    if problem:
        if say:
            log.warning(f"warning: {problem[0]}: decoding the PNGs each time instead (--store DIR puts the store "
                        f"{problem[1]})")
        return False
    if say:
        n = len(shapes)
        if to_store:
            log.info(f"decoded store {store.dir}: decoding {len(to_store)} of {n} samples into it "
                     f"({size_text(needed)}; {size_text(total)} in all), read from there from now on")
        else:
            log.info(f"decoded store {store.dir}: all {n} samples there ({size_text(total)}); no PNG is decoded")
    return True


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def warn_large_images(index: pd.DataFrame) -> None:
    """One line naming the samples far larger than the rest: usually a stray file (a whole slide, a
    mosaic), which decodes slowly, costs memory, and is shrunk to the model's input like the others."""
    pixels = index["height"] * index["width"]
    large = index[pixels > LARGE_IMAGE_FACTOR * pixels.median()]
    if len(large):
        names = ", ".join(f"{Path(p).name} ({w}x{h})" for p, w, h in
                          zip(large[PATH_COLUMNS[0]][:3], large["width"][:3], large["height"][:3]))
        more = f" and {len(large) - 3} more" if len(large) > 3 else ""
        log.warning(f"warning: {len(large)} sample(s) over {LARGE_IMAGE_FACTOR}x the median size "
                    f"({int(index['width'].median())}x{int(index['height'].median())}): {names}{more}")
