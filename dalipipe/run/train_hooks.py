"""What the training loop does around its steps: each a hook, called by train_epoch at an epoch's first
batch (first_batch) and after every step (after_step)."""

from __future__ import annotations

import torch

from dalipipe import distributed
from dalipipe.constants import MAX_BATCH_PICTURE
from dalipipe.model import calibrate_batchnorm
from dalipipe.run import train_state
from dalipipe.run.run_recorder import FirstBatch, RunRecorder
from dalipipe.viz.display import display_images


class Hook:
    def first_batch(self, images: torch.Tensor, y: torch.Tensor) -> None:
        """Before the step of an epoch's first batch (of its rest, for a resumed epoch)."""

    def after_step(self, step: int, global_step: int, loss_sum: torch.Tensor, seen: int) -> None:
        """step: of the epoch, from 1; global_step: of the run, from 1; the epoch's running sums."""


class CalibrateBatchNorm(Hook):
    """A model from scratch takes BatchNorm's statistics from the run's first batch (every rank: under DDP
    rank 0's are the ones broadcast). For a new run only: a resumed one has its statistics."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def first_batch(self, images: torch.Tensor, y: torch.Tensor) -> None:
        if self.model is not None:
            calibrate_batchnorm(self.model, images)
            self.model = None  # the run's first batch only


class FirstBatchPicture(Hook):
    """train_batch.png: the run's first training batch as the model receives it (rank 0, one copy to the
    host). For a new run only."""

    def __init__(self, recorder: RunRecorder, norm, labels, title: str):
        self.recorder, self.norm, self.labels, self.title = recorder, norm, labels, title
        self.pending = True

    def first_batch(self, images: torch.Tensor, y: torch.Tensor) -> None:
        if not self.pending:
            return
        self.pending = False
        shown = images[:MAX_BATCH_PICTURE]
        self.recorder.first_batch(FirstBatch(
            pictures=display_images(shown, self.norm),
            captions=self.labels.decode(y[:MAX_BATCH_PICTURE].cpu().numpy()),
            title=f"first training batch ({len(shown)} of {len(images)}), {self.title}"))


class MidEpochCheckpoints(Hook):
    """last.pt in the middle of an epoch when the policy says so (--checkpoint-every, --checkpoint-minutes)
    and at --time-limit, which then stops the run (TimeLimitReached) at that step."""

    def __init__(self, run, recorder: RunRecorder, policy: train_state.CheckpointPolicy, steps_per_epoch: int):
        self.run, self.recorder, self.policy, self.steps_per_epoch = run, recorder, policy, steps_per_epoch

    def after_step(self, step: int, global_step: int, loss_sum: torch.Tensor, seen: int) -> None:
        run = self.run
        # (every rank waits for rank 0's writes, then all are killed)
        train_state.kill_for_test(global_step, before=lambda: (self.recorder.wait(), distributed.barrier(run.world)))
        save, stop = self.policy.at_step(global_step, last_step_of_epoch=step == self.steps_per_epoch)
        if save:
            ranks = train_state.capture(run.train_loader, key=run.loader_key, device=run.device, world=run.world,
                                        loss_sum=loss_sum, seen=seen)
            self.recorder.checkpoint(run.checkpoint(ranks, partial_steps=step))
            self.policy.saved()
        if stop:
            raise train_state.TimeLimitReached(step)
