"""Run a model over an evaluation loader; shared by validation in training and by predict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dalipipe import device as dev
from dalipipe import distributed
from dalipipe.distributed import World


@torch.no_grad()
def logits_by_position(model: torch.nn.Module, loader, device: torch.device, world: World = World(),
                       progress=None, precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(positions, logits) over the whole set, each position once, gathered from all ranks and sorted.

    The loader's targets must be row positions; shards padded with repeats are de-duplicated here,
    so that metrics count every sample exactly once whatever the number of processes.
    """
    model.eval()
    pos_parts, logit_parts = [], []
    for images, positions in (progress(loader) if progress else loader):
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with dev.autocast(device, precision):
            out = model(images)
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


def prediction_frame(file_ids: np.ndarray, logits: np.ndarray, names: list[str], probs: bool) -> pd.DataFrame:
    """file_id, cell_line (the predicted class) and, with probs, one p_<class> column per class."""
    frame = pd.DataFrame({"file_id": file_ids, "cell_line": [names[i] for i in logits.argmax(1)]})
    if probs:
        p = torch.softmax(torch.from_numpy(logits), 1).numpy()
        for k, name in enumerate(names):
            frame[f"p_{name}"] = np.round(p[:, k], 6)
    return frame
