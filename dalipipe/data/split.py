"""The run's samples: a stratified subset, and the stratified split or k-fold split of them."""

from __future__ import annotations

import math

import pandas as pd

from dalipipe.errors import DataError


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
    """Seeded stratified train/validation split; both parts sorted by file_id. val_fraction: between 0 and 1,
    as the options table checks --val-fraction."""
    from sklearn.model_selection import train_test_split

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
