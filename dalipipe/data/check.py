"""`dalipipe check`: the data validation of a run, alone, and what a run would use."""

from __future__ import annotations

import unicodedata

from dalipipe.constants import CHANNELS
from dalipipe.data.decoded_store import store_place
from dalipipe.data.index import LabelMap, build_index, inspect_images
from dalipipe.data.split import stratified_split
from dalipipe.data.stats import channel_stats
from dalipipe.settings import CheckSettings


def display_width(text: str) -> int:
    """Columns a terminal gives the text: two for wide (CJK) characters, none for combining marks."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def summarize(cfg: CheckSettings) -> list[str]:
    """Lines to print; raises DataError (the same one-line errors as train and predict) on the first problem."""
    images_dir, labels_csv = cfg.images_dir, cfg.labels_csv
    index = inspect_images(build_index(images_dir, labels_csv), cache=cfg.check_cache,
                           store=store_place(cfg, required=True))
    sizes = (index["width"].astype(str) + "x" + index["height"].astype(str)).value_counts()
    size_text = ", ".join(f"{s} ({n})" for s, n in sizes.head(5).items()) + (
        f" and {len(sizes) - 5} other sizes" if len(sizes) > 5 else "")
    lines = [f"{images_dir}: {len(index)} samples with all three channels; sizes {size_text}"]
    if labels_csv is None:
        norm = channel_stats(index)
    else:
        names = LabelMap.from_labels(index["cell_line"]).names
        counts = index["cell_line"].value_counts()
        width = max(display_width(n) for n in names)
        lines.append(f"{labels_csv}: {len(names)} classes")
        lines += [f"  {n}{' ' * (width - display_width(n))}  {counts[n]:>6}  {100 * counts[n] / len(index):5.1f}%"
                  for n in names]
        train_df, val_df = stratified_split(index, cfg.val_fraction, cfg.seed)
        norm = channel_stats(train_df)
        lines.append(f"a run would train on {len(train_df)} and validate on {len(val_df)} samples "
                     f"(--val-fraction {cfg.val_fraction}, --seed {cfg.seed}); normalization from the training split:")
    lines += [f"  {c:<6} mean {m:6.2f}  std {s:6.2f}" for c, m, s in zip(CHANNELS, norm.mean, norm.std)]
    lines.append("no problems found")
    return lines
