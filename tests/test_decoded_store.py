"""The decoded store (data/decoded_store.py): the loaders hand out the same batches from it as from the PNGs,
no PNG is opened once it holds a sample, a changed PNG is decoded again, a killed writer leaves nothing that a
later run trusts, and a store the disk cannot hold is refused before anything is written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalipipe.config import AugmentSpec, LoaderSettings
from dalipipe.data import decoded_store
from dalipipe.data.check_cache import file_signature
from dalipipe.data.decoded_store import DecodedStore
from dalipipe.data.index import PATH_COLUMNS, STORE_COLUMN, build_index, inspect_images
from dalipipe.data.pngio import read_sample
from dalipipe.errors import DataError
from dalipipe.loading.loaders import make_loader
from tests.test_cli import assert_one_line_error, dalipipe
from tests.test_loaders import RAW

CPU = torch.device("cpu")
SPEC = AugmentSpec(image_size=24)


def _batches(index, *, kind, train, shard_id=0, num_shards=1, state=None, stop_after=None):
    """Two epochs of (images, targets), or the first `stop_after` batches and the loader's state then."""
    settings = LoaderSettings(kind=kind, batch_size=16, workers=2, seed=5, shard_id=shard_id, num_shards=num_shards,
                              checkpointing=True)
    loader = make_loader(index, np.arange(len(index)), spec=SPEC, norm=RAW, train=train, device=CPU,
                         settings=settings, state=state)
    out, saved = [], None
    try:
        for _ in range(2):
            for x, y in loader:
                out.append((x.clone(), y.clone()))
                if stop_after is not None and len(out) == stop_after:
                    saved = loader.state()
                    return out, saved
    finally:
        loader.close()
    return out, saved


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


@pytest.fixture(scope="module")
def both(small_synth, tmp_path_factory):
    """The training images' index as the check gives it without the store and with one. The check without the
    store runs first, so that the one with it remembers every sample: it stores them all the same (what
    test_a_stored_file_holds_the_pngs_decoded_pixels reads)."""
    index = build_index(small_synth / "images_train", small_synth / "y_train.csv")
    store = tmp_path_factory.mktemp("store")
    return inspect_images(index, progress=False), inspect_images(index, progress=False, store=store)


@pytest.mark.parametrize("kind", ["torch", "dali"])
@pytest.mark.parametrize("train", [True, False])
def test_the_store_gives_the_batches_of_the_pngs(both, kind, train):
    plain, stored = both
    assert STORE_COLUMN not in plain.columns and STORE_COLUMN in stored.columns
    a, _ = _batches(plain, kind=kind, train=train)
    b, _ = _batches(stored, kind=kind, train=train)
    assert len(a) >= 2 * 14 and _same(a, b)
    if train:  # augmented: the two epochs differ, so that the equality above says something of the order
        assert not torch.equal(a[0][1], a[len(a) // 2][1])


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_a_shard_and_a_resumed_loader_read_the_store_as_the_pngs(both, kind):
    """Rank 1 of 2, and a loader stopped after 5 batches and built again from its state: the same batches
    as decoding the PNGs."""
    plain, stored = both
    a, _ = _batches(plain, kind=kind, train=True, shard_id=1, num_shards=2)
    b, _ = _batches(stored, kind=kind, train=True, shard_id=1, num_shards=2)
    assert _same(a, b)
    head, state = _batches(stored, kind=kind, train=True, stop_after=5)
    rest, _ = _batches(stored, kind=kind, train=True, state=state)
    whole, _ = _batches(plain, kind=kind, train=True)
    assert _same(whole[:5], head) and _same(whole[5:5 + len(rest)], rest) and len(rest) > 10


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_images_of_different_sizes_come_from_the_store_as_from_the_pngs(tmp_path, kind):
    """Samples of several sizes and shapes in one set, some larger than the model input (shrunk), augmented."""
    from tests.conftest import write_labels, write_sample

    rng = np.random.default_rng(4)
    folder = tmp_path / "images"
    shapes = [(40, 30), (64, 64), (90, 150), (200, 120)]
    for fid in range(1, 33):
        h, w = shapes[fid % len(shapes)]
        write_sample(folder, fid, *rng.integers(0, 256, (3, h, w)))
    write_labels(tmp_path / "y.csv", [(fid, "AB"[fid % 2]) for fid in range(1, 33)])
    index = build_index(folder, tmp_path / "y.csv")
    plain = inspect_images(index, progress=False)
    stored = inspect_images(index, progress=False, store=tmp_path / "store")
    assert sorted({decoded_store.read(f).shape for f in stored[STORE_COLUMN]}) == sorted((3, h, w) for h, w in shapes)
    a, _ = _batches(plain, kind=kind, train=True)
    b, _ = _batches(stored, kind=kind, train=True)
    assert len(a) == 4 and _same(a, b)


def test_a_stored_file_holds_the_pngs_decoded_pixels(both):
    _, stored = both
    for row in stored.head(5).itertuples():
        pixels = decoded_store.read(getattr(row, STORE_COLUMN))
        assert np.array_equal(pixels, np.stack(read_sample([getattr(row, c) for c in PATH_COLUMNS])))


def _garble_keeping_size_and_time(folder: Path) -> None:
    """Every PNG becomes bytes that decode to nothing, with its size and modification time as they were: what
    the check's memory and the store trust of a file is unchanged, so only opening one would notice."""
    for png in folder.glob("*.png"):
        st = png.stat()
        png.write_bytes(b"\0" * st.st_size)
        os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_once_the_store_is_built_no_png_is_opened(synth_copy, tmp_path):
    """`check --decode-once` builds the store; after that the PNGs are garbage, and training (both loaders, two
    epochs) and predicting still run: nothing decoded a PNG. Without the store the same run fails on them."""
    d, store = synth_copy, tmp_path / "store"
    r = dalipipe("check", d / "images_train", d / "y_train.csv", "--decode-once", "--store", store)
    assert "no problems found" in r.stdout
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("decoded store")]
    assert "decoding 240 of 240 samples" in line
    dalipipe("check", d / "images_test", "--decode-once", "--store", store)
    _garble_keeping_size_and_time(d / "images_train")
    _garble_keeping_size_and_time(d / "images_test")
    common = ["--epochs", "2", "--image-size", "16", "--batch-size", "16", "--device", "cpu"]
    for loader in ("dali", "torch"):
        run = tmp_path / f"run_{loader}"
        r = dalipipe("train", d / "images_train", d / "y_train.csv", "--out", run, "--loader", loader, *common,
                     "--store", store)
        (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("decoded store")]
        assert "all 240 samples there" in line and "no PNG is decoded" in line, line
        dalipipe("predict", run, d / "images_test", "--out", tmp_path / f"{loader}.csv", "--loader", loader,
                 "--store", store, "--device", "cpu")
    r = dalipipe("train", d / "images_train", d / "y_train.csv", "--out", tmp_path / "no_store", "--loader", "torch",
                 *common, "--no-decode-once", check=False)
    assert_one_line_error(r, ".png", "not a PNG file")


def test_a_changed_png_is_decoded_again(synth_copy, tmp_path):
    index = build_index(synth_copy / "images_train", synth_copy / "y_train.csv")
    first = inspect_images(index, progress=False, store=tmp_path)
    row = first.iloc[3]
    red = Path(row["path_red"])
    changed = 255 - np.asarray(Image.open(red))
    Image.fromarray(changed.astype(np.uint8)).save(red)
    st = red.stat()
    os.utime(red, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later time, even on a coarse clock
    again = inspect_images(index, progress=False, store=tmp_path)
    old, new = row[STORE_COLUMN], again.iloc[3][STORE_COLUMN]
    assert new != old and not Path(old).exists()  # the stale version is gone
    assert np.array_equal(decoded_store.read(new)[1], changed)
    assert (again[STORE_COLUMN] == first[STORE_COLUMN]).sum() == len(first) - 1  # the others are kept
    images, _ = next(iter(make_loader(again.iloc[3:4], np.arange(1), spec=AugmentSpec(image_size=32), norm=RAW,
                                      train=False, device=CPU, settings=LoaderSettings(kind="torch", workers=0))))
    assert torch.equal(images[0, 1], torch.from_numpy(changed).float())


def test_another_gray_rule_or_folder_is_another_file(small_synth, tmp_path, monkeypatch):
    paths = build_index(small_synth / "images_train")[PATH_COLUMNS].values.tolist()[0]
    store = DecodedStore(tmp_path, small_synth / "images_train")
    name = store.file_for(paths)
    assert name == store.file_for(paths)
    assert DecodedStore(tmp_path, small_synth / "images_test").file_for(paths) != name
    monkeypatch.setattr(decoded_store, "GRAY_RULE", decoded_store.GRAY_RULE + 1)
    assert store.file_for(paths) != name


def test_a_folder_of_the_same_name_elsewhere_is_another_store(small_synth, tmp_path):
    """A copy of the images folder in another place, with the same folder name and its files' names, sizes and
    modification times (all that the store trusts of a file): another store, so that a copy whose PNGs were
    changed since and kept their sizes and times never reads the first folder's pixels."""
    folder = small_synth / "images_train"
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / folder.name)  # (copy2: the times are kept)
    paths = build_index(folder)[PATH_COLUMNS].values.tolist()[0]
    copied = [str(copy / Path(p).name) for p in paths]
    assert file_signature(copied) == file_signature(paths)  # only where the folder is differs
    first = DecodedStore(tmp_path / "store", folder)
    second = DecodedStore(tmp_path / "store", copy)
    assert second.file_for(copied) != first.file_for(paths)


def test_a_write_cut_short_leaves_no_file_under_the_name(tmp_path, monkeypatch):
    """A writer stopped mid-file (here: an interrupt in the middle of its write) leaves nothing a reader takes
    for a sample; a file of the wrong size under the name (a crash of the machine) is not trusted either."""
    target = str(tmp_path / "00001-abc.npy")
    arrays = [np.full((8, 8), v, np.uint8) for v in (1, 2, 3)]

    def half_then_interrupt(f, array):
        f.write(b"\x93NUMPY half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        decoded_store.write(target, arrays)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    decoded_store.write(target, arrays)
    assert DecodedStore.holds(target, 8, 8)
    with open(target, "r+b") as f:
        f.truncate(100)
    assert not DecodedStore.holds(target, 8, 8)


# The check writing the store, killed (SIGKILL: no handler runs) half-way through the 21st sample's file.
KILLED_BUILD = """
import os, signal, sys
import numpy as np
from dalipipe.data.index import build_index, inspect_images
real, calls = np.save, []
def save(f, array):
    calls.append(1)
    if len(calls) == 21:
        f.write(b"\\x93NUMPY" + bytes(1000))
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(f, array)
np.save = save
inspect_images(build_index(sys.argv[1]), progress=False, cache=False, workers=1, store=sys.argv[2])
"""


def test_a_killed_store_build_leaves_only_complete_files_and_the_next_run_finishes_it(tmp_path):
    """kill -9 in the middle of a file: the 20 samples before it are complete under their names and hold their
    decoded pixels, the cut file is only a temporary one, and the next check stores the rest and removes it."""
    from dalipipe.data.synthetic import generate
    from dalipipe.settings import SynthSpec

    d = generate(tmp_path / "data", SynthSpec(n_train=8, n_test=40, n_classes=2, image_size=64, seed=2))
    folder, store = d / "images_test", tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(folder), str(store)], env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert len(list(store.rglob("*.npy"))) == 20 and len(list(store.rglob("*.tmp"))) == 1
    index = build_index(folder)
    store_of = DecodedStore(store, folder)
    done = [p for p in index[PATH_COLUMNS].values.tolist() if Path(store_of.file_for(p)).exists()]
    assert len(done) == 20
    for paths in done:
        assert np.array_equal(decoded_store.read(store_of.file_for(paths)), np.stack(read_sample(paths)))
    full = inspect_images(index, progress=False, cache=False, store=store)
    assert all(np.array_equal(decoded_store.read(f), np.stack(read_sample(p)))
               for f, p in zip(full[STORE_COLUMN], index[PATH_COLUMNS].values.tolist()))
    assert not list(store.rglob("*.tmp"))


def test_the_sweep_leaves_the_temporary_files_of_running_writers_and_of_other_machines(tmp_path):
    store = DecodedStore(tmp_path, tmp_path / "images")
    store.dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = {"running": f"00001-aa.npy.{decoded_store._HOST}.{os.getpid()}.tmp",
             "dead": f"00002-bb.npy.{decoded_store._HOST}.{int(dead.stdout)}.tmp",
             "other machine": f"00003-cc.npy.0123abcd.{int(dead.stdout)}.tmp"}
    for name in names.values():
        (store.dir / name).write_bytes(b"half")
    store.sweep([])
    assert sorted(os.listdir(store.dir)) == sorted([names["running"], names["other machine"]])


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_a_store_file_deleted_while_a_loader_reads_is_one_line_naming_it(small_synth, tmp_path, kind):
    index = build_index(small_synth / "images_test")
    stored = inspect_images(index, progress=False, store=tmp_path / "store")
    gone = stored[STORE_COLUMN].iloc[-1]
    os.unlink(gone)
    loader = make_loader(stored, np.arange(len(stored)), spec=SPEC, norm=RAW, train=False, device=CPU,
                         settings=LoaderSettings(kind=kind, batch_size=16, workers=2))
    try:
        with pytest.raises(DataError, match="the decoded store's file of this sample is gone") as e:
            for _ in loader:
                pass
    finally:
        loader.close()
    assert gone in str(e.value) and "\n" not in str(e.value)


def test_without_the_checks_memory_every_store_file_is_written_again(small_synth, tmp_path):
    """--no-cache decodes every PNG again: a store file of the right size with other bytes (what a crash of the
    machine can leave) is repaired; with the memory, the file's size is all that is checked."""
    index = build_index(small_synth / "images_test")
    stored = inspect_images(index, progress=False, store=tmp_path / "store")
    file = stored[STORE_COLUMN].iloc[0]
    right = decoded_store.read(file)
    with open(file, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(bytes(10))
    inspect_images(index, progress=False, store=tmp_path / "store")
    assert not np.array_equal(decoded_store.read(file), right)
    inspect_images(index, progress=False, cache=False, store=tmp_path / "store")
    assert np.array_equal(decoded_store.read(file), right)


def test_sizes_read_as_a_person_reads_them():
    from dalipipe.data.decoded_store import size_text

    assert [size_text(n) for n in (12, 12416, 158e6, 999.6e6, 7.61e9, 1.234e12)] == [
        "12 bytes", "12.4 kB", "158 MB", "1 GB", "7.61 GB", "1.23 TB"]


def test_a_store_place_goes_with_decode_once(small_synth, tmp_path):
    """--store with --no-decode-once is refused (predict, a new run); check's --store builds the store; a
    relative --store is kept resolved, so that a resume from another folder finds the same store."""
    from dalipipe.run import run_dir
    from dalipipe.settings import CheckSettings, PredictSettings

    with pytest.raises(DataError, match="--store DIR is where the decoded store lives"):
        PredictSettings(checkpoints=("r",), images_dir="i", out_csv="o.csv", store="s", decode_once=False)
    with pytest.raises(DataError, match="--store DIR is where the decoded store lives"):
        run_dir.new_config("i", "l", str(tmp_path / "run"), {"store": "s", "decode_once": False})
    assert CheckSettings(images_dir="i", store="s").decode_once is True
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = run_dir.new_config("i", "l", "run", {"store": "rel/store"})
    finally:
        os.chdir(cwd)
    assert cfg.store == str(tmp_path / "rel" / "store")


def test_a_store_the_disk_cannot_hold_is_refused_before_anything_is_written(small_synth, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    index = build_index(small_synth / "images_train", small_synth / "y_train.csv")
    with pytest.raises(DataError) as e:
        inspect_images(index, progress=False, store=tmp_path / "store")
    message = str(e.value)
    assert str(tmp_path / "store") in message and "has 1 GB free" in message and "--store DIR on a disk with room" in message
    assert "--no-decode-once" in message and "\n" not in message
    assert not list((tmp_path / "store").rglob("*.npy")) and not list((tmp_path / "store").rglob("*/"))


def test_where_the_user_did_not_choose_the_place_a_full_disk_only_costs_the_store(small_synth, monkeypatch, caplog):
    """The default place (the cache folder): a store that does not fit is left out with one warning line,
    and the command goes on decoding the PNGs, as with --no-decode-once."""
    import logging

    from dalipipe.data.decoded_store import Place

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    index = build_index(small_synth / "images_train", small_synth / "y_train.csv")
    with caplog.at_level(logging.INFO, logger="dalipipe"):
        out = inspect_images(index, store=Place(Path(os.environ["DALIPIPE_CACHE_DIR"]) / "decoded", required=False))
    assert STORE_COLUMN not in out.columns and len(out) == len(index)
    (line,) = [r.getMessage() for r in caplog.records if "decoded store" in r.getMessage()]
    assert line.startswith("warning: ") and "has 1 GB free" in line and "decoding the PNGs each time instead" in line
