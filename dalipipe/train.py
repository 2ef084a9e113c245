"""The training loop: reads top to bottom, one code path for CPU, GPU and torchrun."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from tqdm.auto import tqdm

from dalipipe import atomic, distributed, run_dir, train_setup, train_state
from dalipipe import device as dev
from dalipipe.config import TrainConfig
from dalipipe.constants import MAX_BATCH_PICTURE
from dalipipe.progress import quiet_unless
from dalipipe.inference import cross_entropy, prediction_frame, probabilities, scores_by_position
from dalipipe.model import calibrate_batchnorm
from dalipipe.preview import display_images
from dalipipe.recipe import Recipe
from dalipipe.run_recorder import BestEpoch, RunRecorder

log = logging.getLogger("dalipipe")


def train_step(net, images: torch.Tensor, y: torch.Tensor, opt, scaler, device: torch.device, precision: str,
               loss_fn) -> torch.Tensor:
    """One optimizer step on one batch (forward under the run's autocast, backward through the gradient
    scaler); the loss, still on the device."""
    with dev.autocast(device, precision):
        loss = loss_fn(net(images), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss


def train_epoch(net, loader, y_train: torch.Tensor, opt, scaler, device: torch.device, desc: str, show: bool,
                recipe: Recipe, first_global_step: int = 0, record: bool = False, start_step: int = 0,
                loss_sum: torch.Tensor | None = None, seen: int = 0, on_step=None, precision: str = "auto",
                on_first_batch=None) -> tuple[torch.Tensor, int, np.ndarray | None]:
    """One pass over the loader (or the rest of one, from start_step with the sums so far):
    (summed loss on the device, samples seen, the row positions trained on if `record`).
    first_global_step: the run's count of steps before this epoch (the learning-rate schedule's clock).
    on_step(step, loss_sum, seen) runs after each step (mid-epoch checkpoints); on_first_batch(images, y)
    before the first."""
    net.train()
    loss_sum = torch.zeros((), device=device) if loss_sum is None else loss_sum.to(device)
    positions = []
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, initial=start_step, total=len(loader),
               **quiet_unless(show))
    for step, (images, pos) in enumerate(bar, start=start_step + 1):
        y = y_train[pos]
        if record:  # a copy to the host syncs the GPU: only when asked for
            positions.append(pos.cpu())
        if on_first_batch is not None and step == start_step + 1:
            on_first_batch(images, y)
        images = dev.batch_layout(images, device)
        recipe.before_step(opt, first_global_step + step - 1)
        loss = train_step(net, images, y, opt, scaler, device, precision, recipe.loss)
        recipe.after_step()
        loss_sum += loss.detach() * len(y)  # stays on the device: no sync per step
        seen += len(y)
        if on_step:
            on_step(step, loss_sum, seen)
    dev.synchronize(device)
    return loss_sum, seen, torch.cat(positions).numpy() if positions else np.zeros(0, dtype=np.int64)


def write_sample_log(folder: str, rank: int, epoch: int, file_ids: np.ndarray) -> None:
    """Debugging aid: the file ids one rank trained on in one epoch, in order."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"epoch": epoch, "file_ids": [int(i) for i in file_ids]}) + "\n")


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    out = Path(cfg.out_dir)
    run_dir.check_run_dir(out, resume)
    world = distributed.init(cfg.device)
    try:
        device = train_setup.check_options(cfg, world)  # before the run folder is made: a refused run leaves none
        if not world.is_main:
            return _train(cfg, resume, world, device)
        atomic.ensure_writable(out, "run")  # before the long data check, not after it
        with run_dir.locked(out):
            # again: another run may have started in the meantime
            run_dir.check_run_dir(out, resume, holding_lock=True)
            return _train(cfg, resume, world, device)
    finally:
        distributed.shutdown(world)


def _train(cfg: TrainConfig, resume: bool, world: distributed.World, device: torch.device) -> dict:
    if not world.is_main:  # one voice: rank 0 reports, the others only fail
        log.setLevel(logging.ERROR)
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    # Made before the model and loaders: its worker process is forked from a process without CUDA.
    with RunRecorder(out, world.is_main, lambda: run_dir.interrupt_hint(out)) as recorder:
        run = train_setup.build(cfg, resume, world, device)
        if cfg.tensorboard:
            recorder.start_tensorboard(run.progress.history, resumed=resume, best=run.progress.best_confusion,
                                       class_names=list(run.labels.names))
        result = _epochs(run, recorder, t_start)
        finished = not result["stopped_early"]
        recorder.end_tensorboard(cfg.to_dict() if finished else None, run.progress.best, run.progress.epochs_done)
        t_close = time.perf_counter()
        recorder.close()
        run.timings["record_wait_s"] = time.perf_counter() - t_close  # the last writes, waited for at the end
    run.close()
    run.timings["total_s"] = time.perf_counter() - t_start
    return {**result, "main": world.is_main, "best_val_balanced_accuracy": run.progress.best,
            "epochs": len(run.progress.history),
            "history": run.progress.history, "timings": run.timings}


def _epochs(run: train_setup.Setup, recorder: RunRecorder, t_start: float) -> dict:
    """The epochs still to train, each handing its checkpoint and records to the recorder; stops early at
    --time-limit (with a checkpoint at the step where it stopped)."""
    cfg, world, out, device, progress, timings = run.cfg, run.world, run.out, run.device, run.progress, run.timings
    sample_log = os.environ.get("DALIPIPE_SAMPLE_LOG")
    deadline = train_state.Deadline(cfg.time_limit_minutes, t_start, world)
    interval = train_state.Interval(cfg.checkpoint_every, cfg.checkpoint_minutes, world)
    steps_per_epoch = len(run.train_loader)
    stopped_early, partial_steps, partial_s = False, 0, 0.0
    if progress.epochs_done >= cfg.epochs and world.is_main:
        log.info(f"{out}: already trained for {progress.epochs_done} epochs; raise --epochs to train more")
    # Wall time of each whole epoch: steps, validation and the hand-off of everything written at its end.
    setup_s, epoch_walls = time.perf_counter() - t_start, []
    # A mid-epoch checkpoint continues the one epoch it was saved in, and that epoch only: every later
    # epoch starts at step 0 with empty sums (progress.epochs_done moves on at each epoch's end, so it
    # cannot tell the resumed epoch from the next ones).
    resumed_epoch = progress.epochs_done if run.partial is not None else None
    for epoch in range(progress.epochs_done, cfg.epochs):
        t0 = time.perf_counter()

        def on_step(step: int, loss_sum: torch.Tensor, seen: int, epoch: int = epoch) -> None:
            global_step = epoch * steps_per_epoch + step
            # (every rank waits for rank 0's writes, then all are killed)
            train_state.kill_for_test(global_step, before=lambda: (recorder.wait(), distributed.barrier(world)))
            last = step == steps_per_epoch
            time_up = not last and deadline.passed(global_step)
            if time_up or interval.due(global_step, last):
                ranks = train_state.capture(run.train_loader, run.loader_key, device, world, loss_sum, seen)
                recorder.checkpoint(run.checkpoint_state(ranks, step))
                interval.saved()
            if time_up:
                raise train_state.TimeLimitReached(step)

        resumed = epoch == resumed_epoch
        # The very first batch of a run (not of a resumed one): BatchNorm's statistics of a model from
        # scratch start from it, and rank 0 draws it once as train_batch.png.
        first = epoch == 0 and not resumed
        try:
            loss_sum, seen, positions = train_epoch(
                run.net, run.train_loader, run.y_train, run.opt, run.scaler, device,
                f"epoch {epoch + 1}/{cfg.epochs}", world.is_main, run.recipe, epoch * steps_per_epoch, bool(sample_log),
                start_step=run.partial["steps"] if resumed else 0,
                loss_sum=run.mine["loss_sum"] if resumed else None, seen=run.mine["seen"] if resumed else 0,
                on_step=on_step, precision=cfg.precision,
                on_first_batch=(lambda images, y: _first_batch(run, recorder, images, y)) if first else None)
        except train_state.TimeLimitReached as stop:
            # Saved at this step: the resumed run goes on exactly from here.
            stopped_early, partial_steps, partial_s = True, stop.args[0], time.perf_counter() - t0
            timings["train_s"] += partial_s
            log.info(f"--time-limit {cfg.time_limit_minutes:g} min reached at step {partial_steps} of epoch "
                     f"{epoch + 1}; saved; continue with: dalipipe train --resume {out} (a time limit applies "
                     "to the command that gives it: give --time-limit again for the next slot)")
            break
        train_time = time.perf_counter() - t0
        timings["train_s"] += train_time
        if sample_log:
            write_sample_log(sample_log, world.rank, epoch + 1, run.train_df.file_id.to_numpy()[positions])
        row, best = _validate(run, epoch, float(loss_sum.item()), seen, train_time, t0)
        # The next epoch's start, on every rank; written by rank 0 in the background.
        ranks = train_state.capture(run.train_loader, run.loader_key, device, world)
        recorder.epoch_end(run.checkpoint_state(ranks, None), row, progress.history, best)
        interval.saved()
        if world.is_main:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f}  val loss "
                       f"{row['val_loss']:.4f}  val balanced acc {row['val_balanced_accuracy']:.4f}"
                       f"{' *' if best else ''}  {row['train_images_per_s']:.0f} img/s")
        distributed.barrier(world)
        epoch_walls.append(time.perf_counter() - t0)
        # Rank 0's clock decides, so that every rank stops after the same epoch.
        if epoch + 1 < cfg.epochs and deadline.passed():
            stopped_early = True
            log.info(f"--time-limit {cfg.time_limit_minutes:g} min reached after epoch {epoch + 1}; continue "
                     f"with: dalipipe train --resume {out} (give --time-limit again for the next slot)")
            break
    return {"stopped_early": stopped_early, "steps_per_epoch": steps_per_epoch, "setup_s": setup_s,
            "epoch_walls": epoch_walls,
            # where a --time-limit stop fell inside an epoch: its steps done and their seconds
            "partial_steps": partial_steps, "partial_train_s": partial_s}


def _first_batch(run: train_setup.Setup, recorder: RunRecorder, images: torch.Tensor, y: torch.Tensor) -> None:
    """The first training batch of a new run: a model from scratch takes BatchNorm's statistics from it
    (every rank: under DDP rank 0's are the ones broadcast); rank 0 hands it to the recorder as the model
    receives it (one copy to the host)."""
    if run.cfg.weights is None and not run.cfg.pretrained:
        calibrate_batchnorm(run.model, images)
    if not run.world.is_main:
        return
    shown = images[:MAX_BATCH_PICTURE]
    pictures = display_images(shown, run.norm)
    captions = run.labels.decode(y[:MAX_BATCH_PICTURE].cpu().numpy())
    cfg = run.cfg
    title = (f"first training batch ({len(shown)} of {len(images)}), {cfg.augment.image_size} px, loader {cfg.loader}, "
             "augmented\nnormalization undone for display; R = ER, G = microtubules, B = nucleus")
    recorder.first_batch(pictures, captions, title)


def _validate(run: train_setup.Setup, epoch: int, loss_sum: float, seen: int, train_time: float,
              t0: float) -> tuple[dict, BestEpoch | None]:
    """Score the epoch on the validation split and update the run's progress: (metrics row, what to write
    if it is the best epoch so far). The training figures are summed over every process."""
    progress, world = run.progress, run.world
    totals = distributed.gather((loss_sum, seen, train_time), world)
    seen_all = sum(t[1] for t in totals)
    train_loss = sum(t[0] for t in totals) / max(seen_all, 1)
    images_per_s = seen_all / max(max(t[2] for t in totals), 1e-9)

    t_val = time.perf_counter()
    model = run.recipe.eval_model(run.model)
    distributed.broadcast_buffers(model, world)  # every rank validates exactly what rank 0 saves
    pos, logits = scores_by_position(model, run.val_loader, run.device, world, precision=run.cfg.precision,
                                     tta=run.cfg.tta_val)
    val_time = time.perf_counter() - t_val
    run.timings["val_s"] += val_time
    y = run.y_val[pos]
    pred = logits.argmax(1)
    score = float(balanced_accuracy_score(y, pred))
    row = {"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_loss": round(cross_entropy(logits, y), 5),
           "val_balanced_accuracy": round(score, 5), "train_images_per_s": round(images_per_s, 1),
           "val_seconds": round(val_time, 2), "epoch_seconds": round(time.perf_counter() - t0, 2),
           "lr": run.recipe.epoch_lr(epoch)}
    # Better by more than float noise: equal balanced accuracies of different predictions can differ in the
    # last bit, and a tie is not a new best.
    improved = score > progress.best + 1e-9
    progress.history.append(row)
    progress.epochs_done, progress.best, progress.last_score = epoch + 1, max(progress.best, score), score
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
    return row, BestEpoch(frame, cm, names, title)
