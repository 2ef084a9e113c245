"""The one rule that turns any accepted PNG into 8-bit gray, on the PIL side.

DALI's decoder (output_type=GRAY) is the other side of the rule; the two agree as follows,
checked on PngSuite (tests/test_pngio.py):
- 8-bit and lower-depth grayscale (with or without alpha): values as stored (alpha dropped). Exact.
- 16-bit grayscale: round(value / 257), i.e. value * 255 / 65535 rounded. Exact.
  (Not value >> 8: that is what DALI was first thought to do, and it is off by one.)
- RGB, palette, 16-bit RGB, with or without alpha: luma of the stored values, within 1 level.
- Colour or palette PNGs with a gAMA chunk other than 1.0 are rejected: DALI's libpng converts them
  in linear light and PIL does not, which differs by up to 90 levels.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from dalipipe.errors import DataError

# The rule's version: raise it when what read_gray returns for any file changes, so that pixels decoded by an
# older rule (the decoded store's, decoded_store.py) are decoded again.
GRAY_RULE = 1

_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"}


_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_chunks(path: str | Path, data: bytes) -> None:
    """Verify every chunk's CRC, as libpng (and so DALI) does: PIL does not check IDAT's, and lets
    through files that would kill a DALI pipeline."""
    if not data.startswith(_SIGNATURE):
        raise DataError(f"{path}: not a PNG file (bad signature)")
    pos = len(_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            raise DataError(f"{path}: PNG does not decode (truncated {kind.decode('latin-1')} chunk)")
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(data[pos + 4 : end]) != crc:
            raise DataError(f"{path}: PNG does not decode (CRC error in {kind.decode('latin-1')} chunk)")
        if kind == b"IEND":
            return
        pos = end + 4
    raise DataError(f"{path}: PNG does not decode (no IEND chunk: truncated file)")


def read_gray(path: str | Path) -> np.ndarray:
    """Decode a PNG to a 2-D uint8 array by the rule above. Raises DataError naming the file."""
    try:
        data = Path(path).read_bytes()
        _check_chunks(path, data)
        with warnings.catch_warnings():  # a huge image is reported once, by name (data.warn_large_images)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            if im.format != "PNG":
                raise DataError(f"{path}: not a PNG file (format {im.format})")
            if im.mode not in _GRAY_MODES:
                gamma = im.info.get("gamma")
                if gamma is not None and abs(float(gamma) - 1.0) > 1e-3:
                    raise DataError(
                        f"{path}: colour PNG with gamma {gamma}: decoders disagree on it; "
                        "save the channel as 8-bit grayscale"
                    )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
            if im.mode.startswith("I"):
                a = np.asarray(im).astype(np.int64)
                return np.clip(np.floor(a / 257.0 + 0.5), 0, 255).astype(np.uint8)
            with warnings.catch_warnings():  # transparency is dropped on purpose: channels are intensities
                warnings.simplefilter("ignore", UserWarning)
                return np.asarray(im.convert("L"), dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # PIL raises many types for corrupt data; all mean "does not decode"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: PNG does not decode ({msg})") from None


def read_sample(paths: list[str]) -> list[np.ndarray]:
    """A sample's channel files decoded by the rule above, one 2-D array each; a DataError names the file
    that does not decode, or the folder where the channels differ in size."""
    arrays = [read_gray(p) for p in paths]
    shapes = [a.shape for a in arrays]
    if len(set(shapes)) != 1:
        desc = ", ".join(f"{Path(p).name} {s[1]}x{s[0]}" for p, s in zip(paths, shapes))
        raise DataError(f"{Path(paths[0]).parent}: channels of one sample differ in size ({desc})")
    return arrays


def sample_stats(arrays: list[np.ndarray]) -> tuple:
    """(height, width, mean of each channel..., mean square of each channel...) of a decoded sample."""
    means = [float(a.mean(dtype=np.float64)) for a in arrays]
    meansqs = [float(np.square(a, dtype=np.float64).mean()) for a in arrays]
    return (*arrays[0].shape, *means, *meansqs)


def inspect_sample(paths: list[str]) -> tuple:
    """Check one sample's channel files: sample_stats of read_sample. Raises DataError naming the file.
    Runs in the data check's worker processes, which is why it lives here, in a module that imports only
    numpy and PIL."""
    return sample_stats(read_sample(paths))


def png_shape(path: str | Path) -> tuple[int, int] | None:
    """(height, width) from a PNG's header, without decoding it; None where the file does not start as a
    PNG does (the check then says what is wrong with it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or not head.startswith(_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return height, width
