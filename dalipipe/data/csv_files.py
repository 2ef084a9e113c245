"""The one reader of every CSV dalipipe reads: labels, answers, submissions and --ids."""

from __future__ import annotations

import codecs
import csv
import io
import re
from pathlib import Path

import pandas as pd

from dalipipe.constants import LABEL_COLUMNS
from dalipipe.errors import DataError


def read_csv_columns(csv_path: str | Path, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    """The one reader of every CSV dalipipe reads (labels, answers, submissions, --ids): the named columns,
    found by name in any order (other columns are ignored), as stripped strings, plus `csv_line`: the line
    where each row starts as an editor numbers it (blank lines and line breaks inside quoted fields count).
    UTF-8 only, with or without a byte-order mark: any other encoding would read some names wrong without a
    word (Excel's "CSV" on Windows is cp1252), so it is refused naming the line and the fix. Blank lines and
    rows of empty fields (which spreadsheets write) are skipped."""
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    data = path.read_bytes()
    bom = codecs.BOM_UTF8 if data.startswith(codecs.BOM_UTF8) else b""
    try:
        text = data[len(bom):].decode("utf-8")
    except UnicodeDecodeError as e:
        at = len(bom) + e.start
        line = len(re.findall(rb"\r\n|\r|\n", data[:at])) + 1  # the line breaks the csv reader splits at
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[at]:02x} at offset {at}); save it as UTF-8 "
                        "(in Excel: Save As, CSV UTF-8)") from None
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    rows, start = [], 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: malformed CSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: {what} is empty")
    header = [c.strip() for c in rows[0][1]]
    missing = [c for c in columns if c not in header]
    if missing:
        article = "an" if what[0] in "aeiou" else "a"
        raise DataError(f"{path}: no {' or '.join(repr(c) for c in missing)} column ({article} {what} needs "
                        f"{' and '.join(columns)}; other columns are ignored), got '{','.join(header)}'")
    twice = [c for c in columns if header.count(c) > 1]
    if twice:
        raise DataError(f"{path}: two '{twice[0]}' columns")
    for line, fields in rows[1:]:
        if len(fields) != len(header):
            raise DataError(f"{path}:{line}: {len(fields)} fields, the header has {len(header)}")
    out = pd.DataFrame({c: [fields[header.index(c)].strip() for _, fields in rows[1:]] for c in columns}, dtype=object)
    out["csv_line"] = [line for line, _ in rows[1:]]
    if out.empty:
        raise DataError(f"{path}: {what} has a header but no rows")
    return out


def read_ids(csv_path: str | Path, what: str, columns: tuple[str, ...] = ("file_id",)) -> pd.DataFrame:
    """read_csv_columns, with file_id as integers, each once."""
    out = read_csv_columns(csv_path, columns, what)
    first_line: dict[int, int] = {}
    for fid, line in zip(out["file_id"], out["csv_line"]):
        # Digits only: int() would also take '+1', '1_000' and other spellings no file name has.
        if re.fullmatch(r"-[0-9]+", fid):
            raise DataError(f"{csv_path}:{line}: file_id {fid} is negative; ids are the numbers of the image files "
                            "(00001_blue.png is 1)")
        if not re.fullmatch(r"[0-9]+", fid):
            raise DataError(f"{csv_path}:{line}: file_id '{fid}' is not an integer")
        n = int(fid)
        if n in first_line:
            raise DataError(f"{csv_path}:{line}: duplicate file_id {n} (first on line {first_line[n]})")
        first_line[n] = line
    out["file_id"] = list(first_line)
    return out


def read_labels(labels_csv: str | Path, what: str = "labels file") -> pd.DataFrame:
    """file_id, cell_line and csv_line of a labels file (or answers, or a submission), read by the rules
    of read_ids; every row needs a class name."""
    out = read_ids(labels_csv, what, LABEL_COLUMNS)
    empty = out[out["cell_line"] == ""]
    if len(empty):
        raise DataError(f"{labels_csv}:{empty.csv_line.iloc[0]}: empty cell_line for file_id {empty.file_id.iloc[0]}")
    return out
