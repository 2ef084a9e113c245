"""What a training step does beyond the reference recipe: the loss (class weights, label smoothing), the
learning rate of each step (warm-up, cosine), the weight average (--ema), and BatchNorm's statistics taken
from a new run's first batch when the model starts from scratch. Every default leaves the step as the
reference's: plain cross-entropy at a constant rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dalipipe.config import TrainConfig
from dalipipe.ema import WeightAverage


def balanced_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's "balanced" weights: n / (n_classes * count of the class), so that every class adds
    the same total weight to the loss (a class absent from y, impossible after a stratified split, gets 0)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each training step (counted from 0 over the whole run): a linear warm-up from
    base/warmup_steps to base, then constant, or a half cosine that reaches 0 one step after the last.
    A function of the step alone, so that an exact resume continues it without saved state; the horizon
    is the run's --epochs (raised on resume, the cosine stretches from where it is)."""

    kind: str
    base: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
        return cls(cfg.schedule, float(cfg.lr), round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base
        done = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return self.base * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))

    def epoch_mean(self, epoch: int, steps_per_epoch: int) -> float:
        """The learning rate of epoch `epoch` (from 0), averaged over its steps: metrics.jsonl's "lr"."""
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        return math.fsum(self.lr(s) for s in steps) / len(steps)  # exact for a constant rate


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of `images` (one forward pass in training mode,
    no gradients), before a model from scratch takes its first step. BatchNorm starts them at mean 0 and
    variance 1, far above the variances a fresh model's layers have; at momentum 0.1 that start still
    weighs a third after 10 steps, and its error compounds over the ~50 BatchNorm layers in a row, so that
    the model in eval mode predicts one constant vector after any short run (measured: 20 steps at
    32 px). From real statistics the running ones only lag the training's drift. Changes no weight."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 1.0
    was_training = model.training
    model.train()
    model(images)
    model.train(was_training)
    for m, momentum in zip(layers, saved):
        m.momentum = momentum


class Recipe:
    """Called by the training step: loss(logits, y), before_step(opt, step), after_step(); and by the loop
    on a new run's first batch: first_batch(images)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, *, y_train: np.ndarray, n_classes: int,
                 steps_per_epoch: int, device: torch.device, saved: dict | None = None):
        self.smoothing = cfg.label_smoothing
        self.class_weights = (balanced_class_weights(y_train, n_classes) if cfg.class_weights == "balanced" else None)
        self._weight = None if self.class_weights is None else torch.tensor(self.class_weights, dtype=torch.float32,
                                                                            device=device)
        self.schedule = Schedule.of(cfg, steps_per_epoch)
        self.model, self.from_scratch = model, cfg.weights is None and not cfg.pretrained
        self.steps_per_epoch = steps_per_epoch
        self.ema = WeightAverage(model, cfg.ema) if cfg.ema is not None else None
        if self.ema is not None and saved:
            self.ema.load_state_dict(saved)

    def first_batch(self, images: torch.Tensor) -> None:
        """Before the step of a new run's first batch (every rank: under DDP rank 0's statistics are the ones
        broadcast). A resumed run has its statistics."""
        if self.from_scratch:
            calibrate_batchnorm(self.model, images)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, weight=self._weight, label_smoothing=self.smoothing)

    def before_step(self, opt: torch.optim.Optimizer, step: int) -> None:
        """Set the rate of global step `step` (from 0); a float on the host: no sync, no kernel."""
        lr = self.schedule.lr(step)
        for group in opt.param_groups:
            group["lr"] = lr

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def epoch_lr(self, epoch: int) -> float:
        return self.schedule.epoch_mean(epoch, self.steps_per_epoch)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """What validation, best.pt and predict use: the average with --ema, else the model itself."""
        return self.ema.module if self.ema is not None else model
