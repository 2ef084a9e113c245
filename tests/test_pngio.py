"""The one gray-conversion rule, on PngSuite: PIL side (pngio.read_gray) against DALI's decoder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dalipipe.data.pngio import read_gray
from dalipipe.errors import DataError
from tests.conftest import pngsuite


def _dali_gray(files: list[str]) -> list[np.ndarray]:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        enc, _ = fn.readers.file(files=files, random_shuffle=False)
        return fn.decoders.image(enc, device="cpu", output_type=types.GRAY)

    p = pipe()
    p.build()
    return [np.array(p.run()[0].at(0))[..., 0] for _ in files]


def _suite(pred) -> list[str]:
    return sorted(str(f) for f in pngsuite().glob("*.png") if pred(f.name))


def test_every_corrupt_pngsuite_file_is_a_one_line_error():
    corrupt = _suite(lambda n: n.startswith("x"))
    assert len(corrupt) >= 10
    for f in corrupt:
        with pytest.raises(DataError) as e:
            read_gray(f)
        assert f in str(e.value) and "\n" not in str(e.value)


def test_gray_up_to_8_bit_matches_dali_exactly():
    files = _suite(lambda n: n[4:6] in ("0g", "4a") and not n.endswith("16.png") and not n.startswith("x"))
    assert len(files) > 20
    for f, d in zip(files, _dali_gray(files)):
        assert np.array_equal(read_gray(f), d), f


def test_16_bit_gray_is_rounded_value_over_257_as_dali():
    files = _suite(lambda n: n.endswith("0g16.png") and not n.startswith("x"))
    assert len(files) >= 8
    for f, d in zip(files, _dali_gray(files)):
        raw = np.asarray(Image.open(f)).astype(np.int64)
        ours = read_gray(f)
        assert np.array_equal(ours, np.round(raw / 257).astype(np.uint8)), f
        assert np.array_equal(ours, d), f


def test_colour_and_palette_within_one_level_of_dali():
    files = _suite(lambda n: n[4:6] in ("2c", "3p", "6a") and not n.startswith(("x", "g")))
    assert len(files) > 40
    for f, d in zip(files, _dali_gray(files)):
        assert np.abs(read_gray(f).astype(int) - d).max() <= 1, f


def test_colour_with_gamma_is_rejected_by_name():
    f = str(pngsuite() / "g03n2c08.png")
    with pytest.raises(DataError, match="gamma"):
        read_gray(f)
    # A grayscale file with a gamma chunk decodes the same in both: accepted.
    assert read_gray(pngsuite() / "g03n0g16.png").dtype == np.uint8
