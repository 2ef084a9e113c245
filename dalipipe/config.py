"""Typed configuration shared by the CLI, the loaders, the training loop and the checkpoints.

Every knob lives here once; the CLI builds these objects and the rest of the code only reads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from dalipipe.constants import MIN_IMAGE_SIZE, MIN_TRAIN_BATCH, MODEL_NAME
from dalipipe.errors import DataError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
HALF_PRECISIONS = ("bf16", "fp16")  # forced half precision: a GPU's only
SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTS = ("none", "balanced")

LoaderKind = Literal["dali", "torch"]
DeviceName = Literal["auto", "gpu", "cpu"]


def image_size_error(size: int) -> str:
    return f"--image-size must be at least {MIN_IMAGE_SIZE} for {MODEL_NAME}, got {size}"


@dataclass(frozen=True)
class AugmentSpec:
    """The reference augmentation. Both loaders read this and nothing else.

    Training: random resized crop (area and aspect-ratio ranges as torchvision's RandomResizedCrop),
    then rotation uniform in +-max_rotation degrees (zero fill), then horizontal and vertical flips.
    Evaluation: bilinear resize to image_size. Both end with per-channel normalization.
    """

    image_size: int = 224
    crop_area: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_rotation: float = 45.0
    hflip_p: float = 0.6
    vflip_p: float = 0.6

    def __post_init__(self) -> None:
        # The loaders make images of any size (tests use tiny ones); the model's minimum is TrainConfig's
        # and predict's to check.
        if self.image_size < 1:
            raise DataError(image_size_error(self.image_size))
        lo, hi = self.crop_area
        if not 0 < lo <= hi <= 1:
            raise DataError(f"crop_area must satisfy 0 < lo <= hi <= 1, got {self.crop_area}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise DataError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        for p in (self.hflip_p, self.vflip_p):
            if not 0 <= p <= 1:
                raise DataError(f"flip probabilities must be in [0, 1], got {p}")


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std on the 0-255 scale, in the stacked RGB order (yellow, red, blue)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


DecoderPlacement = Literal["mixed", "cpu"]


@dataclass(frozen=True)
class LoaderSettings:
    """How a loader delivers its batches (what it delivers is the AugmentSpec's business)."""

    kind: LoaderKind = "dali"
    batch_size: int = 64
    # DALI threads or torch worker processes; None: loader_rules.default_workers().
    workers: int | None = None
    seed: int = 0
    # This process's shard of the samples (torchrun: rank and world size).
    shard_id: int = 0
    num_shards: int = 1
    # "float32" or "float16" (images leave the loader in this dtype).
    out_dtype: str = "float32"
    # DALI on a GPU: "mixed" = one mixed decoder per channel (decoded on DALI's CPU threads, handed on as
    # GPU tensors); "cpu" = the three channels decoded in DALI's one CPU pool, stacked, and copied to the
    # GPU once per batch. The same on the CPU, where there is nothing to copy.
    decoder: DecoderPlacement = "mixed"
    # DALI's decoder cache in MB (GPU, mixed decoder only; see dali_loader.decoder_args); 0: off.
    decode_cache_mb: int = 0
    # Track the loader's position and random state so that state() can be saved and a loader built from it
    # continues the same sequence (training: exact resume).
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("dali", "torch"):
            raise DataError(f"--loader must be dali or torch, got '{self.kind}'")
        if self.decoder not in ("mixed", "cpu"):
            raise DataError(f"--decoder must be mixed or cpu, got '{self.decoder}'")
        if self.batch_size < 1:
            raise DataError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise DataError(f"--workers must be at least 1, got {self.workers}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `dalipipe train` needs; saved inside every checkpoint and as config.json."""

    images_dir: str
    labels_csv: str
    out_dir: str
    epochs: int = 30
    batch_size: int = 64
    # None: 7e-5 (the reference, for pretrained weights) with --weights, 1e-3 from scratch; filled in at
    # creation, so that config.json and checkpoints record the rate used.
    lr: float | None = None
    weight_decay: float = 1e-6
    val_fraction: float = 0.3
    seed: int = 42
    loader: LoaderKind = "dali"
    device: DeviceName = "auto"
    # Loader threads (DALI) or processes (torch) per training process; None: the cores divided among
    # this machine's processes, at most 8.
    workers: int | None = None
    weights: str | None = None
    pretrained: bool = False
    # Use exactly this many of the labelled samples (stratified, before the split); None: all of them.
    subset: int | None = None
    decoder: DecoderPlacement = "mixed"
    # DALI on a GPU: keep the decoded images in GPU memory (DALI's decoder cache), so that from the
    # second epoch on no PNG is decoded; needs --loader dali --decoder mixed and a GPU.
    decode_cache: bool = False
    # Remember the data check of unchanged files between runs (check_cache); False: check every file.
    check_cache: bool = True
    # Mixed precision on a GPU: "auto" = bf16 where the GPU has native bf16, else fp16 with a gradient
    # scaler; "bf16", "fp16" force one (GPU only); "fp32" none. The CPU always runs fp32.
    precision: str = "auto"
    # Run the training steps through torch.compile (compiles first: pays off only over enough steps).
    compile: bool = False
    # Mid-epoch checkpoints (exact resume): every this many training steps, and/or every this many
    # minutes (the default keeps short runs free of them). None: off.
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = 5.0
    # Stop once this many minutes have passed (a job's time slot): at the next training step, with a
    # checkpoint there from which --resume goes on exactly; None: no limit. A property of one command:
    # a resume does not inherit it (run_dir.resume_config).
    time_limit_minutes: float | None = None
    # TensorBoard event files in RUN/tensorboard (needs the tensorboard package).
    tensorboard: bool = False
    # Beyond the reference recipe; each default leaves it as it was (see recipe.py and ema.py).
    # An exponential moving average of the weights with this decay (validation, best.pt and predict use it).
    ema: float | None = None
    # "balanced": cross-entropy weighted by the inverse class frequency of the training split.
    class_weights: str = "none"
    # Per-step learning rate: "constant" or "cosine" (to 0 at the last step), after a linear warm-up.
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # Stratified k-fold: fold `fold` (1..folds) of `folds` is the validation split (replaces val_fraction).
    folds: int | None = None
    fold: int | None = None
    # Validation averages the probabilities over the four flips (as predict --tta): about 4x its compute.
    tta_val: bool = False
    augment: AugmentSpec = field(default_factory=AugmentSpec)

    def __post_init__(self) -> None:
        checks = [(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
                  (self.batch_size >= MIN_TRAIN_BATCH,
                   f"--batch-size must be at least {MIN_TRAIN_BATCH} for training (BatchNorm learns nothing from "
                   f"one sample), got {self.batch_size}"),
                  (self.augment.image_size >= MIN_IMAGE_SIZE, image_size_error(self.augment.image_size)),
                  (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
                  (self.weight_decay >= 0, f"--weight-decay must be non-negative, got {self.weight_decay}"),
                  (0 < self.val_fraction < 1, f"--val-fraction must be between 0 and 1, got {self.val_fraction}"),
                  (self.workers is None or self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
                  (self.checkpoint_every is None or self.checkpoint_every >= 1,
                   f"--checkpoint-every must be at least 1, got {self.checkpoint_every}"),
                  (self.checkpoint_minutes is None or self.checkpoint_minutes > 0,
                   f"--checkpoint-minutes must be positive, got {self.checkpoint_minutes}"),
                  (self.time_limit_minutes is None or self.time_limit_minutes > 0,
                   f"--time-limit must be positive, got {self.time_limit_minutes}"),
                  (self.precision in PRECISIONS,
                   f"--precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'"),
                  (self.subset is None or self.subset >= 2, f"--subset must be at least 2, got {self.subset}"),
                  (not (self.weights and self.pretrained), "--weights and --pretrained exclude each other"),
                  (self.ema is None or 0 < self.ema < 1, f"--ema must be between 0 and 1 (e.g. 0.999), got {self.ema}"),
                  (self.class_weights in CLASS_WEIGHTS,
                   f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got '{self.class_weights}'"),
                  (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'"),
                  (0 <= self.warmup_epochs < self.epochs,
                   f"--warmup-epochs must be at least 0 and less than --epochs ({self.epochs}), got {self.warmup_epochs:g}"),
                  (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing:g}"),
                  ((self.folds is None) == (self.fold is None), "--folds K and --fold I go together"),
                  (self.folds is None or self.folds >= 2, f"--folds must be at least 2, got {self.folds}"),
                  (self.folds is None or self.fold is None or 1 <= self.fold <= self.folds,
                   f"--fold must be between 1 and --folds ({self.folds}), got {self.fold}")]
        for ok, message in checks:
            if not ok:
                raise DataError(message)
        if self.lr is None:  # record the rate used, not "the default"
            object.__setattr__(self, "lr", self.effective_lr())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        aug = d.pop("augment", {}) or {}
        aug = {k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}, augment=AugmentSpec(**aug))

    def loader_settings(self, train: bool, shard_id: int, num_shards: int, decode_cache_mb: int = 0) -> LoaderSettings:
        # Training shuffles with the run's seed; evaluation keeps file order.
        return LoaderSettings(kind=self.loader, batch_size=self.batch_size, workers=self.workers, seed=self.seed,
                              shard_id=shard_id, num_shards=num_shards, decoder=self.decoder,
                              decode_cache_mb=decode_cache_mb if self.decode_cache else 0)

    def decode_cache_applies(self, device_type: str) -> bool:
        """DALI's decoder cache lives in GPU memory and belongs to its mixed decoder."""
        return device_type == "cuda" and self.loader == "dali" and self.decoder == "mixed"

    def check_device(self, device_type: str) -> None:
        """The options that need a GPU, against the device this run got (before any long work)."""
        if self.decode_cache and not self.decode_cache_applies(device_type):
            raise DataError("--decode-cache keeps decoded images in GPU memory with DALI's mixed decoder: it "
                            f"needs a GPU, --loader dali and --decoder mixed (this run: device {device_type}, "
                            f"--loader {self.loader}, --decoder {self.decoder})")

    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 7e-5 if (self.weights or self.pretrained) else 1e-3
