"""The training loop, in one file: train() sets a run up (train_setup.py), then each epoch runs its steps
(train_epoch, each step a Step), checkpoints through the run's Checkpointer (checkpoint.py), validates
(_validate) and hands its records to the background writer (run_recorder.py). One code path for CPU, GPU and
torchrun."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from tqdm.auto import tqdm

from dalipipe import atomic
from dalipipe import device as dev
from dalipipe import distributed
from dalipipe.checkpoint import Checkpointer, CheckpointPolicy, PartialEpoch, TimeLimitReached
from dalipipe.config import TrainConfig
from dalipipe.constants import MAX_BATCH_PICTURE
from dalipipe.data.index import STORE_COLUMN, available_cores
from dalipipe.infer.class_report import class_report, from_confusion
from dalipipe.infer.inference import cross_entropy, prediction_frame, probabilities, scores_by_position
from dalipipe.loading.loader_rules import default_workers, local_processes
from dalipipe.progress import quiet_unless
from dalipipe.run import run_dir, train_setup
from dalipipe.run.data_wait import Advisor, DataWait, Machine, share_of, shown
from dalipipe.run.recipe import Recipe
from dalipipe.run.run_recorder import BestEpoch, EpochRecord, FirstBatch, RunRecorder

log = logging.getLogger("dalipipe")


# Debugging aid: DALIPIPE_SAMPLE_LOG=DIR records the file ids each rank trained on, per epoch, in order.
SAMPLE_LOG = "DALIPIPE_SAMPLE_LOG"


@dataclass(frozen=True)
class Step:
    """One optimizer step on one batch: the recipe's learning rate, the forward under the run's autocast,
    the backward through the gradient scaler, then the recipe's weight average. Returns the loss, still on
    the device (no sync)."""
    net: torch.nn.Module  # the model, under DDP and/or torch.compile
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    recipe: Recipe

    def __call__(self, images: torch.Tensor, y: torch.Tensor, global_step: int) -> torch.Tensor:
        self.recipe.before_step(self.opt, global_step - 1)
        with dev.autocast(self.device, self.precision):
            loss = self.recipe.loss(self.net(images), y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.recipe.after_step()
        return loss


@dataclass(frozen=True)
class EpochSums:
    """What one process's pass over its training loader adds up to."""
    loss_sum: torch.Tensor  # summed loss, still on the device
    seen: int  # samples trained on
    positions: np.ndarray  # the row positions trained on, in order, if recorded
    data_wait_s: float  # time spent waiting for the loader's batches (data_wait.py)
    train_s: float  # the pass's own time, to the end of its last step on the device


def train_epoch(step: Step, loader, y_train: torch.Tensor, *, steps_before: int, start: PartialEpoch | None = None,
                checkpointer: Checkpointer | None = None,
                first_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                desc: str = "", show: bool = True, record: bool = False) -> EpochSums:
    """One pass over the loader (or the rest of one, from a mid-epoch checkpoint's step with its sums).
    steps_before: the run's count of steps before this epoch (the learning-rate schedule's clock);
    first_batch(images, y): before the step of the pass's first batch; record: keep the row positions."""
    step.net.train()
    device = step.device
    start_step = start.steps if start else 0
    loss_sum = (start.loss_sum.to(device) if start and start.loss_sum is not None
                else torch.zeros((), device=device))
    seen = start.seen if start else 0
    positions = []
    wait, t0 = DataWait(), time.perf_counter()
    # Drawn in the steps, not in the timed loader: its own drawing is not time waited for data.
    bar = tqdm(desc=desc, unit="batch", leave=False, initial=start_step, total=len(loader), **quiet_unless(show))
    try:
        for i, (images, pos) in enumerate(wait.timed(loader), start=start_step + 1):
            y = y_train[pos]
            if record:  # a copy to the host syncs the GPU: only when asked for
                positions.append(pos.cpu())
            if first_batch is not None and i == start_step + 1:
                first_batch(images, y)
            loss = step(dev.batch_layout(images, device), y, steps_before + i)
            loss_sum += loss.detach() * len(y)  # stays on the device: no sync per step
            seen += len(y)
            if checkpointer is not None:  # (mid-epoch checkpoints; a --time-limit stop raises here)
                checkpointer.after_step(i, steps_before + i, loss_sum, seen, steps_per_epoch=len(loader))
            # host clocks only (no sync); tqdm draws it at its own pace
            bar.set_postfix_str(f"data wait {shown(wait.seconds / max(time.perf_counter() - t0, 1e-9))}",
                                refresh=False)
            bar.update()
        dev.synchronize(device)
        train_s = time.perf_counter() - t0
        # The bar's last figure is the epoch line's (of this process): the same seconds, once the device is done.
        bar.set_postfix_str(f"data wait {shown(share_of(wait.seconds, train_s))}")
    finally:  # however the pass ends (a --time-limit stop, Ctrl-C): no stale bar under the next line
        bar.close()
    return EpochSums(loss_sum=loss_sum, seen=seen, data_wait_s=wait.seconds, train_s=train_s,
                     positions=torch.cat(positions).numpy() if positions else np.zeros(0, dtype=np.int64))


def write_sample_log(folder: str, rank: int, epoch: int, file_ids: np.ndarray) -> None:
    """Debugging aid: the file ids one rank trained on in one epoch, in order."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"epoch": epoch, "file_ids": [int(i) for i in file_ids]}) + "\n")


@dataclass(frozen=True)
class TrainResult:
    """What train() reports."""
    stopped_early: bool  # by --time-limit: the run is resumable
    main: bool  # this process is rank 0 (under torchrun, the one that reports)
    best_val_balanced_accuracy: float
    epochs: int  # epochs done, over the whole run
    history: list[dict]  # metrics.jsonl's rows
    best_epoch: int  # the epoch of best.pt (0 before a first epoch)
    best_report: str  # its per-class precision, recall and F1 on the validation split ('' before a first epoch)


# An instrument's callback (benchmarks, the GPU check), which takes its own clock: observe("epochs",
# steps per epoch) when this command's first epoch starts, observe("epoch_end", epoch) after each whole
# epoch (steps, validation, and the hand-off of its checkpoint and records), observe("stopped", steps done)
# when --time-limit stops the run in the middle of an epoch.
Observe = Callable[[str, int], None]


def train(cfg: TrainConfig, resume: bool = False, observe: Observe | None = None) -> TrainResult:
    out = Path(cfg.out_dir)
    run_dir.check_run_dir(out, resume)
    world = distributed.init(cfg.device)
    try:
        device = train_setup.check_options(cfg, world)  # before the run folder is made: a refused run leaves none
        if not world.is_main:
            return _train(cfg, resume, world, device, observe)
        atomic.ensure_writable(out, "run")  # before the long data check, not after it
        with run_dir.locked(out):
            # again: another run may have started in the meantime
            run_dir.check_run_dir(out, resume, holding_lock=True)
            return _train(cfg, resume, world, device, observe)
    finally:
        distributed.shutdown(world)


def _train(cfg: TrainConfig, resume: bool, world: distributed.World, device: torch.device,
           observe: Observe | None) -> TrainResult:
    if not world.is_main:  # one voice: rank 0 reports, the others only fail
        log.setLevel(logging.ERROR)
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    # Made before the model and loaders: its worker process is forked from a process without CUDA.
    with RunRecorder(out, world.is_main, lambda: run_dir.interrupt_hint(out)) as recorder:
        run = train_setup.build(cfg, resume, world, device)
        try:  # the loaders' workers end with the command, however it ends
            progress = run.state.progress
            recorder.run_start(cfg.to_dict(), list(run.labels.names))
            if cfg.tensorboard and progress.epochs_done < cfg.epochs:  # (a resume with nothing to train logs nothing)
                recorder.start_tensorboard(progress.history, resumed=resume, best=progress.best_confusion,
                                           class_names=list(run.labels.names))
            checkpointer = Checkpointer(out, recorder, run.state, loader=run.train_loader, key=run.loader_key,
                                        device=device, world=world,
                                        policy=CheckpointPolicy(cfg.checkpoint_every, cfg.checkpoint_minutes,
                                                                cfg.time_limit_minutes, t_start, world))
            stopped_early = _epochs(run, recorder, checkpointer, new_run=not resume, observe=observe)
            recorder.end_tensorboard(None if stopped_early else cfg.to_dict(), progress.best, progress.epochs_done)
            recorder.close()  # the last writes, waited for
        finally:
            run.close()
    best = progress.best_confusion
    return TrainResult(stopped_early=stopped_early, main=world.is_main, best_val_balanced_accuracy=progress.best,
                       epochs=len(progress.history), history=progress.history,
                       best_epoch=best["epoch"] if best else 0,
                       best_report=from_confusion(best["matrix"], list(run.labels.names))[0] if best else "")


def _epochs(run: train_setup.Setup, recorder: RunRecorder, checkpointer: Checkpointer, new_run: bool,
            observe: Observe | None) -> bool:
    """The epochs still to train, each checkpointed and handing its records to the recorder; whether
    --time-limit stopped the run early (with a checkpoint at the step where it stopped)."""
    cfg, world, out, device, state = run.cfg, run.world, run.out, run.device, run.state
    progress = state.progress
    sample_log = os.environ.get(SAMPLE_LOG)
    step = Step(run.net, state.optimizer, state.scaler, device, cfg.precision, run.recipe)
    steps_per_epoch = len(run.train_loader)
    if progress.epochs_done >= cfg.epochs and world.is_main:
        log.info(f"{out}: already trained for {progress.epochs_done} epochs; raise --epochs to train more")
    # A mid-epoch checkpoint continues the one epoch it was saved in, and that epoch only.
    partial = run.partial
    advisor = Advisor(cfg, Machine(device_type=device.type, cores=available_cores(), processes=local_processes(),
                                   workers=cfg.workers or default_workers(),
                                   stored=STORE_COLUMN in run.train_df.columns))
    if observe and progress.epochs_done < cfg.epochs:
        observe("epochs", steps_per_epoch)
    for epoch in range(progress.epochs_done, cfg.epochs):
        t0 = time.perf_counter()
        start, partial = partial, None
        dev.reset_peak_memory(device)
        try:
            sums = train_epoch(step, run.train_loader, run.y_train, steps_before=epoch * steps_per_epoch, start=start,
                               checkpointer=checkpointer,
                               first_batch=(lambda images, y: _first_batch(run, recorder, images, y))
                               if new_run and epoch == 0 else None,
                               desc=f"epoch {epoch + 1}/{cfg.epochs}", show=world.is_main, record=bool(sample_log))
        except TimeLimitReached as stop:
            # Saved at this step: the resumed run goes on exactly from here.
            if observe:
                observe("stopped", stop.args[0])
            log.info(f"--time-limit {cfg.time_limit_minutes:g} min reached at step {stop.args[0]} of epoch "
                     f"{epoch + 1}; saved; continue with: dalipipe train --resume {out} (a time limit applies "
                     "to the command that gives it: give --time-limit again for the next slot)")
            return True
        if sample_log:
            write_sample_log(sample_log, world.rank, epoch + 1, run.train_df.file_id.to_numpy()[sums.positions])
        row, best = _validate(run, epoch, sums=sums, t0=t0)
        # The next epoch's start, on every rank; written by rank 0 in the background, then the epoch's records.
        checkpointer.epoch_end(best=best is not None)
        recorder.epoch_end(EpochRecord(row, list(progress.history), best))
        if world.is_main:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f}  val loss "
                       f"{row['val_loss']:.4f}  val balanced acc {row['val_balanced_accuracy']:.4f}"
                       f"{' *' if best else ''}  {_rate(row['train_images_per_s'])} img/s  data wait "
                       f"{shown(row['data_wait_share'])}")
            said = advisor.after_epoch(epoch + 1, row["data_wait_share"])
            if said:
                log.info(said)
        distributed.barrier(world)
        if observe:
            observe("epoch_end", epoch + 1)
        # Rank 0's clock decides, so that every rank stops after the same epoch.
        if epoch + 1 < cfg.epochs and checkpointer.time_up():
            log.info(f"--time-limit {cfg.time_limit_minutes:g} min reached after epoch {epoch + 1}; continue "
                     f"with: dalipipe train --resume {out} (give --time-limit again for the next slot)")
            return True
    return False


def _first_batch(run: train_setup.Setup, recorder: RunRecorder, images: torch.Tensor, y: torch.Tensor) -> None:
    """A new run's first batch, before its step: BatchNorm's statistics for a model from scratch (every rank),
    and train_batch.png, the batch as the model receives it (rank 0, one copy to the host)."""
    run.recipe.first_batch(images)
    if run.world.is_main:
        picked, cfg = images[:MAX_BATCH_PICTURE], run.cfg
        recorder.first_batch(FirstBatch(
            images=picked.detach().float().cpu().numpy(), norm=run.state.norm,
            captions=[run.labels.names[int(k)] for k in y[:MAX_BATCH_PICTURE].cpu()],
            title=f"first training batch ({len(picked)} of {len(images)}), {cfg.augment.image_size} px, loader "
                  f"{cfg.loader}, augmented\nnormalization undone for display; R = ER, G = microtubules, B = nucleus"))


def _rate(per_s: float) -> str:
    """Images per second as the epoch line shows them: tenths below 10 (0.3, not 0), as metrics.jsonl has them."""
    return f"{per_s:.1f}" if per_s < 10 else f"{per_s:.0f}"


@dataclass(frozen=True)
class RankFigures:
    """One process's training figures of an epoch, gathered from every process once it has validated."""
    loss_sum: float
    seen: int
    train_s: float
    data_wait_s: float
    memory: dict[str, float]  # on a GPU: dev.memory_in_use


def training_figures(ranks: list[RankFigures]) -> dict[str, float]:
    """An epoch's training figures over every process: the loss averaged over every sample trained on, the
    images of all processes per second of the slowest one, and the data wait of the most starved process
    (the share of its own training time)."""
    seen = sum(r.seen for r in ranks)
    starved = max(ranks, key=lambda r: r.data_wait_s / max(r.train_s, 1e-9))
    return {"train_loss": round(sum(r.loss_sum for r in ranks) / max(seen, 1), 5),
            "train_images_per_s": round(seen / max(max(r.train_s for r in ranks), 1e-9), 1),
            "data_wait_s": round(starved.data_wait_s, 3),
            "data_wait_share": share_of(starved.data_wait_s, starved.train_s)}


def _largest(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(r[k] for r in rows) for k in rows[0]}


def _validate(run: train_setup.Setup, epoch: int, *, sums: EpochSums,
              t0: float) -> tuple[dict, BestEpoch | None]:
    """Score the epoch on the validation split and update the run's progress: (metrics row, what to write
    if it is the best epoch so far). The training figures are summed over every process; the data wait is
    the most starved process's."""
    progress, world = run.state.progress, run.world
    t_val = time.perf_counter()
    model = run.recipe.eval_model(run.state.model)
    distributed.broadcast_buffers(model, world)  # every rank validates exactly what rank 0 saves
    pos, logits = scores_by_position(model, run.val_loader, device=run.device, world=world, precision=run.cfg.precision,
                                     tta=run.cfg.tta_val)
    val_time = time.perf_counter() - t_val
    # Every process's training figures and (on a GPU) memory, in one collective once validation has run (its
    # memory counted too).
    ranks = distributed.gather(RankFigures(loss_sum=float(sums.loss_sum.item()), seen=sums.seen, train_s=sums.train_s,
                                           data_wait_s=sums.data_wait_s, memory=dev.memory_in_use(run.device)), world)
    y = run.y_val[pos]
    pred = logits.argmax(1)
    score = float(balanced_accuracy_score(y, pred))
    figures = training_figures(ranks)
    row = {"epoch": epoch + 1, "train_loss": figures["train_loss"], "val_loss": round(cross_entropy(logits, y), 5),
           "val_balanced_accuracy": round(score, 5), "train_images_per_s": figures["train_images_per_s"],
           "val_seconds": round(val_time, 2), "epoch_seconds": round(time.perf_counter() - t0, 2),
           "lr": run.recipe.epoch_lr(epoch), "data_wait_s": figures["data_wait_s"],
           "data_wait_share": figures["data_wait_share"],
           # on a GPU: the epoch's peak of torch's allocator and the device memory in use at its end (the
           # latter with DALI's pools and the CUDA context), the largest over the processes
           **_largest([r.memory for r in ranks])}
    improved = progress.record(row, score)
    if not improved:
        return row, None
    names = list(run.labels.names)
    cm = confusion_matrix(y, pred, labels=range(len(names)))
    title = f"validation, epoch {epoch + 1}, balanced accuracy {score:.3f}"
    progress.best_confusion = {"epoch": epoch + 1, "matrix": cm.tolist(), "title": title}
    if not world.is_main:
        return row, None
    frame = prediction_frame(run.val_df.file_id.to_numpy()[pos], probabilities(logits), names, probs=True)
    frame.insert(1, "true_cell_line", run.labels.decode(y))
    return row, BestEpoch(frame, class_report(y, pred, names)[1], cm, names, title)
