"""`dalipipe score`: a submission's balanced accuracy against the answers (no model: loads no torch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dalipipe.data.csv_files import read_labels
from dalipipe.errors import DataError
from dalipipe.infer.class_report import class_report

log = logging.getLogger("dalipipe")


@dataclass(frozen=True)
class Scored:
    balanced_accuracy: float
    report: str  # per-class precision, recall and F1 (class_report)


def score(submission_csv: str, answers_csv: str) -> float:
    """Balanced accuracy of a submission against a labels file (see scored)."""
    return scored(submission_csv, answers_csv).balanced_accuracy


def scored(submission_csv: str, answers_csv: str) -> Scored:
    """A submission against a labels file, both read by the rules of training (names stripped, ids integers,
    no duplicates); every answer needs a prediction of a known class."""
    from sklearn.metrics import balanced_accuracy_score

    truth = read_labels(answers_csv, what="answers file")
    sub = read_labels(submission_csv, what="submission")
    classes = set(truth["cell_line"])
    unknown = ~sub["cell_line"].isin(classes)
    if unknown.any():
        row = sub[unknown].iloc[0]
        raise DataError(f"{submission_csv}:{row.csv_line}: predicted class '{row.cell_line}' is not a class of "
                        f"{answers_csv} ({', '.join(sorted(classes))})")
    merged = truth.merge(sub[["file_id", "cell_line"]], on="file_id", how="left", suffixes=("", "_pred"))
    missing = merged["cell_line_pred"].isna()
    if missing.any():
        row = merged[missing].iloc[0]
        raise DataError(f"{answers_csv}:{row.csv_line}: no prediction for file_id {row.file_id} in {submission_csv} "
                        f"({int(missing.sum())} in all)")
    extra = len(set(sub["file_id"]) - set(truth["file_id"]))
    if extra:
        log.warning(f"warning: {extra} prediction(s) in {submission_csv} for ids not in {answers_csv}; ignored")
    names = sorted(classes)
    position = {n: k for k, n in enumerate(names)}
    y_true, y_pred = (merged[c].map(position).to_numpy() for c in ("cell_line", "cell_line_pred"))
    return Scored(float(balanced_accuracy_score(merged["cell_line"], merged["cell_line_pred"])),
                  class_report(y_true, y_pred, names)[0])
