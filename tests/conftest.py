"""Shared fixtures: small synthetic datasets and helpers that write hand-made samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalipipe.data.synthetic import generate
from dalipipe.settings import SynthSpec

# PngSuite (Willem van Schaik; free to copy, see its LICENSE) travels with the tests.
PNGSUITE = Path(__file__).resolve().parent / "data" / "pngsuite"


def write_sample(folder: Path, fid: int, yellow: np.ndarray, red: np.ndarray, blue: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("yellow", yellow), ("red", red), ("blue", blue)):
        Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(folder / f"{fid:05d}_{name}.png")


def write_labels(path: Path, rows: list[tuple[int, str]]) -> None:
    path.write_text("file_id,cell_line\n" + "".join(f"{i},{c}\n" for i, c in rows))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The check cache of the tests (and of the commands they start) is theirs, not the user's."""
    import os

    os.environ["DALIPIPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory) -> Path:
    """4 classes, 240 labelled + 60 test samples, 32 px."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return generate(out, SynthSpec(n_train=240, n_test=60, n_classes=4, image_size=32, seed=3))


@pytest.fixture
def synth_copy(small_synth, tmp_path) -> Path:
    """A private copy that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(small_synth, dst)
    return dst


def pngsuite() -> Path:
    # Vendored with the tests: missing means a broken checkout, which must fail, not skip.
    assert (PNGSUITE / "basn0g08.png").is_file(), f"PngSuite missing from {PNGSUITE}"
    return PNGSUITE
