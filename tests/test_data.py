"""The data layer: every validation failure on real files, the split, and the statistics."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from dalipipe.data.csv_files import read_labels
from dalipipe.data.index import LabelMap, build_index, inspect_images, scan_images
from dalipipe.data.split import stratified_split
from dalipipe.data.stats import channel_stats
from dalipipe.errors import DataError
from tests.conftest import pngsuite, write_labels, write_sample


def _index(d):
    return inspect_images(build_index(d / "images_train", d / "y_train.csv"), progress=False)


def test_clean_synthetic_set_indexes(small_synth):
    idx = _index(small_synth)
    assert len(idx) == 240 and idx.file_id.is_monotonic_increasing
    assert set(idx.cell_line) == {"RT4", "CACO-2", "HEK 293", "MCF7"}
    assert (idx.height == 32).all() and (idx.width == 32).all()


def test_missing_channel_names_the_file(synth_copy):
    (synth_copy / "images_train" / "00007_red.png").unlink()
    with pytest.raises(DataError, match=r"00007_red\.png: missing channel"):
        scan_images(synth_copy / "images_train")


def test_prediction_scan_leaves_incomplete_samples_out_with_a_warning(synth_copy, caplog):
    (synth_copy / "images_test" / "00250_yellow.png").unlink()
    with caplog.at_level(logging.WARNING, logger="dalipipe"):
        idx = scan_images(synth_copy / "images_test", skip_incomplete=True)
    assert 250 not in set(idx.file_id) and len(idx) == 59
    assert "00250_yellow.png" in caplog.text


def test_label_without_images_names_the_row(synth_copy):
    with open(synth_copy / "y_train.csv", "a") as f:
        f.write("99999,RT4\n")
    with pytest.raises(DataError, match=r"y_train\.csv:242: file_id 99999 has no images"):
        build_index(synth_copy / "images_train", synth_copy / "y_train.csv")


def test_images_without_label_warn_and_are_dropped(synth_copy, caplog):
    labels = pd.read_csv(synth_copy / "y_train.csv").iloc[:-3]
    labels.to_csv(synth_copy / "y_train.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="dalipipe"):
        idx = build_index(synth_copy / "images_train", synth_copy / "y_train.csv")
    assert len(idx) == 237
    assert "3 sample(s)" in caplog.text


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "labels file is empty"),
        ("file_id,cell_line\n", "header but no rows"),
        ("id,label\n1,RT4\n", "no 'file_id' or 'cell_line' column .* got 'id,label'"),
        ("file_id,label\n1,RT4\n", "no 'cell_line' column"),
        ("file_id,cell_line\n1,RT4\nabc,RT4\n", r":3: file_id 'abc' is not an integer"),
        ("file_id,cell_line\n1,RT4\n+2,RT4\n", r":3: file_id '\+2' is not an integer"),
        ("file_id,cell_line\n1_000,RT4\n", r":2: file_id '1_000' is not an integer"),
        ("file_id,cell_line\n1,RT4\n-3,RT4\n", r":3: file_id -3 is negative; ids are the numbers of the image files"),
        ("file_id,cell_line\n1,RT4\n2,HeLa\n1,HeLa\n", r":4: duplicate file_id 1 \(first on line 2\)"),
        ("file_id,cell_line\n1,RT4\n2,\n", r":3: empty cell_line"),
        ('file_id,cell_line\n1,"RT4\n', "malformed CSV"),
    ],
)
def test_bad_labels_files(tmp_path, text, message):
    p = tmp_path / "y.csv"
    p.write_text(text)
    with pytest.raises(DataError, match=message):
        read_labels(p)


def test_labels_file_missing(tmp_path):
    with pytest.raises(DataError, match="labels file not found"):
        read_labels(tmp_path / "nope.csv")


@pytest.mark.parametrize("corrupt", ["xcsn0g01.png", "xc1n0g08.png", "xd0n2c08.png", "xhdn0g08.png"])
def test_corrupt_png_names_the_file(synth_copy, corrupt):
    target = synth_copy / "images_train" / "00011_blue.png"
    shutil.copy(pngsuite() / corrupt, target)
    with pytest.raises(DataError, match=r"00011_blue\.png: (PNG does not decode|not a PNG)"):
        _index(synth_copy)


def test_channels_of_different_sizes(synth_copy):
    write_sample(synth_copy / "images_train", 5, np.zeros((32, 32)), np.zeros((16, 32)), np.zeros((32, 32)))
    with pytest.raises(DataError, match=r"differ in size \(00005_yellow\.png 32x32, 00005_red\.png 32x16"):
        _index(synth_copy)


def test_class_with_one_sample(synth_copy):
    labels = pd.read_csv(synth_copy / "y_train.csv")
    labels.loc[4, "cell_line"] = "Lonely"
    labels.to_csv(synth_copy / "y_train.csv", index=False)
    with pytest.raises(DataError, match=r"y_train\.csv:6: class 'Lonely' has 1 sample"):
        build_index(synth_copy / "images_train", synth_copy / "y_train.csv")


def test_not_a_directory(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        scan_images(tmp_path / "missing")
    with pytest.raises(DataError, match="no channel PNGs"):
        scan_images(tmp_path)


def test_split_is_stratified_seeded_and_disjoint(small_synth):
    idx = build_index(small_synth / "images_train", small_synth / "y_train.csv")
    train, val = stratified_split(idx, 0.3, 42)
    assert set(train.file_id).isdisjoint(val.file_id)
    assert set(train.file_id) | set(val.file_id) == set(idx.file_id)
    assert len(val) == 72
    for y, group in idx.groupby("y"):
        assert abs((val.y == y).sum() - 0.3 * len(group)) <= 1
    again_train, again_val = stratified_split(idx, 0.3, 42)
    assert again_val.file_id.tolist() == val.file_id.tolist()
    other_val = stratified_split(idx, 0.3, 7)[1]
    assert other_val.file_id.tolist() != val.file_id.tolist()
    # (a --val-fraction outside (0, 1) is the options table's to refuse: test_options_table)


def test_channel_stats_against_numpy(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {i: [rng.integers(0, 256, (20, 24)) for _ in range(3)] for i in (1, 2, 3, 4)}
    for i, (y, r, b) in imgs.items():
        write_sample(tmp_path / "img", i, y, r, b)
    write_labels(tmp_path / "y.csv", [(1, "a"), (2, "b"), (3, "b"), (4, "a")])
    idx = inspect_images(build_index(tmp_path / "img", tmp_path / "y.csv"), progress=False)
    norm = channel_stats(idx[idx.file_id.isin([1, 2])])  # "training split" only
    for k in range(3):
        pixels = np.concatenate([imgs[1][k].ravel(), imgs[2][k].ravel()]).astype(np.float64)
        assert norm.mean[k] == pytest.approx(pixels.mean(), rel=1e-9)
        assert norm.std[k] == pytest.approx(pixels.std(), rel=1e-9)


def test_label_map_is_sorted_and_round_trips():
    lm = LabelMap.from_labels(pd.Series(["U-2 OS", "HEK 293", "A549", "HEK 293"]))
    assert lm.names == ("A549", "HEK 293", "U-2 OS")
    ys = lm.encode(pd.Series(["U-2 OS", "A549"]))
    assert ys.tolist() == [2, 0] and lm.decode(ys) == ["U-2 OS", "A549"]


def test_checks_are_remembered_until_a_file_changes(synth_copy, monkeypatch):
    import dalipipe.data.index
    from dalipipe.data.pngio import inspect_sample

    idx = build_index(synth_copy / "images_train", synth_copy / "y_train.csv")
    first = inspect_images(idx, progress=False)
    calls = []
    monkeypatch.setattr(dalipipe.data.index, "inspect_sample", lambda p: calls.append(p) or inspect_sample(p))
    again = inspect_images(idx, progress=False)
    assert calls == [] and again.equals(first)  # nothing decoded the second time, the same results
    # A changed file (another size or time) is checked again: here it is now corrupt.
    bad = synth_copy / "images_train" / "00007_red.png"
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(DataError, match="00007_red.png"):
        inspect_images(idx, progress=False)
    assert len(calls) == 1
    calls.clear()
    inspect_images(idx.iloc[:5], progress=False, cache=False)  # the memory off: every sample decoded
    assert len(calls) == 5


def test_a_file_rewritten_with_the_same_size_is_checked_again(synth_copy, monkeypatch):
    """The memory is keyed by size and modification time: a file of the same size written anew (here one
    byte of its image data changed, so its CRC no longer matches) has another time, and is decoded again."""
    idx = build_index(synth_copy / "images_train", synth_copy / "y_train.csv")
    inspect_images(idx, progress=False)
    png = synth_copy / "images_train" / "00007_red.png"
    data, before = bytearray(png.read_bytes()), png.stat()
    data[data.index(b"IDAT") + 8] ^= 0xFF
    png.write_bytes(bytes(data))
    # a rewrite's new time, made certain: two writes within a file system's clock tick can share one
    os.utime(png, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert png.stat().st_size == before.st_size
    with pytest.raises(DataError, match="00007_red.png: PNG does not decode"):
        inspect_images(idx, progress=False)


def test_memories_of_another_check_version_are_not_trusted(synth_copy, monkeypatch):
    import dalipipe.data.check_cache
    import dalipipe.data.index
    from dalipipe.data.pngio import inspect_sample

    idx = build_index(synth_copy / "images_train", synth_copy / "y_train.csv").iloc[:6]
    inspect_images(idx, progress=False)
    calls = []
    monkeypatch.setattr(dalipipe.data.index, "inspect_sample", lambda p: calls.append(p) or inspect_sample(p))
    monkeypatch.setattr(dalipipe.data.check_cache, "CHECK_VERSION", dalipipe.data.check_cache.CHECK_VERSION + 1)
    inspect_images(idx, progress=False)
    assert len(calls) == 6  # a changed check decodes everything again


def test_a_sample_that_failed_is_not_remembered(synth_copy, monkeypatch):
    import dalipipe.data.index
    from dalipipe.data.pngio import inspect_sample

    idx = build_index(synth_copy / "images_train", synth_copy / "y_train.csv").iloc[:6]
    bad = synth_copy / "images_train" / f"{idx.file_id.iloc[2]:05d}_blue.png"
    shutil.copy(pngsuite() / "xcrn0g04.png", bad)
    with pytest.raises(DataError, match=bad.name):
        inspect_images(idx, progress=False)
    calls = []
    monkeypatch.setattr(dalipipe.data.index, "inspect_sample", lambda p: calls.append(p) or inspect_sample(p))
    with pytest.raises(DataError, match=bad.name):  # found again, by decoding it again
        inspect_images(idx, progress=False)
    assert calls[0][0].endswith(bad.name.replace("blue", "yellow")) and len(calls) == 1


def test_parallel_check_equals_serial_and_reports_the_first_bad_sample(synth_copy):
    idx = build_index(synth_copy / "images_train", synth_copy / "y_train.csv")
    serial = inspect_images(idx, progress=False, cache=False, workers=1)
    parallel = inspect_images(idx, progress=False, cache=False, workers=2, parallel_from=1)
    assert parallel.equals(serial)
    for fid in (30, 12):  # two bad samples: the first in index order is the one reported
        shutil.copy(pngsuite() / "xcrn0g04.png", synth_copy / "images_train" / f"{fid:05d}_blue.png")
    with pytest.raises(DataError, match="00012_blue.png"):
        inspect_images(idx, progress=False, cache=False, workers=2, parallel_from=1)


def test_a_csv_that_is_not_utf8_is_refused_naming_the_line_and_the_fix(tmp_path):
    p = tmp_path / "y.csv"
    p.write_bytes("file_id,cell_line\n1,RT4\n2,Café\n".encode("cp1252"))  # as Excel on Windows saves it
    with pytest.raises(DataError, match=r"y\.csv:3: not UTF-8 \(byte 0xe9 at offset 29\); save it as UTF-8"):
        read_labels(p)
    p.write_bytes("\ufefffile_id,cell_line\n1,RT4\n2,Café\n".encode("utf-8"))  # UTF-8 with a BOM reads
    assert read_labels(p).cell_line.tolist() == ["RT4", "Café"]


@pytest.mark.parametrize(
    "text, message",
    [
        # Lines as an editor numbers them: blank lines count, and a quoted field may hold a line break.
        ("file_id,cell_line\n\n1,RT4\n\n2,\"HEK\n293\"\nabc,RT4\n", r"y\.csv:7: file_id 'abc' is not an integer"),
        ("file_id,cell_line\r\n1,RT4\r\n\r\n1,HeLa\r\n", r"y\.csv:4: duplicate file_id 1 \(first on line 2\)"),
        ("\nfile_id,cell_line\n1,\"A\nB\"\n\n1,HeLa\n", r"y\.csv:6: duplicate file_id 1 \(first on line 3\)"),
        ("file_id,cell_line\n1,RT4\n2,RT4,x\n", r"y\.csv:3: 3 fields, the header has 2"),
        ("file_id,cell_line\n1,RT4\n2,\"RT4\n", r"y\.csv:3: malformed CSV"),
    ],
)
def test_csv_errors_name_the_line_an_editor_shows(tmp_path, text, message):
    p = tmp_path / "y.csv"
    p.write_bytes(text.encode())
    with pytest.raises(DataError, match=message):
        read_labels(p)


def test_rows_start_on_the_line_an_editor_shows(tmp_path):
    p = tmp_path / "y.csv"
    p.write_text("file_id,cell_line\n\n1,RT4\n2,\"HEK\n293\"\n,\n3,HeLa\n")  # ",": a spreadsheet's empty row
    labels = read_labels(p)
    assert labels.file_id.tolist() == [1, 2, 3] and labels.csv_line.tolist() == [3, 4, 7]
    assert labels.cell_line.tolist() == ["RT4", "HEK\n293", "HeLa"]


def test_ids_files_follow_the_one_rule_of_every_csv(small_synth, tmp_path):
    from dalipipe.infer.predict import select_ids

    images = small_synth / "images_test"
    index = scan_images(images)
    first, second = index.file_id.iloc[0], index.file_id.iloc[1]
    p = tmp_path / "ids.csv"
    # The header that labels and answers accept; only file_id is needed, in the order given.
    p.write_text(f" file_id , cell_line \n{second}, RT4\n\n{first},RT4\n")
    assert select_ids(index, p, images).file_id.tolist() == [second, first]
    p.write_text(f"file_id\n{first}\n")
    assert select_ids(index, p, images).file_id.tolist() == [first]
    for text, message in [(f"file_id\n{first}.0\n", rf"ids\.csv:2: file_id '{first}\.0' is not an integer"),
                          (f"file_id\n{first}\nabc\n", r"ids\.csv:3: file_id 'abc' is not an integer"),
                          (f"file_id\n\n{first}\n\n{first}\n", rf"ids\.csv:5: duplicate file_id {first} \(first on line 3\)"),
                          ("file_id\n1\n\n99999\n", r"ids\.csv:2: file_id 1 has no complete set of channel images"),
                          ("id\n1\n", r"ids\.csv: no 'file_id' column \(an ids file needs file_id; other columns")]:
        p.write_text(text)
        with pytest.raises(DataError, match=message):
            select_ids(index, p, images)


def test_subset_gives_exactly_n_samples_in_the_class_proportions():
    from dalipipe.constants import REAL_CLASS_COUNTS
    from dalipipe.data.split import _subset_counts

    sizes = pd.Series(REAL_CLASS_COUNTS)
    total, k = int(sizes.sum()), len(sizes)
    for n in range(1, total):
        counts = _subset_counts(sizes, n)
        assert (counts >= 1).all() and (counts <= sizes).all(), n
        if n < k:  # one of each class is the least a stratified subset holds
            assert counts.sum() == k, n
            continue
        assert counts.sum() == n, (n, counts.sum())
        # Largest remainder: each class within one sample of its share (exact integer arithmetic).
        assert ((counts * total - sizes * n).abs() < total).all(), n


def test_stratified_subset_draws_exactly_n(small_synth):
    from dalipipe.data.split import stratified_subset

    index = build_index(small_synth / "images_train", small_synth / "y_train.csv")
    for n in (50, 101, 239):
        assert len(stratified_subset(index, n, 0, val_fraction=0.3)) == n


def test_subset_ties_of_equal_remainders_go_to_the_larger_class_then_by_name():
    """2, 2 and 5 samples, 6 wanted: shares 1.33, 1.33 and 3.33, all the same remainder; the one sample left
    goes to the largest class (C), not to the first name (A). The same subset every time, and the one
    closest to the proportions."""
    from dalipipe.data.split import _subset_counts

    assert _subset_counts(pd.Series({"A": 2, "B": 2, "C": 5}), 6).to_dict() == {"A": 1, "B": 1, "C": 4}
    # equal sizes too: by name
    assert _subset_counts(pd.Series({"B": 3, "A": 3, "C": 3}), 4).to_dict() == {"B": 1, "A": 2, "C": 1}
