"""The pictures of a run and of `dalipipe preview` (matplotlib, headless): each drawn into the file it is
given, which the caller renames into place (atomic.write_atomic, atomic.write_file)."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Iterator

import numpy as np

from dalipipe.constants import DATA_WAIT_ADVICE_SHARE

log = logging.getLogger("dalipipe")
_told: set[str] = set()  # class names already named in the missing-font notice
LAST_RESORT = "Last Resort"  # characters already reported as missing from every font


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    from matplotlib import font_manager

    try:
        return frozenset(font_manager.get_font(path).get_charmap())
    except (OSError, RuntimeError):  # a broken font file on the machine: skip it
        return frozenset()


@contextlib.contextmanager
def fonts_for(texts: list[str]) -> Iterator[None]:
    """Draw these texts (class names) with any characters they hold: matplotlib's default font first, then
    installed fonts that have what it lacks (matplotlib's font fallback). Characters no installed font has
    are drawn as boxes, said once per process in one line instead of a warning per glyph and figure."""
    import matplotlib
    from matplotlib import font_manager

    base = font_manager.FontProperties(family=matplotlib.rcParams["font.family"])
    have = _charmap(font_manager.findfont(base))
    missing = {c for c in "".join(texts) if not c.isspace() and ord(c) not in have}
    families = list(matplotlib.rcParams["font.family"])
    # matplotlib ships "Last Resort", whose every glyph is a placeholder box: the final fallback, not a font
    # that has the characters.
    for entry in font_manager.fontManager.ttflist if missing else []:
        if entry.name.startswith(LAST_RESORT):
            continue
        covered = {c for c in missing if ord(c) in _charmap(entry.fname)}
        if covered and entry.name not in families:
            families.append(entry.name)
            missing -= covered
        if not missing:
            break
    if missing:
        families += sorted({e.name for e in font_manager.fontManager.ttflist if e.name.startswith(LAST_RESORT)})
    # Each name drawn with boxes is named once per process, the first time a plot draws it: a later plot may
    # draw other names with the same characters.
    names = [t for t in dict.fromkeys(texts) if set(t) & missing and t not in _told]
    if names:
        _told.update(names)
        chars = "".join(sorted(missing & set("".join(names))))
        log.warning(f"warning: no installed font has the characters {chars} of {', '.join(repr(n) for n in names)}: "
                    "the plots draw them as boxes (install a font that has them, e.g. Noto Sans CJK, to see them)")
    with matplotlib.rc_context({"font.family": families}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield


def warm_up() -> None:
    """Import what drawing needs (about a second), ahead of the first plot."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def _figure(figsize: tuple[float, float]):
    """A figure of its own, outside pyplot's global state: the run recorder draws in its writer thread."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _write_png(fig, path: str) -> None:
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")


def learning_curves_png(history: list[dict], path: str) -> None:
    _write_png(learning_curves_figure(history), path)


def learning_curves_figure(history: list[dict]):
    """Losses, balanced accuracy, learning rate and data wait per epoch, side by side; each panel's labels
    clear of its neighbours (matplotlib's constrained layout)."""
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig = _figure((18, 3.8))
    fig.set_layout_engine("constrained")
    ax1, ax2, ax3, ax4 = fig.subplots(1, 4)
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(ep, [h["val_balanced_accuracy"] for h in history], "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation balanced accuracy")
    ax2.set_ylim(0, 1)
    # The learning rate of each epoch (its mean over the epoch's steps under a schedule); runs of older
    # dalipipe releases did not record it.
    rated = [h for h in history if "lr" in h]
    ax3.plot([h["epoch"] for h in rated], [h["lr"] for h in rated], "o-", color="C3")
    ax3.set_xlabel("epoch")
    ax3.set_ylabel("learning rate (epoch mean)")
    ax3.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    # Whether the loader kept the model busy (older releases did not measure it).
    waited = [h for h in history if "data_wait_share" in h]
    ax4.bar([h["epoch"] for h in waited], [100 * h["data_wait_share"] for h in waited], color="C4")
    ax4.axhline(100 * DATA_WAIT_ADVICE_SHARE, color="0.5", linestyle="--", linewidth=1)
    ax4.set_xlabel("epoch")
    ax4.set_ylabel("waiting for data (% of training)")
    ax4.set_ylim(0, max([100 * DATA_WAIT_ADVICE_SHARE * 2] + [100 * h["data_wait_share"] * 1.1 for h in waited]))
    for ax in (ax1, ax2, ax3, ax4):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    return fig


def confusion_png(cm: np.ndarray, names: list[str], title: str, path: str) -> None:
    with fonts_for(names):  # around the drawing and the saving: text is laid out when saved
        _write_png(confusion_figure(cm, names, title), path)


def confusion_figure(cm: np.ndarray, names: list[str], title: str):
    """Rows: the true class, normalized; each cell shows its count. Draw or save it inside fonts_for(names)."""
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = _figure((1.0 + 0.7 * len(names), 0.6 + 0.6 * len(names)))
    ax = fig.subplots()
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rows[i, j] > 0.5 else "black")
    return fig


# Image grids: one cell per image, at a fixed size, so that a grid's picture has a known size.
CELL_IN = 1.3  # inches per cell (at GRID_DPI)
GRID_DPI = 100
LABEL_IN = 1.0  # the row labels' column (preview)
TITLE_IN = 0.7  # the title and the column titles (two lines each)


def batch_grid_png(images: np.ndarray, captions: list[str], title: str, path: str, columns: int = 8) -> None:
    """A batch as the model receives it: uint8 RGB images (N, H, W, 3), a caption under each."""
    n = len(images)
    cols = min(columns, n)
    rows = -(-n // cols)
    with fonts_for(captions):
        fig = _figure((CELL_IN * cols, TITLE_IN + CELL_IN * rows))
        fig.suptitle(title, fontsize=9)
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, gridspec_kw={"hspace": 0.35})).ravel()
        for ax in axes:
            ax.axis("off")
        for ax, image, caption in zip(axes, images, captions):
            ax.imshow(image, interpolation="nearest")
            ax.set_title(caption, fontsize=7, pad=2)
        fig.savefig(path, format="png", dpi=GRID_DPI, bbox_inches="tight", pad_inches=0.1)


def preview_picture(rows: list[tuple[str, list[np.ndarray]]], column_titles: list[str], title: str, fmt: str,
                    path: str) -> None:
    """One row per sample: (its label, its cells); a cell is gray (H, W) or RGB (H, W, 3) uint8, drawn
    without smoothing. The picture is LABEL_IN + CELL_IN per column wide and TITLE_IN + CELL_IN per row
    high, at GRID_DPI, in the format fmt (matplotlib's name: png, jpeg, pdf, svg)."""
    n_rows, n_cols = len(rows), len(column_titles)
    with fonts_for([label for label, _ in rows]):
        width, height = LABEL_IN + CELL_IN * n_cols, TITLE_IN + CELL_IN * n_rows
        fig = _figure((width, height))
        fig.suptitle(title, fontsize=8, y=1 - 0.05 / height, va="top")
        for r, (label, cells) in enumerate(rows):
            for c, cell in enumerate(cells):
                # Axes placed in inches from the top left, so that every cell has the same size.
                ax = fig.add_axes(((LABEL_IN + CELL_IN * c + 0.05) / width, 1 - (TITLE_IN + CELL_IN * (r + 1) - 0.05) / height,
                                   (CELL_IN - 0.1) / width, (CELL_IN - 0.1) / height))
                # Pixels as they are when enlarged; smoothed when shrunk (nearest would alias a 224 px image).
                shrunk = max(cell.shape[:2]) > CELL_IN * GRID_DPI
                ax.imshow(cell, cmap="gray" if cell.ndim == 2 else None, vmin=0, vmax=255,
                          interpolation="antialiased" if shrunk else "nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(column_titles[c], fontsize=8, pad=3)
                if c == 0:
                    ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center", labelpad=6)
        fig.savefig(path, format=fmt, dpi=GRID_DPI)
