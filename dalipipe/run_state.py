"""What a run carries from step to step, and the one place that knows a checkpoint's keys.

A checkpoint (format checkpoint.FORMAT) is a dict of plain data: it is written here from the typed state
(RunState.to_checkpoint) and read here into typed values (SavedRun for a resume, ModelCard for predict and
the run folder's rules). Its layout is fixed by tests/data/checkpoint_layout.json: every dalipipe release
writes the same keys, nesting and types, so that older and newer ones read each other's files. Keys that
an older release did not write are read with a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dalipipe import checkpoint
from dalipipe.config import Normalization, TrainConfig
from dalipipe.constants import MODEL_NAME
from dalipipe.ema import WeightAverage
from dalipipe.versions import versions


@dataclass
class Progress:
    """How far the run has got: saved in every checkpoint, restored on resume."""
    epochs_done: int = 0
    best: float = -1.0
    last_score: float = -1.0
    history: list[dict] = field(default_factory=list)
    # The best epoch's validation confusion matrix: {"epoch", "matrix" (rows: true class), "title"}. Saved, so
    # that a resumed run's TensorBoard log (whose restart drops every earlier point) can show it again.
    best_confusion: dict | None = None

    def record(self, row: dict, score: float) -> bool:
        """An epoch done with this validation score: its metrics row kept; whether it is a new best. Better
        by more than float noise: equal balanced accuracies of different predictions can differ in the last
        bit, and a tie is not a new best (best.pt stays the earlier epoch's)."""
        improved = score > self.best + 1e-9
        self.history.append(row)
        self.epochs_done, self.last_score = row["epoch"], score
        self.best = max(self.best, score)
        return improved

    def last_epoch_was_best(self) -> bool:
        """Whether the last epoch done is the run's best, by the training loop's rule (a tie is not a new
        best): the best epoch is recorded with its confusion matrix. (Checkpoints of an older dalipipe: by
        score.)"""
        if self.best_confusion is not None:
            return self.best_confusion["epoch"] == self.epochs_done
        return self.last_score >= self.best


@dataclass(frozen=True)
class RankState:
    """One process's generators and loader position, and its running sums in the middle of an epoch."""
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    loader: dict | None
    loader_key: str | None
    loss_sum: torch.Tensor | None = None
    seen: int = 0

    def to_dict(self) -> dict:
        return {"rng_cpu": self.rng_cpu, "rng_cuda": self.rng_cuda, "loader": self.loader,
                "loader_key": self.loader_key, "loss_sum": self.loss_sum, "seen": self.seen}

    @classmethod
    def from_dict(cls, d: dict) -> RankState:
        return cls(d["rng_cpu"], d.get("rng_cuda"), d.get("loader"), d.get("loader_key"), d.get("loss_sum"),
                   d.get("seen", 0))


@dataclass(frozen=True)
class PartialEpoch:
    """Where a mid-epoch checkpoint stopped: the steps done in the epoch and this rank's running sums."""
    steps: int
    loss_sum: torch.Tensor | None
    seen: int


@dataclass(frozen=True)
class Split:
    train_ids: list[int]
    val_ids: list[int]
    folds: int | None = None
    fold: int | None = None

    def to_dict(self) -> dict:
        return {"train_ids": self.train_ids, "val_ids": self.val_ids, "folds": self.folds, "fold": self.fold}


@dataclass(frozen=True)
class ModelCard:
    """What predicting with a checkpoint, and the run folder's rules, read of it."""
    class_names: tuple[str, ...]
    norm: Normalization
    image_size: int
    model_name: str
    weights: dict  # what to predict with: the weight average of a run trained with --ema, else the model's
    split: Split | None  # None in a checkpoint of a release that did not save it
    config: dict  # the run's TrainConfig, as TrainConfig.to_dict wrote it
    epoch: int  # epochs done
    partial_steps: int | None  # steps done in the next epoch, for a mid-epoch checkpoint

    @classmethod
    def of(cls, ck: dict) -> ModelCard:
        split = ck.get("split")
        return cls(class_names=tuple(ck["class_names"]), norm=Normalization(tuple(ck["mean"]), tuple(ck["std"])),
                   image_size=int(ck["image_size"]), model_name=ck.get("model_name", MODEL_NAME),
                   weights=ck["ema"]["model"] if ck.get("ema") else ck["model"],
                   split=Split(split.get("train_ids", []), split.get("val_ids", []), split.get("folds"), split.get("fold"))
                   if split else None,
                   config=ck["config"], epoch=int(ck["epoch"]),
                   partial_steps=ck["partial"]["steps"] if ck.get("partial") else None)

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        """A checkpoint file, or a run folder's best checkpoint (checkpoint.resolve)."""
        return cls.of(checkpoint.load(path))


@dataclass(frozen=True)
class SavedRun:
    """Everything a checkpoint holds for a resume, typed."""
    card: ModelCard
    progress: Progress
    model: dict
    optimizer: dict
    scaler: dict
    ema: dict | None
    ranks: list[RankState] | None  # None from a release that saved no generators
    partial_steps: int | None

    @classmethod
    def of(cls, ck: dict) -> SavedRun:
        ranks = ck.get("ranks")
        return cls(card=ModelCard.of(ck),
                   progress=Progress(ck["epoch"], ck["best_score"], ck["val_balanced_accuracy"], ck["history"],
                                     ck.get("best_confusion")),
                   model=ck["model"], optimizer=ck["optimizer"], scaler=ck["scaler"], ema=ck.get("ema"),
                   ranks=None if ranks is None else [RankState.from_dict(r) for r in ranks],
                   partial_steps=ck["partial"]["steps"] if ck.get("partial") else None)

    @classmethod
    def read(cls, path: str | Path) -> SavedRun:
        return cls.of(checkpoint.load(path))


@dataclass
class RunState:
    """The live state of a training run that its checkpoints save (held by reference: the loop changes the
    model, optimizer and progress in place)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: WeightAverage | None
    class_weights: list[float] | None
    progress: Progress
    class_names: tuple[str, ...]
    norm: Normalization
    split: Split
    config: TrainConfig

    def to_checkpoint(self, ranks: list[RankState], partial_steps: int | None) -> dict[str, Any]:
        """Everything predict and an exact resume need; partial_steps: saved in the middle of an epoch.
        (The keys and their order: tests/data/checkpoint_layout.json.)"""
        p, cfg = self.progress, self.config
        return {"model_name": MODEL_NAME, "class_names": list(self.class_names), "mean": list(self.norm.mean),
                "std": list(self.norm.std), "image_size": cfg.augment.image_size, "config": cfg.to_dict(),
                "epoch": p.epochs_done, "best_score": p.best, "history": p.history,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "split": self.split.to_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(), "class_weights": self.class_weights,
                "val_balanced_accuracy": p.last_score, "best_confusion": p.best_confusion,
                "versions": versions(), "ranks": [r.to_dict() for r in ranks],
                "partial": None if partial_steps is None else {"steps": partial_steps}}
