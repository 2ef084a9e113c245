"""The data index: scan a folder of channel PNGs and a labels CSV, validate them, split, and measure.

The index is one pandas DataFrame, one row per sample:
    file_id, path_yellow, path_red, path_blue, height, width, [cell_line, y]
plus per-channel pixel sums used for the normalization statistics. Every check raises DataError with a
one-line message that names the file or CSV line, so that the CLI can stop before any pipeline is built
(a corrupt PNG inside a DALI pipeline kills the pipeline with a long C++ trace).
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dalipipe.config import Normalization
from dalipipe.constants import CHANNELS, FILE_REGEX, LABEL_COLUMNS
from dalipipe.progress import quiet_unless
from dalipipe.errors import DataError
from dalipipe.check_cache import CheckCache
from dalipipe.child_processes import worker_pool
from dalipipe.pngio import inspect_sample

log = logging.getLogger("dalipipe")

PATH_COLUMNS = [f"path_{c}" for c in CHANNELS]
# Per-sample mean and mean square of each channel: statistics weight every sample equally, so that one
# huge image cannot outweigh thousands of small ones.
_MEAN_COLUMNS = [f"mean_{c}" for c in CHANNELS]
_MEANSQ_COLUMNS = [f"meansq_{c}" for c in CHANNELS]
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


def read_csv_columns(csv_path: str | Path, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    """The one reader of every CSV dalipipe reads (labels, answers, submissions, --ids): the named columns,
    found by name in any order (other columns are ignored), as stripped strings, plus `csv_line`: the line
    where each row starts as an editor numbers it (blank lines and line breaks inside quoted fields count).
    UTF-8 only, with or without a byte-order mark: any other encoding would read some names wrong without a
    word (Excel's "CSV" on Windows is cp1252), so it is refused naming the line and the fix. Blank lines and
    rows of empty fields (which spreadsheets write) are skipped."""
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    data = path.read_bytes()
    bom = codecs.BOM_UTF8 if data.startswith(codecs.BOM_UTF8) else b""
    try:
        text = data[len(bom):].decode("utf-8")
    except UnicodeDecodeError as e:
        at = len(bom) + e.start
        line = len(re.findall(rb"\r\n|\r|\n", data[:at])) + 1  # the line breaks the csv reader splits at
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[at]:02x} at offset {at}); save it as UTF-8 "
                        "(in Excel: Save As, CSV UTF-8)") from None
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    rows, start = [], 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: malformed CSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: {what} is empty")
    header = [c.strip() for c in rows[0][1]]
    missing = [c for c in columns if c not in header]
    if missing:
        article = "an" if what[0] in "aeiou" else "a"
        raise DataError(f"{path}: no {' or '.join(repr(c) for c in missing)} column ({article} {what} needs "
                        f"{' and '.join(columns)}; other columns are ignored), got '{','.join(header)}'")
    twice = [c for c in columns if header.count(c) > 1]
    if twice:
        raise DataError(f"{path}: two '{twice[0]}' columns")
    for line, fields in rows[1:]:
        if len(fields) != len(header):
            raise DataError(f"{path}:{line}: {len(fields)} fields, the header has {len(header)}")
    out = pd.DataFrame({c: [fields[header.index(c)].strip() for _, fields in rows[1:]] for c in columns}, dtype=object)
    out["csv_line"] = [line for line, _ in rows[1:]]
    if out.empty:
        raise DataError(f"{path}: {what} has a header but no rows")
    return out


def read_ids(csv_path: str | Path, what: str, columns: tuple[str, ...] = ("file_id",)) -> pd.DataFrame:
    """read_csv_columns, with file_id as integers, each once."""
    out = read_csv_columns(csv_path, columns, what)
    first_line: dict[int, int] = {}
    for fid, line in zip(out["file_id"], out["csv_line"]):
        # Digits only: int() would also take '+1', '1_000' and other spellings no file name has.
        if not re.fullmatch(r"[0-9]+", fid):
            raise DataError(f"{csv_path}:{line}: file_id '{fid}' is not an integer")
        n = int(fid)
        if n in first_line:
            raise DataError(f"{csv_path}:{line}: duplicate file_id {n} (first on line {first_line[n]})")
        first_line[n] = line
    out["file_id"] = list(first_line)
    return out


def read_labels(labels_csv: str | Path, what: str = "labels file") -> pd.DataFrame:
    """file_id, cell_line and csv_line of a labels file (or answers, or a submission), read by the rules
    of read_ids; every row needs a class name."""
    out = read_ids(labels_csv, what, LABEL_COLUMNS)
    empty = out[out["cell_line"] == ""]
    if len(empty):
        raise DataError(f"{labels_csv}:{empty.csv_line.iloc[0]}: empty cell_line for file_id {empty.file_id.iloc[0]}")
    return out


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
                   parallel_from: int = PARALLEL_FROM) -> pd.DataFrame:
    """Decode every PNG once, check that it decodes and that the channels of each sample agree in size;
    add height, width and per-channel means. Samples checked before and unchanged since (check_cache)
    are not decoded again; the others are checked on all cores, in processes (decoding here is bound by
    Python and the GIL: threads were slower than one loop). The first bad sample, in index order,
    raises its one-line DataError, whatever the number of processes."""
    paths = index[PATH_COLUMNS].values.tolist()
    memory = CheckCache(Path(paths[0][0]).parent) if cache and paths else None
    results = [memory.get(p) if memory else None for p in paths]
    todo = [i for i, r in enumerate(results) if r is None]
    workers = workers or available_cores()
    bar = tqdm(total=len(todo), desc="checking images", unit="sample", leave=False,
               **quiet_unless(progress and bool(todo)))
    try:
        if len(todo) < parallel_from or workers == 1:
            checked = (inspect_sample(paths[i]) for i in todo)
            for i, r in zip(todo, checked):
                results[i] = r
                bar.update()
        else:
            pool = worker_pool(min(workers, len(todo)))  # they only decode with PIL and numpy
            try:
                chunk = max(1, min(256, len(todo) // (4 * workers)))
                for i, r in zip(todo, pool.map(inspect_sample, [paths[i] for i in todo], chunksize=chunk)):
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
                    memory.put(paths[i], results[i])
            memory.save()
    out = index.copy()
    out["height"] = [r[0] for r in results]
    out["width"] = [r[1] for r in results]
    for k in range(len(CHANNELS)):
        out[_MEAN_COLUMNS[k]] = [r[2 + k] for r in results]
        out[_MEANSQ_COLUMNS[k]] = [r[2 + len(CHANNELS) + k] for r in results]
    warn_large_images(out)
    return out


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


def split_problem(class_counts: pd.Series, val_fraction: float) -> str | None:
    """Why samples with these class counts (indexed by class name) cannot be split, stratified, with this
    validation share; None when they can. scikit-learn's rules: every class needs 2 samples, and each part
    (ceil(val_fraction x n) held out, the rest kept) at least one sample of each class."""
    small = class_counts[class_counts < 2]
    if len(small):
        names = ", ".join(f"'{name}' ({count})" for name, count in small.items())
        return f"classes with fewer than 2 samples: {names}"
    n, k = int(class_counts.sum()), len(class_counts)
    n_val = math.ceil(val_fraction * n)
    if min(n_val, n - n_val) < k:
        return (f"--val-fraction {val_fraction} holds out {n_val} and keeps {n - n_val}; each part needs at least one "
                f"sample of each of the {k} classes")
    return None


def stratified_split(index: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded stratified train/validation split; both parts sorted by file_id."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    problem = split_problem(index.groupby("cell_line").size(), val_fraction)
    if problem:
        raise DataError(f"cannot split {len(index)} samples for training and validation: {problem}")
    train, val = train_test_split(index, test_size=val_fraction, random_state=seed, stratify=index["y"])
    return train.sort_values("file_id").reset_index(drop=True), val.sort_values("file_id").reset_index(drop=True)


def kfold_split(index: pd.DataFrame, folds: int, fold: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified k-fold: (the other folds, fold `fold` of `folds`, counted from 1), both sorted by file_id.
    The same folds for the same samples, seed and scikit-learn release (its algorithm changed in 0.22:
    a run records its split's ids, and a resume checks them)."""
    from sklearn.model_selection import StratifiedKFold

    counts = index.groupby("cell_line").size()
    small = counts[counts < folds]
    if len(small):
        names = ", ".join(f"'{name}' ({count})" for name, count in small.items())
        # scikit-learn only warns here, and then leaves folds without that class
        raise DataError(f"--folds {folds}: every class needs at least {folds} samples, one per fold; too few: {names}")
    index = index.sort_values("file_id").reset_index(drop=True)  # the folds depend on row order
    parts = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(index, index["y"]))
    train_rows, val_rows = parts[fold - 1]
    return index.iloc[train_rows].reset_index(drop=True), index.iloc[val_rows].reset_index(drop=True)


def _subset_counts(class_sizes: pd.Series, n: int) -> pd.Series:
    """Per class, the samples stratified_subset takes (n < the samples there are): n in all, each class
    its share of n rounded by largest remainder, and at least one of each class: a class whose share is
    under one gets one and the others share the rest (so below one per class, one per class). In
    integers, so that no float rounding decides."""
    left = {name: int(size) for name, size in class_sizes.items()}
    counts: dict = {}
    while left:
        m, total = n - len(counts), sum(left.values())
        small = [name for name, size in left.items() if size * m < total]
        if not small:
            share = {name: size * m // total for name, size in left.items()}
            # Ties (equal remainders) go to the larger class, then by name: the same subset every time.
            by_remainder = sorted(left, key=lambda name: (-(left[name] * m % total), -left[name], str(name)))
            for name in by_remainder[:m - sum(share.values())]:
                share[name] += 1
            counts.update(share)
            break
        for name in small:
            counts[name] = 1
            del left[name]
    return pd.Series([counts[name] for name in class_sizes.index], index=class_sizes.index)


def stratified_subset(index: pd.DataFrame, n: int, seed: int, val_fraction: float | None = None) -> pd.DataFrame:
    """n samples (all, when there are no more) in the class proportions of `index`, at least one of each
    class (see _subset_counts). With val_fraction, a subset too small to split is refused, naming what it
    gives and the smallest n that works."""
    if n >= len(index):
        return index
    sizes = index.groupby("cell_line").size()
    counts = _subset_counts(sizes, n)
    if val_fraction is not None:
        problem = split_problem(counts, val_fraction)
        if problem:
            smallest = next((m for m in range(n + 1, len(index) + 1)
                             if split_problem(_subset_counts(sizes, m), val_fraction) is None), None)
            hint = (f"the smallest --subset that can be split is {smallest}" if smallest
                    else "even all the labelled samples cannot be split")
            raise DataError(f"--subset {n} gives {int(counts.sum())} samples (at least one per class), too few to "
                            f"split: {problem}; {hint}")
    parts = [g.sample(n=int(counts[name]), random_state=seed) for name, g in index.groupby("cell_line")]
    return pd.concat(parts).sort_values("file_id").reset_index(drop=True)


def channel_stats(index: pd.DataFrame) -> Normalization:
    """Per-channel mean and std (0-255 scale) of the given samples (the training split), each sample
    weighted equally whatever its size (equal to per-pixel statistics when all images share a size)."""
    if _MEAN_COLUMNS[0] not in index:
        raise ValueError("channel_stats needs an index from inspect_images")
    mean = [float(index[c].mean()) for c in _MEAN_COLUMNS]
    var = [float(index[q].mean()) - m * m for q, m in zip(_MEANSQ_COLUMNS, mean)]
    # Floor at one grey level: a constant channel would otherwise divide by ~0.
    std = [float(max(np.sqrt(max(v, 0.0)), 1.0)) for v in var]
    return Normalization(tuple(float(m) for m in mean), tuple(std))
