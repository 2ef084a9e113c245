"""Everything a training run holds before its first step: the data checked and split, the model (new or
resumed), optimizer, gradient scaler and loaders, and the run's state (checkpoint.RunState)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dalipipe import checkpoint
from dalipipe import device as dev
from dalipipe import distributed
from dalipipe.checkpoint import PartialEpoch, Progress, RunState, SavedRun, Split
from dalipipe.config import TrainConfig
from dalipipe.constants import CKPT_LAST
from dalipipe.data.decoded_store import store_place
from dalipipe.data.index import STORE_COLUMN, LabelMap, available_cores, build_index, inspect_images
from dalipipe.data.split import kfold_split, stratified_split, stratified_subset
from dalipipe.data.stats import channel_stats
from dalipipe.errors import DataError
from dalipipe.loading.loader_rules import default_threads, default_workers, train_plan
from dalipipe.loading.loaders import make_loader
from dalipipe.model import build_model, compiled
from dalipipe.run import run_dir
from dalipipe.run.recipe import Recipe
from dalipipe.viz import tensorboard_log

log = logging.getLogger("dalipipe")


def prepare_data(cfg: TrainConfig, world: distributed.World):
    """Validate everything, then split: (label map, train frame, validation frame, normalization).
    Under torchrun with the check cache, one process per machine checks the images (and builds the decoded
    store) and the others then find every check remembered and every sample stored, instead of each decoding
    every file again."""
    index = build_index(cfg.images_dir, cfg.labels_csv)
    labels = LabelMap.from_labels(index["cell_line"])
    if cfg.subset is not None:
        if cfg.subset > len(index) and world.is_main:
            log.info(f"--subset {cfg.subset}: {cfg.labels_csv} labels {len(index)} samples; using all of them")
        index = stratified_subset(index, cfg.subset, cfg.seed, val_fraction=cfg.val_fraction)
    # Before the long image check: the split must be possible and give every process a training step.
    train_plan(len(split(cfg, index)[0]), cfg.batch_size, world.size)
    first = world.local_rank == 0 or not cfg.check_cache
    store = store_place(cfg)
    if first:
        index = inspect_images(index, progress=world.is_main, cache=cfg.check_cache, store=store)
    distributed.barrier(world)
    if not first:
        index = inspect_images(index, progress=False, cache=True, store=store)
    train_df, val_df = split(cfg, index)
    return labels, train_df, val_df, channel_stats(train_df)


def split(cfg: TrainConfig, index: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's (train, validation) split: fold I of K with --folds, else the --val-fraction split."""
    if cfg.folds is not None:
        return kfold_split(index, cfg.folds, cfg.fold, cfg.seed)
    return stratified_split(index, cfg.val_fraction, cfg.seed)


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


@dataclass
class Setup:
    cfg: TrainConfig
    world: distributed.World
    device: torch.device
    out: Path
    labels: LabelMap
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    state: RunState  # what each checkpoint saves: model, optimizer, scaler, weight average, progress...
    net: torch.nn.Module  # what the training steps run: the model, under DDP and/or torch.compile
    train_loader: object
    val_loader: object
    y_train: torch.Tensor  # labels by row position, on the device
    y_val: np.ndarray
    loader_key: str  # what the training loader's saved state fits (checkpoint.loader_key)
    partial: PartialEpoch | None  # where a mid-epoch checkpoint resumes: the loop consumes it once
    recipe: Recipe  # the loss, learning-rate schedule and weight average of each step

    def close(self) -> None:
        for loader in (self.train_loader, self.val_loader):
            loader.close()


def check_options(cfg: TrainConfig, world: distributed.World) -> torch.device:
    """The run's device, with the options that need a GPU (or a package) checked against it: refused in one
    line before any work, and before the run folder is made."""
    device = dev.resolve(cfg.device, world.local_rank)
    dev.amp_dtype(device, cfg.precision)
    if cfg.tensorboard:
        tensorboard_log.require()
    return device


def resumed_data_differs(card, class_names: list[str], val_ids: list[int]) -> str | None:
    """What differs between a run's data and the data found at its resume, in words; None if nothing."""
    if list(card.class_names) != class_names:
        gone = [n for n in card.class_names if n not in class_names]
        new = [n for n in class_names if n not in card.class_names]
        parts = ([f"classes of the run missing now: {', '.join(gone)}"] if gone else []) + (
            [f"classes not in the run: {', '.join(new)}"] if new else [])
        return "; ".join(parts) or "the classes are in another order"
    if card.split.val_ids != val_ids:
        lost = len(set(card.split.val_ids) - set(val_ids))
        return (f"the validation split is not the run's: {lost} of its {len(card.split.val_ids)} validation samples "
                f"are not in it now, and it has {len(set(val_ids) - set(card.split.val_ids))} others")
    return None


def build(cfg: TrainConfig, resume: bool, world: distributed.World, device: torch.device) -> Setup:
    """Check the data, then build (or restore) everything the loop needs. device: what check_options
    returned, the options checked against it."""
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed + world.rank)
    saved = SavedRun.read(out / CKPT_LAST) if resume else None
    if saved is not None:
        run_dir.check_data_is_there(cfg)
        if world.is_main:
            run_dir.repair_run_dir(out, saved)

    labels, train_df, val_df, norm = prepare_data(cfg, world)
    if saved is not None:
        card = saved.card
        differs = resumed_data_differs(card, list(labels.names), val_df.file_id.tolist())
        if differs:
            raise DataError(f"{out}: the data differs from the run being resumed ({differs}); resume with the run's "
                            "images and labels")
        norm = card.norm
    lr = cfg.effective_lr()
    workers = cfg.workers or default_workers()
    threads = cfg.threads or default_threads(workers)
    dev.configure(device, threads)
    if world.is_main:
        start = (run_dir.resume_point(saved.card) if saved else f"weights {cfg.weights}" if cfg.weights
                 else "pretrained" if cfg.pretrained else "from scratch")
        log.info(f"{len(train_df)} training / {len(val_df)} validation samples, {len(labels.names)} classes; "
                 f"device {device}, loader {cfg.loader} ({workers} workers), {world.size} process(es), {threads} "
                 f"torch thread(s), lr {lr:g}, {start}")
        if device.type == "cpu" and threads > default_threads(workers):
            log.info(f"note: --threads {threads} and {workers} loader workers share {available_cores()} cores: "
                     "torch's threads spin against the loader's and any other busy process (measured 3-6x slower "
                     "on a busy 2-core machine); the default, --threads omitted, leaves the loader its cores")

    model, net = _model(cfg, saved, len(labels.names), device, world)
    opt = make_optimizer(model, lr, cfg.weight_decay, device, saved.optimizer if saved else None)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.needs_grad_scaler(device, cfg.precision))
    progress = Progress()
    partial_steps = None
    if saved:
        restore_scaler(scaler, saved.scaler)
        progress, partial_steps = saved.progress, saved.partial_steps
    # This rank's generators and loader position as saved (restored here, after the model's random init).
    key = checkpoint.loader_key(cfg.loader, cfg.decoder, device, stored=STORE_COLUMN in train_df.columns)
    mine = checkpoint.restore(saved.ranks if saved else None, partial_steps=partial_steps, key=key, device=device,
                               world=world, run=str(out))
    partial = None if partial_steps is None else PartialEpoch(
        partial_steps, mine.loss_sum if mine else None, mine.seen if mine else 0)
    # A resumed run continues its loaders' saved sequence; without one (a run from an older dalipipe, or
    # another number of processes) it reseeds, so as not to replay epoch 0's order.
    loader_state = mine.loader if mine else None
    loader_seed = cfg.seed if (loader_state or not saved) else cfg.seed + progress.epochs_done
    # Loaders yield row positions; labels are looked up on the device. Positions also let a debugging
    # run record exactly which samples each rank trained on (DALIPIPE_SAMPLE_LOG).
    train_loader = make_loader(train_df, np.arange(len(train_df)), spec=cfg.augment, norm=norm, train=True,
                               device=device,
                               settings=dataclasses.replace(
                                   cfg.loader_settings(train=True, shard_id=world.rank, num_shards=world.size),
                                   seed=loader_seed, checkpointing=True),
                               state=loader_state)
    val_loader = make_loader(val_df, np.arange(len(val_df)), spec=cfg.augment, norm=norm, train=False, device=device,
                             settings=cfg.loader_settings(train=False, shard_id=world.rank, num_shards=world.size))
    recipe = Recipe(cfg, model, y_train=train_df["y"].to_numpy(), n_classes=len(labels.names),
                    steps_per_epoch=len(train_loader), device=device, saved=saved.ema if saved else None)
    state = RunState(model=model, optimizer=opt, scaler=scaler, ema=recipe.ema,
                     class_weights=None if recipe.class_weights is None else recipe.class_weights.tolist(),
                     progress=progress, class_names=tuple(labels.names), norm=norm,
                     split=Split(train_df.file_id.tolist(), val_df.file_id.tolist(), cfg.folds, cfg.fold),
                     config=cfg)
    return Setup(cfg=cfg, world=world, device=device, out=out, labels=labels, train_df=train_df, val_df=val_df,
                 state=state, net=net, train_loader=train_loader, val_loader=val_loader,
                 y_train=torch.tensor(train_df["y"].to_numpy(), device=device),  # a copy: pandas' may be read-only
                 y_val=val_df["y"].to_numpy(), loader_key=key, partial=partial, recipe=recipe)


def _model(cfg: TrainConfig, saved: SavedRun | None, n_classes: int, device: torch.device,
           world: distributed.World) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model, what the training steps run): resumed weights or new ones, on the device, under DDP
    with several processes, through torch.compile when asked."""
    model = build_model(n_classes, weights=None if saved else cfg.weights,
                        pretrained=False if saved else cfg.pretrained)
    if saved:
        model.load_state_dict(saved.model)
    model = dev.place_model(model, device)
    net = model
    if world.size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.cuda_index(device)] if device.type == "cuda" else None)
    if cfg.compile:  # training steps only: validation runs the eager model (no recompile for eval mode)
        net = compiled(net, model)
    return model, net
