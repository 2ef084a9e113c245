"""The training loop: reads top to bottom, one code path for CPU, GPU and torchrun."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from tqdm.auto import tqdm

from dalipipe import atomic, checkpoint, distributed, plots, run_dir, train_state
from dalipipe import device as dev
from dalipipe.config import Normalization, TrainConfig
from dalipipe.constants import (CKPT_BEST, CKPT_LAST, CONFIG_FILE, CONFUSION_PNG, CURVES_PNG, LABELS_FILE,
                                METRICS_FILE, MODEL_NAME, VAL_PREDICTIONS)
from dalipipe.data import LabelMap, build_index, channel_stats, inspect_images, stratified_split, stratified_subset
from dalipipe.errors import DataError
from dalipipe.versions import versions
from dalipipe.inference import cross_entropy, logits_by_position, prediction_frame
from dalipipe.loader_rules import train_plan
from dalipipe.loaders import decode_cache_mb, make_loader
from dalipipe.model import build_model, compiled

log = logging.getLogger("dalipipe")


def prepare_data(cfg: TrainConfig, world: distributed.World):
    """Validate everything, then split: (label map, train frame, validation frame, normalization).
    Under torchrun with the check cache, one process per machine checks the images and the others then
    find every check remembered, instead of each decoding every file again."""
    index = build_index(cfg.images_dir, cfg.labels_csv)
    labels = LabelMap.from_labels(index["cell_line"])
    if cfg.subset is not None:
        index = stratified_subset(index, cfg.subset, cfg.seed, val_fraction=cfg.val_fraction)
    # Before the long image check: the split must be possible and give every process a training step.
    train_plan(len(stratified_split(index, cfg.val_fraction, cfg.seed)[0]), cfg.batch_size, world.size)
    first = world.local_rank == 0 or not cfg.check_cache
    if first:
        index = inspect_images(index, progress=world.is_main, cache=cfg.check_cache)
    distributed.barrier(world)
    if not first:
        index = inspect_images(index, progress=False, cache=True)
    train_df, val_df = stratified_split(index, cfg.val_fraction, cfg.seed)
    return labels, train_df, val_df, channel_stats(train_df)


def train_epoch(net, loader, y_train: torch.Tensor, opt, scaler, device: torch.device, desc: str, show: bool,
                record: bool = False, start_step: int = 0, loss_sum: torch.Tensor | None = None, seen: int = 0,
                on_step=None, precision: str = "auto") -> tuple[torch.Tensor, int, np.ndarray | None]:
    """One pass over the loader (or the rest of one, from start_step with the sums so far):
    (summed loss on the device, samples seen, the row positions trained on if `record`).
    on_step(step, loss_sum, seen) runs after each step (mid-epoch checkpoints)."""
    net.train()
    loss_sum = torch.zeros((), device=device) if loss_sum is None else loss_sum.to(device)
    positions = []
    bar = tqdm(loader, desc=desc, unit="batch", disable=not show, leave=False, initial=start_step,
               total=len(loader))
    for step, (images, pos) in enumerate(bar, start=start_step + 1):
        y = y_train[pos]
        if record:  # a copy to the host syncs the GPU: only when asked for
            positions.append(pos.cpu())
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with dev.autocast(device, precision):
            loss = F.cross_entropy(net(images), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss_sum += loss.detach() * len(y)  # stays on the device: no sync per step
        seen += len(y)
        if on_step:
            on_step(step, loss_sum, seen)
    dev.synchronize(device)
    return loss_sum, seen, torch.cat(positions).numpy() if positions else np.zeros(0, dtype=np.int64)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                   saved: dict | None = None) -> torch.optim.Optimizer:
    """Adam, fused on a GPU (one kernel for all parameters instead of several per parameter), with a
    saved state loaded for the device the run continues on: load_state_dict restores the saved param
    groups' flags, `fused` included, so that a run started on the CPU and resumed on a GPU would
    otherwise keep unfused Adam there (and the other way round, ask for a fused CPU step)."""
    fused = device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
    if saved:
        groups = [dict(g, fused=fused, foreach=None if fused else g.get("foreach")) for g in saved["param_groups"]]
        # load_state_dict then places each `step` as the fused kernel needs it (float32 on the parameter's device).
        opt.load_state_dict({**saved, "param_groups": groups})
    return opt


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """A GradScaler's state, where it means something: a run may have started on the CPU or a bf16 GPU
    (scaler disabled, empty state) and go on with fp16 (enabled), or the other way round. A fresh
    scaler starts at its default scale, which it adapts within a few steps."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)


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
        if not world.is_main:
            return _train(cfg, resume, world)
        atomic.ensure_writable(out, "run")  # before the long data check, not after it
        with run_dir.locked(out):
            run_dir.check_run_dir(out, resume)  # again: another run may have started in the meantime
            return _train(cfg, resume, world)
    finally:
        distributed.shutdown(world)


def _train(cfg: TrainConfig, resume: bool, world: distributed.World) -> dict:
    if not world.is_main:  # one voice: rank 0 reports, the others only fail
        log.setLevel(logging.ERROR)
    t_start = time.perf_counter()
    timings = {"data_check_s": 0.0, "model_build_s": 0.0, "loader_build_s": 0.0, "train_s": 0.0, "val_s": 0.0}
    out = Path(cfg.out_dir)
    device = dev.resolve(cfg.device, world.local_rank)
    dev.amp_dtype(device, cfg.precision)  # options that need a GPU: refused before any work
    cfg.check_device(device.type)
    torch.manual_seed(cfg.seed + world.rank)
    state = checkpoint.load(out / CKPT_LAST) if resume else None
    if state is not None and world.is_main:
        run_dir.repair_run_dir(out, state)

    t0 = time.perf_counter()
    labels, train_df, val_df, norm = prepare_data(cfg, world)
    timings["data_check_s"] = time.perf_counter() - t0
    if state is not None:
        if list(state["class_names"]) != list(labels.names) or state["split"]["val_ids"] != val_df.file_id.tolist():
            raise DataError(f"{out}: the data or split differs from the run being resumed")
        norm = Normalization(tuple(state["mean"]), tuple(state["std"]))
    lr = cfg.effective_lr()
    if world.is_main:
        start = (run_dir.resume_point(state) if state else f"weights {cfg.weights}" if cfg.weights
                 else "pretrained" if cfg.pretrained else "from scratch")
        log.info(f"{len(train_df)} training / {len(val_df)} validation samples, {len(labels.names)} classes; "
                 f"device {device}, loader {cfg.loader}, {world.size} process(es), lr {lr:g}, {start}")

    t0 = time.perf_counter()
    partial = state.get("partial") if state else None
    model = build_model(len(labels.names), None if state else cfg.weights, False if state else cfg.pretrained)
    if state:
        model.load_state_dict(state["model"])
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dev.configure(device)
    net = model
    if world.size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.cuda_index(device)] if device.type == "cuda" else None)
    if cfg.compile:  # training steps only: validation runs the eager model (no recompile for eval mode)
        net = compiled(net, model)
    opt = make_optimizer(model, lr, cfg.weight_decay, device, state["optimizer"] if state else None)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.needs_grad_scaler(device, cfg.precision))
    start_epoch, best, history, last_score = 0, -1.0, [], -1.0
    if state:
        restore_scaler(scaler, state["scaler"])
        start_epoch, best, history = state["epoch"], state["best_score"], state["history"]
        last_score = state["val_balanced_accuracy"]
    # This rank's generators and loader position as saved (restored here, after the model's random init).
    key = train_state.loader_key(cfg.loader, cfg.decoder, device)
    mine = train_state.restore(state.get("ranks") if state else None, partial, key, device, world, str(out))

    timings["model_build_s"] = time.perf_counter() - t0
    if world.is_main:
        atomic.save_json(cfg.to_dict(), out / CONFIG_FILE)
        atomic.save_json(list(labels.names), out / LABELS_FILE)
    # A resumed run continues its loaders' saved sequence; without one (a run from an older dalipipe, or
    # another number of processes) it reseeds, so as not to replay epoch 0's order.
    loader_state = mine["loader"] if mine else None
    loader_seed = cfg.seed if (loader_state or not state) else cfg.seed + start_epoch
    # Loaders yield row positions; labels are looked up on the device. Positions also let a debugging
    # run record exactly which samples each rank trained on (DALIPIPE_SAMPLE_LOG).
    t0 = time.perf_counter()
    cache_mb = decode_cache_mb(pd.concat([train_df, val_df])) if cfg.decode_cache else 0
    train_loader = make_loader(train_df, np.arange(len(train_df)), cfg.augment, norm, True, device,
                               dataclasses.replace(cfg.loader_settings(True, world.rank, world.size, cache_mb),
                                                   seed=loader_seed, checkpointing=True),
                               state=loader_state)
    y_train = torch.tensor(train_df["y"].to_numpy(), device=device)  # a copy: pandas' arrays may be read-only
    sample_log = os.environ.get("DALIPIPE_SAMPLE_LOG")
    val_loader = make_loader(val_df, np.arange(len(val_df)), cfg.augment, norm, False, device,
                             cfg.loader_settings(False, world.rank, world.size, cache_mb))
    y_val = val_df["y"].to_numpy()
    timings["loader_build_s"] = time.perf_counter() - t0
    deadline = train_state.Deadline(cfg.time_limit_minutes, t_start, world)
    stopped_early, partial_steps, partial_s = False, 0, 0.0
    if start_epoch >= cfg.epochs and world.is_main:
        log.info(f"{out}: already trained for {start_epoch} epochs; raise --epochs to train more")

    def checkpoint_dict(epochs_done: int, ranks: list[dict], partial_steps: int | None) -> dict:
        """Everything predict and an exact resume need; partial_steps: saved in the middle of an epoch."""
        return {"model_name": MODEL_NAME, "class_names": list(labels.names), "mean": list(norm.mean),
                "std": list(norm.std), "image_size": cfg.augment.image_size, "config": cfg.to_dict(),
                "epoch": epochs_done, "best_score": best, "history": history, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "split": {"train_ids": train_df.file_id.tolist(), "val_ids": val_df.file_id.tolist()},
                "val_balanced_accuracy": last_score, "versions": versions(), "ranks": ranks,
                "partial": None if partial_steps is None else {"steps": partial_steps}}

    interval = train_state.Interval(cfg.checkpoint_every, cfg.checkpoint_minutes, world)
    steps_per_epoch = len(train_loader)
    # Wall time of each whole epoch: steps, validation and everything written at its end.
    setup_s, epoch_walls = time.perf_counter() - t_start, []
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()

        def on_step(step: int, loss_sum: torch.Tensor, seen: int, epoch: int = epoch) -> None:
            global_step = epoch * steps_per_epoch + step
            train_state.kill_for_test(global_step)
            last = step == steps_per_epoch
            time_up = not last and deadline.passed(global_step)
            if time_up or interval.due(global_step, last):
                ranks = train_state.capture(train_loader, key, device, world, loss_sum, seen)
                if world.is_main:
                    checkpoint.save(checkpoint_dict(epoch, ranks, step), out / CKPT_LAST)
                interval.saved()
            if time_up:
                raise train_state.TimeLimitReached(step)

        resumed = partial is not None and epoch == start_epoch
        try:
            loss_sum, seen, positions = train_epoch(
                net, train_loader, y_train, opt, scaler, device, f"epoch {epoch + 1}/{cfg.epochs}", world.is_main,
                bool(sample_log), start_step=partial["steps"] if resumed else 0,
                loss_sum=mine["loss_sum"] if resumed else None, seen=mine["seen"] if resumed else 0, on_step=on_step,
                precision=cfg.precision)
        except train_state.TimeLimitReached as stop:
            # Saved at this step: the resumed run goes on exactly from here.
            stopped_early, partial_steps, partial_s = True, stop.args[0], time.perf_counter() - t0
            timings["train_s"] += partial_s
            log.info(f"--time-limit {cfg.time_limit_minutes:g} min reached at step {partial_steps} of epoch "
                     f"{epoch + 1}; saved; continue with: dalipipe train --resume {out} (a time limit applies "
                     "to the command that gives it: give --time-limit again for the next slot)")
            break
        loss_sum = float(loss_sum.item())
        train_time = time.perf_counter() - t0
        timings["train_s"] += train_time
        if sample_log:
            write_sample_log(sample_log, world.rank, epoch + 1, train_df.file_id.to_numpy()[positions])
        totals = distributed.gather((loss_sum, seen, train_time), world)
        seen_all = sum(t[1] for t in totals)
        train_loss = sum(t[0] for t in totals) / max(seen_all, 1)
        images_per_s = seen_all / max(max(t[2] for t in totals), 1e-9)

        t_val = time.perf_counter()
        distributed.broadcast_buffers(model, world)  # every rank validates exactly what rank 0 saves
        pos, logits = logits_by_position(model, val_loader, device, world, precision=cfg.precision)
        val_time = time.perf_counter() - t_val
        timings["val_s"] += val_time
        pred = logits.argmax(1)
        score = float(balanced_accuracy_score(y_val[pos], pred))
        row = {"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_loss": round(cross_entropy(logits, y_val[pos]), 5),
               "val_balanced_accuracy": round(score, 5), "train_images_per_s": round(images_per_s, 1), "val_seconds": round(val_time, 2),
               "epoch_seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        improved = score > best
        best, last_score = max(best, score), score
        ranks = train_state.capture(train_loader, key, device, world)  # the next epoch's start, on every rank
        if world.is_main:
            # last first, then best as its copy: a kill between the two is repaired on resume.
            checkpoint.save(checkpoint_dict(epoch + 1, ranks, None), out / CKPT_LAST)
            interval.saved()
            if improved:
                checkpoint.copy(out / CKPT_LAST, out / CKPT_BEST)
                # The best epoch's validation predictions, to see which samples it gets wrong.
                frame = prediction_frame(val_df.file_id.to_numpy()[pos], logits, list(labels.names), probs=True)
                frame.insert(1, "true_cell_line", labels.decode(y_val[pos]))
                atomic.write_atomic(out / VAL_PREDICTIONS, lambda tmp: frame.to_csv(tmp, index=False))
                plots.confusion(confusion_matrix(y_val[pos], pred, labels=range(len(labels.names))),
                                list(labels.names), out / CONFUSION_PNG,
                                f"validation, epoch {epoch + 1}, balanced accuracy {score:.3f}")
            with open(out / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            plots.learning_curves(history, out / CURVES_PNG)
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f}  val loss "
                       f"{row['val_loss']:.4f}  val balanced acc {score:.4f}{' *' if improved else ''}  "
                       f"{images_per_s:.0f} img/s")
        distributed.barrier(world)
        epoch_walls.append(time.perf_counter() - t0)
        # Rank 0's clock decides, so that every rank stops after the same epoch.
        if epoch + 1 < cfg.epochs and deadline.passed():
            stopped_early = True
            log.info(f"--time-limit {cfg.time_limit_minutes:g} min reached after epoch {epoch + 1}; continue "
                     f"with: dalipipe train --resume {out} (give --time-limit again for the next slot)")
            break
    for loader in (train_loader, val_loader):
        loader.close()
    timings["total_s"] = time.perf_counter() - t_start
    return {"best_val_balanced_accuracy": best, "epochs": len(history), "history": history,
            "stopped_early": stopped_early, "timings": timings, "steps_per_epoch": steps_per_epoch,
            "setup_s": setup_s, "epoch_walls": epoch_walls,
            # where a --time-limit stop fell inside an epoch: its steps done and their seconds
            "partial_steps": partial_steps, "partial_train_s": partial_s}
