"""Checkpoint -> submission: the model and its evaluation preprocessing come from the checkpoint alone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dalipipe import atomic, checkpoint
from dalipipe import device as dev
from dalipipe.config import AugmentSpec, LoaderSettings
from dalipipe.data.csv_files import read_ids
from dalipipe.data.decoded_store import store_place
from dalipipe.data.index import inspect_images, scan_images
from dalipipe.errors import DataError
from dalipipe.infer.inference import prediction_frame, probabilities, scores_by_position
from dalipipe.loading.loader_rules import default_threads, default_workers
from dalipipe.loading.loaders import make_loader
from dalipipe.model import build_model
from dalipipe.checkpoint import ModelCard
from dalipipe.settings import PredictSettings

log = logging.getLogger("dalipipe")


def select_ids(index: pd.DataFrame, ids_csv: str | Path, images_dir: str | Path) -> pd.DataFrame:
    """Restrict and order the index by a CSV's file_id column (a sample submission), read by the rules of
    every CSV (read_ids)."""
    ids = read_ids(ids_csv, what="ids file")
    by_id = index.set_index("file_id")
    missing = ids[~ids["file_id"].isin(by_id.index)]
    if len(missing):
        row = missing.iloc[0]
        raise DataError(f"{ids_csv}:{row.csv_line}: file_id {row.file_id} has no complete set of channel images in "
                        f"{images_dir}")
    return by_id.loc[ids["file_id"].to_numpy()].reset_index()


def warn_seen_samples(index: pd.DataFrame, card: ModelCard, images_dir: str | Path, model: Path) -> None:
    """One warning when samples to predict carry ids of the model's own training or validation split: a
    score on them says how well it remembers, not how well it predicts. model: its file, named in the
    warning (an ensemble's members each have their own split)."""
    ids = set(index["file_id"].tolist())
    trained = len(ids & set(card.split.train_ids)) if card.split else 0
    validated = len(ids & set(card.split.val_ids)) if card.split else 0
    if trained or validated:
        log.warning(f"warning: {trained} of the {len(index)} samples in {images_dir} have the ids of the training "
                    f"split of {model} and {validated} those of its validation split; scoring predictions on them "
                    "overstates its accuracy")


def load_models(paths: list[str]) -> list[tuple[Path, ModelCard]]:
    """Every checkpoint (a run's best), refused before any work unless all have the same classes; one line for
    each that was saved in the middle of an epoch (never validated)."""
    cards = [(checkpoint.resolve(p), ModelCard.read(p)) for p in paths]
    for path, card in cards:
        if card.partial_steps is not None:
            log.warning(f"warning: {path} is the model in the middle of epoch {card.epoch + 1} (after step "
                        f"{card.partial_steps}), never validated; a run's best.pt holds its best validated epoch")
    first_path, first = cards[0]
    for path, card in cards[1:]:
        if card.class_names != first.class_names:
            raise DataError(f"{path}: its classes ({', '.join(card.class_names)}) differ from those of {first_path} "
                            f"({', '.join(first.class_names)}); an ensemble averages models of the same classes")
    return cards


def predict(settings: PredictSettings) -> pd.DataFrame:
    """One model's predictions, or with several checkpoints their ensemble's: the mean of their
    probabilities (each with its own image size and normalization, from its checkpoint)."""
    from tqdm.auto import tqdm

    s = settings
    images_dir, ids_csv, force = s.images_dir, s.ids_csv, s.force
    loading = LoaderSettings(kind=s.loader, batch_size=s.batch_size, workers=s.workers)
    out = Path(s.out_csv)
    atomic.refuse_existing(out, force)
    atomic.ensure_writable(out.parent, "predictions")  # before inference, not after it
    cks = load_models(list(s.checkpoints))
    names = list(cks[0][1].class_names)
    index = scan_images(images_dir, skip_incomplete=True)
    if ids_csv:
        index = select_ids(index, ids_csv, images_dir)
    for path, card in cks:
        warn_seen_samples(index, card, images_dir, path)
    index = inspect_images(index, cache=s.check_cache, store=store_place(s))
    torch_device = dev.resolve(s.device)
    # torch's threads, cuDNN autotuning and TF32, as in training
    dev.configure(torch_device, s.threads or default_threads(s.workers or default_workers()))
    total = np.zeros((len(index), len(names)))
    for k, (path, card) in enumerate(cks):
        desc = "predicting" + (f" ({k + 1}/{len(cks)} {path.parent.name}/{path.name})" if len(cks) > 1 else "")
        pos, scores = model_scores(card, index, settings=loading, device=torch_device, tta=s.tta,
                                   progress=lambda it, desc=desc: tqdm(it, desc=desc, unit="batch", leave=False))
        if len(pos) != len(index):
            raise RuntimeError(f"loader returned {len(pos)} of {len(index)} samples; please report this as a bug")
        total += probabilities(scores)  # positions come back sorted: 0..n-1 for every model
    sub = prediction_frame(index["file_id"].to_numpy(), total / len(cks), names, s.probs)
    if not ids_csv:
        sub = sub.sort_values("file_id").reset_index(drop=True)
    atomic.write_output(out, lambda tmp: sub.to_csv(tmp, index=False), force)
    return sub


def model_scores(card: ModelCard, index: pd.DataFrame, *, settings: LoaderSettings, device: torch.device, tta: bool,
                 progress) -> tuple[np.ndarray, np.ndarray]:
    """(positions, scores) of one checkpoint's model over the index, with its own evaluation preprocessing."""
    spec = AugmentSpec(image_size=card.image_size)
    model = build_model(len(card.class_names))
    model.load_state_dict(card.weights)
    model = dev.place_model(model, device)
    data = make_loader(index, np.arange(len(index)), spec=spec, norm=card.norm, train=False, device=device,
                       settings=settings)
    try:
        return scores_by_position(model, data, device=device, progress=progress, tta=tta)
    finally:
        data.close()
