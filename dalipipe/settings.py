"""Typed settings of the commands other than `train` (whose settings are config.TrainConfig): each option
declared once, on its field (options.opt), with its default read from the one place that defines it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dalipipe import options
from dalipipe.config import (AS_REFERENCE, CACHE_HELP, DEVICE_HELP, LOADER_HELP, THREADS_DEFAULT, THREADS_HELP,
                             WORKERS_DEFAULT, WORKERS_HELP, AugmentSpec, DeviceName, LoaderKind, TrainConfig,
                             check_store_option)
from dalipipe.constants import (MIN_IMAGE_SIZE, MIN_TRAIN_BATCH, PICTURE_FORMATS, REAL_CLASS_COUNTS, REAL_IMAGE_SIZE,
                                REAL_N_TEST, REAL_N_TRAIN, SEED_MAX, SYNTH_MAX_SAMPLES, SYNTH_MAX_SIZE)
from dalipipe.errors import DataError
from dalipipe.options import opt


def like(cls: type, name: str, help: str) -> Any:
    """An option that is another settings' option (its default and bounds) under a help text of its own."""
    o = options.find(cls, name)
    return dataclasses.field(default=o.default, metadata={options._SPEC: dataclasses.replace(o.spec, help=help)})


def _workers() -> Any:
    return opt(None, WORKERS_HELP, low=1, default_text=WORKERS_DEFAULT)


def _cache() -> Any:
    return opt(True, CACHE_HELP, flag="cache")


PICTURE_NAMES = ", ".join(PICTURE_FORMATS)  # as the messages list them: .png, .jpg, .jpeg, .pdf, .svg


class _Checked:
    """Settings whose options the table checks (bounds, choices) as they are made."""

    def __post_init__(self) -> None:
        options.check(self)


@dataclass(frozen=True)
class PredictSettings(_Checked):
    """`dalipipe predict`: one checkpoint (or run) or several (an ensemble) over IMAGES_DIR."""

    checkpoints: tuple[str, ...]
    images_dir: str
    out_csv: str = opt(None, "Submission CSV to write.", flag="out", required=True, path="file")
    ids_csv: str | None = opt(None, "CSV whose file_id column restricts and orders the output.", flag="ids",
                                path="file")
    probs: bool = opt(False, "Add one probability column per class.")
    loader: LoaderKind = opt("dali", LOADER_HELP + " Both give the same predictions.")
    device: DeviceName = opt("auto", DEVICE_HELP)
    batch_size: int = opt(64, "Samples per inference batch (memory and speed).", low=1)
    workers: int | None = _workers()
    threads: int | None = opt(None, THREADS_HELP, low=1, default_text=THREADS_DEFAULT)
    tta: bool = opt(False, "Average each image's probabilities over it and its horizontal, vertical and double "
                    "flips (4x the compute of a plain prediction).", default_text=AS_REFERENCE)
    force: bool = opt(False, "Replace --out if it exists.", switch=True)
    check_cache: bool = _cache()
    decode_once: bool = like(TrainConfig, "decode_once", "As for train: decode each PNG once, into the decoded "
                             "store, which a later prediction over the same images then reads.")
    store: str | None = like(TrainConfig, "store", "As for train: where the decoded store lives.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_store_option(self.store, self.decode_once)

@dataclass(frozen=True)
class PreviewSettings(_Checked):
    """`dalipipe preview`: what the loaders hand the model for a few samples, beside the stored channels."""

    images_dir: str
    labels_csv: str
    out_png: str = opt("preview.png", f"The picture to write: {PICTURE_NAMES} (the format follows the name).",
                       flag="out", path="file")
    loader: Literal["dali", "torch", "both"] = opt("both", "Whose output to show; both: side by side.")
    # A training loader (--augment) drops a batch smaller than MIN_TRAIN_BATCH.
    n: int = opt(16, "Samples (rows), drawn in the classes' proportions.", low=MIN_TRAIN_BATCH)
    augment: bool = opt(True, "The training augmentation (random crop, rotation, flips), or the evaluation resize "
                        "only (the two loaders then agree: the title says by how much).")
    # The loaders take any size: no model here, so not the model's minimum.
    image_size: int = opt(options.find(AugmentSpec, "image_size").default, "Side of the model input, in pixels.",
                          low=1)
    seed: int = opt(0, "Seeds the samples drawn and the augmentation.", low=0, high=SEED_MAX)
    device: DeviceName = opt("auto", DEVICE_HELP)
    workers: int | None = _workers()
    force: bool = opt(False, "Replace --out if it exists.", switch=True)
    check_cache: bool = _cache()

    def __post_init__(self) -> None:
        super().__post_init__()
        if Path(self.out_png).suffix.lower() not in PICTURE_FORMATS:
            raise DataError(f"--out {self.out_png}: name a {PICTURE_NAMES} file (the picture's format follows its "
                            "name)")

    @property
    def picture_format(self) -> str:
        return PICTURE_FORMATS[Path(self.out_png).suffix.lower()]


@dataclass(frozen=True)
class CheckSettings(_Checked):
    """`dalipipe check`: the data check of a run, and the split it would make."""

    images_dir: str
    labels_csv: str | None = None
    val_fraction: float = like(TrainConfig, "val_fraction", "As for train: the share held out for validation, "
                               "for the split shown.")
    seed: int = like(TrainConfig, "seed", "As for train: the seed of the split shown.")
    check_cache: bool = _cache()
    # Off unless asked (None: not given): a check alone writes nothing; with it, train and predict find the
    # store built.
    decode_once: bool | None = opt(None, "Also build the decoded store that train and predict read (as their "
                                   "--decode-once, on by default there), so that a run starts with every PNG "
                                   "decoded.", default_text="off: check only")
    store: str | None = like(TrainConfig, "store", "As for train: where the decoded store lives; given, the check "
                             "builds the store there (as --decode-once).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_store_option(self.store, self.decode_once)
        object.__setattr__(self, "decode_once", bool(self.decode_once or self.store))  # a place named: a store asked

@dataclass(frozen=True)
class SynthSpec:
    """`dalipipe synth`: a synthetic data set in the challenge's layout (the real one's sizes by default)."""

    n_train: int = opt(REAL_N_TRAIN, "Training samples.", high=SYNTH_MAX_SAMPLES)
    n_test: int = opt(REAL_N_TEST, "Test samples.", low=0, high=SYNTH_MAX_SAMPLES)
    n_classes: int = opt(len(REAL_CLASS_COUNTS), "Number of cell lines.", flag="classes", low=2)
    # Trainable: efficientnet-b1's smallest input; at most a full-resolution microscope image.
    image_size: int = opt(REAL_IMAGE_SIZE, "Image side in pixels.", flag="size", low=MIN_IMAGE_SIZE,
                          high=SYNTH_MAX_SIZE)
    seed: int = opt(0, "Seeds the images and the labels drawn.", low=0, high=SEED_MAX)

    def __post_init__(self) -> None:
        options.check(self)
        if self.n_train < 2 * self.n_classes:  # a stratified split needs two of each class
            raise DataError(f"--n-train must be at least 2 per class ({2 * self.n_classes}), got {self.n_train}")


@dataclass(frozen=True)
class LoaderSpeedSettings(_Checked):
    """`benchmarks/loader_speed.py`: the options it shares with train, with train's defaults and bounds
    (every row builds a training loader: its --batch-size is a training batch), and its own."""

    device: DeviceName = like(TrainConfig, "device", DEVICE_HELP)
    batch_size: int = like(TrainConfig, "batch_size", "Samples per batch in every row (a training batch: each "
                           "row builds a training loader).")
    image_size: int = like(AugmentSpec, "image_size", "Side of the loaders' output (and the model's input), in "
                           "pixels.")
    workers: int | None = like(TrainConfig, "workers", "Loader threads (DALI) or processes (torch) in each row, "
                               "as `dalipipe train` takes them.")
    threads: int | None = like(TrainConfig, "threads", "torch's threads in each row's process, as `dalipipe train` "
                               "takes them.")
    epochs: int | None = opt(None, "Timed epochs after one warm-up epoch.", low=1,
                             default_text="3; 1 for --train on a CPU")
    limit: int | None = opt(None, "Use at most this many samples.", low=2, default_text="all; 128 for --train on a CPU")
    profile_steps: int = opt(30, "With --profile: training steps recorded.", low=1)
    # The cost-by-size mode (benchmarks/cost_by_size.py). A list of sides: the table's types are single values,
    # so it is text, read by source_size_list.
    source_sizes: str | None = opt(None, "What each source image size costs: for each side given (pixels, "
                                   "comma-separated), a synthetic set of --limit samples of that size, its data check "
                                   "cold and warm, and the torch and dali rows loading it at --image-size.",
                                   metavar="PX,PX,...", default_text="off; with it, --limit defaults to 10 batches")
    gpu_step_rate: float | None = opt(None, "With --source-sizes: a training step's images/s on a GPU, known from "
                                      "elsewhere (nothing here measures it), set against each loader's projected "
                                      "rate.", low=0, low_open=True, metavar="IMAGES_PER_S")
    projected_cores: int = opt(16, "With --source-sizes: the CPU cores of the GPU machine that each loader's rate "
                               "per core is projected to.", low=1)

    @property
    def source_size_list(self) -> tuple[int, ...]:
        """--source-sizes as sides in pixels, in the order given; a DataError names a side that is not one."""
        sides: list[int] = []
        for part in (self.source_sizes or "").split(","):
            try:
                side = int(part)
            except ValueError:
                raise DataError(f"--source-sizes takes sides in pixels separated by commas (64,256,512), got "
                                f"'{self.source_sizes}'") from None
            if not MIN_IMAGE_SIZE <= side <= SYNTH_MAX_SIZE:  # the synthetic set's bounds (synth --size)
                raise DataError(f"--source-sizes: each side must be in [{MIN_IMAGE_SIZE}, {SYNTH_MAX_SIZE}], "
                                f"got {side}")
            if side not in sides:
                sides.append(side)
        return tuple(sides)
