"""Every fixed fact of the challenge in one place."""

# RGB order of the stacked image: R = ER (yellow), G = microtubules (red), B = nucleus (blue),
# as the reference solution stacked them.
CHANNELS: tuple[str, ...] = ("yellow", "red", "blue")
FILE_PATTERN = "{file_id:05d}_{channel}.png"
# Matches every channel file name; the id may have more than five digits for large sets.
FILE_REGEX = r"^(?P<file_id>\d+)_(?P<channel>[a-z]+)\.png$"

LABEL_COLUMNS: tuple[str, str] = ("file_id", "cell_line")

# The real challenge's classes and training counts (used by the synthetic generator only:
# training always takes its classes from the labels file).
REAL_CLASS_COUNTS: dict[str, int] = {
    "RT4": 2100,
    "CACO-2": 1626,
    "HEK 293": 1378,
    "MCF7": 1082,
    "U-2 OS": 775,
    "U-251 MG": 768,
    "PC-3": 663,
    "HeLa": 632,
    "A549": 608,
}
REAL_N_TRAIN = 9632
REAL_N_TEST = 6869
REAL_IMAGE_SIZE = 64

# Real per-channel statistics on the 0-255 scale, in file-channel naming.
REAL_MEAN: dict[str, float] = {"blue": 32.9, "red": 33.6, "yellow": 37.5}
REAL_STD: dict[str, float] = {"blue": 56.5, "red": 42.1, "yellow": 40.6}

MODEL_NAME = "efficientnet-b1"
# The smallest input side efficientnet-b1 takes: below it, the feature map shrinks under the kernel of a
# late stage (found by trying every side from 8 up, in training and evaluation mode).
MIN_IMAGE_SIZE = 16

# Run-directory layout.
CKPT_LAST = "last.pt"
CKPT_BEST = "best.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
CURVES_PNG = "learning_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
VAL_PREDICTIONS = "val_predictions.csv"
VAL_PER_CLASS = "val_per_class.csv"  # the best epoch's precision, recall and F1 of each class
TRAIN_BATCH_PNG = "train_batch.png"  # the first training batch as the model receives it
TENSORBOARD_DIR = "tensorboard"  # train --tensorboard: the event files
# `dalipipe preview --out`: the picture's format follows its name.
PICTURE_FORMATS: dict[str, str] = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}
MAX_BATCH_PICTURE = 64  # images of the first batch drawn in train_batch.png
LOCK_FILE = ".dalipipe.lock"

# Exit statuses of the CLI: bad input or options (one-line error), a dalipipe bug (traceback), a run
# stopped by --time-limit with a checkpoint to resume from (EX_TEMPFAIL: "try again later", so that a job
# script can requeue it), Ctrl-C, and SIGTERM.
EXIT_USER = 2
EXIT_INTERNAL = 3
EXIT_TIME_LIMIT = 75
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # SIGTERM (128 + 15), stopped as Ctrl-C stops a command

# The smallest training batch: BatchNorm in training mode needs more than one value per channel. A
# last batch smaller than this is dropped, on every rank alike (see loader_rules.train_plan).
MIN_TRAIN_BATCH = 2

# Seeds: what NumPy's legacy generator and scikit-learn's random_state take (unsigned 32-bit).
SEED_MAX = 2**32 - 1

# `dalipipe synth`'s largest image side and sample counts: full-resolution Human Protein Atlas images are
# 2048-3072 px, and the challenge has 9,632 training samples; past these a synthetic set takes days to draw.
SYNTH_MAX_SIZE = 4096
SYNTH_MAX_SAMPLES = 1_000_000

# Disk space the decoded store always leaves free on its disk: a store that would leave less is refused before
# anything is written (a full disk fails every other program, and the run's own checkpoints too).
STORE_RESERVE_BYTES = 2 * 10**9

# Loader threads (DALI) or worker processes (torch) per training process, at most, when not given.
MAX_DEFAULT_WORKERS = 8

# A training epoch that waits for data more than this share of its time gets one line of advice (once per
# command). Below it, the fastest loader could win back at most a tenth of the epoch, within what two epochs'
# times differ by on a shared machine; above it, the loader's settings are worth a look.
DATA_WAIT_ADVICE_SHARE = 0.10

# How long the main process waits for the torch loader's next batch before it ends the command with a line
# that names the loader and the batch, instead of hanging without a word (a worker stuck in a read of a hung
# network file system, a deadlock). Generous: a worker's first batch of large images on a machine loaded
# several times over takes tens of seconds, and a false alarm would end a healthy run.
TORCH_LOADER_TIMEOUT_S = 300.0
