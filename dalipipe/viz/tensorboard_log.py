"""`train --tensorboard`: the run's TensorBoard event files in RUN/tensorboard, one point per epoch.

These functions run in the run recorder's worker process (one process, so the writer below lives from
open_log to close_log), never in the training process: add_figure draws with matplotlib, which holds the
GIL.

A resumed run writes a START event (a SessionLog) at step 1 (SummaryWriter's purge_step): TensorBoard's
reader then drops every point an earlier process logged, in every tag, and the resumed run logs the whole
history again from its checkpoint. So each scalar has one point per epoch even when a kill fell between a checkpoint and the
event file's write. The restart drops the earlier best epoch's confusion matrix too: it is logged again from
the checkpoint. (add_scalar, not add_scalars: the latter's sub-writers are never purged.)
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from dalipipe.errors import DataError

# Metrics row key -> TensorBoard tag.
SCALARS = {"train_loss": "loss/train", "val_loss": "loss/validation",
           "val_balanced_accuracy": "validation/balanced_accuracy", "train_images_per_s": "speed/train_images_per_s",
           "lr": "optimizer/lr", "epoch_seconds": "time/epoch_seconds", "val_seconds": "time/validation_seconds",
           "data_wait_s": "time/data_wait_seconds", "data_wait_share": "time/data_wait_share",
           "torch_peak_allocated_mb": "memory/torch_peak_allocated_mb",
           "device_memory_used_mb": "memory/device_memory_used_mb"}
BEST_METRIC = "hparam/best_val_balanced_accuracy"
FIRST_BATCH_STEP = 0  # before epoch 1: a resumed run's purge (from step 1 on) keeps it

_writer = None


def require() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise DataError("--tensorboard needs the tensorboard package: pip install 'dalipipe[tensorboard]' "
                        "(or pip install tensorboard)")


def open_log(log_dir: str, history: list[dict], resumed: bool) -> None:
    global _writer
    from torch.utils.tensorboard import SummaryWriter

    _writer = SummaryWriter(log_dir, purge_step=1 if resumed else None)
    for row in history:
        epoch(row)


def epoch(row: dict) -> None:
    for key, tag in SCALARS.items():
        if key in row:
            _writer.add_scalar(tag, row[key], row["epoch"])
    _writer.flush()  # a kill keeps what was logged up to here


def image(tag: str, picture: np.ndarray, step: int) -> None:
    """An RGB uint8 (H, W, 3) picture."""
    _writer.add_image(tag, picture, step, dataformats="HWC")
    _writer.flush()


def confusion(cm: np.ndarray, names: list[str], title: str, step: int) -> None:
    from dalipipe.viz import plots

    with plots.fonts_for(names):
        _writer.add_figure("validation/confusion_matrix", plots.confusion_figure(cm, names, title), step)
    _writer.flush()


def close_log(hparams: dict[str, Any] | None, best: float, epochs: int) -> None:
    """hparams: the run's settings, with its best score, once it has finished its epochs."""
    global _writer
    if _writer is None:
        return
    if hparams is not None:
        # In the run's own folder ("."), not a new one per call: TensorBoard shows one run.
        _writer.add_hparams(_plain(hparams), {BEST_METRIC: best}, run_name=".", global_step=epochs)
    _writer.close()
    _writer = None


def _plain(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Settings as TensorBoard's hparams take them: flat, and numbers, strings or booleans."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_plain(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[prefix + k] = v
        else:
            out[prefix + k] = str(v)
    return out
