"""A synthetic stand-in for the challenge data, in exactly its layout.

Each sample is one cell centred on a dark background: a compact bright nucleus (blue), filaments
radiating from it (red, microtubules) and a diffuse reticular network around it (yellow, ER). Each
class has its own nucleus size and shape, cell size, filament count and twist, and ER texture scale
and spread; every sample draws its own values around its class's, so that classes overlap and a model
has to learn. Images are rendered in batches with numpy (no per-pixel Python).

At any size an image shows one cell scaled to the image; the real 512 px Human Protein Atlas images show
several cells per field. Up to 128 px the cell is drawn at the image's size; larger images draw it at 128 px
and upsample it (all of it is smooth at that scale), adding only the camera noise per pixel: each channel's
statistics and each class's shapes stay those of 64 px images (tests/test_synthetic.py checks both).
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import shutil
import signal
import struct
import tempfile
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dalipipe.atomic import current_umask
from dalipipe.constants import FILE_PATTERN, REAL_CLASS_COUNTS
from dalipipe.errors import DataError
from dalipipe.settings import SynthSpec

log = logging.getLogger("dalipipe")

# Per-channel gains chosen so that the default set lands near the real statistics
# (0-255 means blue 32.9, red 33.6, yellow 37.5; std 56.5, 42.1, 40.6); tests/test_synthetic.py checks it.
_GAIN = {"blue": 240.0, "red": 218.0, "yellow": 145.0}
# Pixels rendered at once (256 samples at 64 px): the render's float arrays stay near a gigabyte at any size.
_BATCH_PIXELS = 256 * 64 * 64
# Larger images are drawn at this side and upsampled (see render); sizes up to it are drawn as they always were.
_WORK_SIZE = 128


def class_names(n_classes: int) -> list[str]:
    real = list(REAL_CLASS_COUNTS)
    return real[:n_classes] + [f"line-{i + 1}" for i in range(len(real), n_classes)]


def class_weights(n_classes: int) -> np.ndarray:
    counts = list(REAL_CLASS_COUNTS.values())
    w = np.array([counts[i] if i < len(counts) else counts[-1] for i in range(n_classes)], dtype=float)
    return w / w.sum()


def _labels(n: int, n_classes: int, rng: np.random.Generator, min_per_class: int) -> np.ndarray:
    """Exactly proportional class counts (largest remainder), at least min_per_class each, shuffled."""
    raw = class_weights(n_classes) * n
    counts = np.floor(raw).astype(int)
    counts[np.argsort(raw - counts, kind="stable")[::-1][: n - counts.sum()]] += 1
    for k in np.flatnonzero(counts < min_per_class):  # small sets: lift tiny classes, take from the largest
        need = min_per_class - counts[k]
        counts[k] += need
        counts[np.argmax(counts)] -= need
    y = np.repeat(np.arange(n_classes), counts)
    rng.shuffle(y)
    return y


def _class_params(n_classes: int) -> dict[str, np.ndarray]:
    """Each class a point in shape/texture space. Fixed (not seeded by the user's seed) so that the
    same class looks the same in every generated set; spread along each axis so that classes differ
    in several features at once and overlap in each alone."""
    rng = np.random.default_rng(20260101)
    k = n_classes

    def axis(lo: float, hi: float) -> np.ndarray:
        return lo + (hi - lo) * rng.permutation(np.linspace(0, 1, k))

    return {
        "nuc_r": axis(0.19, 0.27),  # nucleus radius, fraction of image size
        "nuc_elong": axis(1.0, 1.5),
        "cell_r": axis(0.33, 0.45),
        "cell_elong": axis(1.0, 1.45),
        "n_fil": axis(5.0, 14.0),
        "twist": axis(-1.0, 1.0),
        "er_scale": axis(5.0, 12.0),  # ER noise grid size: higher is finer texture
        "er_spread": axis(0.15, 0.40),
    }


def _upsampler(lo: int, hi: int) -> np.ndarray:
    """(hi, lo) bilinear interpolation matrix: U @ X @ U.T upsamples an lo x lo grid to hi x hi."""
    pos = (np.arange(hi) + 0.5) * lo / hi - 0.5
    i0 = np.clip(np.floor(pos).astype(int), 0, lo - 1)
    i1 = np.clip(i0 + 1, 0, lo - 1)
    f = np.clip(pos - i0, 0, 1)
    u = np.zeros((hi, lo))
    u[np.arange(hi), i0] += 1 - f
    u[np.arange(hi), i1] += f
    return u


def _smooth_noise(rng: np.random.Generator, b: int, grid: int, size: int) -> np.ndarray:
    u = _upsampler(grid, size)
    u = u.astype(np.float32)
    return u @ rng.standard_normal((b, grid, grid), dtype=np.float32) @ u.T


def _col(v: np.ndarray) -> np.ndarray:
    """Per-sample values as a (B, 1, 1) float32 column that broadcasts over images."""
    return np.asarray(v, dtype=np.float32)[:, None, None]


def render(y: np.ndarray, size: int, rng: np.random.Generator, n_classes: int) -> dict[str, np.ndarray]:
    """Render len(y) cells; returns uint8 arrays (B, size, size) per channel name. Up to _WORK_SIZE the cells
    are drawn at the image size; above it they are drawn at _WORK_SIZE and upsampled bilinearly (every field
    is smooth at that scale), and only the camera noise is drawn per pixel."""
    work = min(size, _WORK_SIZE)
    out = {}
    for name, img in _cells(y, work, rng, n_classes).items():
        if size > work:
            # PIL's bilinear resize computes _upsampler's product (to float32 rounding) on one thread; numpy's
            # matmul would start BLAS's threads, several times slower beside other work.
            img = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR))
                            for a in img])
            noise = np.take(_normal_quantiles(), rng.integers(0, 2**16, img.shape, dtype=np.uint16))
        else:
            noise = rng.standard_normal(img.shape, dtype=np.float32)
        # img * gain + 2 * noise (camera noise on a dark background), in place: large images spend their time here.
        img *= _GAIN[name]
        noise *= 2.0
        img += noise
        out[name] = np.clip(np.round(img, out=img), 0, 255, out=img).astype(np.uint8)
    return out


@functools.cache
def _normal_quantiles() -> np.ndarray:
    """2**16 evenly spaced quantiles of the standard normal: indexed by random 16-bit integers they draw it
    about 4x faster than rng.standard_normal, which was the largest cost of large images."""
    d = NormalDist()
    return np.array([d.inv_cdf((i + 0.5) / 2**16) for i in range(2**16)], dtype=np.float32)


def _cells(y: np.ndarray, size: int, rng: np.random.Generator, n_classes: int) -> dict[str, np.ndarray]:
    """The noiseless cells, float32 (B, size, size) per channel name, 1.0 at the channel's gain."""
    b = len(y)
    cp = {k: v[y] for k, v in _class_params(n_classes).items()}

    def jitter(v: np.ndarray, rel: float) -> np.ndarray:
        return _col(v * rng.normal(1.0, rel, b))

    s = float(size)
    grid = (np.arange(size, dtype=np.float32) + 0.5 - s / 2)[None, :]
    cx = _col(rng.normal(0, 0.04 * s, b))
    cy = _col(rng.normal(0, 0.04 * s, b))
    xx = grid[:, None, :] - cx
    yy = grid[:, :, None] - cy
    phi = _col(rng.uniform(0, np.pi, b))
    u = xx * np.cos(phi) + yy * np.sin(phi)
    v = -xx * np.sin(phi) + yy * np.cos(phi)
    r = np.hypot(u, v) + 1e-6
    theta = np.arctan2(v, u)

    nuc_r = jitter(cp["nuc_r"], 0.10) * s
    nuc_e = np.maximum(jitter(cp["nuc_elong"], 0.08), 1.0)
    rn = np.hypot(u / (nuc_r * np.sqrt(nuc_e)), v * np.sqrt(nuc_e) / nuc_r)
    nucleus = 1 / (1 + np.exp((rn - 1) * 9))
    chromatin = 0.75 + 0.12 * _smooth_noise(rng, b, 10, size)
    blue = nucleus * chromatin * _col(rng.uniform(0.8, 1.2, b))

    cell_r = jitter(cp["cell_r"], 0.08) * s
    cell_e = np.maximum(jitter(cp["cell_elong"], 0.08), 1.0)
    rc = np.hypot(u / (cell_r * np.sqrt(cell_e)), v * np.sqrt(cell_e) / cell_r)
    cell = 1 / (1 + np.exp((rc - 1) * 7))

    n_fil = np.round(jitter(cp["n_fil"], 0.10))
    twist = jitter(cp["twist"], 0.2) + _col(rng.normal(0, 0.2, b))
    phase = _col(rng.uniform(0, 2 * np.pi, b))
    # Wiggle the filaments' angle with smooth noise so that they bend like microtubules.
    wiggle = 0.5 * _smooth_noise(rng, b, 6, size) / np.maximum(n_fil, 1)
    fil = (0.5 + 0.5 * np.cos(n_fil * (theta + twist * r / s + wiggle) + phase)) ** 4
    fil_tex = np.clip(1 + 0.5 * _smooth_noise(rng, b, 14, size), 0, None)
    red = cell * (0.15 + 0.85 * fil * fil_tex) * (1 - 0.55 * nucleus) * _col(rng.uniform(0.75, 1.25, b))

    er_grid = np.clip(jitter(cp["er_scale"], 0.08), 3, None)
    er = np.zeros((b, size, size), dtype=np.float32)
    for g in np.unique(np.round(er_grid).astype(int)):  # one noise grid size per group of samples
        idx = np.flatnonzero(np.round(er_grid[:, 0, 0]).astype(int) == g)
        n = _smooth_noise(rng, len(idx), int(g), size)
        er[idx] = np.exp(-((n / 0.6) ** 2))  # zero crossings of smooth noise: a reticular network
    spread = jitter(cp["er_spread"], 0.10) * s
    perinuclear = np.exp(-np.maximum(rn - 1, 0) * nuc_r / spread)
    yellow = cell * perinuclear * (0.35 + 0.65 * er) * _col(rng.uniform(0.75, 1.25, b))
    return {"blue": blue, "red": red, "yellow": yellow}


def _write_split(folder: Path, ids: np.ndarray, y: np.ndarray, *, spec: SynthSpec, rng: np.random.Generator,
                 desc: str) -> None:
    folder.mkdir(parents=True)
    size = spec.image_size
    batch = max(1, _BATCH_PIXELS // size**2)
    # Threads write the PNGs (numpy, zlib and PIL's encoder release the GIL) while the next batch renders;
    # one batch in flight keeps memory bounded, and the one rendering thread keeps a few writers busy at most.
    with tqdm(total=len(ids), desc=desc, unit="sample", leave=False) as bar, \
            ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        pending: list = []
        for start in range(0, len(ids), batch):
            sl = slice(start, start + batch)
            chans = render(y[sl], size, rng, spec.n_classes)
            _wait(pending, bar)
            pending = [pool.submit(_save_sample, folder, int(fid), {name: a[j] for name, a in chans.items()})
                       for j, fid in enumerate(ids[sl])]
        _wait(pending, bar)


def _wait(futures: list, bar: tqdm) -> None:
    for f in futures:
        f.result()
    bar.update(len(futures))


def _save_sample(folder: Path, file_id: int, chans: dict[str, np.ndarray]) -> None:
    for name, arr in chans.items():
        path = folder / FILE_PATTERN.format(file_id=file_id, channel=name)
        if arr.shape[0] > _WORK_SIZE:
            path.write_bytes(_png(arr))
        else:  # as sets up to _WORK_SIZE have always been written: a seed still gives the same files
            Image.fromarray(arr).save(path, compress_level=1)


def _png(a: np.ndarray) -> bytes:
    """An 8-bit gray PNG of a 2-D uint8 array, every row Sub-filtered, deflated at level 1 with Huffman coding
    only (camera noise leaves few repeats to find): 3-4x faster than PIL's encoder, which tries four filters
    on every row, and 10-15% smaller."""
    h, w = a.shape
    rows = np.empty((h, w + 1), np.uint8)
    rows[:, 0] = 1  # filter type Sub: each byte minus its left neighbour, modulo 256
    rows[:, 1] = a[:, 0]
    np.subtract(a[:, 1:], a[:, :-1], out=rows[:, 2:])
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    idat = z.compress(rows) + z.flush()
    return b"".join([b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)),
                     _chunk(b"IDAT", idat), _chunk(b"IEND", b"")])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def generate(out_dir: str | Path, spec: SynthSpec = SynthSpec(), force: bool = False) -> Path:
    """Write the dataset to out_dir atomically: into a temporary sibling, renamed into place once complete;
    with force, an existing out_dir is replaced only then (a stop before leaves it as it was)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(f"{out}: exists and is not empty; choose another folder or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    # mkdtemp makes the folder 0700; the data set follows the user's umask like its subfolders.
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        rng = np.random.default_rng(spec.seed)
        names = np.array(class_names(spec.n_classes), dtype=object)
        y_train = _labels(spec.n_train, spec.n_classes, rng, min_per_class=2)
        y_test = _labels(spec.n_test, spec.n_classes, rng, min_per_class=0)
        train_ids = np.arange(1, spec.n_train + 1)
        test_ids = np.arange(spec.n_train + 1, spec.n_train + spec.n_test + 1)
        _write_split(tmp / "images_train", train_ids, y_train, spec=spec, rng=rng, desc="train images")
        _write_split(tmp / "images_test", test_ids, y_test, spec=spec, rng=rng, desc="test images")
        _write_labels(tmp / "y_train.csv", train_ids, names[y_train])
        _write_labels(tmp / "y_test.csv", test_ids, names[y_test])
        _write_labels(tmp / "sample_submission.csv", test_ids, [names[0]] * len(test_ids))
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_labels(path: Path, ids: np.ndarray, names: Iterable[str]) -> None:
    """The CSV that pandas' to_csv wrote before (the same bytes), without importing pandas: a fifth of a
    second that every `dalipipe synth` paid at start."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file_id", "cell_line"])
        writer.writerows(zip(ids.tolist(), names))


def _replace_folder(new: Path, out: Path) -> None:
    """new renamed to out; an existing out is moved aside first and removed only once new is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "data")
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old / "data", out)
            old.rmdir()
        raise
    if old is not None:
        _remove_replaced(old)


def _remove_replaced(folder: Path) -> None:
    """The replaced set, removed. The new one is in place by now: a Ctrl-C here would leave gigabytes in a
    hidden folder and a message saying nothing was written, so the removal finishes first (seconds)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: no signal reaches this thread anyway
        previous = None
    try:
        shutil.rmtree(folder)
    except OSError as e:
        log.warning(f"warning: the replaced data set is left in {folder} ({e.strerror or type(e).__name__}); "
                    "remove it by hand")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

