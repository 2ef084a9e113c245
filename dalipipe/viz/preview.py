"""`dalipipe preview`: a picture of what the loaders hand the model, beside the channels as stored.

One row per sample: the three stored channels in gray, then the RGB image each loader delivers (after
augmentation, resize and normalization), mapped back for display. It checks the data as `train` does (with
the same one-line errors), then builds a loader for just the samples shown: no model, a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dalipipe import atomic
from dalipipe import device as dev
from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
from dalipipe.data.index import build_index, inspect_images
from dalipipe.data.pngio import read_gray
from dalipipe.data.stats import channel_stats
from dalipipe.loading.loaders import make_loader
from dalipipe.settings import PreviewSettings
from dalipipe.viz import plots
from dalipipe.viz.display import display_images

# What each stored channel holds (the file name's colour is not the colour it is drawn in).
CHANNEL_MEANING = {"blue": "nucleus", "red": "microtubules", "yellow": "ER"}
STORED_ORDER = ("blue", "red", "yellow")


def pick_samples(index: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n samples drawn at random (all, if there are fewer): one of each class first (of n classes drawn at
    random, when there are more classes than n), then the rest at random, so roughly in the classes'
    proportions. By class, then id."""
    shuffled = index.sample(frac=1, random_state=seed)
    one_each = shuffled.drop_duplicates("cell_line")
    if n <= len(one_each):
        picked = one_each.sample(n, random_state=seed)
    else:
        picked = pd.concat([one_each, shuffled.drop(one_each.index).head(n - len(one_each))])
    return picked.sort_values(["cell_line", "file_id"]).reset_index(drop=True)


def loader_images(kind: str, samples: pd.DataFrame, *, spec: AugmentSpec, norm: Normalization, augment: bool,
                  device: torch.device, seed: int, workers: int | None) -> np.ndarray:
    """What one loader delivers for these samples, in their order, as uint8 RGB."""
    settings = LoaderSettings(kind=kind, batch_size=len(samples), workers=workers, seed=seed)
    loader = make_loader(samples, np.arange(len(samples)), spec=spec, norm=norm, train=augment, device=device,
                         settings=settings)
    try:
        batches = list(loader)
    finally:
        loader.close()
    images = np.concatenate([display_images(x, norm) for x, _ in batches])
    pos = torch.cat([p.cpu() for _, p in batches]).numpy()  # a training loader shuffles
    out = np.zeros_like(images)
    out[pos] = images
    return out


def preview(settings: PreviewSettings) -> dict:
    """Write the picture to settings.out_png; return what it shows: the samples' file ids, each loader's
    images and, with both loaders, the largest difference between them in gray levels."""
    s = settings
    images_dir, loader, n, augment, seed, image_size, force = (s.images_dir, s.loader, s.n, s.augment, s.seed,
                                                              s.image_size, s.force)
    out_path = Path(s.out_png)
    atomic.refuse_existing(out_path, force)
    atomic.ensure_writable(out_path.parent, "preview")
    spec = AugmentSpec(image_size=image_size)
    # Every image checked as `train` checks it (remembered for unchanged files: a second preview is quick),
    # and normalized with the statistics a run would use.
    index = inspect_images(build_index(images_dir, s.labels_csv), cache=s.check_cache)
    norm = channel_stats(index)
    samples = pick_samples(index, n, seed)
    torch_device = dev.resolve(s.device)
    kinds = ["dali", "torch"] if loader == "both" else [loader]
    delivered = {k: loader_images(k, samples, spec=spec, norm=norm, augment=augment, device=torch_device, seed=seed,
                                  workers=s.workers) for k in kinds}
    difference = None  # augmented, the two loaders draw differently: nothing to compare
    if len(kinds) == 2 and not augment:
        difference = int(np.abs(delivered["dali"].astype(int) - delivered["torch"].astype(int)).max())

    rows = []
    for i, sample in samples.iterrows():
        cells = [read_gray(sample[f"path_{c}"]) for c in STORED_ORDER] + [delivered[k][i] for k in kinds]
        rows.append((f"{sample['file_id']}\n{sample['cell_line']}", cells))
    titles = [f"{c}\n{CHANNEL_MEANING[c]}" for c in STORED_ORDER] + [f"{k} loader\nas the model gets it" for k in kinds]
    how = (("augmented: each loader draws its own crops, rotations, flips" if len(kinds) == 2 else "augmented")
           if augment else "not augmented" + (f": the loaders differ by at most {difference} gray level(s)"
                                               if difference is not None else ""))
    title = (f"{len(samples)} samples of {Path(images_dir).name}, {image_size} px, {how}\n"
             "model input: R = ER (yellow file), G = microtubules (red file), B = nucleus (blue file)")
    atomic.write_output(out_path, lambda tmp: plots.preview_picture(rows, titles, title, s.picture_format, tmp), force)
    return {"file_ids": samples["file_id"].tolist(), "images": delivered, "max_difference": difference,
            "samples": len(samples), "loaders": kinds}
