"""Run a model over an evaluation loader; shared by validation in training and by predict."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dalipipe import device as dev
from dalipipe import distributed
from dalipipe.distributed import World

# Test-time augmentation: the identity and the three flips (horizontal, vertical, both = a half turn),
# the flips the training augmentation applies. Quarter turns are left out: training rotates by at most
# +-45 degrees, then flips, so a model never sees a cell turned by 90 degrees.
TTA_VIEWS = 4


def flip_views(images: torch.Tensor) -> torch.Tensor:
    """The batch (N, C, H, W) followed by its three flipped copies: one batch of 4N images."""
    return torch.cat([images, images.flip(-1), images.flip(-2), images.flip((-2, -1))])


def tta_scores(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Logits of the 4n views of n images -> the log of each image's probabilities averaged over its views
    (a log, so that every consumer of logits, softmax and cross-entropy, reads it unchanged)."""
    log_p = logits.float().log_softmax(1).view(TTA_VIEWS, n, -1)
    return torch.logsumexp(log_p, 0) - math.log(TTA_VIEWS)


@torch.no_grad()
def scores_by_position(model: torch.nn.Module, loader, *, device: torch.device, world: World = World(),
                       progress=None, precision: str = "auto", tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(positions, scores) over the whole set, each position once, gathered from all ranks and sorted.
    Scores are logits, or with `tta` the log of the probabilities averaged over the flips (on a GPU one
    forward pass per batch, of four times its images).

    The loader's targets must be row positions; shards padded with repeats are de-duplicated here,
    so that metrics count every sample exactly once whatever the number of processes.
    """
    model.eval()
    pos_parts, logit_parts = [], []
    for images, positions in (progress(loader) if progress else loader):
        n = len(images)
        if tta:
            images = flip_views(images)
        images = dev.batch_layout(images, device)
        with dev.autocast(device, precision):
            # On a GPU one pass of the 4n views. On a CPU four passes of n: one forward of 4 x 64 images at
            # 64 px took 2.5x as long as four of 64 there (measured; the larger batch leaves the caches).
            passes = TTA_VIEWS if tta and device.type == "cpu" else 1
            out = torch.cat([model(chunk) for chunk in images.chunk(passes)])
        if tta:
            out = tta_scores(out, n)
        # Kept where they are until the end: a copy to the host per batch would sync the GPU each time.
        pos_parts.append(positions)
        logit_parts.append(out.float())
    pos = torch.cat([p.to(device) for p in pos_parts]).cpu().numpy() if pos_parts else np.zeros(0, dtype=np.int64)
    logits = torch.cat(logit_parts).cpu().numpy() if logit_parts else np.zeros((0, 0), dtype=np.float32)
    gathered = distributed.gather((pos, logits), world)
    pos = np.concatenate([g[0] for g in gathered])
    logits = np.concatenate([g[1] for g in gathered if len(g[1])])
    pos, first = np.unique(pos, return_index=True)
    return pos, logits[first]


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)).item())


def probabilities(scores: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(scores).double(), 1).numpy()


def prediction_frame(file_ids: np.ndarray, probs_matrix: np.ndarray, names: list[str], probs: bool) -> pd.DataFrame:
    """file_id, cell_line (the most probable class) and, with probs, one p_<class> column per class."""
    frame = pd.DataFrame({"file_id": file_ids, "cell_line": [names[i] for i in probs_matrix.argmax(1)]})
    if probs:
        for k, name in enumerate(names):
            frame[f"p_{name}"] = np.round(probs_matrix[:, k], 6)
    return frame
