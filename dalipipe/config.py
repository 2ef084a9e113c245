"""Typed configuration shared by the CLI, the loaders, the training loop and the checkpoints.

Every knob lives here once; the CLI builds these objects and the rest of the code only reads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from dalipipe import options
from dalipipe.constants import MAX_DEFAULT_WORKERS, MIN_IMAGE_SIZE, MIN_TRAIN_BATCH, MODEL_NAME, SEED_MAX
from dalipipe.errors import DataError
from dalipipe.options import opt

# The choices of each option, as types: the table (options.py) reads them from the fields.
LoaderKind = Literal["dali", "torch"]
DeviceName = Literal["auto", "gpu", "cpu"]
DecoderPlacement = Literal["mixed", "cpu"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Schedule = Literal["constant", "cosine"]
ClassWeights = Literal["none", "balanced"]
HALF_PRECISIONS = ("bf16", "fp16")  # forced half precision: a GPU's only


@dataclass(frozen=True)
class AugmentSpec:
    """The reference augmentation. Both loaders read this and nothing else.

    First, each side of an image longer than image_size is shrunk to image_size, antialiased (working_shape).
    Training: random resized crop (area and aspect-ratio ranges as torchvision's RandomResizedCrop),
    then rotation uniform in +-max_rotation degrees (zero fill), then horizontal and vertical flips.
    Evaluation: bilinear resize to image_size. Both end with per-channel normalization.
    """

    image_size: int = opt(224, "Side of the square model input, in pixels.", low=MIN_IMAGE_SIZE,
                          why=f"for {MODEL_NAME}")
    crop_area: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_rotation: float = 45.0
    hflip_p: float = 0.6
    vflip_p: float = 0.6

    def __post_init__(self) -> None:
        # image_size: the loaders make images of any size (tests use tiny ones); the bound of a size given as
        # an option is the options table's (TrainConfig's --image-size: the model's minimum; preview's own).
        # What follows are not options: the reference's values, or a checkpoint's.
        lo, hi = self.crop_area
        if not 0 < lo <= hi <= 1:
            raise DataError(f"crop_area must satisfy 0 < lo <= hi <= 1, got {self.crop_area}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise DataError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        for p in (self.hflip_p, self.vflip_p):
            if not 0 <= p <= 1:
                raise DataError(f"flip probabilities must be in [0, 1], got {p}")

    def working_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image is brought to before the geometry above: a side longer than
        image_size is shrunk to it with an antialiased resize, a shorter one is left as it is.

        Why: the geometry (one warp per sample, or the evaluation resize) reads 2x2 source pixels per output
        pixel whatever the scale, so that shrinking a 512 px image with it turns fine texture into moire
        (a one-pixel checkerboard came out with a gray-level std of 41.6 instead of uniform gray). After
        this step the geometry never shrinks: for large images this is the reference's own order (Resize to
        224, then RandomResizedCrop to 224), and small images (the challenge's 64 px) are warped from their
        pixels in one step, as before. The crop and rotation are drawn on the image's own shape, in
        coordinates relative to its size, so that this step does not change them. DALI's graph computes the
        same in its own operators (dali_loader._working_shape); tests/test_large_images.py holds them equal."""
        return min(height, self.image_size), min(width, self.image_size)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std on the 0-255 scale, in the stacked RGB order (yellow, red, blue)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True, kw_only=True)
class LoaderSettings:
    """How a loader delivers its batches (what it delivers is the AugmentSpec's business). Made from a
    command's settings, whose options table has checked the values given (the loader kind and decoder among
    their choices, the batch size and workers within their bounds): not checked again here."""

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
    # Track the loader's position and random state so that state() can be saved and a loader built from it
    # continues the same sequence (training: exact resume).
    checkpointing: bool = False


# Help texts that several commands share.
LOADER_HELP = "dali: NVIDIA DALI (decoding and augmentation on the GPU where there is one); torch: PIL and a DataLoader."
DEVICE_HELP = "auto: the GPU when torch sees one, else the CPU; gpu: fail without one."
WORKERS_HELP = "Loader threads (DALI) or processes (torch)."
WORKERS_DEFAULT = f"the cores divided among the processes, at most {MAX_DEFAULT_WORKERS}"
THREADS_HELP = ("torch's threads for the model's work on the CPU. More than the cores the loader leaves free "
                "makes them spin against it and against other busy processes.")
THREADS_DEFAULT = "the process's cores that --workers leaves free, at least 1"
DECODE_ONCE_HELP = ("Decode each PNG once, into the decoded store (raw pixels on local disk, 3 bytes a pixel: about "
                    "160 MB for the challenge's 9,632 samples at 64 px, 7.6 GB at 512 px), which every epoch and "
                    "every later run then reads; --no-decode-once decodes the PNGs in every epoch.")
STORE_HELP = "Where the decoded store lives (a folder on a local disk with room)."
STORE_DEFAULT = "decoded/ in dalipipe's cache folder: $DALIPIPE_CACHE_DIR, else $XDG_CACHE_HOME/dalipipe, else ~/.cache/dalipipe"
CACHE_HELP = "--cache: trust the checks remembered for unchanged files; --no-cache: check every image again."
AS_REFERENCE = "off, as the reference"


def check_store_option(store: str | None, decode_once: bool | None) -> None:
    """--store DIR names the decoded store's place: given with --no-decode-once, one of the two is a mistake."""
    if store and decode_once is False:
        raise DataError("--store DIR is where the decoded store lives: it goes with --decode-once, not "
                        "--no-decode-once")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `dalipipe train` needs; saved inside every checkpoint and as config.json. Each option is
    declared here once (options.opt): its flag, default, bounds, help, and whether a resume may change it."""

    images_dir: str
    labels_csv: str
    out_dir: str
    epochs: int = opt(30, "Passes over the training split.", low=1, resume=True)
    batch_size: int = opt(64, "Per process.", low=MIN_TRAIN_BATCH,
                          why="for training (BatchNorm learns nothing from one sample)")
    # None: 7e-5 (the reference, for pretrained weights) with --weights, 1e-3 from scratch; filled in at
    # creation, so that config.json and checkpoints record the rate used.
    lr: float | None = opt(None, "Adam's learning rate.", low=0, low_open=True,
                           default_text="7e-5 with --weights/--pretrained, 1e-3 from scratch")
    weight_decay: float = opt(1e-6, "Adam's L2 penalty.", low=0)
    # --image-size, and the rest of the augmentation (not options: the reference's)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    val_fraction: float = opt(0.3, "Share of the labelled samples held out for validation (stratified).",
                              low=0, low_open=True, high=1, high_open=True)
    seed: int = opt(42, "Seeds the split, the shuffling and the augmentation.", low=0, high=SEED_MAX)
    loader: LoaderKind = opt("dali", LOADER_HELP, resume=True)
    device: DeviceName = opt("auto", DEVICE_HELP, resume=True)
    # Loader threads (DALI) or processes (torch) per training process; None: loader_rules.default_workers().
    workers: int | None = opt(None, WORKERS_HELP, low=1, resume=True, default_text=WORKERS_DEFAULT)
    # None: loader_rules.default_threads()
    threads: int | None = opt(None, THREADS_HELP, low=1, resume=True, default_text=THREADS_DEFAULT)
    decoder: DecoderPlacement = opt(
        "mixed", "DALI on a GPU: a mixed decoder per channel, or one CPU pool and one copy per batch.", resume=True)
    # The decoded store (data/decoded_store.py): built by the data check, read by both loaders.
    decode_once: bool = opt(True, DECODE_ONCE_HELP, resume=True)
    store: str | None = opt(None, STORE_HELP, path="folder", resume=True, metavar="DIR", default_text=STORE_DEFAULT)
    # "auto" = bf16 where the GPU has native bf16, else fp16 with a gradient scaler; the CPU always runs fp32.
    precision: Precision = opt(
        "auto", "Mixed precision on a GPU: auto = bf16 where the GPU has native bf16, else fp16 with a gradient "
        "scaler; bf16 and fp16 need a GPU; fp32 turns it off. The CPU runs fp32.", resume=True,
        gpu_values=HALF_PRECISIONS)
    # Run the training steps through torch.compile (compiles first: pays off only over enough steps).
    compile: bool = opt(False, "Run the training steps through torch.compile (compiles first; off until a GPU "
                        "measurement shows it pays).", resume=True)
    # Remember the data check of unchanged files between runs (check_cache); False: check every file.
    check_cache: bool = opt(True, CACHE_HELP, flag="cache", resume=True)
    weights: str | None = opt(None, "Local ImageNet weights for efficientnet-b1.", path="existing file")
    pretrained: bool = opt(False, "Download ImageNet weights (needs internet).")
    # Use exactly this many of the labelled samples (stratified, before the split); None: all of them.
    subset: int | None = opt(None, "Use this many labelled samples, in the classes' proportions (at least one "
                             "of each class).", low=2, default_text="all")
    # Mid-epoch checkpoints (exact resume); the default minutes keep short runs free of them.
    checkpoint_every: int | None = opt(None, "Also save last.pt every N training steps (exact resume "
                                       "mid-epoch).", low=1, resume=True, metavar="N")
    checkpoint_minutes: float | None = opt(5.0, "Also save last.pt mid-epoch every M minutes: a kill costs at "
                                           "most that.", low=0, low_open=True, resume=True, metavar="M")
    # A property of one command (a job's time slot): a resume does not inherit it (run_dir.resume_config).
    time_limit_minutes: float | None = opt(
        None, "Minutes; then stop at the next step with a checkpoint there (resume later with --resume).",
        flag="time-limit", low=0, low_open=True, resume=True, metavar="MINUTES")
    tensorboard: bool = opt(False, "Also write TensorBoard event files to RUN_DIR/tensorboard (needs: pip install "
                            "'dalipipe[tensorboard]'); view them with: tensorboard --logdir RUN_DIR/tensorboard.",
                            resume=True)
    # Beyond the reference recipe; each default leaves it as it was (see recipe.py and ema.py).
    ema: float | None = opt(
        None, "Keep an exponential moving average of the weights (e.g. 0.999; its decay warms up over the first "
        "steps) and validate, save as best.pt and predict with it. Costs one multi-tensor update of a model copy "
        "per step (about 2 ms on a CPU core) and the copy's memory (26 MB).", low=0, low_open=True, high=1,
        high_open=True, why="(e.g. 0.999)", metavar="DECAY", default_text=AS_REFERENCE, section="beyond")
    class_weights: ClassWeights = opt(
        "none", "balanced: weight the cross-entropy by the inverse class frequency of the training split, so that "
        "every class counts equally (the challenge's balanced accuracy does). Free.",
        default_text="none, as the reference", section="beyond")
    schedule: Schedule = opt("constant", "Learning rate per step: constant, or a cosine from --lr down to 0 at the "
                             "last epoch. Free.", default_text="constant, as the reference", section="beyond")
    warmup_epochs: float = opt(0.0, "Raise the learning rate linearly from near 0 to --lr over this many epochs "
                               "first. Free.", default_text="0, as the reference", section="beyond")
    label_smoothing: float = opt(0.0, "Cross-entropy against targets with EPS spread over all classes. Free.",
                                 low=0, high=1, high_open=True, metavar="EPS", default_text="0, as the reference",
                                 section="beyond")
    # Stratified k-fold: fold `fold` (1..folds) of `folds` is the validation split (replaces val_fraction).
    folds: int | None = opt(
        None, "Stratified K-fold split (seeded by --seed: the same folds for the same data and scikit-learn "
        "release) instead of --val-fraction; give --fold too. Costs K runs for an ensemble.", low=2, metavar="K",
        default_text=AS_REFERENCE, section="beyond")
    fold: int | None = opt(None, "With --folds K: fold I (1 to K) is the validation split, the rest is trained "
                           "on.", metavar="I", default_text="none", section="beyond")
    tta_val: bool = opt(False, "Validate with the probabilities averaged over the four flips, as predict --tta "
                        "(about 4x validation's compute).", default_text=AS_REFERENCE, section="beyond")

    def __post_init__(self) -> None:
        options.check(self)  # each option's own bounds and choices, from the table
        # What no single option can say alone.
        checks = [(not (self.weights and self.pretrained), "--weights and --pretrained exclude each other"),
                  (0 <= self.warmup_epochs < self.epochs,
                   f"--warmup-epochs must be at least 0 and less than --epochs ({self.epochs}), got {self.warmup_epochs:g}"),
                  ((self.folds is None) == (self.fold is None), "--folds K and --fold I go together"),
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
        # A run of a release without the decoded store goes on without it: the saved state of its DALI loader
        # fits the graph that decodes PNGs (checkpoint.loader_key), and a mid-epoch resume needs it.
        d.setdefault("decode_once", False)
        return cls(**{k: v for k, v in d.items() if k in known}, augment=AugmentSpec(**aug))

    def loader_settings(self, train: bool, shard_id: int, num_shards: int) -> LoaderSettings:
        # Training shuffles with the run's seed; evaluation keeps file order.
        return LoaderSettings(kind=self.loader, batch_size=self.batch_size, workers=self.workers, seed=self.seed,
                              shard_id=shard_id, num_shards=num_shards, decoder=self.decoder)

    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 7e-5 if (self.weights or self.pretrained) else 1e-3


TRAIN_OPTIONS = options.table(TrainConfig)
# What a resumed run may change; every other setting must equal the run's (given again or not).
RESUME_MAY_CHANGE = tuple(o.name for o in TRAIN_OPTIONS if o.spec.resume)


def spelling(name: str) -> str:
    """The command-line spelling of a TrainConfig option (--[no-]x for the on/off ones)."""
    return next(o.spelling for o in TRAIN_OPTIONS if o.name == name)


def may_change_text() -> str:
    """The options a resume may change, as the --resume help and the docs say it."""
    return options.spoken_list([spelling(k) for k in RESUME_MAY_CHANGE])
